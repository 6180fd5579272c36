"""`spec.dedup.against`: what earlier datasets or runs hold is already seen, a persistent seen-index.

Each source is a folder, a file or an s3:// URI (checked by genrun.contract.api.against_errors):
- a genrun run's output: its merge/rNNNN/kept.parquet files, the first row of every cluster it kept (QC-passed or
  not): every instruction that run counted as unique;
- otherwise every .parquet/.jsonl/.ndjson/.json file under it (or the file itself), rows in genrun's form, Alpaca,
  ShareGPT or chat messages (genrun.worker.dedup_cli.extract).

`load_against` reads them into the seed of both checks: the normalised keys, distinct, in source order; an exact and
near (MinHash) SeenIndex of them; and, when dedup.semantic is on, a SemanticIndex of their embeddings. The prior rows
are never dropped; they carry negative ids (-1 - position), so a row that duplicates one names it apart from this
run's own row ids. The generators add the seed to their online check (genrun.worker.generate); the merge starts
round 1 from it (genrun.worker.merge.seed_state).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from genrun.worker.datasets import SUFFIXES, extract, records, source_files
from genrun.worker.dedup import MinHasher, SeenIndex, dedup_keys, key_hashes
from genrun.worker.storage import Storage, read_parquet_file

if TYPE_CHECKING:
    from genrun.contract.api import GenerationRunSpec, S3Spec

log = logging.getLogger("genrun.against")


class AgainstError(Exception):
    """A source cannot be read: one line naming spec.dedup.against[i] and the fix (not retriable)."""


@dataclass
class AgainstSeed:
    keys: list[str]  # distinct normalised keys, in source order
    seen: SeenIndex  # exact + near; ids -1 - position in `keys`
    semantic: Any = None  # SemanticIndex of the keys when dedup.semantic is on; ids as above
    sources: tuple[tuple[str, int], ...] = ()  # (source, instructions read)


def _open(uri: str, s3: S3Spec | None) -> tuple[Storage, str]:
    """(storage over the source's folder, the key of the file itself or "" for a folder); an s3:// source is read
    through the run's own object store settings (spec.output.s3)."""
    from genrun.worker.storage import open_storage

    endpoint, region = (s3.endpoint, s3.region) if s3 is not None else ("", "us-east-1")
    if uri.lower().endswith(SUFFIXES):
        parent, _, name = uri.rstrip("/").rpartition("/")
        return open_storage(parent or "/", endpoint, region), name
    return open_storage(uri, endpoint, region), ""


def _instructions_of(path: Path, name: str) -> list[str]:
    if name.endswith("kept.parquet"):  # a run's own seen rows: (id, instruction)
        return [x for x in read_parquet_file(path, ["instruction"]).column("instruction").to_pylist() if x]
    out = []
    for raw in records(path):
        ins, _, _ = extract(raw)
        if ins:
            out.append(ins)
    return out


def read_source(uri: str, s3: S3Spec | None, where: str = "spec.dedup.against") -> list[str]:
    """The instructions a source holds (a run's kept rows, or every data file's rows), in key order."""
    from genrun.worker.storage import StorageError, local_copy

    try:
        storage, file_key = _open(uri, s3)
        if file_key:
            if not storage.exists(file_key):
                raise AgainstError(f"{where}: {uri}: no such file; fix the path or remove the entry")
            keys = [file_key]
        else:
            keys = source_files(storage.list(""))
            if not keys:
                raise AgainstError(
                    f"{where}: {uri}: holds no run output (merge/rNNNN/kept.parquet) and no .parquet/.jsonl/.json "
                    "file; name an earlier run's output folder or a dataset"
                )
        out: list[str] = []
        for k in keys:
            with local_copy(storage, k) as path:
                out += _instructions_of(path, k)
        return out
    except AgainstError:
        raise
    except (StorageError, OSError, ValueError, KeyError) as exc:
        raise AgainstError(f"{where}: {uri}: cannot read: {exc}") from exc
    except Exception as exc:  # pyarrow's errors on a damaged file, boto3's on a refused bucket
        raise AgainstError(f"{where}: {uri}: cannot read: {exc.__class__.__name__}: {exc}") from exc


def load_against(spec: GenerationRunSpec, *, semantic: bool | None = None) -> AgainstSeed | None:
    """The seed of the run's seen-index from spec.dedup.against (None when the list is empty). `semantic` overrides
    whether the semantic index is built (default: dedup.semantic.enabled)."""
    d = spec.dedup
    if not d.against:
        return None
    texts: list[str] = []
    sources = []
    for i, uri in enumerate(d.against):
        got = read_source(uri, spec.output.s3, f"spec.dedup.against[{i}]")
        sources.append((uri, len(got)))
        texts += got
    keys = list(dict.fromkeys(dedup_keys(texts, key="instruction", normalized=d.normalize)))
    hasher = MinHasher(d.num_perm, 1, d.shingle_size)
    seen = SeenIndex.empty(d.threshold, d.num_perm, 1, d.shingle_size)
    if keys:
        seen.admit(keys, hasher.signatures(keys), d.near_duplicates)
        seen.exact = np.union1d(seen.exact, key_hashes(keys))  # every key, near repeats among the sources too
        seen.ids = -1 - seen.ids  # prior rows: negative ids, apart from this run's global row ids
        seen.root = -1 - seen.root
    sem_index = None
    sem = d.semantic
    if sem.enabled if semantic is None else semantic:
        from genrun.worker.semantic import SemanticIndex, embed_keys, load_embedder

        emb = load_embedder(sem.model, None, sem.batch_size)
        sem_index = SemanticIndex(emb.dim, sem.threshold, sem.model)
        if keys:
            sem_index.add(embed_keys(emb, keys), -1 - np.arange(len(keys), dtype=np.int64))
    log.info("against: %d distinct instructions from %s", len(keys), ", ".join(f"{u} ({n})" for u, n in sources))
    return AgainstSeed(keys, seen, sem_index, tuple(sources))


def join_seen(a: SeenIndex | None, b: SeenIndex | None) -> SeenIndex | None:
    """Two seen-indexes as one (the generators: earlier rounds' and the against seed)."""
    parts = [x for x in (a, b) if x is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else SeenIndex.concat(parts)


def join_semantic(a: Any, b: Any) -> Any:
    """Two semantic indexes as one (a fresh index: neither input changes)."""
    parts = [x for x in (a, b) if x is not None and len(x)]
    if not parts:
        return a if a is not None else b
    from genrun.worker.semantic import SemanticIndex

    out = SemanticIndex(parts[0].dim, parts[0].threshold, parts[0].model)
    for p in parts:
        out.add(p.embeddings, p.ids)
    return out
