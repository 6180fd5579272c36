"""Dedup: normalisation, datasketch-compatible MinHash, LSH with verification, components, the seen-index."""

from __future__ import annotations

import datasketch
import numpy as np
import pytest
from datasketch.lsh import _optimal_param
from genrun.worker.dedup import (
    BandTable,
    MinHasher,
    SeenIndex,
    band_keys,
    dedup_key,
    keep_first,
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
    assert dedup_key("Q?", "A", key="pair") != dedup_key("Q?", "B", key="pair")
    assert dedup_key("Q?", "A") == dedup_key("q", "B")


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


def _labels(texts: list[str], threshold: float) -> list[int]:
    sigs = MinHasher(128, 1, 1).signatures([normalize(t) for t in texts])
    b, r = lsh_params(threshold, 128)
    twin = keep_first(sigs, band_keys(sigs, b, r), sigs[:0], BandTable(band_keys(sigs[:0], b, r)), threshold)
    return [i if t < 0 else int(t) for i, t in enumerate(twin)]


def test_near_duplicates_found_and_unrelated_kept() -> None:
    texts = [
        "What are the health benefits of regular exercise?",
        "How do I reverse a string in Python?",
        "What are the health benefits of regular physical exercise?",
        "Write a short poem about the ocean at night.",
        "How can I reverse a string in Python?",
    ]
    assert _labels(texts, 0.7) == [0, 1, 0, 3, 1]


def _reference_keep_first(sigs: np.ndarray, threshold: float) -> list[int]:
    """The rule, one row at a time: dropped when it shares a band with an earlier KEPT row and is similar to it."""
    b, r = lsh_params(threshold, sigs.shape[1])
    bands = band_keys(sigs, b, r)
    kept: list[int] = []
    out = []
    for j in range(len(sigs)):
        twins = [
            i
            for i in kept
            if (bands[i] == bands[j]).any() and similar(sigs[i : i + 1], sigs[j : j + 1])[0] >= threshold
        ]
        out.append(min(twins) if twins else -1)
        if not twins:
            kept.append(j)
    return out


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(
        st.lists(st.sampled_from(["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr"]), min_size=1, max_size=7),
        min_size=1,
        max_size=30,
    ),
    cut=st.integers(0, 30),
    threshold=st.sampled_from([0.5, 0.7, 0.8]),
)
def test_keep_first_is_the_sequential_rule_in_any_batching(words: list[list[str]], cut: int, threshold: float) -> None:
    """Vectorised keep-first equals the one-row-at-a-time rule, and merging in two batches (rounds) equals one."""
    sigs = MinHasher(64, 1, 1).signatures([" ".join(w) for w in words])
    ref = _reference_keep_first(sigs, threshold)
    b, r = lsh_params(threshold, 64)
    bands = band_keys(sigs, b, r)
    empty = BandTable(bands[:0])
    assert keep_first(sigs, bands, sigs[:0], empty, threshold).tolist() == ref
    cut = min(cut, len(sigs))
    first = keep_first(sigs[:cut], bands[:cut], sigs[:0], empty, threshold)
    kept = np.flatnonzero(first == -1)
    second = keep_first(sigs[cut:], bands[cut:], sigs[kept], BandTable(bands[kept]), threshold)
    # map the second batch's twins (index into kept rows, then its own rows) back to row numbers
    back = np.concatenate([kept, np.arange(cut, len(sigs))])
    joined = first.tolist() + [-1 if t < 0 else int(back[t]) for t in second]
    assert joined == ref


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95])
@pytest.mark.parametrize("num_perm", [16, 64, 128, 256])
def test_lsh_params_equal_datasketch_optimum(threshold: float, num_perm: int) -> None:
    assert lsh_params(threshold, num_perm) == tuple(_optimal_param(threshold, num_perm, 0.1, 0.9))


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
    seen.add([queries[2]], hasher.signatures([queries[2]]))
    assert seen.contains_exact([queries[2]]).tolist() == [True]
    again = SeenIndex.from_npz(seen.to_npz())
    assert again.contains_exact(queries).tolist() == [True, False, True]
