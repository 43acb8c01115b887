# The offline toolchain: Debian binaries staged by toolchain/import-debian.sh and
# imported into the store by content. No nixpkgs and no binary cache needed.
{ dir }:
let
  tc = builtins.path { path = dir; name = "reconciler-toolchain"; };
  viaLoader = tool: "${tc}/lib/ld-linux-x86-64.so.2 --library-path ${tc}/lib ${tc}/libexec/${tool}";
in {
  busybox = "${tc}/bin/busybox";
  tar = viaLoader "tar";
  mksquashfs = viaLoader "mksquashfs";
  runtimeBin = "${tc}/runtime";   # the AppImage runtime and the AppRun launcher
  supervisor = "${tc}/runtime/reconciler-supervise";   # static, from runtime/supervise.c
}
