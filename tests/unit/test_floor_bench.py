"""bench/floor.py: genrun run against one engine started once. End to end on the replay engine (recorded real samples,
no model: the script's plumbing, not a figure), and its accounting of engine starts on hand-made output folders."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULT = re.compile(
    r"^RESULT genrun_s=(\d+\.\d) floor_s=(\d+\.\d) ratio=(\d+\.\d{3}) engine_starts=(\d+) startup_share=(\d\.\d{4})$"
)


def _floor():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "bench"))
    import floor

    return floor


def _status(out: Path, **totals: object) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "status.json").write_text(json.dumps({"status": {"totals": {"tokens": 100, **totals}}}))


def test_engine_starts_come_from_the_status_when_the_run_records_them(tmp_path: Path) -> None:
    fl = _floor()
    _status(tmp_path, engineStarts=1, startupSeconds=20.5, startupShare=0.071)
    (tmp_path / "engines").mkdir()  # ignored: the status already sums them
    (tmp_path / "engines" / "a.json").write_text(json.dumps({"name": "a", "started": 0.0, "ready": 5.0}))
    assert fl.engine_use(tmp_path, 300.0) == fl.EngineUse(1, 20.5, 0.071, "status.totals")


def test_engine_starts_from_engine_session_records(tmp_path: Path) -> None:
    """Two sessions: one of 2 devices ready after 10 s and held to 110 s, one that died before it was ready (started
    at 200, last seen at 204): start-up 2 x 10 + 4, held 2 x 110 + 4."""
    fl = _floor()
    _status(tmp_path)
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "a.json").write_text(
        json.dumps({"name": "a", "started": 100.0, "ready": 110.0, "last": 210.0, "devices": 2})
    )
    (tmp_path / "engines" / "b.json").write_text(json.dumps({"name": "b", "started": 200.0, "ready": 0, "last": 204.0}))
    use = fl.engine_use(tmp_path, 999.0)
    assert (use.starts, use.startup_seconds, use.source) == (2, 24.0, "engines/*.json")
    assert abs(use.share - 24.0 / 224.0) < 1e-12


def test_without_records_every_shard_process_that_generated_is_one_engine_start(tmp_path: Path) -> None:
    """The runner of one process per shard: each shard log with a "done" line loaded an engine; a shard already
    published exits before it. Start-up: job file written at 1000, marker at 1030, 12 s of generation -> 18 s."""
    fl = _floor()
    _status(tmp_path)
    logs, jobs = tmp_path / "_genrun" / "logs", tmp_path / "_genrun" / "jobs"
    logs.mkdir(parents=True)
    jobs.mkdir(parents=True)
    (logs / "qs-r1-s100.log").write_text(
        "... genrun.generate INFO shard r1 s100 done: 2 rows from 3 sampled in 12.0s\n"
    )
    (logs / "qs-r2-s104.log").write_text("... shard r2 s104 is already published; nothing to do\n")
    (logs / "qs-r1-merge.log").write_text('{"round": 1}\n')
    job = jobs / "qs-r1-s100.json"
    job.write_text("{}")
    marker = tmp_path / "shards" / "r0001" / "s0000000100.done.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"seconds": 12.0}))
    os.utime(job, (1000, 1000))
    os.utime(marker, (1030, 1030))
    use = fl.engine_use(tmp_path, 90.0)
    assert (use.starts, use.startup_seconds) == (1, 18.0)
    assert abs(use.share - 18.0 / 90.0) < 1e-12 and "logs" in use.source


def test_the_floor_is_start_up_plus_the_runs_tokens_at_the_measured_throughput() -> None:
    fl = _floor()
    # 6,400 tokens in 100 s (64/s): 9,600 tokens need 150 s, after 20 s of start-up
    assert fl.floor_seconds(20.0, 100.0, 6400, 9600) == 170.0
    line = fl.result_line(340.0, 170.0, fl.EngineUse(8, 160.0, 0.4706, "x"))
    assert line == "RESULT genrun_s=340.0 floor_s=170.0 ratio=2.000 engine_starts=8 startup_share=0.4706"


def _write(path: Path, obj: object, mtime: float | None = None) -> None:
    from genrun.contract import records as rec

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rec.to_json(obj))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_the_timeline_splits_genruns_wall_time_into_start_rounds_merges_and_exit(tmp_path: Path) -> None:
    """A hand-made run: spawned at 1000, its engine's process started at 1001 and ready at 1013; round 1's two shards
    ran 1014-1020 and 1013-1021 (markers at 1020 and 1021, 6 s and 8 s), merged at 1022; round 2's shard ran
    1023-1043 and its merge left no report (the span ends at its marker); the run ended at 1046. The floor starts in
    11 s and generates 100 tokens/s."""
    from genrun.contract import records as rec

    fl = _floor()
    s = rec.Sampling(0.7, 0.9, 1.1, 0.0, 128)
    _write(tmp_path / "engines" / "e.json", rec.EngineSession(name="e", started=1001.0, ready=1013.0))
    for rnd, seeds in ((1, (100, 101)), (2, (102,))):
        shards = tuple(rec.ShardPlan(rnd, seed, seed - 100, 3, s) for seed in seeds)
        _write(tmp_path / rec.round_plan_key(rnd), rec.RoundPlan(rnd, shards, s))
    for rnd, seed, end, seconds, tokens in (
        (1, 100, 1020, 6.0, 150),
        (1, 101, 1021, 8.0, 250),
        (2, 102, 1043, 20.0, 1500),
    ):
        marker = rec.ShardManifest(rnd, seed, 3, 3, 0, 0, 0, tokens, seconds, "d")
        _write(tmp_path / rec.shard_manifest_key(rnd, seed), marker, end)
    _write(tmp_path / rec.round_report_key(1), {"round": 1}, 1022)
    spans = fl.timeline(tmp_path, 1000.0, 46.0, 11.0, 100.0)
    got = [(x.kind, round(x.seconds, 6), round(x.over, 6)) for x in spans]
    assert got == [
        ("start", 1.0, 1.0),  # spawn to the engine's process
        ("start", 12.0, 1.0),  # its start-up, 1 s more than the floor's
        ("between", 0.0, 0.0),
        ("round", 8.0, 4.0),  # 1013-1021; 400 tokens at 100/s are 4 s
        ("between", 1.0, 1.0),  # round 1's merge
        ("between", 1.0, 1.0),  # merged at 1022, round 2 began at 1023
        ("round", 20.0, 5.0),  # 1,500 tokens: 15 s
        ("between", 0.0, 0.0),  # no report: the merge's time counts in the exit
        ("exit", 3.0, 3.0),
    ]
    assert "2 shard(s)" in spans[3].what and "400 tokens" in spans[3].what
    assert abs(sum(x.seconds for x in spans) - 46.0) < 1e-9  # the spans tile the wall time


def test_floor_bench_end_to_end_on_the_replay_engine(tmp_path: Path) -> None:
    """The quickstart with a small target, genrun and the floor both on the replay engine: the last line has the
    issue's format, its engine starts are the shard processes that generated, its ratio the one of its figures."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    res = subprocess.run(
        [sys.executable, "-P", str(ROOT / "bench" / "floor.py"), "--engine", "replay", "--target", "10",
         "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    m = RESULT.match(res.stdout.strip().splitlines()[-1])
    assert m, res.stdout
    genrun_s, floor_s, ratio, starts = float(m[1]), float(m[2]), float(m[3]), int(m[4])
    assert (genrun_s - 0.05) / (floor_s + 0.05) <= ratio <= (genrun_s + 0.05) / (floor_s - 0.05)  # printed to 0.1 s
    status = json.loads((out / "status.json").read_text())["status"]
    assert status["totals"]["qcPassed"] >= 10
    if not status["totals"].get("engineStarts"):  # a runner with one process per shard: one engine each
        done = [p for p in (out / "_genrun" / "logs").glob("*-r*-s*.log") if " done: " in p.read_text()]
        assert starts == len(done) >= 1
    else:
        assert starts == status["totals"]["engineStarts"]
    assert f"{status['totals']['tokens']:,} tokens" in res.stdout


def test_floor_bench_refuses_an_output_folder_that_exists(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-P", str(ROOT / "bench" / "floor.py"), "--engine", "replay", "--output", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"}, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert f"--output: {tmp_path} exists; give a new folder" in res.stderr
