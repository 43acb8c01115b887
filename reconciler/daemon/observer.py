"""The pass's first two steps, observe and diff: fetch the config repository's head,
let the commit gate judge it, parse the host definitions, evaluate what changed in
Nix, and plan each host against the ledger.

`reconciler plan` runs only this, and so imports only this: what builds, signs and
publishes (reconciler.daemon.reconciler), and the metrics' client library, cost a
new process more than planning a thousand unchanged hosts does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from reconciler import log
from reconciler.config import Config
from reconciler.core.events import Event, summary
from reconciler.core.hosts import (
    Fleet,
    Host,
    ParseCache,
    ParseKey,
    decode_parsed,
    defined_packages,
    encode_parsed,
    parse_fleet,
)
from reconciler.core.model import (
    COMMIT_KEY,
    FETCH_ERROR_KEY,
    SOURCE_ERROR_KEY,
    Evaluation,
    FetchFailure,
    HostState,
)
from reconciler.core.plan import Plan, make_plan
from reconciler.daemon import history, parsing
from reconciler.daemon.evaluation import Evaluating
from reconciler.daemon.gate import CommitRefusedError, Refusal
from reconciler.errors import SourceError
from reconciler.ports import Clock, Gate, Ledger, Nix, Source


@dataclass(frozen=True)
class Observation:
    commit: str
    fleet: Fleet
    evaluation: Evaluation
    changed: frozenset[str] | None
    commit_time: float  # committer time, unix seconds


class ObserveMetrics(Protocol):
    """What an observation counts and times (reconciler.daemon.metrics.Metrics)."""

    def stage(self, stage: str, seconds: float) -> None:
        """``stage`` (fetch, parse, evaluate) took ``seconds``."""

    def fetch_failed(self) -> None: ...

    def commit_refused(self, reason: Refusal) -> None: ...


class Unmeasured:
    """The metrics of an observation no one scrapes (`reconciler plan`)."""

    def stage(self, stage: str, seconds: float) -> None:
        pass

    def fetch_failed(self) -> None:
        pass

    def commit_refused(self, reason: Refusal) -> None:
        pass


class Observer:
    """Observes the head and plans from it (observe, plan_of); keeps the last
    observation, and the host files parsed before, for the next."""

    def __init__(
        self,
        cfg: Config,
        source: Source,
        nix: Nix,
        ledger: Ledger,
        gate: Gate,
        clock: Clock,
        metrics: ObserveMetrics | None = None,
        emit: Callable[[Event], None] = lambda event: None,
    ) -> None:
        """``emit`` records an event in the history (a refused head commit)."""
        self.cfg = cfg
        self.source = source
        self.nix = nix
        self.state = ledger
        self.clock = clock
        self.gate = gate
        self.metrics: ObserveMetrics = metrics or Unmeasured()
        self._emit = emit
        self._parse_cache = ParseCache()
        # Host file -> the ParseKey the ledger holds for it; None until first read.
        self._recorded_parses: dict[str, ParseKey] | None = None
        # Parsing many host files at once uses as many processes as evaluating them.
        workers = cfg.nix.eval_workers
        self._parse_workers = len(os.sched_getaffinity(0)) if workers == "auto" else workers
        # The last observation and the recipe it was evaluated with: a pass whose head
        # and recipe are unchanged reuses its fleet and images instead of reading,
        # parsing and keying every host again.
        self._last: tuple[Observation, str | None] | None = None
        # The invalid hosts' errors the last observation logged.
        self._invalid_logged: frozenset[str] = frozenset()

    @property
    def last(self) -> Observation | None:
        """The last observation made, if any."""
        return None if self._last is None else self._last[0]

    def close(self) -> None:
        self.state.close()
        self.gate.close()

    def plan(self, respect_backoff: bool = True) -> tuple[Observation, Plan]:
        """Observe, and plan every host against the ledger (`reconciler plan`)."""
        obs = self.observe()
        return obs, self.plan_of(
            obs, self.state.hosts(), self.clock.now().timestamp() if respect_backoff else None
        )

    def plan_of(self, obs: Observation, recorded: Mapping[str, HostState], now: float | None) -> Plan:
        """``obs`` planned against ``recorded`` (the ledger's hosts); ``now`` None: no
        host waits out its backoff."""
        return make_plan(
            obs.commit,
            obs.fleet,
            obs.evaluation.images,
            obs.evaluation.errors,
            recorded,
            obs.changed,
            now=now,
            max_wait=self.cfg.retry.max.total_seconds(),
            suspended=self.state.suspensions(),
        )

    def observe(self) -> Observation:
        started = self.clock.monotonic()
        try:
            commit = self.source.fetch()
        except SourceError as exc:
            self.metrics.fetch_failed()
            # For `reconciler status`: since when every fetch fails, so that it does not
            # show hosts as fine while newer commits cannot be seen.
            now, error = self.clock.now().timestamp(), summary(str(exc))
            prev = FetchFailure.from_json(self.state.get_meta(FETCH_ERROR_KEY))
            failure = prev.after(now, error) if prev is not None else FetchFailure(now, now, 1, error)
            self.state.set_meta(FETCH_ERROR_KEY, failure.to_json())
            raise
        finally:
            self.metrics.stage("fetch", self.clock.monotonic() - started)
        if self.state.get_meta(FETCH_ERROR_KEY):
            self.state.set_meta(FETCH_ERROR_KEY, "")
        self.check_head(commit)
        recipe = self.nix.recipe_digest()
        changed = self.source.changed_files(self.state.get_meta(COMMIT_KEY), commit)
        last = self._last
        # An evaluation that failed somewhere may have failed for a passing reason
        # (a timeout): it is repeated.
        if (
            last is not None
            and last[0].commit == commit
            and last[1] == recipe
            and not last[0].evaluation.errors
        ):
            fleet, evaluation = last[0].fleet, last[0].evaluation
        else:
            fleet, evaluation = self._parse_and_evaluate(commit, self.source.read_tree(), recipe)
        # Each once while it stands, not every pass: a poll every few seconds would
        # repeat every invalid host's error into the log.
        invalid = {str(err): err for err in fleet.errors}
        for said, err in invalid.items():
            if said not in self._invalid_logged:
                log.event("host_invalid", logging.WARNING, file=err.path, key=err.key, reason=err.reason)
        self._invalid_logged = frozenset(invalid)
        obs = Observation(commit, fleet, evaluation, changed, self.source.commit_time(commit))
        self._last = (obs, recipe)
        return obs

    def _parse_and_evaluate(
        self, commit: str, files: Mapping[str, str], recipe: str | None
    ) -> tuple[Fleet, Evaluation]:
        """The fleet ``files`` define and every host's image derivation.

        Host files the ledger holds no parse of are parsed in batches
        (reconciler.daemon.parsing), and each batch's hosts go to Nix while the next is
        parsed: on a fleet's first plan the two take about as long (some 160 and 150
        microseconds a host), so overlapped the plan takes little more than the longer.
        The hosts parsed before are evaluated after, if their inputs changed. The
        parse's stage duration runs until every file is parsed, the evaluation's from
        there to the last image."""
        started = self.clock.monotonic()
        work = Evaluating(self.state, self.nix, self.source, commit, recipe, defined_packages(files))
        # One Nix evaluation at a time (each spread over nix.eval_workers processes).
        with ThreadPoolExecutor(1, thread_name_prefix="nix-eval-batches") as nix:
            pending: list[Future[Evaluation]] = []
            try:
                for results in parsing.batches(files, self._recorded_parse_cache(), self._parse_workers):
                    batch = work.unknown([r for r in results.values() if isinstance(r, Host)])
                    if batch:
                        pending.append(nix.submit(self.nix.evaluate, batch, self.source.checkout))
                fleet = self._parse(files)
                parsed = self.clock.monotonic()
                self.metrics.stage("parse", parsed - started)
                for future in pending:
                    work.add(future.result())
            except BaseException:
                # The observation fails: the batches not started yet are not evaluated.
                nix.shutdown(cancel_futures=True)
                raise
        rest = work.unknown([h for h in fleet.hosts.values() if not work.has(h.name)])
        if rest:
            work.add(self.nix.evaluate(rest, self.source.checkout))
        evaluation = work.result(fleet)
        self.metrics.stage("evaluate", self.clock.monotonic() - parsed)
        return fleet, evaluation

    def _recorded_parse_cache(self) -> ParseCache:
        """The parse cache, with the results the ledger holds from earlier processes
        (read once per process)."""
        cache = self._parse_cache
        if self._recorded_parses is None:
            self._recorded_parses = {}
            for key, encoded in self.state.parsed().items():
                try:
                    cache.hosts[key] = decode_parsed(encoded)
                except (ValueError, KeyError, TypeError):
                    continue  # parsed again, and rewritten
                self._recorded_parses[key[0]] = key
        return cache

    def _parse(self, files: Mapping[str, str]) -> Fleet:
        """parse_fleet with the results the cache holds (_recorded_parse_cache): only
        host files (or what they include) changed since are parsed. What this parse
        added or dropped is written back to the ledger."""
        cache = self._recorded_parse_cache()
        recorded = self._recorded_parses or {}
        fleet = parse_fleet(files, cache)
        now = {key[0]: key for key in cache.hosts}
        if self.state.durable:
            added = {key: encode_parsed(cache.hosts[key]) for p, key in now.items() if recorded.get(p) != key}
            removed = [p for p in recorded if p not in now]
            if added or removed:
                self.state.record_parsed(added, removed)
        self._recorded_parses = now
        return fleet

    def check_head(self, commit: str) -> None:
        """Build nothing from a head commit the commit gate refuses (reconciler.gate);
        every path that builds passes through here."""
        try:
            self.gate.check(self.source, commit, self.state.get_meta(COMMIT_KEY))
        except CommitRefusedError as exc:
            self.metrics.commit_refused(exc.reason)
            # Once per refused head in the history, not once per pass that meets it again.
            if self.state.get_meta(SOURCE_ERROR_KEY) != str(exc):
                self._emit(history.commit_untrusted(exc, self.clock.now().timestamp()))
            self.state.set_meta(SOURCE_ERROR_KEY, str(exc))
            log.event("commit_refused", logging.WARNING, commit=commit, reason=exc.reason, why=exc.why)
            raise
        self.state.set_meta(SOURCE_ERROR_KEY, "")
