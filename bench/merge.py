"""Merge benchmark: the merge Job's entry point (`genrun worker merge --job FILE`, its `main()` in a fresh Python
process per round, as a Job pod runs it) on synthetic shards written in the shard contract to local storage, round
after round; rensa's MinHash LSH dedup of the same rows in the same run is the baseline.

Rows: base instructions drawn with Zipf frequencies; each row is the base, the base re-cased/re-punctuated, or a
one-word edit (substituted, inserted or deleted). Truth: rows from one base are duplicates. Recall and precision are
pair-counting scores of the merge's clusters (from its dataset and rejected parts: `duplicate_of`) against it. Two
edits of one base are often below the threshold with each other: the near tier drops a row only for a kept row it is
itself near (no chaining), so it leaves such edits apart and this recall is below 1 by design. Recall and precision
against exact Jaccard on real text: bench/near_recall.py.

    python bench/merge.py --rows 1000000 --rounds 1 --repeat 3
    python bench/merge.py --rows 1000000 --rounds 5

Per round: seconds, new rows, seconds per new row, the child's peak RSS. Last line:
RESULT rows=<N> rounds=<R> merge_rows_per_s=<x> vs_rensa=<ratio> round_cost_ratio=<r> peak_mb=<m> recall=<r>
precision=<p> merge_workers=<w>. merge_rows_per_s is all rows over the sum of the rounds' seconds (the Job end to end: reading shards,
dedup, QC, writing every output); vs_rensa divides it by rensa's rows/s on all rows in one pass;
round_cost_ratio is the last round's seconds per new row over the first round's; peak_mb the largest child peak
(the merge process's own: its QC worker processes, forked, add their private memory); merge_workers the processes
the Job used for QC (GENRUN_MERGE_WORKERS, `--workers`; default the CPUs it may use), while rensa runs in one.
The merge runs with the allocator settings a merge Job's pod gets (runtime.MERGE_ENV). `--repeat K` runs the rounds
(on a fresh copy of the same shards) and rensa K times, alternating: merge_rows_per_s and round_cost_ratio are then
the medians, vs_rensa the median of each repetition's ratio (a merge and the rensa run right after it share the
machine's state of the moment). The merge runs the exact and near tiers (the ones rensa does); the semantic tier has
its own benchmark (bench/semantic.py).

`--baseline DIR` also merges every repetition's rounds with another build's code (DIR holds `genrun/` importable
as a package, e.g. a folder whose genrun/{contract,operator,worker} link to an earlier commit's checkout), on a fresh
copy of the same shards, alternating which goes first; the RESULT line then ends with `baseline_rows_per_s=` and
`vs_baseline=` (the median of each repetition's ratio, this code over the baseline).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THRESHOLD, NUM_PERM = 0.8, 128
SHARD_ROWS = 100_000


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


def with_rensa(rows: list[str]) -> float:
    from rensa import RMinHash, RMinHashLSH

    lsh = RMinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, num_bands=16)
    t0 = time.perf_counter()
    for i, text in enumerate(rows):
        m = RMinHash(num_perm=NUM_PERM, seed=1)
        m.update(simple_words(text))
        if not lsh.query(m):
            lsh.insert(i, m)
    return len(rows) / (time.perf_counter() - t0)


def write_shards(out: Path, rows: list[str], rnd: int, first_seed: int) -> list[tuple[int, int]]:
    """Shards of SHARD_ROWS rows in the contract (schema, keys, markers), as generators publish them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from genrun.contract import records as rec
    from genrun.worker.storage import LocalStorage

    storage = LocalStorage(out)
    ids = []
    rng = np.random.default_rng(rnd)
    words = np.array(["answer", "because", "first", "then", "result", "value", "simple", "example", "step", "note"])
    for k, start in enumerate(range(0, len(rows), SHARD_ROWS)):
        seed = first_seed + k
        ins = rows[start : start + SHARD_ROWS]
        n = len(ins)
        resp = [" ".join(rng.choice(words, 12)) + f" {i}." for i in range(n)]  # passes QC, no two alike
        cols = {
            "instruction": ins, "response": resp, "domain": [f"d{i % 7}" for i in range(n)],
            "round": np.full(n, rnd, np.int32), "seed": np.full(n, seed, np.int64), "index": np.arange(n, dtype=np.int32),
            "temperature": np.full(n, 0.7 + 0.1 * (k % 3), np.float32), "top_p": np.full(n, 0.9, np.float32),
            "repetition_penalty": np.full(n, 1.1, np.float32), "model": ["bench"] * n, "prompt_hash": ["0"] * n,
            "instruction_tokens": np.full(n, 12, np.int32), "response_tokens": np.full(n, 14, np.int32),
            "finish_reason": ["stop"] * n, "instruction_logprob": np.full(n, -1.0, np.float32),
            "response_logprob": np.full(n, -1.0, np.float32), "critic_score": pa.nulls(n, pa.float32()),
            "candidates": np.ones(n, np.int32),
        }  # fmt: skip
        for name in rec.NULLABLE_COLUMNS - cols.keys():  # the quality columns: null without the embedding model
            cols[name] = pa.nulls(n, rec.example_schema().field(name).type)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "s.parquet"
            pq.write_table(pa.table(cols, schema=rec.example_schema()), p)
            storage.upload(p, rec.shard_data_key(rnd, seed))
        m = rec.ShardManifest(rnd, seed, n, n, 0, 0, 0, 26 * n, 1.0, rec.shard_data_key(rnd, seed))
        storage.write_bytes(rec.shard_manifest_key(rnd, seed), rec.to_json(m).encode())
        ids.append((rnd, seed))
    return ids


# A fresh interpreter per round, as a Job pod: it times `main()` (imports included) and reports its own peak RSS
# (VmHWM: ru_maxrss would carry over the parent's RSS across fork and exec).
CHILD = (
    "import sys, time\n"
    "t0 = time.perf_counter()\n"
    "from genrun.worker.cli import main\n"
    "import os, cProfile\n"
    "prof = cProfile.Profile() if os.environ.get('GENRUN_BENCH_PROFILE') else None\n"
    "prof and prof.enable()\n"
    "code = main(sys.argv[1:])\n"
    "prof and (prof.disable(), prof.dump_stats(os.environ['GENRUN_BENCH_PROFILE']))\n"
    "hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM:')][0].split()[1]\n"
    "from genrun.worker.merge import merge_workers\n"
    "print('BENCH', code, time.perf_counter() - t0, int(hwm) / 1024, merge_workers())\n"
)


def run_merge(
    job: Path, workers: int | None, profile: str | None = None, code_path: str | None = None
) -> tuple[int, float, float, int]:
    from genrun.worker.runtime import merge_env

    env = merge_env({**os.environ, "GENRUN_LOG_LEVEL": "WARNING"})  # the process a merge Job's pod runs
    if code_path:  # another build's genrun, imported before this one
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [code_path, env.get("PYTHONPATH", "")]))
    if profile:
        env["GENRUN_BENCH_PROFILE"] = profile
    if workers is not None:
        env["GENRUN_MERGE_WORKERS"] = str(workers)
    res = subprocess.run([sys.executable, "-P", "-c", CHILD, "merge", "--job", str(job)], capture_output=True,
                         text=True, env=env)  # fmt: skip
    line = [x for x in res.stdout.splitlines() if x.startswith("BENCH ")]
    if not line:
        sys.exit(f"merge failed: {res.stderr[-2000:]}")
    _, code, dt, peak, used = line[-1].split()
    return int(code), float(dt), float(peak), int(used)


def labels_from_outputs(out: Path, n: int, offsets: dict[int, int]) -> np.ndarray:
    """Each row's cluster (the global id of its kept row) from the rejected parts' duplicate_of."""
    import pyarrow.parquet as pq

    labels = np.arange(n, dtype=np.int64)
    rej = pq.read_table(out / "rejected", columns=["seed", "index", "duplicate_of"])
    # global id = position in (round, seed, index) order; seeds are unique over the run
    start = np.array([offsets[s] for s in rej.column("seed").to_pylist()], dtype=np.int64)
    gid = start + rej.column("index").to_numpy().astype(np.int64)
    dup = rej.column("duplicate_of").to_numpy(zero_copy_only=False).astype(np.float64)
    has = ~np.isnan(dup)
    labels[gid[has]] = dup[has].astype(np.int64)
    return labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-rensa", action="store_true")
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="GENRUN_MERGE_WORKERS for the merge Job (default: unset, the CPUs it may use; 1: one process)",
    )
    ap.add_argument("--profile", help="write a cProfile of the merge Job here (the last round's)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the merge's rounds (on a fresh copy of the same shards) and rensa this many times, alternating; "
        "the RESULT figures are the medians (on a shared machine one run can be 20%% off)",
    )
    ap.add_argument("--baseline", help="a folder holding another build's genrun package, merged alternately")
    args = ap.parse_args()
    from genrun.contract import records as rec

    rows, truth = synth(args.rows)
    per = -(-args.rows // args.rounds)
    print(f"synthetic rows: {len(rows)} in {args.rounds} round(s), distinct bases: {len(np.unique(truth))}", flush=True)
    spec = {"model": {"name": "bench"}, "target": {"uniqueExamples": 10}, "dedup": {"semantic": {"enabled": False}}}
    runs: list[tuple[float, float, float]] = []  # per repetition: merge rows/s, rensa rows/s, round cost ratio
    peaks: list[float] = []
    bases: list[float] = []  # per repetition: the baseline build's merge rows/s
    with tempfile.TemporaryDirectory(prefix="genrun-bench-") as d:
        pristine = Path(d) / "shards"  # every round's shards, written once; each repetition merges a fresh copy
        ids_of: list[list[tuple[int, int]]] = []
        offsets: dict[int, int] = {}
        for r in range(1, args.rounds + 1):
            new = write_shards(pristine, rows[(r - 1) * per : r * per], r, sum(map(len, ids_of)))
            for k, (_, seed) in enumerate(new):
                offsets[seed] = (r - 1) * per + k * SHARD_ROWS
            ids_of.append(new)

        def merge_all(rep: int, name: str, code_path: str | None) -> tuple[Path, list[float], list[int], int]:
            """Every round of repetition `rep` on a fresh copy of the shards, with this build's code or another's."""
            out = Path(d) / f"{name}{rep}"
            shutil.copytree(pristine, out)
            os.sync()  # the copy's writeback is not the merge's work: flushed before it starts
            secs: list[float] = []
            news: list[int] = []
            ids: list[tuple[int, int]] = []
            workers = 0
            for r in range(1, args.rounds + 1):
                ids += ids_of[r - 1]
                job = Path(d) / f"job-{name}{rep}-{r}.json"
                merge_spec = {**spec, "output": {"path": str(out)}}
                job.write_text(rec.to_json(rec.JobSpec("merge", "bench", "default", merge_spec, r, shards=tuple(ids))))
                code, dt, peak, workers = run_merge(job, args.workers, args.profile, code_path)
                if code != 0:
                    sys.exit(f"{name}: merge of round {r} exited {code}")
                secs.append(dt)
                news.append(len(rows[(r - 1) * per : r * per]))
                if code_path is None:
                    peaks.append(peak)
                print(f"[{rep + 1}/{args.repeat}] {name} round {r}: {dt:.2f} s for {news[-1]} new rows "
                      f"({1e6 * dt / news[-1]:.2f} us/row), peak {peak:,.0f} MB", flush=True)  # fmt: skip
            return out, secs, news, workers

        for rep in range(args.repeat):
            base_rps = float("nan")
            if args.baseline and rep % 2 == 0:  # alternate which build goes first
                bout, bsecs, _, _ = merge_all(rep, "baseline", args.baseline)
                base_rps = len(rows) / sum(bsecs)
                shutil.rmtree(bout)
            out, secs, news, workers = merge_all(rep, "out", None)
            if rep == 0:  # the clusters are the same in every repetition (tested: the merge is deterministic)
                recall, precision = pair_scores(labels_from_outputs(out, len(rows), offsets), truth)
            shutil.rmtree(out)
            if args.baseline and rep % 2 == 1:
                bout, bsecs, _, _ = merge_all(rep, "baseline", args.baseline)
                base_rps = len(rows) / sum(bsecs)
                shutil.rmtree(bout)
            merge_rps = len(rows) / sum(secs)
            rensa = float("nan") if args.no_rensa else with_rensa(rows)
            ratio = (secs[-1] / news[-1]) / (secs[0] / news[0])
            runs.append((merge_rps, rensa, ratio))
            bases.append(base_rps)
            print(f"[{rep + 1}/{args.repeat}] merge Job {merge_rps:,.0f} rows/s, rensa ({len(rows)} rows, one pass, one "
                  f"process) {rensa:,.0f} rows/s: {merge_rps / rensa:.2f}x; round cost ratio {ratio:.2f}"
                  + (f"; baseline {base_rps:,.0f} rows/s: {merge_rps / base_rps:.2f}x" if args.baseline else ""),
                  flush=True)  # fmt: skip
    med = [float(np.median(x)) for x in zip(*runs, strict=True)]
    vs = float(np.median([m / r for m, r, _ in runs]))
    print(f"merge Job: recall {recall:.4f}, precision {precision:.4f}; it used {workers} process(es) for QC "
          f"(GENRUN_MERGE_WORKERS), rensa 1", flush=True)  # fmt: skip
    print(
        f"RESULT rows={len(rows)} rounds={args.rounds} merge_rows_per_s={med[0]:.0f} vs_rensa={vs:.2f} "
        f"round_cost_ratio={med[2]:.2f} peak_mb={max(peaks):.0f} recall={recall:.4f} precision={precision:.4f} "
        f"merge_workers={workers} repeat={args.repeat}"
        + (
            f" baseline_rows_per_s={float(np.median(bases)):.0f} "
            f"vs_baseline={float(np.median([m / b for (m, _, _), b in zip(runs, bases, strict=True)])):.3f}"
            if args.baseline
            else ""
        )
    )


if __name__ == "__main__":
    main()
