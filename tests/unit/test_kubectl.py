"""What kubectl and generic health tools see: every CRD property described (`kubectl explain`), printer columns that
tell the run's state apart and print percentages, and kstatus-style Ready/Reconciling/Stalled conditions."""

from __future__ import annotations

import re
from typing import Any

import pytest
from genrun.operator import conditions as c
from genrun.operator import planner
from genrun.operator.validate import load_crd

T0 = "2026-11-25T10:00:00Z"


def _undescribed(node: dict[str, Any], path: str = "") -> list[str]:
    out = []
    for key, sub in (node.get("properties") or {}).items():
        if not str(sub.get("description", "")).strip():
            out.append(f"{path}.{key}")
        out += _undescribed(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        out += _undescribed(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _undescribed(node["additionalProperties"], f"{path}{{}}")
    return out


def test_every_crd_property_has_a_description() -> None:
    schema = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    walked = _undescribed({"properties": {"x": {**schema, "description": "root"}}})
    assert walked == []
    # The walk really reaches nested fields: dropping one nested description is found.
    schema["properties"]["spec"]["properties"]["model"]["properties"]["dtype"].pop("description")
    assert _undescribed(schema) == [".spec.model.dtype"]


def _jsonpath(obj: Any, path: str) -> str | None:
    """The subset of JSONPath the CRD's columns use (.a.b and [?(@.k=="v")].f), printed as the API server's table
    convertor prints it: the FIRST match only (apiextensions-apiserver tableconvertor takes results[0][0])."""
    current: list[Any] = [obj]
    for part in re.findall(r'\.[A-Za-z]+|\[\?\(@\.[A-Za-z]+=="[^"]*"\)\]', path):
        nxt: list[Any] = []
        if part.startswith("[?"):
            m = re.fullmatch(r'\[\?\(@\.([A-Za-z]+)=="([^"]*)"\)\]', part)
            assert m
            for x in current:
                nxt += [i for i in (x if isinstance(x, list) else []) if isinstance(i, dict) and i.get(m[1]) == m[2]]
        else:
            nxt = [x[part[1:]] for x in current if isinstance(x, dict) and part[1:] in x]
        current = nxt
    return None if not current else str(current[0])


def _run(conds: tuple[c.Condition, ...], ratio: float = 0.17188) -> dict[str, Any]:
    return {
        "spec": {"target": {"uniqueExamples": 100}},
        "status": {
            "round": 2,
            "conditions": [x.to_dict() for x in c.merge_conditions((), conds, 1, T0)],
            "totals": {"qcPassed": 40, "unique": 50, "duplicationPercent": f"{ratio:.1%}"},
        },
    }


STATES = {
    "Progressing": planner._running(c.SHARDS_RUNNING, "round 2: 1/4 shard(s) done, 3 running", False),
    "Suspended": planner._running(c.SUSPENDED_BY_SPEC, "40/100 after round 2", True),
    "Failed": planner._failed(c.BUDGET_EXHAUSTED, "40/100; spec.budget.maxRounds=2 reached"),
    "Succeeded": planner._succeeded("100 unique QC-passed examples >= target 100"),
}


@pytest.mark.parametrize("state", list(STATES))
def test_status_column_tells_the_states_apart(state: str) -> None:
    cols = {col["name"]: col for col in load_crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    run = _run(STATES[state])
    assert _jsonpath(run, cols["Status"]["jsonPath"]) == state
    assert _jsonpath(run, cols["Dup"]["jsonPath"]) == "17.2%" and cols["Dup"]["type"] == "string"
    assert _jsonpath(run, cols["Kept"]["jsonPath"]) == "40"
    assert _jsonpath({"status": {}}, cols["Status"]["jsonPath"]) is None  # before the first reconcile: empty


@pytest.mark.parametrize(
    ("state", "ready", "reconciling", "stalled"),
    [
        ("Progressing", "False", "True", "False"),
        ("Suspended", "False", "False", "False"),
        ("Failed", "False", "False", "True"),
        ("Succeeded", "True", "False", "False"),
    ],
)
def test_kstatus_conditions(state: str, ready: str, reconciling: str, stalled: str) -> None:
    conds = {x.type: x for x in STATES[state]}
    assert (conds[c.READY].status, conds[c.RECONCILING].status, conds[c.STALLED].status) == (
        ready,
        reconciling,
        stalled,
    )
    assert all(x.reason and re.fullmatch(r"[A-Z][A-Za-z]*", x.reason) for x in conds.values())
    if state == "Failed":
        assert conds[c.READY].reason == conds[c.STALLED].reason == c.BUDGET_EXHAUSTED
    if state == "Succeeded":
        assert conds[c.READY].reason == c.TARGET_MET


def test_invalid_spec_is_stalled_and_not_ready() -> None:
    conds = {x.type: x.status for x in planner.invalid_plan(["spec.x: bad"]).conditions}
    assert (conds[c.READY], conds[c.STALLED], conds[c.RECONCILING], conds[c.FAILED]) == (
        "False",
        "True",
        "False",
        "True",
    )


def test_conditions_fit_the_crd_bound() -> None:
    bound = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert all(len(conds) <= bound["conditions"]["maxItems"] for conds in STATES.values())
