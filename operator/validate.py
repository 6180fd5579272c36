"""Validate GenerationRun manifests the way the API server would, offline.

Three real checks in the API server's order: the CRD's structural schema (a JSON-schema validator), defaulting, and
the CEL rules (`x-kubernetes-validations`, evaluated with a CEL implementation); then genrun's semantic checks.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from genrun.operator.api import SpecError, parse_manifest


@functools.cache
def load_crd() -> dict[str, Any]:
    text = importlib.resources.files("genrun.crds").joinpath("generationrun.yaml").read_text()
    crd: dict[str, Any] = yaml.safe_load(text)
    return crd


def crd_schema() -> dict[str, Any]:
    schema: dict[str, Any] = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


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


def schema_errors(doc: Any) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft4Validator(crd_schema())  # OpenAPI v3.0 bounds are draft-4 style
    out = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err.absolute_path).replace(".[", "[")
        if err.validator == "required" and isinstance(err.instance, dict):
            missing = [k for k in err.validator_value if k not in err.instance]
            out += [f"{path + '.' if path else ''}{k}: is required" for k in missing]
            continue
        out.append(f"{path or '(root)'}: {err.message}")
    return out


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
            out.append(rule.get("message") or f"{where}: failed rule {rule['rule']!r}")
    return out


def _field(error: str) -> str:
    return error.split(":")[0].split(" ")[0]


def validate_document(doc: Any, old: Any = None) -> list[str]:
    """All errors of one manifest; empty when the API server would accept it and genrun would run it.

    The schema and CEL are checked for real; where genrun's own check names the same field, its message (which
    says the allowed range and the fix) is the one shown.
    """
    structural = schema_errors(doc)
    rules = (
        []
        if structural
        else cel_errors(
            apply_defaults(doc, crd_schema()), apply_defaults(old, crd_schema()) if old is not None else None
        )
    )
    try:
        parse_manifest(doc)
        semantic: list[str] = []
    except SpecError as exc:
        semantic = exc.errors
    named = {_field(e) for e in semantic}
    return semantic + [e for e in structural + rules if _field(e) not in named]


def validate_file(path: Path) -> list[str]:
    """Errors of every document in a YAML file, prefixed with the document's position when there are several."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as exc:
        return [f"cannot read: {exc.strerror}"]
    except yaml.YAMLError as exc:
        return [f"not valid YAML: {exc}".replace("\n", " ")]
    if not docs:
        return ["no YAML document in the file"]
    out = []
    for i, doc in enumerate(docs):
        prefix = f"document {i + 1}: " if len(docs) > 1 else ""
        out += [prefix + e for e in validate_document(doc)]
    return out
