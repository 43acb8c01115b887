"""The AppImage type 2 runtime and the AppRun launcher (nix/runtime), built for real
with nix/runtime/build.sh and run against real squashfs payloads, FUSE and signals."""

from __future__ import annotations

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


@dataclass(frozen=True)
class Built:
    runtime: Path
    apprun: Path


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
    return Built(runtime=out / "runtime", apprun=out / "AppRun")


def make_appdir(root: Path, apprun: Path) -> Path:
    appdir = root / "AppDir"
    (appdir / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, appdir / "bin" / "busybox")
    shutil.copy2(apprun, appdir / "AppRun")
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
            appdir = make_appdir(root, built.apprun)
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
    appdir = make_appdir(tmp_path, built.apprun)
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
    assert sorted(p.name for p in out.iterdir()) == ["AppRun", "runtime"]
