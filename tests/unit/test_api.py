"""The API: Python parsing agrees with the CRD's defaults, rejects bad input by field, and validate is offline-real."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from genrun.contract import api
from genrun.operator.validate import apply_defaults, cel_errors, crd_schema, load_crd, validate_document

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {
    "apiVersion": "genrun.io/v1alpha1",
    "kind": "GenerationRun",
    "metadata": {"name": "r1"},
    "spec": {"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "output": {"path": "/out"}},
}


def test_crd_names_and_columns() -> None:
    crd = load_crd()
    assert crd["metadata"]["name"] == "generationruns.genrun.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "GenerationRun",
        "generationruns",
        ["genrun"],
    )
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    cols = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert {"Kept", "Target", "Unique", "Round", "Status", "Age"} <= set(cols)
    assert all(c.get("description") for c in cols.values())


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for k, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{k}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], path + "[]")


def test_every_list_is_bounded_and_schema_is_structural() -> None:
    for path, node in _walk(crd_schema()):
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path} has no maxItems"
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"


def test_python_defaults_equal_crd_defaults() -> None:
    """Parsing the raw manifest and parsing it after the CRD's own defaulting give the same object."""
    for doc in [
        MINIMAL,
        *(yaml.safe_load((ROOT / "examples" / n).read_text()) for n in ("quickstart.yaml", "stage1-qwen32b.yaml")),
    ]:
        _, raw = api.parse_manifest(doc)
        _, defaulted = api.parse_manifest(apply_defaults(doc, crd_schema()))
        assert raw == defaulted
    # And every default the CRD declares is one Python applies (to_manifest writes defaults out).
    _, spec = api.parse_manifest(MINIMAL)
    written = api.to_manifest(spec)
    crd_defaulted = apply_defaults(MINIMAL, crd_schema())["spec"]
    for section, values in crd_defaulted.items():
        for key, value in values.items() if isinstance(values, dict) else []:
            assert written[section][key] == value, f"spec.{section}.{key}"


def test_semantic_error_names_field_and_range() -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["sampling"] = {"temperature": 3.5}
    with pytest.raises(api.SpecError) as exc:
        api.parse_manifest(doc)
    assert "spec.sampling.temperature: must be in (0, 2], got 3.5" in exc.value.errors


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"shards": {"initial": 0}}, "spec.shards.initial: must be in [1, 1000], got 0"),
        (
            {"dedup": {"key": "response"}},
            "spec.dedup.key: must be one of 'instruction', 'pair', got 'response'",
        ),
        ({"prompt": {"template": "about {domain"}}, "spec.prompt.template: malformed placeholder"),
        ({"prompt": {"domains": ["a", "a"]}}, "spec.prompt.domains[1]: 'a' is a duplicate of domains[0]"),
        (
            {"qc": {"filters": [{"name": "length"}, {"name": "length"}]}},
            "spec.qc.filters[1].name: filter 'length' is listed twice",
        ),
        (
            {"qc": {"filters": [{"name": "bannedPatterns", "params": {"patterns": ["(unclosed"]}}]}},
            "spec.qc.filters[0].params.patterns[0]: not a valid regular expression",
        ),
        (
            {"qc": {"filters": [{"name": "request", "params": {"requestWords": ["explain", "tell me"]}}]}},
            "spec.qc.filters[0].params.requestWords[1]: must be one word of letters (e.g. explain), got 'tell me'",
        ),
        (
            {"qc": {"filters": [{"name": "request", "params": {"requestWords": []}}]}},
            "spec.qc.filters[0].params.requestWords: must list 1 to 1000 words, got 0",
        ),
        ({"model": {"name": "m", "extra": 1}}, "spec.model.extra: unknown field"),
    ],
)
def test_semantic_errors(patch: dict, expected: str) -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["spec"].update(patch)
    errors = validate_document(doc)
    assert any(e.startswith(expected) for e in errors), errors


def test_run_name_keeps_every_child_name_and_label_valid() -> None:
    """The run name is the genrun.io/run label value (<= 63) and prefixes Job names; Indexed merge pods add -<i>."""
    from genrun.operator import planner

    doc = copy.deepcopy(MINIMAL)
    doc["metadata"]["name"] = "x" * 64
    assert any(e.startswith("metadata.name: must be 1-63") for e in validate_document(doc))
    doc["metadata"]["name"] = "x" * 63  # Job names are hashed down to 63 characters: still valid children
    assert validate_document(doc) == []
    _, spec = api.parse_manifest(doc)
    b = spec.budget
    for name in (
        planner.shard_job_name(doc["metadata"]["name"], b.max_rounds, b.max_shards - 1, b.max_shard_retries),
        planner.merge_job_name(doc["metadata"]["name"], b.max_rounds, b.max_shard_retries),
    ):
        assert len(name) <= 63
    doc["spec"]["dedup"] = {"partitions": 4}  # merge pods' hostname <job>-3 would pass 63
    errors = validate_document(doc)
    assert any("too long with spec.dedup.partitions 4" in e for e in errors), errors
    doc["metadata"]["name"] = "x" * 40
    assert validate_document(doc) == []


def test_cel_rules_are_evaluated_for_real() -> None:
    spec = apply_defaults(MINIMAL, crd_schema())
    assert cel_errors(spec) == []
    bad = copy.deepcopy(spec)
    bad["spec"]["escalation"]["maxTemperature"] = 0.5
    assert "spec.escalation.maxTemperature: must be >= spec.sampling.temperature" in cel_errors(bad)
    # An integer written for a number field is compared as a double, as the API server does.
    ok = copy.deepcopy(spec)
    ok["spec"]["escalation"]["maxTemperature"] = 1
    assert cel_errors(ok) == []


def test_cel_transition_rules_make_fields_immutable() -> None:
    old = apply_defaults(MINIMAL, crd_schema())
    new = copy.deepcopy(old)
    new["spec"]["model"]["name"] = "other"
    new["spec"]["output"]["path"] = "/elsewhere"
    new["spec"]["target"]["uniqueExamples"] = 99  # mutable: applies from the next round
    errors = cel_errors(new, old)
    assert "spec.model: is immutable: a run's rounds must come from one model" in errors
    assert "spec.output.path: is immutable: finished shards live there" in errors
    assert len(errors) == 2


def test_schema_rejects_what_python_would_too() -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["worker"] = {"tolerations": [{}] * 33}
    assert any("tolerations" in e for e in validate_document(doc))


def _expected(path: Path) -> str:
    first = path.read_bytes().split(b"\n")[0].decode()
    assert first.startswith("# expect: ")
    return first.removeprefix("# expect: ")


def _errors_by_file(stderr: str, files: list[Path]) -> dict[Path, list[str]]:
    out: dict[Path, list[str]] = {f: [] for f in files}
    for line in stderr.splitlines():
        owner = next(f for f in files if line.startswith(f"{f}: "))  # every line names its file
        out[owner].append(line.removeprefix(f"{owner}: "))
    return out


def test_examples_validate_and_invalid_ones_fail_with_their_message() -> None:
    ok = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "genrun.operator.cli",
            "validate",
            *map(str, sorted((ROOT / "examples").glob("*.yaml"))),
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    invalid = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))
    assert len(invalid) >= 110
    # One process for all of them (one per file would spend minutes importing); each line names its file.
    res = subprocess.run(
        [sys.executable, "-P", "-m", "genrun.operator.cli", "validate", "-q", *map(str, invalid)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and res.stdout == ""
    assert "Traceback" not in res.stderr
    errors = _errors_by_file(res.stderr, invalid)
    for path in invalid:
        assert any(_expected(path) in e for e in errors[path]), (path.name, errors[path])
        assert all(len(e) < 700 for e in errors[path]), path.name  # echoed values are cut


def test_validate_user_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("spec: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    res = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "genrun.operator.cli",
            "validate",
            str(tmp_path / "broken.yaml"),
            str(tmp_path / "list.yaml"),
            str(tmp_path / "missing.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert "not valid YAML" in res.stderr and "cannot read" in res.stderr and "Traceback" not in res.stderr
