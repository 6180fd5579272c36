"""Storage on a real S3 server (SeaweedFS on 127.0.0.1): atomic publish, listing, and a clear error for a bad bucket."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from genrun.contract import errors
from genrun.contract import records as rec
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
    # Written in place (a PUT is atomic): no temporary key, no server-side copy.
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="store", Prefix="runs/a/").get("Contents", [])]
    assert sorted(keys) == ["runs/a/x/data.bin", "runs/a/x/report.json"]
    assert st.location("x/report.json") == "s3://store/runs/a/x/report.json"
    with pytest.raises(KeyError):
        st.read_bytes("x/nope")


def test_staged_uploads_when_the_block_ends_and_not_when_it_fails(
    s3: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`staged`: a local file written once, uploaded on success; on an error nothing reaches the bucket and the
    earlier object stays; the local folder is gone either way."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    st = open_storage("s3://store/runs/staged", s3.endpoint)
    with st.staged("m/seen-index.npz") as path:
        path.write_bytes(b"first")
        folder = path.parent
    assert st.read_bytes("m/seen-index.npz") == b"first" and not folder.exists()
    with pytest.raises(RuntimeError), st.staged("m/seen-index.npz") as path:
        path.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert st.read_bytes("m/seen-index.npz") == b"first" and not path.parent.exists()


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
    assert res.returncode == errors.EXIT_STORAGE, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "bucket not reachable" in lines[0] and "Traceback" not in res.stderr


def test_bad_job_spec_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text('{"kind": "shard", "spec": {}}')
    res = subprocess.run([sys.executable, "-P", "-m", "genrun.operator.cli", "worker", "generate", "--job", str(tmp_path / "job.json")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == errors.EXIT_USAGE
    assert "not a valid job spec" in res.stderr and "Traceback" not in res.stderr


def test_large_upload_goes_up_in_parts_and_leftover_uploads_are_aborted(
    s3: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file over the part size is a multipart upload (no 5 GB single-PUT limit, no copy); an upload a killed writer
    started and never completed is invisible to readers and `remove_leftovers` aborts it."""
    import os

    from genrun.worker.storage import S3Storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    st = S3Storage("s3://store/runs/big", s3.endpoint, multipart_bytes=5 << 20)  # S3's smallest part
    data = os.urandom(12 << 20)
    (tmp_path / "big.bin").write_bytes(data)
    st.upload(tmp_path / "big.bin", "merge/r0001/big.bin")
    head = s3.client().head_object(Bucket="store", Key="runs/big/merge/r0001/big.bin")
    assert head["ContentLength"] == len(data) and "-" in head["ETag"]  # a multipart ETag ends in -<parts>
    st.download("merge/r0001/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    # a killed writer's upload: begun, one part sent, never completed
    c = s3.client()
    up = c.create_multipart_upload(Bucket="store", Key="runs/big/merge/r0002/dataset.parquet")
    c.upload_part(Bucket="store", Key="runs/big/merge/r0002/dataset.parquet", UploadId=up["UploadId"], PartNumber=1,
                  Body=b"x" * (5 << 20))  # fmt: skip
    assert not st.exists("merge/r0002/dataset.parquet")
    assert st.remove_leftovers("merge/") == ["runs/big/merge/r0002/dataset.parquet"]
    assert not c.list_multipart_uploads(Bucket="store", Prefix="runs/big/").get("Uploads")


def test_incremental_merge_on_s3_equals_the_same_merge_on_a_folder(
    s3: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq
    from genrun.contract.api import parse_spec
    from genrun.worker.merge import load_seen_index, merge_round
    from genrun.worker.storage import LocalStorage

    from tests.helpers import example_row, write_shard

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    remote, local = open_storage("s3://store/runs/merge", s3.endpoint), LocalStorage(tmp_path / "local")
    spec = parse_spec({"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "output": {"path": "/x"}})
    texts = ["How do tides work?", "How do the tides work?", "Explain how tides work on Earth.",
             "Write a haiku about rain.", "Write a haiku about the rain!", "What is a black hole?"]  # fmt: skip
    for st in (remote, local):
        write_shard(st, 1, 0, [example_row(t) for t in texts[:3]])
        write_shard(st, 2, 1, [example_row(t) for t in texts[2:]])
        Path(tmp_path / "bad.json").write_bytes(b'{"round": 2, "seed"')
        st.upload(tmp_path / "bad.json", rec.shard_manifest_key(2, 2))  # a damaged marker: quarantined
        for rnd in (1, 2):
            merge_round(st, spec, "t", rnd, [(1, 0), (2, 1), (2, 2)])
    a = rec.round_report_from(json.loads(remote.read_bytes(rec.round_report_key(2))))
    b = rec.round_report_from(json.loads(local.read_bytes(rec.round_report_key(2))))
    assert a.quarantined == b.quarantined == (rec.shard_manifest_key(2, 2),)
    assert (a.unique_total, a.qc_passed_total, a.duplicates["exact"], a.duplicates["near"]) == (
        b.unique_total, b.qc_passed_total, b.duplicates["exact"], b.duplicates["near"])  # fmt: skip
    for key in (rec.dataset_part_key(1), rec.dataset_part_key(2), rec.rejected_part_key(2)):
        remote.download(key, tmp_path / "x.parquet")
        assert pq.read_table(tmp_path / "x.parquet").to_pylist() == pq.read_table(local.location(key)).to_pylist()
    sa, sb = load_seen_index(remote, 2), load_seen_index(local, 2)
    assert sa is not None and sb is not None and sa.exact.tolist() == sb.exact.tolist()
    assert a.dataset == "s3://store/runs/merge/dataset/data/"
