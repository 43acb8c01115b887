# The whole fleet in one evaluation. The reconciler writes fleetFile from the
# validated host definitions:  { "hosts": { "<name>": <normalised host> } }
#
#   nix-instantiate --eval --strict --json fleet.nix -A images ...   # change detection
#   nix-instantiate --eval --strict --json fleet.nix -A packageIds ... # what packages give
#   nix-build fleet.nix -A 'hosts."web-1".artifacts' --argstr version 3 ...
{ fleetFile
, repoDir                       # the head's tree (packages/ lives there; no hosts/, profiles/)
, toolchainDir ? null           # staged by toolchain/import-debian.sh
, toolchain ? import ./toolchain-debian.nix { dir = toolchainDir; }
, version ? "0"                 # release number, only baked into the artifacts step
, aci ? "{}"                    # JSON: the ACI's name and annotations (artifacts step only)
}:
let
  fleet = builtins.fromJSON (builtins.readFile fleetFile);
  repo = /. + repoDir;
  # One instance per package name, shared by every host using it.
  # Beside the hosts' packages, those the fleet file lists under "packages" (their
  # packageIds without evaluating any host).
  packageNames = (fleet.packages or [ ]) ++ builtins.concatMap
    (h: map (s: s.package) (builtins.attrValues h.services))
    (builtins.attrValues fleet.hosts);
  packages = builtins.listToAttrs (map
    (p: { name = p; value = import (repo + "/packages/${p}.nix") { inherit toolchain; }; })
    (builtins.filter (p: p != "busybox") packageNames));
  mkHost = import ./host.nix { inherit toolchain packages version; aci = builtins.fromJSON aci; };
  hosts = builtins.mapAttrs (_: mkHost) fleet.hosts;
in
{
  inherit hosts toolchain;
  # Change detection keys on the version-independent image derivation.
  images = builtins.mapAttrs (_: h: h.image.drvPath) hosts;
  # All of a package that reaches an image (host.nix interpolates it): its output
  # path and derivation, by digest (a package that is a string of any length has an
  # id of 64 characters, in the daemon and in its ledger). The evaluation cache keys
  # hosts on these instead of on the package's files, so an edit that leaves a
  # package's derivation as it was (a comment, a file it does not use) re-evaluates
  # no host.
  packageIds = builtins.mapAttrs
    (_: p: builtins.hashString "sha256" (builtins.concatStringsSep " "
      ([ "${p}" ] ++ (if builtins.isAttrs p && p ? drvPath then [ p.drvPath ] else [ ]))))
    packages;
}
