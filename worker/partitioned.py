"""Dedup of a round beyond one machine: a map step per input partition and a reduce step per band partition, each a
separate command (`genrun worker dedup-map|dedup-reduce`), so the operator can run them as Kubernetes Indexed Jobs;
the merge then finalises with the same tiers (`tiers.decide`; the state and shard reading both use live in
`merge_state`) as the single-process path.

Work split: the maps do the per-row work (normalised keys, key hashes, MinHash signatures of each key's first
occurrence in the partition); each reducer matches the round's candidate rows (first occurrences of keys never seen
before) against the bucket firsts of earlier rounds on its share of the LSH bands (`SeenIndex.match`, the merge's
own routine, restricted to those bands). The finaliser takes the minimum over reducers, which is the match over all
bands, and applies the keep-first rule within the round. Same result as the single-process merge, by construction
(tested).

Layout under merge/rNNNN/: map/part-IIII.npz (shards, row counts, key hashes, first-occurrence rows) with
map/part-IIII.sigs.npy (their signatures), and reduce/bands-JJJJ.npz (per candidate: earliest matching kept row).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from genrun.contract import records as rec
from genrun.worker.dedup import MinHasher, key_hashes, lsh_params
from genrun.worker.dedup_config import DedupConfig
from genrun.worker.merge_state import State, load_state, read_table, round_keys
from genrun.worker.storage import DamagedMarker, Storage, local_copy, read_marker

if TYPE_CHECKING:
    from genrun.worker.merge_read import Shard

log = logging.getLogger("genrun.partitioned")


def map_key(rnd: int, part: int) -> str:
    return f"{rec.merge_prefix(rnd)}/map/part-{part:04d}.npz"


def map_sigs_key(rnd: int, part: int) -> str:
    return f"{rec.merge_prefix(rnd)}/map/part-{part:04d}.sigs.npy"


def reduce_key(rnd: int, part: int) -> str:
    return f"{rec.merge_prefix(rnd)}/reduce/bands-{part:04d}.npz"


def _published_shards(storage: Storage, rnd: int, shard_ids: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Round `rnd`'s shards with a sound completion marker, in the merge's order: what the partitions split."""
    out = []
    for r, s in sorted(x for x in shard_ids if x[0] == rnd):
        try:
            if read_marker(storage, rec.shard_manifest_key(r, s)) is not None:
                out.append((r, s))
        except DamagedMarker:
            continue  # the merge quarantines it
    return out


def dedup_map(
    storage: Storage, cfg: DedupConfig, rnd: int, shard_ids: list[tuple[int, int]], part: int, parts: int
) -> str:
    """Keys and signatures of the shards of input partition `part` (every parts-th published shard of the round).

    Each shard is read once, whole and schema-checked; one that cannot be read is left out, as the merge quarantines
    it (the finaliser checks that the maps saw exactly the shards it merges)."""
    shards, counts, cols = [], [], []
    for r, s in _published_shards(storage, rnd, shard_ids)[part::parts]:
        try:
            table = read_table(storage, rec.shard_data_key(r, s))
        except Exception:
            continue
        shards.append((r, s))
        counts.append(table.num_rows)
        cols.append(table.select(["instruction", "response"] if cfg.key == "pair" else ["instruction"]))
    keys = round_keys(cfg, cols)
    h = key_hashes(keys)
    _, first = np.unique(h, return_index=True)  # partition-local first occurrences; global ones are among them
    uniq = np.sort(first)
    import pyarrow as pa

    sigs = MinHasher(cfg.num_perm, 1, cfg.shingle_size).signatures(keys.take(pa.array(uniq, pa.int64())))
    buf = io.BytesIO()
    np.savez(buf, shards=np.array(shards, dtype=np.int64).reshape(-1, 2), counts=np.array(counts, dtype=np.int64),
             key_hash=h, uniq=uniq.astype(np.int64))  # fmt: skip
    sig_buf = io.BytesIO()
    np.save(sig_buf, sigs)
    storage.write_bytes(map_sigs_key(rnd, part), sig_buf.getvalue())
    storage.write_bytes(map_key(rnd, part), buf.getvalue())  # last: its presence means the partition is done
    return storage.location(map_key(rnd, part))


@dataclass
class Candidates:
    """The round's rows in global order, stitched from the maps: key hashes, and the candidates (first occurrences
    of keys not seen in earlier rounds) with their signatures."""

    shards: list[tuple[int, int]]
    hashes: np.ndarray
    cand: np.ndarray
    sigs: np.ndarray


def _load(storage: Storage, key: str) -> dict[str, np.ndarray]:
    with local_copy(storage, key) as p, np.load(p) as z:
        return {k: z[k] for k in z.files}


def candidates(storage: Storage, cfg: DedupConfig, rnd: int, state: State) -> Candidates:
    parts = cfg.partitions
    loaded = []
    for i in range(parts):
        m = _load(storage, map_key(rnd, i))
        with local_copy(storage, map_sigs_key(rnd, i)) as p:
            m["sigs"] = np.load(p)
        loaded.append(m)
    where: dict[tuple[int, int], tuple[int, int, int]] = {}  # shard -> (partition, local offset, rows)
    for i, m in enumerate(loaded):
        off = 0
        for (r, s), n in zip(m["shards"].tolist(), m["counts"].tolist(), strict=True):
            where[(r, s)] = (i, off, n)
            off += n
    order = sorted(where)
    hashes, src_part, src_pos = [], [], []
    for sh in order:
        i, off, n = where[sh]
        hashes.append(loaded[i]["key_hash"][off : off + n])
        src_part.append(np.full(n, i, np.int64))
        src_pos.append(np.arange(off, off + n, dtype=np.int64))
    num_perm = cfg.num_perm
    if not hashes:
        return Candidates(order, np.empty(0, np.uint64), np.empty(0, np.int64), np.empty((0, num_perm), np.uint32))
    h = np.concatenate(hashes)
    part_of, pos_of = np.concatenate(src_part), np.concatenate(src_pos)
    _, first = np.unique(h, return_index=True)
    seen, _ = state.lookup_keys(h[first])
    cand = np.sort(first[~seen])
    sigs = np.empty((len(cand), num_perm), np.uint32)
    for i, m in enumerate(loaded):
        sel = np.flatnonzero(part_of[cand] == i)
        sigs[sel] = m["sigs"][np.searchsorted(m["uniq"], pos_of[cand[sel]])]
    return Candidates(order, h, cand, sigs)


def _fingerprint(state: State) -> np.ndarray:
    """Which state a reducer matched against (rounds merged, kept rows): the finaliser uses only matching outputs."""
    return np.array([state.totals.round, state.totals.rows], dtype=np.int64)


def dedup_reduce(storage: Storage, cfg: DedupConfig, rnd: int, parts: int, band_part: int, band_parts: int) -> str:
    """Per candidate row, the earliest bucket first of earlier rounds it is similar to, on the bands b % band_parts ==
    band_part (-1 if none)."""
    state = load_state(storage, cfg, rnd - 1) or State.empty(cfg)
    c = candidates(storage, cfg, rnd, state)
    b, _ = lsh_params(cfg.threshold, cfg.num_perm)
    mine = [band for band in range(b) if band % band_parts == band_part]
    match = state.seen.match(c.sigs, state.seen.band_keys(c.sigs), mine)
    buf = io.BytesIO()
    np.savez(buf, match=match, cand=c.cand, state=_fingerprint(state))
    storage.write_bytes(reduce_key(rnd, band_part), buf.getvalue())
    return storage.location(reduce_key(rnd, band_part))


def precomputed_for(
    storage: Storage, cfg: DedupConfig, rnd: int, state: State, shards: list[Shard]
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(key hashes, candidate signatures, matches against earlier rounds) from the maps and reducers, or None when
    they do not describe exactly this merge (other shards, another state): the merge then computes them itself."""
    parts = cfg.partitions
    if not all(storage.exists(reduce_key(rnd, j)) for j in range(parts)):
        return None
    c = candidates(storage, cfg, rnd, state)
    if c.shards != [(s.round, s.seed) for s in shards]:
        log.warning("partition outputs cover other shards than the merge reads: computing keys here")
        return None
    match = np.full(len(c.cand), np.iinfo(np.int64).max, np.int64)
    for j in range(parts):
        z = _load(storage, reduce_key(rnd, j))
        if not np.array_equal(z["state"], _fingerprint(state)) or not np.array_equal(z["cand"], c.cand):
            log.warning("reducer %d matched against another state: computing matches here", j)
            return None
        m = z["match"]
        np.minimum(match, np.where(m < 0, np.iinfo(np.int64).max, m), out=match)
    match[match == np.iinfo(np.int64).max] = -1
    return c.hashes, c.sigs, match
