"""Calibration of the semantic tier and the quality signals on real SmolLM2-135M output, with the real embedding model.

Data: tests/data/smollm2-instructions.jsonl.gz (2,000 instructions sampled with the quickstart prompts and the
problem's sampling, T 0.7, top_p 0.9, repetition penalty 1.1; scripts/record_instructions.py) and the replay
recording. Labels: tests/data/semantic-labels.json, set by reading every pair (the rules are in the file). The figures
asserted here are the ones docs/manifest.md quotes.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from genrun.contract import qc_rules
from genrun.contract.api import QcFilter
from genrun.worker.dedup import dedup_keys
from genrun.worker.dedup_cli import decide
from genrun.worker.qc import QcPipeline
from genrun.worker.semantic import (
    DEFAULT_THRESHOLD,
    embed_keys,
    load_embedder,
    quality_columns,
    relevance,
)

DEFAULT_MIN_RELEVANCE = qc_rules.default("relevance", "minRelevance")
DEFAULT_MAX_DOMAIN_MARGIN = qc_rules.default("domain", "maxMargin")
DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def embedder() -> Any:
    return load_embedder()


@pytest.fixture(scope="module")
def recorded() -> list[dict[str, Any]]:
    with gzip.open(DATA / "smollm2-instructions.jsonl.gz", "rt") as f:
        return [json.loads(x) for x in f]


@pytest.fixture(scope="module")
def labels() -> dict[str, Any]:
    return json.loads((DATA / "semantic-labels.json").read_text())


@pytest.fixture(scope="module")
def tiers(recorded: list[dict[str, Any]], embedder: Any) -> Any:
    texts = [r["instruction"] for r in recorded if r["instruction"]]
    return texts, decide(texts, 0)


def test_counts_per_tier_on_real_output(tiers: Any) -> None:
    """2,000 sampled, 1,998 parsed: exact 277, MinHash (word 1-grams, 0.8; keep-first against kept rows: no chaining)
    42 more, semantic (0.9) 68 more: the semantic tier finds 21% more duplicates than exact + MinHash together, 1.6x
    what MinHash finds."""
    texts, d = tiers
    counts = {t: int((d.tier == t).sum()) for t in ("exact", "near", "semantic")}
    assert len(texts) == 1998
    assert counts["exact"] == 277 and counts["near"] == 42, counts
    assert abs(counts["semantic"] - 68) <= 2, counts  # a pair within 1e-5 of 0.9 may fall either way on another CPU
    sem = d.similarity[d.tier == "semantic"]
    assert sem.min() >= DEFAULT_THRESHOLD


def test_precision_at_the_default_threshold(tiers: Any, labels: dict[str, Any]) -> None:
    """Every pair the tier drops at 0.9 (dropped row, the kept row it names) was read and labelled: 59 of 69 are
    the same request (86%); the 10 others add or change a constraint ("using only flour and sugar" vs "flour, sugar
    and butter"). At 0.95 all 16 labelled pairs are the same request, at a quarter of the catches."""
    texts, d = tiers
    lab = {(p["a"], p["b"]): p["same"] for p in labels["semantic_pairs"]["pairs"]}
    dropped = np.flatnonzero(d.tier == "semantic")
    got = [lab.get((texts[j], texts[int(d.dup_of[j])])) for j in dropped]
    known = [g for g in got if g is not None]
    assert len(known) >= len(got) - 2  # every drop is a labelled pair (up to the CPU tolerance above)
    precision = sum(known) / len(known)
    assert precision >= 0.85
    high = [p["same"] for p in labels["semantic_pairs"]["pairs"] if p["cosine"] >= 0.95]
    assert len(high) >= 15 and all(high)


def test_what_the_tier_catches_and_what_it_must_not_merge(embedder: Any) -> None:
    """Caught: paraphrases from the real recording and the issue. Not merged: different questions that share most of
    their words, from the same recording (below 0.9 although MinHash-style overlap is high)."""
    caught = [
        ("Can you explain the concept behind quantum computing?", "Can you explain the concept of quantum computing?"),
        ("Can you tell me the best way to prepare for a marathon?", "What is the best way to prepare for a marathon?"),
        ("How do you make the Caesar salad?", "How to make a Caesar salad?"),
        ("When is the best time to go on a beach vacation?", "When is the best time to visit a beach destination?"),
        ("How many days in a month?", "How many days are there in a month?"),
        ("What is the capital city of France?", "Which city is the capital of France?"),
        ("What is the capital city of France?", "Name France's capital"),
    ]
    kept_apart = [
        ("Create a new list containing all the unique elements from a given list.",
         "Can you create a new list containing all the duplicate elements from a given list?"),
        ("What is the sum of all the digits of 25?", "What is the sum of all numbers from 0 to 25?"),
        ("Write a function that returns the maximum value from a list of integers.",
         "Write a function that takes a list of integers as input, returns the maximum product of any two numbers."),
        ("To find the maximum number among two numbers using recursion in Python.",
         "To find the maximum number among five numbers using recursion and Python, please provide the solution."),
        ("What is the capital of France?", "What is the capital of Germany?"),
        ("How do I reverse a string in Python?", "How do I reverse a list in Python?"),
        ("How do I sort a list in Python?", "How do I sort a list in JavaScript?"),
    ]  # fmt: skip
    for a, b in caught + kept_apart:
        e = embed_keys(embedder, dedup_keys([a, b]))
        cos = float(e[0] @ e[1])
        assert (cos >= DEFAULT_THRESHOLD) == ((a, b) in caught), (a, b, cos)


def test_known_limitation_swapped_words_and_antonyms_look_alike(embedder: Any) -> None:
    """A sentence embedding barely sees word order or a single antonym: these different requests score above the
    threshold and the tier merges them. Stated, not hidden (docs/manifest.md); raise the threshold if it matters."""
    merged = [
        ("Convert 100 Fahrenheit to Celsius.", "Convert 100 Celsius to Fahrenheit."),
        ("How do I add a row to a pandas DataFrame?", "How do I add a column to a pandas DataFrame?"),
    ]
    for a, b in merged:
        e = embed_keys(embedder, dedup_keys([a, b]))
        assert float(e[0] @ e[1]) >= DEFAULT_THRESHOLD, (a, b)


def _reasons(name: str, column: str, values: list[Any], **params: Any) -> list[str | None]:
    """The registered QC filter `name` (genrun.worker.qc) on a table holding one quality column."""
    import pyarrow as pa

    table = pa.table({column: pa.array(values, pa.float32())})
    return QcPipeline.from_spec([QcFilter(name, params)]).check_table(table)  # type: ignore[arg-type]


def _pairs() -> list[dict[str, Any]]:
    """850 recorded instruction/response pairs: the replay recording (450) and the instruction recording's rows that
    have a response (400)."""
    with gzip.open(DATA.parent.parent / "worker" / "replay" / "smollm2-135m.jsonl.gz", "rt") as fh:
        pairs = [json.loads(x) for x in fh]
    with gzip.open(DATA / "smollm2-instructions.jsonl.gz", "rt") as fh:
        pairs += [r for r in map(json.loads, fh) if r["instruction"] and r.get("response")]
    return pairs


def test_relevance_filter_calibration(embedder: Any, labels: dict[str, Any]) -> None:
    """How 0.15 was chosen: cosine(instruction, response) for the 850 recorded matched pairs against the same
    responses shuffled onto other instructions (a response that ignores its instruction). Matched: median ~0.37;
    shuffled: median ~0.04, and 82-85% of them fall below 0.15. Every matched pair below 0.15 was read by hand
    (tests/data/semantic-labels.json): 141 of 145 ignore their instruction, so the false-reject rate is 4 of 850 rows
    (0.5%); at 0.25 the filter would reject 269 matched rows, most of them relevant."""
    pairs = _pairs()
    assert len(pairs) == 850
    ins, res = [p["instruction"] for p in pairs], [p["response"] for p in pairs]
    matched = relevance(embedder, ins, res)
    perm = np.random.default_rng(0).permutation(len(pairs))
    shuffled = relevance(embedder, ins, [res[i] for i in perm])
    assert 0.3 < float(np.median(matched)) < 0.45 and float(np.median(shuffled)) < 0.08
    assert (shuffled < DEFAULT_MIN_RELEVANCE).mean() >= 0.8
    reasons = _reasons("relevance", "relevance", matched.tolist())
    rejected = [(ins[i], res[i]) for i, r in enumerate(reasons) if r == "irrelevant_response"]
    lab = {(p["instruction"], p["response"]): p["relevant"] for p in labels["relevance"]["pairs"]}
    assert abs(len(rejected) - 145) <= 2 and set(rejected) <= set(lab)  # every rejected pair was read
    false_rejects = sum(lab[k] for k in rejected)
    assert false_rejects <= 4 and false_rejects / len(pairs) < 0.01
    assert _reasons("relevance", "relevance", [0.4, None], minRelevance=0.5) == ["irrelevant_response", None]


def test_domain_adherence_on_real_output(embedder: Any, recorded: list[dict[str, Any]], labels: dict[str, Any]) -> None:
    """The row records the spec domain its instruction is nearest to (generated_domain). On the embedded model's
    output only ~19% of rows are nearest their asked domain (it follows its few-shot examples: programming and
    cooking). How 0.1 was chosen: every row read at or above it (40 at random among those flagged, 12 more just
    above it, margin in [0.1, 0.13)) had left its asked domain: no false reject in 52; below it most rows are off too
    (the filter is conservative: ~57% of recorded rows are flagged at 0.1, 35% at 0.15)."""
    lab = labels["domain"]
    rows = lab["rows"]
    cols = quality_columns(
        embedder, [r["instruction"] for r in rows], ["x"] * len(rows), [r["asked"] for r in rows], lab["domains"]
    )
    reasons = _reasons("domain", "domain_margin", cols["domain_margin"])
    assert all(r == "off_domain" for r in reasons) and all(r["off"] for r in rows)
    assert cols["generated_domain"] == [r["nearest"] for r in rows]
    ok = [r for r in recorded if r["instruction"]]
    c = quality_columns(
        embedder, [r["instruction"] for r in ok], ["x"] * len(ok), [r["domain"] for r in ok], lab["domains"]
    )
    same = np.mean([n == r["domain"] for n, r in zip(c["generated_domain"], ok, strict=True)])
    assert 0.1 < same < 0.3
    margin = np.array(c["domain_margin"])
    assert 0.5 < (margin >= DEFAULT_MAX_DOMAIN_MARGIN).mean() < 0.65
    border = {(r["instruction"], r["asked"]) for r in lab["borderline"]}
    got = {(r["instruction"], r["domain"]): m for r, m in zip(ok, margin.tolist(), strict=True)}
    assert len(border) == 12 and all(0.1 <= got[k] < 0.13 for k in border)
    assert all(r["off"] for r in lab["borderline"])
    assert _reasons("domain", "domain_margin", [0.3, None], maxMargin=0.5) == [None, None]


def test_shards_that_ask_at_once_share_one_model() -> None:
    """The shards an engine host starts together each ask for the embedding model at the same moment: they get one
    model, loaded once (a batch size no other test uses, so the load really happens here, in these threads)."""
    import threading

    got: list[Any] = []
    start = threading.Barrier(4)

    def ask() -> None:
        start.wait()
        got.append(load_embedder(batch_size=23))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(e is got[0] for e in got)
