"""Read rule-file YAML safely and in bounded time: plain data plus the line of every key path.

PyYAML's safe loader never runs code, but it is not bounded: its composer recurses once per nesting level
(a RecursionError near 1000 levels) and an alias bomb of a few hundred bytes expands to billions of values
as soon as anything walks the data. Here the parser's events (libyaml's parser when PyYAML has it, else
PyYAML's own; both are loops, not recursions) are composed into nodes by a loop that bounds the nesting,
counts the values every alias expands to, refuses aliases into their own node (so data is never cyclic),
duplicate keys and unknown tags, and records the line of every key path. PyYAML's ``SafeConstructor``
then turns those nodes into Python data. Every problem is a ``YamlProblem`` with the real line.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.resolver import Resolver

from ktinject.errors import RuleError
from ktinject.messages import exception_text, format_path, one_line, show
from ktinject.rules.limits import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, MAX_NUMBER_CHARS

KeyPath = tuple[Any, ...]  # a key path inside one document: ("rules", 0, "replace", "op")

_PARSER = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader
_YAML_TAG = "tag:yaml.org,2002:"
_MERGE_TAG = _YAML_TAG + "merge"
_NUMBER_TAGS = (_YAML_TAG + "int", _YAML_TAG + "float")
# Tags with a safe constructor; PyYAML also resolves a bare '=' to a 'value' tag nothing constructs: a string here.
_KNOWN_TAGS = frozenset(tag for tag in SafeConstructor.yaml_constructors if tag is not None)
_PLAIN_STRING_TAGS = (_YAML_TAG + "value", _MERGE_TAG)
_NON_PRINTABLE = yaml.reader.Reader.NON_PRINTABLE
_BREAKS = re.compile(r"\r\n|[\n\r\x85\u2028\u2029]")  # YAML's line breaks


class YamlProblem(Exception):
    """Bad YAML at ``line`` (1-based); ``where`` is the key path or ``<yaml>``. The reader adds the file."""

    def __init__(self, line: int, message: str, where: str = "<yaml>") -> None:
        super().__init__(message)
        self.line = line
        self.where = where
        self.message = message


@dataclasses.dataclass
class Document:
    """One parsed rule file: its data and the line of every key path (an alias's copy: the alias's line)."""

    file: str
    data: Any
    lines: dict[KeyPath, int]

    def line(self, path: KeyPath) -> int:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path, 1)

    def error(self, path: KeyPath, message: str) -> RuleError:
        return rule_error(self.file, self.line(path), format_path(path), message)


def rule_error(file: str, line: int, where: str, message: str) -> RuleError:
    """The one shape of every rule error: ``file:line: key.path: message`` on one line."""
    return RuleError(f"{one_line(file)}:{line}: {one_line(where)}: {one_line(message)}")


def read_document(source: bytes | str, file: str) -> Document:
    """Parse one rule file (bytes as read from disk, or YAML text); RuleError ``file:line:`` otherwise."""
    try:
        data, lines = _read(source)
    except YamlProblem as problem:
        raise rule_error(file, problem.line, problem.where, problem.message) from None
    return Document(file=file, data=data, lines=lines)


def read_value(text: str) -> Any:
    """One YAML value (a ``--set`` override) under the same bounds; YamlProblem when it is not valid YAML."""
    return _read(text)[0]


def _read(source: bytes | str) -> tuple[Any, dict[KeyPath, int]]:
    text = _decode(source)
    constructor = _Constructor()
    composer = _Composer(constructor)
    try:
        for event in yaml.parse(text, Loader=_PARSER):
            composer.feed(event)
    except yaml.MarkedYAMLError as exc:
        raise _marked_problem(exc) from None
    except yaml.reader.ReaderError as exc:  # the check in _decode should have caught it; libyaml may be stricter
        position = min(max(int(getattr(exc, "position", 0)), 0), len(text))
        raise YamlProblem(_line_of(text, position), f"unacceptable character: {exc.reason}") from None
    except yaml.YAMLError as exc:
        raise YamlProblem(1, exception_text(exc)) from None
    if composer.root is None:
        return None, composer.lines
    try:
        data = constructor.construct_document(composer.root)
    except yaml.MarkedYAMLError as exc:
        raise _marked_problem(exc) from None
    except Exception as exc:  # PyYAML's constructors on hostile input; the per-node wrapper below has no mark here
        raise YamlProblem(composer.root.start_mark.line + 1, f"cannot read this YAML: {exception_text(exc)}") from None
    return data, composer.lines


def _decode(source: bytes | str) -> str:
    size = len(source) if isinstance(source, bytes) else len(source.encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_BYTES:
        raise YamlProblem(1, f"{size:,} bytes is more than a rule file may hold ({MAX_FILE_BYTES:,})", "<file>")
    if isinstance(source, bytes):
        try:
            text = source.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            before = source[: exc.start].decode("utf-8", "replace")
            line = _line_of(before, len(before))
            raise YamlProblem(
                line, f"byte 0x{source[exc.start]:02x} is not UTF-8 (rule files are UTF-8 text)", "<file>"
            ) from None
    else:
        text = source[1:] if source.startswith("\ufeff") else source
    bad = _NON_PRINTABLE.search(text)
    if bad is not None:
        char = bad.group()
        raise YamlProblem(
            _line_of(text, bad.start()), f"character U+{ord(char):04X} ({char!r}) is not allowed in YAML text"
        )
    return text


def _line_of(text: str, index: int) -> int:
    return len(_BREAKS.findall(text, 0, index)) + 1


def _marked_problem(exc: yaml.MarkedYAMLError) -> YamlProblem:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    problem = exc.problem or exc.context or "invalid YAML"
    if exc.problem and exc.context:
        context_line = exc.context_mark.line + 1 if exc.context_mark is not None else line
        problem += f" ({exc.context}" + (f" on line {context_line})" if context_line != line else ")")
    return YamlProblem(line, problem)


class _Constructor(SafeConstructor):
    """PyYAML's safe constructor, with any failure on one node reported at that node's line."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # int('9' * 5000), bool tag on 'maybe', bad base64...: the value is unreadable
            raise ConstructorError(
                None,
                None,
                f"cannot read this {node.tag.rsplit(':', 1)[-1]} value: {exception_text(exc)}",
                node.start_mark,
            ) from None


_MERGE = object()  # the key of a '<<' merge entry


@dataclasses.dataclass(slots=True)
class _Frame:
    """An open mapping or sequence while its events arrive."""

    node: yaml.MappingNode | yaml.SequenceNode
    is_map: bool
    path: KeyPath | None  # None below a merge: those keys' lines are the mapping's
    anchor: str | None
    size: int = 1  # values it holds, aliases expanded
    index: int = 0  # sequences: the next item's index
    key: Any = None  # mappings: the pending key (constructed), _MERGE, or None when a key comes next
    key_node: yaml.Node | None = None
    keys: set = dataclasses.field(default_factory=set)


class _Composer:
    """Builds the node graph from parser events, bounding depth and the expanded value count."""

    def __init__(self, constructor: _Constructor) -> None:
        self._constructor = constructor
        self._resolver = Resolver()
        self._stack: list[_Frame] = []
        self._anchors: dict[str, tuple[yaml.Node, int]] = {}
        self._anchor_lines: dict[str, int] = {}
        self._open_anchors: set[str] = set()
        self._documents = 0
        self._total = 0
        self.root: yaml.Node | None = None
        self.lines: dict[KeyPath, int] = {}

    def feed(self, event: yaml.Event) -> None:
        if isinstance(event, yaml.DocumentStartEvent):
            self._documents += 1
            if self._documents > 1:
                raise YamlProblem(_line(event), "a rule file is one YAML document, but a second one starts here")
        elif isinstance(event, yaml.ScalarEvent):
            self._scalar(event)
        elif isinstance(event, yaml.AliasEvent):
            self._alias(event)
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            self._open(event)
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            self._close()

    # ---- the three kinds of node -------------------------------------------------------------------

    def _scalar(self, event: yaml.ScalarEvent) -> None:
        is_key = self._expects_key()
        tag = event.tag
        if tag is None or tag == "!":
            tag = self._resolver.resolve(yaml.ScalarNode, event.value, event.implicit)
            if tag in _PLAIN_STRING_TAGS and not (is_key and tag == _MERGE_TAG):
                tag = _YAML_TAG + "str"
        else:
            self._check_tag(tag, event)
        if tag in _NUMBER_TAGS and len(event.value) > MAX_NUMBER_CHARS:
            raise YamlProblem(
                _line(event), f"a number of {len(event.value):,} characters (at most {MAX_NUMBER_CHARS} here)"
            )
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
        self._remember_anchor(event.anchor, node, 1, event)
        self._count(1, event)
        if is_key:
            self._take_key(node, event)
        else:
            self._add_value(node, 1, event)

    def _alias(self, event: yaml.AliasEvent) -> None:
        name = event.anchor
        if name not in self._anchors:
            if name in self._open_anchors:
                raise YamlProblem(
                    _line(event), f"alias *{name} is inside the node &{name} it names (recursive data is not allowed)"
                )
            raise YamlProblem(_line(event), f"alias *{name} has no anchor &{name} before it")
        node, size = self._anchors[name]
        self._count(size, event)
        if self._expects_key():
            if not isinstance(node, yaml.ScalarNode):
                raise YamlProblem(_line(event), f"a mapping key must be a plain value, but *{name} is a {_kind(node)}")
            self._take_key(node, event)
        else:
            self._add_value(node, size, event)

    def _open(self, event: yaml.CollectionStartEvent) -> None:
        is_map = isinstance(event, yaml.MappingStartEvent)
        if self._expects_key():
            raise YamlProblem(
                _line(event), f"a mapping key must be a plain value, found a {'mapping' if is_map else 'sequence'}"
            )
        if len(self._stack) >= MAX_DEPTH:
            raise YamlProblem(_line(event), f"nested more than {MAX_DEPTH} levels deep")
        kind = yaml.MappingNode if is_map else yaml.SequenceNode
        tag = event.tag
        if tag is None or tag == "!":
            tag = self._resolver.resolve(kind, None, event.implicit)
        else:
            self._check_tag(tag, event)
        node = kind(tag, [], event.start_mark, event.end_mark, flow_style=event.flow_style)
        path = self._value_path(event)
        if event.anchor is not None:
            self._check_new_anchor(event.anchor, event)
            self._open_anchors.add(event.anchor)
        self._count(1, event)
        self._stack.append(_Frame(node=node, is_map=is_map, path=path, anchor=event.anchor))

    def _close(self) -> None:
        frame = self._stack.pop()
        if frame.anchor is not None:
            self._open_anchors.discard(frame.anchor)
            self._anchors[frame.anchor] = (frame.node, frame.size)
        self._attach(frame.node, frame.size)

    # ---- placing nodes -----------------------------------------------------------------------------

    def _expects_key(self) -> bool:
        if not self._stack:
            return False
        frame = self._stack[-1]
        return frame.is_map and frame.key_node is None

    def _value_path(self, event: yaml.Event) -> KeyPath | None:
        """The key path of the value starting at ``event``; records its line when it is a sequence item."""
        if not self._stack:
            self.lines[()] = _line(event)
            return ()
        frame = self._stack[-1]
        if frame.path is None:
            return None
        if frame.is_map:
            return None if frame.key is _MERGE else frame.path + (frame.key,)
        path = frame.path + (frame.index,)
        self.lines[path] = _line(event)
        return path

    def _take_key(self, node: yaml.ScalarNode, event: yaml.Event) -> None:
        frame = self._stack[-1]
        if node.tag == _MERGE_TAG:
            key: Any = _MERGE
        else:
            try:
                key = self._constructor.construct_object(node, deep=True)
            except yaml.MarkedYAMLError as exc:
                raise _marked_problem(exc) from None
            if key in frame.keys:
                where = format_path(frame.path + (key,)) if frame.path is not None else "<yaml>"
                raise YamlProblem(_line(event), f"duplicate key {show(key)}", where)
            frame.keys.add(key)
            if frame.path is not None:
                self.lines[frame.path + (key,)] = _line(event)
        frame.key, frame.key_node = key, node

    def _add_value(self, node: yaml.Node, size: int, event: yaml.Event) -> None:
        self._value_path(event)  # records a sequence item's line
        self._attach(node, size)

    def _attach(self, node: yaml.Node, size: int) -> None:
        if not self._stack:
            self.root = node
            return
        frame = self._stack[-1]
        frame.size += size
        if frame.is_map:
            frame.node.value.append((frame.key_node, node))
            frame.key, frame.key_node = None, None
        else:
            frame.node.value.append(node)
            frame.index += 1

    # ---- bounds and checks -------------------------------------------------------------------------

    def _count(self, size: int, event: yaml.Event) -> None:
        self._total += size
        if self._total > MAX_NODES:
            raise YamlProblem(_line(event), f"more than {MAX_NODES:,} values once aliases are expanded")

    def _check_tag(self, tag: str, event: yaml.Event) -> None:
        if tag in _KNOWN_TAGS:
            return
        if tag.startswith(_YAML_TAG + "python/"):
            raise YamlProblem(
                _line(event),
                f"Python tags are not allowed, found {show(tag)} (rule files are read safely: plain YAML only)",
            )
        raise YamlProblem(_line(event), f"unknown tag {show(tag)} (rule files are plain YAML; remove the tag)")

    def _check_new_anchor(self, name: str, event: yaml.Event) -> None:
        if name in self._anchor_lines:
            raise YamlProblem(
                _line(event), f"anchor &{name} is defined twice (first on line {self._anchor_lines[name]})"
            )
        self._anchor_lines[name] = _line(event)

    def _remember_anchor(self, name: str | None, node: yaml.Node, size: int, event: yaml.Event) -> None:
        if name is not None:
            self._check_new_anchor(name, event)
            self._anchors[name] = (node, size)


def _line(event: yaml.Event) -> int:
    mark = event.start_mark
    return mark.line + 1 if mark is not None else 1


def _kind(node: yaml.Node) -> str:
    return "mapping" if isinstance(node, yaml.MappingNode) else "sequence"
