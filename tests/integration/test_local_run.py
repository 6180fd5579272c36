"""`genrun run` on one machine: real processes and files; the replay engine (recorded real SmolLM2 outputs) stands in
for the model here, and tests/e2e runs the real model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.integration.harness import wait_for

ROOT = Path(__file__).resolve().parents[2]
GENRUN = [sys.executable, "-P", "-m", "genrun.operator.cli"]


def small_manifest(tmp: Path, name: str = "local", **spec_over: dict) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["shards"].update(examplesPerShard=25)
    doc["spec"]["target"]["uniqueExamples"] = 60
    doc["spec"]["output"]["path"] = str(tmp / name)
    # These tests are about the runner (restarts, signals, resumes); the embedding model's load in every merge is
    # not, so the semantic tier is off here. test_accounting runs the quickstart as shipped, tier on.
    doc["spec"]["dedup"] = {**doc["spec"].get("dedup", {}), "semantic": {"enabled": False}}
    for k, v in spec_over.items():
        doc["spec"].setdefault(k, {}).update(v)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run(args: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GENRUN, *args], capture_output=True, text=True, timeout=600, **kw)


def dataset(out: Path) -> list[dict]:
    status = json.loads((out / "status.json").read_text())
    return pq.read_table(status["status"]["output"]["dataset"]).to_pylist()


def test_run_to_target_then_status_report_and_html(tmp_path: Path) -> None:
    res = run(["run", str(small_manifest(tmp_path)), "--engine", "replay", "--jobs", "2"])
    assert res.returncode == 0, res.stderr
    out = tmp_path / "local"
    st = json.loads((out / "status.json").read_text())["status"]
    assert st["round"] >= 2 and st["totals"]["qcPassed"] >= 60
    assert len(dataset(out)) == st["totals"]["qcPassed"]
    assert "# genrun report: local" in res.stdout and "Succeeded (TargetMet)" in res.stderr
    assert "round 2 [" in res.stderr  # live progress per round
    s = run(["status", str(out)])
    assert s.returncode == 0 and "Succeeded    True" in s.stdout
    html = tmp_path / "report.html"
    r = run(["report", str(out), "--html", str(html)])
    assert r.returncode == 0 and "## Top duplicates" in r.stdout
    page = html.read_text()
    assert page.count("<svg") == 6 and "Duplication rate per round" in page and "<script" not in page
    # A second run of a finished output regenerates nothing.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = run(["run", str(small_manifest(tmp_path)), "--engine", "replay"])
    assert again.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == mtimes


def test_kill9_mid_round_then_rerun_gives_the_uninterrupted_dataset(tmp_path: Path) -> None:
    ref = run(["run", str(small_manifest(tmp_path, "reference")), "--engine", "replay"])
    assert ref.returncode == 0, ref.stderr

    manifest = small_manifest(tmp_path, "killed")
    out = tmp_path / "killed"
    proc = subprocess.Popen([*GENRUN, "run", str(manifest), "--engine", "replay", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # Kill it while round 2's shards are being generated (its plan exists, its report does not).
    wait_for(lambda: (out / "rounds" / "r0002" / "plan.json").exists(), 120, "round 2 to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not (out / "merge" / "r0002" / "report.json").exists()
    time.sleep(0.5)
    assert not [p for p in out.rglob("*.parquet") if p.stat().st_size == 0]
    res = run(["run", str(manifest), "--engine", "replay"])
    assert res.returncode == 0, res.stderr
    assert dataset(out) == dataset(tmp_path / "reference")


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["foreground", "background-job"])
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path: Path, inherited: signal.Handlers) -> None:
    """Whatever SIGINT disposition genrun inherits: a terminal's foreground job has the default; a background job of a
    non-interactive shell (`genrun run ... &`, and this suite under `bash scripts/test.sh &`) starts with it ignored,
    and the runner installs the handling it relies on."""
    manifest = small_manifest(tmp_path, "interrupted", shards={"examplesPerShard": 200})
    proc = subprocess.Popen([*GENRUN, "run", str(manifest), "--engine", "replay"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, inherited))  # fmt: skip
    out = tmp_path / "interrupted"
    wait_for(lambda: (out / "rounds" / "r0001" / "plan.json").exists(), 60, "round 1")
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends to the foreground group on Ctrl-C
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Run the same command again to resume" in err and "Traceback" not in err
    assert not list((out / "_genrun" / "jobs").glob("*.failed.json"))  # an interrupt is not a failed attempt


def test_a_worker_the_same_ctrl_c_ended_is_never_a_failed_attempt(tmp_path: Path) -> None:
    """The race behind a flaky Ctrl-C: a worker still importing `site` dies of the SIGINT with exit code 1 ("Fatal
    Python error: init_import_site"), and the runner may reap it before asyncio's handler cancels the loop. The
    runner marks itself stopping in the signal handler, so that reap records nothing. Real child process, real
    SIGINT to this (main-thread) test process."""
    # This test's own Ctrl-C is the point: set Python's handler, whatever the suite inherited (a background job starts
    # with SIGINT ignored), and give the original back at the end.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _a_worker_the_same_ctrl_c_ended(tmp_path)
    finally:
        signal.signal(signal.SIGINT, inherited)


def _a_worker_the_same_ctrl_c_ended(tmp_path: Path) -> None:
    import io

    from genrun.contract.api import RunRef
    from genrun.operator.local import LocalRunner, _Proc
    from genrun.operator.planner import ObservedJob
    from genrun.worker.storage import LocalStorage

    spec = yaml.safe_load(small_manifest(tmp_path).read_text())["spec"]
    runner = LocalRunner(RunRef("r"), spec, LocalStorage(tmp_path / "out"), tmp_path / "state", out=io.StringIO())
    (tmp_path / "state" / "jobs").mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "import os, signal, sys, time; "
                              "signal.signal(signal.SIGINT, lambda *_: os._exit(1)); print(flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE)  # fmt: skip
    assert child.stdout is not None and child.stdout.readline()  # its handler is in place
    log = (tmp_path / "w.log").open("w")
    runner.procs["r-r1-s100"] = _Proc(ObservedJob("r-r1-s100", "shard", 1, 100, 1, "Running"), child, log)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), runner._stopping_on_interrupt():
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) == 1
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C reaching the runner
        time.sleep(5)  # never reached: the handler raises at the next bytecode
    assert runner.reap() and not runner.finished and not list((tmp_path / "state" / "jobs").glob("*.failed.json"))
    assert signal.getsignal(signal.SIGINT) is before
    child.stdout.close()


# Each `genrun run` process costs over a second; tests/unit/test_validate.py runs every invalid example through the
# same path in-process. Here, a spread sample of them end to end, as a user's shell would.
INVALID_SAMPLE = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))[::12]


@pytest.mark.parametrize("bad", INVALID_SAMPLE, ids=lambda p: p.stem)
def test_bad_manifest_names_the_field_and_touches_no_output(tmp_path: Path, bad: Path) -> None:
    expected = bad.read_text().splitlines()[0].removeprefix("# expect: ")
    outputs = [Path("/data/out"), tmp_path / "My_Bucket"]
    before = {p: p.exists() for p in outputs}
    res = run(["run", str(bad), "--engine", "replay"], cwd=tmp_path)
    assert res.returncode == 2
    assert expected in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == [] and {p: p.exists() for p in outputs} == before


def test_runner_storage_is_where_workers_write(tmp_path: Path) -> None:
    """The runner's storage, not a path left in the spec, is where every worker writes."""
    import io

    from genrun.contract.api import RunRef
    from genrun.operator.local import LocalRunner
    from genrun.worker.storage import LocalStorage

    spec = yaml.safe_load(small_manifest(tmp_path, "elsewhere").read_text())["spec"]
    spec["output"]["path"] = str(tmp_path / "stale")
    storage = LocalStorage(tmp_path / "real")
    plan = LocalRunner(RunRef("r"), spec, storage, tmp_path / "state", engine="replay", out=io.StringIO()).run()
    assert plan.condition("Succeeded").status == "True"
    assert (tmp_path / "real" / "status.json").exists() and not (tmp_path / "stale").exists()


def test_damaged_shard_markers_are_set_aside_counted_and_the_shard_runs_again(tmp_path: Path) -> None:
    """A truncated, empty or incomplete `*.done.json`: never a traceback in `genrun run`/`report`/`status`; it is
    quarantined (recorded under quarantine/), counted in status.totals.shardsQuarantined, named in the status's Damaged
    condition, and the shard generated again (before its round's merge, or after it: a later full re-merge reads every
    shard). Every other kind of file under the output: tests/integration/test_damage.py."""
    done = run(["run", str(small_manifest(tmp_path, "whole", target={"uniqueExamples": 20})), "--engine", "replay"])
    assert done.returncode == 0, done.stderr
    whole = tmp_path / "whole"
    marker = whole / "shards" / "r0001" / "s0000000100.done.json"
    good = marker.read_text()

    # Round 1 planned, shard 100's marker truncated, nothing merged yet: the shard is generated again.
    fresh = tmp_path / "fresh"
    (fresh / "rounds" / "r0001").mkdir(parents=True)
    (fresh / "rounds" / "r0001" / "plan.json").write_text((whole / "rounds" / "r0001" / "plan.json").read_text())
    (fresh / "shards" / "r0001").mkdir(parents=True)
    (fresh / "shards" / "r0001" / marker.name).write_text(good[: len(good) // 2])
    res = run(["run", str(small_manifest(tmp_path, "fresh", target={"uniqueExamples": 20})), "--engine", "replay"])
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "set aside under quarantine/, the shard runs again" in res.stderr
    assert json.loads((fresh / "shards" / "r0001" / marker.name).read_text())["seed"] == 100  # regenerated
    record = json.loads((fresh / "quarantine" / "shards" / "r0001" / f"{marker.name}.json").read_text())
    assert record["key"] == f"shards/r0001/{marker.name}" and "JSONDecodeError" in record["error"]
    assert json.loads((fresh / "status.json").read_text())["status"]["totals"]["shardsQuarantined"] == 1

    # A finished run whose markers are damaged afterwards: report, status and a rerun read it without a crash.
    other = whole / "shards" / "r0001" / "s0000000101.done.json"
    for damaged in ("", '{"round": 1, "seed": 100}'):  # empty; incomplete (fields missing)
        marker.write_text(damaged)
        other.write_text(good.replace('"seed": 100', '"seed": 7'))  # not its shard's
        rep = run(["report", str(whole)])
        assert rep.returncode == 0 and "Traceback" not in rep.stderr and "# genrun report: whole" in rep.stdout
        again = run(
            ["run", str(small_manifest(tmp_path, "whole", target={"uniqueExamples": 20})), "--engine", "replay"]
        )
        assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
        # Set aside, then generated again although their round is merged (a later full re-merge reads every shard).
        assert [json.loads(p.read_text())["seed"] for p in (marker, other)] == [100, 101]
        st = run(["status", str(whole)])
        assert st.returncode == 0 and "2 quarantined" in st.stdout, st.stdout
        assert "damaged (ShardMarkerDamaged): " in st.stdout and "s0000000101.done.json" in st.stdout


def test_the_merge_host_runs_nicer_than_the_runner_and_the_engine_host(tmp_path: Path) -> None:
    """Its start-up overlaps round 1's generation on the same CPUs; at a lower priority it takes only what the engine
    leaves. Real processes (the replay engine), the priorities the kernel reports for them."""
    import asyncio
    import io

    from genrun.contract.api import RunRef
    from genrun.contract.records import Sampling, ShardPlan
    from genrun.operator.local import LocalRunner
    from genrun.operator.planner import CreateMergeJob, CreateShardJob
    from genrun.worker.storage import LocalStorage

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    if mine >= 19:
        pytest.skip("this test runs at the lowest priority already: nothing can be nicer")
    spec = yaml.safe_load(small_manifest(tmp_path).read_text())["spec"]
    runner = LocalRunner(RunRef("r"), spec, LocalStorage(tmp_path / "out"), tmp_path / "state", engine="replay",
                         out=io.StringIO())  # fmt: skip
    shard = ShardPlan(1, 100, 0, 2, Sampling(0.7, 0.9, 1.1, 0.0, 64))
    try:
        asyncio.run(runner.start(CreateShardJob("r-r1-s100", 1, shard)))
        asyncio.run(runner.start(CreateMergeJob("r-r1-merge", 1, 1, ((1, 100),))))
        assert runner.host is not None and runner.merger is not None
        assert os.getpriority(os.PRIO_PROCESS, runner.host.popen.pid) == mine
        assert os.getpriority(os.PRIO_PROCESS, runner.merger.popen.pid) > mine
    finally:
        runner.stop()
