"""Merge/dedup/QC of a round on real Parquet shards in a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from genrun.operator.api import parse_spec
from genrun.worker import records as rec
from genrun.worker.merge import load_seen_index, merge_round
from genrun.worker.storage import LocalStorage

from tests.helpers import example_row, write_shard

SPEC = {"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "output": {"path": "/x"}}


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "out")


def test_keep_first_in_round_seed_index_order_with_counts(storage: LocalStorage) -> None:
    spec = parse_spec(SPEC)
    write_shard(
        storage,
        1,
        101,
        [
            example_row("What is the capital city of France?", response="Paris, on the Seine."),
            example_row("Name three prime numbers.", response="2, 3 and 5."),
        ],
    )
    write_shard(storage, 1, 100, [example_row("What's the capital city of France", response="It is Paris."),
                                  example_row("How do I boil an egg?", response="I'm sorry, I cannot help with that.")],
                skipped=3)  # fmt: skip
    report = merge_round(storage, spec, "t", 1, [(1, 100), (1, 101)])
    ds = pq.read_table(storage.location(rec.dataset_part_key(1))).to_pylist()
    # Seed 100 comes first: its France row is the kept one; seed 101's is its exact duplicate (normalised key).
    assert [(r["seed"], r["instruction"]) for r in ds] == [
        (100, "What's the capital city of France"),
        (101, "Name three prime numbers."),
    ]
    assert (report.generated, report.new_unique, report.new_qc_passed) == (7, 3, 2)
    assert report.exact_duplicates == 1 and report.qc_rejected == {"refusal": 1}
    assert report.skipped_online == 3
    assert report.top_duplicates == (("What's the capital city of France", 2),)
    assert report.duplication_ratio == pytest.approx(1 - 3 / 7)
    rejected = pq.read_table(storage.location(rec.rejected_part_key(1))).to_pylist()
    assert {(r["reject_reason"], r["duplicate_of"]) for r in rejected} == {("exact_duplicate", 0), ("refusal", None)}
    alpaca = [
        json.loads(x) for x in Path(storage.location(f"{rec.merge_prefix(1)}/alpaca.jsonl")).read_text().splitlines()
    ]
    sharegpt = [
        json.loads(x) for x in Path(storage.location(f"{rec.merge_prefix(1)}/sharegpt.jsonl")).read_text().splitlines()
    ]
    assert alpaca[0] == {"instruction": "What's the capital city of France", "input": "", "output": "It is Paris."}
    assert sharegpt[1]["conversations"][0] == {"from": "human", "value": "Name three prime numbers."}
    md = Path(storage.location(f"{rec.merge_prefix(1)}/report.md")).read_text()
    assert "| 1 | What's the capital city of France | 2 | 28.6% |" in md and "| refusal | 1 |" in md


def test_round_two_counts_only_what_is_new_and_seen_index_grows(storage: LocalStorage) -> None:
    spec = parse_spec(SPEC)
    write_shard(storage, 1, 0, [example_row("Explain how vaccines train the immune system.")])
    r1 = merge_round(storage, spec, "t", 1, [(1, 0)])
    write_shard(storage, 2, 1, [example_row("Explain how vaccines train the immune system!"),
                                example_row("Explain how vaccines train the human immune system."),
                                example_row("Give me a recipe for pancakes without eggs.")])  # fmt: skip
    r2 = merge_round(storage, spec, "t", 2, [(1, 0), (2, 1)])
    assert (r1.unique_total, r2.unique_total, r2.new_unique, r2.generated, r2.generated_total) == (1, 2, 1, 3, 4)
    assert r2.exact_duplicates == 1 and r2.near_duplicates == 1
    assert r2.marginal_yield == pytest.approx(1 / 3)
    seen = load_seen_index(storage, 2)
    assert seen is not None and len(seen) == 2


def test_idempotent_and_atomic_rerun(storage: LocalStorage) -> None:
    spec = parse_spec(SPEC)
    write_shard(storage, 1, 0, [example_row("What is machine learning in simple words?")])
    first = merge_round(storage, spec, "t", 1, [(1, 0)])
    before = Path(storage.location(rec.round_report_key(1))).stat().st_mtime_ns
    again = merge_round(storage, spec, "t", 1, [(1, 0)])
    assert again == first and Path(storage.location(rec.round_report_key(1))).stat().st_mtime_ns == before
    assert not [p for p in Path(storage.root).rglob("*.tmp")]


def test_corrupt_shard_is_quarantined_not_fatal_and_missing_is_reported(storage: LocalStorage) -> None:
    spec = parse_spec(SPEC)
    write_shard(storage, 1, 0, [example_row("How do plants make their food from sunlight?")])
    write_shard(storage, 1, 1, [example_row("Describe the water cycle in four steps.")])
    Path(storage.location(rec.shard_data_key(1, 1))).write_bytes(b"PAR1 this is not parquet")
    report = merge_round(storage, spec, "t", 1, [(1, 0), (1, 1), (1, 2)])
    assert report.qc_passed_total == 1
    assert report.quarantined == (rec.shard_data_key(1, 1),)
    assert storage.exists(f"quarantine/{rec.shard_data_key(1, 1)}.json")
    assert storage.exists(rec.shard_data_key(1, 1))  # nothing is deleted
    md = Path(storage.location(f"{rec.merge_prefix(1)}/report.md")).read_text()
    assert "missing (shard failed or not published): shards/r0001/s0000000002.parquet" in md
