# Is this Nix building in its sandbox? The reconciler builds this at start-up (with
# a fresh nonce, so never from a cached result) and reads the verdict: a sandboxed
# builder sees only its inputs, /build and a few files Nix puts in /etc, never the
# machine's own directories nor the signing key's.
{ nonce
, paths                         # space-separated: what only an unsandboxed builder sees
, toolchainDir ? null
, toolchain ? import ./toolchain-debian.nix { dir = toolchainDir; }
}:
derivation {
  name = "reconciler-sandbox-probe";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  inherit nonce paths;
  args = [ "sh" "-c" ''
    verdict=sandboxed
    for p in $paths; do
      if ${toolchain.busybox} test -e "$p"; then verdict=unsandboxed; fi
    done
    echo "$verdict" > "$out"
  '' ];
}
