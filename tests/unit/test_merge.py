"""Merge/dedup/QC of a round on real Parquet shards in a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.worker.merge import load_seen_index, merge_round
from genrun.worker.storage import LocalStorage

from tests.helpers import example_row, merged_round, write_shard

# The exact and near tiers (the semantic tier, on by default, has tests/unit/test_merge_semantic.py)
SPEC = {"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "output": {"path": "/x"},
        "dedup": {"semantic": {"enabled": False}}}  # fmt: skip


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
    assert report.duplicates["exact"] == 1 and report.qc_rejected == {"refusal": 1}
    assert report.skipped_online == 3
    # per shard, each row judged against earlier rounds only (the policy's reward): seed 101's France row counts too;
    # what the dataset kept of each shard (kept) and what each sampled (generated) add up to the round's figures
    assert report.per_shard == (rec.ShardYield(100, 2, 40, 2, 1, generated=5, kept=1),
                                rec.ShardYield(101, 2, 40, 2, 2, generated=2, kept=1))  # fmt: skip
    assert sum(y.kept or 0 for y in report.per_shard) == report.new_qc_passed
    assert sum(y.generated or 0 for y in report.per_shard) == report.generated
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
    assert r2.duplicates["exact"] == 1 and r2.duplicates["near"] == 1
    assert r2.marginal_yield == pytest.approx(1 / 3)
    seen = load_seen_index(storage, 2)
    # every distinct key (exact tier), and each kept row that is the first kept row of an LSH bucket (near tier): the
    # near duplicate (row 2) is not indexed, so nothing is ever found near it alone
    assert seen is not None and len(seen.exact) == 3 and seen.ids.tolist() == seen.root.tolist() == [0, 3]
    # each round's chunk keeps its signatures' low 16 bits (dedup.SIG_DTYPE), as the file holds them
    with np.load(storage.location(f"{rec.merge_prefix(2)}/seen-index.npz")) as z:
        assert z["sigs"].dtype == np.uint16 and z["sigs"].shape == (len(z["ids"]), spec.dedup.num_perm)


def test_idempotent_and_atomic_rerun(storage: LocalStorage) -> None:
    spec = parse_spec(SPEC)
    write_shard(storage, 1, 0, [example_row("What is machine learning in simple words?")])
    first = merge_round(storage, spec, "t", 1, [(1, 0)])
    before = Path(storage.location(rec.round_report_key(1))).stat().st_mtime_ns
    again = merge_round(storage, spec, "t", 1, [(1, 0)])
    assert again == first and Path(storage.location(rec.round_report_key(1))).stat().st_mtime_ns == before
    assert not [p for p in Path(storage.root).rglob("*.tmp")]


def test_local_staged_publishes_once_atomically_and_a_failure_keeps_the_old_file(storage: LocalStorage) -> None:
    """`staged` on a folder: written beside the destination under a temporary name (readers never see it), renamed
    over it, world-readable; an error removes the temporary file and leaves the published one as it was."""
    with storage.staged("m/a.bin") as path:
        assert path.parent == Path(storage.location("m")) and path.name.startswith(".a.bin.")
        path.write_bytes(b"one")
        assert not storage.exists("m/a.bin") and storage.list("m/") == []
    assert storage.read_bytes("m/a.bin") == b"one"
    assert Path(storage.location("m/a.bin")).stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError), storage.staged("m/a.bin") as path:
        path.write_bytes(b"tw")
        raise RuntimeError("killed mid-write")
    assert storage.read_bytes("m/a.bin") == b"one" and not path.exists()


@pytest.mark.parametrize("where", ["save_npz", "_write_exports", "_write_rejected"])
def test_a_merge_failing_while_it_writes_publishes_nothing_of_the_round(
    storage: LocalStorage, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """An error in the write stage leaves no part of the round published and no temporary file, whichever of the
    three writers fails (a full disk, injected): the thread that saves the seen-index (save_npz), the one that writes
    the rejected rows, or the one that writes the kept rows (their exports); the rerun writes what a clean merge
    writes."""
    import genrun.worker.merge as merge
    import genrun.worker.merge_write as write

    m = merge if where == "save_npz" else write
    spec = parse_spec(SPEC)
    row = example_row("How do plants make their food from sunlight?")
    write_shard(storage, 1, 0, [row, row])  # one kept, one rejected
    orig = getattr(m, where)

    def failing(*args: object, **arrays: object) -> None:
        if where != "save_npz" or "sigs" in arrays:
            raise OSError(28, "No space left on device")
        orig(*args, **arrays)

    monkeypatch.setattr(m, where, failing)
    with pytest.raises(OSError):
        merge_round(storage, spec, "t", 1, [(1, 0)])
    assert [p for p in Path(storage.root).rglob("*") if p.is_file() and "shards" not in p.parts] == []
    monkeypatch.setattr(m, where, orig)
    report = merge_round(storage, spec, "t", 1, [(1, 0)])
    assert report.qc_passed_total == 1 and storage.exists(rec.seen_index_key(1))


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


def test_a_shard_missing_a_contract_column_is_set_aside(storage: LocalStorage) -> None:
    """A shard whose schema differs from the contract (a column missing) is damage: quarantined, named in the
    report, and the round merges without it."""

    spec = parse_spec(SPEC)
    write_shard(storage, 1, 0, [example_row("Describe the water cycle in four steps.")])
    write_shard(storage, 1, 1, [example_row("How do plants make their food from sunlight?")])
    path = Path(storage.location(rec.shard_data_key(1, 1)))
    pq.write_table(pq.read_table(path).drop_columns(["attributes"]), path)
    report = merge_round(storage, spec, "t", 1, [(1, 0), (1, 1)])
    assert report.qc_passed_total == 1 and report.quarantined == (rec.shard_data_key(1, 1),)
    kept = pq.read_table(storage.location(rec.dataset_part_key(1)))
    assert kept.column("instruction").to_pylist() == ["Describe the water cycle in four steps."]


# ---------------------------------------------------------------------------------------------------------------
# Incremental rounds: equal to a full re-merge, after a killed merge, with damaged shards and markers


def _rounds(storage: LocalStorage, damaged: bool = False) -> list[tuple[int, int]]:
    """Three rounds of shards with exact repeats and near-duplicates within and across rounds."""
    import random

    rng = random.Random(5)
    words = [
        "apple",
        "river",
        "mountain",
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
    bases = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 10))) for _ in range(30)]
    ids = []
    for rnd in (1, 2, 3):
        for seed in range(rnd * 10, rnd * 10 + 3):
            rows = []
            for i in range(40):
                w = rng.choice(bases).split()
                if rng.random() < 0.3:
                    w.insert(rng.randrange(len(w)), rng.choice(words))
                resp = "I'm sorry, I cannot help with that." if i % 13 == 0 else f"An answer about {w[0]} in words."
                rows.append(example_row(" ".join(w).capitalize() + "?", response=resp, domain=f"d{i % 3}",
                                        temperature=0.7 + 0.1 * (seed % 2)))  # fmt: skip
            write_shard(storage, rnd, seed, rows)
            ids.append((rnd, seed))
    if damaged:
        Path(storage.location(rec.shard_data_key(2, 21))).write_bytes(b"PAR1 truncated")
        Path(storage.location(rec.shard_manifest_key(1, 12))).write_bytes(b'{"round": 1, "seed": 12, "ro')
        Path(storage.location(rec.shard_manifest_key(3, 30))).write_bytes(b"")
    return ids


def _outputs(storage: LocalStorage, rnd: int) -> tuple[object, ...]:
    seen = load_seen_index(storage, rnd)
    assert seen is not None
    md = Path(storage.location(f"{rec.merge_prefix(rnd)}/report.md")).read_text()
    return (*merged_round(storage, rnd), seen.exact.tolist(), seen.sigs.tolist(), md)


@pytest.mark.parametrize("damaged", [False, True])
def test_incremental_rounds_equal_a_full_re_merge(tmp_path: Path, damaged: bool) -> None:
    spec = parse_spec(SPEC)
    inc, full = LocalStorage(tmp_path / "inc"), LocalStorage(tmp_path / "full")
    ids = _rounds(inc, damaged)
    _rounds(full, damaged)
    for rnd in (1, 2, 3):
        merge_round(inc, spec, "t", rnd, ids)
    merge_round(full, spec, "t", 3, ids)  # no state before round 3: replays rounds 1 and 2 from nothing
    a, b = _outputs(inc, 3), _outputs(full, 3)
    assert a == b
    report = a[0]
    assert isinstance(report, rec.RoundReport)
    assert report.duplicates["exact"] > 0 and report.duplicates["near"] > 0 and report.qc_rejected.get("refusal", 0) > 0
    assert report.generated_total == 9 * 40 - (3 * 40 if damaged else 0)
    if damaged:  # set aside, named, counted; never a traceback
        assert set(report.quarantined) == {
            rec.shard_manifest_key(1, 12), rec.shard_data_key(2, 21), rec.shard_manifest_key(3, 30)
        }  # fmt: skip
        assert report.quarantined_count == 3 and "quarantined (unreadable or damaged)" in str(a[5])


def test_killed_merge_reruns_to_the_same_outputs_and_cleans_up(tmp_path: Path) -> None:
    spec = parse_spec(SPEC)
    ref, st = LocalStorage(tmp_path / "ref"), LocalStorage(tmp_path / "run")
    ids = _rounds(ref)
    _rounds(st)
    for rnd in (1, 2):
        merge_round(ref, spec, "t", rnd, ids)
    merge_round(st, spec, "t", 1, ids)
    # Round 2's merge killed after writing some outputs and while publishing another; its temp folder left behind.
    import genrun.worker.merge as m

    orig = m.round_report

    def boom(*a: object, **k: object) -> rec.RoundReport:
        raise KeyboardInterrupt  # as a SIGKILL would, after the parts and state chunks are written

    m.round_report = boom  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            merge_round(st, spec, "t", 2, ids)
    finally:
        m.round_report = orig
    assert st.exists(rec.dataset_part_key(2)) and not st.exists(rec.round_report_key(2))
    leftover = Path(st.location(rec.merge_prefix(2))) / ".report.json.abc123.tmp"
    leftover.write_bytes(b'{"round"')
    import os
    import subprocess
    import tempfile

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(tempfile.gettempdir()) / f"genrun-staged-{dead.pid}-xyz"
    stale.mkdir(exist_ok=True)
    mine = Path(tempfile.gettempdir()) / f"genrun-staged-{os.getpid()}-keep"
    mine.mkdir(exist_ok=True)
    merge_round(st, spec, "t", 2, ids)
    assert _outputs(st, 2) == _outputs(ref, 2)
    assert not leftover.exists() and not list(Path(st.root).rglob("*.tmp"))
    assert not stale.exists() and mine.exists()  # a live process's folder is not touched
    mine.rmdir()


def test_changed_dedup_parameters_fall_back_to_a_full_re_merge(tmp_path: Path) -> None:
    a, b = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b")
    ids = _rounds(a)
    _rounds(b)
    loose = parse_spec({**SPEC, "dedup": {"threshold": 0.6, "semantic": {"enabled": False}}})
    merge_round(a, parse_spec(SPEC), "t", 1, ids)  # round 1 with the default threshold
    merge_round(a, loose, "t", 2, ids)  # round 2 with another: the state of round 1 cannot be extended
    merge_round(b, loose, "t", 2, ids)  # from nothing with the new threshold
    assert _outputs(a, 2)[1:] == _outputs(b, 2)[1:]


def test_damaged_marker_is_reported_by_read_marker(tmp_path: Path) -> None:
    from genrun.worker.storage import DamagedMarker, read_marker

    st = LocalStorage(tmp_path)
    write_shard(st, 1, 0, [example_row("What is a prime number, exactly?")])
    assert read_marker(st, rec.shard_manifest_key(1, 0)) is not None
    assert read_marker(st, rec.shard_manifest_key(1, 9)) is None
    whole = Path(st.location(rec.shard_manifest_key(1, 0))).read_bytes()
    assert b'"examples": 0' in whole  # written with the default (0)
    for bad, msg in ((b"", "not a complete JSON"), (b'{"round": 1', "not a complete JSON"), (b"[1]", "JSON object"),
                     (b'{"round": 1, "seed": 0}', "'rows' is missing"),
                     (whole.replace(b'"examples": 0', b'"examples": "40"'), "'examples' is not a count")):  # fmt: skip
        Path(st.location(rec.shard_manifest_key(1, 0))).write_bytes(bad)
        with pytest.raises(DamagedMarker, match=msg):
            read_marker(st, rec.shard_manifest_key(1, 0))


def test_state_is_per_round_chunks_and_top_duplicates_stay_exact(tmp_path: Path) -> None:
    """A round reads earlier rounds' chunks memory-mapped and searches them one by one (no joined, re-sorted copy:
    its work stays linear in its new rows); the largest clusters, kept incrementally, equal the ones counted from
    every rejected row."""
    import numpy as np
    from genrun.worker.dedup_config import DedupConfig
    from genrun.worker.merge_state import load_state

    st = LocalStorage(tmp_path / "out")
    spec = parse_spec(SPEC)
    ids = _rounds(st)
    reports = [merge_round(st, spec, "t", rnd, ids) for rnd in (1, 2, 3)]
    state = load_state(st, DedupConfig.from_spec(spec.dedup), 3)
    assert state is not None and len(state.keys) == 3 and len(state.seen.chunks) == 3
    assert isinstance(state.seen.chunks[0].sigs, np.memmap) and isinstance(state.keys[2][0], np.memmap)
    rejected = pq.read_table(st.location("rejected")).to_pylist()
    sizes: dict[int, int] = {}
    for r in rejected:
        if r["duplicate_of"] is not None:
            sizes[r["duplicate_of"]] = sizes.get(r["duplicate_of"], 1) + 1
    want = sorted(sizes.items(), key=lambda x: (-x[1], x[0]))[:10]
    assert [n for _, n in reports[-1].top_duplicates] == [n for _, n in want]
    assert [[i, n] for i, n in want] == state.totals.top


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_qc_in_worker_processes_writes_the_same_bytes_as_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """GENRUN_MERGE_WORKERS > 1 (forked worker processes judge the shards' rows) and re-reading shards in the write
    stage (a round past the runtime's HOLD_BYTES) change no output byte: every file of three merged rounds, damaged
    shards included, equals the single-process run's that holds every shard. The runs with workers say so in the
    log, one worker per readable shard."""
    import logging

    import genrun.worker.runtime as rt

    spec = parse_spec(SPEC)
    monkeypatch.setattr(rt, "POOL_MIN_ROWS", 0)  # the few rows here would otherwise stay in process
    out = tmp_path / "out"  # every run writes here (outputs name their folder), each moved aside after
    # (workers, rows held from the read stage to the write stage): 0 bytes held = every shard read again, as a round
    # of real (kilobyte) responses past HOLD_BYTES is
    configs = (("1", rt.HOLD_BYTES), ("3", rt.HOLD_BYTES), ("3", 0), ("1", 0))
    pools = []
    for i, (workers, hold) in enumerate(configs):
        storage = LocalStorage(out)
        ids = _rounds(storage, damaged=True)
        monkeypatch.setenv(rt.MERGE_WORKERS_ENV, workers)
        monkeypatch.setattr(rt, "HOLD_BYTES", hold)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="genrun.merge"):
            for rnd in (1, 2, 3):
                merge_round(storage, spec, "t", rnd, ids)
        pools.append([r.getMessage().split(" in ")[-1] for r in caplog.records if r.getMessage().startswith("QC of")])
        out.rename(tmp_path / f"run{i}")
    assert pools == [[], ["2 worker processes"] * 3, ["2 worker processes"] * 3, []]  # two readable shards a round
    one = _all_bytes(tmp_path / "run0")
    for i in range(1, len(configs)):
        other = _all_bytes(tmp_path / f"run{i}")
        assert sorted(one) == sorted(other)
        for f in one:
            assert one[f] == other[f], (configs[i], f)


@pytest.mark.parametrize("case", ["default", "near_off", "against"])
def test_qc_judges_every_kept_row_whichever_tiers_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Whichever tiers find the rows new against earlier rounds first (round 1 with nothing indexed, near duplicates
    off, an earlier dataset as round 0), QC judges each shard's first row of every new key: every kept row is in the
    dataset or rejected by QC, each shard's yield counts them, and two rounds merged with QC in worker processes write
    the same bytes as in process."""
    import genrun.worker.runtime as rt

    raw: dict[str, object] = {**SPEC, "dedup": {"semantic": {"enabled": False}}}
    if case == "near_off":
        raw["dedup"] = {"nearDuplicates": False, "semantic": {"enabled": False}}
    if case == "against":
        prior = tmp_path / "prior.jsonl"
        prior.write_text(json.dumps({"instruction": "Explain the history of music and code?"}) + "\n")
        raw["dedup"] = {"against": [str(prior)], "semantic": {"enabled": False}}
    spec = parse_spec(raw)
    monkeypatch.setattr(rt, "POOL_MIN_ROWS", 0)
    runs = []
    for workers in ("1", "2"):
        monkeypatch.setenv(rt.MERGE_WORKERS_ENV, workers)
        storage = LocalStorage(tmp_path / "out")  # outputs name their folder: each run writes here, moved aside after
        ids = _rounds(storage)
        for rnd in (1, 2):
            report = merge_round(storage, spec, "t", rnd, ids)
            rejected = pq.read_table(storage.location(rec.rejected_part_key(rnd))).to_pylist()
            qc_rejected = sum(1 for r in rejected if not r["reject_reason"].endswith("_duplicate"))
            assert report.new_unique == report.new_qc_passed + qc_rejected  # every kept row judged once
            assert sum(s.kept or 0 for s in report.per_shard) == report.new_qc_passed
        (tmp_path / "out").rename(tmp_path / f"w{workers}")
        runs.append(_all_bytes(tmp_path / f"w{workers}"))
    assert runs[0] == runs[1]


def _niceness(state: object, k: int, payload: object) -> int:
    import os

    return os.nice(0)


def _same(inherited: object) -> object:
    return inherited


def test_forked_workers_run_below_the_jobs_priority() -> None:
    """The runtime's forked workers lower their priority by POOL_NICE: they share the CPUs with the Job's process
    while it still decides the round, which comes first."""
    import os

    from genrun.worker.runtime import POOL_NICE, ForkPool

    pool = ForkPool(1, _same, None, _niceness)
    try:
        assert pool.submit(0, None).result() == min(19, os.nice(0) + POOL_NICE)
    finally:
        pool.close()


def test_parts_dictionary_encode_only_the_columns_of_repeated_values(storage: LocalStorage) -> None:
    """The merge's Parquet parts dictionary-encode the columns that repeat (domain, model, reason, ...) and write the
    distinct-valued ones (responses, positions, scores: records.DISTINCT_VALUED_COLUMNS) plain; the instructions are
    dictionary-encoded where they repeat (the rejected part), plain in the parts of kept rows."""
    rows = [example_row(f"Question number {i} about the water cycle?", response=f"Answer {i}.") for i in range(5)]
    write_shard(storage, 1, 0, rows + rows[:2])
    merge_round(storage, parse_spec(SPEC), "t", 1, [(1, 0)])
    parts = {rec.dataset_part_key(1): {"instruction"}, rec.rejected_part_key(1): set(),
             f"{rec.merge_prefix(1)}/kept.parquet": {"instruction"}}  # fmt: skip
    for key, distinct in parts.items():
        meta = pq.ParquetFile(storage.location(key)).metadata
        group = meta.row_group(0)
        for i in range(meta.num_columns):
            col = group.column(i)
            dictionary = any("DICTIONARY" in e for e in col.encodings)
            plain = col.path_in_schema in rec.DISTINCT_VALUED_COLUMNS | distinct
            assert dictionary == (not plain), (key, col.path_in_schema)


def test_merge_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import genrun.worker.runtime as m
    from genrun.worker.runtime import MERGE_WORKERS_ENV, merge_workers

    monkeypatch.setenv(MERGE_WORKERS_ENV, "3")
    assert merge_workers() == 3
    monkeypatch.setenv(MERGE_WORKERS_ENV, "0")
    assert merge_workers() == 1
    monkeypatch.setenv(MERGE_WORKERS_ENV, "many")  # not a number: the CPU count, with a warning
    assert merge_workers() == len(os.sched_getaffinity(0))
    monkeypatch.delenv(MERGE_WORKERS_ENV)
    assert merge_workers() == min(len(os.sched_getaffinity(0)), m.cgroup_cpus() or 10**6)
    monkeypatch.setattr(m, "cgroup_cpus", lambda: 1)  # a pod limited to one CPU: no worker processes
    assert merge_workers() == 1


def test_cgroup_cpu_quota(tmp_path: Path) -> None:
    from genrun.worker.runtime import cgroup_cpus as _cgroup_cpus

    assert _cgroup_cpus(str(tmp_path)) is None  # no cgroup files: no quota
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpus(str(tmp_path)) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: two processes
    assert _cgroup_cpus(str(tmp_path)) == 2
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpus(str(tmp_path)) == 3


def test_save_npz_writes_the_members_np_savez_writes(tmp_path: Path) -> None:
    """save_npz streams each array's memory into the zip member; the members equal np.savez's byte for byte (so
    np.load and load_npz's memory maps read them), for the state's dtypes, a 0-d, an empty and a non-contiguous
    array."""
    import zipfile

    import numpy as np
    from genrun.worker.merge_state import _npz_members, save_npz

    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "sigs": rng.integers(0, 2**32, (300, 128), dtype=np.uint64).astype(np.uint32),
        "ids": np.arange(50, dtype=np.int64), "bands": rng.integers(0, 2**63, (30, 14), dtype=np.uint64),
        "params": np.array([0.8, 128, 1, 1], np.float64), "empty": np.zeros((0, 128), np.uint32),
        "scalar": np.ones((), np.float64), "strided": np.arange(24).reshape(4, 6)[:, 1::2], "flags": np.array([True]),
    }  # fmt: skip
    ours, theirs = tmp_path / "ours.tmp", tmp_path / "theirs.npz"
    save_npz(ours, **arrays)
    with open(theirs, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert a.namelist() == b.namelist() == [f"{k}.npy" for k in arrays]
        assert all(a.read(n) == b.read(n) for n in a.namelist())
    back = _npz_members(ours)
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in arrays.items())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_no_qc_filters_keep_every_unique_row(
    storage: LocalStorage, monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    """`qc.filters: []` (valid: no QC) keeps every unique example, whether QC would run in process or in workers:
    a row that every default filter rejects (too short, truncated) is kept too."""
    import genrun.worker.runtime as rt

    monkeypatch.setattr(rt, "POOL_MIN_ROWS", 0)
    monkeypatch.setenv(rt.MERGE_WORKERS_ENV, workers)
    rows = [example_row("How do plants make their food from sunlight?"), example_row("Why?", finish_reason="length")]
    write_shard(storage, 1, 0, rows + rows[:1])
    write_shard(storage, 1, 1, [example_row("Describe the water cycle in four steps.")])
    report = merge_round(storage, parse_spec({**SPEC, "qc": {"filters": []}}), "t", 1, [(1, 0), (1, 1)])
    assert report.unique_total == report.qc_passed_total == 3
    kept = pq.read_table(storage.location(rec.dataset_part_key(1))).column("instruction").to_pylist()
    assert sorted(kept) == sorted(["How do plants make their food from sunlight?", "Why?",
                                   "Describe the water cycle in four steps."])  # fmt: skip


def test_merge_env_keeps_the_environments_own_tunables_last() -> None:
    """The merge's glibc tunables are added to an environment's own, which come after them (glibc takes the last of a
    name): a user's setting wins."""
    from genrun.worker.runtime import MERGE_ENV, has_merge_env, merge_env

    env = merge_env({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert env["PATH"] == "/bin"
    assert env["GLIBC_TUNABLES"] == f"{MERGE_ENV['GLIBC_TUNABLES']}:glibc.malloc.hugetlb=0"
    assert merge_env({}) == MERGE_ENV
    assert has_merge_env(env) and has_merge_env(MERGE_ENV) and not has_merge_env({"PATH": "/bin"})


def test_a_merge_process_reexecutes_itself_with_its_allocator_settings(tmp_path: Path) -> None:
    """`ensure_merge_env` restarts the process with the tunables in its environment (glibc reads them only at start),
    once: the restarted process finds them and goes on; a user's own tunables stay last."""
    import os
    import subprocess
    import sys

    from genrun.worker.runtime import MERGE_ENV

    script = tmp_path / "merge_like.py"
    script.write_text("import os, sys\nfrom genrun.worker.runtime import ensure_merge_env\n"
                      "print('start', flush=True)\nensure_merge_env([sys.argv[0]])\nprint(os.environ['GLIBC_TUNABLES'])\n")  # fmt: skip
    user = "glibc.malloc.hugetlb=0"
    env = {**os.environ, "GLIBC_TUNABLES": user}
    out = subprocess.run([sys.executable, "-P", str(script)], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split("\n")[:-1] == ["start", "start", f"{MERGE_ENV['GLIBC_TUNABLES']}:{user}"]


def test_the_merges_reports_account_for_every_generated_instruction(storage: LocalStorage) -> None:
    """Rounds with every fate: exact and near duplicates, QC rejections (in the merge and before responses), rows the
    generators skipped online, and samples past a shard's quota (generated beyond rows + skips + early rejects). Per
    round and in total, generated = unique + exact + near + semantic + online + discarded and unique = kept + QC
    rejected, and each fate lands in its own term."""
    spec = parse_spec(SPEC)
    write_shard(storage, 1, 0, [example_row("Explain how vaccines train the immune system."),
                                example_row("Explain how vaccines train the immune system!"),
                                example_row("Give me a recipe for pancakes without eggs.")],
                generated=7, skipped=2, early={"low_logprob": 1})  # fmt: skip
    r1 = merge_round(storage, spec, "t", 1, [(1, 0)])
    write_shard(storage, 2, 1, [example_row("Explain how vaccines train the human immune system."),
                                example_row("Give me a recipe for pancakes without eggs?"),
                                example_row("Name three rivers in Africa and where they end.")],
                generated=5, skipped=1)  # fmt: skip
    r2 = merge_round(storage, spec, "t", 2, [(1, 0), (2, 1)])
    a1, a2, total = rec.Accounting.of_round(r1, None), rec.Accounting.of_round(r2, r1), rec.Accounting.total(r2)
    # 7 = 2 unique + 1 early + 1 exact + 2 online + 1 discarded
    assert (a1.generated, a1.discarded, a1.per_tier) == (7, 1, {"exact": 1, "near": 0, "semantic": 0, "online": 2})
    assert (a2.generated, a2.unique, a2.discarded) == (5, 1, 1)
    assert a2.per_tier == {"exact": 1, "near": 1, "semantic": 0, "online": 1}
    for a in (a1, a2, total):
        assert a.problems() == []
    assert total.generated == 12 and total.unique == a1.unique + a2.unique == r2.unique_total
    assert r2.duplication_ratio == pytest.approx(total.duplicates / total.generated)
