"""Rows record the attribute values (spec.prompt.attributes) their prompt was built with, in the `attributes` column,
so that a user can filter the dataset by them and audit coverage: for shards the real planner gave a cell, for
shards that draw values per prompt, and through the merge into the dataset. Real generator and merge; the replay
engine serves recorded SmolLM2 outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml
from genrun.contract import records as rec
from genrun.contract.api import RunRef, parse_spec
from genrun.worker.engine import Completion, Params, ReplayEngine
from genrun.worker.generate import generate_shard
from genrun.worker.prompts import prompt_hash
from genrun.worker.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[2]
ATTRIBUTES = [
    {"name": "task", "values": ["explain", "how-to", "compare"]},
    {"name": "audience", "values": ["kids", "experts"]},
]


def _spec(tmp: Path, attributes: list[dict[str, Any]] | None = ATTRIBUTES, **prompt: Any) -> Any:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["output"] = {"path": str(tmp / "out")}
    raw["shards"]["examplesPerShard"] = 24
    if attributes:
        raw["prompt"]["attributes"] = attributes
    raw["prompt"].update(prompt)
    return parse_spec(raw)


class Recording:
    """The replay engine, keeping each instruction prompt by its hash (the rows' prompt_hash names the prompt)."""

    def __init__(self) -> None:
        self.engine, self.model = ReplayEngine(), "replay:smollm2-135m"
        self.prompts: dict[str, str] = {}

    def generate(self, prompts: list[str], params: list[Params]) -> list[list[Completion]]:
        self.prompts.update({prompt_hash(p): p for p in prompts})
        return self.engine.generate(prompts, params)


def _rows(tmp: Path, shard: rec.ShardPlan) -> list[dict[str, Any]]:
    return pq.read_table(tmp / "out" / rec.shard_data_key(shard.round, shard.seed)).to_pylist()


def test_rows_of_planned_cells_carry_their_cell_and_the_prompt_named_it(tmp_path: Path) -> None:
    """Round 1 as the planner plans it (a pilot over several cells): every row's attributes are its shard's cell,
    and the prompt that made the row (found by its prompt_hash) says those values."""
    from genrun.operator.planner import Observed, RecordRound, decide

    spec = _spec(tmp_path)
    plan = next(a.plan for a in decide(RunRef("t"), spec, Observed()).actions if isinstance(a, RecordRound))
    assert len({s.cell for s in plan.shards}) >= 2 and all(s.cell for s in plan.shards)
    engine = Recording()
    storage = LocalStorage(tmp_path / "out")
    for shard in plan.shards[:3]:
        generate_shard(storage, spec, shard, engine)
        rows = _rows(tmp_path, shard)
        assert rows
        for r in rows:
            assert json.loads(r["attributes"]) == dict(shard.cell)
            prompt = engine.prompts[r["prompt_hash"]]
            assert all(f"{k}: {v}" in prompt for k, v in shard.cell)


def test_rows_of_a_shard_without_a_cell_carry_the_values_drawn_for_their_prompt(tmp_path: Path) -> None:
    """No cell: each prompt draws its values; the row records that prompt's, in the spec's attribute order, and a
    template that names an attribute gets the same value the row records."""
    spec = _spec(tmp_path, template="Write {task} questions for {audience} about {domain}.\n\n{examples}")
    shard = rec.ShardPlan(1, 100, 0, 24, rec.Sampling(0.7, 0.9, 1.1, 0.0, 64), tuple(spec.prompt.domains))
    engine = Recording()
    generate_shard(LocalStorage(tmp_path / "out"), spec, shard, engine)
    rows = _rows(tmp_path, shard)
    seen = set()
    for r in rows:
        values = json.loads(r["attributes"])
        assert list(values) == ["task", "audience"]
        assert engine.prompts[r["prompt_hash"]].startswith(f"Write {values['task']} questions for {values['audience']}")
        seen.add(tuple(values.values()))
    assert len(seen) >= 4  # 24 rows over 6 cells: the draws vary per prompt


def test_without_attributes_the_column_is_null(tmp_path: Path) -> None:
    spec = _spec(tmp_path, attributes=None)
    shard = rec.ShardPlan(1, 100, 0, 8, rec.Sampling(0.7, 0.9, 1.1, 0.0, 64), tuple(spec.prompt.domains))
    generate_shard(LocalStorage(tmp_path / "out"), spec, shard, ReplayEngine())
    rows = _rows(tmp_path, shard)
    assert rows and all(r["attributes"] is None for r in rows)


def test_the_dataset_keeps_each_rows_attributes(tmp_path: Path) -> None:
    """Through the merge: the dataset part's rows carry the attributes their shard row had."""
    from genrun.worker.merge import merge_round

    spec = _spec(tmp_path)
    storage = LocalStorage(tmp_path / "out")
    shards = [
        rec.ShardPlan(1, seed, seed, 24, rec.Sampling(0.7, 0.9, 1.1, 0.0, 64), tuple(spec.prompt.domains), cell=cell)
        for seed, cell in ((100, (("task", "compare"), ("audience", "kids"))), (101, ()))
    ]
    by_key = {}
    for shard in shards:
        generate_shard(storage, spec, shard, ReplayEngine())
        by_key.update({(r["seed"], r["index"]): r["attributes"] for r in _rows(tmp_path, shard)})
    merge_round(storage, spec, "t", 1, [(1, s.seed) for s in shards])
    part = pq.read_table(tmp_path / "out" / rec.dataset_part_key(1)).to_pylist()
    assert part and {r["seed"] for r in part} == {100, 101}
    assert all(r["attributes"] == by_key[(r["seed"], r["index"])] and r["attributes"] for r in part)
