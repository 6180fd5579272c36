"""Validate GenerationRun manifests the way the API server would, offline, and decide validity for every caller.

`check_manifest` is the one validation path: `genrun validate`, `genrun run` and the operator all call it before
anything is created. In the API server's order: the CRD's structural schema (a JSON-schema validator), defaulting,
the CEL rules (`x-kubernetes-validations`, evaluated with a CEL implementation); then genrun's semantic checks and
what the API server would refuse for the children the run will create (names and label values).

`load_file` reads YAML by the 1.2 core schema (libyaml scans, Python composes) with bounds that hold before anything
walks the tree: size, values, time, nesting depth, expanded alias size (a "billion laughs" file is refused
while it is being composed); duplicate keys, non-string keys and plain values that YAML 1.1 (kubectl's go-yaml v2)
reads otherwise are refused at their field.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import yaml
from genrun.contract.api import (
    GenerationRunSpec,
    RunRef,
    SpecError,
    crd_schema,
    error_field,
    load_crd,
    parse_manifest,
    short,
)
from yaml.constructor import SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

__all__ = [
    "ManifestError",
    "SpecError",
    "check_manifest",
    "crd_schema",
    "load_crd",
    "load_file",
    "load_run_manifest",
    "manifest_errors",
    "validate_file",
]

MAX_FILE_BYTES = 2 * 1024 * 1024  # etcd stores at most 1.5 MiB per object: a larger manifest can never be created
MAX_DEPTH = 64  # the CRD nests 6 levels; params and tolerations a few more
MAX_EXPANDED = 4 * 1024 * 1024  # nodes + scalar characters after aliases are expanded (a plain 2 MiB file is < 2.5M)
MAX_NODES = 10_000  # lists, maps and scalars: the CRD's item limits allow about 3,000 (512 domains, 64 examples, ...)
MAX_PARSE_SECONDS = 3.0  # wall-clock budget for composing one file, whatever its shape
MAX_ERRORS = 20  # errors shown per document; the rest are counted


class ManifestError(Exception):
    """A file that is not a readable manifest: one line, for the user."""


# YAML 1.2 core schema (what the YAML 1.2 spec says a plain scalar is): no yes/no/on/off booleans, no sexagesimal
# or underscored numbers, no leading-zero octals (0o17 is octal), no timestamps.
_CORE = {
    "tag:yaml.org,2002:bool": re.compile(r"true|True|TRUE|false|False|FALSE"),
    "tag:yaml.org,2002:int": re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"),
    "tag:yaml.org,2002:float": re.compile(
        r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)"
    ),
    "tag:yaml.org,2002:null": re.compile(r"~|null|Null|NULL|"),
    "tag:yaml.org,2002:merge": re.compile(r"<<"),  # not core, but kubectl's parser merges maps, so it stays
}
# Plain scalars whose YAML 1.2 reading differs from kubectl's: kubectl and Helm read files with go-yaml v2
# (sigs.k8s.io/yaml), which keeps YAML 1.1's y/n/yes/no/on/off booleans, leading-zero octals, binary and
# underscored numbers. Such a value is refused: validate would otherwise accept what the cluster reads otherwise.
_SPLIT = re.compile(
    r"y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF"
    r"|[-+]?0[0-9_]*[0-9][0-9_]*|[-+]?[0-9][0-9_]*_[0-9_]*(\.[0-9_]*)?|[-+]?0b[01_]+"
)
_YAML11_BOOLS = {"y": True, "yes": True, "on": True, "n": False, "no": False, "off": False}
_Y11 = yaml.SafeLoader("")  # PyYAML is YAML 1.1: it says what a 1.1 reader makes of a plain scalar


def _core_tag(value: str) -> str:
    for tag, pattern in _CORE.items():
        if pattern.fullmatch(value):
            return tag
    return "tag:yaml.org,2002:str"


def _yaml11(value: str) -> Any:
    """What a YAML 1.1 reader makes of a plain scalar (the 1.1 spec's y/n booleans included)."""
    if value.lower() in _YAML11_BOOLS:
        return _YAML11_BOOLS[value.lower()]
    tag = _Y11.resolve(yaml.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
    if tag in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value", "tag:yaml.org,2002:str"):
        return value
    try:
        return _Y11.yaml_constructors[tag](_Y11, yaml.ScalarNode(tag, value))
    except (ValueError, yaml.YAMLError):
        return value


def _yaml(value: Any) -> str:
    """A value as the user would write it in YAML (for a message)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return short(value) if isinstance(value, str) else repr(value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return "null" if value is None else "a string"


def _construct_core_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    value = str(node.value)
    if value.startswith("0o"):
        return int(value[2:], 8)
    if value.startswith("0x"):
        return int(value[2:], 16)
    return int(value, 10)  # 017 is seventeen in YAML 1.2 (leading-zero forms are refused before this anyway)


def _construct_core_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    value = str(node.value).lower()
    if value.endswith(".inf"):
        return -math.inf if value.startswith("-") else math.inf
    if value == ".nan":
        return math.nan
    return float(value)


class Reading:
    """What the loader found at a field: a refusal (`error`), or a plain scalar YAML 1.1 would read otherwise."""

    def __init__(self, path: str, error: str = "", literal: str = "", value12: Any = None, value11: Any = None) -> None:
        self.path, self.error, self.literal, self.value12, self.value11 = path, error, literal, value12, value11

    def explain(self, message: str) -> str:
        """A field's error with what YAML 1.1 would have read there."""
        v12, v11 = self.value12, self.value11
        if isinstance(v12, str) and not isinstance(v11, str):
            return (
                f"{self.path}: {_yaml(v12)} is a string (YAML 1.2, as kubectl reads it; YAML 1.1 would have read "
                f"{_yaml(v11)}): write {_yaml(v11)}"
            )
        return f"{message} (YAML 1.2 reads {self.literal} as {_yaml(v12)}; YAML 1.1 would have read {_yaml(v11)})"


def _path(parts: list[str]) -> str:
    return "".join(p if p.startswith("[") else "." + p for p in parts).lstrip(".") or "(document)"


class _BoundError(yaml.composer.ComposerError):
    """A bound broken inside the document: the field (the last one entered) is named."""

    def __init__(self, field: str, problem: str, mark: Any) -> None:
        super().__init__(None, None, problem, mark)
        self.field = field


class _Bounds(yaml.composer.Composer):
    """PyYAML's composer with the bounds above and kubectl's strictness (no duplicate keys), for a safe loader with
    YAML 1.2 core resolvers. Problems inside the tree are recorded as Readings naming their field, so that a file
    with a bad key or value still gets every other field checked."""

    readings: list[Reading]

    def _start(self) -> None:
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)  # type: ignore[arg-type]
        yaml.resolver.Resolver.__init__(self)  # type: ignore[arg-type]
        self._depth = 0
        self._expanded = 0
        self._nodes = 0
        self._deadline = time.monotonic() + MAX_PARSE_SECONDS
        self._sizes: dict[int, int] = {}
        self._open_anchors: list[str] = []
        self._where: list[str] = []
        self.readings = []

    def _size(self, node: yaml.Node) -> int:
        """Expanded size of a finished node, memoised so that nested aliases cost one visit each."""
        cached = self._sizes.get(id(node))
        if cached is not None:
            return cached
        if isinstance(node, yaml.ScalarNode):
            size = 1 + len(node.value)
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._size(n) for n in node.value)
        else:
            size = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
        self._sizes[id(node)] = size
        return size

    def _refuse(self, problem: str, mark: Any) -> NoReturn:
        shown = 8  # fields named in full; a path 64 levels deep is cut
        field = _path(self._where[:shown]) + ("..." if len(self._where) > shown else "")
        raise _BoundError(field, problem, mark)

    def _grow(self, amount: int, mark: Any) -> None:
        self._expanded += amount
        if self._expanded > MAX_EXPANDED:
            self._refuse(f"expands to more than {MAX_EXPANDED:,} nodes and characters (YAML aliases?)", mark)

    def _count(self, mark: Any) -> None:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            self._refuse(
                f"holds more than {MAX_NODES:,} values (lists, maps, scalars); a GenerationRun holds a few thousand "
                "at most",
                mark,
            )
        if self._nodes % 1024 == 0 and time.monotonic() > self._deadline:
            self._refuse(f"took more than {MAX_PARSE_SECONDS:g} s to read", mark)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[attr-defined]  # the parser's, beside this class
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                self._refuse(f"alias *{event.anchor} refers to a node that contains it", mark)
            target = self.anchors.get(event.anchor)
            if target is not None:
                self._grow(self._size(target), mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            self._refuse(f"nested deeper than {MAX_DEPTH} levels", mark)
        self._count(mark)
        if isinstance(event, yaml.ScalarEvent):
            self._grow(1 + len(event.value), event.start_mark)
        else:
            self._grow(1, event.start_mark)
        anchor = getattr(event, "anchor", None)
        if anchor:
            self._open_anchors.append(anchor)
        key = isinstance(parent, yaml.MappingNode) and index is None
        named = isinstance(index, yaml.ScalarNode) or isinstance(parent, yaml.SequenceNode)
        if named:
            self._where.append(str(index.value) if isinstance(index, yaml.ScalarNode) else f"[{index}]")
        try:
            node = super().compose_node(parent, index)
            if isinstance(event, yaml.ScalarEvent) and event.implicit[0]:
                self._check_plain(event.value, key, mark)
            if isinstance(node, yaml.MappingNode):
                self._check_keys(node)
        finally:
            self._depth -= 1
            if anchor:
                self._open_anchors.pop()
            if named:
                self._where.pop()
        return node

    def _check_plain(self, value: str, key: bool, mark: Any) -> None:
        """Record a plain scalar that YAML 1.2, YAML 1.1 and kubectl's parser do not all read alike."""
        where = _path([*self._where, value] if key else self._where)
        line = f" (line {mark.line + 1})"
        v11 = _yaml11(value)
        tag = _core_tag(value)
        if key and tag != "tag:yaml.org,2002:str":
            return  # a key that is not a string at all: _check_keys refuses it
        if _SPLIT.fullmatch(value):
            v12 = value if tag == "tag:yaml.org,2002:str" else _CORE_CONSTRUCT[tag](self, yaml.ScalarNode(tag, value))
            if key or isinstance(v11, str):
                fix = "quote it"
            elif isinstance(v11, bool):
                fix = f"write {_yaml(v11)} for a boolean or quote it for text"
            else:
                fix = "write the number without leading zeros or '_', or quote it for text"
            self.readings.append(
                Reading(
                    where,
                    f"{where}: unquoted {value} is {_yaml(v12)} in YAML 1.2 but {_yaml(v11)} in YAML 1.1, whose forms "
                    f"kubectl's parser (go-yaml v2) still reads: {fix}{line}",
                )
            )
            return
        if key:
            return
        v12 = value if tag == "tag:yaml.org,2002:str" else _CORE_CONSTRUCT[tag](self, yaml.ScalarNode(tag, value))
        if type(v11) is not type(v12) or (v11 != v12 and v11 == v11):
            self.readings.append(Reading(where, "", value, v12, v11))

    def _check_keys(self, node: yaml.MappingNode) -> None:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = f" (line {key_node.start_mark.line + 1})"
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:str"):
                shown = short(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "(a list or map)"
                self.readings.append(
                    Reading(
                        _path(self._where),
                        f"{_path(self._where)}: key {shown} is not a string (numbers and null are not field names); "
                        f"quote it{line}",
                    )
                )
            elif key_node.value in seen:
                where = _path([*self._where, key_node.value])
                self.readings.append(
                    Reading(
                        where, f"{where}: duplicate key {short(key_node.value)} (kubectl refuses it); keep one{line}"
                    )
                )
            else:
                seen.add(key_node.value)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Keys that are not strings were recorded by _check_keys; leaving them out keeps the rest checkable.
        node.value = [
            (k, v)
            for k, v in node.value
            if k.tag in ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:str") and isinstance(k, yaml.ScalarNode)
        ]
        mapping: dict[Any, Any] = SafeConstructor.construct_mapping(self, node, deep=deep)  # type: ignore[arg-type]
        return mapping


class _PyLoader(_Bounds, Reader, Scanner, Parser, SafeConstructor, Resolver):
    """Pure Python: exact messages and locations, and the one that reads a "\\ud800" escape (to refuse it by field)."""

    yaml_implicit_resolvers: dict[Any, Any] = {}  # filled below: the 1.2 core schema, not PyYAML's 1.1

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        self._start()


_LOADERS: list[type[Any]] = [_PyLoader]
if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _CLoader(_Bounds, CParser, SafeConstructor, Resolver):
        """libyaml scans and parses (a 2 MiB comment or scalar in milliseconds, not seconds); composing stays in
        Python, under the bounds."""

        yaml_implicit_resolvers: dict[Any, Any] = {}

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            self._start()

    _LOADERS.insert(0, _CLoader)

_FIRST = {"bool": "tTfF", "int": "-+0123456789", "float": "-+0123456789.", "null": ["~", "n", "N", ""], "merge": "<"}
_CORE_CONSTRUCT: dict[str, Any] = {
    "tag:yaml.org,2002:bool": yaml.SafeLoader.construct_yaml_bool,
    "tag:yaml.org,2002:int": _construct_core_int,
    "tag:yaml.org,2002:float": _construct_core_float,
    "tag:yaml.org,2002:null": yaml.SafeLoader.construct_yaml_null,
    "tag:yaml.org,2002:merge": lambda loader, node: "<<",
}
for _loader in _LOADERS:
    for _tag, _pattern in _CORE.items():
        _loader.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern.pattern})$"), _FIRST[_tag.rsplit(":", 1)[1]])
    for _tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        _loader.add_constructor(_tag, _CORE_CONSTRUCT[_tag])
    # Dates (a 1.1 type) stay strings, as kubectl sends them; an explicit !!timestamp tag reads as its text too.
    _loader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)
_FALLBACK_BYTES = 256 * 1024  # libyaml refused the text: a file this small is read again in Python for its message


class Document:
    """One YAML document: its data and what the loader found inside it, by field."""

    def __init__(self, data: Any, readings: list[Reading]) -> None:
        self.data, self.readings = data, readings

    def errors(self, found: list[str]) -> list[str]:
        """The document's errors: the loader's refusals, then the validator's `found`, each field once, with what
        YAML 1.1 would have read where it matters."""
        refused = [r.error for r in self.readings if r.error]
        named = {error_field(e) for e in refused}
        notes = {r.path: r for r in self.readings if not r.error}
        out = list(refused)
        for e in found:
            field = error_field(e)
            if field in named:
                continue
            note = notes.pop(field, None)
            out.append(printable(note.explain(e)) if note else e)
        return out


def load_documents(text: str) -> list[Document]:
    """Every non-empty document of a YAML text, within the bounds; ManifestError (one line) otherwise."""
    try:
        try:
            return _compose(_LOADERS[0], text)
        except (yaml.scanner.ScannerError, yaml.parser.ParserError, yaml.reader.ReaderError):
            # libyaml's syntax errors: Python's parser says the same with PyYAML's words, or reads what libyaml
            # cannot (a "\\ud800" escape, refused at its field after)
            if _LOADERS[0] is _PyLoader or len(text) > _FALLBACK_BYTES:
                raise
            return _compose(_PyLoader, text)
    except _BoundError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ManifestError(printable(f"{exc.field}: {exc.problem}{where}"[:400])) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(f"{exc.context or ''} {exc.problem or ''}".split())
        raise ManifestError(printable(f"not valid YAML: {where}{what[:300]}")) from None
    except yaml.YAMLError as exc:
        text = " ".join(re.sub(r'\s+in "<unicode string>",?', " at", str(exc)).split())
        raise ManifestError(printable(f"not valid YAML: {text[:300]}")) from None
    except RecursionError:  # belt and braces: MAX_DEPTH holds long before Python's limit
        raise ManifestError(f"not valid YAML: nested deeper than {MAX_DEPTH} levels") from None


def _compose(kind: type[Any], text: str) -> list[Document]:
    loader = kind(text)
    try:
        docs = []
        while loader.check_node():
            node = loader.get_node()
            readings, loader.readings = loader.readings, []
            data = loader.construct_document(node)
            if data is not None:
                docs.append(Document(data, readings))
        return docs
    finally:
        loader.dispose()


def load_text(text: str) -> list[Any]:
    """Every non-empty document of a YAML text (YAML 1.2 core schema), within the bounds; ManifestError (one line)
    for a text that is not YAML or breaks a bound, or holds a key or value the loader refuses."""
    docs = load_documents(text)
    for doc in docs:
        refused = [r.error for r in doc.readings if r.error]
        if refused:
            raise ManifestError(printable(refused[0]))
    return [d.data for d in docs]


def _read(path: Path) -> list[Document]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ManifestError(
            f"larger than {MAX_FILE_BYTES // 1024 // 1024} MiB; the API server stores at most 1.5 MiB per object"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not UTF-8 text (byte {exc.start}); is it a binary file?") from None
    docs = load_documents(text)
    if not docs:
        raise ManifestError("no YAML document in the file")
    return docs


def load_file(path: Path) -> list[Any]:
    """Read a manifest file's documents; ManifestError with one line for anything that is not a manifest."""
    docs = _read(path)
    for doc in docs:
        refused = [r.error for r in doc.readings if r.error]
        if refused:
            raise ManifestError(printable(refused[0]))
    return [d.data for d in docs]


def apply_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it: missing properties get their default, recursively."""
    obj = copy.deepcopy(obj)
    _default(obj, schema)
    return obj


def _default(obj: Any, schema: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
        for key, value in obj.items():
            if key in props:
                _default(value, props[key])
            elif isinstance(schema.get("additionalProperties"), dict):
                _default(value, schema["additionalProperties"])
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            _default(item, schema["items"])


def _numbers_as_double(obj: Any, schema: dict[str, Any]) -> Any:
    """The API server hands CEL `type: number` fields as double even when written as 1."""
    t = schema.get("type")
    if t == "number" and isinstance(obj, int) and not isinstance(obj, bool):
        return float(obj)
    if isinstance(obj, dict):
        props = schema.get("properties", {})
        return {k: _numbers_as_double(v, props.get(k, {})) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numbers_as_double(v, schema.get("items", {})) for v in obj]
    return obj


@functools.cache
def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft4Validator(crd_schema())  # OpenAPI v3.0 bounds are draft-4 style


def schema_errors(doc: Any) -> list[str]:
    validator = _validator()
    out = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err.absolute_path).replace(".[", "[")
        if err.validator == "required" and isinstance(err.instance, dict):
            missing = [k for k in err.validator_value if k not in err.instance]
            out += [f"{path + '.' if path else ''}{k}: is required" for k in missing]
            continue
        message = err.message if len(err.message) <= 300 else err.message[:300] + "..."
        out.append(f"{path or '(root)'}: {message}")
    return out


_LEADING_FIELD = re.compile(r"(spec(?:\.[A-Za-z0-9_]+)*) (.*)", re.DOTALL)


def _field_first(message: str | None, where: str, rule: dict[str, Any]) -> str:
    """A CRD rule's message ("spec.a must be ...") in genrun's form: "spec.a: must be ...", the field first."""
    if not message:
        return f"{where}: failed rule {rule['rule']!r}"
    m = _LEADING_FIELD.fullmatch(message)
    if m:
        return f"{m.group(1)}: {m.group(2)}"
    field = where + rule.get("fieldPath", "") if where != "(root)" else where
    return f"{field}: {message}"


def _rules(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule
    for key, sub in schema.get("properties", {}).items():
        yield from _rules(sub, (*path, key))


def _lookup(obj: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return False, None
        obj = obj[key]
    return True, obj


def cel_errors(new: Any, old: Any = None) -> list[str]:
    """Evaluate every CEL rule of the CRD against a defaulted object (and the old one for transition rules)."""
    import cel

    schema = crd_schema()
    new = _numbers_as_double(new, schema)
    old = _numbers_as_double(old, schema) if old is not None else None
    out = []
    for path, rule in _rules(schema):
        found, value = _lookup(new, path)
        if not found:
            continue
        ctx = {"self": value}
        if "oldSelf" in rule["rule"]:
            if old is None:
                continue  # a transition rule applies to updates only
            found_old, old_value = _lookup(old, path)
            if not found_old:
                continue
            ctx["oldSelf"] = old_value
        where = ".".join(path) or "(root)"
        try:
            ok = cel.evaluate(rule["rule"], ctx)
        except Exception as exc:  # the CEL library raises plain errors for missing fields
            field = where + rule.get("fieldPath", "") if where != "(root)" else where
            out.append(f"{field}: rule {rule['rule']!r} could not be evaluated ({str(exc)[:200]})")
            continue
        if ok is not True:
            out.append(_field_first(rule.get("message"), where, rule))
    return out


MAX_NAME = 63  # a run's name is the genrun.io/run label value of every child, and the prefix of their names
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def child_errors(ref: RunRef, spec: GenerationRunSpec) -> list[str]:
    """What the API server would refuse for the children this run creates, found before any is created."""
    from genrun.operator import planner

    name = ref.name
    if len(name) > MAX_NAME or not _DNS_LABEL.fullmatch(name):
        return [
            f"metadata.name: must be 1-{MAX_NAME} lowercase letters, digits or '-', starting and ending with a letter "
            f"or digit (it is the genrun.io/run label of every child Job), got {short(name)}"
        ]
    errors = []
    if not _DNS_LABEL.fullmatch(ref.namespace) or len(ref.namespace) > MAX_NAME:
        errors.append(f"metadata.namespace: must be a DNS-1123 label (a namespace name), got {short(ref.namespace)}")
    b = spec.budget
    last_seed = spec.shards.first_seed + b.max_shards - 1
    names = {
        "shard Job": planner.shard_job_name(name, b.max_rounds, last_seed, b.max_shard_retries),
        "merge Job": planner.merge_job_name(name, b.max_rounds, b.max_shard_retries),
    }
    for what, child in names.items():
        if len(child) > MAX_NAME or not _DNS_LABEL.fullmatch(child):
            errors.append(
                f"metadata.name: the {what} name {short(child)} would not be a valid Job name; shorten the name"
            )
    parts = spec.dedup.partitions
    if parts > 1:
        # An Indexed Job's pods are given the hostname <job>-<index>, a DNS label of at most 63 characters.
        unhashed = "-".join(
            (name, f"r{b.max_rounds}", "merge") + ((f"a{b.max_shard_retries}",) if b.max_shard_retries else ())
        )
        longest = len(unhashed) + 1 + len(str(parts - 1))
        if longest > MAX_NAME:
            room = len(name) - (longest - MAX_NAME)
            errors.append(
                f"metadata.name: {len(name)} characters is too long with spec.dedup.partitions {parts}: merge pods get "
                f"the hostname {short(unhashed + '-' + str(parts - 1))}, over {MAX_NAME} characters; use at most "
                f"{max(room, 0)} characters or fewer rounds/retries"
            )
    return errors


def _plain(obj: Any) -> Any:
    """A Mapping/Sequence tree (a Kopf body) as plain dicts and lists, so every check sees JSON types."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode_errors(obj: Any, path: str, out: list[str]) -> Any:
    """Lone surrogates (a "\\ud800" escape in YAML or JSON) are not text: the API server cannot store them and CEL
    cannot evaluate them. One error at the field, and the value with U+FFFD in their place for the other checks."""
    if isinstance(obj, str):
        m = _SURROGATE.search(obj)
        if m is None:
            return obj
        out.append(
            f"{path or '(document)'}: contains a lone surrogate U+{ord(m.group()):04X} (not valid Unicode; JSON and "
            "the API server cannot carry it): remove it"
        )
        return _SURROGATE.sub("\ufffd", obj)
    if isinstance(obj, dict):
        clean = {}
        for k, v in obj.items():
            key = _unicode_errors(k, path, out) if isinstance(k, str) else k
            clean[key] = _unicode_errors(v, f"{path}.{key}" if path else str(key), out)
        return clean
    if isinstance(obj, list):
        return [_unicode_errors(v, f"{path}[{i}]", out) for i, v in enumerate(obj)]
    return obj


def bounded(errors: list[str], limit: int = MAX_ERRORS) -> list[str]:
    """At most `limit` errors, then one line counting the rest: a flood of errors helps nobody."""
    if len(errors) <= limit:
        return errors
    return [*errors[:limit], f"... and {len(errors) - limit} more"]


def manifest_errors(doc: Any, old: Any = None) -> list[str]:
    """All errors of one manifest, each naming its field; empty when the API server would accept it, its children
    would be accepted too, and genrun would run it.

    The schema and CEL are checked for real; where genrun's own check names the same field, its message (which
    says the allowed range and the fix) is the one shown.
    """
    return _check(doc, old)[0]


def _check(
    doc: Any, old: Any, readings: Document | None = None
) -> tuple[list[str], tuple[RunRef, GenerationRunSpec] | None]:
    doc = _plain(doc)
    old = _plain(old) if old is not None else None
    if not isinstance(doc, dict):
        return ["(document): must be a YAML mapping (a GenerationRun manifest)"], None
    unicode: list[str] = []
    doc = _unicode_errors(doc, "", unicode)
    old = _unicode_errors(old, "", []) if old is not None else None
    parsed = None
    try:
        parsed = parse_manifest(doc)
        semantic = child_errors(*parsed)
    except SpecError as exc:
        semantic = exc.errors
    structural = schema_errors(doc)
    rules = []
    if not structural:
        schema = crd_schema()
        rules = cel_errors(apply_defaults(doc, schema), apply_defaults(old, schema) if old is not None else None)
        if semantic:  # a rule that could not run on a value already reported adds nothing
            rules = [r for r in rules if "could not be evaluated" not in r]
    named = {error_field(e) for e in semantic}
    errors = semantic + [e for e in structural + rules if error_field(e) not in named]
    if unicode:  # a value with a lone surrogate: that error alone speaks for its field
        bad = {error_field(e) for e in unicode}
        errors = unicode + [e for e in errors if error_field(e) not in bad]
    if readings is not None:
        errors = readings.errors(errors)
    if errors:
        parsed = None
    return bounded([printable(e) for e in errors]), parsed


def printable(message: str) -> str:
    """One line, no terminal control sequences: keys and values from a file are echoed back in messages."""
    if message.isprintable():
        return message
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in message)


def check_manifest(doc: Any, old: Any = None) -> tuple[RunRef, GenerationRunSpec]:
    """THE validity decision for a GenerationRun object (a file's document or the operator's body).

    Returns the run and its parsed spec (defaults applied), or raises SpecError whose `errors` each name a field and
    the fix (at most MAX_ERRORS of them, then a count). Nothing else raises, whatever the input (a property test
    feeds it mutated manifests).
    """
    errors, parsed = _check(doc, old)
    if errors or parsed is None:
        raise SpecError(errors)
    return parsed


validate_document = manifest_errors  # the name tests and callers used before


def validate_file(path: Path) -> list[str]:
    """Errors of every document in a YAML file, prefixed with the document's position when there are several."""
    try:
        docs = _read(path)
    except ManifestError as exc:
        return [str(exc)]
    out = []
    for i, doc in enumerate(docs):
        prefix = f"document {i + 1}: " if len(docs) > 1 else ""
        out += [prefix + e for e in _check(doc.data, None, doc)[0]]
    return out


def load_run_manifest(path: Path, output: str | None = None) -> tuple[dict[str, Any], RunRef, GenerationRunSpec]:
    """The one manifest `genrun run` runs: read, --output applied, then checked like any other.

    Raises ManifestError (the file) or SpecError (the fields) before anything touches the output.
    """
    docs = _read(path)
    if len(docs) != 1:
        # Say what is wrong in each document too, as `genrun validate` would, before refusing the count.
        errors = [f"document {i + 1}: {e}" for i, d in enumerate(docs) for e in _check(d.data, None, d)[0]]
        raise SpecError([*errors, f"(file): holds {len(docs)} YAML documents; genrun run takes one GenerationRun"])
    doc = docs[0].data
    if output is not None and isinstance(doc, dict) and isinstance(doc.get("spec"), dict):
        spec = doc["spec"]
        if isinstance(spec.get("output"), dict):
            spec["output"]["path"] = output
        else:
            spec["output"] = {"path": output}
        docs[0].readings = [r for r in docs[0].readings if r.path != "spec.output.path"]
    errors, parsed = _check(doc, None, docs[0])
    if errors or parsed is None:
        if output is not None:
            errors = [e + " (set by --output)" if e.startswith("spec.output.path:") else e for e in errors]
        raise SpecError(errors)
    ref, spec_ = parsed
    return doc, ref, spec_
