"""Operator benchmark: GenerationRuns of 20 shards each (50 or 500 runs) against kmock (an API emulator on 127.0.0.1)
with instant Jobs, the operator as a real process (`genrun operator`, the image's entry point).

The instant Job runner (the bench's stand-in for kubelets and the Job controller) completes every Job as soon as it is
created and, for merge Jobs, writes a synthetic round report that meets the target, so each run is one round of 20
shards plus a merge. It learns of new Jobs from the emulator's request hook, not by listing every Job again.

Figures: API requests the operator made per shard Job it really started (every request with Kopf's or the operator's
client after start-up, Events included; `requests by kind` breaks them down); reaction time from a Job's completion
to the operator's next write for that run (its status patch); the operator's peak RSS; the wall time of the whole
batch. Each run sets spec.policy.pilotShare 0: with the bandit's pilot, round 1 would be 4 shards, not 20.
`--profile FILE` runs the same entry point under cProfile.

    python bench/operator.py [--runs 50 --shards 20]     # and --runs 500

Last line: RESULT runs=50 shards=1000 api_requests_per_shard=<x> reaction_p50_s=<a> reaction_p99_s=<b> operator_rss_mb=<m>
wall_s=<t>
"""

from __future__ import annotations

import argparse
import atexit
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import kmock
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genrun.contract import records as rec  # noqa: E402
from genrun.worker.storage import LocalStorage  # noqa: E402

from tests.integration.harness import JOBS, RUNS, Cluster, OperatorProcess, _Emulator, wait_for  # noqa: E402

NS = "bench"


def index_kmock_objects() -> None:
    """kmock finds an object by scanning every object, lists its resources by scanning them too, and matches each
    request to a reaction by re-filtering its request history: O(n) per request, O(n^2) over 500 runs' 20,000
    children, which stalls the emulator long before the operator. Here an object named by its request is looked up by
    key, and a request just received is matched by applying the reaction's filters to it alone (emulator fixes,
    bench-only: the operator's requests and the answers are the same)."""
    from kmock._internal import dsl, rendering

    def sees(view: Any, request: Any) -> bool | None:  # None: not a plain filter chain, ask kmock
        if isinstance(view, dsl.Root):
            return True  # the request being handled is in the history by construction
        if type(view) is dsl.Filter:
            return bool(view.criteria(request)) and sees(view._source, request) is True
        if type(view) is dsl.Priority:
            return sees(view._source, request)
        return None

    contains = dsl.View.__contains__

    def fast_contains(self: Any, item: Any) -> bool:
        found = sees(self, item) if isinstance(item, rendering.Request) else None
        return contains(self, item) if found is None else found

    dsl.View.__contains__ = fast_contains  # type: ignore[method-assign]
    emulator = kmock.KubernetesEmulator
    scan = emulator._KubernetesEmulator__get_objs  # type: ignore[attr-defined]

    def get_objs(self: Any, request: Any, strict: bool) -> list[Any]:
        if request.resource is not None and request.name is not None and (strict or request.namespace is not None):
            obj = self._objects._objects.get((request.resource, request.namespace, request.name))
            return [obj] if obj is not None else []
        return list(scan(self, request, strict))

    emulator._KubernetesEmulator__get_objs = get_objs  # type: ignore[attr-defined]
    emulator._get_resources = lambda self: list(self._resources)  # type: ignore[method-assign]  # all declared


def instant_jobs(
    cluster: Cluster,
    root: Path,
    stop: threading.Event,
    created: queue.Queue[str],
    done_at: dict[str, tuple[str, float]],
) -> None:
    while not stop.is_set():
        try:
            name = created.get(timeout=0.1)
        except queue.Empty:
            continue
        run, kind = name.split("-r1-")[0], "merge" if name.endswith("-merge") else "shard"
        if kind == "merge":
            report = rec.RoundReport(round=1, shards=20, generated=2000, new_unique=1500, new_qc_passed=1200,
                                     generated_total=2000, unique_total=1500, qc_passed_total=1200)  # fmt: skip
            LocalStorage(root / run).write_bytes(rec.round_report_key(1), rec.to_json(report).encode())
        cluster.patch(JOBS.format(ns=NS) + f"/{name}/status",
                      {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})  # fmt: skip
        done_at[name] = (run, time.monotonic())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--profile", help="write a cProfile of the operator process here (for finding where time goes)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="genrun-bench-op-"))
    done_at: dict[str, tuple[str, float]] = {}
    stop = threading.Event()
    created: queue.Queue[str] = queue.Queue()
    index_kmock_objects()

    def on_request(method: str, path: str, body: Any) -> None:  # the emulator's hook: see, never refuse
        if method == "POST" and path == JOBS.format(ns=NS) and isinstance(body, dict):
            created.put(body["metadata"]["name"])

    with Cluster() as cluster:
        cluster.emulator.reject = on_request
        cluster.create(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            yaml.safe_load((ROOT / "crds" / "generationrun.yaml").read_text()),
        )
        cluster.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        extra = {k: v for k, v in os.environ.items() if k == "GENRUN_START_CONCURRENCY"}
        op = OperatorProcess(cluster, NS, GENRUN_TIMER_SECONDS="60", GENRUN_LOG_LEVEL="WARNING", **extra)
        if args.profile:  # the same entry point under cProfile (written when the operator stops on SIGTERM)
            cmd = [sys.executable, "-P", "-m", "cProfile", "-o", args.profile, "-m", "genrun.operator.cli", "operator"]
            op.proc = subprocess.Popen(cmd, env=op.env, stdout=open(op.log_path, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        else:
            op.start()
        atexit.register(op.stop)  # a failed bench leaves no operator behind
        runner = threading.Thread(target=instant_jobs, args=(cluster, root, stop, created, done_at), daemon=True)
        runner.start()
        time.sleep(3)
        start_log = len(_Emulator.log)
        t0 = time.monotonic()
        for i in range(args.runs):
            # pilotShare 0: round 1 is shards.initial shards (no bandit pilot round), so each run is 20 shards + a merge.
            spec = {"model": {"name": "m"}, "target": {"uniqueExamples": 1000}, "output": {"path": str(root / f"run{i}")},
                    "shards": {"initial": args.shards, "examplesPerShard": 100}, "worker": {"gpus": 0},
                    "policy": {"pilotShare": 0}}  # fmt: skip
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

        wait_for(all_done, 3000, "all runs Succeeded", every=2)
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
    shards = sum(1 for name in done_at if not name.endswith("-merge"))  # shard Jobs the operator really started
    if shards != args.runs * args.shards:
        print(f"warning: {shards} shard Jobs ran, not {args.runs} x {args.shards}", flush=True)
    # Reaction: a Job's completion -> the operator's next status patch of that run.
    patches: dict[str, list[float]] = {}
    for t, method, path, _, _ua in operator_requests:
        if method == "PATCH" and path.endswith("/status") and "/generationruns/" in path:
            patches.setdefault(path.split("/generationruns/")[1].split("/")[0], []).append(t)
    reactions, by_kind = [], {"shard": [], "merge": []}
    for name, (run, t_done) in done_at.items():
        later = [t for t in patches.get(run, []) if t >= t_done]
        if later:
            reactions.append(min(later) - t_done)
            by_kind["merge" if name.endswith("-merge") else "shard"].append((t_done - t0, min(later) - t_done))
    r = np.array(reactions)
    for kind, xs in by_kind.items():  # where the tail is: which Jobs, and when in the batch they finished
        if xs:
            worst = sorted(xs, key=lambda x: -x[1])[: max(1, len(xs) // 100)]
            print(f"{kind} Jobs: reaction p50 {np.percentile([x[1] for x in xs], 50):.3f} s, p99 "
                  f"{np.percentile([x[1] for x in xs], 99):.3f} s; slowest 1% finished at "
                  f"{min(w[0] for w in worst):.1f}-{max(w[0] for w in worst):.1f} s into the batch", flush=True)  # fmt: skip
    kinds = Counter(
        f"{m} {p.split('/namespaces/')[-1].split('/')[1] if '/namespaces/' in p else p}"
        for _, m, p, *_ in operator_requests
    )
    print("requests by kind:", dict(kinds.most_common()), flush=True)
    print(f"{args.runs} runs x {args.shards} shards in {elapsed:.1f}s; {len(operator_requests)} operator requests; "
          f"{len(reactions)} reactions measured", flush=True)  # fmt: skip
    print(
        f"RESULT runs={args.runs} shards={shards} api_requests_per_shard={len(operator_requests) / shards:.2f} "
        f"reaction_p50_s={np.percentile(r, 50):.3f} reaction_p99_s={np.percentile(r, 99):.3f} operator_rss_mb={rss:.0f} "
        f"wall_s={elapsed:.1f}"
    )


if __name__ == "__main__":
    main()
