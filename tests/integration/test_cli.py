"""The `genrun` command as a user meets it: --version, the worker image's default command, one-line errors for a
missing S3 credential and a closed pipe, `report --json`, and a wheel build that prints no packaging warnings."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import copy_sources
from tests.integration.test_local_run import GENRUN, run, small_manifest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    tmp = tmp_path_factory.mktemp("cli")
    res = run(["run", str(small_manifest(tmp)), "--engine", "replay", "--jobs", "2"])
    assert res.returncode == 0, res.stderr
    yield tmp / "local", res.stderr


@pytest.fixture(scope="module")
def finished(finished_run: tuple[Path, str]) -> Path:
    return finished_run[0]


def test_progress_shows_elapsed_eta_and_tokens_per_second(finished_run: tuple[Path, str]) -> None:
    """In a log (not a terminal) a line is written when something happens, with the clock and rates at that time."""
    lines = [x for x in finished_run[1].splitlines() if x.startswith("round ")]
    pattern = re.compile(
        r"^round \d+ \[#* *\] \d+/\d+ shards \| kept \d+/60 \| dup [\d.]+% \| (-|[\d,]+) tokens/s \| "
        r"\d\d:\d\d<(unknown|(\d+:)?\d\d:\d\d) \| .* \| \w+$"
    )
    for line in lines:
        assert pattern.match(line), line
    assert lines[0].split(" | ")[3] == "- tokens/s" and lines[0].endswith("RoundStarted")
    assert re.search(r"\| [1-9][\d,]* tokens/s \|", lines[-1]), lines[-1]
    assert "<unknown" in lines[0] and "<unknown" not in lines[-1]  # an ETA once the pilot has measured something
    assert len(lines) == len(set(lines)) < 40  # a log line per event, not per tick


def test_version_names_the_package_version() -> None:
    from genrun.contract import __version__

    res = run(["--version"])
    assert res.returncode == 0 and res.stdout.strip() == f"genrun {__version__}"


def test_worker_help_is_the_worker_images_default_command() -> None:
    cmd = json.loads(
        next(x for x in (ROOT / "Dockerfile.worker").read_text().splitlines() if x.startswith("CMD")).removeprefix(
            "CMD "
        )
    )
    res = run(cmd)
    assert res.returncode == 0, res.stderr
    assert "generate" in res.stdout and "merge" in res.stdout
    sub = run(["worker", "generate", "--help"])
    assert sub.returncode == 0 and "--job" in sub.stdout


def test_s3_status_without_credentials_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    res = run(["status", "s3://some-bucket/runs/x"], env=env)
    assert res.returncode == 4, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "AWS_ACCESS_KEY_ID" in res.stderr


@pytest.mark.parametrize("args", [["status", "--json"], ["status"], ["report"], ["report", "--json"]])
def test_closed_pipe_is_not_a_traceback(finished: Path, args: list[str]) -> None:
    """`genrun status --json OUT | head -1`: the reader closes the pipe before genrun writes."""
    p = subprocess.Popen([*GENRUN, *args, str(finished)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(60) == 0, err  # as `genrun validate` does (tests/unit/test_validate.py)
    assert err == ""


def test_report_json_is_the_round_report(finished: Path) -> None:
    res = run(["report", "--json", str(finished)])
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    status = json.loads((finished / "status.json").read_text())["status"]
    assert report["round"] == status["round"]
    # the CRD's casing, as `status --json`: camelCase field names, data keys (QC reasons) as they are
    assert report["qcPassedTotal"] == status["totals"]["qcPassed"]
    assert report["topDuplicates"] and report["perDomain"] and report["perShard"][0]["newQcPassed"] >= 0
    assert not [k for k in report if "_" in k] and report["arms"] == status["arms"]


def test_report_json_before_any_merge_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(json.dumps({"metadata": {"name": "x"}, "spec": {}, "status": {}}))
    res = run(["report", "--json", str(tmp_path)])
    assert res.returncode == 2 and res.stderr.startswith("genrun: error:") and "Traceback" not in res.stderr
    page = run(["report", str(tmp_path), "--html", str(tmp_path / "r.html")])
    assert page.returncode == 0 and "no round has been merged yet" in page.stdout and "Traceback" not in page.stderr


def test_wheel_build_prints_no_packaging_warnings(tmp_path: Path) -> None:
    """The setuptools warnings the project caused (license table, replay data folder outside `packages`) are gone;
    the venv's own setuptools builds, so no download. A copy of the sources: the build writes next to them."""
    src = tmp_path / "src"
    copy_sources(ROOT, src)
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONSAFEPATH": "1"}, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    ours = [x for x in res.stderr.splitlines() if "Warning" in x or "deprecated" in x or "absent" in x]
    assert ours == [], "\n".join(ours)
    names = zipfile.ZipFile(next(tmp_path.glob("genrun-*.whl"))).namelist()
    assert "genrun/worker/replay/smollm2-135m.jsonl.gz" in names


def test_report_html_shows_target_duplicates_reasons_and_rows_of_the_dataset(finished: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    page_path = tmp_path / "r.html"
    res = run(["report", str(finished), "--html", str(page_path), "--json"])
    assert res.returncode == 0, res.stderr
    json.loads(res.stdout.strip().splitlines()[-1])  # --json's last line stays one object; the path goes to stderr
    page = page_path.read_text()
    status = json.loads((finished / "status.json").read_text())
    first = pq.read_table(status["status"]["output"]["dataset"]).slice(0, 1).to_pylist()[0]
    assert "target 60" in page and "Most duplicated instructions" in page and "Rejected rows by reason" in page
    assert f"Sample rows (5 of {status['status']['totals']['qcPassed']} kept)" in page
    assert html.escape(first["instruction"][:200]) in page


def test_push_without_network_is_one_line_and_exit_1(finished: Path, tmp_path: Path) -> None:
    """The Hub endpoint refuses connections (nothing listens on port 9): a failure worth retrying later, exit 1."""
    # Its own environment: other test modules set HF_HUB_OFFLINE=1 in this process when they are imported.
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path), HF_TOKEN="hf_unused")
    res = run(["push", str(finished), "--repo", "me/data"], env=env)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith("genrun: error: cannot reach 127.0.0.1: ") and "Connection refused" in res.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["validate", "{missing}"], "cannot read: No such file or directory"),
        (["run", "{missing}", "--engine", "replay"], "cannot read: No such file or directory"),
        (["preview", "{missing}", "--engine", "replay"], "cannot read: No such file or directory"),
        (["status", "{missing}"], "no genrun run here"),
        (["report", "{missing}", "--json"], "no genrun run here"),
        (["push", "{missing}", "--repo", "me/data"], "no genrun run here"),
        (["dedup", "{missing}", "--output", "{tmp}/d"], "no such file or folder"),
        (["report", "{finished}", "--html", "{file}/r.html"], "{file}/r.html: Not a directory; choose a path"),
        (["report", "{finished}", "--html", "/sys/r.html"], "/sys/r.html: Permission denied; choose a path"),
        (["run", "{manifest}", "--output", "{file}/out", "--engine", "replay"], "{file}/out: Not a directory"),
        (["model", "prepare", "--cache", "{file}/cache"], "{file}/cache: Not a directory; choose a path"),
    ],
)
def test_bad_paths_and_unwritable_outputs_are_one_line_and_exit_2(
    finished: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    """Every command, given a path that does not exist or cannot be written (a file where a folder is needed, /sys):
    one line on stderr saying which path and why, exit 2 (the user must change something), never a traceback."""
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "m.yaml").write_text((ROOT / "examples" / "quickstart.yaml").read_text())
    names = {"missing": str(tmp_path / "missing"), "tmp": str(tmp_path), "file": str(tmp_path / "file"),
             "finished": str(finished), "manifest": str(tmp_path / "m.yaml")}  # fmt: skip
    res = run([a.format(**names) for a in args])
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and needle.format(**names) in res.stderr, res.stderr
    assert len([x for x in res.stderr.splitlines() if "error" in x or "cannot" in x]) == 1, res.stderr
