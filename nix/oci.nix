# A host's release as an OCI image (image-spec 1.0): two gzip layers, the shared base
# (base.nix) and the host's thin root (thin.nix), so base + host = the fat ACI's rootfs;
# a config whose entry point is the AppRun launcher, with the host's network settings
# in Env and its services' ports in ExposedPorts; a manifest naming both.
#
#   $out/layout/                     an OCI image layout (oci-layout, index.json, blobs/)
#   $out/<name>-<version>.oci.tar    the same layout as one file (skopeo's oci-archive:)
#   $out/publish/                    what a release publishes, one blob each (the store's
#                                    blobs/sha256/<hex> are the layout's blobs by digest):
#     <name>-<version>.oci.json           the image manifest (release format `oci`)
#     <name>-<version>.oci-config.json    the config (`oci-config`)
#     <base>-<v>.base.tar.gz              the base layer (`oci-layer-base`), one blob fleet-wide
#     <name>-<version>.tar.gz             the host layer (`oci-layer`), one blob while the host's
#                                         image is unchanged
#
# Every JSON document is builtins.toJSON's (sorted keys, no spaces); digests and sizes
# known only at build time replace placeholders in it.
{ toolchain, base }:
{ name, version, host, thin }:
let
  lib = import ./layers.nix { inherit toolchain; };
  net = host.network;
  # The services' ports (a per-service `ports` list of numbers or {port, protocol}).
  portSpec = p: if builtins.isInt p then "${toString p}/tcp"
    else "${toString p.port}/${p.protocol or "tcp"}";
  ports = builtins.concatMap (s: map portSpec (s.ports or [ ])) (builtins.attrValues host.services);
  env = [
    # No runtime sets PATH for an image that does not (apprun.sh extends it).
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    "APPDIR=/"
    "HOSTNAME=${name}"
  ]
  ++ (if net ? address then [ "ADDRESS=${net.address}" ] else [ ])
  ++ (if net ? gateway then [ "GATEWAY=${net.gateway}" ] else [ ])
  ++ (if net ? dns then [ "DNS=${builtins.concatStringsSep " " net.dns}" ] else [ ]);
  labels = {
    "org.opencontainers.image.title" = name;
    "org.opencontainers.image.version" = version;
  };
  configDoc = {
    architecture = "amd64";
    os = "linux";
    config = {
      Entrypoint = [ "/AppRun" ];
      Env = env;
      WorkingDir = "/";
      Labels = labels;
    } // (if ports == [ ] then { } else {
      ExposedPorts = builtins.listToAttrs (map (p: { name = p; value = { }; }) ports);
    });
    rootfs = { type = "layers"; diff_ids = [ "sha256:@BASE_DIFFID@" "sha256:@HOST_DIFFID@" ]; };
  };
  layer = which: {
    mediaType = "application/vnd.oci.image.layer.v1.tar+gzip";
    digest = "sha256:@${which}_DIGEST@";
    size = "@${which}_SIZE@";
  };
  manifestDoc = {
    schemaVersion = 2;
    mediaType = "application/vnd.oci.image.manifest.v1+json";
    config = {
      mediaType = "application/vnd.oci.image.config.v1+json";
      digest = "sha256:@CONFIG_DIGEST@";
      size = "@CONFIG_SIZE@";
    };
    layers = [ (layer "BASE") (layer "HOST") ];
    annotations = labels;
  };
  indexDoc = {
    schemaVersion = 2;
    mediaType = "application/vnd.oci.image.index.v1+json";
    manifests = [ {
      mediaType = "application/vnd.oci.image.manifest.v1+json";
      digest = "sha256:@MANIFEST_DIGEST@";
      size = "@MANIFEST_SIZE@";
      annotations = { "org.opencontainers.image.ref.name" = version; };
    } ];
  };
  json = n: doc: builtins.toFile n (builtins.toJSON doc);
  drv = derivation {
    name = "host-${name}-${version}-oci";
    system = "x86_64-linux";
    builder = toolchain.busybox;
    args = [ "sh" "-c" ''
      ${lib.prelude}
      ${lib.pack}
      blobs="$out/layout/blobs/sha256"
      mkdir -p "$blobs" "$out/publish"
      # put FILE NAME: FILE as a blob of the layout and, named NAME, in publish/.
      put() {
        d=$(sha256 "$1")
        [ -e "$blobs/$d" ] || ln -s "$1" "$blobs/$d"
        ln -s "$blobs/$d" "$out/publish/$2"
      }
      base_layer=$(ls ${base}/*.base.tar.gz)
      put "$base_layer" "$(basename "$base_layer")"
      put ${thin}/layer.tar.gz '${name}-${version}.tar.gz'

      sed -e "s/@BASE_DIFFID@/$(cat ${base}/layer.diffid)/" \
          -e "s/@HOST_DIFFID@/$(cat ${thin}/layer.diffid)/" \
          ${json "oci-config.json" configDoc} > "$out/config.json"
      sed -e "s/@CONFIG_DIGEST@/$(sha256 "$out/config.json")/" \
          -e "s/\"@CONFIG_SIZE@\"/$(size "$out/config.json")/" \
          -e "s/@BASE_DIGEST@/$(cat ${base}/layer.digest)/" \
          -e "s/\"@BASE_SIZE@\"/$(cat ${base}/layer.size)/" \
          -e "s/@HOST_DIGEST@/$(cat ${thin}/layer.digest)/" \
          -e "s/\"@HOST_SIZE@\"/$(cat ${thin}/layer.size)/" \
          ${json "oci-manifest.json" manifestDoc} > "$out/manifest.json"
      put "$out/config.json" '${name}-${version}.oci-config.json'
      put "$out/manifest.json" '${name}-${version}.oci.json'
      sed -e "s/@MANIFEST_DIGEST@/$(sha256 "$out/manifest.json")/" \
          -e "s/\"@MANIFEST_SIZE@\"/$(size "$out/manifest.json")/" \
          ${json "oci-index.json" indexDoc} > "$out/layout/index.json"
      printf '{"imageLayoutVersion":"1.0.0"}' > "$out/layout/oci-layout"

      mkdir "$TMPDIR/archive"
      cp -RL "$out/layout/." "$TMPDIR/archive"
      pack "$TMPDIR/archive" "$out/${name}-${version}.oci.tar" oci-layout index.json blobs
    '' ];
  };
in
drv // { config = configDoc; }
