"""Exact and near-duplicate detection: normalised keys, vectorised MinHash, banded LSH, connected components.

MinHash values are datasketch's (scheme affine32, default sha1_hash32): `MinHash(num_perm, seed)` updated with the
same shingles gives the same hash values, so indexes interoperate. What is faster here: shingle hashes are computed
once per distinct shingle, and a whole batch is permuted and reduced in numpy at once.
"""

from __future__ import annotations

import hashlib
import re
import struct
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# Normalisation of the dedup key

_CONTRACTIONS = {
    "what's": "what is", "that's": "that is", "it's": "it is", "there's": "there is", "here's": "here is",
    "who's": "who is", "where's": "where is", "how's": "how is", "let's": "let us", "i'm": "i am",
    "you're": "you are", "we're": "we are", "they're": "they are", "i've": "i have", "you've": "you have",
    "we've": "we have", "they've": "they have", "i'll": "i will", "you'll": "you will", "we'll": "we will",
    "i'd": "i would", "you'd": "you would", "can't": "cannot", "won't": "will not", "don't": "do not",
    "doesn't": "does not", "didn't": "did not", "isn't": "is not", "aren't": "are not", "wasn't": "was not",
    "weren't": "were not", "shouldn't": "should not", "wouldn't": "would not", "couldn't": "could not",
    "haven't": "have not", "hasn't": "has not",
}  # fmt: skip
_CONTRACTION_RE = re.compile(r"\b(" + "|".join(re.escape(k) for k in _CONTRACTIONS) + r")\b")
_PUNCT_RE = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE_RE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, case, typographic quotes, contractions ("what's" == "what is"), punctuation and whitespace."""
    t = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'").replace("\u2018", "'")
    t = _CONTRACTION_RE.sub(lambda m: _CONTRACTIONS[m.group(1)], t)
    t = _PUNCT_RE.sub(" ", t).replace("_", " ")
    return _SPACE_RE.sub(" ", t).strip()


def dedup_key(instruction: str, response: str, *, key: str = "instruction", normalized: bool = True) -> str:
    text = instruction if key == "instruction" else f"{instruction}\n\u241e\n{response}"
    return normalize(text) if normalized else text.strip()


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

    def signatures(self, keys: Sequence[str], chunk_rows: int = 4096) -> np.ndarray:
        """(len(keys), num_perm) uint32; an empty key gets datasketch's empty signature (all 0xFFFFFFFF)."""
        out = np.full((len(keys), self.num_perm), EMPTY, dtype=np.uint32)
        for start in range(0, len(keys), chunk_rows):
            part = keys[start : start + chunk_rows]
            hashes: list[int] = []
            counts = np.zeros(len(part), dtype=np.int64)
            for i, k in enumerate(part):
                sh = set(shingles(k, self.shingle_size))  # a set: MinHash of a set, like repeated update()
                counts[i] = len(sh)
                hashes.extend(self._hash(s) for s in sh)
            if not hashes:
                continue
            hv = _fmix32(np.asarray(hashes, dtype=np.uint32))
            phv = hv[:, None] * self.a[None, :] + self.b[None, :]  # uint32 wrap-around is the modulo 2^32
            nonempty = np.flatnonzero(counts)
            offsets = np.concatenate(([0], np.cumsum(counts[nonempty])[:-1]))
            out[start + nonempty] = np.minimum.reduceat(phv, offsets, axis=0)
        return out


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
    with np.errstate(over="ignore"):
        for band in range(bands):
            part = sigs[:, band * rows : (band + 1) * rows].astype(np.uint64)
            h = (part * mult[None, :]).sum(axis=1, dtype=np.uint64)
            out[:, band] = _fmix64(h ^ np.uint64(band))
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
    pairs = np.unique(np.concatenate(out), axis=0)
    return pairs


def similar(sigs_a: np.ndarray, sigs_b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity row by row."""
    return (sigs_a == sigs_b).mean(axis=1)


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
