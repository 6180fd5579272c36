"""The semantic tier in the merge Job, with the real embedding model (all-MiniLM-L6-v2 from the venv, offline) on
recorded SmolLM2-135M instructions: keep-first, never both members dropped, the generators' online check agrees
with the merge, a killed merge reruns to the same outputs, incremental equals a full re-merge, and the partitioned
path equals the single-process one."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.worker.cli import main as worker_main
from genrun.worker.dedup_config import DedupConfig
from genrun.worker.merge import load_seen_index, merge_round
from genrun.worker.online import OnlineSkip
from genrun.worker.semantic import load_seen_semantic
from genrun.worker.storage import LocalStorage

from tests.helpers import example_row, merged_round, write_shard

DATA = Path(__file__).resolve().parents[1] / "data"
# The semantic tier is on by default: BASE turns it off, so that "off" means off.
BASE = {"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "output": {"path": "/x"},
        "dedup": {"semantic": {"enabled": False}}}  # fmt: skip
SEM = {**BASE, "dedup": {"semantic": {"enabled": True}}}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    with gzip.open(DATA / "smollm2-instructions.jsonl.gz", "rt") as f:
        rows = [json.loads(x)["instruction"] for x in f]
    return [t for t in rows if t][:480]


def _write(storage: LocalStorage, texts: list[str]) -> list[tuple[int, int]]:
    """Two rounds of two shards each (120 rows a shard), responses that pass QC."""
    ids = []
    for k, seed in enumerate((10, 11, 20, 21)):
        rnd = 1 if seed < 20 else 2
        rows = [example_row(t, response=f"A helpful answer, number {k}-{i}, in enough words.")
                for i, t in enumerate(texts[k * 120 : (k + 1) * 120])]  # fmt: skip
        write_shard(storage, rnd, seed, rows)
        ids.append((rnd, seed))
    return ids


def _outputs(storage: LocalStorage, rnd: int) -> tuple[Any, ...]:
    sem = load_seen_semantic(storage, rnd)
    assert sem is not None
    return (*merged_round(storage, rnd), sem.ids.tolist(), sem.embeddings.tolist())


def test_semantic_tier_in_the_merge(tmp_path: Path, texts: list[str]) -> None:
    st = LocalStorage(tmp_path / "a")
    ids = _write(st, texts)
    spec = parse_spec(SEM)
    merge_round(st, spec, "t", 1, ids)
    r2 = merge_round(st, spec, "t", 2, ids)
    assert r2.dedup_tiers == ("exact", "near", "semantic") and r2.duplicates["semantic"] > 0
    rejected = pq.read_table(st.location("rejected")).to_pylist()
    data = pq.read_table(st.location(rec.DATASET_PREFIX)).to_pylist()
    sem = [r for r in rejected if r["reject_reason"] == "semantic_duplicate"]
    assert len(sem) == r2.duplicates["semantic"]
    # Never both members: every row a semantic duplicate names is kept (in the seen-index's kept rows).
    kept = set(load_seen_semantic(st, 2).ids.tolist())  # type: ignore[union-attr]
    assert all(r["duplicate_of"] in kept for r in rejected if r["duplicate_of"] is not None)
    assert r2.unique_total == len(kept) and r2.qc_passed_total == len(data)
    # Unique counts what all three tiers keep: the same rows without the tier count more.
    off = LocalStorage(tmp_path / "off")
    _write(off, texts)
    merge_round(off, parse_spec(BASE), "t", 1, ids)
    o2 = merge_round(off, parse_spec(BASE), "t", 2, ids)
    assert o2.unique_total == r2.unique_total + r2.duplicates["semantic"] and o2.dedup_tiers == ("exact", "near")
    # The largest clusters: a kept first row and dropped members with their cosine at or above the threshold.
    top = r2.semantic_clusters[0]
    assert top.size >= 2 and top.members and all(c >= 0.9 for _, c in top.members)


def test_online_check_agrees_with_the_merge(tmp_path: Path, texts: list[str]) -> None:
    """Round 2's candidates through the generators' online check (seen-index and kept embeddings that round 1's
    merge published): what it lets through, the merge finds no duplicate of round 1 in; what it skips as seen, the
    merge drops as a duplicate of round 1."""
    spec = parse_spec(SEM)
    st = LocalStorage(tmp_path / "a")
    ids = _write(st, texts)[:2]
    merge_round(st, spec, "t", 1, ids)
    novelty = OnlineSkip(DedupConfig.from_spec(spec.dedup), load_seen_index(st, 1), load_seen_semantic(st, 1))
    cand = texts[240:480]
    flags = []
    for i in range(0, len(cand), 64):  # the generators' batches
        f, _, _ = novelty.filter(cand[i : i + 64], list(range(i, i + 64)))
        flags += f
    assert novelty.skipped["semantic"] > 0
    first_id = 240
    for name, rows in (("kept", [t for t, f in zip(cand, flags, strict=True) if f]), ("all", cand)):
        other = LocalStorage(tmp_path / name)
        _write(other, texts[:240])
        merge_round(other, spec, "t", 1, ids)
        write_shard(
            other, 2, 20, [example_row(t, response=f"An answer in enough words, {i}.") for i, t in enumerate(rows)]
        )
        merge_round(other, spec, "t", 2, [*ids, (2, 20)])
        rej = pq.read_table(other.location(rec.rejected_part_key(2))).to_pylist()
        against_old = {r["index"] for r in rej if r["duplicate_of"] is not None and r["duplicate_of"] < first_id}
        if name == "kept":
            assert not against_old  # nothing the online check let through duplicates round 1
        else:  # every row the online check skipped as seen in round 1 is dropped by the merge
            skipped = {i for i, f in enumerate(flags) if not f}
            assert skipped and skipped <= {r["index"] for r in rej if r["duplicate_of"] is not None}


def test_killed_merge_reruns_to_the_same_outputs_and_incremental_equals_full(tmp_path: Path, texts: list[str]) -> None:
    import genrun.worker.merge as m

    spec = parse_spec(SEM)
    ref, run, full = (LocalStorage(tmp_path / x) for x in ("ref", "run", "full"))
    ids = _write(ref, texts)
    _write(run, texts)
    _write(full, texts)
    for r in (1, 2):
        merge_round(ref, spec, "t", r, ids)
    merge_round(run, spec, "t", 1, ids)
    orig = m.round_report

    def boom(*a: object, **k: object) -> rec.RoundReport:
        raise KeyboardInterrupt  # killed after the parts, state chunks and seen-index are written

    m.round_report = boom  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            merge_round(run, spec, "t", 2, ids)
    finally:
        m.round_report = orig
    merge_round(run, spec, "t", 2, ids)
    merge_round(full, spec, "t", 2, ids)  # no state: replays round 1
    assert _outputs(run, 2) == _outputs(ref, 2) == _outputs(full, 2)


def test_partitioned_equals_single_process_with_the_semantic_tier(tmp_path: Path, texts: list[str]) -> None:
    single, multi = LocalStorage(tmp_path / "s"), LocalStorage(tmp_path / "m")
    ids = _write(single, texts)
    _write(multi, texts)
    spec = parse_spec(SEM)
    for st in (single, multi):
        merge_round(st, spec, "t", 1, ids)
    merge_round(single, spec, "t", 2, ids)
    raw = {**SEM, "dedup": {**SEM["dedup"], "partitions": 2}, "output": {"path": str(multi.root)}}  # type: ignore[dict-item]
    job = tmp_path / "job.json"
    job.write_text(rec.to_json(rec.JobSpec("merge", "t", "default", raw, 2, shards=tuple(ids))))
    assert worker_main(["merge", "--job", str(job)]) == 0  # maps, reducers, then the finaliser's semantic step
    assert multi.exists("merge/r0002/reduce/bands-0001.npz")
    assert _outputs(single, 2) == _outputs(multi, 2)
