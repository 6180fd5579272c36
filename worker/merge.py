"""Merge, dedup and QC of a round: incremental, deterministic, keep-first in (round, seed, index) order.

The cluster rule (the exact tier here, the near tier in `dedup.SeenIndex.assign`):
- Rows are taken in (round, seed, index) order and numbered in that order (global row ids, cumulative over rounds).
- A row whose normalised key equals the key of ANY earlier row is an exact duplicate, in that row's cluster.
- Otherwise (the first row with its key), near duplicates: the row is a near duplicate of the earliest kept row it
  is itself similar to among the first kept rows of its LSH buckets (earlier rounds' in the seen-index, then the
  round's own; see `dedup.keep_first_batch`), and is otherwise kept: unique, and QC decides whether it enters the
  dataset. A row is never dropped for a row it is not near, whatever lies between them.
Every decision depends only on earlier rounds and the round's own rows, so merging round r's new rows against the
state of rounds 1..r-1 gives exactly what replaying rounds 1..r from nothing gives (tested).

Round r reads only its own shards and the state chunks rounds 1..r-1 published (key hashes with their cluster, the
kept rows' MinHash signatures and band keys, cluster sizes): its work is linear in its new rows. Outputs, all
append-only per round, the report last as the completion marker:
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
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from genrun.contract import records as rec
from genrun.worker.dedup import MinHasher, SeenIndex, kept_sigs, key_hashes
from genrun.worker.export import export_dataset, json_strings, part_metadata
from genrun.worker.merge_state import (
    Counts,
    State,
    grown_sizes,
    load_npz,
    load_state,
    read_table,
    round_keys,
    save_npz,
    semantic_spec,
    state_key,
    top_clusters,
)
from genrun.worker.qc import QcPipeline
from genrun.worker.storage import DamagedMarker, Storage, read_marker, read_parquet, remove_staged_leftovers

if TYPE_CHECKING:
    from genrun.worker.against import AgainstSeed

log = logging.getLogger("genrun.merge")

REASON_EXACT, REASON_NEAR, REASON_SEMANTIC = "exact_duplicate", "near_duplicate", "semantic_duplicate"
DUPLICATE_REASONS = (REASON_EXACT, REASON_NEAR, REASON_SEMANTIC)


# ------------------------------------------------------------------------------------------------------------------
# Reading shards


@dataclass
class _Shard:
    round: int
    seed: int
    manifest: rec.ShardManifest
    rows: int
    table: Any = None  # its rows, read in pass 1 and held for pass 2 while the round's held rows fit HOLD_BYTES


HOLD_BYTES = 512 * 2**20  # rows held from pass 1 to pass 2; a larger round's later shards are read again in pass 2


def _held(storage: Storage, sh: _Shard) -> Any:
    """The shard's rows: held since pass 1, or read again (published shards never change)."""
    if sh.table is None:
        sh.table = read_table(storage, rec.shard_data_key(sh.round, sh.seed))
    return sh.table


def _quarantine(storage: Storage, key: str, error: str, out: list[str]) -> None:
    log.warning("quarantined %s: %s", key, error)
    out.append(key)
    storage.write_bytes(f"quarantine/{key}.json", json.dumps({"key": key, "error": error}).encode())


def _read_round(
    storage: Storage, spec: Any, shard_ids: list[tuple[int, int]]
) -> tuple[list[_Shard], list[Any], list[str], list[str]]:
    """Pass 1: each shard's marker and whole file, checked, read once (pass 2 uses the same table); returns the
    readable shards, their key-source columns (instruction, response when the key is the pair), quarantined keys and
    missing shards."""
    shards: list[_Shard] = []
    cols: list[Any] = []
    quarantined: list[str] = []
    missing: list[str] = []
    held = 0
    for rnd, seed in sorted(shard_ids):
        mkey, dkey = rec.shard_manifest_key(rnd, seed), rec.shard_data_key(rnd, seed)
        try:
            manifest = read_marker(storage, mkey)
        except DamagedMarker as exc:
            _quarantine(storage, mkey, str(exc), quarantined)
            continue
        if manifest is None:
            missing.append(dkey)
            continue
        try:
            table = read_table(storage, dkey)  # the whole file, schema-checked, before any row counts
        except Exception as exc:  # a corrupt or foreign file must not abort the merge: quarantine it
            _quarantine(storage, dkey, str(exc), quarantined)
            continue
        want = ["instruction", "response"] if spec.dedup.key == "pair" else ["instruction"]
        cols.append(table.select(want))
        held += table.nbytes  # real responses run to kilobytes: past the budget, pass 2 reads the shard again
        shards.append(_Shard(rnd, seed, manifest, table.num_rows, table if held <= HOLD_BYTES else None))
    return shards, cols, quarantined, missing


# ------------------------------------------------------------------------------------------------------------------
# Decisions


@dataclass
class Decisions:
    """Per new row: its global id, whether it is kept, else the reason and the first row (global id) of its cluster;
    and the round's new keys (first occurrences) with their signatures, band keys and roots, to extend the state."""

    ids: np.ndarray
    kept: np.ndarray  # bool
    near: np.ndarray  # bool: dropped as a near duplicate (else, when not kept, exact)
    root: np.ndarray  # global id of the cluster's first row (itself when kept)
    hashes: np.ndarray
    cand: np.ndarray  # rows that are the first with a key never seen before
    sigs: np.ndarray  # their signatures as kept (`kept_sigs`; `_advance` hands them to the index: not read after)
    bands: np.ndarray
    fresh: np.ndarray  # bool: neither an exact nor a near duplicate of anything before the round
    semantic: np.ndarray  # bool: dropped by the semantic tier


def decide(
    keys: Any,
    state: State,
    spec: Any,
    first_id: int,
    precomputed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    on_fresh: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> Decisions:
    """Apply the cluster rule to new rows (keys in keep-first order) after everything in `state`.

    `precomputed`: (key hashes, signatures of the first occurrences of new keys, their matches against earlier
    rounds' bucket firsts) when the partitioned maps and reducers made them. `on_fresh(hashes, fresh)`: called once,
    as soon as the rows new against earlier rounds are known, so that QC of the rows it must judge starts while the
    rest is decided: before the signatures when there is nothing to match against (nothing indexed yet, near
    duplicates off, or the matches precomputed), else right after the match, before the round's own clustering."""
    d = spec.dedup
    n = len(keys) if precomputed is None else len(precomputed[0])
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    h = key_hashes(keys) if precomputed is None else precomputed[0]
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    first_of = first[inverse]  # row -> first row (this round) with its key
    # Exact tier against earlier rounds: the key's cluster is already known.
    seen_before, root = state.lookup_keys(h)
    cand = np.flatnonzero(~seen_before & (first_of == np.arange(n)))  # in row order

    def new_rows(old: np.ndarray) -> np.ndarray:
        """Rows neither an exact nor a near duplicate of anything before the round (`old`: each candidate's match
        against earlier rounds, -1: none), handed to `on_fresh` as soon as they are known."""
        fresh_key = np.zeros(n, dtype=bool)
        fresh_key[cand[old < 0]] = True
        out: np.ndarray = ~seen_before & fresh_key[first_of]
        if on_fresh is not None:
            on_fresh(h, out)
        return out

    # the candidates' matches against earlier rounds: none to find when nothing is indexed (round 1) or near
    # duplicates are off; the partitioned reducers found them
    old = None
    if not d.near_duplicates or (precomputed is None and len(state.seen) == 0):
        old = np.full(len(cand), -1, np.int64)
    elif precomputed is not None:
        old = precomputed[2]
    fresh = None if old is None else new_rows(old)
    threads = merge_workers()  # the Job's CPUs: the signature blocks and bands run side by side
    # the signatures' kept bits (what similarity reads and the index keeps) and their band keys
    if precomputed is None:
        import pyarrow as pa

        hasher = MinHasher(d.num_perm, 1, d.shingle_size)
        sigs, bands = hasher.kept_and_bands(keys.take(pa.array(cand, pa.int64())), *state.seen.lsh, threads)
    else:
        bands = state.seen.band_keys(precomputed[1], threads)
        sigs = kept_sigs(precomputed[1])
    if d.near_duplicates:
        if old is None:
            old = state.seen.match(sigs, bands)
            fresh = new_rows(old)
        old, label, link = state.seen.assign(sigs, bands, old, threads)
    else:
        assert old is not None
        label = np.arange(len(cand))
        link = old
    own = ids[cand]
    croot = np.where(link >= 0, link, own[label])  # an earlier round's cluster, or the component's first row
    root[cand] = croot
    near = np.zeros(n, dtype=bool)
    near[cand] = croot != own
    rest = root == -1  # exact repeats within the round take their first occurrence's cluster
    root[rest] = root[first_of[rest]]
    kept = np.zeros(n, dtype=bool)
    kept[cand[croot == own]] = True
    assert fresh is not None  # every path above computed it once
    return Decisions(ids, kept, near, root, h, cand, sigs, bands, fresh, np.zeros(n, dtype=bool))


def semantic_tier(spec: Any, state: State, dec: Decisions, keys: Any, first_id: int) -> Any:
    """The semantic tier after exact and near (issue: unique means unique): the round's surviving rows, keep-first,
    against the kept embeddings of earlier rounds and the round's earlier kept rows (`semantic.apply_tier`, the
    generators' own rule). A dropped row names the kept row it duplicates and never drops another; rows of the round
    in its cluster (exact repeats, near duplicates) follow it. Updates `dec` and `state.semantic`; returns the
    dropped rows (id, duplicate_of, cosine, row position) for the report's clusters. `keys`: the survivors' keys."""
    import pyarrow as pa
    from genrun.worker.semantic import apply_tier

    sem = semantic_spec(spec)
    surv = np.flatnonzero(dec.kept)
    res, state.semantic, _ = apply_tier(
        [str(k) for k in keys.to_pylist()], dec.ids[surv], state.semantic,
        model=sem.model, threshold=sem.threshold, batch_size=sem.batch_size,
    )  # fmt: skip
    drop = surv[~res.keep]
    twin = res.dup_of[~res.keep]
    dec.kept[drop] = False
    dec.semantic[drop] = True
    if len(drop):  # rows whose cluster root was dropped take its twin (a kept row) as root
        did = dec.ids[drop]  # ascending: survivors are in row order
        pos = np.searchsorted(did, dec.root).clip(0, len(did) - 1)
        hit = did[pos] == dec.root
        dec.root[hit] = twin[pos[hit]]
        dec.fresh &= ~(hit & (dec.root < first_id))  # a duplicate of an earlier round's row is not new
    return pa.table({"id": pa.array(dec.ids[drop]), "duplicate_of": pa.array(twin),
                     "cosine": pa.array(res.cosine[~res.keep], pa.float32())}), drop  # fmt: skip


def _advance(state: State, dec: Decisions, sem_drops: Any = None) -> dict[str, dict[str, np.ndarray]]:
    """Fold a round's decisions into the state; returns the round's state and seen-index chunks. The index takes over
    dec.sigs (its rows moved in place): nothing reads it after."""
    owners, counts = np.unique(dec.root[~dec.kept], return_counts=True)
    sem_owner, sem_count = np.unique(
        np.asarray(sem_drops[0].column("duplicate_of")) if sem_drops is not None else np.empty(0, np.int64),
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
                              consume=True, threads=merge_workers())  # fmt: skip
    return {"chunk": chunk, "seen": added.to_npz(state.seen.params)}


# ------------------------------------------------------------------------------------------------------------------
# The round


def _clean_leftovers(storage: Storage, rnd: int) -> None:
    """What a killed merge left: temporary files under the merge's own prefixes, and the local folders of its S3
    writes (`Storage.staged`)."""
    for prefix in (rec.DATASET_PREFIX, "rejected/", "merge/", "quarantine/"):
        for key in storage.remove_leftovers(prefix):
            log.info("removed a killed merge's leftover %s", key)
    for d in remove_staged_leftovers():
        log.info("removed a killed merge's temp folder %s", d)


def _use_system_allocator() -> None:
    """Arrow's allocations through malloc: the Job holds a round's shards while it decides (one read each), and
    Arrow's default pool (mimalloc) keeps freed decode buffers mapped (about 250 MB more peak RSS at 1M rows)."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def merge_round(storage: Storage, spec: Any, run: str, rnd: int, shard_ids: list[tuple[int, int]]) -> rec.RoundReport:
    """Merge round `rnd`'s new shards (those of `shard_ids` with round == rnd) into the state of rounds before."""
    report_key = rec.round_report_key(rnd)
    if storage.exists(report_key):
        log.info("round %d already merged: %s", rnd, storage.location(report_key))
        return rec.round_report_from(json.loads(storage.read_bytes(report_key)))
    t0 = time.monotonic()
    _use_system_allocator()
    _clean_leftovers(storage, rnd)
    state = load_state(storage, spec, rnd - 1) if rnd > 1 else None
    replayed: range = range(0)
    if state is None:  # round 1, or a full re-merge: replay rounds 1..rnd-1 from round 0, then this one
        state = _round_zero(storage, spec)
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


def seed_state(storage: Any, spec: Any, state: Any) -> AgainstSeed | None:
    """Start the merge's round 1 from the against sources: their distinct keys go through the merge's own rules
    (genrun.worker.merge.decide and _advance) as a round 0 of kept rows with global ids 0..m-1, published as
    merge/r0000/{state.npz, seen-index.npz, kept.parquet} so `load_state` finds them for every later round and the
    top-duplicates table can name them. Returns the seed (its `semantic` index is the round-1 `index` of
    semantic.apply_tier), or None when dedup.against is empty. Call on State.empty(spec) before round 1's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from genrun.worker.against import load_against

    seed = load_against(spec)
    if seed is None or not seed.keys:
        return seed
    dec = decide(pa.array(seed.keys, pa.string()), state, spec, 0)
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


def _round_zero(storage: Storage, spec: Any) -> State:
    """The state before round 1: empty, or the instructions of spec.dedup.against (earlier runs and datasets) as
    round 0's kept rows, so every tier treats them as already seen."""
    state = State.empty(spec)
    if spec.dedup.against:
        seed = seed_state(storage, spec, state)
        if seed is not None and seed.semantic is not None:
            state.semantic = seed.semantic
    return state


def _merge_one(
    storage: Storage,
    spec: Any,
    run: str,
    rnd: int,
    shard_ids: list[tuple[int, int]],
    state: State,
    *,
    final: bool,
    rewritten: range = range(0),
) -> rec.RoundReport:
    shards, cols, quarantined, missing = _read_round(storage, spec, shard_ids)
    tot = state.totals
    first_id = tot.rows
    pre = None
    if spec.dedup.partitions > 1 and final:
        from genrun.worker.partitioned import precomputed_for

        pre = precomputed_for(storage, spec, rnd, state, shards)
    keys = round_keys(spec, cols, merge_workers()) if pre is None else None  # the maps did the per-row work
    with contextlib.ExitStack() as stack:
        qcs = stack.enter_context(_QcRuns(storage, spec.qc.filters, shards))
        # QC's worker processes fork inside decide (`on_fresh`), between its steps, where no thread of ours runs
        # (`each` joins its threads; Arrow's own pools have fork handlers): a fork copies no other thread, and a lock
        # that one held would stay held in the child.
        dec = decide(keys, state, spec, first_id, pre, on_fresh=qcs.start)
        sem_drops = None
        if semantic_spec(spec) is not None:  # single-process, also after partitioned maps and reducers
            import pyarrow as pa

            surv = pa.array(np.flatnonzero(dec.kept), pa.int64())
            skeys = keys.take(surv) if keys is not None else round_keys(spec, [pa.concat_tables(cols).take(surv)])
            sem_drops = semantic_tier(spec, state, dec, skeys, first_id)
        del keys, cols
        prefix = rec.merge_prefix(rnd)
        names = ["seen-index.npz", "state.npz", "kept.parquet", "alpaca.jsonl", "sharegpt.jsonl"]
        keys_of = {name: f"{prefix}/{name}" for name in names + (["semantic.parquet"] if sem_drops is not None else [])}
        keys_of |= {"dataset.parquet": rec.dataset_part_key(rnd), "rejected.parquet": rec.rejected_part_key(rnd)}
        # Each output written once, straight to where storage publishes it (atomically, when the block ends without an
        # error; S3: uploaded then); the report, which names them, after; its round report last of all.
        out = {name: stack.enter_context(storage.staged(key)) for name, key in keys_of.items()}
        step = _advance(state, dec, sem_drops)  # reads dec; the rows below read it too, and never the state
        # The state and seen-index files (161 MB at 1M rows) are written by a thread while this one writes the rows:
        # file writes and their CRCs release the GIL, and numpy writes an array in 16 MiB pieces. 1M rows: ~0.4 s
        # less, ~30 MB more peak. An error in either publishes nothing (the staged outputs see it as the block ends).
        saving = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="genrun-save"))
        saved = saving.submit(_save_index, state, step, out)
        round_counts = _write_rows(storage, spec, run, rnd, shards, dec, out, qcs, sem_drops)
        qcs.close()  # every verdict is in: the workers go before the state is saved and the outputs published
        saved.result()
        tot.round = rnd
        tot.round_first_id[rnd] = first_id
        tot.rows = first_id + len(dec.ids)
        tot.shards += [(s.round, s.seed) for s in shards]
        tot.quarantined += quarantined
        for s in shards:
            tot.generated[rnd] = tot.generated.get(rnd, 0) + s.manifest.generated
            tot.tokens[rnd] = tot.tokens.get(rnd, 0) + s.manifest.tokens
            skipped = s.manifest.skipped_online + s.manifest.skipped_in_shard
            tot.skipped[rnd] = tot.skipped.get(rnd, 0) + skipped
            early = sum(s.manifest.qc_rejected_before_response.values())
            tot.discarded[rnd] = tot.discarded.get(rnd, 0) + s.manifest.generated - s.manifest.rows - skipped - early
        for name, table in (("per_domain", round_counts["domain"]), ("per_temperature", round_counts["temperature"])):
            acc = getattr(tot, name)
            for k, c in table.items():
                acc.setdefault(k, Counts()).add(c)
        tot.per_round[rnd] = round_counts["round"]
        tot.left_domain += round_counts["left_domain"]
        tot.early += round_counts["early"]
        for k, v in round_counts["rejected"].items():
            tot.rejected[k] = tot.rejected.get(k, 0) + v
    report = replace(_report(storage, spec, state, rnd, len(shards)), per_shard=round_counts["per_shard"])
    if final:
        storage.write_bytes(f"{prefix}/report.md", render_markdown(report, run, missing=missing).encode())
    storage.write_bytes(state_key(rnd, "state.json"), tot.to_json().encode())
    if final:
        # The dataset folder (card, messages) before the completion marker, so that a retried merge redoes it.
        export_dataset(storage, spec, run, report, rewritten=rewritten)
        storage.write_bytes(rec.round_report_key(rnd), rec.to_json(report).encode())  # last: the completion marker
    return report


def _save_index(state: State, step: dict[str, dict[str, np.ndarray]], out: dict[str, Path]) -> None:
    """The round's state and seen-index chunks (`_advance`), written to the paths `out` gives."""
    save_npz(out["state.npz"], **step["chunk"])
    # the semantic tier's index rides in the seen-index (what `semantic.load_seen_semantic` reads): all kept rows
    sem_npz = state.semantic.to_npz() if state.semantic is not None else {}
    save_npz(out["seen-index.npz"], **step["seen"], **sem_npz)


def _write_rows(
    storage: Storage,
    spec: Any,
    run: str,
    rnd: int,
    shards: list[_Shard],
    dec: Decisions,
    out: dict[str, Path],
    qcs: _QcRuns,
    sem_drops: Any = None,
) -> dict[str, Any]:
    """Pass 2: each shard's rows (read in pass 1, or again past HOLD_BYTES) with QC's verdicts (`qcs`): the dataset
    part, rejected rows, exports; written to the paths `out` gives by file name."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rej_schema = (
        rec.example_schema().append(pa.field("reject_reason", pa.string())).append(pa.field("duplicate_of", pa.int64()))
    )
    per_domain: dict[str, Counts] = {}
    per_temp: dict[float, Counts] = {}
    this = Counts()
    rejected: Counter[str] = Counter()
    shard_yield: list[rec.ShardYield] = []

    def part(name: str, schema: Any, distinct: tuple[str, ...] = ()) -> Any:
        return pq.ParquetWriter(out[name], schema, use_dictionary=rec.dictionary_columns(schema, distinct))

    # kept rows have distinct instructions; rejected rows repeat them (exact duplicates)
    ds = part("dataset.parquet", rec.example_schema().with_metadata(part_metadata(spec, run)), ("instruction",))
    rj = part("rejected.parquet", rej_schema)
    kept_w = part("kept.parquet", pa.schema([("id", pa.int64()), ("instruction", pa.string())]), ("instruction",))
    g = 0
    left_domain = early_total = 0
    sem_texts = []
    writing = None
    with (
        open(out["alpaca.jsonl"], "w") as alpaca,
        open(out["sharegpt.jsonl"], "w") as sharegpt,
        ThreadPoolExecutor(1, thread_name_prefix="genrun-rejected") as writer,
    ):
        for k, sh in enumerate(shards):
            first, check, (why, vcodes) = qcs.result(k)  # QC of the rows that need it (in worker processes if any)
            # dropped as soon as written (a shard QC's workers inherited stays theirs until the pool ends)
            table, sh.table = _held(storage, sh), None
            n = table.num_rows
            kept = dec.kept[g : g + n]
            fresh = first & dec.fresh[g : g + n]  # the shard's yield: new against earlier rounds, once per key
            if np.count_nonzero(kept[check]) != np.count_nonzero(kept):  # a kept row without a verdict would pass
                raise RuntimeError(f"shard {sh.seed}: a kept row was not judged by QC")
            # Each row's reason as a code into `why` (-1: none, it passed): a duplicate's tier, else QC's verdict,
            # for the rows it checked. Vectorised: no per-row Python objects over the round's million rows.
            reason = np.full(n, -1, np.int64)
            reason[check] = vcodes
            qc_ok = reason < 0
            tier = np.where(dec.semantic[g : g + n], 2, np.where(dec.near[g : g + n], 1, 0))
            reason[~kept] = len(why) + tier[~kept]
            why += list(DUPLICATE_REASONS)  # REASON_EXACT, REASON_NEAR, REASON_SEMANTIC: tiers 0, 1, 2
            # the instructions the generator's QC rejected before their responses: new unique examples that failed
            # QC, judged against the same seen-index (earlier rounds) by the generator's online check
            early = sh.manifest.qc_rejected_before_response
            n_early = sum(early.values())
            early_total += n_early
            rejected.update(early)
            this.unique += n_early
            shard_yield.append(
                rec.ShardYield(
                    sh.seed,
                    n + n_early,
                    sh.manifest.tokens,
                    int(fresh.sum()) + n_early,
                    int((fresh & qc_ok).sum()),
                    generated=sh.manifest.generated,
                    kept=int((kept & qc_ok).sum()),
                )
            )
            if sem_drops is not None:
                mine = sem_drops[1][(sem_drops[1] >= g) & (sem_drops[1] < g + n)] - g
                sem_texts.append(table.column("instruction").take(pa.array(mine, pa.int64())).combine_chunks())
            kidx = np.flatnonzero(kept)
            if len(kidx):
                kept_w.write_table(
                    pa.table({"id": pa.array(dec.ids[g : g + n][kidx]),
                              "instruction": table.column("instruction").take(pa.array(kidx))})
                )  # fmt: skip
            passed = reason < 0
            # counters: per domain and temperature, vectorised over codes
            # The domain actually generated (quality column, when the generator had the embedding model), else the
            # domain asked for; rows that left their asked domain are counted (sem, issue 12).
            asked, gen = pc.fill_null(table.column("domain"), ""), table.column("generated_domain")
            left_domain += int(pc.sum(pc.fill_null(pc.not_equal(gen, asked), False)).as_py() or 0)
            dom = pc.dictionary_encode(pc.coalesce(gen, asked)).combine_chunks()
            temp = np.round(table.column("temperature").to_numpy().astype(np.float64), 3)
            for label, codes, names, acc in (
                ("domain", np.asarray(dom.indices), dom.dictionary.to_pylist(), per_domain),
                ("temperature", *_codes(temp), per_temp),
            ):
                del label
                for j, name in enumerate(names):
                    sel = codes == j
                    c = acc.setdefault(name, Counts())
                    c.rows += int(sel.sum())
                    c.unique += int((sel & kept).sum())
                    c.kept += int((sel & passed).sum())
            this.rows += n
            this.unique += int(kept.sum())
            this.kept += int(passed.sum())
            pidx = np.flatnonzero(passed)
            if len(pidx):
                good = table.take(pa.array(pidx))
                ds.write_table(good)
                _write_exports(good, alpaca, sharegpt)
            ridx = np.flatnonzero(~passed)
            if len(ridx):
                rcodes = reason[ridx]
                rejected.update({why[c]: int(m) for c, m in enumerate(np.bincount(rcodes)) if m})
                dup_of = np.where(kept[ridx], -1, dec.root[g : g + n][ridx])
                # Most of a round's rows: taken and encoded by the writer thread (Arrow releases the GIL) while this
                # one goes on to the next shard; one shard in flight.
                if writing is not None:
                    writing.result()
                writing = writer.submit(_write_rejected, rj, table, ridx, rcodes, why, dup_of)
            g += n
        if writing is not None:
            writing.result()
    ds.close()
    rj.close()
    kept_w.close()
    if sem_drops is not None:  # the round's semantic drops with their texts, for the report's clusters
        texts = pa.concat_arrays(sem_texts) if sem_texts else pa.array([], pa.string())
        pq.write_table(sem_drops[0].append_column("instruction", texts), out["semantic.parquet"])
    return {"domain": per_domain, "temperature": per_temp, "round": this, "rejected": dict(rejected),
            "per_shard": tuple(shard_yield), "left_domain": left_domain, "early": early_total}  # fmt: skip


def _write_rejected(
    rj: Any, table: Any, ridx: np.ndarray, rcodes: np.ndarray, why: list[str], dup_of: np.ndarray
) -> None:
    """A shard's rejected rows with their reason (a code into `why`) and the row they duplicate (-1: none)."""
    import pyarrow as pa

    rr = pa.DictionaryArray.from_arrays(pa.array(rcodes, pa.int32()), pa.array(why, pa.string()))
    bad = table.take(pa.array(ridx)).append_column("reject_reason", rr.cast(pa.string()))
    rj.write_table(bad.append_column("duplicate_of", pa.array(dup_of, pa.int64(), mask=dup_of < 0)))


def _verdict_codes(verdicts: list[str | None]) -> tuple[list[str], np.ndarray]:
    """QC's verdicts as (the distinct reasons, each verdict's code into them; -1 for None, a pass)."""
    names = sorted({v for v in verdicts if v is not None})
    code = {v: i for i, v in enumerate(names)}
    return names, np.fromiter((-1 if v is None else code[v] for v in verdicts), np.int64, len(verdicts))


MERGE_WORKERS_ENV = "GENRUN_MERGE_WORKERS"
QC_NICE = 10  # the QC workers' niceness, added to the Job's (lower priority: the Job's process runs first)
QC_POOL_MIN_ROWS = 50_000  # a round with fewer rows to check runs QC in the Job's own process: forking costs more


def merge_workers() -> int:
    """Processes for the merge's QC, and threads for its dedup's numpy work: $GENRUN_MERGE_WORKERS, else the CPUs this
    process may use (its affinity, capped by its cgroup's CPU quota: a Job pod's CPU limit, not the node's cores).
    1: none (QC in the Job's own process, dedup in its one thread)."""
    raw = os.environ.get(MERGE_WORKERS_ENV, "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            log.warning("%s=%r is not a whole number: using the CPU count (1 turns worker processes off)",
                        MERGE_WORKERS_ENV, raw)  # fmt: skip
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cpus, quota)) if quota else cpus


def _cgroup_cpus(root: str = "/sys/fs/cgroup") -> int | None:
    """CPUs of the cgroup's quota, rounded up (cgroup v2 cpu.max, else v1 cfs quota/period); None when unlimited."""
    import math

    for name, split in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu.cfs_period_us")):
        path = Path(root) / name
        try:
            text = path.read_text().split()
            quota, period = (text[0], text[1]) if split is None else (text[0], path.with_name(split).read_text())
            if quota in ("max", "-1"):
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        except (OSError, ValueError, IndexError):
            continue
    return None


# a worker process's pipeline, and per shard the table held at the fork (or None) and the rows to check
_POOL: tuple[QcPipeline, list[Any], list[np.ndarray]] | None = None


def _pool_init(filters: Any, held: list[Any], check: list[np.ndarray]) -> None:
    """In each forked worker: the pipeline, and every shard's table held at the fork with the rows to check. A fork
    does not pickle the initializer's arguments: the workers read the parent's tables through copy-on-write pages."""
    global _POOL
    # Below the Job's own process: the workers fork while it still decides the round (its critical path), and take
    # the CPU it leaves (1M rows on 2 CPUs: 4.3 s instead of 4.7-5.2 s at the same priority).
    os.nice(QC_NICE)
    _POOL = (QcPipeline.from_spec(filters), held, check)


def _pool_check(k: int, rows: Any) -> tuple[list[str], np.ndarray]:
    """Shard k's verdicts as codes (`_verdict_codes`): on its rows to check, taken from the table inherited at the
    fork, or `rows` when the shard was not held then."""
    import pyarrow as pa

    assert _POOL is not None
    qc, held, check = _POOL
    if rows is None:
        table = held[k]
        rows = table.select(qc.columns(table.column_names)).take(pa.array(check[k], pa.int64()))
    return _verdict_codes(qc.check_table(rows))


class _QcRuns:
    """Per shard of the round, the rows QC must judge and their verdicts: the shard's first row of each key new
    against earlier rounds (its yield; every row the round keeps is one of them, and a row a later tier drops only
    costs a verdict). `start` is `decide`'s `on_fresh`: with several workers and enough rows, the worker processes
    fork there and judge the held shards while the Job's process decides the rest of the round and writes; shards
    read again in pass 2 (past HOLD_BYTES) go to the workers a few ahead of the writer. QC is a pure function of
    each row, so the verdicts (and every output) are the same as in process (tested)."""

    def __init__(self, storage: Storage, filters: Any, shards: list[_Shard]) -> None:
        self.storage, self.shards, self.filters = storage, shards, filters
        self.qc = QcPipeline.from_spec(filters)
        self.rows: list[tuple[np.ndarray, np.ndarray]] | None = None  # per shard: (first row of its key, to check)
        self.workers = 1
        self.pool: Any = None
        self.pending: dict[int, Any] = {}

    def start(self, hashes: np.ndarray, fresh: np.ndarray) -> None:
        """The rows to check from the round's key hashes and its rows new against earlier rounds; with workers, the
        fork and the held shards' checks."""
        import gc

        if self.rows is not None:
            raise RuntimeError("QC of the round started twice")
        self.rows = []
        g = 0
        for sh in self.shards:
            n = sh.rows
            _, in_shard = np.unique(hashes[g : g + n], return_index=True)
            first = np.zeros(n, dtype=bool)
            first[in_shard] = True
            self.rows.append((first, np.flatnonzero(first & fresh[g : g + n])))
            g += n
        total = sum(len(c) for _, c in self.rows)
        judge = self.qc.filters and total >= QC_POOL_MIN_ROWS  # no filters: every row passes, no workers
        self.workers = min(merge_workers(), len(self.shards)) if judge else 1
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # The workers inherit the shards held now (the fork happens at the first submit, below) and are sent only
            # a shard's number: pickling the rows to check to them cost ~0.5 CPU-s at 1M rows.
            self.held = [sh.table is not None for sh in self.shards]
            args = (self.filters, [sh.table for sh in self.shards], [c for _, c in self.rows])
            # The process goes on deciding while the workers live: objects that exist now stay out of the garbage
            # collector's passes, whose writes would copy their pages from the workers' (1M rows: ~45 MB less in all)
            gc.freeze()
            self.pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"), _pool_init, args)
            self.ahead = self.workers + 1  # shards in flight: each worker busy, one queued (bounded memory)
            log.info("QC of %d rows in %d worker processes", total, self.workers)
            # every held shard at once (the workers have its rows: nothing is sent; pass 1 holds the first shards
            # while they fit); the others from `result`, a few ahead of the writer
            self.submitted = 0
            while self.submitted < len(self.held) and self.held[self.submitted]:
                self._submit(self.submitted)

    def _rows(self, k: int) -> Any:
        """Shard k's rows to check, with the columns QC reads."""
        import pyarrow as pa

        assert self.rows is not None
        table = _held(self.storage, self.shards[k])
        return table.select(self.qc.columns(table.column_names)).take(pa.array(self.rows[k][1], pa.int64()))

    def _submit(self, k: int) -> None:
        # a shard not held at the fork is read again here, and its rows to check pickled to the worker
        self.pending[k] = self.pool.submit(_pool_check, k, None if self.held[k] else self._rows(k))
        self.submitted = k + 1

    def result(self, k: int) -> tuple[np.ndarray, np.ndarray, tuple[list[str], np.ndarray]]:
        """Shard k's (first row of each key, rows checked, their verdicts as codes); call in shard order, after
        `start`, while its table is held."""
        if self.rows is None:
            raise RuntimeError("QC of the round was never started (decide did not call on_fresh)")
        first, check = self.rows[k]
        if self.pool is None:
            judged = len(check) and self.qc.filters  # `_rows` of no filter would be a table of no columns (no rows)
            return first, check, _verdict_codes(self.qc.check_table(self._rows(k)) if judged else [None] * len(check))
        while self.submitted < min(len(self.rows), k + 1 + self.ahead):
            self._submit(self.submitted)
        return first, check, self.pending.pop(k).result()

    def close(self) -> None:
        """End the workers (once every verdict is in: what they hold of the Job's pages is freed with them)."""
        import gc

        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
            gc.unfreeze()

    def __enter__(self) -> _QcRuns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _codes(values: np.ndarray) -> tuple[np.ndarray, list[float]]:
    uniq, inv = np.unique(values, return_inverse=True)
    return inv, [float(x) for x in uniq]


def _write_exports(table: Any, alpaca: Any, sharegpt: Any) -> None:
    ins, res = (json_strings(table.column(c)) for c in ("instruction", "response"))
    alpaca.writelines(f'{{"instruction": {i}, "input": "", "output": {r}}}\n' for i, r in zip(ins, res, strict=True))
    sharegpt.writelines(
        f'{{"conversations": [{{"from": "human", "value": {i}}}, {{"from": "gpt", "value": {r}}}]}}\n'
        for i, r in zip(ins, res, strict=True)
    )


def _top_duplicates(storage: Storage, state: State) -> tuple[tuple[str, int], ...]:
    top = [(i, n) for i, n in state.totals.top if n > 1]
    text = _kept_texts(storage, state, np.array([i for i, _ in top], dtype=np.int64))
    return tuple((text[i], n) for i, n in top)


def _kept_texts(storage: Storage, state: State, ids: np.ndarray) -> dict[int, str]:
    """Instructions of kept rows by global id, from the kept.parquet of the rounds that hold them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rounds = sorted(state.totals.round_first_id)
    firsts = np.array([state.totals.round_first_id[r] for r in rounds])
    text: dict[int, str] = {}
    for r in {rounds[int(np.searchsorted(firsts, i, "right")) - 1] for i in ids.tolist()}:
        t = read_parquet(storage, state_key(r, "kept.parquet"))
        t = t.filter(pc.is_in(t.column("id"), value_set=pa.array(ids)))
        text.update(zip(t.column("id").to_pylist(), t.column("instruction").to_pylist(), strict=True))
    return text


def _semantic_clusters(storage: Storage, state: State, k: int = 10, sample: int = 5) -> tuple[Any, ...]:
    """The largest semantic clusters so far: the kept first row, up to `sample` dropped members (earliest first)
    with their cosine, and the cluster's size (its first and every member the semantic tier dropped)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not state.totals.sem_top:
        return ()
    ids = np.array([i for i, _ in state.totals.sem_top[:k]], dtype=np.int64)
    sizes = np.array([n for _, n in state.totals.sem_top[:k]], dtype=np.int64)
    first = _kept_texts(storage, state, ids)
    members: dict[int, list[tuple[str, float]]] = {int(i): [] for i in ids.tolist()}
    for r in sorted(state.totals.round_first_id):  # earliest rounds first: members in id order
        key = state_key(r, "semantic.parquet")
        if not storage.exists(key):
            continue
        t = read_parquet(storage, key)
        t = t.filter(pc.is_in(t.column("duplicate_of"), value_set=pa.array(ids)))
        for d, text, cos in zip(*(t.column(c).to_pylist() for c in ("duplicate_of", "instruction", "cosine")),
                                strict=True):  # fmt: skip
            if len(members[d]) < sample:
                members[d].append((str(text), round(float(cos), 4)))
    return tuple(
        rec.SemanticCluster(first[int(i)], tuple(members[int(i)]), int(n))
        for i, n in zip(ids.tolist(), sizes.tolist(), strict=True)
    )


def _report(storage: Storage, spec: Any, state: State, rnd: int, shards: int) -> rec.RoundReport:
    tot = state.totals
    this = tot.per_round.get(rnd, Counts())
    sem_on = semantic_spec(spec) is not None
    return rec.RoundReport(
        round=rnd,
        shards=shards,
        generated=tot.generated.get(rnd, 0),
        new_unique=this.unique,
        new_qc_passed=this.kept,
        generated_total=sum(tot.generated.values()),
        unique_total=sum(c.unique for c in tot.per_round.values()),
        qc_passed_total=sum(c.kept for c in tot.per_round.values()),
        tokens=tot.tokens.get(rnd, 0),
        tokens_total=sum(tot.tokens.values()),
        skipped_online=tot.skipped.get(rnd, 0),
        exact_duplicates=tot.rejected.get(REASON_EXACT, 0),
        near_duplicates=tot.rejected.get(REASON_NEAR, 0),
        semantic_duplicates=tot.rejected.get(REASON_SEMANTIC, 0),
        online_duplicates=sum(tot.skipped.values()),
        discarded=tot.discarded.get(rnd, 0),
        discarded_total=sum(tot.discarded.values()),
        dedup_tiers=("exact", "near", "semantic") if sem_on else ("exact", "near"),
        semantic_clusters=_semantic_clusters(storage, state) if sem_on else (),
        qc_rejected={k: v for k, v in sorted(tot.rejected.items()) if k not in DUPLICATE_REASONS},
        top_duplicates=_top_duplicates(storage, state),
        per_domain=tuple(rec.DomainYield(d, c.rows, c.unique, c.kept) for d, c in sorted(tot.per_domain.items())),
        per_temperature=tuple(
            rec.TemperatureYield(t, c.rows, c.unique, c.kept) for t, c in sorted(tot.per_temperature.items())
        ),
        quarantined=tuple(tot.quarantined),
        quarantined_count=len(tot.quarantined),
        left_domain=tot.left_domain,
        qc_rejected_before_response=tot.early,
        dataset=storage.location(rec.DATASET_PREFIX),
        report=storage.location(f"{rec.merge_prefix(rnd)}/report.md"),
    )


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def render_markdown(r: rec.RoundReport, run: str, missing: list[str] | None = None) -> str:
    """The round report in the problem's style: totals, duplication, top duplicates, QC rejections. Generated =
    unique + exact + near + semantic + online + discarded (`records.Accounting`)."""
    a = rec.Accounting.total(r)
    lines = [
        f"# genrun report: {run}, round {r.round}",
        "",
        "| | count | share |",
        "|---|---:|---:|",
        f"| Generated (instructions sampled) | {r.generated_total:,} | 100% |",
        f"| Unique after dedup | {r.unique_total:,} | {_pct(r.unique_total, r.generated_total)} |",
        f"| Duplication rate | | {100 * r.duplication_ratio:.1f}% |",
        f"| Final (unique and QC-passed) | {r.qc_passed_total:,} | {_pct(r.qc_passed_total, r.generated_total)} |",
        f"| This round: generated / new unique / new kept | {r.generated:,} / {r.new_unique:,} / {r.new_qc_passed:,} | "
        f"marginal yield {r.marginal_yield:.3f} |",
        f"| Duplicates (all rounds): exact / near / semantic / online | {a.exact:,} / {a.near:,} / {a.semantic:,} / "
        f"{a.online:,} | {_pct(a.duplicates, a.generated)} |",
        f"| Discarded (sampled past a shard's quota, or malformed) | {a.discarded:,} | {_pct(a.discarded, a.generated)} |",
        f"| Skipped by the generators this round (online: seen before or in the shard) | {r.skipped_online:,} | |",
        f"| Rejected by QC in the generators before their responses (in unique and QC rejections) | "
        f"{r.qc_rejected_before_response:,} | |",
        f"| Tokens generated (all rounds) | {r.tokens_total:,} | |",
        "",
        "## Top duplicates",
        "",
        "| # | instruction | count | % of generated |",
        "|---:|---|---:|---:|",
    ]
    for i, (text, count) in enumerate(r.top_duplicates, 1):
        short = text.replace("|", "\\|").replace("\n", " ")[:100]
        lines.append(f"| {i} | {short} | {count:,} | {_pct(count, r.generated_total)} |")
    lines += ["", "## QC rejections by reason", "", "| reason | count |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(r.qc_rejected.items(), key=lambda x: -x[1])] or ["| (none) | 0 |"]
    lines += ["", f"Exact duplicates: {r.exact_duplicates:,}; near-duplicates (MinHash LSH): {r.near_duplicates:,}."]
    lines += [
        "",
        "## Yield per domain (rows written, all rounds)",
        "",
        *(
            [f"Domain generated (nearest spec domain); {r.left_domain:,} rows left the domain they were asked for.", ""]
            if r.left_domain
            else []
        ),
        "| domain | rows | unique | kept |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {d.domain or '(none)'} | {d.generated:,} | {d.new_unique:,} | {d.new_qc_passed:,} |" for d in r.per_domain
    ]
    lines += [
        "",
        "## Yield per temperature (rows written, all rounds)",
        "",
        "| temperature | rows | unique | kept |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {t.temperature:g} | {t.generated:,} | {t.new_unique:,} | {t.new_qc_passed:,} |" for t in r.per_temperature
    ]
    if r.quarantined or missing:
        lines += ["", f"## Not merged ({r.quarantined_count} quarantined)", ""]
        lines += [f"- quarantined (unreadable or damaged): {k}" for k in r.quarantined]
        lines += [f"- missing (shard failed or not published): {k}" for k in missing or []]
    return "\n".join(lines) + "\n"


def load_seen_index(storage: Storage, rnd: int) -> SeenIndex | None:
    """The seen-index after round `rnd`'s merge (its chunks of rounds 1..rnd joined), or None (round 0, none)."""
    parts = []
    for r in range(1, rnd + 1):
        key = rec.seen_index_key(r)
        if storage.exists(key):
            with contextlib.suppress(OSError, ValueError):
                parts.append(SeenIndex.from_npz(load_npz(storage, key)))
    return SeenIndex.concat(parts) if parts else None
