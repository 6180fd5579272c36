"""Dedup: normalisation, datasketch-compatible MinHash, LSH with verification, components, the seen-index."""

from __future__ import annotations

import datasketch
import numpy as np
import pytest
from genrun.worker.dedup import (
    MinHasher,
    SeenIndex,
    components,
    dedup_key,
    near_duplicate_labels,
    normalize,
    shingles,
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


def test_near_duplicates_found_and_unrelated_kept() -> None:
    texts = [
        "What are the health benefits of regular exercise?",
        "How do I reverse a string in Python?",
        "What are the health benefits of regular physical exercise?",
        "Write a short poem about the ocean at night.",
        "How can I reverse a string in Python?",
    ]
    sigs = MinHasher(128, 1, 1).signatures([normalize(t) for t in texts])
    labels = near_duplicate_labels(sigs, 0.7)
    assert labels.tolist() == [0, 1, 0, 3, 1]


def _reference_components(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [min(i for i in range(n) if find(i) == find(x)) for x in range(n)]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 40), data=st.data())
def test_components_match_union_find(n: int, data: st.DataObject) -> None:
    pairs = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=60))
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    assert components(n, arr).tolist() == _reference_components(n, pairs)


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
