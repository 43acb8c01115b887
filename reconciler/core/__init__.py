"""The pure core: functions on frozen data. No process, socket, database, gpg,
clock or environment; tests/unit/test_layering.py keeps it so."""
