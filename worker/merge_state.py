"""The merge's state between rounds and the reading of shards: what the merge Job and the partitioned map/reduce
steps share (one module both import; neither imports the other's internals).

The state after round r is the concatenation of per-round chunks (merge/rNNNN/state.npz, seen-index.npz) and the
small cumulative totals (merge/rNNNN/state.json); see `State`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from genrun.contract import records as rec
from genrun.worker.dedup import SeenIndex, SortedQueries, normalize_array
from genrun.worker.dedup_config import DedupConfig
from genrun.worker.storage import Storage, local_copy, read_parquet

log = logging.getLogger("genrun.merge")

STATE_VERSION = 2

# ------------------------------------------------------------------------------------------------------------------
# Counters and state


@dataclass
class Counts:
    """Rows written, of them new unique (first of their cluster), of those QC-passed (kept in the dataset)."""

    rows: int = 0
    unique: int = 0
    kept: int = 0

    def add(self, other: Counts) -> None:
        self.rows += other.rows
        self.unique += other.unique
        self.kept += other.kept


@dataclass
class Totals:
    """The cumulative, small part of the state (state.json): everything the report sums over rounds."""

    version: int = STATE_VERSION
    params: dict[str, Any] = field(default_factory=dict)
    round: int = 0
    rows: int = 0  # global row ids handed out so far
    round_first_id: dict[int, int] = field(default_factory=dict)  # round -> its first global row id
    shards: list[tuple[int, int]] = field(default_factory=list)  # merged (round, seed)
    quarantined: list[str] = field(default_factory=list)
    per_round: dict[int, Counts] = field(default_factory=dict)
    per_domain: dict[str, Counts] = field(default_factory=dict)
    per_temperature: dict[float, Counts] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    generated: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, int] = field(default_factory=dict)
    discarded: dict[int, int] = field(default_factory=dict)  # round -> sampled, neither a row nor a skip
    left_domain: int = 0  # rows whose generated_domain is not the domain asked
    early: int = 0  # instructions the generators' QC rejected before their responses (in `rejected` by reason too)
    # The largest clusters so far as [kept id, size] (size desc, id asc): of all clusters, and of the semantic tier's.
    # A cluster that did not grow in a round keeps its rank, so a round needs only these and the clusters it grew.
    top: list[list[int]] = field(default_factory=list)
    sem_top: list[list[int]] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        for k in ("per_round", "per_domain", "per_temperature"):
            d[k] = [[key, c] for key, c in d[k].items()]
        for k in ("round_first_id", "generated", "tokens", "skipped", "discarded"):
            d[k] = [[key, v] for key, v in d[k].items()]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes) -> Totals:
        d = json.loads(raw)
        t = cls(version=d["version"], params=d["params"], round=d["round"], rows=d["rows"])
        t.round_first_id = {int(k): int(v) for k, v in d["round_first_id"]}
        t.shards = [(int(r), int(s)) for r, s in d["shards"]]
        t.quarantined = list(d["quarantined"])
        t.per_round = {int(k): Counts(**c) for k, c in d["per_round"]}
        t.per_domain = {str(k): Counts(**c) for k, c in d["per_domain"]}
        t.per_temperature = {float(k): Counts(**c) for k, c in d["per_temperature"]}
        t.rejected = {str(k): int(v) for k, v in d["rejected"].items()}
        t.left_domain = int(d["left_domain"])
        t.early = int(d["early"])
        for name in ("generated", "tokens", "skipped"):
            setattr(t, name, {int(k): int(v) for k, v in d[name]})
        t.discarded = {int(k): int(v) for k, v in d["discarded"]}
        t.top = [[int(i), int(n)] for i, n in d["top"]]
        t.sem_top = [[int(i), int(n)] for i, n in d["sem_top"]]
        return t


@dataclass
class State:
    """Everything a round needs from the rounds before it, as per-round chunks searched one by one (never joined or
    re-sorted: a round's work stays linear in its new rows). Chunk arrays are memory-mapped from the stored files, so
    a round reads only the pages its lookups touch.

    seen: the LSH bucket firsts (signature, band keys, id, cluster root) and all key hashes, what the generators
    load too; keys: per round, the distinct key hashes it saw first (sorted) with the global id of their cluster's
    first row; dups / sems: per round, the clusters (kept id, sorted) that grew and by how many rows (all tiers /
    the semantic tier); semantic: the semantic tier's index (the kept rows' embeddings), as the generators load it
    from the seen-index (`semantic.load_seen_semantic`)."""

    totals: Totals
    seen: SeenIndex
    keys: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    dups: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    sems: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    semantic: Any = None

    @classmethod
    def empty(cls, cfg: DedupConfig) -> State:
        return cls(Totals(params=cfg.params()), SeenIndex.empty(cfg.threshold, cfg.num_perm, 1, cfg.shingle_size))

    def lookup_keys(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(seen in an earlier round, the cluster's first row id or -1) of each key hash."""
        seen = np.zeros(len(h), dtype=bool)
        owner = np.full(len(h), -1, dtype=np.int64)
        if any(len(kh) for kh, _ in self.keys):
            q = SortedQueries.of(h)  # sorted once for every round's keys
            for kh, ko in self.keys:
                rows, at = q.find(kh)
                seen[rows] = True
                owner[rows] = ko[at]
        return seen, owner


def grown_sizes(chunks: list[tuple[np.ndarray, np.ndarray]], owners: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each owner's cluster size after this round's `counts`: 1 (its first row) + earlier rounds' + this round's."""
    size = 1 + counts.astype(np.int64)
    for o, c in chunks:
        if len(o) and len(owners):
            pos = np.searchsorted(o, owners).clip(0, len(o) - 1)
            hit = o[pos] == owners
            size[hit] += c[pos[hit]]
    return size


def top_clusters(prev: list[list[int]], owners: np.ndarray, sizes: np.ndarray, k: int = 10) -> list[list[int]]:
    """The k largest clusters (size desc, id asc) from the previous top and the clusters this round grew."""
    merged = {i: n for i, n in prev}
    merged.update(zip(owners.tolist(), sizes.tolist(), strict=True))
    return [[i, n] for i, n in sorted(merged.items(), key=lambda x: (-x[1], x[0]))[:k]]


def state_key(rnd: int, name: str) -> str:
    return f"{rec.merge_prefix(rnd)}/{name}"


def _npz_members(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed .npz (np.savez), memory-mapped: nothing is read until used."""
    import struct
    import zipfile

    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with zf.open(info) as m:
                    out[name] = np.lib.format.read_array(m)  # type: ignore[no-untyped-call]
                continue
            f.seek(info.header_offset + 26)
            n, e = struct.unpack("<HH", f.read(4))
            f.seek(info.header_offset + 30 + n + e)
            version = np.lib.format.read_magic(f)  # type: ignore[no-untyped-call]
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)  # type: ignore[no-untyped-call]
            if dtype.hasobject or int(np.prod(shape)) == 0 or not shape:
                with zf.open(info) as m:
                    out[name] = np.lib.format.read_array(m)  # type: ignore[no-untyped-call]
                continue
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                  order="F" if fortran else "C")  # fmt: skip
    return out


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Arrays as an uncompressed .npz, the file np.savez writes (what load_npz memory-maps), at `path` as given (numpy
    would append ".npz" to a staged temporary name). Each array's bytes go to the file as they lie in memory: np.savez
    copies them into 16 MiB bytes objects first, fresh copies of the whole state."""
    import zipfile

    fmt = np.lib.format
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            a = np.asarray(value)
            a = a if a.flags.c_contiguous else a.copy(order="C")
            if a.dtype.hasobject:
                raise TypeError(f"save_npz: {name} holds Python objects")
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                head = fmt.header_data_from_array_1_0(a)  # type: ignore[no-untyped-call]
                try:  # the version np.savez picks: 1.0 unless the header is too long for it
                    fmt.write_array_header_1_0(member, head)  # type: ignore[no-untyped-call]
                except ValueError:
                    fmt.write_array_header_2_0(member, head)  # type: ignore[no-untyped-call]
                member.write(a.reshape(-1).view(np.uint8).data)


def load_npz(storage: Storage, key: str) -> dict[str, np.ndarray]:
    with local_copy(storage, key) as path:  # a download's temp file stays readable while mapped
        return _npz_members(path)


def load_state(storage: Storage, cfg: DedupConfig, rnd: int) -> State | None:
    """The state after round `rnd` (None when it is missing or was made with other dedup parameters)."""
    if rnd < 1:
        return State.empty(cfg)
    try:
        totals = Totals.from_json(storage.read_bytes(state_key(rnd, "state.json")))
    except (KeyError, ValueError, TypeError) as exc:
        log.info("no usable merge state for round %d (%s): full re-merge", rnd, exc.__class__.__name__)
        return None
    if totals.version != STATE_VERSION or totals.params != cfg.params():
        log.info("dedup parameters changed since round %d: full re-merge", rnd)
        return None
    st = State.empty(cfg)
    st.totals = totals
    seens = []
    for r in sorted(totals.round_first_id):
        try:
            c = load_npz(storage, state_key(r, "state.npz"))
            seens.append(SeenIndex.from_npz(load_npz(storage, rec.seen_index_key(r))))
            st.keys.append((c["keys_hash"], c["keys_owner"]))
            st.dups.append((c["dup_owner"], c["dup_count"]))
            st.sems.append((c["sem_owner"], c["sem_count"]))
        except (KeyError, OSError, ValueError) as exc:
            log.warning("merge state chunk of round %d unreadable (%s): full re-merge", r, exc)
            return None
    if seens:
        st.seen = SeenIndex.concat(seens)
    if cfg.semantic is not None and totals.round_first_id:
        from genrun.worker.semantic import load_seen_semantic

        try:
            st.semantic = load_seen_semantic(storage, rnd)
        except (OSError, ValueError) as exc:
            log.warning("semantic index of round %d unreadable (%s): full re-merge", rnd, exc)
            return None
        if st.semantic is None:
            log.warning("semantic index of round %d missing: full re-merge", rnd)
            return None
    return st


def load_seen_index(storage: Storage, rnd: int) -> SeenIndex | None:
    """The seen-index after round `rnd`'s merge (its chunks of rounds 1..rnd joined), or None (round 0, none)."""
    parts = []
    for r in range(1, rnd + 1):
        key = rec.seen_index_key(r)
        if storage.exists(key):
            with contextlib.suppress(OSError, ValueError):
                parts.append(SeenIndex.from_npz(load_npz(storage, key)))
    return SeenIndex.concat(parts) if parts else None


def read_table(storage: Storage, key: str, columns: list[str] | None = None) -> Any:
    """A shard's rows (or some of its columns); a whole file whose schema differs from the contract is damage."""
    table = read_parquet(storage, key, columns)
    if columns is None and not table.schema.equals(rec.example_schema(), check_metadata=False):
        raise ValueError(f"schema differs from the contract: {table.schema}")
    return table


def round_keys(cfg: DedupConfig, cols: list[Any], threads: int = 1) -> Any:
    """Normalised dedup keys of all rows of a round (one Arrow array); each distinct raw text is normalised once, in
    up to `threads` threads. Normalised, they come as a dictionary array (the distinct raw texts normalised, and each
    row's index into them): the round's million rows are not copied out, key_hashes hashes each distinct text once and
    the signatures decode only the rows they need."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not cols:
        return pa.array([], pa.string())
    table = pa.concat_tables(cols)
    ins = table.column("instruction").combine_chunks()
    if cfg.key == "pair":
        ins = pc.binary_join_element_wise(ins, table.column("response").combine_chunks(), " \u241e ")
    if not cfg.normalize:
        return pc.utf8_trim_whitespace(ins)
    enc = pc.dictionary_encode(pc.fill_null(ins, ""))
    return pa.DictionaryArray.from_arrays(enc.indices, normalize_array(enc.dictionary, threads))
