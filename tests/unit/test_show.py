"""`genrun status` over a run's status.json, read through the typed status: today's document, an older run's, and a
damaged one (a clear error, not a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from genrun.contract import records as rec
from genrun.contract.errors import UserError
from genrun.operator.show import print_status

from tests.unit.test_status import OLD


def write(tmp_path: Path, status: object) -> str:
    doc = {"apiVersion": "genrun.io/v1alpha1", "kind": "GenerationRun", "metadata": {"name": "sft"},
           "spec": {"target": {"uniqueExamples": 1000}}, "status": status}  # fmt: skip
    (tmp_path / rec.STATUS_KEY).write_text(json.dumps(doc))
    return str(tmp_path)


def test_an_older_runs_status_prints_its_rounds_and_conditions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert print_status(write(tmp_path, OLD)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "sft: round 2, kept 550/1000, unique 600, generated 800, duplication 25.0%"
    assert not any(line.startswith("  duplicates:") for line in out)  # no per-tier figures in that version
    assert not any("before any response" in line for line in out)  # nor the generators' QC count
    assert any(line.split()[:3] == ["Progressing", "True", "ShardsRunning"] for line in out)
    rows = [line.split() for line in out if line.split()[:1] in (["1"], ["2"])]
    # that version had no per-round kept count nor the arms a round ran: a dash, and the round's one sampling
    assert rows == [["1", "4", "100-103", "400", "330", "-", "300", "0.75", "T=0.7", "rep=1.1"],
                    ["2", "4", "104-107", "-", "-", "-", "-", "-", "T=0.8", "rep=1.2"]]  # fmt: skip


def test_json_prints_the_document_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert print_status(write(tmp_path, OLD), as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == OLD


def test_a_damaged_status_json_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / rec.STATUS_KEY).write_text('{"status": ')
    with pytest.raises(UserError, match="not a status document"):
        print_status(str(tmp_path))


def test_the_generators_qc_rejections_are_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = json.loads(json.dumps(OLD))
    status["totals"]["qcRejectedBeforeResponse"] = 12
    assert print_status(write(tmp_path, status)) == 0
    out = capsys.readouterr().out.splitlines()
    assert "  12 of the unique rejected by QC before any response was paid for (generation.qcBeforeResponse)" in out
