"""Adapters: git, Nix, gpg, the stores, the sqlite ledger, HTTP. They import the
core and the configuration, never the daemon or the agent."""
