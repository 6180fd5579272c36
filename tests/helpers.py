"""Shared test helpers: shards written through the real record contract (schema, keys, manifests)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from genrun.contract import records as rec
from genrun.worker.storage import Storage


def example_row(
    instruction: str, response: str = "A helpful and correct answer to the question.", **over: Any
) -> dict[str, Any]:
    row = {
        "instruction": instruction, "response": response, "domain": "", "round": 1, "seed": 0, "index": 0,
        "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "model": "test", "prompt_hash": "0",
        "instruction_tokens": 8, "response_tokens": 12, "finish_reason": "stop", "instruction_logprob": -1.0,
        "response_logprob": -1.0, "critic_score": None, "candidates": 1,
    }  # fmt: skip
    row.update(over)
    return row


def write_shard(
    storage: Storage,
    rnd: int,
    seed: int,
    rows: list[dict[str, Any]],
    generated: int | None = None,
    skipped: int = 0,
    early: dict[str, int] | None = None,
) -> None:
    """`early`: the manifest's qc_rejected_before_response (instructions the generator's QC rejected, no rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**r, "round": rnd, "seed": seed, "index": i} for i, r in enumerate(rows)]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "s.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=rec.example_schema()), p)
        storage.upload(p, rec.shard_data_key(rnd, seed))
    n_early = sum((early or {}).values())
    m = rec.ShardManifest(rnd, seed, len(rows), generated if generated is not None else len(rows) + skipped + n_early,
                          skipped, 0, 0, 20 * len(rows), 0.1, rec.shard_data_key(rnd, seed),
                          qc_rejected_before_response=dict(early or {}))  # fmt: skip
    storage.write_bytes(rec.shard_manifest_key(rnd, seed), rec.to_json(m).encode())


def merged_round(storage: Storage, rnd: int) -> tuple[rec.RoundReport, list[Any], list[Any]]:
    """A merged round's outputs to compare between runs: its report (the output paths blanked), the dataset's rows and
    the rejected rows."""
    import dataclasses
    import json

    import pyarrow.parquet as pq

    report = rec.round_report_from(json.loads(storage.read_bytes(rec.round_report_key(rnd))))
    data = pq.read_table(storage.location(rec.DATASET_PREFIX)).to_pylist()
    rejected = pq.read_table(storage.location("rejected")).to_pylist()
    return dataclasses.replace(report, dataset="", report=""), data, rejected


def copy_sources(root: Path, dest: Path) -> None:
    """The files a package build reads, copied to `dest`: pyproject.toml, README.md and every folder pyproject's
    package-dir maps (one list: a new package folder needs no test edit)."""
    import shutil
    import tomllib

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, dest / name)
    package_dir = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in sorted(set(package_dir.values())):
        shutil.copytree(root / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
