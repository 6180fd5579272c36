"""The merge's read stage: each of the round's shards, its marker and its whole file checked and read once.

A shard that cannot be read (a damaged marker, a corrupt or foreign file) is quarantined, never fatal: the merge goes
on without it and the report names it. Its rows are held for the write stage while the round's held rows fit the
runtime's HOLD_BYTES; a larger round's later shards are read again there (published shards never change).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from genrun.contract import records as rec
from genrun.worker import runtime
from genrun.worker.dedup_config import DedupConfig
from genrun.worker.merge_state import read_table
from genrun.worker.storage import DamagedMarker, Storage, read_marker

log = logging.getLogger("genrun.merge")


@dataclass
class Shard:
    round: int
    seed: int
    manifest: rec.ShardManifest
    rows: int
    table: Any = None  # its rows, held from the read stage for the write stage (None: read again there)


@dataclass
class RoundInput:
    """What the read stage found: the readable shards, their key-source columns (instruction, and the response when
    the key is the pair), the keys it quarantined and the shards that were never published."""

    shards: list[Shard] = field(default_factory=list)
    cols: list[Any] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def held_rows(storage: Storage, sh: Shard) -> Any:
    """The shard's rows: held since the read stage, or read again."""
    if sh.table is None:
        sh.table = read_table(storage, rec.shard_data_key(sh.round, sh.seed))
    return sh.table


def _quarantine(storage: Storage, key: str, error: str, out: list[str]) -> None:
    log.warning("quarantined %s: %s", key, error)
    out.append(key)
    storage.write_bytes(f"quarantine/{key}.json", json.dumps({"key": key, "error": error}).encode())


def read_round(storage: Storage, cfg: DedupConfig, shard_ids: list[tuple[int, int]]) -> RoundInput:
    """Each shard of `shard_ids`, in (round, seed) order."""
    got = RoundInput()
    held = 0
    want = ["instruction", "response"] if cfg.key == "pair" else ["instruction"]
    for rnd, seed in sorted(shard_ids):
        mkey, dkey = rec.shard_manifest_key(rnd, seed), rec.shard_data_key(rnd, seed)
        try:
            manifest = read_marker(storage, mkey)
        except DamagedMarker as exc:
            _quarantine(storage, mkey, str(exc), got.quarantined)
            continue
        if manifest is None:
            got.missing.append(dkey)
            continue
        try:
            table = read_table(storage, dkey)  # the whole file, schema-checked, before any row counts
        except Exception as exc:  # a corrupt or foreign file must not abort the merge: quarantine it
            _quarantine(storage, dkey, str(exc), got.quarantined)
            continue
        got.cols.append(table.select(want))
        held += table.nbytes  # real responses run to kilobytes: past the budget, the write stage reads it again
        got.shards.append(Shard(rnd, seed, manifest, table.num_rows, table if held <= runtime.HOLD_BYTES else None))
    return got
