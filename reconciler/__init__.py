"""GitOps reconciler: git commits of host definitions in, signed Nix-built images out."""

__version__ = "0.1.0"
