"""The dedup tiers, cheapest first, as objects behind one interface (`Tier`), run in their registered order.

The cluster rule, keep-first in (round, seed, index) order, rows numbered in that order (global row ids, cumulative
over rounds):
- exact: a row whose normalised key equals the key of ANY earlier row is a duplicate, in that row's cluster;
- near: otherwise (the first row with its key), the row is a near duplicate of the earliest kept row it is itself
  similar to among the first kept rows of its LSH buckets (earlier rounds' in the seen-index, then the round's own;
  see `dedup.keep_first_batch`); a row is never dropped for a row it is not near, whatever lies between them;
- semantic: a surviving row whose embedding's cosine with an earlier kept row reaches the threshold is dropped
  (`semantic.apply_tier`, the generators' own rule).
Every decision depends only on earlier rounds and the round's own rows, so merging round r's new rows against the
state of rounds 1..r-1 gives exactly what replaying rounds 1..r from nothing gives.

A tier reads the round's rows (`RoundRows`) and narrows the round's `Decisions`: it drops rows that earlier tiers
kept, setting their cluster root and its code (its place in TIERS). Every dropped row is counted under exactly one
tier, by its `reason`.

The generators' online skip runs the same registered tiers on each batch of a shard's candidate instructions, before
their responses are paid for (`worker/online.py`): a tier's `online(state)` gives the shard its check (or None: merge
only), which reads the batch (`Batch`) and skips rows earlier checks kept, as seen in earlier rounds or earlier in this
shard, by the same keep-first rule. Adding a tier is one class here plus its place in TIERS (docs/dedup-tiers.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
from genrun.worker.dedup import MinHasher, SeenIndex, kept_sigs, key_hashes
from genrun.worker.dedup_config import DedupConfig
from genrun.worker.merge_state import State

Precomputed = tuple[np.ndarray, np.ndarray, np.ndarray]  # key hashes, new keys' signatures, their earlier matches


@dataclass
class RoundRows:
    """What the tiers read: the round's keys in keep-first order (None when the partitioned maps and reducers made
    `precomputed`: key hashes, the signatures of the first occurrences of new keys and their matches against earlier
    rounds' bucket firsts), `keys_of(rows)` for the keys of some rows either way, the state of the rounds before, the
    round's first global row id, `on_fresh(hashes, fresh)`, told once the rows new against earlier rounds are
    known (the QC stage starts there), and the rows' `embeddings` when the caller made them (the semantic tier then
    searches the state's semantic index, which the caller filled, instead of embedding the survivors' keys)."""

    cfg: DedupConfig
    state: State
    first_id: int
    keys: Any = None
    precomputed: Precomputed | None = None
    keys_of: Callable[[np.ndarray], Any] | None = None
    on_fresh: Callable[[np.ndarray, np.ndarray], None] | None = None
    embeddings: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.keys) if self.precomputed is None else len(self.precomputed[0])

    def survivor_keys(self, rows: np.ndarray) -> Any:
        import pyarrow as pa

        if self.keys is not None:
            return self.keys.take(pa.array(rows, pa.int64()))
        assert self.keys_of is not None, "precomputed rows need keys_of"
        return self.keys_of(rows)


@dataclass
class SemanticDrops:
    """The semantic tier's drops: a table (id, duplicate_of, cosine) and their row positions in the round."""

    table: Any
    rows: np.ndarray


@dataclass
class Decisions:
    """Per new row: its global id, whether it is kept, else the code of the tier that dropped it (its place in TIERS;
    -1: kept) and the first row (global id) of its cluster; and the round's new keys (first occurrences) with their
    signatures, band keys and roots, to extend the state."""

    ids: np.ndarray
    kept: np.ndarray  # bool
    tier: np.ndarray  # int8: the dropping tier's code, -1 when kept
    root: np.ndarray  # global id of the cluster's first row (itself when kept)
    fresh: np.ndarray  # bool: neither an exact nor a near duplicate of anything before the round
    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    cand: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # first rows of keys never seen before
    sigs: np.ndarray = field(default_factory=lambda: np.empty(0))  # their kept signatures (the index takes them over)
    bands: np.ndarray = field(default_factory=lambda: np.empty(0))
    first_of: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # row -> first row with its key
    seen_before: np.ndarray = field(default_factory=lambda: np.empty(0, bool))  # key seen in an earlier round
    semantic_drops: SemanticDrops | None = None

    @classmethod
    def start(cls, n: int, first_id: int) -> Decisions:
        return cls(
            ids=np.arange(first_id, first_id + n, dtype=np.int64),
            kept=np.ones(n, dtype=bool),
            tier=np.full(n, -1, dtype=np.int8),
            root=np.full(n, -1, dtype=np.int64),
            fresh=np.zeros(n, dtype=bool),
        )

    def dropped_by(self, tier: Tier) -> np.ndarray:
        """Rows the tier dropped (bool)."""
        out: np.ndarray = self.tier == code(tier)
        return out


# Where the online skip found a row of a batch: not yet (NEW), in earlier rounds (EARLIER: the shard manifest's
# skipped_online), earlier in this shard (SHARD: skipped_in_shard), or an exact repeat of an earlier row of the batch
# (REPEAT, until the near check knows where that row was found: the repeat was found there too).
NEW, EARLIER, SHARD, REPEAT = 0, 1, 2, 3


@dataclass
class OnlineState:
    """What a shard's online checks read: earlier rounds' seen-index and kept embeddings (with `dedup.against`'s
    sources; None when `dedup.online` is off or nothing is indexed) and the exact/near index of the rows this shard
    kept so far (`own`, grown by the near check)."""

    cfg: DedupConfig
    seen: SeenIndex | None
    semantic: Any  # SemanticIndex | None
    own: SeenIndex


@dataclass
class Batch:
    """One batch of a shard's candidates, as the online checks read and narrow it: the normalised keys in keep-first
    order, their key hashes and MinHash signatures, the rows' ids (sample indices), and per row where it was found
    (NEW, EARLIER, SHARD, REPEAT), the code of the tier that skipped it (-1: kept) and the first row of the batch
    with its key."""

    keys: list[str]
    hashes: np.ndarray
    sigs: np.ndarray
    ids: np.ndarray
    found: np.ndarray = field(default_factory=lambda: np.empty(0, np.int8))
    tier: np.ndarray = field(default_factory=lambda: np.empty(0, np.int8))
    first_of: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def __post_init__(self) -> None:
        n = len(self.keys)
        self.found, self.tier = np.full(n, NEW, np.int8), np.full(n, -1, np.int8)
        self.first_of = np.arange(n, dtype=np.int64)

    def alive(self) -> np.ndarray:
        """The rows no check has skipped yet, in order."""
        return np.flatnonzero(self.found == NEW)

    def skip(self, rows: np.ndarray, where: int, tier: Tier) -> None:
        self.found[rows] = where
        self.tier[rows] = code(tier)


OnlineCheck = Callable[[Batch], None]  # one tier's check of a shard's batches: skips (Batch.skip) rows still alive


class Tier(Protocol):
    """One dedup tier: `name` as the reports and `genrun dedup` list it, `reason` as a dropped row's reject_reason,
    `enabled(cfg)`, `apply`, which narrows `dec` (drops rows it kept, sets their root and tier code), and `online`,
    the shard's check of its batches in the generators' online skip (None: the tier runs in the merge only)."""

    name: ClassVar[str]
    reason: ClassVar[str]

    def enabled(self, cfg: DedupConfig) -> bool: ...

    def apply(self, rows: RoundRows, dec: Decisions) -> None: ...

    def online(self, state: OnlineState) -> OnlineCheck | None: ...


def _new_rows(rows: RoundRows, dec: Decisions, old: np.ndarray) -> None:
    """The rows neither an exact nor a near duplicate of anything before the round (`old`: each candidate's match
    against earlier rounds, -1: none), told to `on_fresh` once known."""
    fresh_key = np.zeros(rows.n, dtype=bool)
    fresh_key[dec.cand[old < 0]] = True
    dec.fresh = ~dec.seen_before & fresh_key[dec.first_of]
    if rows.on_fresh is not None:
        rows.on_fresh(dec.hashes, dec.fresh)


class ExactTier:
    """The same normalised key as any earlier row (earlier rounds' through the state, then the round's own)."""

    name: ClassVar[str] = "exact"
    reason: ClassVar[str] = "exact_duplicate"

    def enabled(self, cfg: DedupConfig) -> bool:
        return True

    def apply(self, rows: RoundRows, dec: Decisions) -> None:
        n = rows.n
        h = key_hashes(rows.keys) if rows.precomputed is None else rows.precomputed[0]
        _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        dec.hashes, dec.first_of = h, first[inverse]
        dec.seen_before, dec.root = rows.state.lookup_keys(h)
        first_new = ~dec.seen_before & (dec.first_of == np.arange(n))
        dec.cand = np.flatnonzero(first_new)  # in row order
        dec.kept[~first_new] = False
        dec.tier[~first_new] = code(self)
        # the rows of keys seen earlier in the round take their first row's cluster once the next tier has rooted it

    def online(self, state: OnlineState) -> OnlineCheck | None:
        def check(b: Batch) -> None:
            """Earlier rounds' keys, then this shard's; a repeat of an earlier row of the batch waits for the near
            check to know where that row was found (its key found nowhere, it may still be an earlier round's near
            duplicate)."""
            if state.seen is not None:
                a = b.alive()
                b.skip(a[state.seen.contains_exact(None, b.hashes[a])], EARLIER, self)
            a = b.alive()
            b.skip(a[state.own.contains_exact(None, b.hashes[a])], SHARD, self)
            a = b.alive()
            _, first, inverse = np.unique(b.hashes[a], return_index=True, return_inverse=True)
            b.first_of[a] = a[first[inverse]]
            b.skip(a[first[inverse] != np.arange(len(a))], REPEAT, self)

        return check


class NearTier:
    """MinHash LSH on the first rows of new keys; with near duplicates off it only roots their clusters."""

    name: ClassVar[str] = "near"
    reason: ClassVar[str] = "near_duplicate"

    def enabled(self, cfg: DedupConfig) -> bool:
        return True  # off, every candidate is its own cluster: the tier still roots them

    def apply(self, rows: RoundRows, dec: Decisions) -> None:
        cfg, state, pre, cand = rows.cfg, rows.state, rows.precomputed, dec.cand
        # the candidates' matches against earlier rounds: none to find when nothing is indexed (round 1) or near
        # duplicates are off; the partitioned reducers found them. Known before the signatures, the new rows are
        # told at once.
        old = None
        if not cfg.near or (pre is None and len(state.seen) == 0):
            old = np.full(len(cand), -1, np.int64)
        elif pre is not None:
            old = pre[2]
        if old is not None:
            _new_rows(rows, dec, old)
        from genrun.worker import runtime  # here: the shard's online skip imports this module, never a process pool

        threads = runtime.merge_workers()  # the signature blocks and bands run side by side
        if pre is None:
            import pyarrow as pa

            hasher = MinHasher(cfg.num_perm, 1, cfg.shingle_size)
            dec.sigs, dec.bands = hasher.kept_and_bands(
                rows.keys.take(pa.array(cand, pa.int64())), *state.seen.lsh, threads
            )
        else:
            dec.bands = state.seen.band_keys(pre[1], threads)
            dec.sigs = kept_sigs(pre[1])
        if cfg.near:
            if old is None:
                old = state.seen.match(dec.sigs, dec.bands)
                _new_rows(rows, dec, old)
            old, label, link = state.seen.assign(dec.sigs, dec.bands, old, threads)
        else:
            assert old is not None
            label, link = np.arange(len(cand)), old
        own = dec.ids[cand]
        croot = np.where(link >= 0, link, own[label])  # an earlier round's cluster, or the component's first row
        dec.root[cand] = croot
        near = cand[croot != own]
        dec.kept[near] = False
        dec.tier[near] = code(self)
        rest = dec.root == -1  # exact repeats within the round take their first occurrence's cluster
        dec.root[rest] = dec.root[dec.first_of[rest]]

    def online(self, state: OnlineState) -> OnlineCheck | None:
        near, own = state.cfg.near, state.own

        def check(b: Batch) -> None:
            """Earlier rounds' index, then this shard's by the merge's keep-first rule (`SeenIndex.assign`); the
            rows left are the shard's new ones: `own` indexes them (with near duplicates off, their keys only)."""
            if state.seen is not None:
                a = b.alive()
                b.skip(a[state.seen.contains_near(b.sigs[a], near)], EARLIER, self)
            rep = np.flatnonzero(b.found == REPEAT)  # an exact repeat was found where its first row was
            b.found[rep] = np.where(b.found[b.first_of[rep]] == EARLIER, EARLIER, SHARD)
            a = b.alive()
            bands = own.band_keys(b.sigs[a])
            if near and len(a):
                _, dup, link = own.assign(b.sigs[a], bands)
                b.skip(a[(link >= 0) | (dup != np.arange(len(a)))], SHARD, self)
            new = b.found[a] == NEW
            ids = np.arange(len(own), len(own) + int(new.sum()), dtype=np.int64)
            own.extend(b.sigs[a][new], bands[new], ids, ids, np.unique(b.hashes[a][new]), compact=True)

        return check


class SemanticTier:
    """Sentence-embedding cosine with an earlier kept row (earlier rounds' kept embeddings, then the round's kept
    rows), on the rows the earlier tiers kept. A dropped row names the kept row it duplicates and never drops
    another; rows of the round in its cluster (exact repeats, near duplicates) follow it. Updates the state's
    semantic index."""

    name: ClassVar[str] = "semantic"
    reason: ClassVar[str] = "semantic_duplicate"

    def enabled(self, cfg: DedupConfig) -> bool:
        return cfg.semantic is not None

    def apply(self, rows: RoundRows, dec: Decisions) -> None:
        import pyarrow as pa
        from genrun.worker.semantic import apply_tier

        sem = rows.cfg.semantic
        assert sem is not None
        surv = np.flatnonzero(dec.kept)
        if rows.embeddings is not None:  # embedded and indexed by the caller (`genrun dedup`)
            assert rows.state.semantic is not None, "embeddings need the state's semantic index"
            res = rows.state.semantic.filter_add(rows.embeddings[surv], dec.ids[surv])
        else:
            keys = rows.survivor_keys(surv)
            res, rows.state.semantic, _ = apply_tier(
                [str(k) for k in keys.to_pylist()], dec.ids[surv], rows.state.semantic,
                model=sem.model, threshold=sem.threshold, batch_size=sem.batch_size,
            )  # fmt: skip
        drop = surv[~res.keep]
        twin = res.dup_of[~res.keep]
        dec.kept[drop] = False
        dec.tier[drop] = code(self)
        if len(drop):  # rows whose cluster root was dropped take its twin (a kept row) as root
            did = dec.ids[drop]  # ascending: survivors are in row order
            pos = np.searchsorted(did, dec.root).clip(0, len(did) - 1)
            hit = did[pos] == dec.root
            dec.root[hit] = twin[pos[hit]]
            dec.fresh &= ~(hit & (dec.root < rows.first_id))  # a duplicate of an earlier round's row is not new
        table = pa.table({"id": pa.array(dec.ids[drop]), "duplicate_of": pa.array(twin),
                          "cosine": pa.array(res.cosine[~res.keep], pa.float32())})  # fmt: skip
        dec.semantic_drops = SemanticDrops(table, drop)

    def online(self, state: OnlineState) -> OnlineCheck | None:
        from genrun.worker.semantic import SemanticIndex, embed_keys, load_embedder

        sem = state.cfg.semantic
        assert sem is not None
        embedder = load_embedder(sem.model, None, sem.batch_size)
        own = SemanticIndex(embedder.dim, sem.threshold, sem.model)  # the shard's kept rows
        earlier = state.semantic if state.semantic is not None and len(state.semantic) else None

        def check(b: Batch) -> None:
            """Earlier rounds' kept embeddings (read only), then this shard's kept rows (`filter_add`, the merge's
            rule). A row skipped here stays in the shard's exact/near index: the merge's near tier sees it too, so
            its near duplicates go either way."""
            a = b.alive()
            if not len(a):
                return
            emb = embed_keys(embedder, [b.keys[j] for j in a])
            if earlier is not None:
                dup = earlier.query(emb)[0]
                b.skip(a[dup], EARLIER, self)
                a, emb = a[~dup], emb[~dup]
            b.skip(a[~own.filter_add(emb, b.ids[a]).keep], SHARD, self)

        return check


EXACT, NEAR, SEMANTIC = ExactTier(), NearTier(), SemanticTier()
# The registry, cheapest first: the order they run in, and each tier's code (its place here).
TIERS: tuple[Tier, ...] = (EXACT, NEAR, SEMANTIC)
DUPLICATE_REASONS = tuple(t.reason for t in TIERS)


def code(tier: Tier) -> int:
    return next(i for i, t in enumerate(TIERS) if t.name == tier.name)


def enabled_tiers(cfg: DedupConfig) -> tuple[Tier, ...]:
    return tuple(t for t in TIERS if t.enabled(cfg))


def decide(rows: RoundRows) -> Decisions:
    """Every enabled tier, in order, on the round's new rows after everything in the state."""
    dec = Decisions.start(rows.n, rows.first_id)
    for tier in enabled_tiers(rows.cfg):
        tier.apply(rows, dec)
    return dec
