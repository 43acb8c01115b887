"""The parse of many host files spread over processes (reconciler.daemon.parsing)."""

from __future__ import annotations

import pytest

from reconciler.core.hosts import ParseCache, parse_fleet
from reconciler.daemon import parsing


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
    assert parsing.prefill(files, cache, workers=3) == 3
    # Every single host file has its result; the twin files are left to parse_fleet.
    assert len(cache.hosts) == 45
    together = parse_fleet(files, cache)
    assert together.hosts == alone.hosts
    assert [str(e) for e in together.errors] == [str(e) for e in alone.errors]
    assert together.invalid == alone.invalid and "dup" in together.invalid
    assert all(h.sources == alone.hosts[n].sources for n, h in together.hosts.items())


def test_too_few_files_for_more_than_one_worker_start_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parsing, "MIN_PER_WORKER", 10)
    cache = ParseCache()
    assert parsing.prefill(fleet_files(19), cache, workers=8) == 0
    assert cache.hosts == {}
    # Nor is anything parsed again that the cache holds.
    files = fleet_files(45)
    parse_fleet(files, cache)
    assert parsing.prefill(files, cache, workers=3) == 0
