"""The AppImage type 2 runtime, the AppRun launcher and the images' supervisor
(nix/runtime), built for real with nix/runtime/build.sh and run against real squashfs
payloads, FUSE and signals."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

RUNTIME_SRC = Path(__file__).resolve().parents[2] / "nix" / "runtime"
BUSYBOX = Path("/bin/busybox")
TIMEOUT = 60  # seconds, for any one command

# The image's entry script, run by AppRun as `busybox sh apprun.sh MODE ARGS...`.
APPRUN_SH = r"""
mode=$1
shift
case "$mode" in
info)
  echo "APPDIR=$APPDIR"
  echo "APPIMAGE=$APPIMAGE"
  echo "ARGV0=$ARGV0"
  echo "OWD=$OWD"
  echo "PWD=$(pwd)"
  for a in "$@"; do echo "ARG=$a"; done
  if grep -q " $APPDIR " /proc/mounts; then echo "MOUNTED=yes"; else echo "MOUNTED=no"; fi
  echo "DATA=$(cat "$APPDIR/payload/data.txt")"
  ;;
exit)
  exit "$1"
  ;;
supervise)
  # The images' supervisor on the payload's services (which write to $MARKERS).
  cd "$APPDIR"
  exec "$APPDIR/reconciler-supervise" -t 2 "$APPDIR/bin/busybox" "$APPDIR/services"
  ;;
wait)
  # $1: a directory outside the image for markers; $2 = trap: exit 7 on SIGTERM.
  if [ "${2:-}" = trap ]; then
    trap 'echo "$APPDIR" > "$1/trapped"; exit 7' TERM
  fi
  sleep 300 &
  echo "$!" > "$1/child.pid"
  echo "$$" > "$1/sh.pid"
  echo "$APPDIR" > "$1/appdir"
  echo ready > "$1/ready"
  wait
  ;;
*)
  echo "unknown mode $mode" >&2
  exit 2
  ;;
esac
"""

LONG = "n" * 200  # path components long enough to catch fixed-size path buffers


# A service for the supervise mode: it leaves a child of its own and reports both
# pids and its parent's (the supervisor's) where the test looks ($MARKERS).
SLEEPER_RUN = r"""
sleep 300 &
echo $! > "$MARKERS/grandchild.pid"
echo $PPID > "$MARKERS/supervisor.pid"
echo $$ > "$MARKERS/service.pid"
echo "$PWD" > "$MARKERS/cwd"
wait
"""


@dataclass(frozen=True)
class Built:
    runtime: Path
    apprun: Path
    supervisor: Path


@dataclass(frozen=True)
class Image:
    appimage: Path
    appdir: Path  # the tree the payload was made from
    runtime_size: int


def run(
    args: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def fuse_usable() -> bool:
    return Path("/dev/fuse").exists() and (os.geteuid() == 0 or shutil.which("fusermount3") is not None)


needs_fuse = pytest.mark.skipif(not fuse_usable(), reason="FUSE (/dev/fuse) is not usable here")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("runtime-build") / "out"
    result = run(["sh", str(RUNTIME_SRC / "build.sh"), str(out)])
    assert result.returncode == 0, result.stderr
    return Built(runtime=out / "runtime", apprun=out / "AppRun", supervisor=out / "reconciler-supervise")


def make_appdir(root: Path, built: Built) -> Path:
    appdir = root / "AppDir"
    (appdir / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, appdir / "bin" / "busybox")
    shutil.copy2(built.apprun, appdir / "AppRun")
    shutil.copy2(built.supervisor, appdir / "reconciler-supervise")
    (appdir / "services" / "sleeper").mkdir(parents=True)
    (appdir / "services" / "sleeper" / "run").write_text(SLEEPER_RUN)
    (appdir / ".reconciler").mkdir()
    (appdir / ".reconciler" / "apprun.sh").write_text(APPRUN_SH)
    payload = appdir / "payload"
    payload.mkdir()
    (payload / "data.txt").write_text("payload data\n")
    (payload / "data.txt").chmod(0o640)
    (payload / "tool.sh").write_text("#!/bin/sh\n")
    (payload / "tool.sh").chmod(0o750)
    (payload / "link").symlink_to("data.txt")
    (payload / "dangling").symlink_to("/nonexistent/target")
    os.link(payload / "data.txt", payload / "hard")
    (payload / "empty").mkdir(mode=0o700)
    deep = payload / LONG / LONG / LONG
    deep.mkdir(parents=True)
    (deep / LONG).write_text("deep\n")
    readonly = payload / "ro"
    readonly.mkdir()
    (readonly / "inner.txt").write_text("inner\n")
    (readonly / "inner.txt").chmod(0o444)
    readonly.chmod(0o555)
    appdir.chmod(0o755)
    return appdir


@pytest.fixture(scope="session")
def make_image(tmp_path_factory: pytest.TempPathFactory, built: Built) -> Callable[[str], Image]:
    images: dict[str, Image] = {}

    def make(comp: str) -> Image:
        if comp not in images:
            root = tmp_path_factory.mktemp(f"image-{comp}")
            appdir = make_appdir(root, built)
            squashfs = root / "payload.squashfs"
            mksquashfs = ["mksquashfs", str(appdir), str(squashfs), "-noappend", "-quiet", "-no-progress"]
            result = run([*mksquashfs, "-all-root", "-comp", comp])
            assert result.returncode == 0, result.stderr
            appimage = root / "app.AppImage"
            appimage.write_bytes(built.runtime.read_bytes() + squashfs.read_bytes())
            appimage.chmod(0o755)
            images[comp] = Image(appimage=appimage, appdir=appdir, runtime_size=built.runtime.stat().st_size)
        return images[comp]

    return make


@pytest.fixture
def image(make_image: Callable[[str], Image]) -> Image:
    return make_image("gzip")


@pytest.fixture
def tmpdir_env(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A private TMPDIR (checked empty afterwards by the tests) and the environment using it."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "APPIMAGE_EXTRACT_AND_RUN"}
    env["TMPDIR"] = str(tmp)
    yield tmp, env


def parse_info(stdout: str) -> dict[str, list[str]]:
    info: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        key, _, value = line.partition("=")
        info.setdefault(key, []).append(value)
    return info


def mounted(path: str) -> bool:
    return any(line.split()[1] == path for line in Path("/proc/mounts").read_text().splitlines())


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def processes_of(executable: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "exe") == str(executable):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def elf_sections(data: bytes) -> dict[str, tuple[int, int]]:
    """Section name -> (sh_type, sh_size) of a little-endian ELF64 file."""
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    sections = {}
    for header in headers:
        name_start = strtab + header[0]
        name = data[name_start : data.index(b"\0", name_start)].decode()
        sections[name] = (header[1], header[5])
    return sections


# ------------------------------------------------------------------ format


def test_magic_sections_and_offset(built: Built, image: Image) -> None:
    data = built.runtime.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert data[8:11] == b"AI\x02"
    sections = elf_sections(data)
    sht_progbits = 1
    assert sections[".upd_info"] == (sht_progbits, 1024)
    assert sections[".sha256_sig"] == (sht_progbits, 1024)
    assert sections[".sig_key"] == (sht_progbits, 8192)
    assert sections[".digest_md5"] == (sht_progbits, 16)
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    assert shoff + shnum * shentsize == len(data)

    for exe in (built.runtime, image.appimage):
        result = run([str(exe), "--appimage-offset"])
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{len(data)}\n"

    listing = run(["unsquashfs", "-o", str(len(data)), "-l", str(image.appimage)])
    assert listing.returncode == 0, listing.stderr
    listed = set(listing.stdout.split())
    for path in ("AppRun", "bin/busybox", ".reconciler/apprun.sh", "payload/data.txt", "payload/link"):
        assert f"squashfs-root/{path}" in listed


def test_options(built: Built, image: Image, tmp_path: Path) -> None:
    version = run([str(image.appimage), "--appimage-version"])
    assert version.returncode == 0 and "runtime" in version.stdout
    helptext = run([str(image.appimage), "--appimage-help"])
    assert helptext.returncode == 0 and "--appimage-extract" in helptext.stdout
    unknown = run([str(image.appimage), "--appimage-nonsense"])
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("appimage: unknown option --appimage-nonsense")
    # The bare runtime has no payload: one clear line, no attempt to mount.
    bare = run([str(built.runtime), "info"], cwd=tmp_path)
    assert bare.returncode == 1
    assert bare.stderr.splitlines() == [
        f"appimage: no squashfs payload at offset {image.runtime_size} (was one appended to the runtime?)"
    ]


# -------------------------------------------------------------- extraction


def assert_same_tree(expected: Path, actual: Path) -> None:
    def entries(root: Path) -> dict[str, os.stat_result]:
        found = {".": root.lstat()}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                found[str(path.relative_to(root))] = path.lstat()
        return found

    want, got = entries(expected), entries(actual)
    assert sorted(got) == sorted(want)
    for rel, st in want.items():
        assert stat.S_IFMT(got[rel].st_mode) == stat.S_IFMT(st.st_mode), rel
        if not stat.S_ISLNK(st.st_mode):
            assert stat.S_IMODE(got[rel].st_mode) == stat.S_IMODE(st.st_mode), rel
        assert got[rel].st_nlink == st.st_nlink or stat.S_ISDIR(st.st_mode), rel
        if stat.S_ISLNK(st.st_mode):
            assert os.readlink(actual / rel) == os.readlink(expected / rel), rel
        elif stat.S_ISREG(st.st_mode):
            assert (actual / rel).read_bytes() == (expected / rel).read_bytes(), rel
            assert int(got[rel].st_mtime) == int(st.st_mtime), rel


def test_extract_all(image: Image, tmp_path: Path) -> None:
    result = run([str(image.appimage), "--appimage-extract"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "squashfs-root/payload/data.txt" in result.stdout.splitlines()
    root = tmp_path / "squashfs-root"
    assert_same_tree(image.appdir, root)
    assert (root / "payload" / "hard").stat().st_ino == (root / "payload" / "data.txt").stat().st_ino
    # Extracting again over the (partly read-only) tree works too.
    again = run([str(image.appimage), "--appimage-extract"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_tree(image.appdir, root)


def test_extract_pattern(image: Image, tmp_path: Path) -> None:
    result = run([str(image.appimage), "--appimage-extract", "payload/ro/*"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    root = tmp_path / "squashfs-root"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "payload",
        "payload/ro",
        "payload/ro/inner.txt",
    ]
    assert (root / "payload" / "ro" / "inner.txt").read_text() == "inner\n"
    assert stat.S_IMODE((root / "payload" / "ro").stat().st_mode) == 0o555


# ----------------------------------------------------------------- running


def check_info(
    result: subprocess.CompletedProcess[str], image: Image, tmp: Path, *, fuse: bool
) -> dict[str, list[str]]:
    info = parse_info(result.stdout)
    appdir = info["APPDIR"][0]
    prefix = ".mount_" if fuse else "appimage_extracted_"
    assert Path(appdir).parent == tmp and Path(appdir).name.startswith(prefix), appdir
    assert info["MOUNTED"] == ["yes" if fuse else "no"]
    assert info["APPIMAGE"] == [str(image.appimage)]
    assert info["ARGV0"] == ["./app.AppImage"]
    assert info["OWD"] == info["PWD"] == [str(image.appimage.parent)]
    assert info["DATA"] == ["payload data"]
    # Unmounted or removed afterwards, and nothing left behind.
    assert not mounted(appdir)
    assert list(tmp.iterdir()) == []
    assert wait_for(lambda: processes_of(image.appimage) == [])
    return info


@needs_fuse
def test_run_with_fuse(image: Image, tmpdir_env: tuple[Path, dict[str, str]]) -> None:
    tmp, env = tmpdir_env
    cmd = ["./app.AppImage", "info", "a b", "--c", ""]
    result = run(cmd, cwd=image.appimage.parent, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    info = check_info(result, image, tmp, fuse=True)
    assert info["ARG"] == ["a b", "--c", ""]

    status = run(["./app.AppImage", "exit", "42"], cwd=image.appimage.parent, env=env)
    assert status.returncode == 42, status.stderr
    assert list(tmp.iterdir()) == []


def test_extract_and_run(image: Image, tmpdir_env: tuple[Path, dict[str, str]]) -> None:
    tmp, env = tmpdir_env
    env["APPIMAGE_EXTRACT_AND_RUN"] = "1"
    result = run(["./app.AppImage", "info", "x"], cwd=image.appimage.parent, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    info = check_info(result, image, tmp, fuse=False)
    assert info["ARG"] == ["x"]

    status = run(["./app.AppImage", "exit", "3"], cwd=image.appimage.parent, env=env)
    assert status.returncode == 3
    assert list(tmp.iterdir()) == []


def test_falls_back_when_fuse_fails(image: Image, tmpdir_env: tuple[Path, dict[str, str]]) -> None:
    """A /dev/fuse that is really /dev/null (in a private mount namespace) makes mounting fail."""
    if not Path("/dev/fuse").exists() or run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs /dev/fuse and mount namespaces (unshare -m)")
    tmp, env = tmpdir_env
    script = 'mount --bind /dev/null /dev/fuse && exec "$@"'
    cmd = ["unshare", "-m", "sh", "-c", script, "sh", "./app.AppImage", "info", "y"]
    result = run(cmd, cwd=image.appimage.parent, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("appimage: cannot mount with FUSE ("), result.stderr
    info = check_info(result, image, tmp, fuse=False)
    assert info["ARG"] == ["y"]


@pytest.mark.parametrize(
    ("fuse", "sig", "trap"),
    [
        pytest.param(True, signal.SIGTERM, False, marks=needs_fuse, id="fuse-TERM"),
        pytest.param(True, signal.SIGINT, False, marks=needs_fuse, id="fuse-INT"),
        pytest.param(True, signal.SIGHUP, False, marks=needs_fuse, id="fuse-HUP"),
        pytest.param(True, signal.SIGTERM, True, marks=needs_fuse, id="fuse-TERM-trapped"),
        pytest.param(False, signal.SIGTERM, False, id="extracted-TERM"),
    ],
)
def test_signal_reaches_app_and_cleans_up(
    image: Image, tmpdir_env: tuple[Path, dict[str, str]], tmp_path: Path, fuse: bool, sig: int, trap: bool
) -> None:
    tmp, env = tmpdir_env
    if not fuse:
        env["APPIMAGE_EXTRACT_AND_RUN"] = "1"
    markers = tmp_path / "markers"
    markers.mkdir()
    args = [str(image.appimage), "wait", str(markers), *(["trap"] if trap else [])]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = wait_for(lambda: (markers / "ready").exists() or proc.poll() is not None, timeout=20)
        assert ready and proc.poll() is None, proc.communicate(timeout=TIMEOUT)
        appdir = (markers / "appdir").read_text().strip()
        child = int((markers / "child.pid").read_text())
        shell = int((markers / "sh.pid").read_text())
        assert mounted(appdir) == fuse
        assert not process_gone(child) and not process_gone(shell)

        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)

    assert stderr == ""
    if trap:
        assert proc.returncode == 7
        assert (markers / "trapped").read_text().strip() == appdir
    else:
        assert proc.returncode == 128 + sig
    assert process_gone(shell) and process_gone(child)
    assert not mounted(appdir) and not Path(appdir).exists()
    assert list(tmp.iterdir()) == []
    assert wait_for(lambda: processes_of(image.appimage) == [])


@needs_fuse
def test_mount_option(image: Image, tmpdir_env: tuple[Path, dict[str, str]]) -> None:
    tmp, env = tmpdir_env
    proc = subprocess.Popen(
        [str(image.appimage), "--appimage-mount"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        mountpoint = proc.stdout.readline().strip()
        assert mounted(mountpoint)
        assert (Path(mountpoint) / "payload" / "data.txt").read_text() == "payload data\n"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
    assert not mounted(mountpoint)
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("comp", ["xz", "zstd"])
def test_compressions(
    make_image: Callable[[str], Image], comp: str, tmp_path: Path, tmpdir_env: tuple[Path, dict[str, str]]
) -> None:
    image = make_image(comp)
    result = run([str(image.appimage), "--appimage-extract"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_same_tree(image.appdir, tmp_path / "squashfs-root")
    if fuse_usable():
        tmp, env = tmpdir_env
        ran = run(["./app.AppImage", "info"], cwd=image.appimage.parent, env=env)
        assert ran.returncode == 0, ran.stderr
        check_info(ran, image, tmp, fuse=True)


# ---------------------------------------------------------------- launcher


def test_launcher_outside_an_appimage(built: Built, tmp_path: Path) -> None:
    appdir = make_appdir(tmp_path, built)
    env = {k: v for k, v in os.environ.items() if k != "APPDIR"}
    result = run([str(appdir / "AppRun"), "info", "z"], env=env)
    assert result.returncode == 0, result.stderr
    info = parse_info(result.stdout)
    assert info["APPDIR"] == [str(appdir)]
    assert info["ARG"] == ["z"]

    env["APPDIR"] = "/somewhere/else"
    kept = run([str(appdir / "AppRun"), "exit", "5"], env=env)
    assert kept.returncode == 5

    (appdir / "bin" / "busybox").unlink()
    broken = run([str(appdir / "AppRun"), "info"], env=env)
    assert broken.returncode == 127
    assert broken.stderr.startswith(f"AppRun: cannot execute {appdir}/bin/busybox:")


@pytest.mark.parametrize("name", ["AppRun", "reconciler-supervise"])
def test_launcher_and_supervisor_are_small_and_static(built: Built, name: str) -> None:
    exe = built.apprun if name == "AppRun" else built.supervisor
    dynamic = run(["readelf", "-d", str(exe)])
    assert dynamic.returncode == 0, dynamic.stderr
    assert "NEEDED" not in dynamic.stdout and "There is no dynamic section" in dynamic.stdout
    assert "statically linked" in run(["file", str(exe)]).stdout
    # Every image carries both: tens of kilobytes, not a static glibc's hundreds.
    assert exe.stat().st_size < 64 * 1024


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chroot") is None, reason="needs root for chroot")
def test_launcher_in_a_bare_root_without_proc(built: Built, tmp_path: Path) -> None:
    """An ACI root run as it is (no /proc, /dev or /tmp): AppRun finds itself by argv[0]."""
    appdir = make_appdir(tmp_path, built)
    chroot = shutil.which("chroot")
    assert chroot is not None
    result = run([chroot, str(appdir), "/AppRun", "info", "z"], env={"PATH": "/bin"})
    assert result.returncode == 0, result.stderr
    info = parse_info(result.stdout)
    # (busybox runs most applets through /proc/self/exe: only the launcher's part is checked)
    assert info["APPDIR"] == ["/"] and info["ARG"] == ["z"]


# -------------------------------------------------------------- supervisor


def make_services(root: Path, services: Mapping[str, tuple[str, str | None]]) -> Path:
    """SERVICEDIR with <name>/run (and <name>/restart unless None) per service."""
    top = root / "service"
    for name, (script, restart) in services.items():
        (top / name).mkdir(parents=True)
        (top / name / "run").write_text(script)
        if restart is not None:
            (top / name / "restart").write_text(restart + "\n")
    return top


@dataclass
class Supervisor:
    proc: subprocess.Popen[bytes]
    root: Path

    @property
    def out(self) -> str:
        return (self.root / "out.log").read_text()

    @property
    def err(self) -> str:
        return (self.root / "err.log").read_text()

    def lines(self, service: str) -> list[str]:
        return [
            ln.removeprefix(f"{service}: ") for ln in self.out.splitlines() if ln.startswith(f"{service}: ")
        ]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(TIMEOUT)


@pytest.fixture
def supervise(built: Built, tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def start(services: Mapping[str, tuple[str, str | None]], *options: str) -> Supervisor:
        root = tmp_path / f"sup{len(started)}"
        root.mkdir()
        top = make_services(root, services)
        with (root / "out.log").open("wb") as out, (root / "err.log").open("wb") as err:
            proc = subprocess.Popen(
                [str(built.supervisor), *options, str(BUSYBOX), str(top)], cwd=root, stdout=out, stderr=err
            )
        sup = Supervisor(proc, root)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        if sup.proc.poll() is None:
            sup.proc.kill()
            sup.proc.wait(TIMEOUT)


def read_pid(path: Path) -> int:
    assert wait_for(lambda: path.exists() and path.read_text().strip() != ""), f"{path} never written"
    return int(path.read_text())


def read_pid_text(path: Path) -> str:
    assert wait_for(lambda: path.exists() and path.read_text().strip() != "", timeout=20), (
        f"{path} never written"
    )
    return path.read_text().strip()


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


# Each run appends the time it started (seconds since boot, to 10 ms) to ./starts.
STAMP = 'read up idle < /proc/uptime; echo "$up" >> starts\n'


def test_supervisor_backs_off_a_crash_loop_and_starts_over_after_a_stable_run(
    supervise: Callable[..., Supervisor],
) -> None:
    # The 5th run stays up longer than -s: the delay after it is the first again.
    crasher = STAMP + '[ "$(wc -l < starts)" = 5 ] && sleep 1.2\nexit 1\n'
    sup = supervise({"crasher": (crasher, "on-failure")}, "-d", "200", "-D", "1000", "-s", "1000")
    starts = sup.root / "starts"
    assert wait_for(lambda: starts.exists() and len(starts.read_text().split()) >= 6, timeout=20), sup.err
    stamps = [float(x) for x in starts.read_text().split()[:6]]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # Doubling from 0.2 s, capped at 1 s (not 1.6); after the 1.2 s run, 0.2 s again
    # (not 1 s). A run takes a few ms; stamps are rounded down to 10 ms.
    low = [0.2, 0.4, 0.8, 1.0, 1.2 + 0.2]
    for i, (gap, least) in enumerate(zip(gaps, low, strict=True)):
        assert least - 0.02 <= gap <= least + 0.45, (i, gaps)
    assert "crasher exited with status 1; restarting in 400 ms" in sup.err
    assert sup.stop() == 0


def test_supervisor_restarts_per_policy_and_prefixes_every_line(supervise: Callable[..., Supervisor]) -> None:
    ok, bad = "echo run\nexit 0\n", "echo run\nexit 1\n"
    sup = supervise(
        {
            "always-ok": (ok, "always"),
            "default-ok": (ok, None),
            "onfail-ok": (ok, "on-failure"),
            "onfail-bad": (bad, "on-failure"),
            "never-bad": (bad, "never"),
            "partial": ("echo to stderr >&2\nprintf 'no newline'\nexit 0\n", "never"),
        },
        "-d",
        "100",
    )
    assert wait_for(
        lambda: all(len(sup.lines(s)) >= 3 for s in ("always-ok", "default-ok", "onfail-bad")), timeout=20
    ), sup.out
    time.sleep(0.3)  # time for a wrong restart of the others to show
    assert sup.lines("onfail-ok") == ["run"]
    assert sup.lines("never-bad") == ["run"]
    # Standard error too; a last line without its newline is not lost.
    assert sup.lines("partial") == ["to stderr", "no newline"]
    assert "never-bad exited with status 1; not restarted (restart: never)" in sup.err
    assert "onfail-ok exited with status 0; not restarted (restart: on-failure)" in sup.err
    assert all(": " in ln for ln in sup.out.splitlines())
    assert sup.stop() == 0


def test_supervisor_refuses_an_unknown_restart_policy(supervise: Callable[..., Supervisor]) -> None:
    sup = supervise({"odd": ("exit 0\n", "sometimes")})
    assert sup.proc.wait(TIMEOUT) != 0
    assert "odd/restart: not one of always, on-failure, never" in sup.err


def test_supervisor_stops_every_process_it_started(supervise: Callable[..., Supervisor]) -> None:
    sup = supervise(
        {
            "polite": ("trap 'echo bye; exit 0' TERM\nwhile :; do sleep 0.1; done\n", None),
            # Ignores TERM (and so does its child): only KILL, after -t, ends it.
            "stubborn": (
                "trap '' TERM\nsleep 300 &\necho $! > stubborn.pid\nwhile :; do sleep 0.1; done\n",
                None,
            ),
            # Leaves its process group and session: found as the subreaper's child.
            "escaper": ("setsid sleep 300 &\necho $! > escaper.pid\nexec sleep 300\n", None),
            # Exits at once, leaving a child: reparented to the supervisor, not init.
            "orphaner": ("sleep 300 &\necho $! > orphan.pid\nexit 0\n", "never"),
        },
        "-t",
        "1",
    )
    pids = {name: read_pid(sup.root / f"{name}.pid") for name in ("stubborn", "escaper", "orphan")}
    assert wait_for(lambda: "orphaner exited" in sup.err)
    assert os.getsid(pids["escaper"]) == pids["escaper"]
    assert parent_of(pids["orphan"]) == sup.proc.pid
    # Found by its name, as itself (not as a loader running it).
    pidof = run(["pidof", "reconciler-supervise"])
    assert str(sup.proc.pid) in pidof.stdout.split()
    assert os.readlink(f"/proc/{sup.proc.pid}/exe").endswith("/reconciler-supervise")
    services = [int(p) for p in run(["pgrep", "-P", str(sup.proc.pid)]).stdout.split()]
    assert len(services) == 4  # three services and the orphan

    began = time.monotonic()
    assert sup.stop() == 0
    took = time.monotonic() - began
    assert 1.0 <= took < 5, took  # the stubborn one needed KILL after 1 s
    for pid in [*pids.values(), *services]:
        assert process_gone(pid), pid
    # (the shell may first report its `sleep` killed by the same TERM)
    assert sup.lines("polite")[-1] == "bye"
    assert "stopping (signal 15)" in sup.err and "killing what is left" in sup.err


def test_supervisor_stops_when_its_parent_dies(built: Built, tmp_path: Path) -> None:
    top = make_services(tmp_path, {"sleeper": ("sleep 300 &\necho $! > child.pid\nwait\n", None)})
    script = '"$@" & echo $! > supervisor.pid; wait'
    parent = subprocess.Popen(
        ["sh", "-c", script, "sh", str(built.supervisor), "-t", "2", str(BUSYBOX), str(top)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        child = read_pid(tmp_path / "child.pid")
        supervisor = read_pid(tmp_path / "supervisor.pid")
        parent.kill()
        parent.wait(TIMEOUT)
        assert wait_for(lambda: process_gone(supervisor) and process_gone(child))
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(TIMEOUT)


def test_services_die_with_a_killed_supervisor(supervise: Callable[..., Supervisor]) -> None:
    sup = supervise({"sleeper": ("echo $$ > sleeper.pid\nexec sleep 300\n", None)})
    service = read_pid(sup.root / "sleeper.pid")
    sup.proc.kill()
    sup.proc.wait(TIMEOUT)
    assert wait_for(lambda: process_gone(service))


# ------------------------------------------------ killed runs leave nothing


@pytest.mark.parametrize(
    "fuse", [pytest.param(True, marks=needs_fuse, id="fuse"), pytest.param(False, id="extract")]
)
def test_sigkill_leaves_no_process_and_the_next_start_removes_the_copy(
    image: Image, tmpdir_env: tuple[Path, dict[str, str]], tmp_path: Path, fuse: bool
) -> None:
    tmp, env = tmpdir_env
    if not fuse:
        env["APPIMAGE_EXTRACT_AND_RUN"] = "1"
    markers = tmp_path / "markers"
    markers.mkdir()
    env["MARKERS"] = str(markers)
    proc = subprocess.Popen(
        [str(image.appimage), "supervise"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        appdir = Path(read_pid_text(markers / "cwd"))
        supervisor = read_pid(markers / "supervisor.pid")
        others = [supervisor, read_pid(markers / "service.pid"), read_pid(markers / "grandchild.pid")]
        assert appdir.parent == tmp and mounted(str(appdir)) == fuse
        proc.kill()
        proc.wait(TIMEOUT)
        assert wait_for(lambda: all(process_gone(pid) for pid in others)), [
            pid for pid in others if not process_gone(pid)
        ]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    assert wait_for(lambda: processes_of(image.appimage) == [])
    assert not mounted(str(appdir))
    if fuse:
        # The FUSE process saw the runtime die and unmounted and removed its directory.
        assert wait_for(lambda: list(tmp.iterdir()) == [])
        return
    # Nobody was left to remove the extracted copy: the next start does.
    assert list(tmp.iterdir()) == [appdir]
    result = run([str(image.appimage), "exit", "0"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert list(tmp.iterdir()) == []


def test_a_start_removes_only_copies_no_live_run_holds(
    image: Image, tmpdir_env: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    tmp, env = tmpdir_env
    env["APPIMAGE_EXTRACT_AND_RUN"] = "1"
    markers = tmp_path / "markers"
    markers.mkdir()
    live = subprocess.Popen(
        [str(image.appimage), "wait", str(markers)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        live_dir = Path(read_pid_text(markers / "appdir"))
        shell = read_pid(markers / "sh.pid")
        # What a killed run of ours leaves: removed, read-only parts and all.
        stale = tmp / "appimage_extracted_app.Ab3dE9"
        (stale / "ro").mkdir(parents=True)
        (stale / "ro" / "f").write_text("x")
        (stale / "ro").chmod(0o555)
        # Not ours, or not to be touched: the upstream runtime's (an MD5), an older
        # runtime's (no lock to tell), a file, a symlink, another user's directory.
        keep = [
            tmp / ("appimage_extracted_" + "0123456789abcdef" * 2),
            tmp / "appimage_extracted_appAb3dE9",
            tmp / "appimage_extracted_app.File00",
        ]
        keep[0].mkdir()
        keep[1].mkdir()
        keep[2].write_text("a file")
        link = tmp / "appimage_extracted_app.Link00"
        link.symlink_to(keep[0])
        keep.append(link)
        if os.geteuid() == 0:
            other = tmp / "appimage_extracted_app.Other0"
            other.mkdir()
            os.chown(other, 65534, 65534)
            keep.append(other)

        result = run([str(image.appimage), "exit", "0"], env=env)
        assert result.returncode == 0, result.stderr
        assert not stale.exists()
        assert all(os.path.lexists(p) for p in keep)
        assert (live_dir / "payload" / "data.txt").read_text() == "payload data\n"
        assert not process_gone(shell)
        assert sorted(tmp.iterdir()) == sorted([live_dir, *keep])
    finally:
        live.send_signal(signal.SIGTERM)
        live.communicate(timeout=TIMEOUT)
    assert not live_dir.exists()


# ---------------------------------------------------------- reproducibility


def test_build_is_reproducible(built: Built, tmp_path: Path) -> None:
    source = tmp_path / "elsewhere" / "src"
    shutil.copytree(RUNTIME_SRC, source, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "other-out"
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000", LC_ALL="C.UTF-8", TZ="Asia/Tokyo")
    result = run(["sh", str(source / "build.sh"), "other-out"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert (out / "runtime").read_bytes() == built.runtime.read_bytes()
    assert (out / "AppRun").read_bytes() == built.apprun.read_bytes()
    assert (out / "reconciler-supervise").read_bytes() == built.supervisor.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["AppRun", "reconciler-supervise", "runtime"]
