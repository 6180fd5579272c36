"""`genrun preview`: one round-1 shard through generate_shard (the replay engine serves recorded real SmolLM2 outputs),
every sampled instruction with its dedup verdict, every kept example with its QC verdict, nothing written to the
run's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from genrun.operator import cli
from genrun.operator.preview import preview
from genrun.operator.validate import load_run_manifest
from genrun.worker.dedup import dedup_keys
from genrun.worker.qc import QcPipeline

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    doc = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    doc["spec"]["output"]["path"] = str(tmp_path / "out")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_preview_shows_dedup_and_qc_verdicts_and_writes_nothing(manifest: Path, tmp_path: Path) -> None:
    _, _, spec = load_run_manifest(manifest)
    p = preview(spec, 60, "replay")
    kept = [s for s in p.samples if s.verdict == "kept"]
    # generation.qcBeforeResponse (default): novel instructions the instruction side of QC rejects count as examples,
    # with their QC reason and no response paid for
    early = [s for s in p.samples if s.verdict == "qc_before_response"]
    assert len(kept) + len(early) == 60 and all(s.response for s in kept)
    side = QcPipeline.instruction_side(spec.qc.filters)
    assert early and not any(s.response for s in early)
    for s in early:
        row = {"instruction": s.instruction, "instruction_logprob": s.instruction_logprob}
        got = side.check(row)
        assert got is not None and got == s.qc
    # Every duplicate points at an earlier kept-or-first sample with the same key; the shard itself agrees on the count.
    dups = [s for s in p.samples if s.verdict in ("exact_duplicate", "near_duplicate")]
    assert dups and len(dups) == p.shard_skipped
    by_index = {s.index: s for s in p.samples}
    for s in dups:
        assert s.duplicate_of is not None and s.duplicate_of < s.index
        if s.verdict == "exact_duplicate":
            a, b = dedup_keys([s.instruction, by_index[s.duplicate_of].instruction], key="instruction", normalized=True)
            assert a == b
    keys = dedup_keys([s.instruction for s in kept + early], key="instruction", normalized=True)
    assert len(set(keys)) == len(keys)
    # QC verdicts are the merge's pipeline on the row: recorded SmolLM2 text fails some (low log-prob, truncation).
    reasons = {s.qc for s in kept}
    assert "pass" in reasons and reasons - {"pass"} and 0 < p.qc_passed < 60
    qc = QcPipeline.from_spec(spec.qc.filters)
    assert not qc.filters or all(s.qc for s in kept)
    assert not (tmp_path / "out").exists()


def test_cli_preview_prints_rows_and_a_summary(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["preview", str(manifest), "-n", "5", "--engine", "replay"]) == 0
    out = capsys.readouterr().out
    assert out.count(" kept, QC: ") == 5 and "instruction:" in out and "response:" in out
    assert "nothing written to the run's output" in out.splitlines()[0]
    assert "5 kept (" in out.splitlines()[-1]
    assert cli.main(["preview", str(manifest), "-n", "3", "--engine", "replay", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sum(s["verdict"] == "kept" for s in data["samples"]) == 3 and data["engine"] == "replay"
    assert not (tmp_path / "out").exists()


def test_cli_preview_errors_are_one_line(manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["preview", str(manifest), "-n", "0", "--engine", "replay"]) == 2
    assert capsys.readouterr().err.strip() == "genrun: error: -n: must be 1-1000 examples, got 0"
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["sampling"] = {"temperature": 9}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert cli.main(["preview", str(bad), "--engine", "replay"]) == 2
    err = capsys.readouterr().err
    assert "spec.sampling.temperature" in err and "Traceback" not in err
    assert cli.main(["preview", str(manifest), "--engine", "endpoint"]) == 2
    assert "no spec.model.endpoint" in capsys.readouterr().err
