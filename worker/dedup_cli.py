"""`genrun dedup INPUT... [--against SEEN...] --output DIR`: deduplicate existing datasets with genrun's tiers.

Reads JSONL, JSON (an Alpaca-style list) and Parquet, with rows in genrun's form (instruction/response), Alpaca
(instruction/input/output), ShareGPT (conversations with from/value) or chat messages (role/content). Tiers, cheapest
first, keep-first in input order (SEEN rows first: what already exists is never dropped):

  exact     the normalised key (genrun.worker.dedup.dedup_keys)
  near      MinHash LSH on the exact-unique rows (MinHasher, band_keys/candidate_pairs via near_duplicate_labels)
  semantic  sentence-embedding cosine with an earlier kept row (genrun.worker.semantic), on by default

The tiers are the merge's own objects (genrun.worker.tiers EXACT, NEAR, SEMANTIC).

Writes DIR/kept.jsonl (the input rows as they were), DIR/dropped.jsonl (each row with `_dedup`: tier, the row it
duplicates and the similarity), DIR/invalid.jsonl (rows without an instruction, with the reason) and DIR/report.json;
every file is written to a temporary name and renamed. With --json the last stdout line is one JSON object
{"rows", "kept", "exact", "near", "semantic"} (duplicates removed per tier).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genrun.contract.errors import EXIT_OK, EXIT_USAGE
from genrun.worker.datasets import DatasetError, extract, records

if TYPE_CHECKING:
    import numpy as np
    from genrun.worker.dedup_config import DedupConfig
    from genrun.worker.tiers import Decisions


class DedupUsageError(Exception):
    """Bad arguments or unreadable input: one line on stderr, exit code 2."""


@dataclass
class Row:
    source: str  # file name
    line: int  # 1-based row number in that file
    instruction: str | None
    response: str
    raw: Any  # the row as read, written back unchanged
    why: str = ""  # why instruction is None


def expand(paths: Sequence[str]) -> list[str]:
    """Folders become their files: a genrun run output its merge/rNNNN/kept.parquet (every instruction the run
    counted as unique, as spec.dedup.against reads it), any other folder its .jsonl/.json/.parquet files, sorted."""
    from genrun.worker.datasets import source_files

    out: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.is_dir():
            out.append(p)
            continue
        files = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
        found = source_files(files)
        if not found:
            raise DedupUsageError(f"{p}: a folder with no .jsonl, .json or .parquet file and no genrun run output")
        out += [str(path / f) for f in found]
    return out


def read_rows(paths: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    for p in expand(paths):
        path = Path(p)
        if not path.is_file():
            raise DedupUsageError(
                f"{p}: no such file or folder (inputs are .jsonl, .json or .parquet files or folders)"
            )
        if not path.name.lower().endswith((".jsonl", ".json", ".parquet", ".ndjson")):
            raise DedupUsageError(f"{p}: unknown format; name the file .jsonl, .json (a list) or .parquet")
        try:
            for i, raw in enumerate(records(path), 1):
                ins, res, why = extract(raw)
                if isinstance(raw, dict) and "_unparsable" in raw:
                    ins, why = None, "unparsable_json"
                rows.append(Row(str(p), i, ins, res, raw, why))
        except DatasetError as exc:
            raise DedupUsageError(str(exc)) from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DedupUsageError(f"{p}: cannot read: {exc}") from exc
        except Exception as exc:  # pyarrow's errors: a damaged Parquet file
            if type(exc).__module__.startswith("pyarrow"):
                raise DedupUsageError(f"{p}: cannot read Parquet: {exc}") from exc
            raise
    return rows


@dataclass
class Decision:
    tier: np.ndarray  # object: "" kept, "exact", "near", "semantic"
    dup_of: np.ndarray  # int64: the row (in the combined order) it duplicates, -1 if kept
    similarity: np.ndarray  # float: 1.0 exact, Jaccard estimate for near, cosine for semantic


def decide(
    instructions: Sequence[str], n_seen: int, *, key_texts: Sequence[str] | None = None, threshold: float = 0.8,
    num_perm: int = 128, shingle_size: int = 1, near: bool = True, semantic: bool = True,
    semantic_threshold: float | None = None, model: str | None = None, batch_size: int | None = None,
) -> Decision:  # fmt: skip
    """Per row (SEEN rows first, then INPUT rows, keep-first): which tier drops it and for which earlier row.
    SEEN rows are never dropped; they only make INPUT rows duplicates."""
    import numpy as np
    import pyarrow as pa
    from genrun.worker.dedup import MinHasher, dedup_keys, similar
    from genrun.worker.dedup_config import DedupConfig
    from genrun.worker.merge_state import State
    from genrun.worker.tiers import EXACT, NEAR, RoundRows
    from genrun.worker.tiers import decide as tiers_decide

    n = len(instructions)
    tier = np.full(n, "", dtype=object)
    dup_of = np.full(n, -1, dtype=np.int64)
    sim = np.zeros(n, dtype=np.float64)
    keys = dedup_keys(list(key_texts if key_texts is not None else instructions))
    # Exact and near tiers: the merge Job's own tiers, rows numbered 0..n-1 in keep-first order (the keys are
    # normalised already; the semantic tier below indexes every SEEN row, not only the kept ones).
    cfg = DedupConfig(normalize=False, near=near, threshold=threshold, num_perm=num_perm, shingle_size=shingle_size)
    dec = tiers_decide(RoundRows(cfg, State.empty(cfg), 0, keys=pa.array(keys, pa.string())))
    is_in = np.arange(n) >= n_seen
    dropped = is_in & ~dec.kept & (dec.root != np.arange(n))
    ex, nd = dropped & dec.dropped_by(EXACT), dropped & dec.dropped_by(NEAR)
    tier[ex], dup_of[ex], sim[ex] = "exact", dec.root[ex], 1.0
    tier[nd], dup_of[nd] = "near", dec.root[nd]
    if nd.any():  # the estimated Jaccard similarity with the row it duplicates, for people reading dropped.jsonl
        rows = np.flatnonzero(nd)
        hasher = MinHasher(num_perm, 1, shingle_size)
        a = hasher.signatures(pa.array([keys[i] for i in rows], pa.string()))
        b = hasher.signatures(pa.array([keys[i] for i in dec.root[rows]], pa.string()))
        sim[rows] = similar(a, b)
    d = Decision(tier, dup_of, sim)
    if semantic:
        _semantic(d, keys, n_seen, cfg, dec, model=model, threshold=semantic_threshold, batch_size=batch_size)
    return d


def _semantic(
    d: Decision, keys: list[str], n_seen: int, cfg: DedupConfig, dec: Decisions, *, model: str | None,
    threshold: float | None, batch_size: int | None,
) -> None:  # fmt: skip
    """The merge's semantic tier (tiers.SEMANTIC) on the INPUT rows exact and near kept, in order, after every SEEN
    row: the SEEN rows are the tier's earlier rows, all indexed (never dropped, even the repeats among them). Marks
    its drops in `d`. SEEN and INPUT rows are embedded in one call."""
    import dataclasses

    import numpy as np
    from genrun.worker import semantic as sem
    from genrun.worker.dedup_config import SemanticConfig
    from genrun.worker.merge_state import State
    from genrun.worker.tiers import SEMANTIC, RoundRows

    t = sem.DEFAULT_THRESHOLD if threshold is None else threshold
    scfg = SemanticConfig(model or sem.DEFAULT_MODEL, t, batch_size or sem.DEFAULT_BATCH_SIZE)
    embedder = sem.load_embedder(scfg.model, None, scfg.batch_size)
    alive = np.flatnonzero(d.tier == "")
    emb = np.zeros((len(keys), embedder.dim), dtype=np.float32)
    emb[alive] = sem.embed_keys(embedder, [keys[i] for i in alive])
    state = State.empty(cfg)
    seen = alive[alive < n_seen]
    state.semantic = sem.SemanticIndex(embedder.dim, t, embedder.name)
    state.semantic.add(emb[seen], seen)
    dec.kept = d.tier == ""
    dec.kept[:n_seen] = False
    SEMANTIC.apply(RoundRows(dataclasses.replace(cfg, semantic=scfg), state, 0, embeddings=emb), dec)
    drops = dec.semantic_drops
    assert drops is not None
    rows = drops.rows
    d.tier[rows], d.dup_of[rows] = "semantic", drops.table["duplicate_of"].to_numpy()
    d.similarity[rows] = drops.table["cosine"].to_numpy()


def _write_jsonl(path: Path, rows: Iterator[Any]) -> int:
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Read SEEN and INPUT rows, decide each INPUT row's tier, write kept/dropped/invalid rows and the report."""
    t0 = time.monotonic()
    seen_rows = read_rows(args.against)
    in_rows = read_rows(args.inputs)
    valid_seen = [r for r in seen_rows if r.instruction is not None]
    invalid = [r for r in in_rows if r.instruction is None]
    rows = valid_seen + [r for r in in_rows if r.instruction is not None]  # SEEN rows first, then INPUT rows
    base = len(valid_seen)
    d = _decide_rows(args, rows, base)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    kept_n = _write_rows(out, rows, base, invalid, d)
    tiers = d.tier[base:]
    report = {
        "rows": len(in_rows),
        "kept": kept_n,
        **{t: int((tiers == t).sum()) for t in ("exact", "near", "semantic")},
        "invalid": len(invalid),
        "against_rows": len(seen_rows),
        "inputs": list(args.inputs),
        "against": list(args.against),
        "parameters": _parameters(args),
        "top_semantic_clusters": _top_semantic_clusters(rows, base, d),
        "seconds": round(time.monotonic() - t0, 3),
    }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, out / "report.json")
    return report


def _decide_rows(args: argparse.Namespace, rows: Sequence[Row], n_seen: int) -> Decision:
    """`decide` with the flags: exact and near compare the instruction, or instruction and response (--key pair)."""
    texts = [r.instruction or "" for r in rows]
    key_texts = (
        texts if args.key == "instruction" else [f"{t} \u241e {r.response}" for t, r in zip(texts, rows, strict=True)]
    )
    return decide(
        texts, n_seen, key_texts=key_texts, threshold=args.threshold, num_perm=args.num_perm,
        shingle_size=args.shingle_size, near=not args.no_near, semantic=not args.no_semantic,
        semantic_threshold=args.semantic_threshold, model=args.model, batch_size=args.batch_size,
    )  # fmt: skip


def _where(rows: Sequence[Row], base: int, j: int) -> dict[str, Any]:
    """Row `j` of the combined order as dropped.jsonl and the report name it (`seen`: a SEEN row)."""
    r = rows[j]
    return {"source": r.source, "row": r.line, "seen": j < base, "instruction": r.instruction}


def _write_rows(out: Path, rows: Sequence[Row], base: int, invalid: Sequence[Row], d: Decision) -> int:
    """kept.jsonl (INPUT rows as read), dropped.jsonl (with `_dedup`: tier, the row it duplicates, similarity) and
    invalid.jsonl (with the reason); returns the number of kept rows."""
    inputs = list(enumerate(rows[base:], base))
    kept_n = _write_jsonl(out / "kept.jsonl", (r.raw for j, r in inputs if not d.tier[j]))
    dropped = (
        {
            **(r.raw if isinstance(r.raw, dict) else {"row": r.raw}),
            "_dedup": {
                "tier": d.tier[j],
                "duplicate_of": _where(rows, base, int(d.dup_of[j])),
                "similarity": round(float(d.similarity[j]), 4),
                "source": r.source,
                "row": r.line,
            },
        }
        for j, r in inputs
        if d.tier[j]
    )
    _write_jsonl(out / "dropped.jsonl", dropped)
    _write_jsonl(
        out / "invalid.jsonl", ({"source": r.source, "row": r.line, "reason": r.why, "raw": r.raw} for r in invalid)
    )
    return kept_n


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the run used, defaults filled in, for the report."""
    return {
        "key": args.key,
        "threshold": args.threshold,
        "num_perm": args.num_perm,
        "shingle_size": args.shingle_size,
        "near": not args.no_near,
        "semantic": not args.no_semantic,
        "semantic_threshold": args.semantic_threshold if args.semantic_threshold is not None else _default_t(),
        "model": args.model or "embedded:all-minilm-l6-v2",
    }


def _top_semantic_clusters(rows: Sequence[Row], base: int, d: Decision, top: int = 10) -> list[dict[str, Any]]:
    """The semantic tier's largest clusters (largest first, then by kept row): the kept row and what it dropped."""
    import numpy as np

    clusters: dict[int, list[int]] = {}
    for j in np.flatnonzero(d.tier == "semantic"):
        clusters.setdefault(int(d.dup_of[j]), []).append(int(j))
    largest = sorted(clusters.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
    return [
        {"kept": _where(rows, base, k), "members": [rows[j].instruction for j in v], "size": len(v) + 1}
        for k, v in largest
    ]


def _default_t() -> float:
    from genrun.worker.semantic import DEFAULT_THRESHOLD

    return DEFAULT_THRESHOLD


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genrun dedup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `genrun dedup` (genrun.operator.cli adds them to its subcommand; this module imports no numpy
    until it runs)."""
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="dataset files or folders to deduplicate, in keep-first "
                   "order")  # fmt: skip
    p.add_argument("--against", nargs="+", default=[], metavar="SEEN", help="datasets or genrun run outputs that "
                   "already exist: input rows that duplicate them are dropped, they are never dropped themselves")  # fmt: skip
    p.add_argument("--output", required=True, help="folder for kept.jsonl, dropped.jsonl, invalid.jsonl, report.json")
    p.add_argument("--key", choices=("instruction", "pair"), default="instruction", help="what exact/near compare")
    p.add_argument("--threshold", type=float, default=0.8, help="MinHash Jaccard threshold (default 0.8)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    p.add_argument("--shingle-size", type=int, default=1, help="MinHash word n-gram size (default 1)")
    p.add_argument("--no-near", action="store_true", help="skip the MinHash tier")
    p.add_argument("--semantic-threshold", type=float, default=None, help="cosine threshold (default 0.9)")
    p.add_argument("--model", default=None, help="sentence-transformers path or id (default: all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=None, help="instructions embedded per batch (default 256)")
    p.add_argument("--no-semantic", action="store_true", help="skip the semantic tier")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object on the last line")


def _check(args: argparse.Namespace) -> None:
    if not 0 < args.threshold <= 1:
        raise DedupUsageError(f"--threshold: {args.threshold} is outside (0, 1]; 0.8 is the default")
    if args.semantic_threshold is not None and not 0 < args.semantic_threshold <= 1:
        raise DedupUsageError(f"--semantic-threshold: {args.semantic_threshold} is outside (0, 1]; 0.9 is the default")
    if not 16 <= args.num_perm <= 1024:
        raise DedupUsageError(f"--num-perm: {args.num_perm} is outside [16, 1024]; 128 is the default")
    if not 1 <= args.shingle_size <= 32:
        raise DedupUsageError(f"--shingle-size: {args.shingle_size} is outside [1, 32]; 1 is the default")
    if args.batch_size is not None and args.batch_size < 1:
        raise DedupUsageError(f"--batch-size: must be at least 1, got {args.batch_size}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise DedupUsageError(f"--output: {out} is a file; name a folder")


def main(argv: Sequence[str]) -> int:
    return run_args(build_parser().parse_args(list(argv)))


def run_args(args: argparse.Namespace) -> int:
    try:
        _check(args)
        report = run(args)
    except DedupUsageError as exc:
        print(f"genrun dedup: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        from genrun.worker.semantic import SemanticError

        if isinstance(exc, SemanticError):
            print(f"genrun dedup: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise
    line = {k: report[k] for k in ("rows", "kept", "exact", "near", "semantic")}
    if report["invalid"]:
        line["invalid"] = report["invalid"]
    print(
        f"{report['rows']:,} rows: kept {report['kept']:,}; dropped {report['exact']:,} exact, {report['near']:,} "
        f"near, {report['semantic']:,} semantic; {report['invalid']:,} invalid -> {args.output} "
        f"({report['seconds']:.1f}s)"
    )
    if args.json:
        print(json.dumps(line))
    return EXIT_OK
