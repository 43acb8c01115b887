"""Unit tests for reconciler.plan: which hosts rebuild and why."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reconciler.core.hosts import Fleet, Host, Network, Service, parse_fleet
from reconciler.core.model import Action, HostState, Status, Suspensions
from reconciler.core.plan import HostPlan, Plan, make_plan, retry_delay, suspended_fleet
from reconciler.errors import ConfigError

COMMIT = "c" * 40
IMG_A = "/nix/store/aaaa-host-web-1-image.drv"
IMG_B = "/nix/store/bbbb-host-web-1-image.drv"


def host(name: str, *, profiles: tuple[str, ...] = (), package: str | None = None) -> Host:
    services = () if package is None else (Service("web", package, ("bin/busybox", "httpd"), "always"),)
    return Host(
        name=name,
        formats=("aci", "appimage"),
        network=Network(),
        services=services,
        files=(),
        sources=(f"hosts/{name}.yaml", *(f"profiles/{p}.yaml" for p in profiles)),
    )


def fleet(*hosts: Host, errors: tuple[ConfigError, ...] = (), invalid: frozenset[str] = frozenset()) -> Fleet:
    return Fleet(hosts={h.name: h for h in hosts}, errors=errors, invalid=invalid)


def published(
    name: str, image: str | None = IMG_A, version: int = 4, status: Status = Status.PUBLISHED
) -> HostState:
    return HostState(name, version, image, "d" * 40, status, None, 1700000000.0)


def states(*s: HostState) -> dict[str, HostState]:
    return {h.name: h for h in s}


def plan_one(
    h: Host,
    image: str,
    prev: HostState | None,
    changed: frozenset[str] | None,
) -> HostPlan:
    p = make_plan(COMMIT, fleet(h), {h.name: image}, {}, states(prev) if prev else {}, changed)
    assert p.commit == COMMIT
    (entry,) = p.entries
    return entry


WEB = host("web-1", profiles=("base",), package="site")


def test_new_host_rebuilds() -> None:
    assert plan_one(WEB, IMG_A, None, frozenset()) == HostPlan(
        "web-1", Action.REBUILD, ("new host, never published",), IMG_A
    )


def test_host_that_only_ever_failed_counts_as_new() -> None:
    prev = published("web-1", image=None, version=0, status=Status.FAILED)
    assert plan_one(WEB, IMG_A, prev, None) == HostPlan(
        "web-1", Action.REBUILD, ("new host, never published",), IMG_A
    )


def test_same_image_is_unchanged() -> None:
    entry = plan_one(WEB, IMG_A, published("web-1"), frozenset({"hosts/other.yaml", "README.md"}))
    assert entry == HostPlan("web-1", Action.UNCHANGED, ("inputs unchanged",), IMG_A)


def test_same_image_with_touched_inputs_says_the_build_did_not_change() -> None:
    entry = plan_one(WEB, IMG_A, published("web-1"), frozenset({"profiles/base.yaml", "hosts/web-1.yaml"}))
    assert entry == HostPlan(
        "web-1",
        Action.UNCHANGED,
        ("hosts/web-1.yaml changed but not its build", "profiles/base.yaml changed but not its build"),
        IMG_A,
    )


def test_changed_image_names_the_touched_inputs_sorted() -> None:
    changed = frozenset({"packages/site.nix", "profiles/base.yaml", "hosts/web-2.yaml", "nix/host.nix"})
    entry = plan_one(WEB, IMG_B, published("web-1"), changed)
    assert entry == HostPlan(
        "web-1", Action.REBUILD, ("packages/site.nix changed", "profiles/base.yaml changed"), IMG_B
    )


def test_changed_image_without_touched_inputs_is_a_recipe_change() -> None:
    entry = plan_one(WEB, IMG_B, published("web-1"), frozenset({"nix/host.nix"}))
    assert entry == HostPlan(
        "web-1", Action.REBUILD, ("build recipe changed (nix/ library or toolchain)",), IMG_B
    )


def test_changed_image_with_unknown_history() -> None:
    entry = plan_one(WEB, IMG_B, published("web-1"), None)
    assert entry == HostPlan(
        "web-1",
        Action.REBUILD,
        ("build inputs changed (no common history with the last reconciled commit)",),
        IMG_B,
    )


def test_unknown_history_with_the_same_image_is_unchanged() -> None:
    assert plan_one(WEB, IMG_A, published("web-1"), None) == HostPlan(
        "web-1", Action.UNCHANGED, ("inputs unchanged",), IMG_A
    )


def test_builtin_package_is_not_an_input() -> None:
    h = host("web-1", package="busybox")
    entry = plan_one(h, IMG_B, published("web-1"), frozenset({"packages/busybox.nix"}))
    assert entry.reasons == ("build recipe changed (nix/ library or toolchain)",)


def test_published_host_missing_from_the_fleet_is_removed() -> None:
    p = make_plan(
        COMMIT,
        fleet(WEB),
        {"web-1": IMG_A},
        {},
        states(published("web-1"), published("old-1"), published("gone-1", status=Status.REMOVED)),
        frozenset({"hosts/old-1.yaml"}),
    )
    assert p.entries == (
        HostPlan("old-1", Action.REMOVED, ("hosts/old-1.yaml no longer exists",)),
        HostPlan("web-1", Action.UNCHANGED, ("inputs unchanged",), IMG_A),
    )


def test_invalid_host_is_listed_and_not_removed() -> None:
    err = ConfigError("hosts/bad-1.yaml", "network.gateway", "'nope' is not an IP address")
    p = make_plan(
        COMMIT,
        fleet(WEB, errors=(err,), invalid=frozenset({"bad-1"})),
        {"web-1": IMG_A},
        {},
        states(published("web-1"), published("bad-1")),
        frozenset({"hosts/bad-1.yaml"}),
    )
    assert p.entries == (
        HostPlan(
            "bad-1", Action.INVALID, ("hosts/bad-1.yaml: network.gateway: 'nope' is not an IP address",)
        ),
        HostPlan("web-1", Action.UNCHANGED, ("inputs unchanged",), IMG_A),
    )
    assert p.with_action(Action.REMOVED) == ()


def test_broken_profile_makes_its_hosts_invalid_not_the_profile() -> None:
    f = parse_fleet(
        {
            "hosts/web-1.yaml": "name: web-1\ninclude: [a]\n",
            "hosts/web-2.yaml": "name: web-2\n",
            "profiles/a.yaml": "include: [b]\n",
            "profiles/b.yaml": "include: [a]\n",
        }
    )
    p = make_plan(COMMIT, f, {"web-2": IMG_A}, {}, states(published("web-1"), published("web-2")), None)
    assert p.entries == (
        HostPlan(
            "web-1",
            Action.INVALID,
            ("hosts/web-1.yaml: include: profiles/a.yaml: include: include cycle: a -> b -> a",),
        ),
        HostPlan("web-2", Action.UNCHANGED, ("inputs unchanged",), IMG_A),
    )


def test_duplicate_host_is_invalid_and_not_removed() -> None:
    f = parse_fleet({"hosts/web-1.yaml": "name: web-1\n", "hosts/web-1.yml": "name: web-1\n"})
    p = make_plan(COMMIT, f, {}, {}, states(published("web-1")), frozenset())
    assert p.entries == (
        HostPlan(
            "web-1",
            Action.INVALID,
            ("hosts/web-1.yaml: host 'web-1' is defined twice: hosts/web-1.yaml and hosts/web-1.yml",),
        ),
    )


def test_evaluation_error_is_invalid() -> None:
    p = make_plan(
        COMMIT, fleet(WEB), {}, {"web-1": "attribute 'site' missing"}, states(published("web-1")), frozenset()
    )
    assert p.entries == (
        HostPlan("web-1", Action.INVALID, ("nix evaluation failed: attribute 'site' missing",)),
    )


def test_entries_are_sorted_by_host_and_serialise() -> None:
    err = ConfigError("hosts/m-1.yaml", "", "is a symlink; definitions must live in the repository")
    hosts = [host("z-1"), host("a-1"), host("k-1")]
    p = make_plan(
        COMMIT,
        fleet(*hosts, errors=(err,), invalid=frozenset({"m-1"})),
        {"z-1": IMG_A, "a-1": IMG_B, "k-1": IMG_A},
        {},
        states(published("z-1", image=IMG_B), published("k-1"), published("b-1")),
        frozenset({"hosts/z-1.yaml"}),
    )
    assert [(e.host, e.action) for e in p.entries] == [
        ("a-1", Action.REBUILD),
        ("b-1", Action.REMOVED),
        ("k-1", Action.UNCHANGED),
        ("m-1", Action.INVALID),
        ("z-1", Action.REBUILD),
    ]
    assert [e.host for e in p.with_action(Action.REBUILD)] == ["a-1", "z-1"]
    assert p.to_json() == {
        "commit": COMMIT,
        "summary": {"rebuild": 2, "unchanged": 1, "invalid": 1, "removed": 1, "backoff": 0, "suspended": 0},
        "hosts": [
            {"host": "a-1", "action": "rebuild", "reasons": ["new host, never published"], "image": IMG_B},
            {
                "host": "b-1",
                "action": "removed",
                "reasons": ["hosts/b-1.yaml no longer exists"],
                "image": None,
            },
            {"host": "k-1", "action": "unchanged", "reasons": ["inputs unchanged"], "image": IMG_A},
            {
                "host": "m-1",
                "action": "invalid",
                "reasons": ["hosts/m-1.yaml: is a symlink; definitions must live in the repository"],
                "image": None,
            },
            {"host": "z-1", "action": "rebuild", "reasons": ["hosts/z-1.yaml changed"], "image": IMG_A},
        ],
    }


def test_empty_everything() -> None:
    assert make_plan(COMMIT, fleet(), {}, {}, {}, None) == Plan(COMMIT, ())


# -- property: the decision depends only on the image ----------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True)
images = st.sampled_from([IMG_A, IMG_B, "/nix/store/cccc-x.drv"])


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(names, images, max_size=6),
    st.dictionaries(names, st.one_of(st.none(), images), max_size=6),
    st.one_of(st.none(), st.frozensets(st.sampled_from(["hosts/a.yaml", "profiles/base.yaml", "nix/x"]))),
)
def test_rebuild_exactly_when_the_image_differs(
    current: Mapping[str, str], before: Mapping[str, str | None], changed: frozenset[str] | None
) -> None:
    f = fleet(*(host(n, profiles=("base",)) for n in current))
    prev = states(*(published(n, image=img, version=0 if img is None else 2) for n, img in before.items()))
    p = make_plan(COMMIT, f, current, {}, prev, changed)
    assert [e.host for e in p.entries] == sorted(set(current) | set(before))
    for e in p.entries:
        if e.host not in current:
            assert (e.action, e.image) == (Action.REMOVED, None)
        elif before.get(e.host) == current[e.host]:
            assert (e.action, e.image) == (Action.UNCHANGED, current[e.host])
        else:
            assert (e.action, e.image) == (Action.REBUILD, current[e.host])
        assert e.reasons


def failed(image: str, failures: int, retry_at: float) -> HostState:
    return HostState(
        "web-1", 4, IMG_A, "d" * 40, Status.FAILED, "boom", 1700000000.0, failures, image, retry_at
    )


def test_a_failed_build_waits_for_its_retry_time() -> None:
    prev = failed(IMG_B, 2, retry_at=1000.0)
    p = make_plan(COMMIT, fleet(WEB), {"web-1": IMG_B}, {}, states(prev), frozenset(), now=940.0)
    assert p.entries == (
        HostPlan(
            "web-1",
            Action.BACKOFF,
            (
                "build failed 2 time(s) in a row; next retry in 60s",
                "nothing changed since the build of this image failed",
            ),
            IMG_B,
        ),
    )
    # Its retry time come, the same build again: not a change of the recipe.
    p = make_plan(COMMIT, fleet(WEB), {"web-1": IMG_B}, {}, states(prev), frozenset(), now=1000.0)
    assert p.entries == (
        HostPlan("web-1", Action.REBUILD, ("nothing changed since the build of this image failed",), IMG_B),
    )


def test_a_failed_build_is_retried_once_its_time_has_come_or_backoff_is_ignored() -> None:
    prev = failed(IMG_B, 2, retry_at=1000.0)
    for now in (1000.0, None):
        p = make_plan(COMMIT, fleet(WEB), {"web-1": IMG_B}, {}, states(prev), frozenset(), now=now)
        assert [e.action for e in p.entries] == [Action.REBUILD]


def test_a_retry_time_beyond_the_longest_backoff_is_due_now() -> None:
    # Recorded while the clock was 30 days ahead: the clock came back, and waiting for
    # it would keep the host in backoff for 30 days with retry.max at 4s.
    prev = failed(IMG_B, 1, retry_at=1000.0 + 30 * 86400)
    p = make_plan(
        COMMIT, fleet(WEB), {"web-1": IMG_B}, {}, states(prev), frozenset(), now=1000.0, max_wait=4.0
    )
    assert [e.action for e in p.entries] == [Action.REBUILD]
    # Within retry.max it is waited for.
    prev = failed(IMG_B, 1, retry_at=1003.0)
    p = make_plan(
        COMMIT, fleet(WEB), {"web-1": IMG_B}, {}, states(prev), frozenset(), now=1000.0, max_wait=4.0
    )
    assert [e.action for e in p.entries] == [Action.BACKOFF]


def test_a_different_build_does_not_wait_for_the_failed_ones_backoff() -> None:
    prev = failed("/nix/store/cccc-host-web-1-image.drv", 5, retry_at=10_000.0)
    p = make_plan(COMMIT, fleet(WEB), {"web-1": IMG_B}, {}, states(prev), frozenset(), now=1.0)
    assert [e.action for e in p.entries] == [Action.REBUILD]


def test_retry_delay_doubles_from_initial_up_to_the_cap() -> None:
    assert [retry_delay(n, 30, 3600) for n in range(1, 10)] == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert retry_delay(10_000, 30, 3600) == 3600


@given(st.integers(1, 500), st.floats(0.1, 1e4), st.floats(0.1, 1e6))
def test_retry_delay_is_monotonic_and_capped(failures: int, initial: float, maximum: float) -> None:
    d = retry_delay(failures, initial, maximum)
    assert d <= maximum
    assert retry_delay(failures + 1, initial, maximum) >= d


def test_the_exponent_stops_doubling_at_2_to_the_62nd() -> None:
    # Past it the delay is the cap (a float, however many failures), never an overflow.
    assert retry_delay(63, 1.0, float("inf")) == 2.0**62
    assert retry_delay(10**9, 1.0, float("inf")) == 2.0**62


def test_an_invalid_host_is_named_after_its_whole_file_stem() -> None:
    f = parse_fleet({"hosts/web.1.yaml": "name: web.1\n", "hosts/web.yaml": "name: web\n"})
    assert f.invalid == {"web.1"}
    p = make_plan(COMMIT, f, {"web": IMG_A}, {}, states(published("web")), frozenset())
    assert [(e.host, e.action) for e in p.entries] == [("web", Action.UNCHANGED), ("web.1", Action.INVALID)]


before_states = st.tuples(
    st.sampled_from([0, 1, 2]),  # version: 0 is never published
    st.one_of(st.none(), images),  # image it was published from
    st.one_of(st.none(), images),  # image whose build failed
    st.sampled_from([None, 50.0, 150.0]),  # its retry time
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # Per host: its image now (None: not in the fleet), what the state says of it
    # (None: nothing), and whether its evaluation failed.
    st.dictionaries(
        names,
        st.tuples(st.one_of(st.none(), images), st.one_of(st.none(), before_states), st.booleans()),
        max_size=8,
    ),
    st.sampled_from([None, 100.0]),
)
# Cases a random search may miss, each once got wrong on purpose (mutation testing):
@example({"a": (IMG_A, (0, IMG_A, None, None), False)}, None)  # never published, same image
@example({"a": (IMG_A, (1, IMG_A, None, None), False)}, None)  # version 1 is published
@example({"a": (IMG_A, (2, None, None, None), False)}, None)  # published from no known image
@example({"a": (IMG_A, (2, IMG_B, IMG_A, 150.0), False), "b": (IMG_A, None, False)}, 100.0)
@example({"a": (IMG_A, None, True), "b": (IMG_A, None, False)}, None)
def test_every_host_gets_the_action_its_state_calls_for(
    fleet_and_state: Mapping[
        str, tuple[str | None, tuple[int, str | None, str | None, float | None] | None, bool]
    ],
    now: float | None,
) -> None:
    """A reference model of the decision, over many hosts at once (so that one host's
    entry can never stop the others')."""
    current = {n: img for n, (img, _, _) in fleet_and_state.items() if img is not None}
    before = {n: s for n, (_, s, _) in fleet_and_state.items() if s is not None}
    eval_failed = {n for n, (_, _, failed) in fleet_and_state.items() if failed}
    f = fleet(*(host(n) for n in current))
    prev = {
        n: HostState(n, v, img, "d" * 40, Status.FAILED, None, 0.0, 1, failed_img, retry_at)
        for n, (v, img, failed_img, retry_at) in before.items()
    }
    errors = {n: "boom" for n in eval_failed & set(current)}
    images = {n: img for n, img in current.items() if n not in errors}
    p = make_plan(COMMIT, f, images, errors, prev, frozenset(), now=now)
    assert [e.host for e in p.entries] == sorted(set(current) | set(before))
    for e in p.entries:
        s = prev.get(e.host)
        if e.host not in current:
            expected = Action.REMOVED
        elif e.host in errors:
            expected = Action.INVALID
        elif s is not None and s.version > 0 and s.image == current[e.host]:
            expected = Action.UNCHANGED
        elif (
            s is not None
            and now is not None
            and s.failed_image == current[e.host]
            and s.retry_at is not None
            and now < s.retry_at
        ):
            expected = Action.BACKOFF
        else:
            expected = Action.REBUILD
        assert e.action == expected, (e, s)
        never = s is None or s.version == 0 or s.image is None
        if expected in (Action.REBUILD, Action.BACKOFF):
            assert ("new host, never published" in e.reasons) == never, (e, s)


def test_summary_and_exit_codes_say_whether_a_pass_would_change_anything() -> None:
    def plan_of(*actions: Action) -> Plan:
        return Plan(COMMIT, tuple(HostPlan(f"h{i}", a, ("why",)) for i, a in enumerate(actions)))

    quiet = plan_of(Action.UNCHANGED, Action.BACKOFF)
    assert (quiet.exit_code(), quiet.exit_code(detailed=True)) == (0, 0)
    assert (
        quiet.summary()
        == "plan: 0 to rebuild, 0 to remove, 0 invalid, 1 in backoff, 0 suspended, 1 unchanged"
    )
    for changes in (Action.REBUILD, Action.REMOVED):
        busy = plan_of(Action.UNCHANGED, changes)
        assert (busy.exit_code(), busy.exit_code(detailed=True)) == (0, 2)
    broken = plan_of(Action.REBUILD, Action.INVALID)
    assert (broken.exit_code(), broken.exit_code(detailed=True)) == (1, 1)
    assert broken.to_json()["summary"] == {
        "rebuild": 1,
        "unchanged": 0,
        "invalid": 1,
        "removed": 0,
        "backoff": 0,
        "suspended": 0,
    }


def test_a_suspended_host_is_left_as_it_is_and_the_plan_says_what_it_would_do() -> None:
    err = ConfigError("hosts/bad-1.yaml", "formats", "unknown format 'tarball'")
    prev = states(
        published("web-1"), published("web-2"), published("old-1"), published("bad-1"), published("db-1")
    )
    f = fleet(WEB, host("web-2"), host("db-1"), errors=(err,), invalid=frozenset({"bad-1"}))
    images = {"web-1": IMG_B, "web-2": IMG_B, "db-1": IMG_B}
    only = Suspensions(hosts={"web-1": 1.0, "old-1": 2.0, "bad-1": 3.0, "db-1": 4.0})
    p = make_plan(COMMIT, f, images, {}, prev, frozenset({"hosts/web-1.yaml"}), suspended=only)
    by_host = {e.host: e for e in p.entries}
    assert by_host["web-1"] == HostPlan(
        "web-1",
        Action.SUSPENDED,
        ("the host is suspended (reconciler resume web-1)", "otherwise rebuild: hosts/web-1.yaml changed"),
        IMG_B,
    )
    # A suspended host whose file is gone keeps what it published (not removed).
    assert by_host["old-1"].action == Action.SUSPENDED
    assert by_host["old-1"].reasons[1] == "otherwise removed: hosts/old-1.yaml no longer exists"
    # An invalid definition is reported whatever the suspension: a pull request check
    # still fails on it, and the pass changes nothing in the store for it either way.
    assert by_host["bad-1"].action == Action.INVALID
    assert by_host["web-2"].action == Action.REBUILD
    assert p.summary().endswith("1 invalid, 0 in backoff, 3 suspended, 0 unchanged")
    assert (p.exit_code(), p.exit_code(detailed=True)) == (1, 1)

    fleet_wide = make_plan(
        COMMIT,
        fleet(WEB),
        {"web-1": IMG_A},
        {},
        states(published("web-1")),
        None,
        suspended=Suspensions(fleet=5.0),
    )
    (entry,) = fleet_wide.entries
    assert entry.action == Action.SUSPENDED
    assert entry.reasons == (
        "the fleet is suspended (reconciler resume)",
        "otherwise unchanged: inputs unchanged",
    )
    assert (fleet_wide.exit_code(), fleet_wide.exit_code(detailed=True)) == (0, 0)


def test_a_plan_suspends_hosts_found_suspended_during_a_pass() -> None:
    p = make_plan(COMMIT, fleet(WEB, host("web-2")), {"web-1": IMG_B, "web-2": IMG_B}, {}, {}, None)
    later = p.suspend(["web-2"], Suspensions(hosts={"web-2": 9.0}))
    assert [e.action for e in later.entries] == [Action.REBUILD, Action.SUSPENDED]
    assert later.entries[1].reasons[1] == "otherwise rebuild: new host, never published"


def test_a_suspended_fleet_s_plan_lists_the_hosts_recorded() -> None:
    p = suspended_fleet(COMMIT, states(published("web-1"), published("gone-1", status=Status.REMOVED)))
    assert p.entries == (
        HostPlan("web-1", Action.SUSPENDED, ("the fleet is suspended (reconciler resume)",), IMG_A),
    )
