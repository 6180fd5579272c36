"""Partitioned dedup (map per input partition, reduce per band partition, then the merge finalises) gives exactly
the single-process result, on shards with exact repeats and near-duplicates across partitions."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.worker.cli import main as worker_main
from genrun.worker.merge import load_seen_index, merge_round
from genrun.worker.storage import LocalStorage

from tests.helpers import example_row, write_shard

WORDS = [
    "apple",
    "river",
    "mountain",
    "quickly",
    "explain",
    "python",
    "history",
    "music",
    "garden",
    "ocean",
    "theory",
    "stars",
    "code",
    "bread",
]


def make_shards(storage: LocalStorage, seed: int = 3) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    bases = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10))) for _ in range(40)]
    ids = []
    for rnd, seeds in ((1, (10, 11, 12)), (2, (13, 14, 15, 16))):
        for s in seeds:
            rows = []
            for _ in range(60):
                w = rng.choice(bases).split()
                k = rng.random()
                if k < 0.3:
                    w.insert(rng.randrange(len(w)), rng.choice(WORDS))  # a near-duplicate
                text = " ".join(w).capitalize() + ("?" if k < 0.6 else "!")
                rows.append(example_row(text, response=f"An answer about {w[0]} with enough words to pass QC."))
            write_shard(storage, rnd, s, rows)
            ids.append((rnd, s))
    return ids


@pytest.mark.parametrize(("parts", "corrupt"), [(2, False), (3, False), (3, True)])
def test_partitioned_equals_single_process(
    tmp_path: Path, parts: int, corrupt: bool, caplog: pytest.LogCaptureFixture
) -> None:
    base = {"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "output": {"path": "/x"}}
    single, multi = LocalStorage(tmp_path / "single"), LocalStorage(tmp_path / "multi")
    ids = make_shards(single)
    make_shards(multi)
    if corrupt:  # an unreadable shard and a truncated marker: the merge quarantines them, the maps leave them out
        for st in (single, multi):
            Path(st.location(rec.shard_data_key(2, 14))).write_bytes(b"PAR1 not parquet")
            Path(st.location(rec.shard_manifest_key(2, 15))).write_bytes(b'{"round": 2, "se')
    spec = parse_spec({**base, "dedup": {"partitions": parts}})
    # Round 1 merged the same way in both; round 2 partitioned in one, single-process in the other.
    merge_round(single, parse_spec(base), "t", 1, ids)
    merge_round(multi, parse_spec(base), "t", 1, ids)
    r1 = merge_round(single, parse_spec(base), "t", 2, ids)
    job = tmp_path / "job.json"
    job.write_text(
        rec.to_json(
            rec.JobSpec(
                "merge",
                "t",
                "default",
                {**base, "dedup": {"partitions": parts}, "output": {"path": str(multi.root)}},
                2,
                shards=tuple(ids),
            )
        )
    )
    # Each step as the separate command an Indexed Job pod runs.
    for i in range(parts):
        assert worker_main(["dedup-map", "--job", str(job), "--index", str(i)]) == 0
    for i in range(parts):
        assert worker_main(["dedup-reduce", "--job", str(job), "--index", str(i)]) == 0
    caplog.clear()
    r2 = merge_round(multi, spec, "t", 2, ids)
    assert not [r for r in caplog.records if "computing" in r.getMessage()]  # the reducers' matches were used
    assert r1.duplicates["near"] > 0 and r1.duplicates["exact"] > 0
    assert replace(r1, dataset="", report="") == replace(r2, dataset="", report="")
    a = pq.read_table(single.location(rec.DATASET_PREFIX)).to_pylist()
    b = pq.read_table(multi.location(rec.DATASET_PREFIX)).to_pylist()
    assert a == b
    s1, s2 = load_seen_index(single, 2), load_seen_index(multi, 2)
    assert s1 is not None and s2 is not None
    assert (s1.exact == s2.exact).all() and (s1.sigs == s2.sigs).all()


def test_merge_command_runs_all_partitions_on_one_machine(tmp_path: Path) -> None:
    base = {"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "dedup": {"partitions": 2}}
    store = LocalStorage(tmp_path / "out")
    ids = make_shards(store)
    job = tmp_path / "job.json"
    job.write_text(
        rec.to_json(
            rec.JobSpec("merge", "t", "default", {**base, "output": {"path": str(store.root)}}, 2, shards=tuple(ids))
        )
    )
    assert worker_main(["merge", "--job", str(job)]) == 0
    assert store.exists(rec.round_report_key(2)) and store.exists("merge/r0002/reduce/bands-0001.npz")
