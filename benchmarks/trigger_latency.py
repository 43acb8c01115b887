"""Push to build start: how fast the daemon reacts to a commit, by trigger.

Runs `reconciler run` on the demo fleet with a poll interval of an hour, so that
only triggers can wake it, and measures from the moment a commit exists (the
filesystem watcher) or the forge's webhook is sent, to the daemon's own log
timestamp of the `host_build` event for that commit.

    python3 benchmarks/trigger_latency.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.demo import init  # noqa: E402

SECRET = b"bench-secret"
TARGET = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=b", "-c", "user.email=b@example.invalid", *args],
        check=True,
        capture_output=True,
    )


def build_starts(log: Path) -> list[float]:
    """Unix times of the daemon's host_build events."""
    out = []
    for line in log.read_text().splitlines():
        if "event=host_build " in line:
            ts = line.split()[0].removeprefix("ts=").replace("Z", "+00:00")
            out.append(datetime.fromisoformat(ts).timestamp())
    return out


def measure(work: Path, trigger: str, rounds: int) -> list[float]:
    demo = work / trigger
    cfg_path = init(demo)
    cfg = yaml.safe_load(cfg_path.read_text())
    port = free_port()
    cfg.update(listen=f"127.0.0.1:{port}", poll_interval=3600)
    (demo / "hook.secret").write_bytes(SECRET)
    cfg["triggers"] = {"watch": trigger == "filesystem", "webhook_secret_file": "hook.secret"}
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = demo / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "reconciler", "run", "-c", str(cfg_path)], stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while "event=reconcile_done" not in log.read_text():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the daemon's first pass did not finish: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        latencies = []
        repo = demo / "repo"
        for i in range(rounds):
            seen = len(build_starts(log))
            host = repo / "hosts/worker-1.yaml"
            host.write_text(re.sub(r"queue\w*=", f"queue{i}=", host.read_text()))
            git(repo, "commit", "-qam", f"round {i}")
            pushed = time.time()
            if trigger == "webhook":
                body = json.dumps({"ref": "refs/heads/main"}).encode()
                sig = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
                req = urllib.request.Request(
                    base + "/webhook",
                    data=body,
                    headers={"X-GitHub-Event": "push", "X-Hub-Signature-256": sig},
                )
                urllib.request.urlopen(req, timeout=5).close()
            deadline = time.monotonic() + 60
            while len(build_starts(log)) <= seen:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no build started for round {i}")
                time.sleep(0.02)
            latencies.append(build_starts(log)[seen] - pushed)
            # Let the build finish before the next round.
            while log.read_text().count("event=reconcile_done") < i + 2:
                time.sleep(0.05)
        return latencies
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    ok = True
    with tempfile.TemporaryDirectory(prefix="reconciler-trigger-bench-") as tmp:
        for trigger in ("filesystem", "webhook"):
            lat = measure(Path(tmp), trigger, args.rounds)
            passed = max(lat) < TARGET
            ok &= passed
            print(
                f"{trigger:<10} push -> build start: median {statistics.median(lat):.3f}s, "
                f"max {max(lat):.3f}s over {len(lat)} pushes  {'PASS' if passed else 'FAIL'} (< {TARGET}s)"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
