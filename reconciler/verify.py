"""Moved: `reconciler verify` is reconciler.agent.verify, and reading the pinned keys is
reconciler.adapters.gpg.read_keys. This name stays only for reconciler/daemon/gate.py,
which is being rewritten; delete the module once nothing imports it."""

from reconciler.adapters.gpg import read_keys

__all__ = ["read_keys"]
