"""The near tier on real text against exact Jaccard: recall, precision and the count of drops, beside a plain
keep-first reference.

Data: real SmolLM2-135M instructions (tests/data/smollm2-instructions.jsonl.gz, 2,000 rows, and the replay engine's
worker/replay/smollm2-135m.jsonl.gz, 450 rows), taken in file order as one round. Keys are genrun's normalised keys;
rows with a key seen before (the exact tier) are left out first.

Reference: one row at a time, a row is a near duplicate iff its word set (genrun's shingles of size 1) has an exact
Jaccard similarity of at least the threshold with some earlier KEPT row; else it is kept. No LSH, no estimate, no
chaining: the rule the near tier approximates (`genrun.worker.dedup.deduplicate`: MinHash LSH, estimated
similarity on the whole signature, first kept rows of each bucket only).

A second reference, the same keep-first rule on genrun's own estimate against every earlier kept row (no LSH), shows
what LSH and the first-kept-row-per-bucket shortcut cost apart from MinHash's estimation error.

Printed per threshold: genrun's near drops, both references', the relative differences, precision (the share of
genrun's near drops whose exact Jaccard with the kept row they name reaches the threshold) and recall (the share of
the reference's near drops genrun drops as near too). Last line: RESULT threshold=... reference=... genrun=...

`--semantic`: the three tiers (exact -> near -> semantic, cosine 0.9) against greedy keep-first on the embeddings alone
over the exact-unique rows (all-MiniLM-L6-v2): kept counts and their relative difference.

    python bench/near_recall.py [--threshold 0.8 0.7 0.9] [--semantic]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "tests/data/smollm2-instructions.jsonl.gz", ROOT / "worker/replay/smollm2-135m.jsonl.gz")


def real_instructions() -> list[str]:
    out: list[str] = []
    for path in SOURCES:
        with gzip.open(path, "rt") as f:
            out += [json.loads(line)["instruction"] for line in f if line.strip()]
    return out


def exact_unique_keys(texts: list[str]) -> list[str]:
    """Genrun's normalised keys, each the first time it occurs (the rows the near tier sees)."""
    from genrun.worker.dedup import normalize_many

    seen: set[str] = set()
    out = []
    for k in normalize_many(texts):
        if k not in seen:
            seen.add(k)
            out.append(k)
    return out


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def reference(keys: list[str], threshold: float) -> np.ndarray:
    """Per row, the earliest kept row its word set reaches `threshold` with (exact Jaccard), or itself (kept)."""
    words = [frozenset(k.split()) for k in keys]
    by_word: dict[str, list[int]] = {}  # word -> kept rows holding it: J >= t > 0 needs a shared word
    out = np.arange(len(keys))
    for i, w in enumerate(words):
        cands = sorted({j for x in w for j in by_word.get(x, ())})
        hit = next((j for j in cands if jaccard(w, words[j]) >= threshold), None)
        if hit is not None:
            out[i] = hit
            continue
        for x in w:
            by_word.setdefault(x, []).append(i)
    return out


def reference_estimated(keys: list[str], threshold: float, num_perm: int = 128) -> np.ndarray:
    """The same rule on genrun's estimate (`similar` of the MinHash signatures) against EVERY earlier kept row: what
    the near tier gives without LSH's misses, i.e. the rule itself."""
    from genrun.worker.dedup import MinHasher, similar

    sigs = MinHasher(num_perm, 1, 1).signatures(keys)
    out = np.arange(len(keys))
    kept: list[int] = []
    for i in range(len(keys)):
        if kept:
            sim = similar(np.repeat(sigs[i : i + 1], len(kept), axis=0), sigs[kept])
            hit = np.flatnonzero(sim >= threshold)
            if len(hit):
                out[i] = kept[hit[0]]
                continue
        kept.append(i)
    return out


def scores(keys: list[str], threshold: float) -> dict[str, float]:
    from genrun.worker.dedup import deduplicate

    ref = reference(keys, threshold)
    est = reference_estimated(keys, threshold)
    got = deduplicate(keys, threshold=threshold)
    rows = np.arange(len(keys))
    ref_drop, got_drop = ref != rows, got != rows
    words = [frozenset(k.split()) for k in keys]
    right = sum(jaccard(words[i], words[got[i]]) >= threshold for i in np.flatnonzero(got_drop))
    n_ref, n_got, n_est = int(ref_drop.sum()), int(got_drop.sum()), int((est != rows).sum())
    return {
        "rows": len(keys),
        "estimated": n_est,
        "vs_estimated": (n_got - n_est) / max(n_est, 1),
        "agree_estimated": float(np.mean(est == got)),
        "reference": n_ref,
        "genrun": n_got,
        "difference": (n_got - n_ref) / max(n_ref, 1),
        "precision": right / max(n_got, 1),
        "recall": float((ref_drop & got_drop).sum()) / max(n_ref, 1),
    }


def semantic_scores(texts: list[str], cosine: float = 0.9) -> dict[str, float]:
    """The three tiers (`genrun dedup`'s decide: exact -> near -> semantic, the merge's rules) against a plain
    reference: greedy keep-first over the exact-unique rows, a row kept iff its cosine (all-MiniLM-L6-v2) with every
    earlier kept row is below `cosine`."""
    from genrun.worker import semantic as sem
    from genrun.worker.dedup_cli import decide

    d = decide(texts, 0, semantic_threshold=cosine)
    kept = int((d.tier == "").sum())
    keys = exact_unique_keys(texts)
    emb = sem.embed_keys(sem.load_embedder(), keys)
    ref: list[int] = []
    for i in range(len(keys)):
        if not ref or float((emb[ref] @ emb[i]).max()) < cosine:
            ref.append(i)
    return {"rows": len(texts), "exact_unique": len(keys), "genrun": kept, "reference": len(ref),
            "difference": (kept - len(ref)) / len(ref)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threshold", type=float, nargs="+", default=[0.8, 0.7, 0.9])
    ap.add_argument("--semantic", action="store_true", help="also the three tiers against a plain semantic reference")
    args = ap.parse_args()
    if args.semantic:
        s = semantic_scores(real_instructions())
        print(f"exact -> near -> semantic keeps {s['genrun']} of {s['rows']} rows; greedy keep-first at cosine 0.9 "
              f"over the {s['exact_unique']} exact-unique rows keeps {s['reference']} ({s['difference']:+.1%})")  # fmt: skip
        print(f"RESULT semantic rows={s['rows']} genrun={s['genrun']} reference={s['reference']} "
              f"difference={s['difference']:.4f}")  # fmt: skip
    keys = exact_unique_keys(real_instructions())
    for t in args.threshold:
        s = scores(keys, t)
        print(f"threshold {t}: {s['rows']} exact-unique rows; near drops: genrun {s['genrun']}, keep-first on the "
              f"same estimate against every kept row {s['estimated']} ({s['vs_estimated']:+.1%}, the same decision "
              f"on {s['agree_estimated']:.2%} of rows), keep-first on exact Jaccard {s['reference']} "
              f"({s['difference']:+.1%}): precision {s['precision']:.4f}, recall {s['recall']:.4f}")  # fmt: skip
        print(f"RESULT threshold={t} rows={s['rows']} genrun={s['genrun']} estimated={s['estimated']} "
              f"vs_estimated={s['vs_estimated']:.4f} exact={s['reference']} vs_exact={s['difference']:.4f} "
              f"precision={s['precision']:.4f} recall={s['recall']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
