"""QC before responses (`generation.qcBeforeResponse`): the instruction side of the QC filters runs in the
generator on each novel instruction, before any response token is paid for. What must hold:
- it rejects only rows the merge's full QC rejects, whatever their response (property test over random rows);
- on the replay engine (recorded real SmolLM2 outputs), a shard with the check writes exactly the rows of the same
  shard without it whose instruction passes, rejects the others with the merge's reason, and spends exactly their
  response tokens less;
- the merge counts those rejects as unique, QC-rejected examples of their shard (report, per-shard yields, markdown),
  so duplication and QC-pass rates, and the bandit's reward, mean what they meant without the check.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from genrun.contract import records as rec
from genrun.contract.api import QcFilter, RunRef, parse_spec
from genrun.worker.engine import ReplayEngine
from genrun.worker.generate import Gate, generate_shard
from genrun.worker.merge import merge_round
from genrun.worker.qc import QcPipeline
from genrun.worker.storage import LocalStorage
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import example_row, write_shard

ROOT = Path(__file__).resolve().parents[2]

FILTERS = (
    QcFilter("length", {"minInstructionChars": 12, "maxInstructionChars": 60}),
    QcFilter("bannedPatterns", {"patterns": [r"\bforbidden\b", "(?<!x)lookbehind"]}),  # RE2 and Python's re
    QcFilter("finishReason"),
    QcFilter("refusal"),
    QcFilter("echo"),
    QcFilter("repetition"),
    QcFilter("logprob", {"minInstructionLogprob": -2.0, "minResponseLogprob": -2.5}),
    QcFilter("request", {"requestWords": ["ab", "x"]}),  # last: the filters above still give their reasons
)
texts = st.text(st.sampled_from(list("ab cd?!é forbidden lookbehind x\n")), max_size=80)
logprobs = st.one_of(st.floats(-4, 0), st.sampled_from([-2.0, math.nan, -math.inf, math.inf]))


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "instruction": texts,
                "response": texts,
                "instruction_logprob": logprobs,
                "response_logprob": logprobs,
                "finish_reason": st.sampled_from(["stop", "length"]),
            }
        ),
        min_size=1,
        max_size=8,
    )
)
def test_the_instruction_side_rejects_only_what_full_qc_rejects(rows: list[dict[str, Any]]) -> None:
    full, side = QcPipeline.from_spec(FILTERS), QcPipeline.instruction_side(FILTERS)
    table = pa.Table.from_pylist([example_row(**r) for r in rows], schema=rec.example_schema())
    early = side.check_table(table)
    assert all(late is not None for e, late in zip(early, full.check_table(table), strict=True) if e is not None)
    # With a response every filter passes, the merge gives the very reason the generator recorded (echo left out:
    # it compares the two texts, so a random instruction could echo the fixed response)
    clean = pa.Table.from_pylist([example_row(r["instruction"], instruction_logprob=r["instruction_logprob"])
                                  for r in rows], schema=rec.example_schema())  # fmt: skip
    no_echo = QcPipeline.from_spec([f for f in FILTERS if f.name != "echo"])
    assert no_echo.check_table(clean) == early


def _spec(tmp: Path, gate: bool) -> Any:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["output"] = {"path": str(tmp)}
    raw["generation"] = {"batchSize": 16, "qcBeforeResponse": gate}
    return parse_spec(raw)


def _shard(spec: Any) -> rec.ShardPlan:
    return rec.ShardPlan(1, 100, 0, 40, rec.Sampling(0.7, 0.9, 1.1, 0.0, 64), tuple(spec.prompt.domains))


def _run(tmp: Path, gate: bool) -> tuple[rec.ShardManifest, list[dict[str, Any]], list[dict[str, Any]]]:
    spec = _spec(tmp, gate)
    storage = LocalStorage(tmp)
    m = generate_shard(storage, spec, _shard(spec), ReplayEngine())
    rows = pq.read_table(tmp / rec.shard_data_key(1, 100)).to_pylist()
    rejected = pq.read_table(tmp / rec.shard_rejected_key(1, 100)).to_pylist()
    return m, rows, rejected


EMBEDDED = ("relevance", "domain_margin")  # the rows' columns computed by the embedding model


def _but_scores(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in EMBEDDED}


def test_a_shard_with_the_check_drops_exactly_the_rows_qc_would_and_their_response_tokens(tmp_path: Path) -> None:
    off, off_rows, _ = _run(tmp_path / "off", False)
    on, on_rows, on_rejected = _run(tmp_path / "on", True)
    spec = _spec(tmp_path, True)
    side, full = QcPipeline.instruction_side(spec.qc.filters), QcPipeline.from_spec(spec.qc.filters)
    off_table = pa.Table.from_pylist(off_rows, schema=rec.example_schema())
    early_of = dict(zip((r["index"] for r in off_rows), side.check_table(off_table), strict=True))
    assert not off.qc_rejected_before_response and any(early_of.values())
    # the same examples: rows where the instruction passes, QC rejects (with the instruction side's reason) elsewhere
    assert [r["index"] for r in on_rows] == [i for i, why in early_of.items() if why is None]
    # The same rows, but for the embedding model's scores: it embeds each shard's rows in other batches, and a
    # matrix product's last digits depend on the batch it is part of.
    same = [r for r in off_rows if early_of[r["index"]] is None]
    assert [_but_scores(r) for r in on_rows] == [_but_scores(r) for r in same]
    for got, want in ((r[k], w[k]) for r, w in zip(on_rows, same, strict=True) for k in EMBEDDED):
        assert got == want if want is None else got == pytest.approx(want, rel=1e-4, abs=1e-6)
    gated = {r["index"]: r["reason"] for r in on_rejected if r["index"] in early_of and early_of[r["index"]]}
    assert gated == {i: why for i, why in early_of.items() if why is not None}
    assert sum(on.qc_rejected_before_response.values()) == len(gated) and on.rows + len(gated) == off.rows
    # every one of them is a row the merge's QC drops; the tokens saved are exactly their responses'
    assert all(v is not None for v, r in zip(full.check_table(off_table), off_rows, strict=True) if r["index"] in gated)
    assert off.tokens - on.tokens == sum(r["response_tokens"] for r in off_rows if r["index"] in gated)
    assert (on.generated, on.skipped_online + on.skipped_in_shard) == (
        off.generated,
        off.skipped_online + off.skipped_in_shard,
    )


@pytest.mark.parametrize(("gate", "mode", "on"), [(True, "instructionsFirst", True), (False, "instructionsFirst", False),
                                                  (True, "joint", False)])  # fmt: skip
def test_the_check_runs_only_where_it_saves_responses(tmp_path: Path, gate: bool, mode: str, on: bool) -> None:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["generation"] = {"mode": mode, "qcBeforeResponse": gate}
    assert (Gate.for_shard(parse_spec(raw)).qc is not None) == on
    raw["qc"] = {"filters": [{"name": "refusal"}, {"name": "echo"}]}  # nothing judges the instruction alone
    assert Gate.for_shard(parse_spec(raw)).qc is None


def test_the_merge_counts_them_as_unique_qc_rejected_examples_of_their_shard(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    spec = parse_spec({"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "output": {"path": "/x"}})
    write_shard(storage, 1, 100, [example_row("Name three prime numbers."), example_row("How do I boil an egg?")],
                early={"low_logprob": 3, "instruction_too_short": 1})  # fmt: skip
    write_shard(storage, 1, 101, [example_row("Name three prime numbers!")], skipped=2)
    write_shard(storage, 1, 103, [], early={"low_logprob": 2})  # a hot arm's probe: every instruction rejected
    report = merge_round(storage, spec, "t", 1, [(1, 100), (1, 101), (1, 103)])
    assert (report.generated, report.new_unique, report.new_qc_passed) == (11, 8, 2)
    assert report.qc_rejected == {"instruction_too_short": 1, "low_logprob": 5}
    assert report.qc_rejected_before_response == 6 and report.qc_pass_rate == pytest.approx(2 / 8)
    # seed 101's row is new against earlier rounds (the bandit's measure) but seed 100 had it first: kept 0
    assert report.per_shard == (
        rec.ShardYield(100, 6, 40, 6, 2, generated=6, kept=2), rec.ShardYield(101, 1, 20, 1, 1, generated=3, kept=0),
        rec.ShardYield(103, 2, 0, 2, 0, generated=2, kept=0),
    )  # fmt: skip
    md = Path(storage.location(f"{rec.merge_prefix(1)}/report.md")).read_text()
    assert "| Rejected by QC in the generators before their responses (in unique and QC rejections) | 6 | |" in md
    # cumulative over rounds, and kept in the merge state a later round starts from
    write_shard(storage, 2, 102, [example_row("What is the capital city of Peru?")], early={"low_logprob": 2})
    report2 = merge_round(storage, spec, "t", 2, [(1, 100), (1, 101), (1, 103), (2, 102)])
    assert report2.qc_rejected_before_response == 8 and report2.qc_rejected["low_logprob"] == 7
    assert (report2.new_unique, report2.unique_total) == (3, 11)


def test_a_marker_with_damaged_counts_is_set_aside() -> None:
    good = rec.ShardManifest(1, 1, 0, 0, 0, 0, 0, 0, 0.0, "d", qc_rejected_before_response={"low_logprob": 2})
    assert rec.parse_marker(rec.to_json(good).encode()) == good
    raw = rec.to_json(good).replace('"low_logprob": 2', '"low_logprob": -2').encode()
    with pytest.raises(rec.DamagedMarker, match="qc_rejected_before_response"):
        rec.parse_marker(raw)


def test_the_status_shows_them_among_the_unique() -> None:
    from genrun.operator.planner import Observed, decide

    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    spec = parse_spec({**raw, "policy": {"strategy": "ladder"}})
    first = decide(RunRef("q"), spec, Observed())
    rnd = next(a.plan for a in first.actions if hasattr(a, "plan"))
    rep = rec.RoundReport(1, len(rnd.shards), 80, 50, 40, 80, 50, 40, qc_rejected_before_response=7)
    st = decide(RunRef("q"), spec, Observed(rounds={1: rnd}, reports={1: rep})).status
    assert st.totals.qc_rejected_before_response == 7 and st.totals.unique == 50
    assert st.to_dict()["totals"]["qcRejectedBeforeResponse"] == 7
