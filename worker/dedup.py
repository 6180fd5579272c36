"""Exact and near-duplicate detection: normalised keys, vectorised MinHash, banded LSH, connected components.

MinHash values are datasketch's (scheme affine32, default sha1_hash32): `MinHash(num_perm, seed)` updated with the
same shingles gives the same hash values, so indexes interoperate. What is faster here: shingle hashes are computed
once per distinct shingle, and a whole batch is permuted and reduced in numpy at once.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# Normalisation of the dedup key: one vectorised implementation (Arrow's string kernels, RE2), used for single
# strings too, so that the generators' online keys and the merge's keys can never disagree.

_CONTRACTION_RULES = (
    (r"\b(what|that|it|there|here|who|where|how)'s\b", r"\1 is"),
    (r"\blet's\b", "let us"),
    (r"\bi'm\b", "i am"),
    (r"\b(you|we|they)'re\b", r"\1 are"),
    (r"\b(i|you|we|they)'ve\b", r"\1 have"),
    (r"\b(i|you|we)'ll\b", r"\1 will"),
    (r"\b(i|you)'d\b", r"\1 would"),
    (r"\bcan't\b", "cannot"),
    (r"\bwon't\b", "will not"),
    (r"\b(do|does|did|is|are|was|were|should|would|could|have|has)n't\b", r"\1 not"),
)


def normalize_array(texts: Any) -> Any:
    """NFKC, case, typographic quotes, contractions ("what's" == "what is"), punctuation, whitespace."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = texts if isinstance(texts, pa.Array | pa.ChunkedArray) else pa.array(list(texts), type=pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = pc.utf8_lower(pc.utf8_normalize(pc.fill_null(arr, ""), "NFKC"))
    # Contractions need an apostrophe: run their ten passes only on the rows that have one.
    has = pc.match_substring_regex(arr, "['\u2018\u2019\u02bc]")
    if pc.any(has).as_py():
        idx = pc.indices_nonzero(has)
        sub = pc.replace_substring_regex(arr.take(idx), "[\u2018\u2019\u02bc]", "'")
        for pattern, repl in _CONTRACTION_RULES:
            sub = pc.replace_substring_regex(sub, pattern, repl)
        arr = pc.replace_with_mask(arr, has, sub)
    arr = pc.replace_substring_regex(arr, r"[^\pL\pN]+", " ")  # punctuation, symbols, '_' and all spacing
    return pc.utf8_trim_whitespace(arr)


def normalize_many(texts: Sequence[str]) -> list[str]:
    return [str(x) for x in normalize_array(texts).to_pylist()]


def normalize(text: str) -> str:
    return normalize_many([text])[0]


def dedup_key(instruction: str, response: str, *, key: str = "instruction", normalized: bool = True) -> str:
    return dedup_keys([instruction], [response], key=key, normalized=normalized)[0]


def dedup_keys(
    instructions: Any, responses: Any = None, *, key: str = "instruction", normalized: bool = True
) -> list[str]:
    """Keys of many rows at once (the merge calls this per shard, the generators per batch)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ins = (
        instructions
        if isinstance(instructions, pa.Array | pa.ChunkedArray)
        else pa.array(list(instructions), pa.string())
    )
    if key == "pair":
        res = responses if isinstance(responses, pa.Array | pa.ChunkedArray) else pa.array(list(responses), pa.string())
        ins = pc.binary_join_element_wise(ins, res, " \u241e ")
    out = normalize_array(ins) if normalized else pc.utf8_trim_whitespace(ins)
    return [str(x) for x in out.to_pylist()]


def key_hashes(keys: Any) -> np.ndarray:
    """Stable 64-bit ids (xxh3_64 of the UTF-8 key) of many keys, the same in every process and on every machine.

    Collisions: two different keys with one id count as exact duplicates. With n distinct keys the chance of any
    collision is about n^2 / 2^65 (3e-6 at 10M keys); the merge does not keep key texts to check, and says so.
    Each distinct key is hashed once (Arrow's dictionary encoding finds them at C speed)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import xxhash

    arr = keys if isinstance(keys, pa.Array | pa.ChunkedArray) else pa.array(list(keys), pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if len(arr) == 0:
        return np.empty(0, np.uint64)
    enc = pc.dictionary_encode(pc.fill_null(arr, ""))
    h = xxhash.xxh3_64_intdigest
    vocab = np.fromiter((h(k.encode()) for k in enc.dictionary.to_pylist()), np.uint64, len(enc.dictionary))
    return vocab[np.asarray(enc.indices)]


def key_hash(key: str) -> int:
    return int(key_hashes([key])[0])


# ---------------------------------------------------------------------------------------------------------
# MinHash, datasketch-compatible

_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
EMPTY = np.uint32(0xFFFFFFFF)


def _fmix32(hv: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = _FMIX32
    hv = hv ^ (hv >> s1)
    hv = hv * m1
    hv = hv ^ (hv >> s2)
    hv = hv * m2
    return hv ^ (hv >> s3)


@lru_cache(maxsize=16)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of datasketch's affine32 scheme for this seed: same RandomState draws, same order."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def shingles(text: str, size: int) -> list[str]:
    """Word n-grams of a normalised text (a text shorter than n words is one shingle)."""
    words = text.split()
    if len(words) <= size:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + size]) for i in range(len(words) - size + 1)]


class MinHasher:
    """Signatures for batches of normalised keys. Keeps a cache of shingle hashes (they repeat across rows)."""

    def __init__(self, num_perm: int = 128, seed: int = 1, shingle_size: int = 1, cache_limit: int = 2_000_000):
        self.num_perm, self.seed, self.shingle_size = num_perm, seed, shingle_size
        self.a, self.b = permutations(num_perm, seed)
        self._cache: dict[str, int] = {}
        self._cache_limit = cache_limit

    def _hash(self, sh: str) -> int:
        v = self._cache.get(sh)
        if v is None:
            v = struct.unpack("<I", hashlib.sha1(sh.encode("utf-8")).digest()[:4])[0]
            if len(self._cache) < self._cache_limit:
                self._cache[sh] = v
        return v

    def _hash_many(self, tokens: list[str]) -> np.ndarray:
        return np.fromiter((self._hash(t) for t in tokens), dtype=np.uint32, count=len(tokens))

    def _tokens(self, keys: Any) -> tuple[np.ndarray, np.ndarray, int]:
        """(row index, 32-bit shingle hash) of every shingle, rows in order; repeated shingles are harmless (min)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = keys if isinstance(keys, pa.Array | pa.ChunkedArray) else pa.array(list(keys), pa.string())
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        n = len(arr)
        if self.shingle_size == 1:
            words = pc.split_pattern(arr, " ")
            flat = pc.list_flatten(words)
            rows = np.asarray(pc.list_parent_indices(words))
            keep = np.asarray(pc.not_equal(flat, ""))
            enc = (
                pc.dictionary_encode(flat.filter(pa.array(keep))).combine_chunks()
                if isinstance(flat, pa.ChunkedArray)
                else pc.dictionary_encode(flat.filter(pa.array(keep)))
            )
            vocab_hash = self._hash_many(enc.dictionary.to_pylist())  # each distinct word hashed once
            return rows[keep].astype(np.int64), vocab_hash[np.asarray(enc.indices)], n
        rows_l: list[int] = []
        hashes: list[int] = []
        for i, k in enumerate(arr.to_pylist()):
            sh = shingles(k or "", self.shingle_size)
            rows_l += [i] * len(sh)
            hashes += [self._hash(s) for s in sh]
        return np.asarray(rows_l, dtype=np.int64), np.asarray(hashes, dtype=np.uint32), n

    def signatures(self, keys: Any, chunk_tokens: int = 250_000) -> np.ndarray:
        """(len(keys), num_perm) uint32; an empty key gets datasketch's empty signature (all 0xFFFFFFFF).

        Rows are grouped by shingle count, and each block of rows takes the running minimum over its shingle
        positions: no ragged reduceat (10x slower) and no (rows, shingles, num_perm) temporary (memory-bound)."""
        rows, hv, n = self._tokens(keys)
        out = np.full((n, self.num_perm), EMPTY, dtype=np.uint32)
        if len(hv) == 0:
            return out
        hv = _fmix32(hv)
        counts = np.bincount(rows, minlength=n)
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        for c in np.unique(counts[counts > 0]):
            group = np.flatnonzero(counts == c)
            step = 2048  # rows per block: a (rows, num_perm) block stays in cache while positions stream past
            for i in range(0, len(group), step):
                g = group[i : i + step]
                tok = hv[starts[g][:, None] + np.arange(c)[None, :]]  # (m, c)
                acc = np.multiply.outer(tok[:, 0], self.a)  # uint32 wrap-around is the modulo 2^32
                acc += self.b
                tmp = np.empty_like(acc)
                for j in range(1, int(c)):
                    np.multiply.outer(tok[:, j], self.a, out=tmp)
                    tmp += self.b
                    np.minimum(acc, tmp, out=acc)
                out[g] = acc
        return out


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.1, fn_weight: float = 0.9) -> tuple[int, int]:
    """Bands b and rows per band r (b * r <= num_perm) minimising fp_weight * P(false positive) + fn_weight *
    P(false negative), the criterion of datasketch's MinHashLSH (tested equal on a grid). Weighted 0.1/0.9 against
    false negatives: candidates are verified on the full signature, so extra candidates cost time, not precision (at
    0.8 and 128 permutations: 14 bands of 9 rows, 87% of pairs at exactly the threshold found instead of 40%).

    P(candidate | similarity s) = 1 - (1 - s^r)^b is a polynomial of degree b*r <= num_perm, so Gauss-Legendre with
    num_perm/2 + 1 nodes integrates it exactly (datasketch calls scipy's adaptive quad per (b, r): ~1 s)."""
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def grid(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        return (hi - lo) / 2 * nodes + (hi + lo) / 2, (hi - lo) / 2 * weights

    s_fp, w_fp = grid(0.0, threshold)
    s_fn, w_fn = grid(threshold, 1.0)
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = float(np.dot(w_fp, 1 - (1 - s_fp**r) ** b))
            fn = float(np.dot(w_fn, (1 - s_fn**r) ** b))
            err = fp * fp_weight + fn * fn_weight
            if err < best:
                best, opt = err, (b, r)
    return opt


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: one hash per band of each signature (random odd multipliers, wrap-around sum)."""
    mult = (np.random.RandomState(12345).randint(1, 1 << 62, rows, dtype=np.uint64) | np.uint64(1)).astype(np.uint64)
    out = np.empty((sigs.shape[0], bands), dtype=np.uint64)
    cols = np.ascontiguousarray(sigs[:, : bands * rows].T)  # one contiguous row per permutation (uint32)
    with np.errstate(over="ignore"):
        for band in range(bands):
            h = np.full(sigs.shape[0], np.uint64(band), dtype=np.uint64)
            for j in range(rows):  # column by column: a small-axis sum() is far slower
                h += cols[band * rows + j].astype(np.uint64) * mult[j]
            out[:, band] = _fmix64(h)
    return out


def _fmix64(h: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> np.uint64(33))


def similar(sigs_a: np.ndarray, sigs_b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity row by row."""
    return np.count_nonzero(sigs_a == sigs_b, axis=1) / sigs_a.shape[1]


# ---------------------------------------------------------------------------------------------------------
# The near-duplicate rule: bucket firsts. For each LSH band, the FIRST row (in keep-first order, over all rounds)
# with a band key is that bucket's first. A row is a near duplicate when it is similar (estimated Jaccard >=
# threshold on the full signature) to the first of one of its buckets; its twin is the earliest such first, and it
# belongs to its twin's cluster (chains are followed: the twin may itself be a duplicate). A row with no similar
# bucket first starts a cluster and is kept. Every row is compared with at most one row per band (no all-pairs in
# hot buckets), and the rule depends only on earlier rows, so rounds merged one by one give what one merge gives.


def band_firsts(bands: np.ndarray) -> np.ndarray:
    """(n, bands) int64: for each row and band, the earliest row with the same band key (itself when first)."""
    n = len(bands)
    out = np.empty(bands.shape, dtype=np.int64)
    idx = np.arange(n)
    for band in range(bands.shape[1]):
        col = bands[:, band]
        order = np.argsort(col, kind="stable")  # stable: within a bucket, earlier rows first
        sk = col[order]
        start = np.ones(n, dtype=bool)
        start[1:] = sk[1:] != sk[:-1]
        out[order, band] = order[np.maximum.accumulate(np.where(start, idx, 0))]
    return out


def _verified_min(qi: np.ndarray, ti: np.ndarray, q_sigs: np.ndarray, t_sigs: np.ndarray, threshold: float,
                  n: int, chunk: int = 131_072) -> np.ndarray:  # fmt: skip
    """Per query row (0..n-1), the smallest t among its pairs (qi, ti) that verify as similar, or -1."""
    out = np.full(n, -1, dtype=np.int64)
    if len(qi) == 0:
        return out
    m = int(ti.max()) + 1
    code = np.sort(qi * m + ti)  # a similar pair shares many bands: verify each pair once, in (query, t) order
    code = code[np.append(True, code[1:] != code[:-1])]
    ok = np.empty(len(code), dtype=bool)
    for i in range(0, len(code), chunk):  # bounded temporaries: (chunk, num_perm) gathers, 64 MiB each
        c = code[i : i + chunk]
        ok[i : i + chunk] = similar(q_sigs[c // m], t_sigs[c % m]) >= threshold
    good = code[ok]
    if len(good) == 0:
        return out
    q = good // m
    first = np.append(True, q[1:] != q[:-1])  # sorted: the first verified pair of a query has its smallest t
    out[q[first]] = good[first] % m
    return out


def resolve_roots(twin_new: np.ndarray, base_root: np.ndarray) -> np.ndarray:
    """Cluster roots of a batch: a row with a twin in the batch (twin_new >= 0, always an earlier row) takes its
    twin's root, chains followed to the end by pointer jumping; other rows keep base_root (their own id, or the root
    of a twin in earlier rounds)."""
    ptr = np.where(twin_new >= 0, twin_new, np.arange(len(twin_new)))
    while True:
        nxt = ptr[ptr]
        if np.array_equal(nxt, ptr):
            break
        ptr = nxt
    return base_root[ptr]


@dataclass
class SeenIndex:
    """Everything seen so far, for both the generators' online check and the merge: the hashes of all distinct keys
    (sorted), and the rows that are the first of some LSH bucket (signature, band keys, global row id, cluster
    root), in keep-first order. Bucket tables (band key -> first row) are derived from the band keys."""

    exact: np.ndarray  # sorted uint64 key hashes
    sigs: np.ndarray  # (m, num_perm) uint32
    band: np.ndarray  # (m, bands) uint64
    threshold: float
    num_perm: int
    seed: int
    shingle_size: int
    ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # global row ids (merge); else 0..m-1
    root: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    _firsts: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)
    _batch: tuple[np.ndarray, np.ndarray, int] | None = field(default=None, repr=False, compare=False)
    added_firsts: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.sigs):  # an index without row ids (older files, the generators' own)
            self.ids = np.arange(len(self.sigs), dtype=np.int64)
            self.root = self.ids.copy()

    @classmethod
    def empty(cls, threshold: float, num_perm: int, seed: int = 1, shingle_size: int = 1) -> SeenIndex:
        bands, _ = lsh_params(threshold, num_perm)
        return cls(
            np.empty(0, np.uint64), np.empty((0, num_perm), np.uint32), np.empty((0, bands), np.uint64),
            threshold, num_perm, seed, shingle_size,
        )  # fmt: skip

    @classmethod
    def build(cls, keys: Iterable[str], hasher: MinHasher, threshold: float) -> SeenIndex:
        keys = list(keys)
        idx = cls.empty(threshold, hasher.num_perm, hasher.seed, hasher.shingle_size)
        idx.admit(keys, hasher.signatures(keys))
        return idx

    def __len__(self) -> int:
        return len(self.sigs)

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        b, r = lsh_params(self.threshold, self.num_perm)
        return band_keys(sigs, b, r)

    def firsts(self, band: int) -> tuple[np.ndarray, np.ndarray]:
        """(sorted band keys, the indexed row that is first with each) for one band."""
        if band not in self._firsts:
            keys, first = np.unique(self.band[:, band], return_index=True)
            self._firsts[band] = (keys, first.astype(np.int64))
        return self._firsts[band]

    def lookup(self, q_bands: np.ndarray, bands: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(query row, indexed row) for each band where the query's key has a first here; and, for all bands, a
        (n, bands) mask of keys that do."""
        qs, ts = [], []
        for band in range(q_bands.shape[1]) if bands is None else bands:
            keys, first = self.firsts(band)
            if len(keys) == 0:
                continue
            pos = np.searchsorted(keys, q_bands[:, band]).clip(0, len(keys) - 1)
            hit = np.flatnonzero(keys[pos] == q_bands[:, band])
            qs.append(hit)
            ts.append(first[pos[hit]])
        if not qs:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(qs).astype(np.int64), np.concatenate(ts)

    def match(self, sigs: np.ndarray, bands: np.ndarray, subset: Iterable[int] | None = None) -> np.ndarray:
        """Per query row, the earliest indexed bucket first it is similar to (a position in this index), or -1.
        `subset`: only these bands (a partitioned reducer's share; the minimum over shares is the full answer)."""
        if len(self) == 0 or len(sigs) == 0:
            return np.full(len(sigs), -1, dtype=np.int64)
        qi, ti = self.lookup(bands, subset)
        return _verified_min(qi, ti, sigs, self.sigs, self.threshold, len(sigs))

    def assign(
        self, sigs: np.ndarray, bands: np.ndarray, old: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The near-duplicate rule for a batch of new rows (keep-first order, after everything indexed): per row,
        (twin among indexed rows or -1, twin among the batch's earlier rows or -1); at most one is set. `old`: the
        matches against this index when computed elsewhere (partitioned reducers)."""
        n = len(sigs)
        old = self.match(sigs, bands) if old is None else old
        first = self._batch_firsts(bands)
        rows = np.arange(n)[:, None]
        cand = (first >= 0) & (first != rows) & (old < 0)[:, None]
        qi = np.broadcast_to(rows, first.shape)[cand]
        new = _verified_min(qi, first[cand], sigs, sigs, self.threshold, n)
        return old, new

    def _batch_firsts(self, bands: np.ndarray) -> np.ndarray:
        """band_firsts of a batch, -1 where the bucket's key is indexed (its first is an earlier round's row)."""
        if self._batch is not None and self._batch[0] is bands and self._batch[2] == len(self):
            return self._batch[1]  # the same batch array: `extend` after `assign`
        first = band_firsts(bands)
        for band in range(bands.shape[1]):
            keys, _ = self.firsts(band)
            if len(keys):
                pos = np.searchsorted(keys, bands[:, band]).clip(0, len(keys) - 1)
                first[keys[pos] == bands[:, band], band] = -1
        self._batch = (bands, first, len(self))
        return first

    def extend(self, sigs: np.ndarray, bands: np.ndarray, ids: np.ndarray, root: np.ndarray) -> np.ndarray:
        """Index a batch's rows that are the first of a bucket not indexed yet (batch in keep-first order); returns
        which rows of the batch were added."""
        first = self._batch_firsts(bands)  # as `assign` computed it for this batch
        is_first = first == np.arange(len(bands))[:, None]
        add = np.flatnonzero(is_first.any(axis=1))
        # the added rows' share of the bucket tables (positions among the added rows), for the round's chunk; the
        # full tables are rebuilt on demand (a merge Job ends after its round: no re-sort of everything before)
        self.added_firsts = {}
        for band in range(bands.shape[1]):
            new = np.flatnonzero(is_first[add, band])
            o = np.argsort(bands[add[new], band])
            self.added_firsts[band] = (bands[add[new[o]], band], new[o].astype(np.int64))
        self._firsts = {}
        self.sigs = np.concatenate([self.sigs, sigs[add]])
        self.band = np.concatenate([self.band, bands[add]])
        self.ids = np.concatenate([self.ids, ids[add]])
        self.root = np.concatenate([self.root, root[add]])
        self._batch = None
        return add

    def contains_exact(self, keys: Any, hashes: np.ndarray | None = None) -> np.ndarray:
        h = key_hashes(keys) if hashes is None else hashes
        if len(self.exact) == 0:
            return np.zeros(len(h), dtype=bool)
        pos = np.searchsorted(self.exact, h).clip(0, len(self.exact) - 1)
        return np.asarray(self.exact[pos] == h)

    def contains_near(self, sigs: np.ndarray, near: bool = True) -> np.ndarray:
        """True where a signature is a near duplicate of an indexed row (the merge's rule)."""
        if not near or len(self) == 0 or len(sigs) == 0:
            return np.zeros(len(sigs), dtype=bool)
        return self.match(sigs, self.band_keys(sigs)) >= 0

    def admit(self, keys: Any, sigs: np.ndarray, near: bool = True) -> np.ndarray:
        """The online check of a batch in order: 0 = novel (now indexed), 1 = a duplicate of an indexed row, 2 = a
        duplicate of an earlier row of this batch. The merge's rule on the merge's code; only novel rows are
        indexed (the skipped ones never reach the merge)."""
        h = key_hashes(keys)
        bk = self.band_keys(sigs)
        out = np.where(self.contains_exact(keys, h), 1, 0).astype(np.int8)
        _, first = np.unique(h, return_index=True)
        repeat = np.ones(len(h), dtype=bool)
        repeat[first] = False
        out[(out == 0) & repeat] = 2
        cand = np.flatnonzero(out == 0)
        if near and len(cand):
            old, new = self.assign(sigs[cand], bk[cand])
            out[cand[old >= 0]] = 1
            out[cand[new >= 0]] = 2
        novel = np.flatnonzero(out == 0)
        self.exact = np.union1d(self.exact, h[novel])
        ids = np.arange(len(self), len(self) + len(novel), dtype=np.int64)
        self.extend(sigs[novel], bk[novel], ids, ids)
        return out

    def to_npz(self, firsts: bool = False) -> dict[str, Any]:
        out = {
            "exact": self.exact, "sigs": self.sigs, "band": self.band, "ids": self.ids, "root": self.root,
            "params": np.array([self.threshold, self.num_perm, self.seed, self.shingle_size], dtype=np.float64),
        }  # fmt: skip
        if firsts:  # the bucket tables, so a reader need not sort them again
            for band in range(self.band.shape[1]):
                out[f"firsts_key_{band}"], out[f"firsts_pos_{band}"] = self.firsts(band)
        return out

    @classmethod
    def from_npz(cls, data: Any) -> SeenIndex:
        threshold, num_perm, seed, shingle = data["params"].tolist()
        empty = np.empty(0, np.int64)
        out = cls(data["exact"], data["sigs"], data["band"], float(threshold), int(num_perm), int(seed), int(shingle),
                  data.get("ids", empty), data.get("root", empty))  # fmt: skip
        for band in range(out.band.shape[1]):
            if f"firsts_key_{band}" in data:
                out._firsts[band] = (data[f"firsts_key_{band}"], data[f"firsts_pos_{band}"])
        return out

    @classmethod
    def concat(cls, parts: Sequence[SeenIndex], exact: np.ndarray | None = None) -> SeenIndex:
        """One index from per-round chunks (each round's merge publishes only what it added). Each chunk's exact
        hashes and bucket tables are sorted runs: a stable sort merges them in about linear time."""
        first = parts[0]
        if exact is None:
            exact = np.sort(np.concatenate([p.exact for p in parts]), kind="stable")
            exact = exact[np.append(True, exact[1:] != exact[:-1])] if len(exact) else exact
        out = cls(
            exact, np.concatenate([p.sigs for p in parts]), np.concatenate([p.band for p in parts]),
            first.threshold, first.num_perm, first.seed, first.shingle_size,
            np.concatenate([p.ids for p in parts]), np.concatenate([p.root for p in parts]),
        )  # fmt: skip
        if all(p._firsts for p in parts if len(p)):
            offsets = np.cumsum([0] + [len(p) for p in parts])
            for band in range(out.band.shape[1]):
                runs = [(p.firsts(band)[0], p.firsts(band)[1] + off) for p, off in zip(parts, offsets, strict=False)]
                k = np.concatenate([r[0] for r in runs])
                order = np.argsort(k, kind="stable")
                out._firsts[band] = (k[order], np.concatenate([r[1] for r in runs])[order])
        return out


def deduplicate(
    texts: Any, *, threshold: float = 0.8, num_perm: int = 128, shingle_size: int = 1, near: bool = True
) -> np.ndarray:
    """For each text (keep-first order), the first row of its cluster (itself when it is kept): the merge's rule
    (exact normalised key, then bucket firsts) in one batch, for simulations and tools that hold rows in memory."""
    keys = normalize_array(texts)
    h = key_hashes(keys)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    owner = first[inverse]  # row -> first row with its key
    cand = np.sort(first)
    if not near or len(cand) == 0:
        return owner
    import pyarrow as pa

    sigs = MinHasher(num_perm, 1, shingle_size).signatures(keys.take(pa.array(cand, pa.int64())))
    index = SeenIndex.empty(threshold, num_perm, 1, shingle_size)
    _, new = index.assign(sigs, index.band_keys(sigs))
    root = np.arange(len(owner))
    root[cand] = cand[resolve_roots(new, np.arange(len(cand)))]
    return root[owner]
