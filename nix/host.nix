# One host: a version-independent image (root tree + AppImage), then the release
# artifacts, which add only what names the release number (ACI manifest, file names).
# `aci` is what the daemon's configuration says of the ACI: its name (the host's
# under a prefix such as example.com/fleet) and annotations.
{ toolchain, packages, version, aci ? { }
  # The thin images' shared base: one per toolchain (fleet.nix applies this file once).
, base ? import ./base.nix { inherit toolchain; }
}:
host:
let
  bb = toolchain.busybox;
  name = host.name;
  q = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";
  lines = builtins.concatStringsSep "\n";
  has = f: builtins.elem f host.formats;

  # Busybox applets on PATH inside the builder, which starts with none.
  prelude = ''
    set -eu
    ${bb} mkdir -p "$TMPDIR/bin"
    for a in $(${bb} --list); do ${bb} ln -sf ${bb} "$TMPDIR/bin/$a"; done
    export PATH="$TMPDIR/bin"
  '';

  usedPackages = builtins.attrNames (builtins.listToAttrs (map
    (s: { name = s.package; value = null; })
    (builtins.attrValues host.services)));

  services = import ./services.nix { inherit toolchain name; services = host.services; };

  net = host.network;
  networkEnv = builtins.toFile "network.env" (lines (
    [ "HOSTNAME=${name}" ]
    ++ (if net ? address then [ "ADDRESS=${net.address}" ] else [ ])
    ++ (if net ? gateway then [ "GATEWAY=${net.gateway}" ] else [ ])
    ++ (if net ? dns then [ "DNS=${q (builtins.concatStringsSep " " net.dns)}" ] else [ ])
  ) + "\n");
  hostJson = builtins.toFile "host.json" (builtins.toJSON host);
  desktop = builtins.toFile "${name}.desktop" ''
    [Desktop Entry]
    Type=Application
    Name=${name}
    Exec=AppRun
    Icon=${name}
    Categories=System;
    Terminal=true
  '';
  icon = ./icon.svg;

  installFiles = lines (map
    (p: "install_file ${q p} ${builtins.toFile "host-file" host.files.${p}}")
    (builtins.attrNames host.files));

  image = derivation {
    name = "host-${name}-image";
    system = "x86_64-linux";
    builder = bb;
    args = [ "sh" "-c" ''
      ${prelude}
      install_file() { mkdir -p "$(dirname "$1")"; cp "$2" "$1"; }
      mkdir -p "$out/root"
      cd "$out/root"
      ${lines (map (p: "cp -RP ${packages.${p}}/. . && chmod -R u+w .")
                   (builtins.filter (p: p != "busybox") usedPackages))}
      cp -RP ${services}/. .
      chmod -R u+w .
      mkdir -p bin etc/reconciler tmp
      cp ${bb} bin/busybox
      cp ${hostJson} etc/reconciler/host.json
      cp ${networkEnv} etc/reconciler/network.env
      ${installFiles}
      cp ${desktop} ${name}.desktop
      cp ${icon} ${name}.svg
      ln -sf ${name}.svg .DirIcon
      chmod -R u+w,go-w,a+rX .
      ${if has "appimage" then ''
        # Payload compression chosen by measurement (benchmarks/appimage_compression.py,
        # the demo's web host, 128 KiB blocks): xz with the x86 BCJ filter gives the
        # smallest payload, 1,978,368 bytes against 2,351,104 (gzip), 2,052,096 (xz
        # alone) and 2,199,552 (zstd; 2,179,072 at level 19), and the smallest zsync
        # download for a one-file change, 6,742 bytes against 12,051, 10,102 and
        # 32,531. It unpacks slowest (the whole payload in 0.1-0.5 s on a loaded
        # 2-core machine, against 0.06 for gzip and 0.03 for zstd), but the time until
        # the service answers, FUSE-mounted or extracted, is 1.3-3 s for every choice,
        # dominated by the supervisor's start and the noise of the machine.
        ${toolchain.mksquashfs} . "$TMPDIR/payload.squashfs" -noappend -quiet \
          -comp xz -Xbcj x86 -all-root -no-xattrs -mkfs-time 0 -all-time 0
        cat ${toolchain.runtimeBin}/runtime "$TMPDIR/payload.squashfs" > "$out/image.AppImage"
        chmod 555 "$out/image.AppImage"
      '' else ""}
    '' ];
  };

  # appc 0.8 ImageManifest (spec/aci.md). Ports come from the services' `ports`;
  # no-new-privileges because nothing in the image needs setuid to gain rights.
  ports = builtins.concatMap
    (s: map (p: {
      inherit (p) name port protocol;
      count = 1;
      socketActivated = false;
    }) (s.ports or [ ]))
    (builtins.attrValues host.services);
  annotations = aci.annotations or [ ];
  manifestDoc = {
    acKind = "ImageManifest";
    acVersion = "0.8.11";
    name = aci.name or name;
    labels = [
      { name = "version"; value = version; }
      { name = "os"; value = "linux"; }
      { name = "arch"; value = "amd64"; }
    ];
    app = {
      exec = [ "/AppRun" ];
      user = "0";
      group = "0";
      workingDirectory = "/";
      environment = [ { name = "APPDIR"; value = "/"; } ];
      isolators = [ { name = "os/linux/no-new-privileges"; value = true; } ];
    } // (if ports != [ ] then { inherit ports; } else { });
  } // (if annotations != [ ] then { inherit annotations; } else { });
  manifest = builtins.toFile "manifest" (builtins.toJSON manifestDoc);

  # The thin ACI: the fat one's manifest, named <name>-thin, with the base as its
  # dependency (name, image ID, labels and size come from the base's build).
  thin = import ./thin.nix { inherit toolchain base; } { inherit name image; };
  thinManifest = builtins.toFile "thin-manifest" (builtins.toJSON (manifestDoc // {
    name = "${manifestDoc.name}-thin";
    dependencies = [ "@RECONCILER_BASE@" ];
  }));
  oci = import ./oci.nix { inherit toolchain base; } { inherit name version host thin; };

  artifacts = derivation {
    name = "host-${name}-${version}";
    system = "x86_64-linux";
    builder = bb;
    args = [ "sh" "-c" ''
      ${prelude}
      mkdir -p "$out"
      ${if has "aci" then ''
        mkdir "$TMPDIR/aci"
        cp ${manifest} "$TMPDIR/aci/manifest"
        cp -RP ${image}/root "$TMPDIR/aci/rootfs"
        ${(import ./layers.nix { inherit toolchain; }).aciDirs}
        aci_dirs "$TMPDIR/aci/rootfs"
        ${toolchain.tar} -C "$TMPDIR/aci" -cf "$out/${name}-${version}-linux-amd64.aci" \
          --sort=name --format=gnu --owner=0 --group=0 --numeric-owner --mtime=@1 \
          --mode=u+w --no-acls --no-xattrs --no-selinux manifest rootfs
      '' else ""}
      ${if has "appimage" then ''
        ln -s ${image}/image.AppImage "$out/${name}-${version}-x86_64.AppImage"
      '' else ""}
      ${if has "aci-thin" then ''
        ${(import ./layers.nix { inherit toolchain; }).pack}
        mkdir "$TMPDIR/thin"
        awk -v dep="$(cat ${base}/aci-dependency.json)" \
          '{ sub(/"@RECONCILER_BASE@"/, dep); printf "%s", $0 }' ${thinManifest} > "$TMPDIR/thin/manifest"
        cp -RP ${thin}/root "$TMPDIR/thin/rootfs"
        chmod -R u+w "$TMPDIR/thin/rootfs"
        [ ! -d "$TMPDIR/thin/rootfs/tmp" ] || chmod 1777 "$TMPDIR/thin/rootfs/tmp"
        pack "$TMPDIR/thin" "$out/${name}-${version}-linux-amd64.thin.aci" manifest rootfs
        ln -s ${base}/*.base.aci "$out/"
      '' else ""}
      ${if has "oci" then ''
        ln -s ${oci}/publish/* "$out/"
        # Not published (the blobs above are the image), for `skopeo copy` and the like.
        ln -s ${oci}/layout "$out/${name}-${version}.oci-layout"
        ln -s ${oci}/${name}-${version}.oci.tar "$out/${name}-${version}.oci.tar"
      '' else ""}
    '' ];
  };
in
{
  inherit image artifacts base thin oci;
}
