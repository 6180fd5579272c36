"""Exact and near-duplicate detection: normalised keys, vectorised MinHash, banded LSH, keep-first against kept rows.

MinHash values are datasketch's (scheme affine32, default sha1_hash32): `MinHash(num_perm, seed)` updated with the
same shingles gives the same hash values, so indexes interoperate. What is faster here: shingle hashes are computed
once per distinct shingle, and a whole batch is permuted and reduced in numpy at once.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
from genrun.worker.ascii_bytes import ALNUM, BYTE, regex_on_non_ascii, string_bytes

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


NORMALIZE_SLICE = 50_000  # texts per thread at the least: fewer are not worth a thread


def normalize_array(texts: Any, threads: int = 1) -> Any:
    """NFKC, case, typographic quotes, contractions ("what's" == "what is"), punctuation, whitespace. Slices of the
    texts in up to `threads` threads (Arrow's kernels release the GIL)."""
    import pyarrow as pa

    arr = texts if isinstance(texts, pa.Array | pa.ChunkedArray) else pa.array(list(texts), type=pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    parts = max(1, min(threads, len(arr) // NORMALIZE_SLICE))
    if parts == 1:
        return _normalize(arr)
    size = -(-len(arr) // parts)
    out: list[Any] = [None] * parts

    def one(i: int) -> None:
        out[i] = _normalize(arr.slice(i * size, size))

    each(one, range(parts), parts)
    return pa.concat_arrays(out)


def _normalize(arr: Any) -> Any:
    import pyarrow.compute as pc

    arr = pc.utf8_lower(pc.utf8_normalize(pc.fill_null(arr, ""), "NFKC"))
    # Contractions need an apostrophe: run their ten passes only on the rows that have one.
    has = pc.match_substring_regex(arr, "['\u2018\u2019\u02bc]")
    if pc.any(has).as_py():
        idx = pc.indices_nonzero(has)
        sub = pc.replace_substring_regex(arr.take(idx), "[\u2018\u2019\u02bc]", "'")
        for pattern, repl in _CONTRACTION_RULES:
            sub = pc.replace_substring_regex(sub, pattern, repl)
        arr = pc.replace_with_mask(arr, has, sub)
    arr = _separators_to_space(arr)  # punctuation, symbols, '_' and all spacing: one space a run
    return pc.utf8_trim_whitespace(arr)


_ASCII_SEPARATOR = ~ALNUM & (BYTE < 0x80)  # ASCII bytes outside [\pL\pN] (multi-byte UTF-8 bytes are >= 0x80)


def _separators_to_space(arr: Any) -> Any:
    r"""pc.replace_substring_regex(arr, r"[^\pL\pN]+", " ") of a null-free string array. Pure ASCII rows (most keys)
    without RE2: their separator bytes become spaces and a separator byte right after another of the same row is
    dropped; rows with other characters take the regex (the same result; tested against it on random texts)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pattern = r"[^\pL\pN]+"
    got = string_bytes(arr)
    if got is None or arr.null_count:
        return pc.replace_substring_regex(arr, pattern, " ")
    data, off = got
    sep = _ASCII_SEPARATOR[data]
    after_sep = np.zeros(len(data), dtype=bool)
    after_sep[1:] = sep[:-1]
    after_sep[off[:-1][off[:-1] < len(data)]] = False  # a row's first byte follows nothing of its own row
    drop = sep & after_sep
    gone = np.flatnonzero(drop)  # each row's offsets move back by the bytes dropped before them
    new_off = (off - np.searchsorted(gone, off)).astype(np.int32)
    spaced = np.where(sep, 0x20, data).astype(np.uint8)[~drop]
    out = pa.StringArray.from_buffers(len(arr), pa.py_buffer(new_off), pa.py_buffer(spaced))
    return regex_on_non_ascii(arr, out, pattern, " ")


def normalize_many(texts: Sequence[str]) -> list[str]:
    return [str(x) for x in normalize_array(texts).to_pylist()]


def normalize(text: str) -> str:
    return normalize_many([text])[0]


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
    # a dictionary array (the merge's round keys) is hashed through its dictionary as it is (equal values in it get
    # equal ids)
    enc = (
        arr if pa.types.is_dictionary(arr.type) and not arr.null_count else pc.dictionary_encode(pc.fill_null(arr, ""))
    )
    words = enc.dictionary.cast(pa.binary()).to_pylist()  # the UTF-8 bytes, no per-key encode
    vocab = np.fromiter(map(xxhash.xxh3_64_intdigest, words), np.uint64, len(words))
    out: np.ndarray = vocab[np.asarray(enc.indices)]
    return out


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
    out: np.ndarray = hv ^ (hv >> s3)
    return out


T = TypeVar("T")


def each(fn: Callable[[T], None], items: Sequence[T], threads: int = 1) -> None:
    """fn on every item, in up to `threads` threads: numpy releases the GIL inside ufunc loops, sorts and matmul, so
    items that write disjoint parts of an output run side by side (the merge Job's CPUs, not only QC's processes).
    The threads end before this returns, so a later fork (QC's worker processes) copies none of them; a task's error
    is raised here."""
    if threads <= 1 or len(items) < 2:
        for x in items:
            fn(x)
        return
    with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="genrun-dedup") as pool:
        for _ in pool.map(fn, items):
            pass
    _release_freed()


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes

    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc's
    except (OSError, AttributeError):
        return None  # not glibc
    return trim


def _release_freed() -> None:
    """Give the memory the threads freed back to the system. glibc's malloc gives each thread an arena of its own and
    keeps what a thread freed for that thread: without this, the ended threads' temporaries stayed mapped through the
    rest of the Job. malloc_trim, as Dask's workers call it; nothing where malloc is not glibc's."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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

    def _tokens(self, keys: Any, threads: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
        """(row index, 32-bit shingle hash) of every shingle, rows in order; repeated shingles are harmless (min)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = keys if isinstance(keys, pa.Array | pa.ChunkedArray) else pa.array(list(keys), pa.string())
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        n = len(arr)
        if self.shingle_size == 1:
            # Slices of the keys split into words in up to `threads` threads (Arrow's kernels release the GIL); each
            # slice's distinct words hashed once (the cache makes a word another slice hashed cheap).
            parts = max(1, min(threads, n // NORMALIZE_SLICE))
            size = -(-n // parts) if n else 0
            got: list[Any] = [None] * parts

            def one(i: int) -> None:
                words = pc.split_pattern(arr.slice(i * size, size), " ")
                flat = pc.list_flatten(words)
                keep = np.asarray(pc.not_equal(flat, ""))
                rows = np.asarray(pc.list_parent_indices(words))[keep].astype(np.int64) + i * size
                got[i] = (rows, pc.dictionary_encode(flat.filter(pa.array(keep))))

            each(one, range(parts), parts)
            rows_of = [r for r, _ in got]
            hashed = [self._hash_many(enc.dictionary.to_pylist())[np.asarray(enc.indices)] for _, enc in got]
            return np.concatenate(rows_of), np.concatenate(hashed).astype(np.uint32, copy=False), n
        rows_l: list[int] = []
        hashes: list[int] = []
        for i, k in enumerate(arr.to_pylist()):
            sh = shingles(k or "", self.shingle_size)
            rows_l += [i] * len(sh)
            hashes += [self._hash(s) for s in sh]
        return np.asarray(rows_l, dtype=np.int64), np.asarray(hashes, dtype=np.uint32), n

    def signatures(self, keys: Any, threads: int = 1) -> np.ndarray:
        """(len(keys), num_perm) uint32; an empty key gets datasketch's empty signature (all 0xFFFFFFFF)."""
        rows, hv, n = self._tokens(keys, threads)
        out = np.empty((n, self.num_perm), dtype=np.uint32)

        def emit(g: Any, acc: np.ndarray) -> None:
            out[g] = acc

        self._minhash(rows, hv, n, emit, threads)
        return out

    def kept_and_bands(self, keys: Any, bands: int, rows: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(`kept_sigs` of the keys' signatures, their `band_keys`): each block of rows has its band keys made while
        its full values are in cache, and only their kept bits stay (the full signatures of a round are never
        held)."""
        tok_rows, hv, n = self._tokens(keys, threads)
        sigs = np.empty((n, self.num_perm), dtype=SIG_DTYPE)
        out = np.empty((n, bands), dtype=np.uint64)

        def emit(g: Any, acc: np.ndarray) -> None:
            sigs[g] = kept_sigs(acc)
            out[g] = band_keys(acc, bands, rows)

        self._minhash(tok_rows, hv, n, emit, threads)
        return sigs, out

    def _minhash(self, rows: np.ndarray, hv: np.ndarray, n: int, emit: Callable[[Any, np.ndarray], None],
                 threads: int) -> None:  # fmt: skip
        """Each row's signature, handed to `emit(rows, signatures)` a block of rows at a time (rows without a shingle:
        one block of the empty signature).

        Rows are grouped by shingle count, and each block of rows takes the running minimum over its shingle
        positions: no ragged reduceat (one short reduction per row, not one long one per block) and no (rows, shingles,
        num_perm) temporary (it would be bound by memory, not arithmetic).
        Blocks write disjoint rows: `threads` run them side by side (`each`)."""
        # every row is written once, by its block or as empty: no fill pass over the whole output first (its pages
        # are touched, and faulted in, by the blocks' threads)
        counts = np.bincount(rows, minlength=n)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            emit(empty, np.full((len(empty), self.num_perm), EMPTY, dtype=np.uint32))
        if len(hv) == 0:
            return
        hv = _fmix32(hv)
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        step = 2048  # rows per block: a (rows, num_perm) block stays in cache while positions stream past
        blocks = []
        for c in np.unique(counts[counts > 0]):
            group = np.flatnonzero(counts == c)
            blocks += [(int(c), group[i : i + step]) for i in range(0, len(group), step)]

        def block(job: tuple[int, np.ndarray]) -> None:
            c, g = job
            tok = hv[starts[g][:, None] + np.arange(c)[None, :]]  # (m, c)
            acc = np.multiply.outer(tok[:, 0], self.a)  # uint32 wrap-around is the modulo 2^32
            acc += self.b
            tmp = np.empty_like(acc)
            for j in range(1, c):
                np.multiply.outer(tok[:, j], self.a, out=tmp)
                tmp += self.b
                np.minimum(acc, tmp, out=acc)
            emit(g, acc)

        each(block, blocks, threads)


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.05, fn_weight: float = 0.95) -> tuple[int, int]:
    """Bands b and rows per band r (b * r <= num_perm) minimising fp_weight * P(false positive) + fn_weight *
    P(false negative), the criterion of datasketch's MinHashLSH (tested equal on a grid). Weighted 0.05/0.95 against
    false negatives: candidates are verified on the whole signature, so extra candidates cost time, not precision;
    and keep-first against kept rows has no second path to a missed pair (components had one, through the rows
    between). At 0.8 and 128 permutations: 16 bands of 8 rows, a pair at exactly the threshold is a candidate with
    probability 0.95.

    P(candidate | similarity s) = 1 - (1 - s^r)^b is a polynomial of degree b*r <= num_perm, so Gauss-Legendre with
    num_perm/2 + 1 nodes integrates it exactly (datasketch calls scipy's adaptive quad per (b, r), which is slow)."""
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


@lru_cache(maxsize=16)
def _band_multipliers(rows: int) -> np.ndarray:
    return (np.random.RandomState(12345).randint(1, 1 << 62, rows, dtype=np.uint64) | np.uint64(1)).astype(np.uint64)


def band_keys(sigs: np.ndarray, bands: int, rows: int, threads: int = 1) -> np.ndarray:
    """(n, bands) uint64: one hash per band of each signature's full values (random odd multipliers, wrap-around
    sum); the bands in up to `threads` threads."""
    mult = _band_multipliers(rows)
    out = np.empty((sigs.shape[0], bands), dtype=np.uint64)

    def one(band: int) -> None:  # a (n, rows) slice times the multipliers: no transposed copy of the signatures
        with np.errstate(over="ignore"):
            h = sigs[:, band * rows : (band + 1) * rows].astype(np.uint64) @ mult  # uint64 wraps: mod 2^64
            h += np.uint64(band)
            out[:, band] = _fmix64(h)

    each(one, range(bands), threads)
    return out


def _fmix64(h: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        out: np.ndarray = h ^ (h >> np.uint64(33))
        return out


# What the seen-index keeps of a signature, and what similarity compares: each MinHash value's low 16 bits (b-bit
# MinHash, Li & Koenig 2010). Two different minimums agree in their low 16 bits by chance with probability 2^-16, which
# adds (1 - J) / 65,536 to the estimated similarity J: far below the estimate's step (1 / num_perm). Half the bytes of
# full values: the seen-index, and what the merge holds and writes, is that much smaller.
SIG_DTYPE = np.uint16


def kept_sigs(sigs: np.ndarray) -> np.ndarray:
    """Signatures as the seen-index keeps them (SIG_DTYPE: the low bits; band keys are computed before, from the full
    values)."""
    return sigs.astype(SIG_DTYPE, copy=False)


def similar(sigs_a: np.ndarray, sigs_b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity row by row, on the values' low bits (`kept_sigs`)."""
    out: np.ndarray = np.count_nonzero(kept_sigs(sigs_a) == kept_sigs(sigs_b), axis=1) / sigs_a.shape[1]
    return out


# ---------------------------------------------------------------------------------------------------------
# The near-duplicate rule: keep-first against kept rows, one row at a time in (round, seed, index) order.
# For each LSH band, a bucket's FIRST KEPT row is the earliest kept row with that band key (earlier rounds' rows in
# the seen-index, which holds kept rows only, and the batch's own). A row is a near duplicate iff one of the first
# kept rows of its buckets (of earlier rounds, or earlier in the batch) has an estimated Jaccard similarity with it
# (`similar`, on the whole signature) of at least the threshold; it is a near duplicate of the earliest such row (an
# earlier round's before the batch's), and that row's similarity is the one reported. Otherwise it is kept. A row is
# never dropped for a row it is not itself near (no chaining through a dropped row), and every row is compared with
# at most one row per band and side (no all-pairs in hot buckets). A round's result depends only on earlier rounds'
# kept rows and its own rows, so replaying rounds one by one gives what the incremental merge gave.


def _verify(qi: np.ndarray, ti: np.ndarray, q_sigs: np.ndarray, t_sigs: np.ndarray, threshold: float,
            chunk: int = 32_768, distinct: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The pairs (qi, ti) that are similar, each pair verified once (a similar pair shares many bands), in (qi, ti)
    order. `distinct`: the pairs come distinct and in that order already."""
    if len(qi) == 0:
        return qi, ti
    if not distinct:
        m = int(ti.max()) + 1
        code = np.unique(qi * m + ti)
        qi, ti = code // m, code % m
    ok = np.empty(len(qi), dtype=bool)
    for i in range(0, len(qi), chunk):  # bounded temporaries: (chunk, num_perm) gathers, 16 MiB each
        ok[i : i + chunk] = similar(q_sigs[qi[i : i + chunk]], t_sigs[ti[i : i + chunk]]) >= threshold
    return qi[ok], ti[ok]


def _buckets(bands: np.ndarray, threads: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per band, (the rows in (band key, row) order, True where a bucket starts)."""
    n = len(bands)
    out: list[Any] = [None] * bands.shape[1]

    def one(band: int) -> None:
        col = bands[:, band]
        order = np.argsort(col, kind="stable")  # stable: within a bucket, earlier rows first
        sk = col[order]
        start = np.ones(n, dtype=bool)
        start[1:] = sk[1:] != sk[:-1]
        out[band] = (order, start)

    each(one, range(bands.shape[1]), threads)
    return out


def batch_firsts(bands: np.ndarray, threads: int = 1, heads: list[Any] | None = None) -> np.ndarray:
    """(n, bands) int64: for each row and band, the earliest row of the batch with the same band key; the bands in
    up to `threads` threads. `heads`: a list of one None per band, each set to the bucket firsts in key order."""
    out = np.empty(bands.shape, dtype=np.int64)
    idx = np.arange(len(bands))
    for band, (order, start) in enumerate(_buckets(bands, threads)):
        out[order, band] = order[np.maximum.accumulate(np.where(start, idx, 0))]
        if heads is not None:
            heads[band] = order[start]
    return out


_NONE = np.iinfo(np.int64).max


def keep_first_batch(sigs: np.ndarray, bands: np.ndarray, threshold: float, old: np.ndarray, threads: int = 1,
                     heads: list[Any] | None = None) -> np.ndarray:  # fmt: skip
    """The rule within a batch (rows in keep-first order). `old`: per row, the earlier rounds' kept row (its id) it
    is a near duplicate of, or -1: such a row is dropped before the batch's own rows are looked at. Returns per row
    the batch row it is a near duplicate of (itself when it is not a near duplicate of a batch row). `heads`: a list
    of one None per band, each set to the first kept rows of the batch's buckets, in key order (what the seen-index
    adds).

    The one-row-at-a-time rule, decided in passes: a bucket's head is its earliest row not dropped so far; a row
    whose heads before it are all decided (kept) is decided: dropped for its earliest similar head, else kept. A row
    with an undecided head earlier than its earliest similar kept head waits for the next pass. Each pass decides at
    least the earliest undecided row, and only buckets with an undecided row take part in the next."""
    n = len(sigs)
    buckets = _buckets(bands, threads)
    dropped = old >= 0
    dup = np.arange(n, dtype=np.int64)
    rows, seg = _shared_buckets(buckets)
    alone = np.ones(n, dtype=bool)
    alone[rows] = False
    decided = dropped | alone  # a row alone in all its buckets is kept (or dropped already)
    _decide_in_passes(sigs, threshold, rows, seg, dropped, decided, dup)
    if heads is not None:
        kept_first = np.where(dropped, _NONE, np.arange(n))
        for band, (order, start) in enumerate(buckets):
            m = np.minimum.reduceat(kept_first[order], np.flatnonzero(start)) if n else np.empty(0, np.int64)
            heads[band] = m[m != _NONE]
    return dup


def _shared_buckets(buckets: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The buckets of two or more rows, all bands in one flat array: (their rows, each row's bucket number), bucket
    by bucket, rows ascending within a bucket. A row in none of them has no candidate in the batch."""
    rows_l, seg_l = [], []
    base = 0
    for order, start in buckets:
        seg = np.cumsum(start) - 1
        size = np.bincount(seg)
        multi = size[seg] >= 2
        rows_l.append(order[multi])
        seg_l.append(seg[multi] + base)
        base += len(size)
    rows = np.concatenate(rows_l) if rows_l else np.empty(0, np.int64)
    seg = np.concatenate(seg_l) if seg_l else np.empty(0, np.int64)
    return rows, seg


def _decide_in_passes(sigs: np.ndarray, threshold: float, rows: np.ndarray, seg: np.ndarray, dropped: np.ndarray,
                      decided: np.ndarray, dup: np.ndarray) -> None:  # fmt: skip
    """keep_first_batch's passes over the shared buckets (`rows`, `seg`): sets `dropped`, `decided` and `dup` (the
    head a dropped row duplicates) in place until every row is decided."""
    n = len(dropped)
    todo = np.flatnonzero(~decided)
    best = np.full(n, _NONE, dtype=np.int64)  # per row, its earliest similar kept head so far (kept heads stay)
    while len(todo):
        live = ~dropped[rows]  # a dropped row is never a head again: out
        rows, seg = rows[live], seg[live]
        first = np.ones(len(rows), dtype=bool)
        first[1:] = seg[1:] != seg[:-1]
        at = np.cumsum(first) - 1
        head = rows[first][at]  # a bucket's earliest row not dropped
        cand = np.flatnonzero(~decided[rows] & (head < rows))
        r, h = rows[cand], head[cand]
        ready = decided[h]
        waits = np.full(n, _NONE, dtype=np.int64)  # per row, its earliest undecided head
        np.minimum.at(waits, r[~ready], h[~ready])
        q, t = _verify(r[ready], h[ready], sigs, sigs, threshold)
        np.minimum.at(best, q, t)
        go = todo[(waits[todo] == _NONE) | (best[todo] < waits[todo])]  # no undecided head before its answer
        drop = go[best[go] != _NONE]
        dropped[drop] = True
        dup[drop] = best[drop]
        decided[go] = True
        todo = todo[~decided[todo]]
        # what the next pass needs: each bucket's undecided rows after an undecided head, with that head; a pair
        # with a kept head is verified once (its answer is in `best`)
        done = np.zeros(len(rows), dtype=bool)
        done[cand[ready]] = True
        need = ~decided[rows] & ~done
        keep = need | (first & np.maximum.reduceat(need, np.flatnonzero(first))[at] if len(rows) else need)
        rows, seg = rows[keep], seg[keep]


@dataclass(frozen=True)
class SortedQueries:
    """Query keys sorted once, to look up in several sorted tables (one per chunk of an index, one per earlier
    round). numpy's binary search over sorted queries starts each search where the last one ended, in cache, and the
    sort costs about one search. The rows a lookup returns are in key order, not query order."""

    keys: np.ndarray
    rows: np.ndarray  # each sorted key's query row

    @classmethod
    def of(cls, queries: np.ndarray) -> SortedQueries:
        order = np.argsort(queries)
        return cls(queries[order], order)

    def find(self, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query rows, their positions in `table`) of the queries `table` (sorted) holds."""
        if len(table) == 0 or len(self.keys) == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        at = np.searchsorted(table, self.keys).clip(0, len(table) - 1)
        hit = np.flatnonzero(table[at] == self.keys)
        return self.rows[hit], at[hit]


@dataclass
class IndexChunk:
    """One batch's share of a seen-index (a merge round, or the online check's batches): the key hashes it saw
    first (sorted), the rows that are the first of some LSH bucket (signature, global row id, cluster root), and per
    band the bucket table for the band keys first seen here (sorted keys, row positions here). A row's other band
    keys are not kept: every lookup goes through the tables."""

    exact: np.ndarray  # sorted uint64
    sigs: np.ndarray  # (m, num_perm) SIG_DTYPE (`kept_sigs`)
    ids: np.ndarray  # (m,) int64
    root: np.ndarray  # (m,) int64
    tables: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.sigs)

    def lookup(self, col: SortedQueries, band: int) -> tuple[np.ndarray, np.ndarray]:
        """(query row, position here) for the queries whose band key has its bucket first here."""
        keys, pos = self.tables[band]
        rows, at = col.find(keys)
        return rows, pos[at]

    def to_npz(self, params: np.ndarray) -> dict[str, Any]:
        out = {"exact": self.exact, "sigs": self.sigs, "ids": self.ids, "root": self.root, "params": params}
        for band, (k, p) in enumerate(self.tables):
            out[f"table_key_{band}"], out[f"table_pos_{band}"] = k, p
        return out

    @classmethod
    def from_npz(cls, data: Any, nbands: int) -> IndexChunk:
        tables = [(data[f"table_key_{b}"], data[f"table_pos_{b}"]) for b in range(nbands)]
        return cls(data["exact"], data["sigs"], data["ids"], data["root"], tables)


def _front(a: np.ndarray, rows: np.ndarray, step: int = 8192) -> np.ndarray:
    """a[rows] for strictly ascending rows (np.flatnonzero's), moved to a's first len(rows) rows in place (a view of
    them): block by block, each block's source rows (rows[j] >= j) lie at or after it, so nothing is overwritten
    before it is read. The view keeps all of a alive: when rows are under half of it, a copy (at most half) instead."""
    if 2 * len(rows) < len(a):
        copied: np.ndarray = a[rows]
        return copied
    for i in range(0, len(rows), step):
        block = rows[i : i + step]
        a[i : i + len(block)] = a[block]  # the right side is a copy of one block
    return a[: len(rows)]


@dataclass
class SeenIndex:
    """Everything seen so far, for both the generators' online check and the merge, as chunks (a merge round each,
    or the online check's batches), searched one by one and never joined: a round's merge adds one chunk and writes
    only that one. A band key's bucket first lives in exactly one chunk (the one that saw the key first)."""

    threshold: float
    num_perm: int
    seed: int
    shingle_size: int
    chunks: list[IndexChunk] = field(default_factory=list)
    _firsts: tuple[np.ndarray, list[Any]] | None = field(default=None, repr=False, compare=False)
    _indexed: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, threshold: float, num_perm: int, seed: int = 1, shingle_size: int = 1) -> SeenIndex:
        return cls(threshold, num_perm, seed, shingle_size)

    @classmethod
    def build(cls, keys: Iterable[str], hasher: MinHasher, threshold: float) -> SeenIndex:
        keys = list(keys)
        idx = cls.empty(threshold, hasher.num_perm, hasher.seed, hasher.shingle_size)
        idx.admit(keys, hasher.signatures(keys))
        return idx

    def __len__(self) -> int:
        return sum(len(c) for c in self.chunks)

    def _cat(self, name: str, empty: np.ndarray) -> np.ndarray:
        return np.concatenate([getattr(c, name) for c in self.chunks]) if self.chunks else empty

    @property
    def exact(self) -> np.ndarray:
        """Every key hash seen (sorted): joins the chunks, for tools and tests."""
        return np.unique(self._cat("exact", np.empty(0, np.uint64)))

    @exact.setter
    def exact(self, value: np.ndarray) -> None:
        self._single().exact = np.unique(np.asarray(value, dtype=np.uint64))

    def _single(self) -> IndexChunk:
        """The index as one chunk (for callers that set whole arrays, e.g. an against seed's ids)."""
        if not self.chunks:
            e = np.empty(0, np.int64)
            self.chunks = [
                IndexChunk(np.empty(0, np.uint64), self.sigs, e, e, [(np.empty(0, np.uint64), e)] * self.nbands)
            ]
        while len(self.chunks) > 1:
            self.chunks[:2] = [_join(self.chunks[0], self.chunks[1])]
        return self.chunks[0]

    @property
    def sigs(self) -> np.ndarray:
        return self._cat("sigs", np.empty((0, self.num_perm), SIG_DTYPE))

    @property
    def ids(self) -> np.ndarray:
        return self._cat("ids", np.empty(0, np.int64))

    @ids.setter
    def ids(self, value: np.ndarray) -> None:
        self._single().ids = np.asarray(value, dtype=np.int64)

    @property
    def root(self) -> np.ndarray:
        return self._cat("root", np.empty(0, np.int64))

    @root.setter
    def root(self, value: np.ndarray) -> None:
        self._single().root = np.asarray(value, dtype=np.int64)

    @property
    def params(self) -> np.ndarray:
        return np.array([self.threshold, self.num_perm, self.seed, self.shingle_size], dtype=np.float64)

    @property
    def lsh(self) -> tuple[int, int]:
        """(bands, rows per band) of this index's buckets."""
        return lsh_params(self.threshold, self.num_perm)

    @property
    def nbands(self) -> int:
        return self.lsh[0]

    def band_keys(self, sigs: np.ndarray, threads: int = 1) -> np.ndarray:
        return band_keys(sigs, *self.lsh, threads)

    def indexed(self, bands: np.ndarray) -> np.ndarray:
        """(n, bands) bool: the band keys whose bucket first is indexed already (what `match` found for the same batch
        array, when it searched every band: `extend` after `assign` searches the chunks once)."""
        if self._indexed is not None and self._indexed[0] is bands:
            return self._indexed[1]
        out = np.zeros(bands.shape, dtype=bool)
        if not any(len(c) for c in self.chunks):
            return out
        for band in range(bands.shape[1]):
            col = SortedQueries.of(bands[:, band])  # one band's queries at a time: bounded memory
            for c in self.chunks:
                out[c.lookup(col, band)[0], band] = True
        return out

    def match(self, sigs: np.ndarray, bands: np.ndarray, subset: Iterable[int] | None = None) -> np.ndarray:
        """Per query row, the earliest indexed bucket first of its buckets that it is similar to (its root id: itself,
        in an index of kept rows), or -1. `subset`: only these bands (a partitioned reducer's share; the minimum over shares is
        the answer)."""
        root, found = self._match(sigs, bands, subset)
        return np.where(found, root, -1)

    def _match(
        self, sigs: np.ndarray, bands: np.ndarray, subset: Iterable[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(earliest root, found) per query: roots may be negative (an against seed's prior rows)."""
        big = np.iinfo(np.int64).max
        out = np.full(len(sigs), big, dtype=np.int64)
        use = list(range(bands.shape[1]) if subset is None else subset)
        chunks = [c for c in self.chunks if len(c)]
        found: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in chunks]
        hit = np.zeros(bands.shape, dtype=bool)  # what `indexed` would find
        for band in use:
            col = SortedQueries.of(bands[:, band])  # sorted once for every chunk
            for k, c in enumerate(chunks):
                found[k].append(c.lookup(col, band))
                hit[found[k][-1][0], band] = True
        if subset is None:
            self._indexed = (bands, hit)
        for c, f in zip(chunks, found, strict=True):
            qi = np.concatenate([x[0] for x in f]) if f else np.empty(0, np.int64)
            ti = np.concatenate([x[1] for x in f]) if f else np.empty(0, np.int64)
            q, t = _verify(qi, ti, sigs, c.sigs, self.threshold)
            np.minimum.at(out, q, c.root[t])
        return out, out != big

    def assign(
        self, sigs: np.ndarray, bands: np.ndarray, old: np.ndarray | None = None, threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rule for a batch of new rows (keep-first order, after everything indexed): per row, (its own match
        against the index, the batch row it is a near duplicate of or itself, its match again: the earlier kept row
        it is a near duplicate of or -1). `old`: the matches when computed elsewhere (partitioned reducers). `extend`
        with the same arrays next indexes the batch's kept rows only."""
        old = self.match(sigs, bands) if old is None else old
        heads: list[Any] = [None] * bands.shape[1]
        dup = keep_first_batch(sigs, bands, self.threshold, old, threads, heads)
        self._firsts = (bands, heads)
        return old, dup, old

    def _batch_firsts(self, bands: np.ndarray, threads: int = 1) -> list[Any]:
        """Per band, the rows of the batch to index as bucket firsts, in key order: the first kept rows `assign` found
        for the same batch array, else every bucket's first row (the caller hands kept rows only)."""
        if self._firsts is None or self._firsts[0] is not bands:
            heads: list[Any] = [None] * bands.shape[1]
            batch_firsts(bands, threads, heads)
            self._firsts = (bands, heads)
        return self._firsts[1]

    def extend(self, sigs: np.ndarray, bands: np.ndarray, ids: np.ndarray, root: np.ndarray, exact: np.ndarray,
               compact: bool = False, consume: bool = False, threads: int = 1) -> IndexChunk:  # fmt: skip
        """Add a batch (rows in keep-first order, after everything indexed) as one chunk: its kept rows that are the
        first kept row of a bucket not indexed yet (after `assign` with the same arrays; else the caller hands kept
        rows only), and the key hashes it saw first (sorted, distinct). `compact`: join small
        trailing chunks (the online check adds many small batches; chunks stay O(log n)). `consume`: the caller
        gives up `sigs`; the chunk keeps its rows moved to the front, in place (the merge's largest array, not copied
        at its peak)."""
        n = len(bands)
        heads = self._batch_firsts(bands, threads)
        indexed = self.indexed(bands)
        is_first = np.zeros(n, dtype=bool)
        for band, h in enumerate(heads):
            is_first[h[~indexed[h, band]]] = True
        self._firsts = self._indexed = None  # the index changes below
        add = np.flatnonzero(is_first)
        at = np.empty(n, dtype=np.int64)  # a row's position in the chunk
        at[add] = np.arange(len(add))
        tables: list[Any] = [None] * bands.shape[1]

        def table(band: int) -> None:  # each band's new bucket firsts, by key: the batch's in key order, less indexed
            h = heads[band][~indexed[heads[band], band]]
            tables[band] = (bands[h, band], at[h])

        each(table, range(bands.shape[1]), threads)
        sigs = _front(sigs, add) if consume else sigs[add]
        chunk = IndexChunk(exact, kept_sigs(sigs), ids[add], root[add], tables)
        self.chunks.append(chunk)
        while compact and len(self.chunks) >= 2 and len(self.chunks[-2]) <= 2 * len(self.chunks[-1]):
            self.chunks[-2:] = [_join(self.chunks[-2], self.chunks[-1])]
        return chunk

    def contains_exact(self, keys: Any, hashes: np.ndarray | None = None) -> np.ndarray:
        h = key_hashes(keys) if hashes is None else hashes
        out = np.zeros(len(h), dtype=bool)
        if any(len(c.exact) for c in self.chunks):
            q = SortedQueries.of(h)
            for c in self.chunks:
                out[q.find(c.exact)[0]] = True
        return out

    def contains_near(self, sigs: np.ndarray, near: bool = True) -> np.ndarray:
        """True where a signature is a near duplicate of an indexed row (the merge's rule)."""
        if not near or len(self) == 0 or len(sigs) == 0:
            return np.zeros(len(sigs), dtype=bool)
        return self._match(sigs, self.band_keys(sigs))[1]

    def admit(self, keys: Any, sigs: np.ndarray, near: bool = True) -> np.ndarray:
        """The online check of a batch in order: 0 = novel (now indexed), 1 = a duplicate of an indexed row (or an
        exact repeat of a row of this batch that is one), 2 = a duplicate of an earlier row of this batch. The merge's rule on the
        merge's code; only novel rows are indexed (the skipped ones never reach the merge)."""
        h = key_hashes(keys)
        bk = self.band_keys(sigs)
        out = np.where(self.contains_exact(keys, h), 1, 0).astype(np.int8)
        _, first = np.unique(h, return_index=True)
        repeat = np.ones(len(h), dtype=bool)
        repeat[first] = False
        out[(out == 0) & repeat] = 2
        cand = np.flatnonzero(out == 0)
        if near and len(cand):
            _, dup, link = self.assign(sigs[cand], bk[cand])
            out[cand[link >= 0]] = 1
            out[cand[(link < 0) & (dup != np.arange(len(cand)))]] = 2
        novel = np.flatnonzero(out == 0)
        ids = np.arange(len(self), len(self) + len(novel), dtype=np.int64)
        self.extend(sigs[novel], bk[novel], ids, ids, np.unique(h[novel]), compact=True)
        return out

    def to_npz(self) -> dict[str, Any]:
        """The whole index as one chunk's arrays (a file the generators or a tool can load)."""
        if not self.chunks:
            b = self.nbands
            e = np.empty(0, np.int64)
            tables = [(np.empty(0, np.uint64), e)] * b
            c = IndexChunk(np.empty(0, np.uint64), self.sigs, e, e, tables)
        else:
            c = self.chunks[0]
            for nxt in self.chunks[1:]:
                c = _join(c, nxt)
        return c.to_npz(self.params)

    @classmethod
    def from_npz(cls, data: Any) -> SeenIndex:
        threshold, num_perm, seed, shingle = data["params"].tolist()
        out = cls(float(threshold), int(num_perm), int(seed), int(shingle))
        out.chunks = [IndexChunk.from_npz(data, out.nbands)]
        return out

    @classmethod
    def concat(cls, parts: Sequence[SeenIndex]) -> SeenIndex:
        """One index from per-round chunks (each round's merge publishes only what it added); nothing is joined."""
        first = parts[0]
        return cls(first.threshold, first.num_perm, first.seed, first.shingle_size,
                   [c for p in parts for c in p.chunks])  # fmt: skip


def _join(a: IndexChunk, b: IndexChunk) -> IndexChunk:
    """Two consecutive chunks as one (their band keys' firsts are disjoint: b's are keys a did not have)."""
    tables = []
    for (ka, pa_), (kb, pb) in zip(a.tables, b.tables, strict=True):
        k = np.concatenate([ka, kb])
        o = np.argsort(k, kind="stable")
        tables.append((k[o], np.concatenate([pa_, pb + len(a)])[o]))
    exact = np.union1d(a.exact, b.exact)
    sigs, ids, root = (np.concatenate([getattr(a, x), getattr(b, x)]) for x in ("sigs", "ids", "root"))
    return IndexChunk(exact, sigs, ids, root, tables)


def deduplicate(
    texts: Any, *, threshold: float = 0.8, num_perm: int = 128, shingle_size: int = 1, near: bool = True
) -> np.ndarray:
    """For each text (keep-first order), the kept row it duplicates (itself when it is kept): the merge's rule
    (exact normalised key, then near duplicates of kept rows) in one batch, for simulations and tools that hold rows
    in memory."""
    keys = normalize_array(texts)
    h = key_hashes(keys)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    owner = first[inverse]  # row -> first row with its key
    cand = np.sort(first)
    if not near or len(cand) == 0:
        return owner
    import pyarrow as pa

    sigs = MinHasher(num_perm, 1, shingle_size).signatures(keys.take(pa.array(cand, pa.int64())))
    dup = keep_first_batch(sigs, band_keys(sigs, *lsh_params(threshold, num_perm)), threshold,
                           np.full(len(cand), -1, np.int64))  # fmt: skip
    root = np.arange(len(owner))
    root[cand] = cand[dup]
    return root[owner]
