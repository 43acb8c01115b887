#!/bin/sh
# Stage the offline build toolchain from Debian packages into OUTDIR, ready for
# builtins.path to import into the Nix store (toolchain-debian.nix).
#
# Static binaries are copied as they are; dynamically linked tools (GNU tar,
# mksquashfs) are copied with every library ldd resolves and the loader, and are
# run through that loader, so the store copy needs nothing from the host. What goes
# into the images (busybox, and the AppImage runtime, AppRun and the supervisor
# that runtime/build.sh compiles) is static.
# The result depends only on the Debian package versions and our sources, so it
# has the same NAR hash on every machine with the same packages.
#
# debian-packages.tsv in OUTDIR names those packages (name, version, architecture,
# role): "contained" for each package a staged file was copied from, "built-with"
# for those runtime/build.sh compiles with (runtime/packages.txt). It is part of the
# toolchain's content, so the NAR hash a release's provenance records covers it, and
# the release's SBOM lists it.
set -eu
out=${1:?usage: import-debian.sh OUTDIR}
here=$(cd "$(dirname "$0")/.." && pwd)

need() { [ -e "$1" ] || { echo "import-debian: missing $1 (install Debian package $2)" >&2; exit 1; }; }
need /bin/busybox busybox-static
need /usr/bin/mksquashfs squashfs-tools
need /bin/tar tar
file -L /bin/busybox | grep -q 'statically linked' || {
  echo "import-debian: /bin/busybox is not static (install busybox-static)" >&2; exit 1; }

tmp="$out.tmp.$$"
# The files copied from the system, one per line, for debian-packages.tsv.
sources="$out.sources.$$"
rm -rf "$tmp" "$sources"
trap 'rm -rf "$tmp" "$sources"' EXIT
mkdir -p "$tmp/bin"
cp /bin/busybox "$tmp/bin/busybox"
echo /bin/busybox >>"$sources"

# ldd in an empty environment: the caller's LD_PRELOAD and LD_LIBRARY_PATH would
# otherwise add their libraries to the list, and so to every image.
ldd_clean() { env -i /usr/bin/ldd "$1"; }

# bundle DIR BINARY: DIR/libexec/BINARY plus DIR/lib with its libraries and loader.
bundle() {
  mkdir -p "$1/lib" "$1/libexec"
  cp "$2" "$1/libexec/$(basename "$2")"
  echo "$2" >>"$sources"
  # ldd prints "name => /path (addr)" and the loader as "/lib64/ld-linux... (addr)".
  ldd_clean "$2" | awk '/=> \//{print $3} /^\t\/lib/{print $1}' | while read -r lib; do
    cp -L "$lib" "$1/lib/$(basename "$lib")"
    echo "$lib" >>"$sources"
  done
  [ -e "$1/lib/ld-linux-x86-64.so.2" ] || { echo "import-debian: no x86-64 loader for $2" >&2; exit 1; }
}

# glibc dlopen()s libgcc_s.so.1 when a thread exits or is cancelled (mksquashfs's
# workers do): ldd cannot see that, and inside the build sandbox the host's copy
# is out of reach, so it is bundled beside libc.
libgcc_s() {
  lib=$(ldconfig -p | awk '$1 == "libgcc_s.so.1" && /x86-64/ {print $NF; exit}')
  [ -n "$lib" ] || { echo "import-debian: libgcc_s.so.1 not found (install Debian package libgcc-s1)" >&2; exit 1; }
  cp -L "$lib" "$1/lib/libgcc_s.so.1"
  echo "$lib" >>"$sources"
}
bundle "$tmp" /bin/tar
bundle "$tmp" /usr/bin/mksquashfs
libgcc_s "$tmp"

sh "$here/runtime/build.sh" "$tmp/runtime"

# owner FILE: the Debian package that installed FILE. With merged /usr, dpkg knows a
# file by the name its package shipped, /bin/x or /usr/bin/x, and a library by its
# symlink's name or its target's: each is tried.
owner() {
  for p in "$1" "$(readlink -f "$1")"; do
    for q in "$p" "${p#/usr}" "/usr$p"; do
      pkg=$(dpkg-query -S "$q" 2>/dev/null | sed -n '1s/[:,].*//p')
      [ -z "$pkg" ] || { echo "$pkg"; return 0; }
    done
  done
  return 1
}
# version PACKAGE ROLE: one line of debian-packages.tsv.
version() {
  dpkg-query -W -f='${Package}\t${Version}\t${Architecture}\n' "$1" 2>/dev/null |
    awk -F '\t' -v role="$2" '$3 == "amd64" || $3 == "all" { print $0 "\t" role; exit }' | grep . ||
    { echo "import-debian: Debian package $1 is not installed" >&2; return 1; }
}
{
  sort -u "$sources" | while read -r f; do
    pkg=$(owner "$f") || { echo "import-debian: no Debian package owns $f" >&2; exit 1; }
    version "$pkg" contained || exit 1
  done
  sed -e 's/#.*//' -e '/^ *$/d' "$here/runtime/packages.txt" | while read -r pkg; do
    version "$pkg" built-with || exit 1
  done
} >"$tmp/packages.unsorted"
LC_ALL=C sort -u "$tmp/packages.unsorted" >"$tmp/debian-packages.tsv"
rm "$tmp/packages.unsorted" "$sources"

chmod -R a-w,a+rX "$tmp"
chmod u+w "$tmp"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
