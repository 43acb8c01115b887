"""Which derivation closures may be built: none holding a derivation that Nix would
build with the network or outside its sandbox.

Nix's sandbox keeps the network from a build, except from a fixed-output derivation
(one declaring its output's hash, as fetchurl does): its builder runs with the host's
network, and the hash is checked only after it ends. `__noChroot` asks for no sandbox
at all, which Nix grants where its sandbox is `relaxed`; `__impure` (an experimental
feature) asks for the network too; and requiring the system feature `recursive-nix`
(experimental as well) gives the build Nix's own daemon, through which it can build
all of these unchecked. A config repository is untrusted, and nothing it defines may
reach the network, so a closure that would build any of these is not built. One whose
outputs are in the store already is not built, and passes: the nixpkgs toolchain's
bootstrap sources are fixed-output derivations an operator fetched before. The Debian
toolchain and the reconciler's Nix library have none.

Pure: `nix show-derivation`'s JSON of a closure's derivations in, a verdict out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# A store path's base name: 32 characters of hash, "-", the name.
_HASH_PART = 33
RECURSIVE_NIX = "recursive-nix"


@dataclass(frozen=True)
class Derivation:
    path: str  # /nix/store/...-NAME.drv
    outputs: tuple[str, ...]  # their store paths
    fixed_output: bool  # an output declares its hash: built with the network
    no_chroot: bool  # __noChroot: built outside the sandbox where Nix's is relaxed
    impure: bool  # __impure: built with the network
    recursive: bool = False  # requires recursive-nix: builds more through Nix's daemon

    @property
    def name(self) -> str:
        base = self.path.rsplit("/", 1)[-1]
        return base[_HASH_PART:].removesuffix(".drv")


def parse_shown(text: str) -> tuple[Derivation, ...]:
    """The derivations `nix show-derivation` printed; ValueError when the
    text is not what it prints."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a mapping of derivations")
    drvs = []
    for path, drv in sorted(data.items()):
        if not isinstance(drv, dict):
            raise ValueError(f"{path}: not a derivation")
        outputs, env = drv.get("outputs"), drv.get("env")
        if not isinstance(outputs, dict) or not isinstance(env, dict):
            raise ValueError(f"{path}: no outputs or environment")
        if not all(isinstance(out, dict) and isinstance(out.get("path"), str) for out in outputs.values()):
            raise ValueError(f"{path}: an output without a path")
        fixed = any("hash" in out or "hashAlgo" in out for out in outputs.values())
        # With __structuredAttrs the attributes are one JSON document, which Nix reads
        # them from instead.
        attrs: dict[str, object] = dict(env)
        if "__json" in env:
            structured = json.loads(env["__json"])
            if not isinstance(structured, dict):
                raise ValueError(f"{path}: __json is not a mapping")
            attrs |= structured
        drvs.append(
            Derivation(
                path=path,
                outputs=tuple(sorted(out["path"] for out in outputs.values())),
                fixed_output=fixed or "outputHash" in attrs,
                no_chroot=_asks(attrs.get("__noChroot")),
                impure=_asks(attrs.get("__impure")),
                recursive=RECURSIVE_NIX in _features(attrs.get("requiredSystemFeatures")),
            )
        )
    return tuple(drvs)


def _asks(value: object) -> bool:
    """Whether a derivation attribute asks for what it names: Nix's true is "1" (or
    true, structured), anything but empty, "0" or false is taken as it, to be safe."""
    return value not in (None, "", "0", False)


def _features(value: object) -> frozenset[str]:
    """The system features a derivation requires: a list of them (structured), else
    the words of the string Nix passes in the environment."""
    if isinstance(value, list):
        return frozenset(str(f) for f in value)
    return frozenset(value.split()) if isinstance(value, str) else frozenset()


def networked(drvs: tuple[Derivation, ...]) -> tuple[Derivation, ...]:
    """Those of ``drvs`` that Nix builds with the network or unsandboxed, or that may
    have Nix build such."""
    return tuple(d for d in drvs if d.fixed_output or d.impure or d.no_chroot or d.recursive)


def refusal(drvs: tuple[Derivation, ...], valid: frozenset[str]) -> str | None:
    """Why a closure of ``drvs`` is not built, naming the first derivation it would
    build with the network or unsandboxed (one with an output not in ``valid``, the
    store paths that exist); None when it would build none."""
    for d in networked(drvs):
        if all(out in valid for out in d.outputs):
            continue
        if d.fixed_output:
            why = "is fixed-output (it declares its output's hash), which Nix builds with the network"
        elif d.impure:
            why = "is impure (__impure), which Nix builds with the network"
        elif d.no_chroot:
            why = "asks to be built outside the sandbox (__noChroot)"
        elif d.recursive:
            why = (
                f"requires {RECURSIVE_NIX}, through which its build could have Nix build more, "
                "with the network"
            )
        else:
            continue
        return f"derivation {d.name} ({d.path}) {why}: no derivation of the config repository may"
    return None
