"""The merge host (`genrun worker serve-merges`): the local runner's merges, run one after another in one warm process,
write the same bytes as a merge Job's own process, answer each job with that process's exit code, and go on after a
bad one. Real processes; the shards come from the replay engine (recorded real SmolLM2 outputs) and the semantic tier
runs the real embedding model."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import yaml
from genrun.contract import errors
from genrun.contract import records as rec
from genrun.contract.api import RunRef
from genrun.operator.planner import CreateMergeJob, job_spec
from genrun.worker import cli

from tests.unit.test_serve import ROOT, WORKER, _shard_jobs, _wait

MERGED = ("dataset", "merge", "rejected")


def _outputs(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes() for d in MERGED for p in sorted((out / d).rglob("*")) if p.is_file()
    }


def test_the_merge_host_writes_what_a_merge_process_writes_and_survives_a_bad_job(tmp_path: Path) -> None:
    out, queue, logs = tmp_path / "out", tmp_path / "merges", tmp_path / "logs"
    queue.mkdir()
    logs.mkdir()
    shards = _shard_jobs(out)[:2]
    for name, spec in shards:
        (tmp_path / f"{name}.json").write_text(spec)
        assert (
            cli.main(["generate", "--job", str(tmp_path / f"{name}.json"), "--engine", "replay"], own_process=False)
            == 0
        )
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["output"] = {**raw.get("output", {}), "path": str(out)}
    seeds = tuple((1, rec.job_spec_from(json.loads(s)).shard.seed) for _, s in shards)  # type: ignore[union-attr]
    merge = rec.to_json(job_spec(CreateMergeJob("quickstart-r1-merge", 1, 1, seeds), RunRef("quickstart"), raw))
    warm = tmp_path / "run-spec.json"
    warm.write_text(json.dumps({"spec": raw}))

    (queue / "broken.json").write_text('{"kind": "merge", "run"')  # a damaged job file, queued first
    (queue / "quickstart-r1-merge.json").write_text(merge)
    cmd = [*WORKER, "serve-merges", "--queue", str(queue), "--logs", str(logs), "--warm", str(warm)]
    host = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait([queue / "broken.exit", queue / "quickstart-r1-merge.exit"], host, timeout=300)
        assert host.poll() is None  # still serving after a bad job
    finally:
        host.send_signal(signal.SIGTERM)
        host.wait(30)
    assert (queue / "broken.exit").read_text() == str(errors.EXIT_USAGE)
    assert "not a valid job spec" in (logs / "broken.log").read_text()
    assert (queue / "quickstart-r1-merge.exit").read_text() == str(errors.EXIT_OK)
    assert '"round": 1' in (logs / "quickstart-r1-merge.log").read_text()  # the result line, as the process prints
    by_host = _outputs(out)
    assert any(k.startswith("dataset/data/") for k in by_host)

    for d in MERGED:
        shutil.rmtree(out / d)
    (tmp_path / "merge.json").write_text(merge)
    alone = subprocess.run([*WORKER, "merge", "--job", str(tmp_path / "merge.json")], capture_output=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert _outputs(out) == by_host
