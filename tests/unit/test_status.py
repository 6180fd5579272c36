"""The typed run status (genrun.contract.status): its fields are the CRD's status schema, both ways; it reads back
what it writes (any value hypothesis finds, through JSON); it reads status.json files written by older runs and
tolerates junk in them; and the planner's status, published by the loop, is the document on storage."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, get_args, get_origin

from genrun.contract import records as rec
from genrun.contract.status import (
    RoundEntry,
    RunCondition,
    RunStatus,
    Totals,
    Wire,
    wire_paths,
)
from genrun.operator.simulate import run_instantly
from genrun.operator.validate import load_crd
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_policy import CELL_PROMPT, CELL_YIELD, REF, instant_merge, spec_of

CRD_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def crd_status_paths() -> dict[str, str]:
    """path -> CRD type of every property under .status ("rounds[].marginalYield")."""
    schema = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    out: dict[str, str] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, sub in (node.get("properties") or {}).items():
            out[prefix + key] = sub["type"]
            if sub["type"] == "array" and isinstance(sub.get("items"), dict):
                walk(sub["items"], f"{prefix}{key}[].")
            elif sub["type"] == "object":
                walk(sub, f"{prefix}{key}.")

    walk(schema, "")
    return out


def crd_type(tp: Any) -> str:
    if get_origin(tp) is tuple:
        return "array"
    if get_origin(tp) is dict or (isinstance(tp, type) and issubclass(tp, Wire)):
        return "object"
    return CRD_TYPES[tp]


def test_the_status_writes_exactly_the_fields_the_crd_declares_with_their_types() -> None:
    """The CRD is the one source of the names: a field the API server would prune (undeclared), or one declared and
    never written, fails here; so does a type that differs (integer vs number...)."""
    ours = {path: crd_type(tp) for path, tp in wire_paths(RunStatus)}
    crd = crd_status_paths()
    assert sorted(ours.keys() - crd.keys()) == [], "written, not in the CRD's status schema"
    assert sorted(crd.keys() - ours.keys()) == [], "in the CRD's status schema, never written"
    assert {p: t for p, t in ours.items() if crd[p] != t} == {}


def test_the_check_sees_a_nested_field() -> None:
    paths = dict(wire_paths(RunStatus))
    assert {"totals.duplicates", "rounds[].marginalYield", "cells[].yield", "conditions[].type"} <= set(paths)
    assert paths["totals.dedupTiers"] == tuple[str, ...] and paths["cells[].attributes"] == dict[str, str]
    assert paths["totals.duplicates"] == dict[str, int]


def test_the_crd_keeps_a_count_for_any_tier() -> None:
    """The per-tier counts are keyed by tier name, integers: a tier added to the contract is kept by the API server
    (an undeclared key of a listed schema would be pruned)."""
    schema = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    dup = schema["properties"]["totals"]["properties"]["duplicates"]
    assert dup["type"] == "object" and dup["additionalProperties"] == {"type": "integer"} and "properties" not in dup


# -- round trip over any value ----------------------------------------------------------------------------------


def strategy(tp: Any) -> st.SearchStrategy[Any]:
    """Any value of a status type, built from its dataclass fields (so a new field is covered without a change)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        (inner,) = [a for a in get_args(tp) if a is not type(None)]
        return st.none() | strategy(inner)
    if get_origin(tp) is tuple:
        return st.lists(strategy(get_args(tp)[0]), max_size=3).map(tuple)
    if get_origin(tp) is dict:
        keys = st.sampled_from(rec.DUPLICATE_TIERS) | st.text(max_size=8)
        return st.dictionaries(keys, strategy(get_args(tp)[1]), max_size=3)
    if isinstance(tp, type) and issubclass(tp, Wire):
        hints = typing.get_type_hints(tp)
        fields = {f.name: strategy(hints[f.name]) for f in dataclasses.fields(tp)}  # type: ignore[arg-type]
        return st.fixed_dictionaries(fields).map(lambda kw: tp(**kw))
    return {
        int: st.integers(-(2**53), 2**53),
        float: st.floats(allow_nan=False, allow_infinity=False),
        str: st.text(max_size=20),
        bool: st.booleans(),
    }[tp]


@settings(max_examples=200, deadline=None)
@given(strategy(RunStatus))
def test_from_dict_reads_back_what_to_dict_writes_through_json(status: RunStatus) -> None:
    assert RunStatus.from_dict(status.to_dict()) == status
    assert RunStatus.from_dict(json.loads(json.dumps(status.to_dict()))) == status


def test_optional_figures_are_left_out_until_they_exist() -> None:
    planned = RoundEntry(round=2, shards=4, seeds="110-113", temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    assert planned.to_dict() == {"round": 2, "shards": 4, "seeds": "110-113", "temperature": 0.8, "topP": 0.9,
                                 "repetitionPenalty": 1.2}  # fmt: skip
    keys = RunStatus().to_dict().keys()
    assert "output" not in keys and "arms" not in keys and "projectedRounds" not in keys and "cells" not in keys


# -- older and damaged documents --------------------------------------------------------------------------------

# The status of a run written before the planned counts, the per-tier duplicates and the arms existed.
OLD = {
    "observedGeneration": 2,
    "round": 2,
    "totals": {"generated": 800, "unique": 600, "qcPassed": 550, "duplicationRatio": 0.25,
               "duplicationPercent": "25.0%", "shardsSucceeded": 8},
    "rounds": [
        {"round": 1, "shards": 4, "seeds": "100-103", "temperature": 0.7, "topP": 0.9, "repetitionPenalty": 1.1,
         "generated": 400, "newUnique": 330, "unique": 330, "qcPassed": 300, "marginalYield": 0.75, "qcPassRate": 0.9},
        {"round": 2, "shards": 4, "seeds": "104-107", "temperature": 0.8, "topP": 0.9, "repetitionPenalty": 1.2},
    ],
    "topDuplicates": [{"instruction": "Say hi", "count": 7}],
    "output": {"dataset": "out/merge/r0001/dataset.parquet", "report": "out/merge/r0001/report.md"},
    "conditions": [{"type": "Progressing", "status": "True", "reason": "ShardsRunning", "message": "round 2",
                    "observedGeneration": 2, "lastTransitionTime": "2026-11-20T10:00:00Z"}],
}  # fmt: skip


def test_a_status_json_of_an_older_run_reads_with_defaults() -> None:
    st_ = RunStatus.from_dict(OLD)
    assert (
        st_.totals.qc_passed == 550
        and st_.totals.rounds_planned == 0
        and st_.totals.duplicates == dict.fromkeys(rec.DUPLICATE_TIERS, 0)
    )
    assert st_.totals.dedup_tiers == () and st_.arms is None and st_.cells is None
    assert st_.rounds[0].marginal_yield == 0.75 and st_.rounds[1].marginal_yield is None
    assert st_.condition("Progressing") == RunCondition(
        "Progressing", "True", "ShardsRunning", "round 2", 2, "2026-11-20T10:00:00Z"
    )
    assert st_.to_dict()["rounds"] == OLD["rounds"] and st_.to_dict()["output"] == OLD["output"]


def test_junk_in_a_status_takes_defaults_instead_of_failing() -> None:
    junk = {
        "round": "3",  # a string: the default
        "totals": ["not", "an", "object"],
        "rounds": [{"round": 1, "shards": True}, "junk", 7],  # True is no shard count; the non-objects are dropped
        "conditions": ["not a dict", {"type": "Succeeded"}],
        "arms": None,
        "somethingNew": {"x": 1},  # a field of a later version: ignored
    }
    st_ = RunStatus.from_dict(junk)
    assert st_.round == 0 and st_.totals == Totals() and st_.rounds == (RoundEntry(round=1),)
    assert st_.conditions == (RunCondition(type="Succeeded"),) and st_.conditions[0].status == "Unknown"
    assert st_.arms is None and "somethingNew" not in st_.to_dict()


# -- the planner's status on the wire ----------------------------------------------------------------------------


def test_a_planned_run_with_arms_and_cells_round_trips_exactly() -> None:
    """Every status of a simulated bandit run over attribute cells: what is written reads back equal, and writing it
    again gives the same JSON text (key order included)."""
    spec = spec_of(prompt=CELL_PROMPT, target={"uniqueExamples": 8000}, budget={"maxRounds": 30, "maxShards": 5000})
    merge = instant_merge(lambda s: math.floor(s.examples * CELL_YIELD[s.cell]))
    _, plans = run_instantly(REF, spec, merge, 200)
    statuses = [p.status for p in plans if p.status is not None]
    assert statuses[-1].cells and statuses[-1].arms and statuses[-1].output
    for s in statuses:
        text = json.dumps(s.to_dict())
        again = RunStatus.from_dict(json.loads(text))
        assert again == s and json.dumps(again.to_dict()) == text
