"""The host agent: pull this host's signed releases, check them, install, switch,
health-check, roll back (updater), by the pure rules of reconciler.core.trust.

config     the agent's YAML file
state      what survives a restart (state.json)
metrics    the agent's Prometheus metrics
supervisor the AppImage the agent runs itself (``supervise: true``)
health     the health probe
updater    one poll, and the long-running loop
verify     `reconciler verify`: a release and its artifacts, checked by hand
"""
