"""Dedup: normalisation, datasketch-compatible MinHash, LSH with verification, keep-first near rule, the seen-index."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import datasketch
import numpy as np
import pytest
from datasketch.lsh import _optimal_param
from genrun.worker.dedup import (
    MinHasher,
    SeenIndex,
    SortedQueries,
    band_keys,
    dedup_keys,
    deduplicate,
    lsh_params,
    normalize,
    shingles,
    similar,
)
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What's the capital city of France?", "what is the capital city of france"),
        ("  How   do I\tsort a list?  ", "how do i sort a list"),
        ("I don\u2019t know — help!", "i do not know help"),
        ("\uff37\uff48\uff41\uff54 is NFKC", "what is nfkc"),  # fullwidth letters fold under NFKC
    ],
)
def test_normalize(a: str, b: str) -> None:
    assert normalize(a) == b


def test_pair_key_uses_the_response() -> None:
    a, b = dedup_keys(["Q?", "Q?"], ["A", "B"], key="pair")
    assert a != b
    assert dedup_keys(["Q?", "q"], ["A", "B"]) == ["q", "q"]


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.text(alphabet="abcde fgh", min_size=0, max_size=40), min_size=1, max_size=8),
    size=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_signatures_equal_datasketch(texts: list[str], size: int, seed: int) -> None:
    hasher = MinHasher(num_perm=64, seed=seed, shingle_size=size)
    sigs = hasher.signatures([normalize(t) for t in texts])
    for t, s in zip(texts, sigs, strict=True):
        m = datasketch.MinHash(num_perm=64, seed=seed)
        for sh in shingles(normalize(t), size):
            m.update(sh.encode("utf-8"))
        assert np.array_equal(m.hashvalues, s)


def _clusters(index: SeenIndex, sigs: np.ndarray, first_id: int) -> np.ndarray:
    """The merge's use of the rule on one batch (a round): roots (global ids), then the batch indexed."""
    bands = index.band_keys(sigs)
    _, label, link = index.assign(sigs, bands)
    ids = np.arange(first_id, first_id + len(sigs))
    root = np.where(link >= 0, link, ids[label])
    index.extend(sigs, bands, ids, root, np.empty(0, np.uint64))
    return root


def _labels(texts: list[str], threshold: float) -> list[int]:
    sigs = MinHasher(128, 1, 1).signatures([normalize(t) for t in texts])
    return _clusters(SeenIndex.empty(threshold, 128), sigs, 0).tolist()


def test_near_duplicates_found_and_unrelated_kept() -> None:
    texts = [
        "What are the health benefits of regular exercise?",
        "How do I reverse a string in Python?",
        "What are the health benefits of regular physical exercise?",
        "Write a short poem about the ocean at night.",
        "How can I reverse a string in Python?",
    ]
    assert _labels(texts, 0.7) == [0, 1, 0, 3, 1]


def _reference(sigs: np.ndarray, threshold: float, cuts: list[int]) -> list[int]:
    """The rule, spelled out with dicts, one row at a time, batch (round) by batch: per band, a bucket's first kept
    row is the earliest kept row with its key (earlier batches' before the batch's own); a row is a near duplicate of
    the earliest such row of its buckets that it is itself similar to (earlier batches' first), else it is kept."""
    b, r = lsh_params(threshold, sigs.shape[1])
    bands = band_keys(sigs, b, r)
    firsts: list[dict[int, int]] = [{} for _ in range(b)]
    root: list[int] = []

    def near(j: int, heads: list[dict[int, int]]) -> int | None:
        found = [f for k in range(b) if (f := heads[k].get(int(bands[j, k]))) is not None]
        return min((f for f in found if similar(sigs[f : f + 1], sigs[j : j + 1])[0] >= threshold), default=None)

    for lo, hi in itertools.pairwise(sorted({0, len(sigs), *[min(c, len(sigs)) for c in cuts]})):
        local: list[dict[int, int]] = [{} for _ in range(b)]
        for j in range(lo, hi):
            f = near(j, firsts)
            f = near(j, local) if f is None else f
            root.append(j if f is None else f)
            if f is None:
                for k in range(b):
                    local[k].setdefault(int(bands[j, k]), j)
        for k in range(b):
            for key, j in local[k].items():
                firsts[k].setdefault(key, j)
    return root


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(
        st.lists(st.sampled_from(["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr"]), min_size=1, max_size=7),
        min_size=1,
        max_size=30,
    ),
    cuts=st.lists(st.integers(0, 30), max_size=3),
    threshold=st.sampled_from([0.5, 0.7, 0.8]),
)
def test_rule_is_the_spelled_out_rule(words: list[list[str]], cuts: list[int], threshold: float) -> None:
    """Vectorised, the rule equals the one-row-at-a-time rule, in one batch and batch by batch (rounds)."""
    sigs = MinHasher(64, 1, 1).signatures([" ".join(w) for w in words])
    assert _clusters(SeenIndex.empty(threshold, 64), sigs, 0).tolist() == _reference(sigs, threshold, [])
    index = SeenIndex.empty(threshold, 64)
    edges = sorted({min(c, len(sigs)) for c in cuts} | {0, len(sigs)})
    got: list[int] = []
    for lo, hi in itertools.pairwise(edges):
        got += _clusters(index, sigs[lo:hi], lo).tolist()
    assert got == _reference(sigs, threshold, cuts)


@settings(max_examples=100, deadline=None)
@given(
    table=st.sets(st.integers(0, 2**64 - 1), max_size=40),
    queries=st.lists(st.integers(0, 2**64 - 1), max_size=40),
    extra=st.lists(st.integers(0, 39), max_size=20),
)
def test_sorted_queries_find_what_a_dict_finds(table: set[int], queries: list[int], extra: list[int]) -> None:
    """Lookups in a sorted table of distinct keys (the index's band tables, each round's key hashes) through queries
    sorted once: every query row the table holds, with its position, repeats and misses included, whatever the
    queries' order; the rows come back in key order, which no caller relies on (sets of pairs)."""
    keys = sorted(table)
    qs = queries + [keys[i % len(keys)] for i in extra] if keys else queries  # some queries surely found
    t = np.array(keys, dtype=np.uint64)
    rows, at = SortedQueries.of(np.array(qs, dtype=np.uint64)).find(t)
    where = {k: i for i, k in enumerate(keys)}
    assert sorted(zip(rows.tolist(), at.tolist(), strict=True)) == [
        (r, where[q]) for r, q in enumerate(qs) if q in where
    ]


@settings(max_examples=100, deadline=None)
@given(keep=st.lists(st.booleans(), max_size=60), step=st.integers(1, 9))
def test_rows_moved_to_the_front_in_place_equal_a_copy(keep: list[bool], step: int) -> None:
    """The merge's index takes over the round's signatures by moving the kept rows to the front in place, block by
    block (blocks smaller than the gaps, and larger): the same rows as a fancy-indexed copy, in the same buffer when
    they are at least half of it, else in a copy of their own (a view would keep the whole buffer alive)."""
    from genrun.worker.dedup import _front

    a = np.arange(len(keep) * 3, dtype=np.uint32).reshape(len(keep), 3)
    rows = np.flatnonzero(np.array(keep, dtype=bool))
    want = a[rows].copy()
    got = _front(a, rows, step)
    assert np.array_equal(got, want)
    assert got.size == 0 or np.shares_memory(got, a) == (2 * len(rows) >= len(a))


def test_signatures_band_keys_and_bucket_firsts_in_threads_equal_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge runs the word split (slices of the keys), the signature blocks (one per shingle count and 2,048
    rows), the band keys and the bucket firsts (one per band) in the Job's threads: the same arrays as in one thread,
    over rows of many shingle counts, empty keys and repeated buckets; and `kept_and_bands` the same as both apart."""
    from genrun.worker import dedup
    from genrun.worker.dedup import batch_firsts

    monkeypatch.setattr(dedup, "NORMALIZE_SLICE", 1000)  # several slices of these 6,500 keys

    rng = np.random.default_rng(5)
    vocab = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(vocab, rng.integers(0, 40))) for _ in range(6000)]
    texts += texts[:500]  # whole repeats: shared buckets
    h = MinHasher(128, 1, 1)
    one, four = h.signatures(texts), MinHasher(128, 1, 1).signatures(texts, threads=4)
    assert np.array_equal(one, four) and len({len(t.split()) for t in texts}) > 30  # many blocks
    b1, b4 = band_keys(one, 14, 9), band_keys(one, 14, 9, threads=4)
    assert np.array_equal(b1, b4)
    f1, f4 = batch_firsts(b1), batch_firsts(b1, threads=4)
    assert np.array_equal(f1, f4) and (f1 < np.arange(len(f1))[:, None]).any()  # some rows share a bucket
    # the merge's fused path (band keys made block by block, only the kept bits stored) gives the same arrays
    for threads in (1, 4):
        kept, bands = MinHasher(128, 1, 1).kept_and_bands(texts, 14, 9, threads)
        assert kept.dtype == np.uint16 and np.array_equal(kept, one & 0xFFFF) and np.array_equal(bands, b1)


def test_a_bucket_first_is_indexed_in_one_chunk_and_match_finds_what_indexed_does() -> None:
    """Rounds of overlapping rows: `extend` reuses what `assign` (its `match`) found for the same batch instead of
    searching the chunks again. That equals a fresh search, and no band key's bucket first is indexed in two chunks
    (a stale or empty reuse would index it again)."""
    rng = np.random.default_rng(3)
    vocab = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choice(vocab, 8)) for _ in range(300)]
    sigs = MinHasher(64, 1, 1).signatures(texts + texts[:150])  # the last batch repeats the first rows' buckets
    index = SeenIndex.empty(0.5, 64)
    for lo, hi in ((0, 150), (150, 300), (300, 450)):
        s, bands = sigs[lo:hi], index.band_keys(sigs[lo:hi])
        index.assign(s, bands)
        reused = index.indexed(bands).copy()
        index._indexed = None
        assert np.array_equal(reused, index.indexed(bands)) and (lo == 0 or reused.any())
        index.assign(s, bands)  # as the merge: assign, then extend with the same arrays
        ids = np.arange(lo, hi)
        index.extend(s, bands, ids, ids, np.empty(0, np.uint64))
    for band in range(index.nbands):
        keys = np.concatenate([c.tables[band][0] for c in index.chunks])
        assert len(keys) == len(np.unique(keys))


@pytest.mark.parametrize(("threshold", "seed"), [(0.5, 1), (0.7, 2), (0.8, 3), (0.8, 4)])
def test_rule_on_large_clusters(threshold: float, seed: int) -> None:
    """Hundreds of one-word variants of a few bases (hot buckets; variants similar to their base, not always to each
    other; bases after some of their variants): the spelled-out rule's clusters, in one round and in two."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(60)]
    bases = [list(rng.choice(vocab, rng.integers(5, 12))) for _ in range(6)]
    texts = []
    for _ in range(400):
        w = list(bases[rng.integers(0, len(bases))])
        for _ in range(rng.integers(0, 3)):
            w[rng.integers(0, len(w))] = str(rng.choice(vocab))
        texts.append(" ".join(w))
    sigs = MinHasher(64, 1, 1).signatures(texts)
    ref = _reference(sigs, threshold, [])
    assert len(set(ref)) < len(ref) - 50  # the rule drops many rows here
    assert _clusters(SeenIndex.empty(threshold, 64), sigs, 0).tolist() == ref
    index = SeenIndex.empty(threshold, 64)
    got = _clusters(index, sigs[:150], 0).tolist() + _clusters(index, sigs[150:], 150).tolist()
    assert got == _reference(sigs, threshold, [150])


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95])
@pytest.mark.parametrize("num_perm", [16, 64, 128, 256])
def test_lsh_params_equal_datasketch_optimum(threshold: float, num_perm: int) -> None:
    assert lsh_params(threshold, num_perm) == tuple(_optimal_param(threshold, num_perm, 0.05, 0.95))
    assert lsh_params(threshold, num_perm, 0.1, 0.9) == tuple(_optimal_param(threshold, num_perm, 0.1, 0.9))


def test_seen_index_exact_and_near() -> None:
    hasher = MinHasher(128, 1, 1)
    seen = SeenIndex.build(
        [normalize("What is the capital of France?"), normalize("Explain photosynthesis to a child")], hasher, 0.7
    )
    queries = [
        normalize("what is the capital of France"),
        normalize("Explain photosynthesis to a small child"),
        normalize("Name three prime numbers"),
    ]
    assert seen.contains_exact(queries).tolist() == [True, False, False]
    assert seen.contains_near(hasher.signatures(queries)).tolist() == [True, True, False]
    # the online check of a batch: novel, seen before, a repeat of an earlier candidate of the batch
    batch = [queries[2], queries[0], normalize("Name three prime numbers, please"), queries[2]]
    assert seen.admit(batch, hasher.signatures(batch)).tolist() == [0, 1, 2, 2]
    assert seen.contains_exact([queries[2]]).tolist() == [True]
    again = SeenIndex.from_npz(seen.to_npz())
    assert again.contains_exact(queries).tolist() == [True, False, True]
    assert again.contains_near(hasher.signatures(queries)).tolist() == [True, True, True]


def test_the_index_keeps_the_low_16_bits_of_each_signature_value_and_no_row_band_keys() -> None:
    """b-bit MinHash: the seen-index keeps each MinHash value's low 16 bits (half the bytes of full values) and
    similarity compares those bits; of the band keys, only the buckets' tables; the saved index loads to the same
    signatures."""
    rng = np.random.default_rng(7)
    vocab = [f"w{i}" for i in range(50)]
    texts = [" ".join(rng.choice(vocab, 10)) for _ in range(200)]
    texts += [t.rsplit(" ", 1)[0] + " w0" for t in texts[:100]]  # one-word edits: near duplicates
    sigs = MinHasher(128, 1, 1).signatures(texts)
    index = SeenIndex.empty(0.7, 128)
    bands = index.band_keys(sigs[:200])
    ids = np.arange(200)
    index.extend(sigs[:200], bands, ids, ids, np.empty(0, np.uint64))
    npz = index.to_npz()
    assert npz["sigs"].dtype == np.uint16 and npz["sigs"].shape == (len(npz["ids"]), 128)
    assert np.array_equal(npz["sigs"], sigs[npz["ids"]] & 0xFFFF)
    assert "band" not in npz
    loaded = SeenIndex.from_npz(npz)
    queries = sigs[200:]
    found = loaded.match(queries, loaded.band_keys(queries))
    assert (found >= 0).sum() > 50  # most edits are found
    assert loaded.sigs.dtype == np.uint16 and np.array_equal(loaded.sigs, index.sigs)
    # a chance agreement of the low bits counts as agreement; any difference there does not
    a = np.array([[0x10001, 0x20002, 5, 6]], np.uint32)
    assert similar(a, np.array([[0x30001, 0x40002, 5, 7]], np.uint32)).tolist() == [0.75]


def test_deduplicate_is_the_merge_rule_in_one_batch() -> None:
    texts = ["What's the capital of France?", "what is the capital of france", "How do I reverse a string in Python?",
             "How can I reverse a string in Python?", "Write a poem about the sea."]  # fmt: skip
    assert deduplicate(texts, threshold=0.7).tolist() == [0, 0, 2, 2, 4]
    assert deduplicate(texts, threshold=0.7, near=False).tolist() == [0, 0, 2, 3, 4]


@pytest.mark.parametrize("seed", range(4))
def test_normalized_keys_equal_the_regex_rule_on_random_texts(seed: int) -> None:
    """The ASCII byte path of the separator rule against the regex it replaces (RE2 `[^\\pL\\pN]+` -> one space), on
    random texts mixing ASCII letters, digits, punctuation, '_' and every ASCII space with non-ASCII letters, digits,
    marks, spaces, quotes and emoji; whole and sliced arrays."""
    import random

    import pyarrow as pa
    import pyarrow.compute as pc
    from genrun.worker.dedup import _separators_to_space, normalize_array

    rng = random.Random(seed)
    ascii_chars = list("abcXYZ019_ .,;:!?'\"-()\t\n\v\f\r")
    other = list("éßİΣж²٣Ⅳ\u0301\u00a0\u2003\u2019—東京🙂ﬁ")
    texts = []
    for _ in range(500):
        pool = ascii_chars if rng.random() < 0.7 else ascii_chars + other
        texts.append("".join(rng.choice(pool) for _ in range(rng.randint(0, 30))))
    arr = pa.array(texts, pa.string())
    for a in (arr, arr.slice(41, 400)):
        want = pc.replace_substring_regex(a, r"[^\pL\pN]+", " ").to_pylist()
        assert _separators_to_space(a).to_pylist() == want
    got = normalize_array(arr).to_pylist()
    ref = pc.utf8_lower(pc.utf8_normalize(arr, "NFKC"))
    assert len(got) == len(texts)
    ascii_rows = [i for i, t in enumerate(texts) if t.isascii() and "'" not in t]  # no contraction rules apply
    want_ascii = pc.utf8_trim_whitespace(pc.replace_substring_regex(ref, r"[^\pL\pN]+", " ")).to_pylist()
    assert [got[i] for i in ascii_rows] == [want_ascii[i] for i in ascii_rows]


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_normalizing_in_threads_gives_the_keys_of_one_thread(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge normalises a round's distinct texts in slices, one per thread: the same keys, in the same order, as
    in one thread (here at least 7 texts a slice: 100 texts in 2, 3 or 8 threads give slices of 50, 34 and 13;
    contractions, Unicode and empty texts included)."""
    import random

    import genrun.worker.dedup as d

    rng = random.Random(threads)
    words = [
        "What's",
        "the",
        "Capital",
        "of",
        "France?",
        "\uff26\uff52\uff41\uff4e\uff43\uff45",  # fullwidth: NFKC makes it "France"
        "don't",
        "café",
        "—",
        "",
        "  ",
        "東京",
        "it\u2019s",
    ]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 8))) for _ in range(100)]
    one = d.normalize_array(texts).to_pylist()
    monkeypatch.setattr(d, "NORMALIZE_SLICE", 7)
    assert d.normalize_array(texts, threads).to_pylist() == one
    assert one[texts.index(next(t for t in texts if "What's" in t))] != ""  # real keys, not all empty


def test_dictionary_keys_hash_and_sign_as_their_strings() -> None:
    """The merge's round keys are a dictionary array (distinct raw texts normalised, with repeats among them after
    normalisation): key hashes and signatures equal those of the same keys as plain strings, taken rows included."""
    import pyarrow as pa
    from genrun.worker.dedup import key_hashes
    from genrun.worker.dedup_config import DedupConfig
    from genrun.worker.merge_state import round_keys

    raw = ["What is X?", "what is x", "What's Y?", "what is y", "", "Z z z", "What is X?", "what is x!"]
    keys = round_keys(DedupConfig(), [pa.table({"instruction": pa.array(raw, pa.string())})])
    assert pa.types.is_dictionary(keys.type) and len(set(keys.dictionary.to_pylist())) < len(keys.dictionary)
    plain = keys.dictionary_decode()
    assert plain.to_pylist() == [normalize(t) for t in raw]
    assert np.array_equal(key_hashes(keys), key_hashes(plain))
    rows = pa.array([5, 0, 2, 1], pa.int64())
    h = MinHasher(64, 1, 1)
    assert np.array_equal(h.signatures(keys.take(rows)), h.signatures(plain.take(rows)))


def test_genrun_dedup_drops_a_near_duplicate_only_for_a_kept_row_it_is_near(tmp_path: Path) -> None:
    """The issue's file: 230 instructions of five templates over fifteen topics, each also shouted and with a
    "Please:" prefix. Under components, "What are the pros and cons of machine learning?" went as a duplicate of "WHAT
    ARE THE PROS AND CONS OF MEDITATION!!" at 0.7578 (threshold 0.8), through the rows between them. Now every near
    drop names a kept row, and the similarity it reports (datasketch's MinHash estimate of the two keys) reaches the
    threshold."""
    from genrun.worker.dedup_cli import main

    topics = ["machine learning", "meditation", "vaccines", "climate change", "remote work", "electric cars",
              "social media", "nuclear power", "online dating", "intermittent fasting", "cryptocurrency",
              "homeschooling", "solar panels", "video games", "urban gardening"]  # fmt: skip
    templates = ["What are the pros and cons of {t}?", "Give me a study plan for learning about {t}.",
                 "Explain {t} to a ten-year-old.", "Write a short essay about {t}.", "What is the history of {t}?"]  # fmt: skip
    rows = []
    for tpl in templates:
        for t in topics:
            base = tpl.format(t=t)
            rows += [base, base.upper().rstrip(".?") + "!!", "Please: " + base.lower()]
    rows += [f"Tell me one surprising fact about {t}." for t in topics[:5]]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"instruction": r}) + "\n" for r in rows))
    assert main([str(src), "--no-semantic", "--output", str(tmp_path / "out")]) == 0
    dropped = [json.loads(x) for x in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    kept = {json.loads(x)["instruction"] for x in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()}
    near = [d for d in dropped if d["_dedup"]["tier"] == "near"]
    assert len(near) > 30  # the "Please:" variants at least
    for d in near:
        twin = d["_dedup"]["duplicate_of"]["instruction"]
        assert twin in kept
        a, b = (datasketch.MinHash(num_perm=128, seed=1) for _ in range(2))
        for m, text in ((a, d["instruction"]), (b, twin)):
            for word in set(normalize(text).split()):
                m.update(word.encode("utf-8"))
        assert d["_dedup"]["similarity"] >= 0.8
        assert round(a.jaccard(b), 4) == d["_dedup"]["similarity"], (d["instruction"], twin)  # written to 4 places
    assert "What are the pros and cons of machine learning?" in kept


def test_near_tier_on_real_smollm2_output_is_the_keep_first_rule_less_lsh_misses() -> None:
    """Real SmolLM2-135M instructions (2,000, tests/data): the near tier against a plain loop of the same rule, every
    earlier kept row compared on the same estimate (no LSH). It drops no row the loop keeps for want of a near kept
    row, names a kept row it is near, and misses at most a few rows (LSH misses: a pair at the threshold shares no
    band of 8 rows, of 16, with probability ~0.05). Under components it dropped 58 here where the loop drops 49."""
    import gzip

    data = Path(__file__).resolve().parents[1] / "data" / "smollm2-instructions.jsonl.gz"
    with gzip.open(data, "rt") as f:
        texts = [json.loads(x)["instruction"] for x in f]
    keys = list(dict.fromkeys(normalize(t) for t in texts))  # the exact tier: first occurrences
    sigs = MinHasher(128, 1, 1).signatures(keys)
    ref = np.arange(len(keys))
    kept: list[int] = []
    for i in range(len(keys)):
        sim = similar(np.repeat(sigs[i : i + 1], len(kept), axis=0), sigs[kept]) if kept else np.empty(0)
        hit = np.flatnonzero(sim >= 0.8)
        if len(hit):
            ref[i] = kept[hit[0]]
        else:
            kept.append(i)
    got = deduplicate(keys, threshold=0.8)
    rows = np.arange(len(keys))
    dropped = np.flatnonzero(got != rows)
    assert (got[dropped] == got[got[dropped]]).all()  # each names a kept row
    assert (similar(sigs[dropped], sigs[got[dropped]]) >= 0.8).all()
    assert set(dropped) <= set(np.flatnonzero(ref != rows))
    assert (ref != rows).sum() >= 40 and len(dropped) >= 0.98 * (ref != rows).sum()  # the goal: within 2%
