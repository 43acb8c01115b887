#!/bin/sh
# Build the static AppImage type 2 runtime (OUTDIR/runtime), the AppRun
# launcher (OUTDIR/AppRun) and the images' process manager
# (OUTDIR/reconciler-supervise) from runtime.c, launcher.c and supervise.c beside
# this script, against Debian's static libraries (see packages.txt), or with the
# compiler and tools a Nix stdenv names in CC, NM, READELF and PKG_CONFIG
# (toolchain-nixpkgs.nix).
#
# The runtime links glibc, as Debian's static libfuse3 and libsquashfuse were
# built against it. AppRun and the supervisor need only libc: they are linked
# against musl (SMALL_CC, musl-gcc by default), tens of kilobytes instead of
# hundreds, as every image carries them.
#
# Reproducible: the same sources and Debian package versions give the same
# bytes, whatever the source and output directories, the time or the locale.
set -eu
[ $# -eq 1 ] || { echo "usage: build.sh OUTDIR" >&2; exit 2; }
out=$1
src=$(cd "$(dirname "$0")" && pwd -P)

LC_ALL=C
TZ=UTC
SOURCE_DATE_EPOCH=0
export LC_ALL TZ SOURCE_DATE_EPOCH

fail() { echo "runtime/build.sh: $*" >&2; exit 1; }

cc=${CC:-gcc}
small_cc=${SMALL_CC:-musl-gcc}
nm=${NM:-nm}
readelf=${READELF:-readelf}
pkgconf=${PKG_CONFIG:-pkg-config}

need_cmd() { # COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 || fail "$1 not found (install the Debian package $2)"
}
need_pc() { # MODULE PACKAGE
  "$pkgconf" --exists "$1" || fail "pkg-config module $1 not found (install the Debian package $2)"
}
static_lib() { # NAME PACKAGE: path of libNAME.a
  lib=$("$cc" -print-file-name="lib$1.a")
  [ "$lib" != "lib$1.a" ] && [ -f "$lib" ] || fail "lib$1.a not found (install the Debian package $2)"
  echo "$lib"
}
need_header() { # HEADER PACKAGE CFLAGS...
  h=$1 p=$2
  shift 2
  printf '#define _GNU_SOURCE\n#include <%s>\n' "$h" | "$cc" -E -x c "$@" - >/dev/null 2>&1 ||
    fail "<$h> not found (install the Debian package $p)"
}

need_cmd "$cc" gcc
need_cmd "$small_cc" musl-tools
need_cmd "$pkgconf" pkg-config
need_cmd "$nm" binutils
need_cmd "$readelf" binutils
static_lib c libc6-dev >/dev/null
need_pc fuse3 libfuse3-dev
need_pc squashfuse_ll libsquashfuse-dev
static_lib fuse3 libfuse3-dev >/dev/null
squashfuse_ll=$(static_lib squashfuse_ll libsquashfuse-dev)
cflags_deps=$("$pkgconf" --cflags squashfuse_ll fuse3)
# shellcheck disable=SC2086  # word splitting of flags is intended
need_header fuse3/fuse_lowlevel.h libfuse3-dev -DFUSE_USE_VERSION=32 $cflags_deps
# shellcheck disable=SC2086
need_header squashfuse/ll.h libsquashfuse-dev $cflags_deps

# libsquashfuse_ll.a holds all of libsquashfuse too; squashfuse_ll.pc names
# both archives, which can pull duplicate objects into a static link, so only
# it is linked. Its decompressors are those it calls: link each one's static
# library (gzip, xz and zstd payloads are required).
undefined=$("$nm" "$squashfuse_ll" | awk '$1 == "U" { print $2 }' | sort -u)
libs_comp=""
comps=""
for entry in \
  "uncompress zlib z zlib1g-dev gzip" \
  "lzma_stream_buffer_decode liblzma lzma liblzma-dev xz" \
  "ZSTD_decompress libzstd zstd libzstd-dev zstd" \
  "LZ4_decompress_safe liblz4 lz4 liblz4-dev lz4" \
  "lzo1x_decompress_safe lzo2 lzo2 liblzo2-dev lzo"; do
  # shellcheck disable=SC2086
  set -- $entry
  sym=$1 module=$2 lib=$3 pkg=$4 name=$5
  if printf '%s\n' "$undefined" | grep -qx "$sym"; then
    static_lib "$lib" "$pkg" >/dev/null
    if "$pkgconf" --exists "$module"; then
      libs_comp="$libs_comp $("$pkgconf" --static --libs "$module")"
    else
      libs_comp="$libs_comp -l$lib"
    fi
    comps="$comps $name"
  fi
done
for name in gzip xz zstd; do
  case " $comps " in
    *" $name "*) ;;
    *) fail "the installed libsquashfuse cannot decompress $name (it calls none of its functions)" ;;
  esac
done

cflags="-std=gnu11 -O2 -Wall -Wextra -Werror=implicit-function-declaration -D_FILE_OFFSET_BITS=64 \
-ffile-prefix-map=$src=. -fdebug-prefix-map=$src=. -frandom-seed=appimage-runtime"
ldflags="-static -s -Wl,--build-id=none"
small_flags="-Os -ffunction-sections -fdata-sections -Wl,--gc-sections"
libs="-lsquashfuse_ll $("$pkgconf" --static --libs fuse3)$libs_comp"

mkdir -p "$out"
out=$(cd "$out" && pwd -P)
work="$out/.build.$$"
rm -rf "$work"
mkdir "$work"
trap 'rm -rf "$work"' EXIT

cd "$src"
# libsquashfuse_ll's option helpers pull in libfuse's high-level part, whose
# (never used) module loader makes the linker warn about dlopen: drop that one.
# shellcheck disable=SC2086
"$cc" $cflags $cflags_deps -o "$work/runtime" runtime.c $ldflags $libs 2>"$work/gcc.log" || {
  cat "$work/gcc.log" >&2
  fail "compiling runtime.c failed"
}
grep -v -e "in function \`fuse_get_module'" -e "Using 'dlopen' in statically linked" "$work/gcc.log" >&2 || true
# shellcheck disable=SC2086
"$small_cc" $cflags $small_flags -o "$work/AppRun" launcher.c $ldflags
# shellcheck disable=SC2086
"$small_cc" $cflags $small_flags -o "$work/reconciler-supervise" supervise.c $ldflags
for exe in AppRun reconciler-supervise; do
  # Static: no dynamic section, so nothing for a loader to find on the host.
  if "$readelf" -d "$work/$exe" | grep -q NEEDED; then fail "$exe is not statically linked"; fi
done

# AppImage type 2 magic at offset 8 of the ELF header (EI_PAD, unused by ELF).
printf 'AI\002' | dd of="$work/runtime" bs=1 seek=8 count=3 conv=notrunc 2>/dev/null
[ "$(od -An -tx1 -j8 -N3 "$work/runtime" | tr -d ' \n')" = 414902 ] || fail "patching the AppImage magic failed"

# Sanity checks: reserved sections for AppImage tooling, and the payload
# offset (end of the ELF) equal to the file size when nothing is appended.
for section in .upd_info:1024 .sha256_sig:1024 .sig_key:8192 .digest_md5:16; do
  name=${section%%:*} want=${section#*:}
  # "[Nr] Name Type Address Off Size ..." -> "Type Size" (hex) of that section.
  set -- $("$readelf" -SW "$work/runtime" | sed -n 's/^ *\[ *[0-9]*\] *//p' | awk -v n="$name" '$1 == n { print $2, $5 }')
  [ $# -eq 2 ] && [ "$1" = PROGBITS ] && [ $((0x$2)) -eq "$want" ] ||
    fail "section $name ($want bytes of PROGBITS) missing from the runtime"
done
size=$(wc -c <"$work/runtime" | tr -d ' ')
offset=$("$work/runtime" --appimage-offset) || fail "the runtime does not run (--appimage-offset failed)"
[ "$offset" = "$size" ] || fail "payload offset $offset differs from the runtime size $size"

chmod 755 "$work/runtime" "$work/AppRun" "$work/reconciler-supervise"
mv -f "$work/runtime" "$out/runtime"
mv -f "$work/AppRun" "$out/AppRun"
mv -f "$work/reconciler-supervise" "$out/reconciler-supervise"
echo "runtime/build.sh: built $out/runtime (decompressors:$comps), $out/AppRun and $out/reconciler-supervise" >&2
