"""Fuzzing the one validation path: mutated valid manifests either validate (and then the planner plans them, and
they serialise as strict JSON for the Jobs) or are refused with messages that each name a field. Nothing raises."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from genrun.contract import api
from genrun.contract.records import RoundReport
from genrun.operator.planner import (
    CreateMergeJob,
    CreateShardJob,
    Observed,
    ObservedJob,
    RecordRound,
    decide,
    invalid_plan,
)
from genrun.operator.validate import MAX_ERRORS, check_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
BASES = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "examples").glob("*.yaml"))]
# Field names of the CRD, so that added keys are often real fields (in the wrong place or with a wrong value).
FIELD_NAMES = sorted({p.rsplit(".", 1)[-1].rstrip("[]") for p, _ in api._leaves(api.crd_schema(), "") if p})
SPEC_PATHS = sorted(p for p, _ in api._leaves(api.SPEC_SCHEMA, "") if p and "[]" not in p)
FIELD_RE = re.compile(r"^(apiVersion|kind|metadata|spec|\(document\)|\(root\))([.\[:]|$)")
MORE_RE = re.compile(r"^\.\.\. and [1-9]\d* more$")  # the count after MAX_ERRORS errors

NASTY_STRINGS = [
    "", " ", "\u200b", "..", "/", "/etc", "/tmp", "../../x", "s3://my..bucket/x", "s3://bucket/../x", "s3://b/x",
    "s3://192.168.0.1/x", "{domain:d}", "{domain!r}", "{domain[0]}", "{}", "{0}", "{", "}", "{domain}", "{examples}",
    "{instruction}", "{response}", "4", "0", "-1", "32Gi", "1e400", "NaN", ".inf", "on", "yes", "null", "a" * 300,
    "../../kube-system/secrets/aws-creds", "nvidia.com/gpu", "UPPER", "http://", "https://minio:9000", "ftp://x",
    "\u0441ooking", "\uff43\uff4f\uff4f\uff4b", "x" * 70, "\x00", "\n", "é" * 100, "judge", "logprob", "Exists", "NoExecute",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(NASTY_STRINGS),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=12), st.integers(-3, 3), st.booleans())
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=8,
)


def _slots(obj: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key) below obj: where a mutation can land."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield obj, k
            yield from _slots(v)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield obj, i
            yield from _slots(v)


def _mutate(data: st.DataObject, doc: Any) -> None:
    if data.draw(st.integers(0, 2)) == 0 and isinstance(doc.get("spec"), dict):
        # Set a real spec field (made if missing) to any value: reaches fields the examples leave out.
        *parents, leaf = data.draw(st.sampled_from(SPEC_PATHS)).split(".")
        node = doc["spec"]
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[leaf] = data.draw(values)
        return
    # Otherwise mutate what is there, mostly inside spec.
    root = doc["spec"] if data.draw(st.integers(0, 4)) and isinstance(doc.get("spec"), dict | list) else doc
    slots = list(_slots(root))
    if not slots:
        return
    container, key = data.draw(st.sampled_from(slots))
    op = data.draw(st.sampled_from(["replace", "nudge", "delete", "add", "rename", "grow", "unicode"]))
    old = container[key]
    if op == "replace":
        container[key] = data.draw(values)
    elif op == "nudge" and isinstance(old, int | float) and not isinstance(old, bool):
        container[key] = data.draw(
            st.sampled_from([old + 1, old - 1, -old, old * 1000, old + 0.5, 0, float("nan"), float("inf")])
        )
    elif op == "delete":
        del container[key]
    elif op == "add" and isinstance(old, dict):
        old[data.draw(keys)] = data.draw(values)
    elif op == "rename" and isinstance(container, dict):
        new_key = data.draw(st.sampled_from([str(key).upper(), str(key) + " ", "\u200b" + str(key), str(key)[:-1]]))
        container[new_key] = container.pop(key)
    elif op == "grow" and isinstance(old, str | list):
        container[key] = old * data.draw(st.sampled_from([2, 50, 1000]))
    elif op == "unicode" and isinstance(old, str):
        container[key] = old + data.draw(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20))


def _two_rounds(ref: api.RunRef, spec: api.GenerationRunSpec) -> None:
    """decide() on the accepted spec: round 1, then round 2 after every Job succeeded with a modest yield."""
    plan = decide(ref, spec, Observed())
    rounds, jobs = {}, []
    for a in plan.actions:
        if isinstance(a, RecordRound):
            rounds[a.plan.round] = a.plan
        elif isinstance(a, CreateShardJob):
            jobs.append(ObservedJob(a.name, "shard", a.shard.round, a.shard.seed, a.attempt, "Succeeded"))
    obs = Observed(rounds, tuple(jobs))
    plan = decide(ref, spec, obs)
    merges = [a for a in plan.actions if isinstance(a, CreateMergeJob)]
    if not merges:
        return
    jobs.append(ObservedJob(merges[0].name, "merge", merges[0].round, None, 0, "Succeeded"))
    n = len([j for j in jobs if j.kind == "shard"])
    gen = n * spec.shards.examples_per_shard
    report = RoundReport(
        round=1,
        shards=n,
        generated=gen,
        new_unique=gen // 2,
        new_qc_passed=gen // 3,
        generated_total=gen,
        unique_total=gen // 2,
        qc_passed_total=gen // 3,
    )
    decide(ref, spec, dataclasses.replace(obs, jobs=tuple(jobs), reports={1: report}))


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_manifests_validate_or_are_refused_by_field(data: st.DataObject) -> None:
    doc = copy.deepcopy(data.draw(st.sampled_from(BASES)))
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(data, doc)
    try:
        ref, spec = check_manifest(doc)
    except api.SpecError as exc:
        assert exc.errors, "a refusal names at least one problem"
        assert len(exc.errors) <= MAX_ERRORS + 1
        for i, e in enumerate(exc.errors):
            if i == MAX_ERRORS:
                assert MORE_RE.match(e), e
                continue
            assert FIELD_RE.match(e) and ": " in e, e
            assert len(e) < 1200, e  # echoed values are cut
        # The planner's side of the same object: parsed alone, it is refused (a Failed/InvalidSpec plan) or planned,
        # never an exception.
        if isinstance(doc, dict) and isinstance(doc.get("spec"), dict):
            try:
                parsed = api.parse_spec(dict(doc["spec"]))
            except api.SpecError as refused:
                assert invalid_plan(refused.errors).finished
            else:
                decide(api.RunRef("fuzz"), parsed, Observed())
        return
    # Accepted: the worker's parser agrees, the spec is strict JSON (it travels to the Jobs), the planner plans it.
    assert api.parse_spec(doc["spec"]) == spec
    json.dumps(doc["spec"], allow_nan=False)
    _two_rounds(ref, spec)
