"""The daemon: the reconcile pass over the adapters, its loop, triggers and metrics."""
