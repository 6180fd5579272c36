"""The generators' online skip: the merge's registered dedup tiers (`tiers.TIERS`), each through its `online` check,
on each batch of a shard's candidate instructions, before their responses are paid for.

A candidate is skipped when a tier finds it among earlier rounds (the seen-index and kept embeddings the merge
published, with `dedup.against`'s sources) or among the rows this shard kept before it, by the merge's keep-first
rule; the tiers run in their registered order, so a tier added to TIERS with an `online` check runs here too. With
`dedup.key: pair` the key needs the response: nothing is skipped, the merge dedups.

Imports no process pool: the shard's process never forks (the merge's modules stay out of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from genrun.worker.dedup import MinHasher, SeenIndex, dedup_keys, key_hashes
from genrun.worker.dedup_config import DedupConfig
from genrun.worker.tiers import EARLIER, NEW, SHARD, TIERS, Batch, OnlineCheck, OnlineState, code, enabled_tiers


class OnlineSkip:
    """One shard's online skip: the enabled tiers' checks, and how many rows each tier skipped so far (`skipped`,
    by tier name)."""

    def __init__(self, cfg: DedupConfig, seen: SeenIndex | None, seen_semantic: Any = None) -> None:
        self.normalize = cfg.normalize
        self.hasher = MinHasher(cfg.num_perm, 1, cfg.shingle_size)
        own = SeenIndex.empty(cfg.threshold, cfg.num_perm, 1, cfg.shingle_size)
        state = OnlineState(cfg, seen if cfg.online else None, seen_semantic if cfg.online else None, own)
        on = enabled_tiers(cfg) if cfg.key == "instruction" else ()
        self.checks: list[OnlineCheck] = [c for t in on if (c := t.online(state)) is not None]
        self.skipped = dict.fromkeys((t.name for t in TIERS), 0)

    def filter(self, instructions: Sequence[str], ids: Sequence[int] | None = None) -> tuple[list[bool], int, int]:
        """(new flags, skipped as seen in earlier rounds, skipped as seen in this shard), keep-first: the first of
        two near-identical candidates of one batch is kept. `ids` name the rows in the shard's semantic index (the
        sample indices; default: their places in the batch)."""
        if not self.checks:
            return [True] * len(instructions), 0, 0
        keys = dedup_keys(list(instructions), key="instruction", normalized=self.normalize)
        row_ids = np.asarray(range(len(keys)) if ids is None else ids, dtype=np.int64)
        batch = Batch(list(keys), key_hashes(keys), self.hasher.signatures(keys), row_ids)
        for check in self.checks:
            check(batch)
        for t in TIERS:
            self.skipped[t.name] += int((batch.tier == code(t)).sum())
        return (batch.found == NEW).tolist(), int((batch.found == EARLIER).sum()), int((batch.found == SHARD).sum())
