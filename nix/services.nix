# A host's supervision tree: the AppRun launcher, the static supervisor
# (.reconciler/reconciler-supervise, see apprun.sh) and, per service, the
# runit-style directory it reads:
#   etc/service/<name>/run      the command, run by the image's busybox sh from the image root
#   etc/service/<name>/restart  always | on-failure | never
{ toolchain, name, services }:
let
  bb = toolchain.busybox;
  q = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";
  # exec[0] is relative to the image root; the run script starts there.
  runScript = s: builtins.toFile "run"
    ("exec " + builtins.concatStringsSep " " (map q ([ "./${builtins.head s.exec}" ] ++ builtins.tail s.exec)) + "\n");
  install = svc: s: ''
    mkdir -p "$out/etc/service/${svc}"
    cp ${runScript s} "$out/etc/service/${svc}/run"
    echo ${q s.restart} > "$out/etc/service/${svc}/restart"
  '';
in
derivation {
  name = "host-${name}-services";
  system = "x86_64-linux";
  builder = bb;
  args = [ "sh" "-c" ''
    set -eu
    ${bb} mkdir -p "$TMPDIR/bin"
    for a in $(${bb} --list); do ${bb} ln -sf ${bb} "$TMPDIR/bin/$a"; done
    export PATH="$TMPDIR/bin"
    mkdir -p "$out/.reconciler" "$out/etc/service"
    cp ${toolchain.runtimeBin}/AppRun "$out/AppRun"
    cp ${./apprun.sh} "$out/.reconciler/apprun.sh"
    cp ${toolchain.supervisor} "$out/.reconciler/reconciler-supervise"
    ${builtins.concatStringsSep "\n" (builtins.attrValues (builtins.mapAttrs install services))}
    chmod -R u+w "$out"
  '' ];
}
