# A host's thin root: its image root without what the shared base (base.nix) holds
# identically. Version-independent like the image, so a release that changes nothing
# of the host reuses it (and its OCI layer's blob).
#
# Every file and symlink of the base must be in the image with the same type, mode
# and content; the build fails otherwise, which keeps base + thin = the fat image
# (the thin ACI and the OCI image render to the fat ACI's rootfs). Directories of the
# base that are left empty go too; those with host files stay, with the same mode.
#
#   $out/root/                              the thin root
#   $out/layer.tar.gz                       its OCI layer
#   $out/layer.digest, layer.size, layer.diffid
{ toolchain, base }:
{ name, image }:
let
  lib = import ./layers.nix { inherit toolchain; };
in
derivation {
  name = "host-${name}-thin";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" ''
    ${lib.prelude}
    ${lib.pack}
    root="$out/root"
    mkdir -p "$out"
    cp -RP ${image}/root "$root"
    chmod -R u+w "$root"
    differs() { echo "the base's $1 is not the same in host ${name}'s image ($2)" >&2; exit 1; }
    cd ${base}/root
    find . ! -type d | sort > "$TMPDIR/files"
    while read -r p; do
      img=${image}/root/$p
      if [ -L "$p" ]; then
        [ -L "$img" ] && [ "$(readlink "$p")" = "$(readlink "$img")" ] || differs "$p" "symlink"
      else
        [ -f "$img" ] && [ ! -L "$img" ] || differs "$p" "missing or not a file"
        [ "$(stat -c %a "$p")" = "$(stat -c %a "$img")" ] || differs "$p" "mode"
        cmp -s "$p" "$img" || differs "$p" "content"
      fi
      rm "$root/$p"
    done < "$TMPDIR/files"
    # Deepest first, so a directory emptied by its children's removal goes too.
    find . -mindepth 1 -depth -type d > "$TMPDIR/dirs"
    while read -r d; do
      [ -d "${image}/root/$d" ] && [ ! -L "${image}/root/$d" ] || differs "$d" "missing or not a directory"
      [ "$(stat -c %a "$d")" = "$(stat -c %a "${image}/root/$d")" ] || differs "$d" "mode"
      if [ -z "$(ls -A "$root/$d")" ]; then rmdir "$root/$d"; fi
    done < "$TMPDIR/dirs"
    cd "$out"

    # A host file under tmp/ keeps the directory in the thin root: with the fat mode.
    [ ! -d "$root/tmp" ] || chmod 1777 "$root/tmp"
    pack "$root" "$TMPDIR/layer.tar"
    sha256 "$TMPDIR/layer.tar" > "$out/layer.diffid"
    gzip -c "$TMPDIR/layer.tar" > "$out/layer.tar.gz"
    sha256 "$out/layer.tar.gz" > "$out/layer.digest"
    size "$out/layer.tar.gz" > "$out/layer.size"
  '' ];
}
