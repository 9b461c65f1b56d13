"""YAML text -> plain values, with the exact position of every key and value.

PyYAML's safe loader composes the node tree; :class:`YamlBuilder` then builds plain values
itself so that it can record where each key and value was written, refuse what a manifest
must not hold (duplicate keys, unknown tags, binary or non-finite values, non-string keys),
expand merge keys (``<<``) and aliases, and bound the whole document at
:data:`MAX_YAML_NODES` values so that an alias bomb ("billion laughs") is refused instead of
eating the machine. yaml lives in this module and nowhere else.

    >>> document, locate, problems = parse_yaml("grid:\\n  seeds: [1, 2]\\n", "job.yaml")
    >>> document, locate(("grid", "seeds"), False), problems
    ({'grid': {'seeds': [1, 2]}}, (2, 10), [])
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..errors import ManifestError
from ..models import Diagnostic
from ..schema import Locator, format_path
from .positions import FieldPath, Position, map_locator

__all__ = ["MAX_YAML_NODES", "YamlBuilder", "parse_yaml"]

#: Nodes built from one YAML document, counting every alias expansion: bounds alias bombs.
MAX_YAML_NODES = 1_000_000
_MERGE_TAG = "tag:yaml.org,2002:merge"
_COLLECTION_TAGS = frozenset({"tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"})

_Pair = tuple[Node, Node, bool]  # key node, value node, written here (not merged in by <<)


class _YamlBomb(Exception):
    """The document cannot be built safely (too many values, or an alias inside itself)."""

    def __init__(self, node: Node, message: str) -> None:
        super().__init__(message)
        self.node = node
        self.message = message


class YamlBuilder:
    """Build plain values from a composed node tree, recording every key and value position.

    ``values`` and ``keys`` map field paths to 1-based positions (see
    :func:`~batchflux.manifest.positions.map_locator`); ``diagnostics`` collects the values
    that were refused (they build as None, so that the rest is still checked).
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.values: dict[FieldPath, Position] = {}
        self.keys: dict[FieldPath, Position] = {}
        self.diagnostics: list[Diagnostic] = []
        self.nodes = 0
        self.constructor = yaml.constructor.SafeConstructor()

    def _count(self, node: Node) -> None:
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            raise _YamlBomb(node, f"document expands to more than {MAX_YAML_NODES:,} values "
                            "(alias bomb?); refusing")

    def _diag(self, node: Node, path: FieldPath, message: str) -> None:
        mark = node.start_mark
        self.diagnostics.append(
            Diagnostic(self.file, mark.line + 1, mark.column + 1, format_path(path), message))

    def build(self, node: Node, path: FieldPath, stack: frozenset[int] = frozenset()) -> Any:
        """The plain value of ``node`` (found at ``path``); ``stack`` holds the collections
        being built around it, to refuse an alias that contains itself."""
        self._count(node)
        self.values.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if id(node) in stack:
            raise _YamlBomb(node, "recursive alias; refusing")
        inner = stack | {id(node)}
        if node.tag not in _COLLECTION_TAGS:
            self._diag(node, path, f"unsupported YAML tag {node.tag!r}")
        if isinstance(node, SequenceNode):
            return [self.build(child, path + (i,), inner) for i, child in enumerate(node.value)]
        assert isinstance(node, MappingNode)
        return self._mapping(node, path, inner)

    def _mapping(self, node: MappingNode, path: FieldPath,
                 inner: frozenset[int]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node, explicit in self._pairs(node, path, inner):
            if not isinstance(key_node, ScalarNode):
                self._diag(key_node, path, "mapping keys must be plain strings")
                continue
            key = key_node.value
            if key in result:
                if explicit:
                    first = self.keys.get(path + (key,), (0, 0))
                    self._diag(key_node, path + (key,),
                               f"duplicate key {key!r} (first at line {first[0]})")
                continue
            self.keys[path + (key,)] = (key_node.start_mark.line + 1,
                                        key_node.start_mark.column + 1)
            result[key] = self.build(value_node, path + (key,), inner)
        return result

    def _pairs(self, node: MappingNode, path: FieldPath,
               stack: frozenset[int]) -> list[_Pair]:
        """The mapping's own pairs, then those merged in by ``<<`` (which never override)."""
        explicit: list[_Pair] = []
        merged: list[_Pair] = []
        for key_node, value_node in node.value:
            self._count(key_node)
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, MappingNode):
                        self._diag(source, path, "a merge key (<<) needs a mapping")
                        continue
                    if id(source) in stack:
                        raise _YamlBomb(source, "recursive alias; refusing")
                    merged.extend((k, v, False)
                                  for k, v, _ in self._pairs(source, path, stack | {id(source)}))
            else:
                explicit.append((key_node, value_node, True))
        return explicit + merged

    def _scalar(self, node: ScalarNode, path: FieldPath) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            self._diag(node, path, f"unsupported YAML value: {problem}")
            return None
        if isinstance(value, (_dt.date, _dt.datetime)):
            return value.isoformat()
        if isinstance(value, bytes):
            self._diag(node, path, "binary values are not supported")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self._diag(node, path, "must be a finite number")
            return None
        return value


def _fatal(display: str, line: int, col: int, message: str) -> ManifestError:
    return ManifestError([Diagnostic(display, line, col, "", message)])


def _compose(text: str, display: str) -> Node:
    """The node tree of the one document in ``text``, or a ManifestError at the syntax error."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem:
            problem = f"{problem} ({exc.context})"
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise _fatal(display, line, col, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise _fatal(display, 1, 1, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise _fatal(display, 1, 1, "invalid YAML: nested too deeply") from None
    if root is None:
        raise _fatal(display, 0, 0, "file holds no YAML document")
    node: Node = root
    return node


def parse_yaml(text: str, display: str) -> tuple[Any, Locator, list[Diagnostic]]:
    """``text`` as plain values, a locator for them, and the values refused along the way.

    Raises :class:`~batchflux.errors.ManifestError` when no document can be built at all
    (a syntax error, no document, an alias bomb, a recursive alias, nesting too deep).
    """
    root = _compose(text, display)
    builder = YamlBuilder(display)
    try:
        document = builder.build(root, ())
    except _YamlBomb as bomb:
        mark = bomb.node.start_mark
        raise _fatal(display, mark.line + 1, mark.column + 1, bomb.message) from None
    except RecursionError:
        raise _fatal(display, 1, 1, "invalid YAML: nested too deeply") from None
    return document, map_locator(builder.values, builder.keys), builder.diagnostics
