"""The parse of the host files a cache holds no result for, in batches: a fleet's first
plan parses thousands of files, and each batch's hosts can go to Nix while the next is
parsed (reconciler.daemon.reconciler overlaps the two).

YAML and validation are pure Python, so threads would take turns; with enough files
the batches are parsed in worker processes, each with every profile and package name
(the same ParseKey context as one parse), and their results fill the cache the one
parse_fleet of the pass then reads. Spawned, not forked: the daemon has threads
(HTTP server, watchers) whose locks a fork would copy held.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from reconciler.core.hosts import Host, ParseCache, ParseKey, parse_fleet, unparsed
from reconciler.errors import ConfigError

# Below this many host files per worker, starting a process costs more than it saves.
MIN_PER_WORKER = 1000
# Batches per worker process: results come back a batch at a time, so that Nix can
# start on the first while the others are parsed.
BATCHES_PER_WORKER = 2
# A batch parsed in this process has at least this many files (or all there are), and
# there are at most BATCHES of them. Its evaluation starts a nix-instantiate, whose
# loading of the library (some 30 ms) should be small beside the batch's parse (some 75
# ms for 500 files), while the last batch's evaluation, which nothing overlaps, should
# be short. Measured on cold plans, alternating: at 1,000 hosts two batches took 4% less
# than one (8 of 8 rounds); at 10,000 eight took 7% less than four (1.98 against 2.14 s),
# twelve 1% less and sixteen 5% more.
MIN_BATCH = 500
BATCHES = 8

Results = dict[ParseKey, Host | ConfigError]


def batches(files: Mapping[str, str], cache: ParseCache, workers: int) -> Iterator[Results]:
    """Parse the host files of ``files`` that ``cache`` holds no result for, a batch at
    a time: each batch's results are added to ``cache`` and yielded once it is parsed,
    in up to ``workers`` processes when there are enough files, else in this one. A
    host file with a twin (x.yaml beside x.yml) is left to parse_fleet."""
    todo = unparsed(files, cache)
    if not todo:
        return
    shared = {p: t for p, t in files.items() if not p.startswith("hosts/")}
    count = min(workers, len(todo) // MIN_PER_WORKER)
    if count < 2:
        size = max(MIN_BATCH, -(-len(todo) // BATCHES))
        for i in range(0, len(todo), size):
            share = {**shared, **{p: files[p] for p in todo[i : i + size]}}
            results = _parse_share(share, cache.digests)
            cache.hosts.update(results)
            yield results
        return
    # Only here: multiprocessing is some milliseconds of every plan's start.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n = count * BATCHES_PER_WORKER
    shares = [{**shared, **{p: files[p] for p in todo[i::n]}} for i in range(n)]
    digests = [{files[p]: cache.digests[files[p]] for p in todo[i::n]} for i in range(n)]
    with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn")) as pool:
        for results in pool.map(_parse_share, shares, digests):
            cache.hosts.update(results)
            yield results


def _parse_share(files: Mapping[str, str], digests: dict[str, str]) -> Results:
    """parse_fleet's results for ``files``, whose host texts' digests ``unparsed``
    took (``digests``: only read, so the pass's own is handed in, not a copy)."""
    cache = ParseCache(digests=digests)
    parse_fleet(files, cache)
    for result in cache.hosts.values():
        if isinstance(result, Host):
            # Computed here, in parallel, and sent back with the host (a cached
            # property is pickled with it): the pass needs it of every new host, for its
            # evaluation key, Nix's fleet file and the ledger.
            result.nix_json  # noqa: B018
    return cache.hosts
