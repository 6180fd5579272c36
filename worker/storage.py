"""Storage under a run's output prefix: a local folder (the embedded default) or s3://bucket/prefix (boto3).

Writes are atomic. Local: data goes to a temporary name beside the destination and is renamed over it. S3: an object
appears only when its PUT (or its multipart upload's completion) succeeds, so objects are written in place, with no
temporary key and no server-side copy (which doubled the bytes and failed over 5 GB); large files go up in parts
(boto3's managed transfer). Either way a crash leaves no half-written published object. Completion markers are
written last by the callers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from genrun.contract.records import DamagedMarker as DamagedMarker  # re-exported: callers catch it from here
from genrun.contract.records import ShardManifest, parse_marker

Keys = list[str]  # a name outside the classes, whose `list` method shadows the builtin in their annotations

TMP_PREFIX = "_tmp/"
# Local folders of S3 writes in progress (`S3Storage.staged`): this prefix, then the writer's pid.
STAGED_DIR_PREFIX = "genrun-staged-"


class StorageError(Exception):
    """Storage is unreachable or refuses us: one line naming the location and the cause."""


class Storage(Protocol):
    url: str

    def exists(self, key: str) -> bool: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def upload(self, local: Path, key: str) -> None: ...
    def staged(self, key: str) -> contextlib.AbstractContextManager[Path]: ...
    def download(self, key: str, local: Path) -> None: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def location(self, key: str) -> str: ...
    def check(self) -> None: ...
    def remove_leftovers(self, prefix: str) -> Keys: ...


class LocalStorage:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _p(self, key: str) -> Path:
        return self.root / key

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"output folder {self.root}: {exc.strerror}") from exc
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"output folder {self.root}: not writable")

    def exists(self, key: str) -> bool:
        return self._p(key).exists()

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._p(key).read_bytes()
        except FileNotFoundError as exc:
            raise KeyError(key) from exc

    @contextlib.contextmanager
    def staged(self, key: str) -> Iterator[Path]:
        """A path to write `key`'s content to: a temporary name beside the destination, fsynced and renamed over it
        when the block ends without an error, removed when it fails. One write, no copy."""
        dest = self._p(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; published files are read by other users and Jobs
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _publish(self, key: str, fill: Any) -> None:
        """Write through `fill(file)` to a temporary name beside the destination, fsync, then rename over it."""
        with self.staged(key) as tmp, open(tmp, "wb") as f:
            fill(f)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._publish(key, lambda f: f.write(data))

    def upload(self, local: Path, key: str) -> None:
        def copy(f: Any) -> None:
            with open(local, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        self._publish(key, copy)

    def download(self, key: str, local: Path) -> None:
        try:
            shutil.copyfile(self._p(key), local)
        except FileNotFoundError as exc:
            raise KeyError(key) from exc

    def list(self, prefix: str) -> list[str]:
        base = self._p(prefix)
        if not base.exists():
            return []
        out = []
        for p in base.rglob("*") if base.is_dir() else [base]:
            if p.is_file() and not p.name.startswith("."):
                out.append(str(p.relative_to(self.root)))
        return sorted(out)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._p(key).unlink()

    def location(self, key: str) -> str:
        return str(self._p(key))

    def remove_leftovers(self, prefix: str) -> Keys:
        """Delete the temporary files a killed writer left under `prefix` (callers own that prefix)."""
        base = self._p(prefix)
        gone = []
        for p in base.rglob(".*.tmp") if base.is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                gone.append(str(p.relative_to(self.root)))
        return sorted(gone)


class S3Storage:
    """s3://bucket/prefix through boto3; credentials from the environment (a Kubernetes Secret gives them)."""

    def __init__(
        self,
        url: str,
        endpoint: str = "",
        region: str = "us-east-1",
        access_key: str = "",
        secret_key: str = "",
        multipart_bytes: int = 64 << 20,
    ) -> None:
        import boto3
        from botocore.config import Config

        rest = url.removeprefix("s3://")
        self.bucket, _, prefix = rest.partition("/")
        self.prefix = prefix.strip("/")
        self.url = url.rstrip("/")
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
        self.endpoint = endpoint
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            config=Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )
        from boto3.s3.transfer import TransferConfig

        self.transfer = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes)

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _err(self, what: str, exc: Exception) -> StorageError:
        where = f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint}" if self.endpoint else "")
        return StorageError(f"{where}: {what}: {exc}")

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise self._err("bucket not reachable", exc) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
            return body
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise KeyError(key) from exc
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def upload(self, local: Path, key: str) -> None:
        with open(local, "rb") as f:  # parts of 64 MiB above 64 MiB: an object appears only when complete
            self.client.upload_fileobj(f, self.bucket, self._k(key), Config=self.transfer)

    @contextlib.contextmanager
    def staged(self, key: str) -> Iterator[Path]:
        """A local path to write `key`'s content to, uploaded when the block ends without an error."""
        with tempfile.TemporaryDirectory(prefix=f"{STAGED_DIR_PREFIX}{os.getpid()}-") as d:
            path = Path(d) / Path(key).name
            yield path
            self.upload(path, key)

    def download(self, key: str, local: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._k(key), str(local))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise KeyError(key) from exc
            raise

    def list(self, prefix: str) -> list[str]:
        out = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._k(prefix)):
            out += [o["Key"][strip:] for o in page.get("Contents", [])]
        return sorted(k for k in out if not k.startswith(TMP_PREFIX))  # keys an older version published through

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._k(key)}"

    def remove_leftovers(self, prefix: str) -> Keys:
        """Abort the multipart uploads a killed writer left under `prefix` (their parts cost storage until then)."""
        gone = []
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self._k(prefix))
        for page in pages:
            for up in page.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                gone.append(up["Key"])
        return gone


def remove_staged_leftovers() -> list[Path]:
    """Delete the local folders of staged writes whose process is gone (a killed writer's); returns them."""
    gone = []
    for d in Path(tempfile.gettempdir()).glob(f"{STAGED_DIR_PREFIX}*"):
        try:
            pid = int(d.name.removeprefix(STAGED_DIR_PREFIX).split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_storage(
    path: str, endpoint: str = "", region: str = "us-east-1", access_key: str = "", secret_key: str = ""
) -> Storage:
    if path.startswith("s3://"):
        return S3Storage(path, endpoint, region, access_key, secret_key)
    return LocalStorage(path)


@contextlib.contextmanager
def local_copy(storage: Storage, key: str) -> Iterator[Path]:
    """A local file with the object's content (the object itself for local storage)."""
    if isinstance(storage, LocalStorage):
        yield storage._p(key)
        return
    with tempfile.TemporaryDirectory(prefix="genrun-") as d:
        p = Path(d) / Path(key).name
        storage.download(key, p)
        yield p


def read_parquet(storage: Storage, key: str, columns: list[str] | None = None) -> Any:
    """One Parquet object's table (the columns named, else all)."""
    with local_copy(storage, key) as path:
        return read_parquet_file(path, columns)


def read_parquet_file(path: str | Path, columns: list[str] | None = None) -> Any:
    """One Parquet file's table. Through `pq.ParquetFile`, not `pq.read_table`: that goes through pyarrow.dataset,
    whose import (a machinery for datasets of many files that a one-file read never uses) adds to every Job's start."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        return f.read(columns=columns)


def read_marker(storage: Storage, key: str) -> ShardManifest | None:
    """The shard completion marker at `key`: None when there is none yet; `DamagedMarker` (a ValueError naming the
    key and the fault) when it is empty, truncated or incomplete. The one parser of markers: the merge, the local
    runner and the operator all read them through here."""
    try:
        data = storage.read_bytes(key)
    except KeyError:
        return None
    return parse_marker(data, key)
