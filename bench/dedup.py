"""Dedup benchmark: genrun's dedup against the naive datasketch loop and rensa, on synthetic rows with a known
duplicate structure, all measured in this run.

Rows: base instructions drawn with Zipf frequencies; each row is the base, the base re-cased/re-punctuated, or a
paraphrase-level edit (one word substituted, inserted or deleted). Truth: rows from one base are duplicates.
Precision and recall are pair-counting figures of the predicted clusters against that truth.

    python bench/dedup.py --rows 1000000

Last line: RESULT rows=<N> genrun_rows_per_s=<x> vs_datasketch=<ratio> vs_rensa=<ratio or na> recall=<r>
precision=<p> peak_mb=<m>. The naive loop is timed on a sample (--naive-rows) because it would take most of an hour
at 1M rows; rensa and genrun run on all rows. Ratios are of rows per second.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np

THRESHOLD, NUM_PERM = 0.8, 128


def synth(n: int, seed: int = 7) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    vocab = np.array(
        ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9))) for _ in range(30000)]
    )
    n_bases = max(10, n // 8)
    bases = [list(vocab[rng.integers(0, len(vocab), rng.integers(9, 15))]) for _ in range(n_bases)]
    pick = np.minimum(rng.zipf(1.15, n) - 1, n_bases - 1)  # a few very frequent instructions, a long tail
    pick = rng.permutation(n_bases)[pick]
    kind = rng.random(n)
    rows = []
    for b, k in zip(pick, kind, strict=True):
        w = list(bases[b])
        if k < 0.45:
            text = " ".join(w) + "?"
        elif k < 0.65:
            text = (" ".join(w)).capitalize() + "!"
        else:
            i = int(rng.integers(0, len(w)))
            op = rng.integers(0, 3)
            if op == 0:
                w[i] = str(vocab[rng.integers(0, len(vocab))])
            elif op == 1:
                w.insert(i, str(vocab[rng.integers(0, len(vocab))]))
            else:
                del w[i]
            text = " ".join(w) + "?"
        rows.append(text)
    return rows, pick.astype(np.int64)


def pair_scores(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    def pairs(counts: np.ndarray) -> float:
        c = counts.astype(np.float64)
        return float((c * (c - 1) / 2).sum())

    both = np.unique(np.stack([labels, truth], axis=1), axis=0, return_counts=True)[1]
    tp = pairs(both)
    predicted = pairs(np.unique(labels, return_counts=True)[1])
    actual = pairs(np.unique(truth, return_counts=True)[1])
    return (tp / actual if actual else 1.0), (tp / predicted if predicted else 1.0)


def simple_words(text: str) -> list[str]:
    return "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()


def naive_datasketch(rows: list[str]) -> float:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    t0 = time.perf_counter()
    for i, text in enumerate(rows):
        m = MinHash(num_perm=NUM_PERM, seed=1)
        for w in set(simple_words(text)):
            m.update(w.encode())
        if not lsh.query(m):
            lsh.insert(str(i), m)
    return len(rows) / (time.perf_counter() - t0)


def with_rensa(rows: list[str]) -> float | None:
    try:
        from rensa import RMinHash, RMinHashLSH
    except ImportError:
        return None
    lsh = RMinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, num_bands=16)
    t0 = time.perf_counter()
    for i, text in enumerate(rows):
        m = RMinHash(num_perm=NUM_PERM, seed=1)
        m.update(simple_words(text))
        if not lsh.query(m):
            lsh.insert(i, m)
    return len(rows) / (time.perf_counter() - t0)


def _genrun(rows: list[str], q: mp.Queue) -> None:  # type: ignore[type-arg]
    import pyarrow as pa
    from genrun.worker.dedup import deduplicate

    arr = pa.array(rows, pa.string())
    t0 = time.perf_counter()
    labels = deduplicate(arr, threshold=THRESHOLD, num_perm=NUM_PERM)
    dt = time.perf_counter() - t0
    q.put((len(rows) / dt, labels, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--naive-rows", type=int, default=20_000)
    args = ap.parse_args()
    rows, truth = synth(args.rows)
    print(f"synthetic rows: {len(rows)}, distinct bases used: {len(np.unique(truth))}", flush=True)

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_genrun, args=(rows, q))  # its own process: peak memory is genrun's alone
    p.start()
    genrun_rps, labels, peak = q.get()
    p.join()
    recall, precision = pair_scores(labels, truth)
    print(
        f"genrun: {genrun_rps:,.0f} rows/s, recall {recall:.4f}, precision {precision:.4f}, peak {peak:,.0f} MB",
        flush=True,
    )

    sample = rows[: args.naive_rows]
    naive = naive_datasketch(sample)
    print(f"naive datasketch loop ({len(sample)} rows): {naive:,.0f} rows/s", flush=True)
    rensa = with_rensa(rows)
    print(f"rensa ({len(rows)} rows): " + (f"{rensa:,.0f} rows/s" if rensa else "not installed"), flush=True)
    vs_rensa = f"{genrun_rps / rensa:.2f}" if rensa else "na"
    print(
        f"RESULT rows={len(rows)} genrun_rows_per_s={genrun_rps:.0f} vs_datasketch={genrun_rps / naive:.1f} "
        f"vs_rensa={vs_rensa} recall={recall:.4f} precision={precision:.4f} peak_mb={peak:.0f}"
    )


if __name__ == "__main__":
    main()
