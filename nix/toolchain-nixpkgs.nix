# The same toolchain interface as toolchain-debian.nix, taken from nixpkgs, for users
# who have a nixpkgs channel:
#   nix-build fleet.nix --arg toolchain 'import ./toolchain-nixpkgs.nix {}' ...
# or `nix: {toolchain: nixpkgs}` in reconciler.yaml. Builds are reproducible within
# one toolchain; the bytes differ from the Debian toolchain's.
{ pkgs ? import <nixpkgs> { } }:
let
  static = pkgs.pkgsStatic;
  runtimeBin = static.stdenv.mkDerivation {
    name = "reconciler-appimage-runtime";
    src = ./runtime;
    # build.sh takes the compiler and tools from CC, NM, READELF and PKG_CONFIG;
    # pkgsStatic is a cross (musl) stdenv, whose tools carry the target prefix.
    nativeBuildInputs = [ static.buildPackages.pkg-config ];
    # squashfuse links every decompressor it was built with: all need static libraries.
    buildInputs = [ static.squashfuse static.fuse3 static.zlib static.zstd static.xz static.lz4 static.lzo ];
    # AppRun and the supervisor take SMALL_CC, musl-gcc on Debian: here CC is musl already.
    buildPhase = "SMALL_CC=$CC sh ./build.sh $out";
    dontInstall = true;
  };
in
{
  busybox = "${static.busybox}/bin/busybox";
  tar = "${pkgs.gnutar}/bin/tar";
  mksquashfs = "${pkgs.squashfsTools}/bin/mksquashfs";
  runtimeBin = "${runtimeBin}";
  supervisor = "${runtimeBin}/reconciler-supervise";
}
