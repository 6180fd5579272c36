"""Storage on a real S3 server (SeaweedFS on 127.0.0.1): atomic publish, listing, and a clear error for a bad bucket."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from genrun.worker import records as rec
from genrun.worker.storage import StorageError, open_storage

from tests.integration.harness import SeaweedFS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3() -> Iterator[SeaweedFS]:
    with SeaweedFS() as weed:
        weed.client().create_bucket(Bucket="store")
        yield weed


def test_round_trip_atomic_and_listing(s3: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    st = open_storage("s3://store/runs/a", s3.endpoint)
    st.check()
    st.write_bytes("x/report.json", b'{"a": 1}')
    (tmp_path / "f.bin").write_bytes(b"\0" * 100_000)
    st.upload(tmp_path / "f.bin", "x/data.bin")
    assert st.exists("x/report.json") and not st.exists("x/nope")
    assert json.loads(st.read_bytes("x/report.json")) == {"a": 1}
    st.download("x/data.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == b"\0" * 100_000
    assert st.list("x/") == ["x/data.bin", "x/report.json"]
    # Published through a temporary key: nothing is left under _tmp/ after a publish.
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="store", Prefix="runs/a/").get("Contents", [])]
    assert not [k for k in keys if "/_tmp/" in k]
    assert st.location("x/report.json") == "s3://store/runs/a/x/report.json"
    with pytest.raises(KeyError):
        st.read_bytes("x/nope")


def test_missing_bucket_is_one_line_with_storage_exit_code(s3: SeaweedFS, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=re.escape("s3://no-such-bucket/p at http://127.0.0.1")):
        open_storage("s3://no-such-bucket/p", s3.endpoint).check()
    spec = {"model": {"name": "m"}, "target": {"uniqueExamples": 1},
            "output": {"path": "s3://no-such-bucket/p", "s3": {"endpoint": s3.endpoint}}}  # fmt: skip
    shard = rec.ShardPlan(1, 0, 0, 2, rec.Sampling(0.7, 0.9, 1.1, 0.0, 64))
    job = tmp_path / "job.json"
    job.write_text(rec.to_json(rec.JobSpec("shard", "r", "default", spec, 1, shard)))
    res = subprocess.run([sys.executable, "-P", "-m", "genrun.operator.cli", "worker", "generate", "--job", str(job), "--engine", "replay"],
                         capture_output=True, text=True, timeout=120, env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "PATH": "/usr/bin"})  # fmt: skip
    assert res.returncode == rec.EXIT_STORAGE, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "bucket not reachable" in lines[0] and "Traceback" not in res.stderr


def test_bad_job_spec_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text('{"kind": "shard", "spec": {}}')
    res = subprocess.run([sys.executable, "-P", "-m", "genrun.operator.cli", "worker", "generate", "--job", str(tmp_path / "job.json")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == rec.EXIT_USAGE
    assert "not a valid job spec" in res.stderr and "Traceback" not in res.stderr
