"""The merge Job of a round: read -> tiers -> QC -> write -> report, incremental, deterministic, keep-first in
(round, seed, index) order.

- read (`merge_read`): the round's shards, each marker and file checked and read once; unreadable ones quarantined;
- tiers (`tiers`): exact, near, semantic, in order, against the state of the rounds before (`merge_state`);
- QC (`merge_qc`): verdicts on the rows new against earlier rounds, started as soon as the tiers know them;
- write (`merge_write`): the dataset and rejected parts, exports, kept rows; the state and seen-index chunks;
- report (`merge_report`): cumulative totals, the round report last as the completion marker.
The execution machinery (worker processes, threads, the allocator) is `runtime`'s.

Round r reads only its own shards and the state chunks rounds 1..r-1 published: its work is linear in its new rows.
Outputs, all append-only per round, the report last:
  dataset/data/train-rNNNN.parquet     new unique QC-passed rows (the dataset is the union of the parts)
  rejected/rNNNN.parquet               new rejected rows, with reject_reason and duplicate_of (a global row id)
  merge/rNNNN/{alpaca,sharegpt}.jsonl  the round's new dataset rows in those formats
  merge/rNNNN/seen-index.npz           what this round added to the seen-index (`load_seen_index` joins chunks)
  merge/rNNNN/state.npz, kept.parquet, state.json   the rest of the merge state (see `State`)
  merge/rNNNN/report.md, report.json   cumulative totals
When the previous round's state is missing or was made with other dedup parameters, the merge replays rounds 1..r
from nothing (a full re-merge), rewriting their parts and state chunks (earlier reports, the planner's history, are
left as they were).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from genrun.contract import records as rec
from genrun.worker import runtime
from genrun.worker.dedup_config import DedupConfig
from genrun.worker.export import export_dataset
from genrun.worker.merge_qc import QcStage
from genrun.worker.merge_read import RoundInput, Shard, read_round
from genrun.worker.merge_report import render_markdown, round_report
from genrun.worker.merge_state import (
    Counts,
    State,
    grown_sizes,
    load_seen_index,
    load_state,
    round_keys,
    save_npz,
    state_key,
    top_clusters,
)
from genrun.worker.merge_write import RoundCounts, write_rows
from genrun.worker.runtime import merge_workers
from genrun.worker.storage import Storage, remove_staged_leftovers
from genrun.worker.tiers import DUPLICATE_REASONS, Decisions, RoundRows, decide

if TYPE_CHECKING:
    from genrun.contract.api import GenerationRunSpec
    from genrun.worker.against import AgainstSeed

__all__ = [
    "DUPLICATE_REASONS", "State", "load_seen_index", "merge_round", "merge_workers", "render_markdown",
    "round_keys", "seed_state",
]  # fmt: skip

log = logging.getLogger("genrun.merge")


def merge_round(
    storage: Storage, spec: GenerationRunSpec, run: str, rnd: int, shard_ids: list[tuple[int, int]]
) -> rec.RoundReport:
    """Merge round `rnd`'s new shards (those of `shard_ids` with round == rnd) into the state of rounds before."""
    report_key = rec.round_report_key(rnd)
    if storage.exists(report_key):
        log.info("round %d already merged: %s", rnd, storage.location(report_key))
        return rec.round_report_from(json.loads(storage.read_bytes(report_key)))
    t0 = time.monotonic()
    runtime.use_system_allocator()
    _clean_leftovers(storage)
    cfg = DedupConfig.from_spec(spec.dedup)
    state = load_state(storage, cfg, rnd - 1) if rnd > 1 else None
    replayed: range = range(0)
    if state is None:  # round 1, or a full re-merge: replay rounds 1..rnd-1 from round 0, then this one
        state = _round_zero(storage, spec, cfg)
        replayed = range(1, rnd)
        for r in replayed:
            _merge_one(storage, spec, run, r, [x for x in shard_ids if x[0] == r], state, final=False)
    report = _merge_one(
        storage, spec, run, rnd, [x for x in shard_ids if x[0] == rnd], state, final=True, rewritten=replayed
    )
    log.info(
        "round %d merged in %.1fs: %d new rows, %d unique, %d kept in all",
        rnd, time.monotonic() - t0, report.generated, report.unique_total, report.qc_passed_total,
    )  # fmt: skip
    return report


def _clean_leftovers(storage: Storage) -> None:
    """What a killed merge left: temporary files under the merge's own prefixes, and the local folders of its S3
    writes (`Storage.staged`)."""
    for prefix in (rec.DATASET_PREFIX, "rejected/", "merge/", "quarantine/"):
        for key in storage.remove_leftovers(prefix):
            log.info("removed a killed merge's leftover %s", key)
    for d in remove_staged_leftovers():
        log.info("removed a killed merge's temp folder %s", d)


def seed_state(storage: Storage, spec: GenerationRunSpec, state: State) -> AgainstSeed | None:
    """Start the merge's round 1 from the against sources: their distinct keys go through the exact and near tiers
    as a round 0 of kept rows with global ids 0..m-1, published as merge/r0000/{state.npz, seen-index.npz,
    kept.parquet} so `load_state` finds them for every later round and the top-duplicates table can name them.
    Returns the seed (its `semantic` index is the round-1 index of the semantic tier), or None when dedup.against is
    empty. Call on State.empty(cfg) before round 1's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from genrun.worker.against import load_against

    seed = load_against(spec)
    if seed is None or not seed.keys:
        return seed
    cfg = DedupConfig.from_spec(spec.dedup).without_semantic()  # the seed's embeddings are load_against's
    dec = decide(RoundRows(cfg, state, 0, keys=pa.array(seed.keys, pa.string())))
    step = _advance(state, dec)
    tot = state.totals
    tot.round_first_id[0] = 0
    tot.rows = len(seed.keys)
    if seed.semantic is not None:  # the merge's ids for the same rows: 0..m-1
        seed.semantic._ids[: len(seed.semantic)] = np.arange(len(seed.semantic), dtype=np.int64)
    prefix = rec.merge_prefix(0)
    with storage.staged(f"{prefix}/state.npz") as path:
        save_npz(path, **step["chunk"])
    with storage.staged(f"{prefix}/seen-index.npz") as path:
        save_npz(path, **step["seen"])
    kept = np.flatnonzero(dec.kept)
    texts = pa.array([seed.keys[i] for i in kept], pa.string())
    with storage.staged(f"{prefix}/kept.parquet") as path:
        pq.write_table(pa.table({"id": pa.array(dec.ids[kept]), "instruction": texts}), path)
    return seed


def _round_zero(storage: Storage, spec: GenerationRunSpec, cfg: DedupConfig) -> State:
    """The state before round 1: empty, or the instructions of spec.dedup.against (earlier runs and datasets) as
    round 0's kept rows, so every tier treats them as already seen."""
    state = State.empty(cfg)
    if cfg.against:
        seed = seed_state(storage, spec, state)
        if seed is not None and seed.semantic is not None:
            state.semantic = seed.semantic
    return state


def _tiers(
    storage: Storage, spec: GenerationRunSpec, rnd: int, got: RoundInput, state: State, qc: QcStage, final: bool
) -> Decisions:
    """The tiers on the round's rows; QC starts as soon as they know the rows new against earlier rounds. Its worker
    processes fork there, between the tiers' steps, where no thread of ours runs."""
    import pyarrow as pa

    cfg = DedupConfig.from_spec(spec.dedup)
    pre = None
    if cfg.partitions > 1 and final:
        from genrun.worker.partitioned import precomputed_for

        pre = precomputed_for(storage, cfg, rnd, state, got.shards)
    cols = got.cols

    def keys_of(rows: np.ndarray) -> Any:  # the maps did the per-row work: only the rows asked for are keyed
        return round_keys(cfg, [pa.concat_tables(cols).take(pa.array(rows, pa.int64()))])

    keys = round_keys(cfg, cols, runtime.merge_workers()) if pre is None else None
    rows = RoundRows(cfg, state, state.totals.rows, keys=keys, precomputed=pre, keys_of=keys_of, on_fresh=qc.start)
    return decide(rows)


def _merge_one(
    storage: Storage,
    spec: GenerationRunSpec,
    run: str,
    rnd: int,
    shard_ids: list[tuple[int, int]],
    state: State,
    *,
    final: bool,
    rewritten: range = range(0),
) -> rec.RoundReport:
    got = read_round(storage, DedupConfig.from_spec(spec.dedup), shard_ids)
    first_id = state.totals.rows
    with contextlib.ExitStack() as stack:
        qc = stack.enter_context(QcStage(storage, spec.qc.filters, got.shards))
        dec = _tiers(storage, spec, rnd, got, state, qc, final)
        got.cols = []
        # Each output written once, straight to where storage publishes it (atomically, when the block ends without
        # an error; S3: uploaded then); the report, which names them, after; its round report last of all.
        out = {name: stack.enter_context(storage.staged(key)) for name, key in _outputs(rnd, dec).items()}
        step = _advance(state, dec)  # reads dec; the rows below read it too, and never the state
        # The state and seen-index chunks are saved by a thread while this one writes the rows. An error in either
        # publishes nothing (the staged outputs see it as the block ends).
        saving = stack.enter_context(runtime.background("save"))
        saved = saving.submit(_save_index, state, step, out)
        counts = write_rows(storage, spec, run, got.shards, dec, out, qc)
        qc.close()  # every verdict is in: the workers go before the state is saved and the outputs published
        saved.result()
        _fold_totals(state, rnd, first_id, len(dec.ids), got, counts)
    return _finish(storage, spec, run, rnd, state, got, counts, final=final, rewritten=rewritten)


def _outputs(rnd: int, dec: Decisions) -> dict[str, str]:
    """The round's output files by name, and the storage key each is published at."""
    prefix = rec.merge_prefix(rnd)
    names = ["seen-index.npz", "state.npz", "kept.parquet", "alpaca.jsonl", "sharegpt.jsonl"]
    names += ["semantic.parquet"] if dec.semantic_drops is not None else []
    keys = {name: f"{prefix}/{name}" for name in names}
    return keys | {"dataset.parquet": rec.dataset_part_key(rnd), "rejected.parquet": rec.rejected_part_key(rnd)}


def _finish(
    storage: Storage, spec: GenerationRunSpec, run: str, rnd: int, state: State, got: RoundInput,
    counts: RoundCounts, *, final: bool, rewritten: range,
) -> rec.RoundReport:  # fmt: skip
    """The report stage: the round's report, its Markdown, the state's totals, the dataset folder; the round report
    last, the completion marker."""
    cfg = DedupConfig.from_spec(spec.dedup)
    report = replace(round_report(storage, cfg, state, rnd, len(got.shards)), per_shard=tuple(counts.per_shard))
    if final:
        md = render_markdown(report, run, missing=got.missing)
        storage.write_bytes(f"{rec.merge_prefix(rnd)}/report.md", md.encode())
    storage.write_bytes(state_key(rnd, "state.json"), state.totals.to_json().encode())
    if final:
        # The dataset folder (card, messages) before the completion marker, so that a retried merge redoes it.
        export_dataset(storage, spec, run, report, rewritten=rewritten)
        storage.write_bytes(rec.round_report_key(rnd), rec.to_json(report).encode())  # last: the completion marker
    return report


def _fold_totals(state: State, rnd: int, first_id: int, rows: int, got: RoundInput, counts: RoundCounts) -> None:
    """The round's shards and counters into the state's cumulative totals."""
    tot = state.totals
    tot.round = rnd
    tot.round_first_id[rnd] = first_id
    tot.rows = first_id + rows
    tot.shards += [(s.round, s.seed) for s in got.shards]
    tot.quarantined += got.quarantined
    for s in got.shards:
        _fold_manifest(state, rnd, s)
    for dk, c in counts.per_domain.items():
        tot.per_domain.setdefault(dk, Counts()).add(c)
    for tk, c in counts.per_temperature.items():
        tot.per_temperature.setdefault(tk, Counts()).add(c)
    tot.per_round[rnd] = counts.round
    tot.left_domain += counts.left_domain
    tot.early += counts.early
    for k, v in counts.rejected.items():
        tot.rejected[k] = tot.rejected.get(k, 0) + v


def _fold_manifest(state: State, rnd: int, s: Shard) -> None:
    """A shard's generator-side counts: sampled, tokens, skipped online (the generators' own tiers) and discarded."""
    tot, m = state.totals, s.manifest
    tot.generated[rnd] = tot.generated.get(rnd, 0) + m.generated
    tot.tokens[rnd] = tot.tokens.get(rnd, 0) + m.tokens
    skipped = m.skipped_online + m.skipped_in_shard
    tot.skipped[rnd] = tot.skipped.get(rnd, 0) + skipped
    tot.discarded[rnd] = tot.discarded.get(rnd, 0) + m.generated - m.examples_made - skipped


def _advance(state: State, dec: Decisions) -> dict[str, dict[str, np.ndarray]]:
    """Fold a round's decisions into the state; returns the round's state and seen-index chunks. The index takes over
    dec.sigs (its rows moved in place): nothing reads it after."""
    owners, counts = np.unique(dec.root[~dec.kept], return_counts=True)
    drops = dec.semantic_drops
    sem_owner, sem_count = np.unique(
        np.asarray(drops.table.column("duplicate_of")) if drops is not None else np.empty(0, np.int64),
        return_counts=True,
    )
    tot = state.totals
    tot.top = top_clusters(tot.top, owners, grown_sizes(state.dups, owners, counts))
    tot.sem_top = top_clusters(tot.sem_top, sem_owner, grown_sizes(state.sems, sem_owner, sem_count))
    new_hashes = dec.hashes[dec.cand]
    by_hash = np.argsort(new_hashes)
    chunk = {
        "keys_hash": new_hashes[by_hash],
        "keys_owner": dec.root[dec.cand][by_hash],
        "dup_owner": owners.astype(np.int64),
        "dup_count": counts.astype(np.int64),
        "sem_owner": sem_owner.astype(np.int64),
        "sem_count": sem_count.astype(np.int64),
    }
    state.keys.append((chunk["keys_hash"], chunk["keys_owner"]))
    state.dups.append((chunk["dup_owner"], chunk["dup_count"]))
    state.sems.append((chunk["sem_owner"], chunk["sem_count"]))
    added = state.seen.extend(dec.sigs, dec.bands, dec.ids[dec.cand], dec.root[dec.cand], chunk["keys_hash"],
                              consume=True, threads=runtime.merge_workers())  # fmt: skip
    return {"chunk": chunk, "seen": added.to_npz(state.seen.params)}


def _save_index(state: State, step: dict[str, dict[str, np.ndarray]], out: dict[str, Path]) -> None:
    """The round's state and seen-index chunks (`_advance`), written to the paths `out` gives."""
    save_npz(out["state.npz"], **step["chunk"])
    # the semantic tier's index rides in the seen-index (what `semantic.load_seen_semantic` reads): all kept rows
    sem_npz = state.semantic.to_npz() if state.semantic is not None else {}
    save_npz(out["seen-index.npz"], **step["seen"], **sem_npz)
