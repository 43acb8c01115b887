# Shell pieces shared by the thin ACI and OCI builds (base.nix, thin.nix, oci.nix).
{ toolchain }:
let
  bb = toolchain.busybox;
in
{
  # Busybox applets on PATH inside the builder, which starts with none.
  prelude = ''
    set -eu
    ${bb} mkdir -p "$TMPDIR/bin"
    for a in $(${bb} --list); do ${bb} ln -sf ${bb} "$TMPDIR/bin/$a"; done
    export PATH="$TMPDIR/bin"
  '';

  # pack DIR FILE [NAME...]: a reproducible tar of NAME... (default: everything, as ./)
  # in DIR: sorted, one fixed mtime, owner and group 0 by number, no ACLs or xattrs,
  # the same flags as the fat ACI, but 512-byte records: tar's default pads to 10 KiB,
  # more than a thin ACI's content. Modes are taken as they are: a tmp/ must be given
  # its 1777 before (the Nix store keeps no sticky or world-writable bit).
  #
  # gzip: busybox's writes no name and a zero timestamp, so equal input gives
  # equal bytes (checked by the determinism test).
  pack = ''
    pack() {
      dir=$1 file=$2
      shift 2
      [ $# -gt 0 ] || set -- .
      ${toolchain.tar} -C "$dir" -cf "$file" --sort=name --format=gnu --owner=0 --group=0 \
        --numeric-owner --mtime=@1 --mode=u+w --no-acls --no-xattrs --no-selinux \
        --blocking-factor=1 "$@"
    }
    sha256() { sha256sum "$1" | cut -d' ' -f1; }
    size() { wc -c < "$1" | tr -d ' '; }
  '';

  # aci_dirs ROOTFS: what appc's Linux environment (OS-SPEC.md) does not promise an
  # ACI's app: a writable /tmp and /var/tmp, /run; and empty mount points for what the
  # executor mounts (/dev, /proc, /sys). The fat ACI and the base ACI both get them,
  # so a thin ACI rendered over its base is the fat one's rootfs.
  aciDirs = ''
    aci_dirs() {
      r=$1
      chmod u+w "$r"
      mkdir -p "$r/var"
      chmod u+w "$r/var"
      mkdir -p "$r/tmp" "$r/var/tmp" "$r/run" "$r/dev" "$r/proc" "$r/sys"
      chmod 1777 "$r/tmp" "$r/var/tmp"
      chmod 755 "$r/run" "$r/dev" "$r/proc" "$r/sys"
    }
  '';
}
