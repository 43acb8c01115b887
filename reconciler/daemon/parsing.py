"""A large parse spread over processes: the first plan of a fleet of thousands of
host files, when nothing is in the ledger's parse cache yet.

YAML and validation are pure Python, so threads would take turns; each worker
process parses a share of the host files with every profile and package name (the
same ParseKey context as one parse), and its results fill the cache the one
parse_fleet of the pass then reads. Spawned, not forked: the daemon has threads
(HTTP server, watchers) whose locks a fork would copy held.
"""

from __future__ import annotations

from collections.abc import Mapping

from reconciler.core.hosts import Host, ParseCache, ParseKey, parse_fleet, unparsed
from reconciler.errors import ConfigError

# Below this many host files per worker, starting a process costs more than it saves.
MIN_PER_WORKER = 1000


def prefill(files: Mapping[str, str], cache: ParseCache, workers: int) -> int:
    """Parse in up to ``workers`` processes the host files ``cache`` holds no result
    for, and add what they give to ``cache``; how many processes ran (0: too few
    files to be worth it, the caller's parse does them)."""
    todo = unparsed(files, cache)
    count = min(workers, len(todo) // MIN_PER_WORKER)
    if count < 2:
        return 0
    # Only here: multiprocessing is some milliseconds of every plan's start.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shared = {p: t for p, t in files.items() if not p.startswith("hosts/")}
    shares = [{**shared, **{p: files[p] for p in todo[i::count]}} for i in range(count)]
    with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn")) as pool:
        for results in pool.map(_parse_share, shares):
            cache.hosts.update(results)
    return count


def _parse_share(files: Mapping[str, str]) -> dict[ParseKey, Host | ConfigError]:
    cache = ParseCache()
    parse_fleet(files, cache)
    return cache.hosts
