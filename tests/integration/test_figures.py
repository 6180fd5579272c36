"""The figures a user reads after a real `genrun run` (local processes, real merges; the replay engine, recorded real
SmolLM2 outputs, stands in for the model): the status's round table is per round with the running total beside it,
lists the arms each round ran, and its arm totals add up to the run's; `report --json` has the status's casing; the
dataset card passes huggingface_hub's parsing and `datasets` loads the folder without a warning."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from tests.integration.test_local_run import run, small_manifest


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The run's output folder and its progress lines (stderr, not a terminal: one line per change)."""
    tmp = tmp_path_factory.mktemp("figures")
    res = run(["run", str(small_manifest(tmp, "figures", output={"license": "cc-by-4.0"})), "--engine", "replay",
               "--jobs", "2"])  # fmt: skip
    assert res.returncode == 0, res.stderr
    return tmp / "figures", res.stderr


@pytest.fixture(scope="module")
def finished(ran: tuple[Path, str]) -> Path:
    return ran[0]


def test_the_eta_is_unknown_until_the_pilot_is_merged_then_a_time(ran: tuple[Path, str]) -> None:
    lines = [x for x in ran[1].splitlines() if x.startswith("round ")]
    etas = [re.search(r"\| (\d\d:\d\d)<(\S+) \|", x) for x in lines]
    assert all(etas) and lines[0].startswith("round 1 ")
    pilot = [m.group(2) for x, m in zip(lines, etas, strict=True) if x.startswith("round 1 ") and m]
    later = [m.group(2) for x, m in zip(lines, etas, strict=True) if not x.startswith("round 1 ") and m]
    assert set(pilot) == {"unknown"}  # the pilot round: nothing projected yet
    assert later and all(re.fullmatch(r"(\d+:)?\d\d:\d\d", t) for t in later)
    assert later[-1] == "00:00"  # the target met: nothing left


def status_of(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())["status"]


def test_round_table_holds_each_rounds_own_figures_and_the_running_total(finished: Path) -> None:
    st = status_of(finished)
    rounds, totals = st["rounds"], st["totals"]
    assert len(rounds) >= 2
    assert sum(r["generated"] for r in rounds) == totals["generated"]
    running = 0
    for r in rounds:
        running += r["newQcPassed"]
        assert r["qcPassed"] == running  # the running total, in its own column
    assert running == totals["qcPassed"]
    plan = json.loads((finished / "rounds" / "r0001" / "plan.json").read_text())
    pilot_arms = list(dict.fromkeys(s["arm"] for s in plan["shards"]))
    assert rounds[0]["arms"] == pilot_arms and len(pilot_arms) > 1  # the pilot's arms, not its most used one alone
    shown = [line.split() for line in _genrun_status(finished).splitlines()]
    first = next(row for row in shown if row[:1] == ["1"])
    assert first[-len(pilot_arms) :] == pilot_arms and first[3:7] == [str(rounds[0][k]) for k in
                                                        ("generated", "newUnique", "newQcPassed", "qcPassed")]  # fmt: skip


def test_arm_totals_add_up_to_the_runs(finished: Path) -> None:
    st = status_of(finished)
    arms, totals = st["arms"], st["totals"]
    assert sum(a["kept"] for a in arms) == totals["qcPassed"]
    assert sum(a["examples"] for a in arms) == totals["generated"]
    assert sum(a["tokens"] for a in arms) == totals["tokens"]
    assert sum(a["shards"] for a in arms) == totals["shardsSucceeded"]


def test_report_json_has_the_status_casing(finished: Path) -> None:
    res = run(["report", "--json", str(finished)])
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert [k for k in report if "_" in k] == []
    assert report["qcPassedTotal"] == status_of(finished)["totals"]["qcPassed"]
    assert all("_" not in k for s in report["perShard"] for k in s)
    assert report["arms"] == status_of(finished)["arms"]


def test_the_dataset_card_parses_with_licence_language_and_filter_parameters(finished: Path) -> None:
    from huggingface_hub import DatasetCard
    from huggingface_hub.repocard_data import DatasetCardData

    text = (finished / "dataset" / "README.md").read_text()
    card = DatasetCard(text)
    assert isinstance(card.data, DatasetCardData)
    assert card.data.license == "cc-by-4.0" and card.data.language == ["en"]
    assert "embedded:smollm2-135m" in card.text and "checking them is yours" in card.text
    assert "- length: minInstructionChars 10, maxInstructionChars 1000" in card.text  # parameters, not `{}`
    totals = status_of(finished)["totals"]
    d = totals["duplicates"]
    assert (f"| exact / near / semantic / online duplicates | {d['exact']:,} / {d['near']:,} / {d['semantic']:,} / "
            f"{d['online']:,} |") in card.text  # fmt: skip
    assert "`domain` is the domain the prompt asked for" in card.text


def test_datasets_loads_the_folder_without_a_warning(
    finished: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    with caplog.at_level(logging.WARNING):
        ds = datasets.load_dataset(str(finished / "dataset"), cache_dir=str(tmp_path / "cache"))
        chat = datasets.load_dataset(str(finished / "dataset"), "messages", cache_dir=str(tmp_path / "cache"))
    assert ds["train"].num_rows == chat["train"].num_rows == status_of(finished)["totals"]["qcPassed"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def _genrun_status(out: Path) -> str:
    res = run(["status", str(out)])
    assert res.returncode == 0, res.stderr
    return res.stdout
