# The shared base of the thin images: what every host image holds byte for byte
# (the toolchain's busybox, the static supervisor, the AppRun launcher and its
# script, /tmp). Its inputs are the toolchain and this library only,
# so the whole fleet shares one derivation: the base ACI and the base OCI layer are
# built once per toolchain, and their blobs are stored once however many hosts use them.
#
# nix/host.nix puts the same files into every fat image; thin.nix takes them out of a
# host's image again and fails the build if one differs, so base + thin = fat always.
#
#   $out/root/                                          the base's files
#   $out/<stem>-<version>-linux-amd64.base.aci          the base ACI (no app)
#   $out/<stem>-<version>.base.tar.gz                   the base OCI layer
# where <stem> is the last part of the image name.
#   $out/aci-dependency.json   the thin ACIs' `dependencies` entry: name, image ID, labels, size
#   $out/layer.digest, layer.size, layer.diffid         of the OCI layer (sha256 hex, bytes)
#   $out/version                                        <version> above
{ toolchain, name ? "reconciler-base" }:
let
  bb = toolchain.busybox;
  lib = import ./layers.nix { inherit toolchain; };
  # File names take the last part of the image name (a name may have a domain prefix).
  stem = baseNameOf name;
  # The version label is the content's: the first 16 hex digits of the layer's
  # diff ID, known only once the files are packed.
  manifest = builtins.toFile "base-manifest" (builtins.toJSON {
    acKind = "ImageManifest";
    acVersion = "0.8.11";
    inherit name;
    labels = [
      { name = "version"; value = "@VERSION@"; }
      { name = "os"; value = "linux"; }
      { name = "arch"; value = "amd64"; }
    ];
  });
in
derivation {
  name = "reconciler-base";
  system = "x86_64-linux";
  builder = bb;
  args = [ "sh" "-c" ''
    ${lib.prelude}
    ${lib.pack}
    root="$out/root"
    mkdir -p "$root/bin" "$root/.reconciler" "$root/tmp"
    cp ${toolchain.runtimeBin}/AppRun "$root/AppRun"
    cp ${./apprun.sh} "$root/.reconciler/apprun.sh"
    cp ${toolchain.supervisor} "$root/.reconciler/reconciler-supervise"
    cp ${bb} "$root/bin/busybox"
    chmod -R u+w,go-w,a+rX "$root"
    chmod 1777 "$root/tmp"

    pack "$root" "$TMPDIR/layer.tar"
    diffid=$(sha256 "$TMPDIR/layer.tar")
    version=$(echo "$diffid" | cut -c1-16)
    echo "$version" > "$out/version"
    echo "$diffid" > "$out/layer.diffid"
    gzip -c "$TMPDIR/layer.tar" > "$out/${stem}-$version.base.tar.gz"
    sha256 "$out/${stem}-$version.base.tar.gz" > "$out/layer.digest"
    size "$out/${stem}-$version.base.tar.gz" > "$out/layer.size"

    mkdir "$TMPDIR/aci"
    sed "s/@VERSION@/$version/" ${manifest} > "$TMPDIR/aci/manifest"
    cp -RP "$root" "$TMPDIR/aci/rootfs"
    ${lib.aciDirs}
    aci_dirs "$TMPDIR/aci/rootfs"
    aci="$out/${stem}-$version-linux-amd64.base.aci"
    pack "$TMPDIR/aci" "$aci" manifest rootfs
    # appc: an image ID is the sha512 of the uncompressed image tar.
    id=$(sha512sum "$aci" | cut -d' ' -f1)
    printf '{"imageID":"sha512-%s","imageName":"%s","labels":[{"name":"version","value":"%s"},{"name":"os","value":"linux"},{"name":"arch","value":"amd64"}],"size":%s}' \
      "$id" '${name}' "$version" "$(size "$aci")" > "$out/aci-dependency.json"
  '' ];
}
