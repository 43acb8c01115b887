"""The transparency log's Merkle tree (reconciler.core.tlog) against a naive reference:
RFC 6962's definitions of MTH, PATH and PROOF written as recursions over the list of
entries. Proofs come from tiles built by appending in random batches; every proof
must equal the reference's and verify, and any change to a proof, a tile, an index,
a size or a root must fail."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from functools import cache

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reconciler.core import tlog
from reconciler.core.tlog import (
    EMPTY_ROOT,
    Bundle,
    Edge,
    LogFormatError,
    Node,
    Tile,
    append,
    consistency_ranges,
    consistent,
    edge_bundle,
    edge_from,
    edge_tiles,
    inclusion_ranges,
    leaf_hash,
    node_hash,
    nodes_of,
    proof_hashes,
    read_tiles,
    verify_consistency,
    verify_inclusion,
)

PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the reference: RFC 6962 section 2.1, as written there ---------------------------


def split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


@cache
def mth(d: tuple[bytes, ...]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = split(len(d))
    return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()


def path(m: int, d: tuple[bytes, ...]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = split(len(d))
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: tuple[bytes, ...], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [mth(d)]
    k = split(len(d))
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


def proof(m: int, d: tuple[bytes, ...]) -> list[bytes]:
    return subproof(m, d, True)


# -- a log built by appending -----------------------------------------------------


class Log:
    """Entries appended in batches; every tile and bundle ever written, by path."""

    def __init__(self) -> None:
        self.entries: list[bytes] = []
        self.edge = Edge(0)
        self.files: dict[str, bytes] = {}
        self.written: list[str] = []
        self.roots: dict[int, bytes] = {0: EMPTY_ROOT}

    def append(self, batch: Sequence[bytes]) -> None:
        self.edge, writes = append(self.edge, batch)
        self.entries += batch
        for item, data in writes.items():
            self.written.append(item.path)
            self.files[item.path] = data
        self.roots[self.edge.size] = self.edge.root()

    def read(self, p: str) -> bytes | None:
        return self.files.get(p)

    def d(self, size: int) -> tuple[bytes, ...]:
        return tuple(self.entries[:size])


def entries(start: int, n: int) -> list[bytes]:
    return [f"entry {i}".encode() for i in range(start, start + n)]


def build(batches: Sequence[int]) -> Log:
    log = Log()
    for n in batches:
        log.append(entries(len(log.entries), n))
    return log


BATCHES = st.lists(st.integers(1, 70), min_size=1, max_size=12)


def inclusion(log: Log, index: int, size: int) -> list[bytes]:
    ranges = inclusion_ranges(index, size)
    return proof_hashes(ranges, read_tiles(log.read, size, log.roots[size], nodes_of(ranges)))


def consistency(log: Log, old: int, new: int) -> list[bytes]:
    ranges = consistency_ranges(old, new)
    return proof_hashes(ranges, read_tiles(log.read, new, log.roots[new], nodes_of(ranges)))


# -- properties -------------------------------------------------------------------


@PROPERTY
@given(BATCHES)
def test_every_checkpoint_root_is_the_reference_root(batches: list[int]) -> None:
    log = build(batches)
    for size, root in log.roots.items():
        assert root == mth(log.d(size))


@PROPERTY
@given(BATCHES, st.data())
def test_inclusion_proofs_from_tiles_are_rfc_6962_paths_and_verify(
    batches: list[int], data: st.DataObject
) -> None:
    log = build(batches)
    for size in log.roots:
        if size == 0:
            continue
        for index in {0, size - 1, data.draw(st.integers(0, size - 1))}:
            got = inclusion(log, index, size)
            assert got == path(index, log.d(size))
            leaf = leaf_hash(log.entries[index])
            assert verify_inclusion(index, size, leaf, got, log.roots[size])


@PROPERTY
@given(BATCHES, st.data())
def test_consistency_proofs_between_any_two_sizes_are_rfc_6962_and_verify(
    batches: list[int], data: st.DataObject
) -> None:
    log = build(batches)
    sizes = sorted(log.roots)
    for new in sizes:
        for old in {0, new, data.draw(st.integers(0, new)), *(s for s in sizes if s <= new)}:
            got = consistency(log, old, new) if 0 < old < new else []
            if 0 < old < new:
                assert got == proof(old, log.d(new))
            assert verify_consistency(old, new, mth(log.d(old)), log.roots[new], got)
            assert consistent(log.read, (old, mth(log.d(old))), (new, log.roots[new]))


def flips(items: Sequence[bytes]) -> list[list[bytes]]:
    """Every way of changing one bit of one item, dropping one, or adding one."""
    out = []
    for i, h in enumerate(items):
        out.append([*items[:i], bytes([h[0] ^ 1]) + h[1:], *items[i + 1 :]])
        out.append([*items[:i], *items[i + 1 :]])
    out.append([*items, b"\x00" * 32])
    return out


@PROPERTY
@given(st.integers(1, 300), st.data())
def test_a_changed_inclusion_proof_index_leaf_or_root_fails(size: int, data: st.DataObject) -> None:
    log = build([size])
    index = data.draw(st.integers(0, size - 1))
    good = inclusion(log, index, size)
    leaf, root = leaf_hash(log.entries[index]), log.roots[size]
    for bad in flips(good):
        assert not verify_inclusion(index, size, leaf, bad, root)
    other = data.draw(st.integers(0, size))
    assume(other != index)
    assert not verify_inclusion(other, size, leaf, good, root)
    assert not verify_inclusion(index, size, leaf_hash(b"another entry"), good, root)
    assert not verify_inclusion(index, size, node_hash(leaf, leaf), good, root)
    assert not verify_inclusion(index, size, leaf, good, bytes([root[0] ^ 1]) + root[1:])
    # (The size is bound by the signed checkpoint that carries it with the root: a
    # path is the same for a leaf in trees whose sizes differ past it.)


@PROPERTY
@given(st.integers(2, 300), st.data())
def test_a_changed_consistency_proof_or_root_fails(new: int, data: st.DataObject) -> None:
    log = build([new])
    old = data.draw(st.integers(1, new - 1))
    good = consistency(log, old, new)
    old_root, new_root = mth(log.d(old)), log.roots[new]
    assert verify_consistency(old, new, old_root, new_root, good)
    for bad in flips(good):
        assert not verify_consistency(old, new, old_root, new_root, bad)
    flipped = bytes([old_root[0] ^ 1]) + old_root[1:]
    assert not verify_consistency(old, new, flipped, new_root, good)
    assert not verify_consistency(old, new, old_root, flipped, good)
    # A tree that differs in one entry is not a prefix, whatever the proof says.
    forked = build([new])
    forked.entries[data.draw(st.integers(0, old - 1))] = b"rewritten"
    assert not verify_consistency(old, new, mth(forked.d(old)), new_root, good)


@PROPERTY
@given(BATCHES, st.data())
def test_a_rewritten_hash_in_any_tile_a_proof_reads_is_caught(
    batches: list[int], data: st.DataObject
) -> None:
    log = build(batches)
    size = log.edge.size
    index = data.draw(st.integers(0, size - 1))
    nodes = nodes_of(inclusion_ranges(index, size))
    tiles = sorted(tlog.needed_tiles(nodes, size))
    tile = data.draw(st.sampled_from(tiles))
    stored = log.files[tile.path]
    at = data.draw(st.integers(0, len(stored) - 1))
    log.files[tile.path] = stored[:at] + bytes([stored[at] ^ 0x80]) + stored[at + 1 :]
    with pytest.raises(LogFormatError):
        read_tiles(log.read, size, log.roots[size], nodes)


@PROPERTY
@given(BATCHES)
def test_tiles_are_append_only_and_the_edge_reads_back(batches: list[int]) -> None:
    log = Log()
    for n in batches:
        before = len(log.written)
        log.append(entries(len(log.entries), n))
        new = log.written[before:]
        assert not set(new) & set(log.written[:before]), "a tile or bundle was written twice"
        # A restarted publisher reads the edge back from the store and goes on from it.
        size = log.edge.size
        tiles = {t: log.files[t.path] for t in edge_tiles(size)}
        bundle = edge_bundle(size)
        assert edge_from(size, tiles, log.files[bundle.path] if bundle else None) == log.edge


def test_a_tree_of_70000_is_laid_out_as_tlog_tiles_says() -> None:
    """The spec's example: 273 full level 0 tiles, one partial of width 112, one full
    level 1 tile, one partial level 1 tile of width 17, one partial level 2 of width 1."""
    log = build([70_000])
    tiles = [tlog.parse_tile_path(p) for p in log.files]
    level0 = [t for t in tiles if isinstance(t, Tile) and t.level == 0]
    assert sum(t.width == 256 for t in level0) == 273
    assert [t.width for t in level0 if t.width < 256] == [112]
    assert sorted((t.level, t.index, t.width) for t in tiles if isinstance(t, Tile) and t.level) == [
        (1, 0, 256),
        (1, 1, 17),
        (2, 0, 1),
    ]
    assert edge_tiles(70_000) == [Tile(0, 273, 112), Tile(1, 1, 17), Tile(2, 0, 1)]
    assert sum(isinstance(t, Bundle) for t in tiles) == 274
    assert log.roots[70_000] == mth(log.d(70_000))
    index = 12_345
    assert inclusion(log, index, 70_000) == path(index, log.d(70_000))
    assert consistency(log, 65_536, 70_000) == proof(65_536, log.d(70_000))
    assert edge_tiles(256) == [Tile(1, 0, 1)]  # "a tree of size 256 ...: a partial level 1 tile of width 1"


def test_tile_paths_are_tlog_tiles_paths() -> None:
    assert tlog.encode_index(1_234_067) == "x001/x234/067"
    assert tlog.encode_index(0) == "000"
    assert tlog.encode_index(1000) == "x001/000"
    assert Tile(0, 1_234_067, 256).path == "tile/0/x001/x234/067"
    assert Tile(2, 5, 17).path == "tile/2/005.p/17"
    assert Bundle(7, 3).path == "tile/entries/007.p/3"
    for t in (Tile(0, 1_234_067, 256), Tile(63, 0, 1), Bundle(999_999, 255)):
        assert tlog.parse_tile_path(t.path) == t
    for bad in (
        "tile/0/1",
        "tile/0/001.p/256",
        "tile/0/001.p/0",
        "tile/64/000",
        "tile/0/x001",
        "tile/01/000",
    ):
        assert tlog.parse_tile_path(bad) is None, bad


@given(st.integers(0, 2**40))
def test_tile_indexes_read_back(n: int) -> None:
    assert tlog.decode_index(tlog.encode_index(n)) == n


def test_a_checkpoint_reads_back_and_malformed_ones_do_not() -> None:
    cp = tlog.Checkpoint("example.com/log", 7, b"\x01" * 32)
    assert cp.text() == b"example.com/log\n7\nAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n"
    assert tlog.parse_checkpoint(cp.text()) == cp
    assert tlog.parse_checkpoint(cp.text() + b"an extension\n") == cp
    for bad in (
        b"example.com/log\n7\n",
        b"example.com/log\n07\nAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n",
        b"example.com/log\n-1\nAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n",
        b"example.com/log\n7\nAQEB\n",
        b"example.com/log\n7\nAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
        b"\n7\nAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n",
    ):
        with pytest.raises(LogFormatError):
            tlog.parse_checkpoint(bad)


def test_an_entry_names_one_release_canonically() -> None:
    entry = tlog.release_entry("web-1", 3, "a" * 64)
    assert tlog.parse_entry(entry) == tlog.Entry("web-1", 3, "a" * 64)
    for bad in (
        entry.replace(b'"version":3', b'"version":03'),
        entry.replace(b",", b", "),
        b'{"schema":"other"}',
        b"not json",
    ):
        with pytest.raises(LogFormatError):
            tlog.parse_entry(bad)
    with pytest.raises(ValueError):
        tlog.release_entry("Web 1", 3, "a" * 64)


def test_an_inclusion_file_reads_back_and_proves_its_entry() -> None:
    log = build([5])
    ranges = inclusion_ranges(3, 5)
    hashes = read_tiles(log.read, 5, log.roots[5], nodes_of(ranges))
    inc = tlog.Inclusion("example.com/log", 3, 5, tuple(proof_hashes(ranges, hashes)))
    back = tlog.parse_inclusion(inc.to_json(), "x")
    assert back == inc
    assert back.root(log.entries[3]) == log.roots[5]
    assert back.root(log.entries[2]) != log.roots[5]
    for bad in (b"{}", inc.to_json().replace(b'"index": 3', b'"index": 5'), b"[1]"):
        with pytest.raises(LogFormatError):
            tlog.parse_inclusion(bad, "x")


def test_subtrees_fold_to_the_hash_of_any_right_edge_range() -> None:
    d = tuple(entries(0, 300))
    for lo, hi in ((0, 300), (256, 300), (128, 300), (0, 1), (296, 300)):
        nodes = tlog.subtrees(lo, hi)
        assert [n.end - n.start for n in nodes] == sorted((n.end - n.start for n in nodes), reverse=True)
        assert tlog.fold([mth(d[n.start : n.end]) for n in nodes]) == mth(d[lo:hi])
    assert tlog.subtrees(0, 6) == [Node(2, 0), Node(1, 2)]


def reader(files: dict[str, bytes]) -> Callable[[str], bytes | None]:
    return files.get


def test_a_missing_partial_tile_is_read_from_the_full_one() -> None:
    """tlog-tiles lets a log delete a partial tile once the full one exists."""
    log = build([100, 200])
    for p in [p for p in log.files if ".p/" in p and p.startswith("tile/0/000")]:
        del log.files[p]
    assert consistency(log, 100, 300) == proof(100, log.d(300))
    with pytest.raises(LogFormatError):
        read_tiles(reader({}), 300, log.roots[300], [Node(0, 5)])
