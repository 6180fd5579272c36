"""Validate GenerationRun manifests the way the API server would, offline, and decide validity for every caller.

`check_manifest` is the one validation path: `genrun validate`, `genrun run` and the operator all call it before
anything is created. In the API server's order: the CRD's structural schema (a JSON-schema validator), defaulting,
the CEL rules (`x-kubernetes-validations`, evaluated with a CEL implementation); then genrun's semantic checks and
what the API server would refuse for the children the run will create (names and label values).

`load_file` reads YAML with bounds that hold before anything walks the tree: size, nesting depth, expanded alias
size (a "billion laughs" file is refused while it is being composed), duplicate keys and non-string keys.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

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


class ManifestError(Exception):
    """A file that is not a readable manifest: one line, for the user."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the bounds above and kubectl's strictness (no duplicate keys)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._expanded = 0
        self._sizes: dict[int, int] = {}
        self._open_anchors: list[str] = []

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

    def _grow(self, amount: int, mark: Any) -> None:
        self._expanded += amount
        if self._expanded > MAX_EXPANDED:
            raise yaml.composer.ComposerError(
                None, None, f"expands to more than {MAX_EXPANDED:,} nodes and characters (YAML aliases?)", mark
            )

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{event.anchor} refers to a node that contains it", mark
                )
            target = self.anchors.get(event.anchor)
            if target is not None:
                self._grow(self._size(target), mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        if isinstance(event, yaml.ScalarEvent):
            self._grow(1 + len(event.value), event.start_mark)
        else:
            self._grow(1, event.start_mark)
        anchor = getattr(event, "anchor", None)
        if anchor:
            self._open_anchors.append(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor:
                self._open_anchors.pop()

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:str"):
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {short(key_node.value) if isinstance(key_node, yaml.ScalarNode) else '(a list or map)'} "
                    "is not a string (YAML 1.1 reads unquoted on/off/yes/no, numbers and null as other types); "
                    "quote it",
                    key_node.start_mark,
                )
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {short(key_node.value)} (kubectl refuses it); keep one",
                    key_node.start_mark,
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


# Unquoted dates stay strings, as kubectl sends them (the schema then says which field wanted what).
_BoundedLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)  # type: ignore[type-var]


def load_text(text: str) -> list[Any]:
    """Every non-empty document of a YAML text, within the bounds; ManifestError (one line) otherwise."""
    try:
        loader = _BoundedLoader(text)
        try:
            docs = []
            while loader.check_data():  # type: ignore[no-untyped-call]
                docs.append(loader.get_data())
        finally:
            loader.dispose()
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
    return [d for d in docs if d is not None]


def load_file(path: Path) -> list[Any]:
    """Read a manifest file's documents; ManifestError with one line for anything that is not a manifest."""
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
    docs = load_text(text)
    if not docs:
        raise ManifestError("no YAML document in the file")
    return docs


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
            out.append(f"{where}: rule {rule['rule']!r} could not be evaluated ({exc})")
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


def manifest_errors(doc: Any, old: Any = None) -> list[str]:
    """All errors of one manifest, each naming its field; empty when the API server would accept it, its children
    would be accepted too, and genrun would run it.

    The schema and CEL are checked for real; where genrun's own check names the same field, its message (which
    says the allowed range and the fix) is the one shown.
    """
    return _check(doc, old)[0]


def _check(doc: Any, old: Any) -> tuple[list[str], tuple[RunRef, GenerationRunSpec] | None]:
    doc = _plain(doc)
    old = _plain(old) if old is not None else None
    if not isinstance(doc, dict):
        return ["(document): must be a YAML mapping (a GenerationRun manifest)"], None
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
    return [printable(e) for e in errors], parsed


def printable(message: str) -> str:
    """One line, no terminal control sequences: keys and values from a file are echoed back in messages."""
    if message.isprintable():
        return message
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in message)


def check_manifest(doc: Any, old: Any = None) -> tuple[RunRef, GenerationRunSpec]:
    """THE validity decision for a GenerationRun object (a file's document or the operator's body).

    Returns the run and its parsed spec (defaults applied), or raises SpecError whose `errors` each name a field and
    the fix. Nothing else raises, whatever the input (a property test feeds it mutated manifests).
    """
    errors, parsed = _check(doc, old)
    if errors or parsed is None:
        raise SpecError(errors)
    return parsed


validate_document = manifest_errors  # the name tests and callers used before


def validate_file(path: Path) -> list[str]:
    """Errors of every document in a YAML file, prefixed with the document's position when there are several."""
    try:
        docs = load_file(path)
    except ManifestError as exc:
        return [str(exc)]
    out = []
    for i, doc in enumerate(docs):
        prefix = f"document {i + 1}: " if len(docs) > 1 else ""
        out += [prefix + e for e in manifest_errors(doc)]
    return out


def load_run_manifest(path: Path, output: str | None = None) -> tuple[dict[str, Any], RunRef, GenerationRunSpec]:
    """The one manifest `genrun run` runs: read, --output applied, then checked like any other.

    Raises ManifestError (the file) or SpecError (the fields) before anything touches the output.
    """
    docs = load_file(path)
    if len(docs) != 1:
        # Say what is wrong in each document too, as `genrun validate` would, before refusing the count.
        errors = [f"document {i + 1}: {e}" for i, d in enumerate(docs) for e in manifest_errors(d)]
        raise SpecError([*errors, f"(file): holds {len(docs)} YAML documents; genrun run takes one GenerationRun"])
    doc = docs[0]
    if output is not None and isinstance(doc, dict) and isinstance(doc.get("spec"), dict):
        spec = doc["spec"]
        if isinstance(spec.get("output"), dict):
            spec["output"]["path"] = output
        else:
            spec["output"] = {"path": output}
    try:
        ref, spec_ = check_manifest(doc)
    except SpecError as exc:
        if output is not None:
            exc.errors = [e + " (set by --output)" if e.startswith("spec.output.path:") else e for e in exc.errors]
        raise
    return doc, ref, spec_
