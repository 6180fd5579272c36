"""The operator's integrity checks on a real S3 server (SeaweedFS on 127.0.0.1): the ends of an object by ranged GETs
(a dataset part runs to gigabytes: never read whole), the same bytes and verdicts as on a folder."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from genrun.operator.loop import parquet_damage, read_ends
from genrun.worker.storage import LocalStorage, open_storage

from tests.integration.harness import SeaweedFS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3() -> Iterator[SeaweedFS]:
    with SeaweedFS() as weed:
        weed.client().create_bucket(Bucket="ends")
        yield weed


def test_the_ends_of_an_object_read_by_range_as_on_a_folder(
    s3: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"row {i} " * 20 for i in range(5000)]}), buf)
    whole = buf.getvalue()
    assert len(whole) > 2 * 4096
    remote, local = open_storage("s3://ends/run", s3.endpoint), LocalStorage(tmp_path)
    for key, data in (("dataset/data/train-r0001.parquet", whole), ("cut.parquet", whole[:-3000]), ("empty", b"")):
        remote.write_bytes(key, data)
        local.write_bytes(key, data)
        ends = read_ends(remote, key, 4096)
        assert ends == read_ends(local, key, 4096) == (data[:4096], data[-4096:] if data else b"", len(data))
    assert parquet_damage(read_ends(remote, "dataset/data/train-r0001.parquet")) == ""
    assert "magic bytes" in parquet_damage(read_ends(remote, "cut.parquet"))
    assert "too short" in parquet_damage(read_ends(remote, "empty"))
    assert read_ends(remote, "nope") is None and parquet_damage(read_ends(remote, "nope")) == "missing"
