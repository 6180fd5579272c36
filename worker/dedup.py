"""Exact and near-duplicate detection: normalised keys, vectorised MinHash, banded LSH, connected components.

MinHash values are datasketch's (scheme affine32, default sha1_hash32): `MinHash(num_perm, seed)` updated with the
same shingles gives the same hash values, so indexes interoperate. What is faster here: shingle hashes are computed
once per distinct shingle, and a whole batch is permuted and reduced in numpy at once.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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


def key_hash(key: str) -> int:
    """A stable 64-bit id of a normalised key (the same in every process and on every machine)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


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


@lru_cache(maxsize=64)  # datasketch integrates numerically over every (b, r): ~1 s, so once per setting
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows per band by datasketch's optimiser, weighted 0.1/0.9 against false negatives: candidates are
    verified on the full signature afterwards, so extra candidates cost time, not precision (at 0.8 and 128
    permutations: 14 bands of 9 rows, 87% of pairs at exactly the threshold found instead of 40%)."""
    from datasketch.lsh import _optimal_param

    b, r = _optimal_param(threshold, num_perm, 0.1, 0.9)
    return int(b), int(r)


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


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """Pairs (first, other) of rows that share a band key: each member is paired with its bucket's first row,
    so a hot bucket costs O(size), not O(size^2)."""
    n, bands = keys.shape
    out = []
    idx = np.arange(n, dtype=np.int64)
    for band in range(bands):
        col = keys[:, band]
        order = np.argsort(col, kind="stable")  # stable: the first row of a bucket is its earliest
        sk = col[order]
        starts = np.ones(n, dtype=bool)
        starts[1:] = sk[1:] != sk[:-1]
        first = order[np.maximum.accumulate(np.where(starts, idx, 0))]
        mask = ~starts
        if mask.any():
            out.append(np.stack([first[mask], order[mask]], axis=1))
    if not out:
        return np.empty((0, 2), dtype=np.int64)
    both = np.concatenate(out)
    code = np.unique(both[:, 0] * n + both[:, 1])  # 1-D unique: far faster than unique(axis=0)
    return np.stack([code // n, code % n], axis=1)


def similar(sigs_a: np.ndarray, sigs_b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity row by row."""
    return np.count_nonzero(sigs_a == sigs_b, axis=1) / sigs_a.shape[1]


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components by label propagation: label = the smallest (earliest) row of each component."""
    labels = np.arange(n, dtype=np.int64)
    if len(pairs) == 0:
        return labels
    u, v = pairs[:, 0], pairs[:, 1]
    while True:
        m = np.minimum(labels[u], labels[v])
        new = labels.copy()
        np.minimum.at(new, u, m)
        np.minimum.at(new, v, m)
        new = new[new]  # pointer jumping
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, labels):
            return labels
        labels = new


def near_duplicate_labels(sigs: np.ndarray, threshold: float) -> np.ndarray:
    """For rows in keep-first order, the row each one is a near-duplicate of (itself if none)."""
    n = sigs.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    bands, rows = lsh_params(threshold, sigs.shape[1])
    pairs = candidate_pairs(band_keys(sigs, bands, rows))
    if len(pairs):
        ok = np.concatenate(
            [
                similar(sigs[p[:, 0]], sigs[p[:, 1]]) >= threshold
                for p in np.array_split(pairs, max(1, len(pairs) // 100_000))
            ]
        )
        pairs = pairs[ok]
    return components(n, pairs)


# ---------------------------------------------------------------------------------------------------------
# The seen-index: what earlier rounds kept, for generators to skip before spending tokens


@dataclass
class SeenIndex:
    exact: np.ndarray  # sorted uint64 key hashes
    sigs: np.ndarray  # (n, num_perm) uint32
    band: np.ndarray  # (n, bands) uint64
    threshold: float
    num_perm: int
    seed: int
    shingle_size: int

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
        exact = np.unique(np.fromiter((key_hash(k) for k in keys), dtype=np.uint64, count=len(keys)))
        sigs = hasher.signatures(keys)
        bands, rows = lsh_params(threshold, hasher.num_perm)
        return cls(
            exact, sigs, band_keys(sigs, bands, rows), threshold, hasher.num_perm, hasher.seed, hasher.shingle_size
        )

    def add(self, keys: Sequence[str], sigs: np.ndarray) -> None:
        bands, rows = lsh_params(self.threshold, self.num_perm)
        h = np.fromiter((key_hash(k) for k in keys), dtype=np.uint64, count=len(keys))
        self.exact = np.union1d(self.exact, h)
        self.sigs = np.concatenate([self.sigs, sigs])
        self.band = np.concatenate([self.band, band_keys(sigs, bands, rows)])

    def __len__(self) -> int:
        return len(self.sigs)

    def contains_exact(self, keys: Sequence[str]) -> np.ndarray:
        h = np.fromiter((key_hash(k) for k in keys), dtype=np.uint64, count=len(keys))
        if len(self.exact) == 0:
            return np.zeros(len(keys), dtype=bool)
        pos = np.searchsorted(self.exact, h).clip(0, len(self.exact) - 1)
        return self.exact[pos] == h

    def contains_near(self, sigs: np.ndarray, near: bool = True) -> np.ndarray:
        """True where a signature is a near-duplicate (estimated Jaccard >= threshold) of an indexed one."""
        out = np.zeros(len(sigs), dtype=bool)
        if not near or len(self.sigs) == 0 or len(sigs) == 0:
            return out
        bands, rows = lsh_params(self.threshold, self.num_perm)
        q = band_keys(sigs, bands, rows)
        for band in range(bands):
            col = self.band[:, band]
            order = np.argsort(col, kind="stable")
            sk = col[order]
            pos = np.searchsorted(sk, q[:, band]).clip(0, len(sk) - 1)
            hit = (sk[pos] == q[:, band]) & ~out
            if hit.any():
                rows_hit = np.flatnonzero(hit)
                ok = similar(sigs[rows_hit], self.sigs[order[pos[rows_hit]]]) >= self.threshold
                out[rows_hit[ok]] = True
        return out

    def to_npz(self) -> dict[str, Any]:
        return {
            "exact": self.exact, "sigs": self.sigs, "band": self.band,
            "params": np.array([self.threshold, self.num_perm, self.seed, self.shingle_size], dtype=np.float64),
        }  # fmt: skip

    @classmethod
    def from_npz(cls, data: Any) -> SeenIndex:
        threshold, num_perm, seed, shingle = data["params"].tolist()
        return cls(data["exact"], data["sigs"], data["band"], float(threshold), int(num_perm), int(seed), int(shingle))


def deduplicate(
    texts: Any, *, threshold: float = 0.8, num_perm: int = 128, shingle_size: int = 1, near: bool = True
) -> np.ndarray:
    """For each row (keep-first order), the index of the first row it duplicates (itself when it is the first):
    exact on the normalised key, then MinHash LSH near-duplicates among the exact-unique rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    raw = texts if isinstance(texts, pa.Array | pa.ChunkedArray) else pa.array(list(texts), pa.string())
    if isinstance(raw, pa.ChunkedArray):
        raw = raw.combine_chunks()
    # Normalise each distinct raw string once: verbatim repeats are the commonest duplicates of all.
    raw_enc = pc.dictionary_encode(raw)
    distinct_keys = normalize_array(raw_enc.dictionary)
    key_enc = pc.dictionary_encode(distinct_keys)
    codes = np.asarray(key_enc.indices)[np.asarray(raw_enc.indices)]
    keys = key_enc.dictionary
    _, first = np.unique(codes, return_index=True)  # first occurrence of each distinct key
    owner = first[codes]  # row -> first row with the same key
    if not near or len(first) == 0:
        return owner
    uniq = np.sort(first)
    sigs = MinHasher(num_perm, 1, shingle_size).signatures(keys.take(pa.array(codes[uniq])))
    labels = uniq[near_duplicate_labels(sigs, threshold)]
    root = np.arange(len(codes))
    root[uniq] = labels
    return root[owner]
