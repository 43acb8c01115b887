"""The parse of host files in batches, over processes when there are many
(reconciler.daemon.parsing)."""

from __future__ import annotations

import pytest

from reconciler.core import hosts
from reconciler.core.hosts import ParseCache, parse_fleet
from reconciler.daemon import parsing
from tests.conftest import recorded_calls


def fleet_files(n: int) -> dict[str, str]:
    files = {
        "profiles/base.yaml": "network: {gateway: 10.0.0.1}\n",
        "packages/site.nix": "",
        "hosts/dup.yaml": "name: dup\n",
        "hosts/dup.yml": "name: dup\n",
    }
    for i in range(n):
        body = f"name: h-{i}\ninclude: [base]\nnetwork: {{address: 10.0.{i // 250}.{i % 250}/16}}\n"
        if i % 7 == 0:
            body += "formats: [tar]\n"  # invalid
        files[f"hosts/h-{i}.yaml"] = body + "services: {web: {package: site, exec: [bin/web]}}\n"
    return files


def test_workers_fill_the_cache_with_what_one_parse_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parsing, "MIN_PER_WORKER", 10)
    files = fleet_files(45)
    alone = parse_fleet(files)
    cache = ParseCache()
    got = list(parsing.batches(files, cache, workers=3))
    # Three workers, four batches each, every result in the cache as its batch comes.
    assert len(got) == 3 * parsing.BATCHES_PER_WORKER
    assert {k: v for batch in got for k, v in batch.items()} == cache.hosts
    # Every single host file has its result; the twin files are left to parse_fleet.
    assert len(cache.hosts) == 45
    together = parse_fleet(files, cache)
    assert together.hosts == alone.hosts
    assert [str(e) for e in together.errors] == [str(e) for e in alone.errors]
    assert together.invalid == alone.invalid and "dup" in together.invalid
    assert all(h.sources == alone.hosts[n].sources for n, h in together.hosts.items())


def test_fewer_files_are_parsed_here_in_batches_and_nothing_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parsing, "MIN_PER_WORKER", 10)
    monkeypatch.setattr(parsing, "MIN_BATCH", 3)
    monkeypatch.setattr(parsing, "BATCHES", 8)
    files = fleet_files(19)
    cache = ParseCache()
    # Too few for two workers: parsed in this process, at most BATCHES batches.
    got = list(parsing.batches(files, cache, workers=8))
    assert [len(b) for b in got] == [3] * 6 + [1]
    assert parse_fleet(files, cache).hosts == parse_fleet(files).hosts
    # Nothing is parsed again that the cache holds.
    assert list(parsing.batches(files, cache, workers=8)) == []
    # Of a fleet with two more hosts (the same profiles and packages), those two.
    (batch,) = parsing.batches(fleet_files(21), cache, workers=1)
    assert sorted(path for path, _, _ in batch) == ["hosts/h-19.yaml", "hosts/h-20.yaml"]


def test_a_pass_digests_each_host_file_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """unparsed, each batch's parse and the pass's parse_fleet all key hosts by their
    text's digest: it is computed once a text (of 10,000 host files, 30,000 times before)."""
    digested = recorded_calls(monkeypatch, hosts, "text_digest")
    monkeypatch.setattr(parsing, "MIN_BATCH", 10)
    monkeypatch.setattr(parsing, "BATCHES", 4)
    files = fleet_files(45)
    cache = ParseCache()
    assert len(list(parsing.batches(files, cache, workers=1))) == parsing.BATCHES
    parse_fleet(files, cache)
    # Twin files (dup.yaml beside dup.yml) are refused unread.
    texts = [t for p, t in files.items() if p.startswith("hosts/h-")]
    assert sorted(t for (t,) in digested) == sorted(texts)
