"""Damage trials (issue 25): every kind of file under a run's output truncated, then the same `genrun run` again. No
traceback, no stuck run; the damaged file is set aside under quarantine/ and named in the status; the dataset loads
and its rows are the undamaged run's. Real processes and files; the replay engine (recorded real SmolLM2 outputs)
stands in for the model.

One undamaged reference run (module-scoped) is copied for each trial, in three states: finished; killed after round
3's merge (what kill -9 between rounds leaves, made by removing what rounds 4+ wrote); killed before round 3's merge
(its shards done, nothing of its merge written). The kill -9 mid-round itself is in test_local_run.py."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.test_local_run import run, small_manifest

pytestmark = pytest.mark.integration
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # `datasets` reads a local folder; nothing may reach the network

# kind -> the file of round R ({r}: the round, {s}: its first shard's seed) or of the run
KINDS = {
    "plan": "rounds/r{r:04d}/plan.json",
    "marker": "shards/r{r:04d}/s{s:010d}.done.json",
    "shard-data": "shards/r{r:04d}/s{s:010d}.parquet",
    "shard-rejected": "shards/r{r:04d}/s{s:010d}.rejected.parquet",
    "report": "merge/r{r:04d}/report.json",
    "report-md": "merge/r{r:04d}/report.md",
    "dataset-part": "dataset/data/train-r{r:04d}.parquet",
    "messages-part": "dataset/messages/train-r{r:04d}.parquet",
    "rejected-part": "rejected/r{r:04d}.parquet",
    "seen-index": "merge/r{r:04d}/seen-index.npz",
    "merge-state": "merge/r{r:04d}/state.npz",
    "merge-totals": "merge/r{r:04d}/state.json",
    "kept": "merge/r{r:04d}/kept.parquet",
    "alpaca": "merge/r{r:04d}/alpaca.jsonl",
    "sharegpt": "merge/r{r:04d}/sharegpt.jsonl",
    "messages-jsonl": "merge/r{r:04d}/messages.jsonl",
    "card": "dataset/README.md",
    "status": "status.json",
    "run-spec": "_genrun/run-spec.json",  # the merge host's spec, read to load the merges' model ahead
}
# Files nothing reads again once their round is merged (the shard's rows are in the dataset) or that the runner
# writes again before it reads them: truncated, they change nothing and are not reported.
UNREAD = {"shard-data", "shard-rejected", "run-spec"}
# After round 3's merge the next round reads its plan, report, seen-index (the generators) and merge state (the merge);
# before it, round 3's plan and shards. Every other kind is tried on the finished run.
CASES = (
    [("finished", k, 2) for k in KINDS]
    + [("merged3", k, 3) for k in ("report", "seen-index", "merge-state", "kept")]
    + [("unmerged3", k, 3) for k in ("plan", "marker", "shard-data", "shard-rejected")]
)
NAME = "damage"


def damage_manifest(tmp: Path) -> Path:
    """The small manifest with two shards a round and room for more rounds: its run takes 4, so that round 2 is a
    middle round and round 3 is not the last (the planner finishes the small manifest itself in 3)."""
    return small_manifest(tmp, NAME, escalation={"maxShardsPerRound": 2}, budget={"maxRounds": 8})


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("reference")
    manifest = damage_manifest(base)
    res = run(["run", str(manifest), "--engine", "replay", "--jobs", "2", "--quiet"])
    assert res.returncode == 0, res.stderr
    out = base / NAME
    assert len(list((out / "rounds").iterdir())) >= 4  # round 2 is a middle round, round 3 is not the last
    yield out


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    from genrun.operator.cli import main

    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def rows(out: Path) -> list[dict]:
    return pq.read_table(out / "dataset" / "data").to_pylist()


def copy_in_state(reference: Path, dest: Path, state: str) -> None:
    """The reference output as a run left it in `state` (every file of a later step removed)."""
    shutil.copytree(reference, dest)
    if state == "finished":
        return
    for path in sorted(dest.rglob("*"), reverse=True):
        rel = path.relative_to(dest).as_posix()
        if not path.is_file() or rel in ("status.json", "dataset/README.md") or rel.startswith("_genrun/"):
            continue
        rnd = _round(rel)
        merge_of_3 = rnd == 3 and not rel.startswith(("shards/", "rounds/"))
        if rnd >= 4 or (state == "unmerged3" and merge_of_3):
            path.unlink()
    if state == "unmerged3":  # round 2's card (the export of round 3 rewrote it): the reference's is of round 4
        (dest / "dataset" / "README.md").unlink()


def _round(rel: str) -> int:
    for part in rel.replace("-", "/").replace(".", "/").split("/"):
        if len(part) >= 5 and part[0] == "r" and part[1:].isdigit():
            return int(part[1:])
    return 0


def truncate(path: Path) -> None:
    """Cut the file in half, mid-line for text (a cut right after a newline would leave whole lines)."""
    data = path.read_bytes()
    cut = len(data) // 2
    while cut > 0 and data[cut - 1 : cut] == b"\n":
        cut -= 1
    path.write_bytes(data[:cut])


@pytest.mark.parametrize(("state", "kind", "rnd"), CASES, ids=[f"{s}-{k}" for s, k, _ in CASES])
def test_a_truncated_file_is_set_aside_reported_and_rebuilt(
    tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture[str], state: str, kind: str, rnd: int
) -> None:
    out = tmp_path / NAME
    copy_in_state(reference, out, state)
    seed = min(int(p.name[1:11]) for p in (out / "shards" / f"r{rnd:04d}").glob("*.done.json"))
    key = KINDS[kind].format(r=rnd, s=seed)
    assert (out / key).exists(), key
    truncate(out / key)

    manifest = damage_manifest(tmp_path)
    res = run(["run", str(manifest), "--engine", "replay", "--jobs", "2"])
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert rows(out) == rows(reference)
    st = cli(capsys, "status", str(out))  # in this process (a traceback would fail the test): no start-up each
    assert "Succeeded    True" in st
    assert f"# genrun report: {NAME}, round 4" in cli(capsys, "report", str(out))

    status = json.loads((out / "status.json").read_text())["status"]
    want = json.loads((reference / "status.json").read_text())["status"]
    assert status["round"] == want["round"] and status["totals"]["qcPassed"] == want["totals"]["qcPassed"]
    damaged = next((c for c in status["conditions"] if c["type"] == "Damaged"), None)
    if kind in UNREAD and state != "unmerged3":
        assert damaged is None and not (out / "quarantine" / f"{key}.json").exists()
        return
    # Set aside with the fault recorded, named in the status (condition and `genrun status`), and rebuilt.
    record = json.loads((out / "quarantine" / f"{key}.json").read_text())
    assert record["key"] == key and record["error"]
    assert damaged is not None and damaged["status"] == "True" and key in damaged["message"], damaged
    assert f"damaged ({damaged['reason']}): " in st and key in st
    assert (out / key).exists()
    if kind == "plan":  # decided again: the very plan the undamaged run recorded
        assert (out / key).read_bytes() == (reference / key).read_bytes()
    if kind in ("card", "dataset-part"):
        from datasets import load_dataset

        ds = load_dataset(str(out / "dataset"), split="train", cache_dir=str(tmp_path / "hf"))
        assert ds.to_list() == rows(reference)


def test_a_round_merged_again_gives_the_same_bytes(tmp_path: Path, reference: Path) -> None:
    """The repair of a damaged report, dataset part or merge output is the round's merge again: it must write the same
    bytes. Round 2 of a finished run merged again twice; files that do not name their output's location (the parts'
    metadata and the reports do) are also the reference's own bytes."""
    out = tmp_path / NAME
    copy_in_state(reference, out, "finished")
    manifest = damage_manifest(tmp_path)

    def merged_again() -> dict[str, bytes]:
        truncate(out / "merge" / "r0002" / "report.json")
        res = run(["run", str(manifest), "--engine", "replay", "--quiet"])
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
        return {
            p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*"))
            if p.is_file() and not p.relative_to(out).as_posix().startswith(("quarantine/", "_genrun/", "status.json"))
        }

    first = merged_again()
    assert merged_again() == first
    assert len([k for k in first if _round(k) == 2]) >= 10  # every output of the round's merge is there
    location = str(reference).encode()
    same = [k for k in first if location not in (reference / k).read_bytes()]
    assert {k: first[k] for k in same} == {k: (reference / k).read_bytes() for k in same}
    assert {"merge/r0002/seen-index.npz", "merge/r0002/state.npz", "rejected/r0002.parquet"} <= set(same)
    # The dataset card, written by round 2's merge again, is the finished run's (all 4 rounds), not round 2's.
    card = (reference / "dataset" / "README.md").read_bytes().replace(location, str(out).encode())
    assert _unfingerprinted(first["dataset/README.md"]) == _unfingerprinted(card)


def _unfingerprinted(card: bytes) -> bytes:
    """The card without its content fingerprint (a hash of the reports, which name their output's location)."""
    import re

    return re.sub(rb"content [0-9a-f]{16}", b"content -", card)


@pytest.mark.parametrize("kind", ["plan", "report", "report-md", "dataset-part", "card", "marker"])
def test_the_readers_never_fail_on_a_damaged_output_before_it_is_repaired(
    tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """`genrun status` and `genrun report` (text, --json, --html) read only: on a damaged output they still answer,
    saying what is damaged where they read it, and leave the repair to the run's loop."""
    out = tmp_path / NAME
    copy_in_state(reference, out, "finished")
    seed = min(int(p.name[1:11]) for p in (out / "shards" / "r0004").glob("*.done.json"))
    truncate(out / KINDS[kind].format(r=4, s=seed))
    assert "Succeeded    True" in cli(capsys, "status", str(out))
    text = cli(capsys, "report", str(out))
    assert "# genrun report: damage, round" in text or kind == "report-md"
    from genrun.operator.cli import main

    assert main(["report", str(out), "--json", "--html", str(tmp_path / "r.html")]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["round"] == (3 if kind == "report" else 4)  # the latest readable report
    assert (tmp_path / "r.html").read_text().count("<svg") >= 1


def test_kill9_while_a_damaged_round_is_merged_again_then_rerun_finishes_it(tmp_path: Path, reference: Path) -> None:
    """kill -9 of the runner (its workers die with it) in the middle of a repair: the same command again finishes the
    repair from what is on storage, and the dataset is the undamaged run's."""
    import signal
    import subprocess

    from tests.integration.harness import wait_for
    from tests.integration.test_local_run import GENRUN

    out = tmp_path / NAME
    copy_in_state(reference, out, "finished")
    truncate(out / "dataset" / "data" / "train-r0002.parquet")
    manifest = damage_manifest(tmp_path)
    proc = subprocess.Popen([*GENRUN, "run", str(manifest), "--engine", "replay", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    record = out / "quarantine" / "dataset" / "data" / "train-r0002.parquet.json"
    wait_for(record.exists, 120, "the damaged part to be set aside")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    res = run(["run", str(manifest), "--engine", "replay"])
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert rows(out) == rows(reference)
    assert (out / "merge" / "r0002" / "report.json").exists()
