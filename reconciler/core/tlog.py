"""The transparency log of releases: RFC 6962 Merkle hashing, inclusion and consistency
proofs, C2SP tiles (c2sp.org/tlog-tiles) and checkpoints (c2sp.org/tlog-checkpoint).
Pure.

Every release the daemon publishes is one entry (:func:`release_entry`): the host,
the version and the sha256 of ``hosts/<h>/releases/<N>.json``'s bytes. The tree is
RFC 6962's (RFC 9162 §2.1): a leaf hashes ``0x00 || entry``, a node ``0x01 || left ||
right``, with SHA-256. It is stored as tiles: the hashes of level 0 (the leaves),
8, 16 ... in runs of 256 (``tile/<L>/<N>``, a partial tile of the right edge
``tile/<L>/<N>.p/<W>``) and the entries in bundles of 256 (``tile/entries/<N>``), all
append-only: a tile is written once for a given width, so a reader fetches only the
few tiles a proof needs, and caches them for good.

Proof hashes are computed from tiles; before any tile hash is used it is
*authenticated* against a signed root (:func:`authenticate`): a full tile's own
hash is in the tile one level up, and the root is computed from the tree's partial
tiles, so one rewritten hash anywhere in the tiles used fails the check.

:func:`inclusion_root` and :func:`verify_consistency` are RFC 9162's verification
algorithms (§2.1.3.2, §2.1.4.2), written apart from the code that makes the proofs
(:func:`inclusion_ranges`, :func:`consistency_ranges`, RFC 9162's PATH and SUBPROOF)
so that one cannot hide the other's mistake.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reconciler.core.hosts import NAME_RE
from reconciler.errors import VerificationError

HASH_SIZE = 32
TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
# An entry is prefixed with a big-endian uint16 length in its bundle.
MAX_ENTRY = 0xFFFF
EMPTY_ROOT = hashlib.sha256(b"").digest()
ENTRY_SCHEMA = "reconciler.tlog-entry/v1"
INCLUSION_SCHEMA = "reconciler.tlog-inclusion/v1"
# Far more than any log of releases reaches; bounds what a reader parses.
MAX_SIZE = 1 << 48
MAX_PROOF = 64
# The most bytes a reader takes of each file of a log (a hostile store's larger one
# is refused unread): an inclusion file is a few dozen hashes, a tile 256 hashes, an
# entry bundle 256 length-prefixed entries.
INCLUSION_LIMIT = 16 * 1024
TILE_LIMIT = TILE_WIDTH * HASH_SIZE
BUNDLE_LIMIT = TILE_WIDTH * (MAX_ENTRY + 2)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_INDEX = re.compile(r"^(?:x[0-9]{3}/)*[0-9]{3}$")


class LogFormatError(VerificationError):
    """A tile, bundle, checkpoint or proof that is not what the format says."""


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


@dataclass(frozen=True, order=True)
class Node:
    """The complete subtree of ``2**level`` leaves starting at leaf ``index << level``."""

    level: int
    index: int

    @property
    def start(self) -> int:
        return self.index << self.level

    @property
    def end(self) -> int:
        return (self.index + 1) << self.level


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2): where RFC 6962 splits."""
    return 1 << ((n - 1).bit_length() - 1)


def subtrees(start: int, end: int) -> list[Node]:
    """The complete subtrees covering leaves ``[start, end)``, left to right, each as
    large as its alignment allows. For a range RFC 6962's recursion meets (a subtree of
    the tree, its right edge maybe cut), :func:`fold` of their hashes is its hash."""
    out = []
    while start < end:
        level = (end - start).bit_length() - 1
        if start:
            level = min(level, (start & -start).bit_length() - 1)
        out.append(Node(level, start >> level))
        start += 1 << level
    return out


def fold(hashes: Sequence[bytes]) -> bytes:
    """The hash of a range from its :func:`subtrees`' hashes (right to left: the
    smaller subtrees sit in the right branch of each split)."""
    if not hashes:
        return EMPTY_ROOT
    h = hashes[-1]
    for left in reversed(hashes[:-1]):
        h = node_hash(left, h)
    return h


def merkle_root(hashes: Sequence[bytes]) -> bytes:
    """The hash of a complete subtree from its ``2**k`` hashes one level down (or any
    number of hashes, RFC 6962's way)."""
    level = list(hashes)
    if not level:
        return EMPTY_ROOT
    while len(level) > 1:
        if len(level) & (len(level) - 1):
            return fold([merkle_root(level[n.start : n.end]) for n in subtrees(0, len(level))])
        level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


# -- proofs: which ranges ---------------------------------------------------------


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """RFC 9162's PATH(index, D[0:size]): the leaf ranges whose hashes prove leaf
    ``index``, bottom up."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size}")
    out = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
    return out[::-1]


def consistency_ranges(old: int, new: int) -> list[tuple[int, int]]:
    """RFC 9162's PROOF(old, D[0:new]) (SUBPROOF with b true): the leaf ranges whose
    hashes prove that the tree of ``old`` leaves is a prefix of the one of ``new``."""
    if not 0 <= old <= new:
        raise ValueError(f"no consistency proof from {old} to {new}")
    if old in (0, new):
        return []
    out = []
    lo, hi, m, whole = 0, new, old, True
    while True:
        if m == hi - lo:
            if not whole:
                out.append((lo, hi))
            break
        k = _split(hi - lo)
        if m <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
            m -= k
            whole = False
    return out[::-1]


def nodes_of(ranges: Iterable[tuple[int, int]]) -> list[Node]:
    return [n for a, b in ranges for n in subtrees(a, b)]


def proof_hashes(ranges: Sequence[tuple[int, int]], hashes: Mapping[Node, bytes]) -> list[bytes]:
    return [fold([hashes[n] for n in subtrees(a, b)]) for a, b in ranges]


# -- proofs: verification (RFC 9162) ------------------------------------------------


def inclusion_root(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes | None:
    """The root that ``proof`` proves leaf hash ``leaf`` at ``index`` to be in, for a
    tree of ``size`` (RFC 9162 §2.1.3.2); None if the proof does not fit the tree."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    return inclusion_root(index, size, leaf, proof) == root


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """Whether ``proof`` shows the tree (``old``, ``old_root``) to be a prefix of
    (``new``, ``new_root``) (RFC 9162 §2.1.4.2; equal sizes need equal roots and no
    proof, and the empty tree is a prefix of every tree)."""
    if not 0 <= old <= new:
        return False
    if old == new:
        return not proof and old_root == new_root
    if old == 0:
        return not proof and old_root == EMPTY_ROOT
    path = list(proof)
    if not path:
        return False
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0


# -- tiles ------------------------------------------------------------------------


def encode_index(n: int) -> str:
    """A tile index as tlog-tiles' path elements: 1234067 -> ``x001/x234/067``."""
    if n < 0:
        raise ValueError("a tile index is not negative")
    parts = [f"{n % 1000:03d}"]
    n //= 1000
    while n:
        parts.append(f"x{n % 1000:03d}")
        n //= 1000
    return "/".join(reversed(parts))


def decode_index(s: str) -> int | None:
    if not _INDEX.fullmatch(s):
        return None
    return int("".join(p.lstrip("x") for p in s.split("/")))


def _suffix(width: int) -> str:
    return "" if width == TILE_WIDTH else f".p/{width}"


@dataclass(frozen=True, order=True)
class Tile:
    """Tile ``index`` of level ``level``: the hashes of tree level ``8 * level``, from
    ``index * 256``, ``width`` of them (256 for a full tile)."""

    level: int
    index: int
    width: int

    @property
    def path(self) -> str:
        return f"tile/{self.level}/{encode_index(self.index)}{_suffix(self.width)}"

    @property
    def full(self) -> Tile:
        return Tile(self.level, self.index, TILE_WIDTH)


@dataclass(frozen=True, order=True)
class Bundle:
    """Entry bundle ``index``: entries ``index * 256`` on, ``width`` of them."""

    index: int
    width: int

    @property
    def path(self) -> str:
        return f"tile/entries/{encode_index(self.index)}{_suffix(self.width)}"


_TILE_PATH = re.compile(r"^tile/(entries|0|[1-9][0-9]?)/((?:x[0-9]{3}/)*[0-9]{3})(?:\.p/([1-9][0-9]{0,2}))?$")


def parse_tile_path(path: str) -> Tile | Bundle | None:
    """What a path under the log's prefix is, or None."""
    m = _TILE_PATH.fullmatch(path)
    if not m:
        return None
    index = decode_index(m.group(2))
    width = int(m.group(3)) if m.group(3) else TILE_WIDTH
    if index is None or width > TILE_WIDTH or (m.group(3) and width == TILE_WIDTH):
        return None
    if m.group(1) == "entries":
        return Bundle(index, width)
    level = int(m.group(1))
    return Tile(level, index, width) if level < 64 else None


def tile_of(node: Node, size: int) -> tuple[Tile, int]:
    """The tile of a tree of ``size`` holding what ``node``'s hash is computed from,
    and where in it (the first of its ``2 ** (node.level % 8)`` hashes)."""
    if node.end > size:
        raise ValueError(f"{node} is not a complete subtree of a tree of {size}")
    level, rest = divmod(node.level, TILE_HEIGHT)
    first = node.index << rest
    index = first >> TILE_HEIGHT
    width = min(TILE_WIDTH, (size >> (TILE_HEIGHT * level)) - (index << TILE_HEIGHT))
    return Tile(level, index, width), first - (index << TILE_HEIGHT)


def edge_tiles(size: int) -> list[Tile]:
    """The partial tiles of a tree of ``size``, one per level at most (tlog-tiles:
    ``floor(size / 256**l) mod 256`` hashes wide); the root is computed from them."""
    out = []
    level = 0
    while count := size >> (TILE_HEIGHT * level):
        if width := count % TILE_WIDTH:
            out.append(Tile(level, count >> TILE_HEIGHT, width))
        level += 1
    return out


def parent_of(tile: Tile, size: int) -> tuple[Tile, int]:
    """Where a full tile's own hash is: in a tile one level up."""
    if tile.width != TILE_WIDTH:
        raise ValueError(f"{tile} is partial: its hashes are authenticated by the root")
    return tile_of(Node(TILE_HEIGHT * (tile.level + 1), tile.index), size)


def tile_hashes(tile: Tile, data: bytes) -> list[bytes]:
    """The hashes of ``tile`` from its bytes; a full tile's first hashes stand in for
    a partial one that is gone (tlog-tiles lets a log delete those)."""
    if len(data) == TILE_WIDTH * HASH_SIZE and tile.width < TILE_WIDTH:
        data = data[: tile.width * HASH_SIZE]
    if len(data) != tile.width * HASH_SIZE:
        raise LogFormatError(f"{tile.path}: {len(data)} bytes, not {tile.width} hashes")
    return [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


def needed_tiles(nodes: Iterable[Node], size: int) -> set[Tile]:
    """The tiles the hashes of ``nodes`` are read from, with those that authenticate
    them: every partial tile (the root is computed from them) and, for each full
    tile, the tile holding its hash one level up, up to a partial one."""
    out = set(edge_tiles(size))
    todo = [tile_of(n, size)[0] for n in nodes]
    while todo:
        tile = todo.pop()
        if tile in out:
            continue
        out.add(tile)
        if tile.width == TILE_WIDTH:
            todo.append(parent_of(tile, size)[0])
    return out


def node_hashes(nodes: Iterable[Node], size: int, tiles: Mapping[Tile, bytes]) -> dict[Node, bytes]:
    """The hashes of ``nodes`` of a tree of ``size``, from ``tiles``."""
    out = {}
    for n in nodes:
        tile, first = tile_of(n, size)
        hashes = tile_hashes(tile, tiles[tile])
        out[n] = merkle_root(hashes[first : first + (1 << (n.level % TILE_HEIGHT))])
    return out


def root_of(size: int, tiles: Mapping[Tile, bytes]) -> bytes:
    """The root of a tree of ``size`` from its :func:`edge_tiles`."""
    nodes = subtrees(0, size)
    hashes = node_hashes(nodes, size, tiles)
    return fold([hashes[n] for n in nodes])


def authenticate(size: int, root: bytes, tiles: Mapping[Tile, bytes]) -> None:
    """Check that ``tiles`` (with everything :func:`needed_tiles` names for them) are
    those of the tree of ``size`` whose root is ``root``; LogFormatError if not."""
    try:
        for tile, data in sorted(tiles.items()):
            hashes = tile_hashes(tile, data)
            if tile.width == TILE_WIDTH:
                parent, at = parent_of(tile, size)
                if tile_hashes(parent, tiles[parent])[at] != merkle_root(hashes):
                    raise LogFormatError(f"{tile.path} does not hash to its entry in {parent.path}")
        if root_of(size, tiles) != root:
            raise LogFormatError(f"the partial tiles of the tree of {size} do not hash to its root")
    except (KeyError, ValueError) as exc:
        raise LogFormatError(f"tiles missing to authenticate a tree of {size}: {exc}") from None


def read_tiles(
    read: Callable[[str], bytes | None], size: int, root: bytes, nodes: Iterable[Node]
) -> dict[Node, bytes]:
    """The hashes of ``nodes`` of the tree (``size``, ``root``), from tiles got with
    ``read`` (a path under the log's prefix -> its bytes, None if missing) and
    authenticated first. A partial tile that is missing is read from the full one."""
    wanted = list(nodes)
    tiles: dict[Tile, bytes] = {}
    for tile in sorted(needed_tiles(wanted, size)):
        data = read(tile.path)
        if data is None and tile.width < TILE_WIDTH:
            data = read(tile.full.path)
        if data is None:
            raise LogFormatError(f"{tile.path} is missing")
        tiles[tile] = data
    authenticate(size, root, tiles)
    return node_hashes(wanted, size, tiles)


def consistent(read: Callable[[str], bytes | None], old: tuple[int, bytes], new: tuple[int, bytes]) -> bool:
    """Whether the tree ``old`` (size, root) is a prefix of ``new``, proved from
    ``new``'s tiles (LogFormatError when those do not hash to ``new``'s root)."""
    (m, old_root), (n, new_root) = old, new
    if m > n:
        return False
    ranges = consistency_ranges(m, n)
    hashes = read_tiles(read, n, new_root, nodes_of(ranges)) if ranges else {}
    return verify_consistency(m, n, old_root, new_root, proof_hashes(ranges, hashes))


# -- appending --------------------------------------------------------------------


def encode_bundle(entries: Sequence[bytes]) -> bytes:
    out = bytearray()
    for e in entries:
        if len(e) > MAX_ENTRY:
            raise ValueError(f"an entry of {len(e)} bytes does not fit a bundle")
        out += len(e).to_bytes(2, "big") + e
    return bytes(out)


def decode_bundle(bundle: Bundle, data: bytes) -> list[bytes]:
    entries: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise LogFormatError(f"{bundle.path}: truncated at byte {pos}")
        n = int.from_bytes(data[pos : pos + 2], "big")
        if pos + 2 + n > len(data):
            raise LogFormatError(f"{bundle.path}: entry {len(entries)} is truncated")
        entries.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    if len(entries) != bundle.width:
        if bundle.width < TILE_WIDTH and len(entries) == TILE_WIDTH:
            return entries[: bundle.width]
        raise LogFormatError(f"{bundle.path}: {len(entries)} entries, not {bundle.width}")
    return entries


def edge_bundle(size: int) -> Bundle | None:
    width = size % TILE_WIDTH
    return Bundle(size >> TILE_HEIGHT, width) if width else None


@dataclass(frozen=True)
class Edge:
    """The right edge of a tree: what appending to it needs. Per tile level, the
    hashes of its partial tile (none when that level has no partial tile), and the
    entries of its partial bundle."""

    size: int
    hashes: tuple[tuple[bytes, ...], ...] = ()
    entries: tuple[bytes, ...] = ()

    def tiles(self) -> dict[Tile, bytes]:
        return {t: b"".join(self.hashes[t.level]) for t in edge_tiles(self.size)}

    def root(self) -> bytes:
        return root_of(self.size, self.tiles())


def edge_from(size: int, tiles: Mapping[Tile, bytes], bundle: bytes | None) -> Edge:
    """The edge of a tree of ``size`` from its :func:`edge_tiles` and the bytes of its
    :func:`edge_bundle` (None when it has none)."""
    levels: list[tuple[bytes, ...]] = []
    for tile in edge_tiles(size):
        while len(levels) < tile.level:
            levels.append(())
        levels.append(tuple(tile_hashes(tile, tiles[tile])))
    partial = edge_bundle(size)
    entries: tuple[bytes, ...] = ()
    if partial is not None:
        if bundle is None:
            raise LogFormatError(f"{partial.path} is missing")
        entries = tuple(decode_bundle(partial, bundle))
        if tuple(leaf_hash(e) for e in entries) != levels[0]:
            raise LogFormatError(f"{partial.path} does not hash to the leaves of its tile")
    return Edge(size, tuple(levels), entries)


def append(edge: Edge, entries: Sequence[bytes]) -> tuple[Edge, dict[Tile | Bundle, bytes]]:
    """``entries`` appended to the tree ``edge`` ends: the new edge, and every tile and
    bundle to write (new ones only: a tile is never rewritten at a width a published
    checkpoint needs)."""
    size = edge.size + len(entries)
    if size > MAX_SIZE:
        raise ValueError("the log is full")
    writes: dict[Tile | Bundle, bytes] = {}
    first = edge.size >> TILE_HEIGHT << TILE_HEIGHT
    pending = [*edge.entries, *entries]
    for i in range(0, len(pending), TILE_WIDTH):
        chunk = pending[i : i + TILE_WIDTH]
        writes[Bundle((first + i) >> TILE_HEIGHT, len(chunk))] = encode_bundle(chunk)
    new_entries = tuple(pending[len(pending) // TILE_WIDTH * TILE_WIDTH :])
    levels = list(edge.hashes)
    fresh = [leaf_hash(e) for e in entries]
    level = 0
    while fresh:
        while len(levels) <= level:
            levels.append(())
        count = edge.size >> (TILE_HEIGHT * level)  # complete hashes on this level before
        start = count >> TILE_HEIGHT << TILE_HEIGHT
        run = [*levels[level], *fresh]
        up = []
        for i in range(0, len(run), TILE_WIDTH):
            chunk = run[i : i + TILE_WIDTH]
            writes[Tile(level, (start + i) >> TILE_HEIGHT, len(chunk))] = b"".join(chunk)
            if len(chunk) == TILE_WIDTH:
                up.append(merkle_root(chunk))
        levels[level] = tuple(run[len(run) // TILE_WIDTH * TILE_WIDTH :])
        fresh = up
        level += 1
    while levels and not levels[-1]:
        levels.pop()
    return Edge(size, tuple(levels), new_entries), writes


# -- entries, checkpoints, inclusion files ----------------------------------------


def release_entry(host: str, version: int, sha256: str) -> bytes:
    """The log entry of release ``version`` of ``host`` whose file has ``sha256``."""
    if not NAME_RE.fullmatch(host) or version < 1 or not _HEX64.fullmatch(sha256):
        raise ValueError(f"no log entry for {host!r} version {version} sha256 {sha256!r}")
    doc = {"schema": ENTRY_SCHEMA, "host": host, "version": version, "sha256": sha256}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Entry:
    host: str
    version: int
    sha256: str


def parse_entry(data: bytes) -> Entry:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise LogFormatError("a log entry is not JSON") from None
    if not isinstance(doc, dict) or doc.get("schema") != ENTRY_SCHEMA:
        raise LogFormatError(f"a log entry is not a {ENTRY_SCHEMA}")
    host, version, sha = doc.get("host"), doc.get("version"), doc.get("sha256")
    if not isinstance(host, str) or not isinstance(version, int) or not isinstance(sha, str):
        raise LogFormatError("a log entry lacks host, version or sha256")
    try:
        canonical = release_entry(host, version, sha)
    except ValueError as exc:
        raise LogFormatError(str(exc)) from None
    if canonical != data:
        raise LogFormatError(f"the log entry of {host} version {version} is not in canonical form")
    return Entry(host, version, sha)


@dataclass(frozen=True)
class Checkpoint:
    """A tree head (c2sp.org/tlog-checkpoint): the note text a signed note signs."""

    origin: str
    size: int
    root: bytes

    def text(self) -> bytes:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n".encode()


def parse_checkpoint(text: bytes) -> Checkpoint:
    try:
        lines = text.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise LogFormatError("a checkpoint is not UTF-8") from None
    if len(lines) < 4 or lines[-1] != "" or any(not ln for ln in lines[:-1]):
        raise LogFormatError("a checkpoint is three or more non-empty lines, each ending in a newline")
    origin, size, root = lines[0], lines[1], lines[2]
    if not re.fullmatch(r"0|[1-9][0-9]{0,19}", size) or int(size) > MAX_SIZE:
        raise LogFormatError(f"checkpoint of {origin!r}: tree size {size!r} is not a number")
    try:
        digest = base64.b64decode(root, validate=True)
    # binascii.Error, or a plain ValueError for a character outside ASCII.
    except ValueError:
        digest = b""
    if len(digest) != HASH_SIZE or base64.b64encode(digest).decode() != root:
        raise LogFormatError(f"checkpoint of {origin!r}: the root hash is not 32 bytes of base64")
    return Checkpoint(origin, int(size), digest)


@dataclass(frozen=True)
class Inclusion:
    """``hosts/<h>/releases/<N>.inclusion.json``: where a release's entry is in the log
    and the proof of it in the tree the append made (which the log's checkpoint then
    extends: a reader proves the rest by consistency)."""

    origin: str
    index: int
    size: int
    proof: tuple[bytes, ...]

    def to_json(self) -> bytes:
        doc = {
            "schema": INCLUSION_SCHEMA,
            "origin": self.origin,
            "index": self.index,
            "size": self.size,
            "proof": [base64.b64encode(h).decode() for h in self.proof],
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    def root(self, entry: bytes) -> bytes | None:
        """The root of the tree of ``size`` if ``entry`` is at ``index``, else None."""
        return inclusion_root(self.index, self.size, leaf_hash(entry), self.proof)


def parse_inclusion(data: bytes, source: str) -> Inclusion:
    try:
        doc: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise LogFormatError(f"{source}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("schema") != INCLUSION_SCHEMA:
        raise LogFormatError(f"{source}: not a {INCLUSION_SCHEMA}")
    origin, index, size, proof = doc.get("origin"), doc.get("index"), doc.get("size"), doc.get("proof")
    numbers = (index, size)
    if not isinstance(origin, str) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in numbers
    ):
        raise LogFormatError(f"{source}: needs origin, index and size")
    assert isinstance(index, int) and isinstance(size, int)
    if not 0 <= index < size <= MAX_SIZE:
        raise LogFormatError(f"{source}: index {index} is not in a tree of {size}")
    if not isinstance(proof, list) or len(proof) > MAX_PROOF:
        raise LogFormatError(f"{source}: proof must be a list of at most {MAX_PROOF} hashes")
    hashes = []
    for h in proof:
        try:
            raw = base64.b64decode(h, validate=True) if isinstance(h, str) else b""
        # binascii.Error, or a plain ValueError for a character outside ASCII.
        except ValueError:
            raw = b""
        if len(raw) != HASH_SIZE:
            raise LogFormatError(f"{source}: a proof hash is not 32 bytes of base64")
        hashes.append(raw)
    return Inclusion(origin, index, size, tuple(hashes))
