"""The one reader of YAML and the checks every file shares: host, profile, daemon and
agent config files. Pure: text in, data or a ConfigError naming file, key and why out.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from datetime import timedelta
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, Event, ScalarEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from reconciler.errors import ConfigError

MAX_FILE_BYTES = 1 << 20
# A definition is about five levels deep (services.web.exec[0]). libyaml composes nodes
# by recursing in C once per level, where some ten thousand levels overflow the stack
# and kill the daemon (SIGSEGV, no exception to catch); deep_merge and JSON for Nix
# recurse too. Checked on the parser's event stream, aliases counted as the nodes they
# stand for, before anything recursive runs.
MAX_DEPTH = 64
# Nodes and scalar characters a document may hold once every alias is counted as what
# it stands for. A MAX_FILE_BYTES document written out without aliases stays within
# both (a node takes about a byte of text or more, a scalar's value is no longer than
# its text), so aliases ("billion laughs") cannot make a file cost more in deep_merge,
# validation and the JSON handed to Nix than the largest file read_tree accepts.
MAX_NODES = MAX_FILE_BYTES
MAX_SCALAR_CHARS = MAX_FILE_BYTES
DURATION_RE = re.compile(r"^([0-9]+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SIZE_RE = re.compile(r"^([0-9]+)\s*([KMGT]?)i?B?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class _RefusedError(Exception):
    """A document the loaders would accept but we do not; parse_yaml names the file."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeys(yaml.constructor.SafeConstructor):
    """Refuses a mapping that states a key twice.

    PyYAML keeps the last value silently, so the file would mean something other than
    what a reader who stopped at the first one sees. Keys that a merge (``<<``) brings
    in may still be overridden: that is what merging is for.
    """

    _root: Node | None = None
    _checked: set[int]

    def construct_document(self, node: Node) -> Any:
        self._root, self._checked = node, set()
        return super().construct_document(node)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        self._check_unique(node)
        return super().construct_mapping(node, deep=deep)

    def _check_unique(self, node: MappingNode) -> None:
        # Once per node and before flatten_mapping rewrites it: a merge source, once
        # flattened, holds the merged keys beside its own.
        if id(node) in self._checked:
            return
        self._checked.add(id(node))
        seen: dict[Any, Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for src in sources:
                    if isinstance(src, MappingNode):
                        self._check_unique(src)
                continue
            key = self.construct_object(key_node)
            if not isinstance(key, Hashable):
                continue  # SafeConstructor refuses it, with its position
            first = seen.setdefault(key, key_node)
            if first is not key_node:
                raise _RefusedError(
                    _key_path(self._root, node, key),
                    f"duplicate key at {_position(key_node)} (first at {_position(first)}): "
                    "ambiguous, YAML would silently keep only the last",
                )


# Integers a definition may state: beyond, one is a mistake or an attack (a binary
# literal of 20,000 digits loads, and then cannot even be shown as decimal).
MAX_INT = (1 << 63) - 1


# An integer as anyone reads it. YAML 1.1 (PyYAML's) also reads 0755 as octal (493),
# 1:30 as base 60 (90), 0x1f, 0b101 and 1_000: what a service's exec then runs with is
# not what its author wrote, and YAML 1.2 reads them otherwise again.
_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")


def _construct_int(loader: _UniqueKeys, node: Node) -> int:
    value: int = yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)  # type: ignore[arg-type]
    if not -MAX_INT - 1 <= value <= MAX_INT:
        raise _RefusedError("", f"an integer beyond 64 bits at {_position(node)}")
    text = str(node.value)
    if not _DECIMAL.fullmatch(text):
        raise _RefusedError(
            "",
            f"{text!r} at {_position(node)} is read by YAML 1.1 as the number {value}: "
            f"quote it ('{text}') for the text, or write the number in decimal",
        )
    return value


# (PyYAML's stubs take only its own loader classes here.)
_UniqueKeys.add_constructor("tag:yaml.org,2002:int", _construct_int)  # type: ignore[type-var]


class _PyLoader(_UniqueKeys, yaml.SafeLoader):
    """Pure Python: slower, but says more precisely where and why a document is invalid."""


# libyaml's loader when PyYAML was built with it: parsing dominates planning a large fleet.
_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = _PyLoader
if getattr(yaml, "__with_libyaml__", False):

    class _CLoader(_UniqueKeys, yaml.CSafeLoader):
        pass

    _LOADER = _CLoader


def _position(item: Node | Event) -> str:
    mark = item.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown position"


def _key_path(root: Node | None, target: MappingNode, key: object) -> str:
    """The dotted path of ``key`` in ``target``, found from the document root.

    Only on error, so a walk of the whole document is cheap enough.
    """
    todo: list[tuple[Node, str]] = [(root, "")] if root is not None else []
    visited: set[int] = set()
    while todo:
        node, prefix = todo.pop()
        if node is target:
            return f"{prefix}.{key}" if prefix else str(key)
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, MappingNode):
            for k, v in node.value:
                seg = str(k.value) if isinstance(k.value, str) else "?"
                todo.append((v, f"{prefix}.{seg}" if prefix else seg))
        elif isinstance(node, SequenceNode):
            todo.extend((v, f"{prefix}[{i}]") for i, v in enumerate(node.value))
    return str(key)


def _check_limits(text: str, loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader]) -> bool:
    """Refuse a document too deep or too large before a loader builds it; whether it
    is a plain tree (no anchor, no alias).

    Walks the parser's event stream (both parsers are iterative, only composing nodes
    recurses) and stops at the first limit broken, so a hostile document costs no more
    than the text up to that point. An alias counts as the whole node it names:
    its nodes, its scalar characters and its height below the alias.
    """
    plain = True
    # Per open collection: its anchor, and nodes and characters before it began.
    open_: list[tuple[str | None, int, int]] = []
    # Per open collection: the height of its tallest child so far.
    heights: list[int] = []
    # Per anchor: (nodes, characters, height); None while the anchored node is open.
    anchors: dict[str, tuple[int, int, int] | None] = {}
    nodes = chars = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, ScalarEvent):
            n, c, h = 1, len(event.value), 0
            if event.anchor is not None:
                anchors[event.anchor] = (n, c, h)
                plain = False
        elif isinstance(event, AliasEvent):
            plain = False
            if event.anchor not in anchors:
                continue  # the composer reports the undefined alias
            size = anchors[event.anchor]
            if size is None:
                raise _RefusedError(
                    "", f"alias *{event.anchor} at {_position(event)} refers to a node containing it"
                )
            n, c, h = size
            if len(open_) + h > MAX_DEPTH:
                raise _RefusedError(
                    "", f"nested deeper than {MAX_DEPTH} levels (alias *{event.anchor} at {_position(event)})"
                )
        elif isinstance(event, CollectionStartEvent):
            if len(open_) >= MAX_DEPTH:
                raise _RefusedError("", f"nested deeper than {MAX_DEPTH} levels at {_position(event)}")
            open_.append((event.anchor, nodes, chars))
            heights.append(0)
            if event.anchor is not None:
                anchors[event.anchor] = None
                plain = False
            nodes += 1
            _check_size(nodes, chars, event)
            continue
        elif isinstance(event, CollectionEndEvent):
            anchor, nodes_before, chars_before = open_.pop()
            h = heights.pop() + 1
            if anchor is not None:
                anchors[anchor] = (nodes - nodes_before, chars - chars_before, h)
            if heights:
                heights[-1] = max(heights[-1], h)
            continue
        else:
            continue
        if heights:
            heights[-1] = max(heights[-1], h)
        nodes += n
        chars += c
        _check_size(nodes, chars, event)
    return plain


def _check_size(nodes: int, chars: int, event: Event) -> None:
    if nodes > MAX_NODES:
        raise _RefusedError(
            "", f"holds more than {MAX_NODES} nodes, aliases expanded (reached at {_position(event)})"
        )
    if chars > MAX_SCALAR_CHARS:
        raise _RefusedError(
            "",
            f"holds more than {MAX_SCALAR_CHARS} characters of scalars, aliases expanded "
            f"(reached at {_position(event)})",
        )


def parse_yaml(path: str, text: str) -> Any:
    """The YAML document ``text`` read from ``path``; errors name the file, line and column.

    Refuses what loading would make costly or ambiguous: more than MAX_FILE_BYTES,
    nesting beyond MAX_DEPTH, more than MAX_NODES or MAX_SCALAR_CHARS once aliases are
    expanded, an alias inside the node it names, a key stated twice in one mapping.
    """
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ConfigError(path, "", f"is larger than {MAX_FILE_BYTES} bytes")
    try:
        try:
            return _load(text, _LOADER)
        except yaml.YAMLError:
            # The Python loader says more precisely where and why; errors are rare.
            return _load(text, _PyLoader)
    except _RefusedError as exc:
        raise ConfigError(path, exc.key, exc.reason) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(path, "", f"invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(path, "", "invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as exc:
        # A scalar of a type YAML resolves but Python cannot hold: a timestamp such as
        # 2024-02-30, an integer of more digits than int() reads.
        raise ConfigError(path, "", f"invalid YAML: a value cannot be read: {exc}") from None


def _load(text: str, loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader]) -> Any:
    if loader is not _PyLoader and _may_skip_limits(text):
        try:
            return _load_tree(text, loader, limits=True)
        except _WalkFirstError:
            pass
    if _check_limits(text, loader) and loader is not _PyLoader:
        return _load_tree(text, loader)
    return yaml.load(text, Loader=loader)


# Characters of which a collection has at least one of its own: "[" or "{" opens a flow
# collection, every block sequence has a "-" entry, every mapping (block, flow or a
# single pair in a flow sequence) a ":" or "?". Their count bounds the nesting depth.
_COLLECTION_MARKS = "[{-?:"
# libyaml's composer recurses in C once per level: to this depth it is far from the
# stack's end (some ten thousand levels overflow it).
_FAST_DEPTH = 1000


def _may_skip_limits(text: str) -> bool:
    """Whether ``text`` can be composed before its limits are checked: it has no
    anchor or alias ("&", "*"), so its nodes are what the text writes out and the
    composed tree shows every limit exactly; and it cannot nest deep enough for
    libyaml's recursion to matter. Most host files are such; the event walk of
    _check_limits, which the others need, was half of what parsing them cost."""
    if "&" in text or "*" in text:
        return False
    return sum(text.count(c) for c in _COLLECTION_MARKS) < _FAST_DEPTH


_STR, _SEQ, _MAP = "tag:yaml.org,2002:str", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"


class _NotPlainError(Exception):
    """A node _load_tree leaves to PyYAML's own constructor."""


class _WalkFirstError(Exception):
    """A document composed before its limits were checked that needs _check_limits
    after all: beyond a limit (it says which, and where), or one _load_tree leaves to
    yaml.load."""


def _load_tree(
    text: str, loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader], limits: bool = False
) -> Any:
    """What yaml.load gives for a document without anchors or aliases, built straight
    from the composed nodes: PyYAML's constructor machinery (recursion bookkeeping,
    generators for deep construction, merge flattening) is what a node graph needs,
    and cost most of the parse of a fleet of small host files. Every scalar that is
    not a plain string is still constructed by PyYAML; a merge key, a tag we do not
    build here or an unhashable key hands the whole document to yaml.load.

    ``limits``: the document was not walked by _check_limits (_may_skip_limits), and
    its limits are counted here instead, as that walk counts them: raises
    _WalkFirstError for one that nests deeper than MAX_DEPTH (before building below
    that depth), holds more than MAX_NODES nodes or MAX_SCALAR_CHARS characters of
    scalars, or is not a plain tree."""
    ldr = loader(text)
    nodes = chars = 0
    try:
        root = ldr.get_single_node()
        if root is None:
            return None

        def build(node: Node, depth: int) -> Any:
            # depth: the collections around ``node``.
            nonlocal nodes, chars
            nodes += 1
            if isinstance(node, ScalarNode):
                chars += len(node.value)
                return node.value if node.tag == _STR else ldr.construct_object(node)
            if limits and depth >= MAX_DEPTH:
                raise _WalkFirstError
            if isinstance(node, SequenceNode) and node.tag == _SEQ:
                return [build(child, depth + 1) for child in node.value]
            if isinstance(node, MappingNode) and node.tag == _MAP:
                out: dict[Any, Any] = {}
                for key_node, value_node in node.value:
                    if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                        raise _NotPlainError
                    key = build(key_node, depth + 1)
                    if key in out:
                        raise _NotPlainError  # refused by _UniqueKeys, with its message
                    out[key] = build(value_node, depth + 1)
                return out
            raise _NotPlainError

        try:
            data = build(root, 0)
        except _NotPlainError:
            if limits:
                raise _WalkFirstError from None
        else:
            if limits and (nodes > MAX_NODES or chars > MAX_SCALAR_CHARS):
                raise _WalkFirstError
            return data
    finally:
        ldr.dispose()
    return yaml.load(text, Loader=loader)


def check_keys(path: str, prefix: str, data: Mapping[Any, Any], allowed: frozenset[str]) -> None:
    """Refuse a key of ``data`` (at dotted ``prefix`` in file ``path``) not in ``allowed``."""
    for k in data:
        if not isinstance(k, str):
            raise ConfigError(path, prefix or "", f"key {k!r} must be a string")
        if k not in allowed:
            key = f"{prefix}.{k}" if prefix else k
            raise ConfigError(path, key, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def kind(v: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "empty"}.get(
        type(v), type(v).__name__
    )


def parse_seconds(path: str, key: str, value: Any) -> float:
    """A number of seconds (fractions allowed) or a duration like 2s."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 < value < float("inf"):
            raise ConfigError(path, key, "must be a positive number of seconds")
        return float(value)
    return parse_duration(path, key, value).total_seconds()


def parse_duration(path: str, key: str, value: Any) -> timedelta:
    m = DURATION_RE.fullmatch(str(value))
    if not m or not m.group(1).strip("0"):
        raise ConfigError(path, key, f"must be a duration like 90s, 15m, 12h or 30d, got {value!r}")
    try:
        return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    except (OverflowError, ValueError):  # ValueError: more digits than int() converts
        raise ConfigError(path, key, f"{value!r} is longer than a duration can be") from None


def parse_size(path: str, key: str, value: Any) -> int:
    """A positive number of bytes, or a size like 512M or 4GiB (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(path, key, "must be a positive number of bytes")
        return value
    m = SIZE_RE.fullmatch(str(value).strip())
    # Past 40 digits no size means anything, and int() refuses thousands of them.
    if not m or not m.group(1).strip("0") or len(m.group(1)) > 40:
        raise ConfigError(path, key, f"must be a size like 512M or 4G, got {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
