# The same toolchain interface as toolchain-debian.nix, taken from nixpkgs, for users
# who have a nixpkgs channel: nix-build fleet.nix --arg toolchain 'import ./toolchain-nixpkgs.nix {}'
# Builds are reproducible within one toolchain; bytes differ from the Debian one.
{ pkgs ? import <nixpkgs> { } }:
let
  static = pkgs.pkgsStatic;
  runtimeBin = static.stdenv.mkDerivation {
    name = "reconciler-appimage-runtime";
    src = ./runtime;
    nativeBuildInputs = [ pkgs.pkg-config ];
    buildInputs = [ static.squashfuse static.fuse3 static.zlib static.zstd static.xz ];
    buildPhase = ''
      $CC -O2 -static -o runtime runtime.c $(pkg-config --cflags --libs squashfuse_ll fuse3) -lzstd -llzma -lz
      $CC -O2 -static -o AppRun apprun.c
      printf 'AI\002' | dd of=runtime bs=1 seek=8 conv=notrunc
    '';
    installPhase = ''
      mkdir -p $out
      cp runtime AppRun $out/
      cp ${static.runit}/bin/runsv ${static.runit}/bin/runsvdir ${static.runit}/bin/sv $out/
    '';
  };
in {
  busybox = "${static.busybox}/bin/busybox";
  tar = "${pkgs.gnutar}/bin/tar";
  mksquashfs = "${pkgs.squashfsTools}/bin/mksquashfs";
  runtimeBin = "${runtimeBin}";
}
