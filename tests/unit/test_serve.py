"""The engine host (`genrun worker serve`): one engine for many seed shards, each shard published as its own process
would publish it, and its device time recorded as one engine session. Run as real processes on the replay engine
(recorded real SmolLM2 outputs): the vLLM engine is the slow tests' and bench/floor.py's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml
from genrun.contract import errors
from genrun.contract import records as rec
from genrun.contract.api import RunRef, parse_spec
from genrun.operator.planner import CreateShardJob, Observed, decide, job_spec

ROOT = Path(__file__).resolve().parents[2]
WORKER = [sys.executable, "-P", "-m", "genrun.operator.cli", "worker"]


def _shard_jobs(out: Path, **model: Any) -> list[tuple[str, str]]:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["output"] = {**raw.get("output", {}), "path": str(out)}
    raw["model"] = {**raw["model"], **model}
    ref = RunRef("default", "quickstart", 1)
    plan = decide(ref, parse_spec(raw), Observed())
    shards = [a for a in plan.actions if isinstance(a, CreateShardJob)]
    assert len(shards) >= 2  # the pilot: one probe shard per arm
    return [(a.name, rec.to_json(job_spec(a, ref, raw))) for a in shards]


def _wait(paths: list[Path], proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, f"the host ended early with {proc.returncode}"
        assert time.monotonic() < end, "the host did not answer in time"
        time.sleep(0.1)


def _host(queue: Path, logs: Path) -> subprocess.Popen[bytes]:
    logs.mkdir(exist_ok=True)
    cmd = [*WORKER, "serve", "--queue", str(queue), "--engine", "replay", "--logs", str(logs)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_one_host_serves_every_queued_shard_with_one_engine_and_records_its_device_time(tmp_path: Path) -> None:
    out, queue = tmp_path / "out", tmp_path / "queue"
    queue.mkdir()
    jobs = _shard_jobs(out)
    for name, spec in jobs[:2]:
        (queue / f"{name}.json").write_text(spec)
    host = _host(queue, tmp_path / "logs")
    try:
        _wait([queue / f"{name}.exit" for name, _ in jobs[:2]], host)
        # A job queued while the host runs is served by the same engine.
        name, spec = jobs[2]
        (queue / f"{name}.json").write_text(spec)
        _wait([queue / f"{name}.exit"], host)
    finally:
        host.send_signal(signal.SIGTERM)
        host.wait(30)
    assert [(queue / f"{n}.exit").read_text() for n, _ in jobs[:3]] == [str(errors.EXIT_OK)] * 3
    sessions = [json.loads(p.read_text()) for p in (out / "engines").glob("*.json")]
    assert len(sessions) == 1  # one engine start for three shards
    s = sessions[0]
    assert s["shards"] == 3 and s["stopped"] is True and s["started"] < s["ready"] <= s["last"]
    markers = [
        rec.shard_manifest_from(json.loads(p.read_text())) for p in sorted((out / "shards").rglob("*.done.json"))
    ]
    assert len(markers) == 3 and s["tokens"] == sum(m.tokens for m in markers)
    assert all((tmp_path / "logs" / f"{n}.log").read_text() for n, _ in jobs[:3])  # each shard logs to its own file

    # Each shard holds the rows its own process would have generated: sampling seeds are per request, not per engine.
    alone = tmp_path / "alone"
    for name, spec in jobs[:3]:
        job_file = tmp_path / f"{name}.job.json"
        job_file.write_text(spec)
        cmd = [*WORKER, "generate", "--job", str(job_file), "--engine", "replay", "--output", str(alone)]
        subprocess.run(cmd, check=True, capture_output=True)
    for m in markers:
        key = rec.shard_data_key(m.round, m.seed)
        assert pq.read_table(out / key).to_pylist() == pq.read_table(alone / key).to_pylist()


def test_a_job_for_another_model_ends_the_host_for_a_new_one(tmp_path: Path) -> None:
    out, queue = tmp_path / "out", tmp_path / "queue"
    queue.mkdir()
    (name, spec), *_ = _shard_jobs(out)
    (other, other_spec), *_ = _shard_jobs(out, name="another/model")
    (queue / f"{name}.json").write_text(spec)
    (queue / f"{other.replace('-r1-', '-r9-')}.json").write_text(other_spec)  # sorts after the first
    host = _host(queue, tmp_path / "logs")
    assert host.wait(120) == errors.EXIT_RESTART
    assert (queue / f"{name}.exit").read_text() == str(errors.EXIT_OK)
    assert not list(queue.glob("*-r9-*.exit"))  # not started: the next host serves it
    (session,) = [json.loads(p.read_text()) for p in (out / "engines").glob("*.json")]
    assert session["stopped"] is True and session["shards"] == 1


def test_a_host_whose_queue_is_empty_exits_at_once(tmp_path: Path) -> None:
    (tmp_path / "queue").mkdir()
    host = _host(tmp_path / "queue", tmp_path / "logs")
    assert host.wait(60) == errors.EXIT_OK
    assert not os.listdir(tmp_path / "queue")
