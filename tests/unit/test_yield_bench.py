"""bench/yield.py's floor: each arm's tokens per kept example with duplicates free, on a hand-made output folder whose
figures are worked out by hand below (the real-engine script itself takes minutes; its runs are the README's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq
from genrun.contract import records as rec

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("yield_bench", ROOT / "bench" / "yield.py")  # `yield` is a keyword
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _shard(out: Path, seed: int, tokens: int, skipped: tuple[int, int], instruction_tokens: list[int]) -> None:
    marker = rec.ShardManifest(1, seed, len(instruction_tokens), 0, skipped[0], skipped[1], 0, tokens, 1.0, "")
    (out / rec.shard_manifest_key(1, seed)).parent.mkdir(parents=True, exist_ok=True)
    (out / rec.shard_manifest_key(1, seed)).write_text(rec.to_json(marker))
    pq.write_table(pa.table({"instruction_tokens": instruction_tokens}), out / rec.shard_data_key(1, seed))


def _folder(out: Path) -> None:
    """Arm a: seeds 1 and 2; arm b: seed 3 (too few kept rows to count towards the floor)."""
    sampling = rec.Sampling(0.7, 0.9, 1.1, 0.0, 128)
    shards = tuple(
        rec.ShardPlan(1, seed, seed - 1, 10, sampling, arm=arm) for seed, arm in ((1, "a"), (2, "a"), (3, "b"))
    )
    (out / rec.round_plan_key(1)).parent.mkdir(parents=True)
    (out / rec.round_plan_key(1)).write_text(rec.to_json(rec.RoundPlan(1, shards, sampling)))
    _shard(out, 1, 1000, (2, 1), [10] * 10)  # 3 skipped at a mean of 10 instruction tokens: 30 of its 1,000
    _shard(out, 2, 800, (0, 0), [20] * 8)
    _shard(out, 3, 100, (0, 0), [5])
    (out / "rejected").mkdir()
    # seed 2's duplicate cost 70 tokens; its QC reject is a cost the arm pays all the same
    rejected = {"seed": [2, 2], "duplicate_of": [7, None], "instruction_tokens": [20, 20], "response_tokens": [50, 50]}
    pq.write_table(pa.table(rejected), out / "rejected" / "r0001.parquet")
    (out / "dataset" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"seed": [1] * 9 + [2] * 6 + [3]}), out / "dataset" / "data" / "train-r0001.parquet")


def test_arm_costs_leave_out_what_duplicates_cost(tmp_path: Path) -> None:
    bench = _bench()
    _folder(tmp_path)
    costs = bench.arm_costs(tmp_path)
    kept_a, cost_a = costs["a"]
    assert kept_a == 15 and abs(cost_a - (1000 - 30 + 800 - 70) / 15) < 1e-9
    assert costs["b"] == (1, 100.0)


def test_floor_takes_the_cheapest_arm_with_enough_kept_rows(tmp_path: Path) -> None:
    bench = _bench()
    _folder(tmp_path)
    floor, arm = bench.floor_tokens(100, [tmp_path])
    assert arm == "a" and abs(floor - 100 * 1700 / 15) < 1e-6  # b (100 tokens a kept row) kept 1 row: not counted
