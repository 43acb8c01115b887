from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.core.derivations import Derivation, networked, parse_shown, refusal

STORE = "/nix/store/"
HASH = "0" * 32


def drv(name: str, env: dict[str, str] | None = None, fixed: bool = False) -> tuple[str, dict[str, object]]:
    """One entry of `nix show-derivation`'s JSON, as Nix 2.8 prints it."""
    out: dict[str, str] = {"path": f"{STORE}{HASH}-{name}"}
    if fixed:
        out |= {"hashAlgo": "sha256", "hash": "ab" * 32}
    return f"{STORE}{HASH}-{name}.drv", {
        "outputs": {"out": out},
        "inputSrcs": [],
        "inputDrvs": {},
        "system": "x86_64-linux",
        "builder": f"{STORE}{HASH}-busybox",
        "args": ["sh", "-c", "true"],
        "env": {"name": name, "out": out["path"], **(env or {})},
    }


def shown(*entries: tuple[str, dict[str, object]]) -> str:
    return json.dumps(dict(entries))


def test_a_closure_built_offline_in_the_sandbox_passes() -> None:
    drvs = parse_shown(shown(drv("host-web-1"), drv("site")))
    assert [d.name for d in drvs] == ["host-web-1", "site"]
    assert networked(drvs) == ()
    assert refusal(drvs, frozenset()) is None


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        (
            drv("fetch", fixed=True),
            "is fixed-output (it declares its output's hash), which Nix builds with the network",
        ),
        # Declared in the environment only: still what Nix goes by.
        (drv("fetch", env={"outputHash": "ab" * 32}), "is fixed-output"),
        (drv("fetch", env={"__impure": "1"}), "is impure (__impure)"),
        (drv("fetch", env={"__noChroot": "1"}), "asks to be built outside the sandbox (__noChroot)"),
        (drv("fetch", env={"__json": json.dumps({"__noChroot": True})}), "(__noChroot)"),
        (drv("fetch", env={"__json": json.dumps({"__impure": True})}), "(__impure)"),
        (
            drv("fetch", env={"requiredSystemFeatures": "kvm recursive-nix"}),
            "requires recursive-nix, through which its build could have Nix build more",
        ),
        (
            drv("fetch", env={"__json": json.dumps({"requiredSystemFeatures": ["recursive-nix"]})}),
            "recursive-nix",
        ),
    ],
    ids=[
        "fixed output",
        "output hash in env",
        "impure",
        "no chroot",
        "structured no chroot",
        "structured impure",
        "recursive nix",
        "structured recursive nix",
    ],
)
def test_a_derivation_that_would_build_with_the_network_refuses_the_closure(
    entry: tuple[str, dict[str, object]], said: str
) -> None:
    drvs = parse_shown(shown(drv("host-web-1"), entry))
    why = refusal(drvs, frozenset())
    assert why is not None
    assert why.startswith(f"derivation fetch ({STORE}{HASH}-fetch.drv) ")
    assert said in why
    assert why.endswith("no derivation of the config repository may")


def test_other_system_features_pass() -> None:
    """kvm and big-parallel give a build a device or more cores, not Nix or the network."""
    drvs = parse_shown(
        shown(
            drv("vm-test", env={"requiredSystemFeatures": "kvm big-parallel recursive-nixos"}),
            drv("site", env={"__json": json.dumps({"requiredSystemFeatures": ["kvm"]})}),
        )
    )
    assert networked(drvs) == ()


def test_one_whose_outputs_are_in_the_store_is_not_built_and_passes() -> None:
    drvs = parse_shown(shown(drv("host-web-1"), drv("bootstrap-tools", fixed=True)))
    assert refusal(drvs, frozenset({f"{STORE}{HASH}-bootstrap-tools"})) is None


@pytest.mark.parametrize("value", ["", "0"])
def test_a_false_attribute_asks_for_nothing(value: str) -> None:
    drvs = parse_shown(shown(drv("x", env={"__noChroot": value, "__impure": value})))
    assert refusal(drvs, frozenset()) is None
    structured = json.dumps({"__noChroot": False, "__impure": False})
    assert refusal(parse_shown(shown(drv("x", env={"__json": structured}))), frozenset()) is None


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        json.dumps({"/nix/store/x.drv": []}),
        json.dumps({"/nix/store/x.drv": {"outputs": {}}}),
        json.dumps({"/nix/store/x.drv": {"outputs": {"out": "p"}, "env": {}}}),
        json.dumps({"/nix/store/x.drv": {"outputs": {"out": {}}, "env": {}}}),
        json.dumps({"/nix/store/x.drv": {"outputs": {"out": {"path": "p"}}, "env": {"__json": "[]"}}}),
        json.dumps({"/nix/store/x.drv": {"outputs": {"out": {"path": "p"}}, "env": {"__json": "{"}}}),
    ],
)
def test_what_nix_does_not_print_is_an_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_shown(text)


kinds = st.sampled_from(["plain", "fixed", "impure", "no chroot"])


@given(st.lists(st.tuples(kinds, st.booleans()), max_size=8))
def test_refused_exactly_when_a_networked_derivation_is_missing_an_output(
    spec: list[tuple[str, bool]],
) -> None:
    drvs = tuple(
        Derivation(
            path=f"{STORE}{HASH}-d{i}.drv",
            outputs=(f"{STORE}{HASH}-d{i}",),
            fixed_output=kind == "fixed",
            no_chroot=kind == "no chroot",
            impure=kind == "impure",
        )
        for i, (kind, _) in enumerate(spec)
    )
    valid = frozenset(d.outputs[0] for d, (_, present) in zip(drvs, spec, strict=True) if present)
    would_build = [kind != "plain" and not present for kind, present in spec]
    assert (refusal(drvs, valid) is not None) == any(would_build)
