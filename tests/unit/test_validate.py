"""One validation path: check_manifest decides for `genrun validate`, `genrun run` and the operator; the CLI never
prints a traceback whatever the file; the CRD is the one source of bounds and patterns."""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import yaml
from genrun.contract import api
from genrun.operator import cli
from genrun.operator.validate import (
    MAX_EXPANDED,
    ManifestError,
    apply_defaults,
    cel_errors,
    check_manifest,
    crd_schema,
    load_text,
    manifest_errors,
    validate_file,
)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
MINIMAL = {
    "apiVersion": "genrun.io/v1alpha1",
    "kind": "GenerationRun",
    "metadata": {"name": "r1"},
    "spec": {"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "output": {"path": "/out"}},
}


def _genrun(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "genrun.operator.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,  # type: ignore[call-overload]
    )


# ----------------------------------------------------------------------------------------------------------
# The CRD is the single source of bounds and patterns


def test_bounds_are_read_from_the_crd_and_enforced_at_their_edges() -> None:
    assert len(api.BOUNDS) == 51  # every number field of the spec has its range in the CRD
    for bound in api.BOUNDS:
        section, key = bound.path.split(".", 1)
        for value, ok in _edge_values(bound):
            doc = copy.deepcopy(MINIMAL)
            if key.startswith("arms[]."):  # a list of objects: bound the field of its first item
                doc["spec"][section] = {"arms": [{"temperature": 0.7, key.removeprefix("arms[]."): value}]}
                where = f"spec.{section}.arms[0].{key.removeprefix('arms[].')}"
            elif key.startswith("quotas[]."):  # a quota needs an attribute to match
                leaf = key.removeprefix("quotas[].")
                quota = {"match": {"t": "a"}, leaf: value}
                doc["spec"][section] = {"attributes": [{"name": "t", "values": ["a"]}], "quotas": [quota]}
                where = f"spec.{section}.quotas[0].{leaf}"
            elif key.startswith("endpoint."):  # a nested object: with its required url
                doc["spec"][section]["endpoint"] = {"url": "http://vllm:8000/v1", key.removeprefix("endpoint."): value}
                where = f"spec.{bound.path}"
            else:  # a field, or a field of a nested object (dedup.semantic.threshold)
                node = doc["spec"].setdefault(section, {})
                *parents, leaf = key.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = value
                where = f"spec.{bound.path}"
            errors = [e for e in manifest_errors(doc) if e.startswith(f"{where}: must be in")]
            assert (not errors) == ok, (bound, value, errors)


def _edge_values(b: api.Bound) -> list[tuple[float, bool]]:
    assert b.lo is not None and b.hi is not None
    is_int = isinstance(b.lo, int) and isinstance(b.hi, int) and b.path not in _NUMBER_FIELDS
    step = 1 if is_int else 1e-6
    return [(b.lo, not b.lo_ex), (b.lo - step, False), (b.hi, not b.hi_ex), (b.hi + step, False)]


_NUMBER_FIELDS = {
    p for p, n in api._leaves(crd_schema()["properties"]["spec"], "") if n.get("type") == "number"
}  # number fields whose CRD bounds happen to be written as integers


def test_every_crd_pattern_has_a_message_and_python_applies_it() -> None:
    patterns = []
    for _, node in api._leaves(crd_schema(), ""):
        for n in (node, node.get("additionalProperties")):
            if isinstance(n, dict) and "pattern" in n:
                patterns.append(n["pattern"])
    assert len(patterns) >= 10 and all(p in api.PATTERN_HELP for p in patterns)


def test_qc_filters_constant_is_gone() -> None:
    assert not hasattr(api, "QC_FILTERS")  # the Literal type and the CRD enum are the one list


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"model": {"name": "m", "tensorParallelSize": 4}, "worker": {"gpus": 2}}, "spec.model.tensorParallelSize"),
        ({"target": {"uniqueExamples": 5000}, "budget": {"maxGeneratedExamples": 100}}, "spec.target.uniqueExamples"),
        ({"target": {"uniqueExamples": 5000}, "budget": {"maxShards": 4}}, "spec.target.uniqueExamples"),
        ({"output": {"path": "/data/../etc"}}, "spec.output.path: must not hold a '..' segment"),
    ],
)
def test_new_cel_rules_are_evaluated_for_real(patch: dict, message: str) -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["spec"].update(patch)
    assert any(e.startswith(message) for e in cel_errors(apply_defaults(doc, crd_schema())))


def test_examples_pass_the_new_cel_rules() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        assert cel_errors(apply_defaults(yaml.safe_load(path.read_text()), crd_schema())) == [], path


# ----------------------------------------------------------------------------------------------------------
# check_manifest: the operator's call


def test_check_manifest_takes_an_operator_body() -> None:
    """The operator passes the object it watches: API-server metadata and status beside the spec."""
    body = apply_defaults(copy.deepcopy(MINIMAL), crd_schema())
    body["metadata"].update(namespace="team-a", uid="0b1c", generation=3, resourceVersion="17", managedFields=[])
    body["status"] = {"round": 1, "conditions": []}
    ref, spec = check_manifest(body)
    assert (ref.name, ref.namespace, ref.uid, ref.generation) == ("r1", "team-a", "0b1c", 3)
    assert spec.target.unique_examples == 10
    body["spec"]["output"]["s3"] = {"credentialsSecret": "../../kube-system/secrets/aws-creds"}
    body["spec"]["output"]["path"] = "s3://bucket/x"
    with pytest.raises(api.SpecError) as exc:
        check_manifest(body)
    assert [e.split(":")[0] for e in exc.value.errors] == ["spec.output.s3.credentialsSecret"]


def test_check_manifest_refuses_a_nan_headroom_that_used_to_crash_decide() -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["escalation"] = {"headroom": math.nan}
    with pytest.raises(api.SpecError) as exc:
        check_manifest(doc)
    assert exc.value.errors == [
        "spec.escalation.headroom: must be a finite number, got nan; NaN and infinities are not allowed"
    ]


def test_transition_rules_still_apply_through_check_manifest() -> None:
    old = copy.deepcopy(MINIMAL)
    new = copy.deepcopy(MINIMAL)
    new["spec"]["model"]["name"] = "other"
    with pytest.raises(api.SpecError, match=r"spec\.model: is immutable"):
        check_manifest(new, old)


# ----------------------------------------------------------------------------------------------------------
# The bounded loader


def test_alias_bomb_is_refused_while_composing_within_100_mb() -> None:
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [
        f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefghijklmn", "bcdefghijklmno", strict=True)
    ]
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError, match="expands to more than"):
            load_text("\n".join(levels) + "\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100 * 1024 * 1024


def test_aliases_within_the_bound_still_load_like_kubectl() -> None:
    docs = load_text("base: &b {x: 1}\nuse: *b\nwhen: 2024-01-01\n")
    assert docs == [{"base": {"x": 1}, "use": {"x": 1}, "when": "2024-01-01"}]  # dates stay strings
    assert MAX_EXPANDED > 2 * 1024 * 1024  # a plain file at the size limit is never refused for its size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\na: 2\n", "a: duplicate key 'a' (kubectl refuses it); keep one (line 2)"),
        ("on: 1\n", "on: unquoted on is 'on' in YAML 1.2 but true in YAML 1.1"),
        ("x:\n  1: a\n", "x: key '1' is not a string"),
        ("a: [" + ",".join(["1"] * 15_000) + "]", "a: holds more than 10,000 values"),
        ("[" * 50_000 + "]" * 50_000, "[0][0][0][0][0][0][0][0]...: nested deeper than 64 levels"),
        ("a: &a\n  b: *a\n", "a: alias *a refers to a node that contains it"),
        ("a: [1\n", "not valid YAML: line 2"),
    ],
)
def test_loader_refuses_with_one_line(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as exc:
        load_text(text)
    assert message in str(exc.value) and "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------------------------------
# The CLI: never a traceback, exit code 2, one line per error


def test_validate_never_tracebacks_on_hostile_files(tmp_path: Path) -> None:
    files = {
        "binary.yaml": bytes(range(256)) * 8,
        "empty.yaml": b"",
        "huge.yaml": b"a: " + b"x" * (3 * 1024 * 1024) + b"\n",
        "deep.yaml": b"[" * 50_000 + b"]" * 50_000,
        "utf16.yaml": "kind: GenerationRun\n".encode("utf-16"),
        "folder": None,
    }
    for name, data in files.items():
        if data is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(data)
    res = _genrun("validate", *(str(tmp_path / n) for n in files), str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == len(files) + 1, res.stderr
    for needle in ("not UTF-8 text", "no YAML document", "larger than 2 MiB", "nested deeper", "cannot read"):
        assert needle in res.stderr


def test_validate_exits_quietly_when_stdout_is_closed() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before genrun writes ("genrun validate x | true")
    try:
        res = subprocess.run(
            [sys.executable, "-P", "-m", "genrun.operator.cli", "validate", str(QUICKSTART)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert res.returncode == 0 and res.stderr == ""


def test_run_refuses_multi_document_files_and_bad_options(tmp_path: Path) -> None:
    text = QUICKSTART.read_text()
    (tmp_path / "two.yaml").write_text(text + "\n---\n" + text)
    out = tmp_path / "out"
    res = _genrun("run", str(tmp_path / "two.yaml"), "--output", str(out), "--engine", "replay")
    assert res.returncode == 2 and "holds 2 YAML documents" in res.stderr and "Traceback" not in res.stderr
    for output, needle in [
        ("/etc", "spec.output.path: '/etc' is a system folder"),
        ("s3://my..bucket/x", "must not hold '..'"),
        ("", "--output: must name a folder"),
        ("../../x", "holds a '..' segment"),
    ]:
        res = _genrun("run", str(QUICKSTART), "--output", output, "--engine", "replay")
        assert res.returncode == 2 and needle in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1
    res = _genrun("run", str(QUICKSTART), "--jobs", "0", "--output", str(out), "--engine", "replay")
    assert res.returncode == 2 and "--jobs: must be at least 1" in res.stderr
    assert not out.exists()


def test_run_refuses_every_invalid_example_before_touching_its_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`genrun run` goes through the same check: each invalid example exits 2 with its message, creating nothing."""
    monkeypatch.chdir(tmp_path)  # relative output paths would land here
    out = tmp_path / "out"
    for path in sorted((ROOT / "examples" / "invalid").glob("*.yaml")):
        expect = path.read_bytes().split(b"\n")[0].decode().removeprefix("# expect: ")
        # Where the error is the output path itself, --output would replace it: run the file as written.
        override = [] if "spec.output" in expect else ["--output", str(out)]
        code = cli.main(["run", str(path), *override, "--engine", "replay", "-q"])
        err = capsys.readouterr().err
        assert code == 2, (path.name, err)
        assert expect in err, (path.name, err)
        assert not out.exists() and list(tmp_path.iterdir()) == [], path.name


def test_run_without_s3_credentials_is_one_line(tmp_path: Path) -> None:
    """Also under `python -m` (where cli.py is __main__ and a second copy defines UserError)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        HOME=str(tmp_path),
    )
    res = _genrun("run", str(QUICKSTART), "--output", "s3://genrun-no-creds/x", "--engine", "replay", env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert (
        res.stderr.startswith("genrun: error: spec.output.path: s3://genrun-no-creds/x")
        and len(res.stderr.splitlines()) == 1
    )


def test_output_path_never_lands_on_a_folder_the_jobs_mount() -> None:
    """The output volume is mounted at spec.output.path: on a path the Job already mounts, the API server refuses
    the Job (duplicate mountPath), or the output would shadow the job spec, caches or model."""
    from genrun.operator import manifests as mf

    for path in (mf.JOB_DIR, mf.HOME, "/tmp", "/dev/shm", "/models", "/models/"):
        doc = copy.deepcopy(MINIMAL)
        doc["spec"]["output"]["path"] = path
        assert any(e.startswith("spec.output.path:") for e in manifest_errors(doc)), path


def test_messages_are_one_printable_line_whatever_the_keys_and_values() -> None:
    """Keys and values are echoed back: a newline or an escape sequence in them must not reach the terminal."""
    errors = []
    for section, patch in [
        ("model", {"name": "m", "na\nme\x1b[2J": "x"}),
        ("worker", {"nodeSelector": {"k\x1b]0;pwned\x07": "v\n"}}),
        ("output", {"path": "/data/\x1b[31mout"}),
    ]:
        doc = copy.deepcopy(MINIMAL)
        doc["spec"][section] = patch
        errors += manifest_errors(doc)
    doc = copy.deepcopy(MINIMAL)
    doc["metadata"]["name"] = "bad\nname"
    errors += manifest_errors(doc)
    assert len(errors) >= 5, errors
    assert all(e.isprintable() for e in errors), errors
    with pytest.raises(ManifestError) as exc:
        load_text("a: 1\n'\x1b[2J': 2\n'\x1b[2J': 3\n")
    assert str(exc.value).isprintable()


# ----------------------------------------------------------------------------------------------------------
# YAML as the cluster reads it: the 1.2 core schema, and no value that YAML 1.1 (kubectl's go-yaml) reads otherwise


def _manifest(extra: str) -> str:
    return (
        "apiVersion: genrun.io/v1alpha1\nkind: GenerationRun\nmetadata: {name: r1}\n"
        f"spec:\n  model: {{name: m}}\n  output: {{path: /out}}\n{extra}\n"
    )


@pytest.mark.parametrize(
    ("plain", "value"),
    [
        ("0o17", 15),  # 1.2 octal
        ("0x1F", 31),
        ("+12", 12),
        ("1e3", 1000.0),  # a float in 1.2 (PyYAML's 1.1 reads a string)
        (".inf", math.inf),
        ("True", True),
        ("FALSE", False),
        ("~", None),
        ("Null", None),
        ("1:40", "1:40"),  # no sexagesimal in 1.2
        ("2024-01-01", "2024-01-01"),  # no timestamps in 1.2
        ("0o8", "0o8"),
        ("=", "="),
    ],
)
def test_plain_scalars_read_by_the_yaml_1_2_core_schema(plain: str, value: object) -> None:
    assert load_text(f"v: {plain}\n") == [{"v": value}]


def test_a_sexagesimal_count_is_refused_as_a_string_saying_what_yaml_1_1_read(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(_manifest("  target: {uniqueExamples: 1:40}"))
    assert validate_file(f) == [
        "spec.target.uniqueExamples: '1:40' is a string (YAML 1.2, as kubectl reads it; YAML 1.1 would have read "
        "100): write 100"
    ]


@pytest.mark.parametrize(
    ("extra", "field", "readings", "fixed"),
    [
        ("target: {uniqueExamples: 017}", "spec.target.uniqueExamples", "17 in YAML 1.2 but 15 in YAML 1.1", "17"),
        ("target: {uniqueExamples: 1_000}", "spec.target.uniqueExamples", "'1_000' in YAML 1.2 but 1000", "1000"),
        ("target: {uniqueExamples: 0b1010}", "spec.target.uniqueExamples", "'0b1010' in YAML 1.2 but 10", "10"),
        ("prompt: {domains: [a, yes]}", "spec.prompt.domains[1]", "'yes' in YAML 1.2 but true", "'yes'"),
        ("prompt: {domains: [n]}", "spec.prompt.domains[0]", "'n' in YAML 1.2 but false", "'n'"),
        ("worker: {nodeSelector: {gpu: On}}", "spec.worker.nodeSelector.gpu", "'On' in YAML 1.2 but true", "'On'"),
        ("worker: {nodeSelector: {off: a}}", "spec.worker.nodeSelector.off", "'off' in YAML 1.2 but false", "'off'"),
    ],
)
def test_values_yaml_versions_read_differently_are_refused_at_their_field(
    tmp_path: Path, extra: str, field: str, readings: str, fixed: str
) -> None:
    """kubectl reads files with go-yaml v2, which keeps YAML 1.1's yes/no/on/off, 017 octals and 1_000: a plain
    value whose 1.2 and 1.1 readings differ would validate as one thing and be applied as another."""
    f = tmp_path / "m.yaml"
    target = "" if extra.startswith("target") else "  target: {uniqueExamples: 9}\n"
    f.write_text(_manifest(target + "  " + extra))
    errors = validate_file(f)
    assert len(errors) == 1 and errors[0].startswith(f"{field}: unquoted "), errors
    assert readings in errors[0] and "(line " in errors[0]
    written = errors[0].split("unquoted ")[1].split(" ")[0]
    f.write_text(_manifest(target + "  " + re.sub(rf"(?<![\w'])({written})(?![\w'])", fixed, extra, count=1)))
    assert validate_file(f) == []


# ----------------------------------------------------------------------------------------------------------
# A bounded validator


def test_errors_are_bounded_with_a_count_of_the_rest(tmp_path: Path) -> None:
    unknown = "".join(f"  field{i}: 1\n" for i in range(4000))
    (tmp_path / "unknown.yaml").write_text(_manifest("  target: {uniqueExamples: 9}\n" + unknown))
    domains = ", ".join(["cooking"] * 600)
    (tmp_path / "dups.yaml").write_text(
        _manifest(f"  target: {{uniqueExamples: 9}}\n  prompt: {{domains: [{domains}]}}")
    )
    for name, first in [("unknown.yaml", "spec.field0: unknown field"), ("dups.yaml", "spec.prompt.domains")]:
        errors = validate_file(tmp_path / name)
        assert len(errors) == 21 and errors[0].startswith(first), errors[:2]
        assert errors[-1].startswith("... and ") and errors[-1].endswith(" more")
    assert validate_file(tmp_path / "unknown.yaml")[-1] == "... and 3980 more"


def test_a_huge_flow_list_is_refused_fast_and_small(tmp_path: Path) -> None:
    """1.8 MB, 900,000 items: refused by the node budget, not read whole (it took a minute and 636 MB)."""
    import time

    f = tmp_path / "list.yaml"
    f.write_text(
        _manifest("  target: {uniqueExamples: 9}\n  prompt:\n    domains: [" + ",".join(["a"] * 900_000) + "]")
    )
    assert f.stat().st_size > 1_800_000
    # The peak of the validate process alone: a wrapper process whose only child it is reports RUSAGE_CHILDREN (the
    # test process's own would be the largest of every child this session ever started).
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "sys.stdout.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(r.returncode)")  # fmt: skip
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-P", "-c", wrapper, sys.executable, "-P", "-m", "genrun.operator.cli",
                          "validate", str(f)], capture_output=True, text=True, timeout=120)  # fmt: skip
    took = time.monotonic() - start
    peak_kib = int(res.stdout.strip().splitlines()[-1])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith(
        f"{f}: spec.prompt.domains: holds more than 10,000 values (lists, maps, scalars); a GenerationRun holds a few "
        "thousand at most (line 9, column "
    )
    assert len(res.stderr.splitlines()) == 1
    assert took < 5 and peak_kib < 1024 * 1024, (took, peak_kib)


def test_a_valid_manifest_padded_to_the_size_limit_is_read_fast(tmp_path: Path) -> None:
    """Comments, blank lines and one long scalar make few values but many characters: libyaml scans them, so the
    time does not grow with Python's per-character scanning (seconds for 2 MB)."""
    import time

    f = tmp_path / "padded.yaml"
    padding = "#" + "x" * 900_000 + "\n" + "\n" * 500_000 + "# " + "y" * 400_000 + "\n"
    f.write_text(
        padding + _manifest("  target: {uniqueExamples: 9}\n  prompt:\n    template: '" + "z" * 8000 + " {domain}'")
    )
    assert 1_800_000 < f.stat().st_size < 2 * 1024 * 1024
    start = time.monotonic()
    assert validate_file(f) == []
    assert time.monotonic() - start < 2


# ----------------------------------------------------------------------------------------------------------
# Hidden characters and invalid Unicode, each named at its field


@pytest.mark.parametrize(
    ("section", "patch", "field"),
    [
        ("prompt", {"domains": ["a", "b", "c\u202ed"]}, "spec.prompt.domains[2]"),
        ("prompt", {"domains": ["co\u200bok"]}, "spec.prompt.domains[0]"),
        ("model", {"name": "Qwen/\u202eQwen"}, "spec.model.name"),
        ("output", {"path": "/data/\u202eout"}, "spec.output.path"),
        (
            "prompt",
            {"attributes": [{"name": "tone", "values": ["calm", "wry\u2066"]}]},
            "spec.prompt.attributes[0].values[1]",
        ),
        ("worker", {"nodeSelector": {"pool": "gpu\ufeff"}}, "spec.worker.nodeSelector.pool"),
        ("worker", {"image": "registry.example/genrun\u200d:1"}, "spec.worker.image"),
        ("dedup", {"against": ["/data/old\u200e.parquet"]}, "spec.dedup.against[0]"),
    ],
)
def test_format_characters_are_refused_in_every_name_with_their_code_point(
    section: str, patch: dict, field: str
) -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["spec"].setdefault(section, {}).update(patch)
    errors = manifest_errors(doc)
    assert len(errors) == 1 and errors[0].startswith(f"{field}: contains U+"), errors
    assert "(a format character, which hides or reorders text): remove it" in errors[0]


def test_prose_may_hold_format_characters() -> None:
    """An emoji's zero-width joiner or a soft hyphen in the template is the user's text, not a name."""
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["prompt"] = {"template": "Write one instruction about {domain} \U0001f469\u200d\U0001f373, soft\xadly."}
    assert manifest_errors(doc) == []


def test_a_lone_surrogate_is_one_error_at_its_field(tmp_path: Path) -> None:
    """It used to give 8 "CEL rule could not be evaluated" errors naming no field."""
    f = tmp_path / "m.yaml"
    f.write_text(_manifest('  target: {uniqueExamples: 9}\n  prompt: {domains: [cooking, "gar\\ud800den"]}'))
    assert validate_file(f) == [
        "spec.prompt.domains[1]: contains a lone surrogate U+D800 (not valid Unicode; JSON and the API server cannot "
        "carry it): remove it"
    ]
    res = _genrun("validate", str(f))
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr


def test_the_largest_manifest_the_crd_allows_is_within_the_node_budget() -> None:
    """Every list at its CRD maxItems: the node budget refuses only what can never be a GenerationRun."""
    schema = crd_schema()["properties"]["spec"]["properties"]
    limit = {k: schema["prompt"]["properties"][k]["maxItems"] for k in ("domains", "examples", "attributes")}
    values = schema["prompt"]["properties"]["attributes"]["items"]["properties"]["values"]["maxItems"]
    prompt = {
        "domains": [f"domain {i}" for i in range(limit["domains"])],
        "examples": [{"instruction": "i", "response": "r", "domain": "d"}] * limit["examples"],
        "attributes": [
            {"name": f"a{i}", "values": [f"v{j}" for j in range(values)]} for i in range(limit["attributes"])
        ],
    }
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["prompt"] = prompt
    doc["spec"]["worker"] = {"tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}] * 32}
    assert load_text(yaml.safe_dump(doc)) == [doc]


def test_a_cel_rule_that_cannot_run_names_the_field_it_guards() -> None:
    """Not just the object holding the rule ("spec"): the rule's fieldPath, as the API server reports it."""
    errors = cel_errors({"spec": {"budget": {"maxShards": 3}, "shards": {}}})
    failed = [e for e in errors if "could not be evaluated" in e]
    assert failed and all(e.split(":")[0] not in ("spec", "(root)") for e in failed), failed
    assert any(
        e.startswith("spec.budget.maxShards: rule 'self.budget.maxShards >= self.shards.initial'") for e in failed
    )
