"""Dedup beyond one machine: a map step per input partition and a reduce step per band partition, each a separate
command (`genrun worker dedup-map|dedup-reduce`), so the operator can run them as Kubernetes Indexed Jobs; the merge
then finalises (exact groups + connected components over the reducers' pairs) and writes the outputs.

Same result as the single-process merge, by construction: rows keep their global (round, seed, index) order, only
globally exact-unique rows enter the LSH buckets, each bucket pairs its members with its earliest row, and pairs are
verified on the full signatures; the union of the reducers' pairs is the single process's pair set.

Layout under merge/rNNNN/: map/part-IIII.npz (row counts, key hashes, unique rows, band keys) with
map/part-IIII.sigs.npy (signatures, memory-mappable), and reduce/bands-JJJJ.npz (verified pairs).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from genrun.worker import records as rec
from genrun.worker.dedup import MinHasher, band_keys, dedup_keys, key_hash, lsh_params, similar
from genrun.worker.storage import Storage, local_copy


def map_key(rnd: int, part: int) -> str:
    return f"{rec.merge_prefix(rnd)}/map/part-{part:04d}.npz"


def map_sigs_key(rnd: int, part: int) -> str:
    return f"{rec.merge_prefix(rnd)}/map/part-{part:04d}.sigs.npy"


def reduce_key(rnd: int, part: int) -> str:
    return f"{rec.merge_prefix(rnd)}/reduce/bands-{part:04d}.npz"


def _published_shards(storage: Storage, shard_ids: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Shards with a completion marker, in the merge's order: what the partitions split between them."""
    return [(r, s) for r, s in sorted(shard_ids) if storage.exists(rec.shard_manifest_key(r, s))]


def dedup_map(storage: Storage, spec: Any, rnd: int, shard_ids: list[tuple[int, int]], part: int, parts: int) -> str:
    """Keys, signatures and band keys of the shards of input partition `part` (every parts-th published shard).

    Each shard is read once, whole and schema-checked; one that cannot be read is left out, as the merge quarantines
    it. The global row order comes from the shards the maps report, so it matches the merge's order."""
    from genrun.worker.merge import _read_table

    mine = _published_shards(storage, shard_ids)[part::parts]
    d = spec.dedup
    hasher = MinHasher(d.num_perm, 1, d.shingle_size)
    bands, rows = lsh_params(d.threshold, d.num_perm)
    shards, counts, hashes, keys_local = [], [], [], []
    for r, s in mine:
        try:
            table = _read_table(storage, rec.shard_data_key(r, s))
        except Exception:
            continue  # the merge quarantines it and reports it
        shards.append((r, s))
        keys = dedup_keys(table.column("instruction"), table.column("response") if d.key == "pair" else None,
                          key=d.key, normalized=d.normalize)  # fmt: skip
        counts.append(len(keys))
        keys_local += keys
        hashes.append(np.fromiter((key_hash(k) for k in keys), dtype=np.uint64, count=len(keys)))
    h = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
    _, first = np.unique(h, return_index=True)  # partition-local first occurrences; global ones are among them
    uniq = np.sort(first)
    sigs = hasher.signatures([keys_local[i] for i in uniq]) if len(uniq) else np.empty((0, d.num_perm), np.uint32)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        shards=np.array(shards, dtype=np.int64).reshape(-1, 2),
        counts=np.array(counts, dtype=np.int64),
        key_hash=h,
        uniq=uniq.astype(np.int64),
        bands=band_keys(sigs, bands, rows),
    )
    sig_buf = io.BytesIO()
    np.save(sig_buf, sigs)
    storage.write_bytes(map_sigs_key(rnd, part), sig_buf.getvalue())
    storage.write_bytes(map_key(rnd, part), buf.getvalue())  # last: its presence means the partition is done
    return storage.location(map_key(rnd, part))


class _Global:
    """All map partitions stitched into the merge's global row order."""

    def __init__(self, storage: Storage, rnd: int, parts: int, with_sigs: bool = True) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="genrun-reduce-")
        loaded = []
        for i in range(parts):
            with local_copy(storage, map_key(rnd, i)) as p, np.load(p) as z:
                part = {k: z[k] for k in z.files}
            if with_sigs:
                dest = Path(self.tmp.name) / f"{i}.npy"
                with local_copy(storage, map_sigs_key(rnd, i)) as p:
                    dest.write_bytes(Path(p).read_bytes())
                part["sigs"] = np.load(dest, mmap_mode="r")  # bounded memory: pages in only what is compared
            loaded.append(part)
        # Global offsets: shards in (round, seed) order, rows in file order, as the merge reads them.
        where: dict[tuple[int, int], tuple[int, int, int]] = {}  # shard -> (partition, local offset, rows)
        for i, part in enumerate(loaded):
            off = 0
            for (r, s), n in zip(part["shards"].tolist(), part["counts"].tolist(), strict=True):
                where[(r, s)] = (i, off, n)
                off += n
        self.order = sorted(where)
        gpos, goff = {}, 0
        for sh in self.order:
            gpos[sh] = goff
            goff += where[sh][2]
        self.n = goff
        self.key_hash = np.empty(self.n, np.uint64)
        self.local_to_global = []
        for part in loaded:
            mapping = np.empty(len(part["key_hash"]), np.int64)
            for (r, s), n in zip(part["shards"].tolist(), part["counts"].tolist(), strict=True):
                _, off, _ = where[(r, s)]
                mapping[off : off + n] = np.arange(gpos[(r, s)], gpos[(r, s)] + n)
            self.key_hash[mapping] = part["key_hash"]
            self.local_to_global.append(mapping)
        self.parts = loaded
        _, first = np.unique(self.key_hash, return_index=True)
        self.global_unique = np.zeros(self.n, dtype=bool)
        self.global_unique[first] = True

    def unique_rows(self) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """Global ids of the globally exact-unique rows, and per partition the local positions (into uniq/bands)."""
        ids, picks = [], []
        for i, part in enumerate(self.parts):
            g = self.local_to_global[i][part["uniq"]]
            keep = np.flatnonzero(self.global_unique[g])
            ids.append(g[keep])
            picks.append((i, keep))
        return (np.concatenate(ids) if ids else np.empty(0, np.int64)), picks

    def sigs_of(self, picks: list[tuple[int, np.ndarray]]) -> np.ndarray:
        return (
            np.concatenate([np.asarray(self.parts[i]["sigs"][k]) for i, k in picks])
            if picks
            else np.empty((0, 0), np.uint32)
        )

    def close(self) -> None:
        self.tmp.cleanup()


def dedup_reduce(storage: Storage, spec: Any, rnd: int, parts: int, band_part: int, band_parts: int) -> str:
    """Verified candidate pairs (global row ids) for the bands b with b % band_parts == band_part."""
    g = _Global(storage, rnd, parts)
    try:
        ids, picks = g.unique_rows()
        order = np.argsort(ids, kind="stable")  # global order: a bucket's first row is its earliest
        ids = ids[order]
        band_cols = (
            np.concatenate([g.parts[i]["bands"][k] for i, k in picks])[order] if picks else np.empty((0, 0), np.uint64)
        )
        pairs = []
        n = len(ids)
        for band in range(band_parts and band_cols.shape[1]):
            if band % band_parts != band_part:
                continue
            col = band_cols[:, band]
            srt = np.argsort(col, kind="stable")
            sk = col[srt]
            starts = np.ones(n, dtype=bool)
            starts[1:] = sk[1:] != sk[:-1]
            first = srt[np.maximum.accumulate(np.where(starts, np.arange(n), 0))]
            m = ~starts
            if m.any():
                pairs.append(np.stack([first[m], srt[m]], axis=1))
        found = np.unique(np.concatenate(pairs), axis=0) if pairs else np.empty((0, 2), np.int64)
        if len(found):
            sigs = g.sigs_of(picks)[order]
            ok = similar(sigs[found[:, 0]], sigs[found[:, 1]]) >= spec.dedup.threshold
            found = found[ok]
        buf = io.BytesIO()
        np.savez_compressed(buf, pairs=ids[found] if len(found) else np.empty((0, 2), np.int64))
        storage.write_bytes(reduce_key(rnd, band_part), buf.getvalue())
        return storage.location(reduce_key(rnd, band_part))
    finally:
        g.close()


def load_pairs(storage: Storage, rnd: int, band_parts: int) -> np.ndarray:
    out = []
    for j in range(band_parts):
        with local_copy(storage, reduce_key(rnd, j)) as p, np.load(p) as z:
            out.append(z["pairs"])
    return np.concatenate(out) if out else np.empty((0, 2), np.int64)


def load_kept_sigs(storage: Storage, rnd: int, parts: int, kept_global: np.ndarray, num_perm: int) -> np.ndarray:
    """Signatures of the kept rows (global ids, in order) for the seen-index, read from the map outputs."""
    g = _Global(storage, rnd, parts)
    try:
        ids, picks = g.unique_rows()
        sigs = g.sigs_of(picks)
        pos = {int(x): i for i, x in enumerate(ids.tolist())}
        return (
            np.stack([sigs[pos[int(k)]] for k in kept_global])
            if len(kept_global)
            else np.empty((0, num_perm), np.uint32)
        )
    finally:
        g.close()
