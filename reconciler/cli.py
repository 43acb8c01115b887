"""Command line: `reconciler COMMAND ...`. Errors become one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from reconciler import __version__, log
from reconciler.config import Config, load_config
from reconciler.core.events import EventType
from reconciler.core.tufroles import RoleName
from reconciler.errors import ReconcilerError, ledger_error


def _load(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def cmd_init(args: argparse.Namespace) -> int:
    from reconciler.demo import init

    cfg = init(Path(args.dir))
    print(f"created demo in {args.dir}; next: reconciler reconcile -c {cfg}")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from reconciler.wiring import open_reconciler

    rec = open_reconciler(_load(args))
    try:
        # Against a store another daemon publishes to: wait for its lease to lapse, or fail.
        result = rec.reconcile(respect_backoff=False, standby=False)
    finally:
        rec.close()
    if result.fleet_suspended:
        raise ReconcilerError(
            f"the fleet is suspended: nothing was reconciled (reconciler resume -c {args.config} first)"
        )
    print(f"commit {result.plan.commit}")
    outcomes = {o.host: o for o in result.outcomes}
    for entry in result.plan.entries:
        o = outcomes.get(entry.host)
        if o is None:
            line = f"{entry.host}: {entry.action} ({'; '.join(entry.reasons)})"
        elif o.ok:
            line = f"{entry.host}: published version {o.version}"
        else:
            line = f"{entry.host}: FAILED: {o.error}"
        print(line)
    return 0 if result.ok else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from reconciler.wiring import open_planner

    with tempfile.TemporaryDirectory(prefix="reconciler-plan-") as work:
        rec = open_planner(_load(args), Path(work))
        try:
            _, plan = rec.plan()
        finally:
            rec.close()
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(f"commit {plan.commit}")
        for e in plan.entries:
            print(f"{e.host}: {e.action}: {'; '.join(e.reasons)}")
        print(plan.summary())
    return plan.exit_code(args.detailed_exitcode)


def cmd_build(args: argparse.Namespace) -> int:
    from reconciler.core.hosts import parse_fleet
    from reconciler.wiring import open_reconciler

    rec = open_reconciler(_load(args))
    try:
        # The daemon's checkout changes only under the pass lock, and the head passes
        # the commit gate as in a pass.
        with rec.exclusive():
            rec.check_head(rec.source.fetch())
            fleet = parse_fleet(rec.source.read_tree())
            host = fleet.hosts.get(args.host)
            if host is None:
                why = next((str(e) for e in fleet.errors if e.path.endswith(f"/{args.host}.yaml")), None)
                raise ReconcilerError(why or f"no host {args.host!r} in {rec.cfg.repo.shown_url}")
            # A root of its own: the published build keeps the host's.
            out = rec.build(host, rec.first_version(host.name), gcroot=f"{host.name}.build")
    finally:
        rec.close()
    for _, path in sorted(out.files.items()):
        print(path)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from reconciler.daemon.reconciler import status
    from reconciler.errors import StoreError
    from reconciler.wiring import lease_status, open_ledger

    cfg = _load(args)
    now = time.time()
    state = open_ledger(cfg, read_only=True)
    try:
        st = dict(status(state, now, cfg.retry.max.total_seconds()))
    finally:
        state.close()
    try:
        st["lease"] = lease_status(cfg)
    except StoreError as exc:
        st["lease"] = {"enabled": cfg.lease.enabled, "error": str(exc)}
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    for line in status_lines(st, now):
        print(line)
    return 0


def status_lines(st: Mapping[str, Any], now: float) -> list[str]:
    """``reconciler status`` as text, from what status() and the lease say, at ``now``."""
    out = [f"commit {st['commit'] or '(never reconciled)'}"]
    last = st["last_pass"]
    if last is None:
        out.append("last pass: none recorded")
    else:
        line = f"last pass: {_when(last['at'])} ({_ago(now - last['at'])}), {last['result']}"
        line += f" in {last['seconds']:.1f}s"
        if last["error"]:
            line += f": {last['error']}"
        out.append(line)
        if last["result"] != "success":
            success = st["last_success"]
            out.append(f"last successful pass: {'never' if success is None else _when(success)}")
    fetch = st["fetch_error"]
    if fetch is not None:
        out.append(
            f"fetch: FAILING since {_when(fetch['since'])} ({fetch['passes']} pass(es) in a row, the last at"
            f" {_when(fetch['at'])}): {fetch['error']}"
        )
        out.append(
            f"hosts: as of commit {st['commit'] or '(none)'}: newer commits are not seen while the"
            " repository cannot be fetched"
        )
    if st["source_error"]:
        out.append(f"source: {st['source_error']}")
    out.append(_lease_line(st["lease"]))
    if st["sandbox"] == "off":
        out.append(
            "sandbox: off (nix.sandbox: false): builds can read the machine's files and reach the network"
        )
    suspended = st["suspended"]
    if suspended["fleet"] is not None:
        out.append(f"suspended: the whole fleet, since {_when(suspended['fleet'])} (reconciler resume)")
    for name, h in st["hosts"].items():
        out.append(f"{name}: {_host_line(h)}")
        if name in suspended["hosts"]:
            out[-1] += f"; suspended since {_when(suspended['hosts'][name])}"
    for name in sorted(suspended["hosts"].keys() - st["hosts"].keys()):
        out.append(f"{name}: never reconciled; suspended since {_when(suspended['hosts'][name])}")
    for name, b in st["builders"].items():
        last_build = "never" if b["last_build"] is None else _when(b["last_build"])
        if b["last_build"] is not None and b["last_seconds"] is not None:
            last_build += f", took {_span(b['last_seconds'])}"
        line = f"builder {name}: {b['builds']} built, {b['failures']} failed, {b['unreachable']} unreachable"
        line += f"; last build {last_build}"
        if b["sandbox"] is not None:
            line += f"; sandbox {b['sandbox']}"
        if b["last_error"]:
            line += f"; last error {_when(b['last_error_at'])}: {b['last_error']}"
        out.append(line)
    return out


def _host_line(h: Mapping[str, Any]) -> str:
    """One host: what it serves and since when, and what went wrong with it."""
    since = _when(h["since"])
    if h["status"] != "failed":
        line = f"version {h['version']} {h['status']} since {since}"
        return line + (f" ({h['error']})" if h["error"] else "")
    served = f"version {h['version']} published" if h["version"] else "nothing published"
    attempt = h["attempt_version"]
    line = f"{served}; {'a build' if attempt is None else f'version {attempt}'} failed since {since}"
    line += f" ({h['failures']} attempt(s) in a row): {h['error']}"
    retry = h["next_retry"]
    return line + ("; retried at the next pass" if retry is None else f"; next retry at {_when(retry)}")


def _ago(seconds: float) -> str:
    return f"{_span(seconds)} ago"


def _span(seconds: float) -> str:
    """A length of time in its largest whole unit: 45s, 3m, 2h, 5d."""
    seconds = max(0, round(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cmd_events(args: argparse.Namespace) -> int:
    import time

    from reconciler.core.events import describe, parse_query
    from reconciler.wiring import open_events

    cfg = _load(args)
    params = {
        key: [value]
        for key, value in (("host", args.host), ("since", args.since), ("limit", str(args.limit)))
        if value is not None
    }
    if args.type:
        params["type"] = args.type
    # The same filters, read the same way, as GET /api/events.
    q = parse_query(params, time.time())
    history = open_events(cfg, read_only=True)
    try:
        events = history.query(q)
    finally:
        history.close()
    if args.json:
        print(json.dumps({"events": [e.to_json() for e in events]}, indent=2))
        return 0
    for e in events:
        print(f"{_when(e.time)}  {e.type.value:<16} {describe(e)}")
    return 0


def cmd_suspend(args: argparse.Namespace) -> int:
    """Suspend a host or the fleet: recorded in the ledger, which a running daemon reads
    at its next pass, and before each build of a pass in progress."""
    from reconciler.wiring import open_ledger

    host = _host_arg(args.host)
    what = f"host {host}" if host else "the fleet"
    state = open_ledger(_load(args))
    try:
        if state.suspend(host, time.time()):
            log.event("suspend", scope="host" if host else "fleet", host=host or "")
            _record(args, EventType.SUSPENDED, host)
            print(f"suspended {what}: passes leave it as it is; what it published stays served")
        else:
            since = state.suspensions().fleet if host is None else state.suspensions().hosts[host]
            print(f"{what} was suspended already, since {_when(since or 0)}")
    finally:
        state.close()
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from reconciler.wiring import open_ledger

    host = _host_arg(args.host)
    what = f"host {host}" if host else "the fleet"
    state = open_ledger(_load(args))
    try:
        if state.resume(host):
            log.event("resume", scope="host" if host else "fleet", host=host or "")
            _record(args, EventType.RESUMED, host)
            print(f"resumed {what}: the daemon's next pass reconciles it")
        else:
            print(f"{what} was not suspended")
        if host and state.suspensions().fleet is not None:
            print("the whole fleet is still suspended (reconciler resume without a host lifts that)")
    finally:
        state.close()
    return 0


def _record(args: argparse.Namespace, kind: EventType, host: str | None) -> None:
    """Into the event history (``reconciler events``, the page), as the daemon records."""
    from reconciler.core.events import Event
    from reconciler.wiring import open_events

    history = open_events(_load(args))
    try:
        history.record(Event(kind, time.time(), host=host))
    finally:
        history.close()


def _host_arg(host: str | None) -> str | None:
    from reconciler.core.hosts import NAME_RE

    if host is not None and not NAME_RE.fullmatch(host):
        raise ReconcilerError(f"{host!r} is not a host name ({NAME_RE.pattern})")
    return host


def _lease_line(lease: object) -> str:
    """The publisher lease in one line: who publishes to the store."""
    assert isinstance(lease, dict)
    if not lease.get("enabled"):
        return "publisher: lease off (lease.enabled: false): this daemon assumes it is the only publisher"
    if lease.get("error"):
        return f"publisher: unknown: {lease['error']}"
    if lease.get("term") is None:
        return "publisher: no daemon has taken the store's publisher lease yet"
    who = "this state directory" if lease["this_state_dir"] else lease["holder"]
    if lease["released"]:
        return f"publisher: none (term {lease['term']}, released by {who} at {lease['renewed']})"
    role = "active" if lease["this_state_dir"] else "standby"
    return (
        f"publisher: {role}: the lease is held by {who} (term {lease['term']}, last renewed at "
        f"{lease['renewed']}, lapses {lease['duration']:g}s after its last renewal)"
    )


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_builders(args: argparse.Namespace) -> int:
    """The builders' files for a nix-daemon run as root, which takes no builders from
    the reconciler (not a trusted user): run as root into a root-owned DIR, so that
    nothing the reconciler's user can write reaches the root daemon's ssh. The machines
    file lists only the builders whose sandbox a probe build on each found on; it exits
    1 when it leaves one out, saying why. ``--no-probe`` lists them all unverified,
    where no build can run yet (the chart's init container, before its nix-daemon)."""
    from reconciler.adapters.nix import write_builders
    from reconciler.wiring import verified_builders

    cfg = _load(args)
    directory = Path(args.dir)
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o022:
        # Whoever may write there may replace the ssh configuration the daemon runs.
        raise ReconcilerError(f"{directory}: writable by group or others; make it 0755")
    listed = list(cfg.builders)
    left_out: dict[str, str] = {}
    if not args.no_probe:
        with tempfile.TemporaryDirectory(prefix="reconciler-builders-") as work:
            listed, left_out = verified_builders(cfg, Path(work))
    ssh_config = write_builders(cfg.builders, directory, machines=listed)
    for name, why in left_out.items():
        print(f"reconciler: builder {name} is not listed: {why}", file=sys.stderr)
    print(
        f"wrote {len(listed)} of {len(cfg.builders)} builders to {directory.resolve()}: "
        "machines, known_hosts, ssh_config"
    )
    print(f"nix-daemon: NIX_CONFIG='builders = @{(directory / 'machines').resolve()}'")
    print(f"nix-daemon: NIX_SSHOPTS='-F {ssh_config.resolve()}'")
    return 1 if left_out else 0


def cmd_gc(args: argparse.Namespace) -> int:
    from reconciler.wiring import open_reconciler

    cfg = _load(args)
    verb = "would delete" if args.dry_run else "deleted"
    rec = open_reconciler(cfg)
    try:
        # Waits for a running daemon's pass to end: GC must not race a publish.
        keys = rec.collect_garbage(args.dry_run, on_delete=lambda key: print(f"{verb} {key}"))
    finally:
        rec.close()
    print(f"{verb} {len(keys)} objects (keeping {cfg.retention.keep} releases per host)")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from functools import partial

    from reconciler.core import tufrepo
    from reconciler.wiring import open_reconciler, read_metadata_key, signers_in

    what = {"add": "KEY (a fingerprint or public key file)", "revoke": "KEYID", "threshold": "K"}
    if args.action != "list" and (args.role is None or args.key is None):
        raise ReconcilerError(f"keys {args.action}: needs a ROLE and a {what[args.action]}")
    cfg = _load(args)
    homes = [Path(h) for h in args.gnupghome] or [cfg.signing.gnupghome]
    rec = open_reconciler(cfg)
    try:
        if args.action == "list":
            md = rec.load_tuf()
            for role in tufrepo.RoleName:
                keyids, threshold = tufrepo.role_keys(md.root.signed, md.targets.signed, role)
                print(f"{role}: {threshold} of {len(keyids)}: {', '.join(keyids)}")
            print(f"root version {md.root.signed.version}, expires {md.root.signed.expires.isoformat()}")
            return 0
        role = tufrepo.RoleName(args.role)
        change: Callable[..., None]
        if args.action == "add":
            change = partial(tufrepo.add_key, role=role, key=read_metadata_key(args.key, homes))
        elif args.action == "revoke":
            change = partial(tufrepo.revoke_key, role=role, keyid=args.key.lower())
        else:
            try:
                k = int(args.key)
            except ValueError:
                raise ReconcilerError(f"keys threshold: {args.key!r} is not a number of keys") from None
            change = partial(tufrepo.set_threshold, role=role, threshold=k)
        changed = rec.change_keys(role, lambda root, targets: change(root, targets), signers_in(homes))
        print(f"{changed.signed.type} version {changed.signed.version} published")
    finally:
        rec.close()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from reconciler.agent.verify import verify

    for line in verify([Path(k) for k in args.key], args.target, provenance=args.provenance):
        print(line)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from reconciler.core.hostschema import Kind, schema

    print(json.dumps(schema(Kind(args.kind)), indent=2))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    if args.action == "cosign":
        return _log_cosign(args)
    from reconciler.wiring import audit_log

    if (args.config is None) == (args.store is None):
        raise ReconcilerError("log verify: give -c CONFIG, or --store DIR|URL with --key")
    cfg = _load(args) if args.config else None
    found = audit_log(
        cfg,
        args.store,
        [Path(k) for k in args.key],
        [Path(k) for k in args.witness_key],
        [Path(f) for f in args.seen],
    )
    cp = found.checkpoint
    if cp is not None:
        print(f"log {cp.origin}: size {cp.size}, root {cp.root.hex()}")
        print(
            f"{found.entries} entries; {found.tiles} tiles and bundles match them; "
            f"{found.releases} release files checked against the log, {found.collected} collected"
        )
    for note in found.notes:
        print(f"note: {note}")
    for problem in found.problems:
        print(f"FAILED: {problem}")
    if found.problems:
        return 1
    print("OK: the log checks out")
    return 0


def _log_cosign(args: argparse.Namespace) -> int:
    from reconciler.wiring import cosign_log

    if args.config is None or args.gnupghome is None:
        raise ReconcilerError("log cosign: give -c CONFIG and the witness's --gnupghome")
    cp, new, name = cosign_log(
        _load(args),
        Path(args.gnupghome),
        args.witness,
        args.name,
        Path(args.state) if args.state else None,
        Path(args.key[0]) if args.key else None,
    )
    print(f"{name} co-signed {cp.origin} at size {cp.size}{'' if new else ' (seen before)'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from reconciler.wiring import open_daemon

    daemon = open_daemon(_load(args))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        daemon.stop()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        daemon.request_reload()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # systemd's ExecReload (and `kill -HUP`): read reconciler.yaml again, between passes.
    signal.signal(signal.SIGHUP, on_hangup)
    daemon.run()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Preflight: one line per check, exit 1 if any failed."""
    from reconciler.daemon import preflight
    from reconciler.errors import ConfigError
    from reconciler.wiring import preflight as checks

    try:
        cfg = _load(args)
    except ConfigError as exc:
        print(preflight.Result(preflight.CheckName.CONFIG, False, str(exc)).line())
        return 1
    results = preflight.run(checks(cfg))
    for result in results:
        print(result.line())
    return 0 if all(r.ok for r in results) else 1


def cmd_reconcile_now(args: argparse.Namespace) -> int:
    """Exit 0 once asked (without --wait); with --wait, 0 if the pass left every host as
    defined, 1 if not (a host failed, is invalid or waits out a backoff, or the pass
    failed), 2 if it did not finish within --timeout."""
    from reconciler.core.schema import parse_duration
    from reconciler.wiring import request_reconcile

    cfg = _load(args)
    if not args.wait:
        print(request_reconcile(cfg)[1])
        return 0
    timeout = parse_duration("reconcile-now", "--timeout", args.timeout).total_seconds()
    status, answer = request_reconcile(cfg, wait=timeout)
    print(answer)
    if status == 202:
        return 2
    return 0 if answer.startswith("ok:") else 1


def cmd_agent(args: argparse.Namespace) -> int:
    from reconciler.agent.config import load_agent_config
    from reconciler.wiring import open_agent

    agent = open_agent(load_agent_config(Path(args.config)))
    if args.once:
        if agent.app is not None:
            raise ReconcilerError(f"{args.config}: supervise: needs the long-running agent, not --once")
        with agent.hold():
            return 0 if agent.poll() in ("idle", "current", "updated") else 1
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run(stopping)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reconciler", description="GitOps reconciler for Nix-built host images.")
    p.add_argument("--version", action="version", version=f"reconciler {__version__}")
    p.add_argument(
        "--log-format",
        choices=[f.value for f in log.Format],
        default=log.Format.TEXT.value,
        help="events on stderr as key=value pairs (text, the default) or one JSON object per line",
    )
    p.add_argument(
        "--log-level",
        choices=list(log.LEVELS),
        default="info",
        help="the least severe events logged (default: info)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help: str, config: bool = True
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        if config:
            sp.add_argument("-c", "--config", required=True, help="path to reconciler.yaml")
        sp.set_defaults(fn=fn)
        return sp

    add("run", cmd_run, "the daemon: watch, reconcile, serve /metrics, /healthz, /readyz")
    add("reconcile", cmd_reconcile, "one reconcile pass, then exit (non-zero if any host failed)")
    add(
        "check",
        cmd_check,
        "preflight: the config, signing key, store, Nix sandbox and repository; exit 1 if any check fails",
    )
    now = add(
        "reconcile-now",
        cmd_reconcile_now,
        "ask the running daemon for a pass at once (POST /reconcile with triggers.reconcile_token_file)",
    )
    now.add_argument(
        "--wait",
        action="store_true",
        help="wait for that pass to finish and print its result: exit 0 if every host is as defined,"
        " 1 if not, 2 if it did not finish within --timeout",
    )
    now.add_argument("--timeout", default="30m", help="how long --wait waits at most (default 30m)")
    pl = add(
        "plan", cmd_plan, "which hosts would rebuild and why; changes nothing (exit 1: a host is invalid)"
    )
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 2 when a pass would rebuild or remove a host, 0 when it would change nothing",
    )
    add("build", cmd_build, "build one host and print the artifact paths").add_argument("host")
    add("status", cmd_status, "last reconciled commit and each host's published version").add_argument(
        "--json", action="store_true", help="machine-readable output"
    )
    ev = add("events", cmd_events, "the event history, oldest first: passes, builds, publications, failures")
    ev.add_argument("--host", help="only this host's events")
    ev.add_argument(
        "--type", action="append", help="only events of this type (repeatable, or comma-separated)"
    )
    ev.add_argument("--since", help="only events since: a duration back (24h, 7d) or an RFC 3339 time")
    ev.add_argument("--limit", type=int, default=100, help="the newest N matching events (default 100)")
    ev.add_argument("--json", action="store_true", help="machine-readable output, as GET /api/events")
    add(
        "suspend", cmd_suspend, "suspend a host, or the whole fleet: passes leave it as it is until resumed"
    ).add_argument("host", nargs="?", help="the host to suspend (default: the whole fleet)")
    add("resume", cmd_resume, "lift a suspension of a host, or of the whole fleet").add_argument(
        "host", nargs="?", help="the host to resume (default: the fleet's own suspension)"
    )
    add("gc", cmd_gc, "delete releases beyond retention.keep per host and unreferenced blobs").add_argument(
        "--dry-run", action="store_true", help="print what would be deleted, delete nothing"
    )
    b = add(
        "builders", cmd_builders, "write the builders' Nix machines file and ssh config for a root nix-daemon"
    )
    b.add_argument("dir", help="a directory only root may write (e.g. /etc/nix/builders)")
    b.add_argument(
        "--no-probe",
        action="store_true",
        help="list every builder without building the sandbox probe on it (where Nix cannot build yet)",
    )
    k = add("keys", cmd_keys, "list or change the TUF roles' keys and thresholds")
    k.add_argument("action", choices=["list", "add", "revoke", "threshold"])
    k.add_argument("role", nargs="?", choices=[r.value for r in RoleName], help="the role to change")
    k.add_argument("key", nargs="?", help="fingerprint or public key file (add), keyid (revoke), or K")
    k.add_argument(
        "--gnupghome",
        action="append",
        default=[],
        help="a keyring whose secret keys sign the change (repeatable; default: signing.gnupghome)",
    )
    v = add("verify", cmd_verify, "check an artifact or release file/URL against public keys", config=False)
    v.add_argument("--key", action="append", required=True, help="armored public key file (repeatable)")
    v.add_argument(
        "--provenance",
        action="store_true",
        help="also check the release's signed provenance and SBOM, and print where it came from",
    )
    v.add_argument("target", help="file path or URL of an artifact or release .json")
    lg = add(
        "log", cmd_log, "audit the transparency log, or co-sign its checkpoint as a witness", config=False
    )
    lg.add_argument("action", choices=["verify", "cosign"])
    lg.add_argument("-c", "--config", help="path to reconciler.yaml (the store, keys and lock from it)")
    lg.add_argument("--store", help="verify: a store directory or URL instead of a config")
    lg.add_argument(
        "--key", action="append", default=[], help="the publisher's armored public key (repeatable)"
    )
    lg.add_argument(
        "--witness-key", action="append", default=[], help="verify: a witness that must co-sign (repeatable)"
    )
    lg.add_argument(
        "--seen",
        action="append",
        default=[],
        help="verify: a checkpoint seen elsewhere (an agent's state_dir/log-checkpoint) to check against",
    )
    lg.add_argument("--gnupghome", help="cosign: the witness's keyring")
    lg.add_argument(
        "--witness", help="cosign: the witness key's fingerprint (default: the keyring's only key)"
    )
    lg.add_argument(
        "--name", help="cosign: the witness's key name in the note (default: witness/FINGERPRINT)"
    )
    lg.add_argument("--state", help="cosign: where the witness keeps the last head it co-signed")
    agent = add("agent", cmd_agent, "the host side: pull, verify, switch, roll back", config=False)
    agent.add_argument("-c", "--config", required=True, help="path to the agent's config")
    agent.add_argument("--once", action="store_true", help="poll once and exit (for a timer)")
    add(
        "schema", cmd_schema, "print the JSON Schema of host or profile files (for editors)", config=False
    ).add_argument("kind", choices=["host", "profile"])
    add(
        "init", cmd_init, "create a demo: config repo, signing key, reconciler.yaml", config=False
    ).add_argument("dir")
    return p


# How long a thread holding the GIL runs before one waiting for it gets it (Python's
# default: 5 ms). A pass parses host files, pure Python, while its other threads feed
# Nix, serve HTTP and send notifications: each of their system calls gives the GIL up
# and waits that long for it back, so a thread making some thirty of them (checking the
# toolchain before an evaluation) took 0.2 s beside a parse instead of 2 ms.
SWITCH_INTERVAL = 0.001


# What the commands print must not act on the terminal: a name from the config
# repository (a host file's, a package's) or a path can hold ESC, which starts an escape
# sequence (clear the screen, set the window title, move the cursor over earlier lines).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class _Shown:
    """A text stream whose control characters but newline and tab are written as
    escapes (``\\x1b``); everything else as the stream it wraps."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Shown(out), _Shown(err)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = out, err


def _main(argv: Sequence[str] | None) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL)
    args = parser().parse_args(argv)
    log.configure(log.LEVELS[args.log_level], log.Format(args.log_format))
    try:
        return int(args.fn(args))
    except ReconcilerError as exc:
        print(f"reconciler: error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        # Past the ledger's opening, which says its path (adapters.ledger).
        print(f"reconciler: error: {ledger_error('the ledger (state.db)', str(exc))}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`reconciler status | head`): nothing more to say, and
        # Python's flush at exit must not say it either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        # The machine refused something no check above foresaw (a full disk, a path
        # under a file): still one line, naming the file.
        print(f"reconciler: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
