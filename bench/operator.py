"""Operator benchmark: 50 GenerationRuns of 20 shards each against kmock (an API emulator on 127.0.0.1) with instant
Jobs, the operator as a real process.

The instant Job runner (the bench's stand-in for kubelets and the Job controller) completes every Job at once and, for
merge Jobs, writes a synthetic round report that meets the target, so each run is one round of 20 shards plus a merge.

Figures: API requests the operator made per shard (every request with Kopf's or the operator's client, watches
included); reaction time from a Job's completion to the operator's next write for that run (its status patch);
the operator's peak RSS.

    python bench/operator.py [--runs 50 --shards 20]

Last line: RESULT runs=50 shards=1000 api_requests_per_shard=<x> reaction_p50_s=<a> reaction_p99_s=<b> operator_rss_mb=<m>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genrun.worker import records as rec  # noqa: E402
from genrun.worker.storage import LocalStorage  # noqa: E402

from tests.integration.harness import JOBS, RUNS, Cluster, OperatorProcess, _Emulator, wait_for  # noqa: E402

NS = "bench"


def instant_jobs(cluster: Cluster, root: Path, stop: threading.Event, done_at: dict[str, tuple[str, float]]) -> None:
    while not stop.is_set():
        for job in cluster.items(JOBS.format(ns=NS)):
            name = job["metadata"]["name"]
            if name in done_at or (job.get("status") or {}).get("conditions"):
                continue
            labels = job["metadata"]["labels"]
            run = labels["genrun.io/run"]
            if labels["genrun.io/kind"] == "merge":
                report = rec.RoundReport(round=1, shards=20, generated=2000, new_unique=1500, new_qc_passed=1200,
                                         generated_total=2000, unique_total=1500, qc_passed_total=1200)  # fmt: skip
                LocalStorage(root / run).write_bytes(rec.round_report_key(1), rec.to_json(report).encode())
            cluster.patch(JOBS.format(ns=NS) + f"/{name}/status",
                          {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})  # fmt: skip
            done_at[name] = (run, time.monotonic())
        time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--shards", type=int, default=20)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="genrun-bench-op-"))
    done_at: dict[str, tuple[str, float]] = {}
    stop = threading.Event()
    with Cluster() as cluster:
        cluster.create(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            yaml.safe_load((ROOT / "crds" / "generationrun.yaml").read_text()),
        )
        cluster.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        op = OperatorProcess(cluster, NS, GENRUN_TIMER_SECONDS="60", GENRUN_LOG_LEVEL="WARNING").start()
        runner = threading.Thread(target=instant_jobs, args=(cluster, root, stop, done_at), daemon=True)
        runner.start()
        time.sleep(3)
        start_log = len(_Emulator.log)
        t0 = time.monotonic()
        for i in range(args.runs):
            spec = {"model": {"name": "m"}, "target": {"uniqueExamples": 1000}, "output": {"path": str(root / f"run{i}")},
                    "shards": {"initial": args.shards, "examplesPerShard": 100}, "worker": {"gpus": 0}}  # fmt: skip
            cluster.create(RUNS.format(ns=NS), {"apiVersion": "genrun.io/v1alpha1", "kind": "GenerationRun",
                                                "metadata": {"name": f"run{i}", "namespace": NS}, "spec": spec})  # fmt: skip

        def all_done() -> bool:
            items = cluster.items(RUNS.format(ns=NS))
            return len(items) == args.runs and all(
                any(
                    c["type"] == "Succeeded" and c["status"] == "True"
                    for c in (r.get("status") or {}).get("conditions", [])
                )
                for r in items
            )

        wait_for(all_done, 900, "all runs Succeeded", every=0.5)
        elapsed = time.monotonic() - t0
        rss = 0.0
        if op.proc is not None:
            for line in Path(f"/proc/{op.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) / 1024
        stop.set()
        log = _Emulator.log[start_log:]
        op.stop()
    operator_requests = [e for e in log if not e[4].startswith("Python-urllib")]  # the bench's own client is urllib
    shards = args.runs * args.shards
    # Reaction: a Job's completion -> the operator's next status patch of that run.
    patches: dict[str, list[float]] = {}
    for t, method, path, _, _ua in operator_requests:
        if method == "PATCH" and path.endswith("/status") and "/generationruns/" in path:
            patches.setdefault(path.split("/generationruns/")[1].split("/")[0], []).append(t)
    reactions = []
    for run, t_done in done_at.values():
        later = [t for t in patches.get(run, []) if t >= t_done]
        if later:
            reactions.append(min(later) - t_done)
    r = np.array(reactions)
    print(f"{args.runs} runs x {args.shards} shards in {elapsed:.1f}s; {len(operator_requests)} operator requests; "
          f"{len(reactions)} reactions measured", flush=True)  # fmt: skip
    print(
        f"RESULT runs={args.runs} shards={shards} api_requests_per_shard={len(operator_requests) / shards:.2f} "
        f"reaction_p50_s={np.percentile(r, 50):.3f} reaction_p99_s={np.percentile(r, 99):.3f} operator_rss_mb={rss:.0f}"
    )


if __name__ == "__main__":
    main()
