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
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin"
cp /bin/busybox "$tmp/bin/busybox"

# ldd in an empty environment: the caller's LD_PRELOAD and LD_LIBRARY_PATH would
# otherwise add their libraries to the list, and so to every image.
ldd_clean() { env -i /usr/bin/ldd "$1"; }

# bundle DIR BINARY: DIR/libexec/BINARY plus DIR/lib with its libraries and loader.
bundle() {
  mkdir -p "$1/lib" "$1/libexec"
  cp "$2" "$1/libexec/$(basename "$2")"
  # ldd prints "name => /path (addr)" and the loader as "/lib64/ld-linux... (addr)".
  ldd_clean "$2" | awk '/=> \//{print $3} /^\t\/lib/{print $1}' | while read -r lib; do
    cp -L "$lib" "$1/lib/$(basename "$lib")"
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
}
bundle "$tmp" /bin/tar
bundle "$tmp" /usr/bin/mksquashfs
libgcc_s "$tmp"

sh "$here/runtime/build.sh" "$tmp/runtime"

chmod -R a-w,a+rX "$tmp"
chmod u+w "$tmp"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
