"""The dataset where users load data: `<output>/dataset/` is a Hugging Face dataset folder.

    dataset/README.md                      the dataset card: YAML front matter (configs, tags, size) + how it was made
    dataset/data/train-rNNNN.parquet       the merge's parts: new unique QC-passed rows of each round, full provenance
    dataset/messages/train-rNNNN.parquet   the same rows as chat `messages` (role/content), what TRL and most
                                           trainers read natively; its Parquet key-value metadata holds the spec and
                                           the round's report
    merge/rNNNN/messages.jsonl             the same as JSON lines, beside the merge's alpaca.jsonl and sharegpt.jsonl

`datasets.load_dataset("<output>/dataset")` reads the parts (the card's default config);
`load_dataset("<output>/dataset", "messages")` the chat form; pandas reads `data/` as one Parquet dataset. Rejected
rows live outside dataset/ (`<output>/rejected/`), so they never load as training data. (`datasets` picks one file
format per folder, so the JSON lines stay outside it.)

`export_dataset` runs in the merge Job after the round's parts are published and before its report (the completion
marker), so a retried merge redoes it. Everything it writes is derived from the parts, the round plans and the round
reports: deterministic, atomic per file, safe to rerun.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genrun.contract import records as rec
from genrun.worker.storage import Storage, local_copy, read_parquet

if TYPE_CHECKING:
    from genrun.contract.api import GenerationRunSpec

DATASET_DIR = "dataset"
PARTS_PREFIX = rec.DATASET_PREFIX
MESSAGES_PREFIX = f"{DATASET_DIR}/messages/"
CARD_KEY = f"{DATASET_DIR}/README.md"
PART_RE = re.compile(r"train-r(\d{4,})\.parquet$")
METADATA_KEY = b"genrun"  # Parquet key-value metadata: {"version", "run", "spec"} as JSON


def genrun_version() -> str:
    from genrun.contract import __version__

    return __version__


def _manifest(spec: Mapping[str, Any] | GenerationRunSpec) -> dict[str, Any]:
    """The spec as a manifest dict, from the raw spec (as applied) or the parsed GenerationRunSpec (defaults in)."""
    if isinstance(spec, Mapping):
        return dict(spec)
    from genrun.contract.api import to_manifest

    out: dict[str, Any] = to_manifest(spec)
    return out


def part_metadata(spec: Mapping[str, Any] | GenerationRunSpec, run: str) -> dict[bytes, bytes]:
    """Key-value metadata for a dataset part's Parquet schema (`example_schema().with_metadata(...)`): the spec that
    made the rows travels with them, whoever copies the file. `spec`: raw (a mapping) or parsed."""
    doc = {"version": genrun_version(), "run": run, "spec": _manifest(spec)}
    return {METADATA_KEY: json.dumps(doc, sort_keys=True).encode()}


def messages_key(rnd: int) -> str:
    return f"{MESSAGES_PREFIX}train-r{rnd:04d}.parquet"


def messages_jsonl_key(rnd: int) -> str:
    return f"{rec.merge_prefix(rnd)}/messages.jsonl"


def messages_schema() -> Any:
    import pyarrow as pa

    turn = pa.struct([pa.field("role", pa.string(), nullable=False), pa.field("content", pa.string(), nullable=False)])
    return pa.schema([pa.field("messages", pa.list_(turn), nullable=False)])


def _parts(storage: Storage) -> dict[int, str]:
    out = {}
    for key in storage.list(PARTS_PREFIX):
        m = PART_RE.search(key)
        if m:
            out[int(m.group(1))] = key
    return out


def json_strings(col: Any, ensure_ascii: bool = True) -> list[str]:
    """json.dumps(x, ensure_ascii=...) of each value of a string column (null -> null), by the json module's own
    string encoder, without json.dumps's per-call overhead: the same bytes."""
    from json.encoder import encode_basestring, encode_basestring_ascii

    enc = encode_basestring_ascii if ensure_ascii else encode_basestring
    values = col.to_pylist()
    if col.null_count:
        return [enc(v) if v is not None else "null" for v in values]
    return list(map(enc, values))


def _write_messages(storage: Storage, part: str, rnd: int, meta: dict[bytes, bytes]) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = read_parquet(storage, part, ["instruction", "response"])
    # The messages column built from the two string columns (no per-row Python objects); the JSON lines from the
    # column's strings: the bytes json.dumps({"messages": [...]}, ensure_ascii=False) gives, one dumps per string.
    n = table.num_rows
    ins, res = (table.column(c).combine_chunks() for c in ("instruction", "response"))
    turn = np.arange(2 * n).reshape(2, n).T.ravel()  # user turn i, then assistant turn i
    roles = pa.array(["user", "assistant"]).take(pa.array(turn // max(n, 1)))
    content = pa.concat_arrays([ins, res]).take(pa.array(turn))
    turns = pa.StructArray.from_arrays([roles, content], fields=list(messages_schema().field(0).type.value_type))
    msgs = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2), pa.int32()), turns)
    with storage.staged(messages_key(rnd)) as out:
        pq.write_table(pa.table({"messages": msgs}, schema=messages_schema().with_metadata(meta)), out)
    with storage.staged(messages_jsonl_key(rnd)) as lines, open(lines, "w") as f:
        f.writelines(
            f'{{"messages": [{{"role": "user", "content": {i}}}, {{"role": "assistant", "content": {r}}}]}}\n'
            for i, r in zip(json_strings(ins, ensure_ascii=False), json_strings(res, ensure_ascii=False), strict=True)
        )
    return int(table.num_rows)


def _reports(storage: Storage, upto: int) -> list[rec.RoundReport]:
    out = []
    for r in range(1, upto + 1):
        key = rec.round_report_key(r)
        if storage.exists(key):
            out.append(rec.round_report_from(json.loads(storage.read_bytes(key))))
    return out


def _plans(storage: Storage, upto: int) -> dict[int, rec.RoundPlan]:
    out = {}
    for r in range(1, upto + 1):
        key = rec.round_plan_key(r)
        if storage.exists(key):
            out[r] = rec.round_plan_from(json.loads(storage.read_bytes(key)))
    return out


def export_dataset(
    storage: Storage,
    spec: Mapping[str, Any] | GenerationRunSpec,
    run: str,
    report: rec.RoundReport,
    rewritten: Iterable[int] = (),
) -> None:
    """Bring `<output>/dataset/` up to date with round `report.round`: the messages export of every part that has
    none yet or was (re)written this time (`rewritten`: rounds a full re-merge replayed; the current round always),
    and the dataset card. `spec`: the run's spec, raw (a mapping) or parsed; `report`: the round's report, which may
    not be published yet."""
    raw_spec = _manifest(spec)
    parts = _parts(storage)
    have = {int(m.group(1)) for k in storage.list(MESSAGES_PREFIX) if (m := PART_RE.search(k))}
    todo = sorted({r for r in parts if r not in have} | ({report.round, *rewritten} & set(parts)))
    # Every round merged so far (a round merged again, its report set aside as damaged, is not the latest): the card
    # an undamaged run has.
    upto = max(report.round, *parts) if parts else report.round
    reports = {x.round: x for x in _reports(storage, upto) if x.round != report.round}
    reports[report.round] = report
    for r in todo:
        meta = part_metadata(raw_spec, run)
        if r in reports:
            meta[METADATA_KEY] = json.dumps(
                {**json.loads(meta[METADATA_KEY]), "report": rec.plain(reports[r])}, sort_keys=True
            ).encode()
        _write_messages(storage, parts[r], r, meta)
    for r in sorted(have - set(parts)):  # a part a re-merge no longer writes: its export goes too
        storage.delete(messages_key(r))
        storage.delete(messages_jsonl_key(r))
    card = render_card(raw_spec, run, [reports[k] for k in sorted(reports)], _plans(storage, upto))
    storage.write_bytes(CARD_KEY, card.encode())


# --------------------------------------------------------------------------------------------------------------
# The dataset card


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M")):  # fmt: skip
        if n < bound:
            return name
    return "10M<n<100M"


def _front_matter(run: str, rows: int, fingerprint: str, license_: str, language: Sequence[str]) -> str:
    """Hub metadata. `dataset_info` names the content (a fingerprint of the run's reports and spec): `datasets`
    caches a local folder under its name and a hash of this metadata, so without it two outputs' `dataset/` folders
    would share one cache entry and the second load would return the first one's rows. It lists no `splits`:
    `datasets` reads a split only with its `num_bytes` (the Arrow size, known only by reading every part) and warns
    on each load without it; the row count is in the card's text and `size_categories`."""
    import yaml

    info = {"description": f"genrun run {run}; content {fingerprint}"}
    meta = {
        "pretty_name": f"genrun: {run}",
        "license": license_,
        "language": list(language),
        "tags": ["synthetic", "instruction-tuning", "genrun"],
        "task_categories": ["text-generation"],
        "size_categories": [_size_category(rows)],
        "configs": [
            {"config_name": "default", "default": True,
             "data_files": [{"split": "train", "path": "data/train-*.parquet"}]},
            {"config_name": "messages", "data_files": [{"split": "train", "path": "messages/train-*.parquet"}]},
        ],
        "dataset_info": [{"config_name": name, **json.loads(json.dumps(info))} for name in ("default", "messages")],
    }  # fmt: skip
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _fingerprint(raw_spec: Mapping[str, Any], run: str, reports: Sequence[rec.RoundReport]) -> str:
    import hashlib

    doc = json.dumps([run, raw_spec, [rec.plain(r) for r in reports]], sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_card(
    raw_spec: Mapping[str, Any], run: str, reports: Sequence[rec.RoundReport], plans: Mapping[int, rec.RoundPlan]
) -> str:
    """The dataset card: what a reader needs to trust or reproduce the data, from the spec as applied (defaults
    filled in), the round plans (seeds and sampling) and the round reports (counts). Each section is a list of lines
    ending with a blank one."""
    from genrun.contract.api import parse_spec, to_manifest

    spec = parse_spec(dict(raw_spec))
    eff: dict[str, Any] = to_manifest(spec)
    last = reports[-1]
    lines = [
        *_card_title(spec, eff, run, reports),
        *_LOAD_IT,
        *_card_yield(last),
        *_card_rounds(reports, plans),
        *_card_model_and_prompt(spec),
        *_card_dedup(spec, eff.get("dedup", {}), last),
        *_card_semantic_clusters(last),
        *_card_quality(spec, last),
        *_card_columns_and_spec(eff),
    ]
    return "\n".join(lines)


def _card_title(
    spec: GenerationRunSpec, eff: Mapping[str, Any], run: str, reports: Sequence[rec.RoundReport]
) -> list[str]:
    """The Hub front matter, the title, what the dataset is and whose licence applies."""
    last, out = reports[-1], spec.output
    return [
        _front_matter(run, last.qc_passed_total, _fingerprint(eff, run, reports), out.license, out.language),
        f"# {run}",
        "",
        f"A synthetic instruction dataset generated by [genrun](https://github.com/genrun/genrun) {genrun_version()} "
        f"from **{spec.model.name}**: {last.qc_passed_total:,} unique, quality-checked instruction/response pairs "
        f"(target {spec.target.unique_examples:,}) after {last.round} round(s).",
        "",
        f"Licence: `{out.license}` (spec.output.license). The rows are outputs of `{spec.model.name}`: that model's "
        "licence and terms of use may restrict what its outputs can be used for; checking them is yours.",
        "",
    ]


_LOAD_IT = (
    "## Load it",
    "",
    "```python",
    "from datasets import load_dataset",
    'ds = load_dataset("path/to/dataset")              # full rows with provenance (data/train-*.parquet)',
    'chat = load_dataset("path/to/dataset", "messages")  # role/content messages (messages/train-*.parquet)',
    "```",
    "",
    "Each round adds one part, `data/train-rNNNN.parquet` (and `messages/train-rNNNN.parquet`); the dataset is "
    "their union. The Parquet metadata of each messages part (key `genrun`) holds the spec and that round's "
    "report. Rows rejected as duplicates or by QC are kept outside this folder, with their reason.",
    "",
)


def _card_yield(last: rec.RoundReport) -> list[str]:
    """The run's totals after its last round."""
    return [
        "## Yield",
        "",
        "| | |",
        "|---|---|",
        f"| instructions generated | {last.generated_total:,} |",
        f"| unique after dedup | {last.unique_total:,} |",
        f"| kept (unique and QC-passed) | {last.qc_passed_total:,} |",
        f"| duplication ratio | {last.duplication_ratio:.1%} |",
        f"| {' / '.join(last.duplicates)} duplicates | {' / '.join(f'{n:,}' for n in last.duplicates.values())} |",
        f"| discarded (sampled past a shard's quota, or malformed) | {last.discarded_total:,} |",
        f"| dedup tiers the target counts through | {', '.join(last.dedup_tiers)} |",
        *([f"| rows that left their asked domain | {last.left_domain:,} |"] if last.left_domain else []),
        f"| tokens generated | {last.tokens_total:,} |",
        f"| kept per generated | {last.qc_passed_total / last.generated_total if last.generated_total else 0:.1%} |",
        "",
    ]


def _card_rounds(reports: Sequence[rec.RoundReport], plans: Mapping[int, rec.RoundPlan]) -> list[str]:
    """One table row per round: its seeds and sampling settings (from its plan) and what it added."""
    lines = [
        "## Rounds",
        "",
        "Each shard is one seed at one sampling setting; seeds are never reused.",
        "",
        "| round | shards | seeds | sampling | generated | new unique | new kept | marginal yield |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        plan = plans.get(r.round)
        # Shards of a round may run different arms (sampling settings): each distinct one, in the plan's order.
        arms = list(dict.fromkeys(x.sampling.describe() for x in plan.shards)) if plan else []
        seeds = _seed_ranges(plan.seeds) if plan else ""
        lines.append(
            f"| {r.round} | {r.shards} | {seeds} | {'; '.join(arms)} | {r.generated:,} | {r.new_unique:,} | "
            f"{r.new_qc_passed:,} | {r.marginal_yield:.3f} |"
        )
    return [*lines, ""]


def _card_model_and_prompt(spec: GenerationRunSpec) -> list[str]:
    p = spec.prompt
    return [
        "## Model and prompt",
        "",
        f"- model: `{spec.model.name}` (dtype {spec.model.dtype}, max model length {spec.model.max_model_len})",
        f"- generation mode: {spec.generation.mode}; max tokens {spec.sampling.max_tokens}; min_p {spec.sampling.min_p:g}",
        f"- domains ({len(p.domains)}): {', '.join(p.domains) if p.domains else '(none)'}",
        f"- few-shot examples: {len(p.examples)} in the spec, {p.examples_per_prompt} per prompt",
        f"- prompt template: `{_md_escape(p.template)}`",
        "",
    ]


# The dedup settings the card words itself; any other key under spec.dedup is listed with its parameters.
_DEDUP_WORDED = frozenset({"key", "normalize", "online", "nearDuplicates", "threshold", "numPerm", "shingleSize",
                           "partitions", "semantic", "against"})  # fmt: skip


def _card_dedup(spec: GenerationRunSpec, dedup_manifest: Mapping[str, Any], last: rec.RoundReport) -> list[str]:
    """The tiers in the order they run, each with the parameters it ran with."""
    d = spec.dedup
    lines = [
        "## Deduplication",
        "",
        f"- exact: normalised key of the {d.key} (normalise: {str(d.normalize).lower()}), keep-first "
        "in (round, seed, index) order",
    ]
    if d.near_duplicates:
        lines.append(
            f"- near duplicates: MinHash LSH, Jaccard threshold {d.threshold:g}, {d.num_perm} "
            f"permutations, word shingles of {d.shingle_size}"
        )
    sem = d.semantic
    lines.append(
        f"- semantic: embeddings of `{sem.model}`, cosine threshold {sem.threshold:g}"
        if sem.enabled
        else "- semantic: off (dedup.semantic.enabled is false): paraphrases count as unique"
    )
    if d.against:
        lines.append(f"- against: instructions of {', '.join(f'`{a}`' for a in d.against)} count as seen")
    lines += [f"- {k}: `{json.dumps(v, sort_keys=True)}`" for k, v in dedup_manifest.items() if k not in _DEDUP_WORDED]
    return [
        *lines,
        f"- online: {'generators skip instructions seen in earlier rounds before writing responses' if d.online else 'off'}",
        f"- unique (the target) counts rows kept by the tiers: {', '.join(last.dedup_tiers)}",
        "",
    ]


def _card_semantic_clusters(last: rec.RoundReport) -> list[str]:
    """The semantic tier's largest clusters, so a reader can judge its threshold; nothing when it formed none."""
    if not last.semantic_clusters:
        return []
    return [
        "### Largest semantic clusters",
        "",
        "| rows | kept (first) | dropped (cosine with the first) |",
        "|---:|---|---|",
        *(
            f"| {c.size:,} | {_md_escape(c.first)} | "
            + "; ".join(f"{_md_escape(m)} ({cos:.2f})" for m, cos in c.members)
            + " |"
            for c in last.semantic_clusters
        ),
        "",
    ]


def _card_quality(spec: GenerationRunSpec, last: rec.RoundReport) -> list[str]:
    """The QC filters as they ran, and how many rows each rejected (most first)."""
    filters = [f"- {f.name}: {_qc_params(f.name, f.params)}" for f in spec.qc.filters] or ["- (none)"]
    rejected = [f"| {k} | {v:,} |" for k, v in sorted(last.qc_rejected.items(), key=lambda x: (-x[1], x[0]))] or [
        "| (nothing rejected) | 0 |"
    ]
    return [
        "## Quality checks",
        "",
        "Filters, in order (the first that objects names the reason):",
        "",
        *filters,
        "",
        "| rejected because | rows |",
        "|---|---|",
        *rejected,
        "",
    ]


def _card_columns_and_spec(eff: dict[str, Any]) -> list[str]:
    """The data/ columns with their meaning, and the spec as applied (defaults filled in)."""
    import yaml

    return [
        "## Columns (data/)",
        "",
        ", ".join(f"`{name}` ({typ})" for name, typ in rec.EXAMPLE_COLUMNS),
        "",
        "`domain` is the domain the prompt asked for (spec.prompt.domains), not a judgement of what the instruction "
        "is about. Where the generator had the embedding model, `generated_domain` is the spec domain nearest the "
        "instruction, `domain_margin` how much nearer it is than the asked one, and `relevance` the cosine between "
        "instruction and response; they are null without the model.",
        "",
        "## The spec as applied",
        "",
        "```yaml",
        yaml.safe_dump(eff, sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]


def _qc_params(name: str, params: Mapping[str, Any]) -> str:
    """A QC filter's parameters as it ran (the spec's over the defaults); a pattern list by its size."""
    from genrun.contract.qc_rules import effective_params

    eff = effective_params(name, params)
    shown = [f"{k} {len(v)} pattern(s)" if isinstance(v, list) else f"{k} {json.dumps(v)}" for k, v in eff.items()]
    if name in ("refusal", "bannedPatterns") and "patterns" not in eff:
        shown.append("the built-in refusal patterns" if name == "refusal" else "no patterns")
    return ", ".join(shown) or "(no parameters)"


def _seed_ranges(seeds: Sequence[int]) -> str:
    spans: list[list[int]] = []
    for s in sorted(seeds):
        if spans and spans[-1][1] == s - 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


# --------------------------------------------------------------------------------------------------------------
# Pushing to the Hugging Face Hub


def push_files(storage: Storage) -> list[str]:
    """What `genrun push` uploads, as paths inside the dataset repo: the card, the parts and the messages export.
    Nothing else under the output (plans, shards, rejected rows, merge state) ever leaves."""
    keys = [CARD_KEY] if storage.exists(CARD_KEY) else []
    keys += [k for k in storage.list(PARTS_PREFIX) if PART_RE.search(k)]
    keys += [k for k in storage.list(MESSAGES_PREFIX) if PART_RE.search(k)]
    return [k.removeprefix(f"{DATASET_DIR}/") for k in keys]


def stage_for_push(storage: Storage, dest: Path) -> list[str]:
    """Copy the files `push_files` names into `dest`, laid out as the repo; return their repo paths."""
    import shutil

    files = push_files(storage)
    if "README.md" not in files:
        raise FileNotFoundError(f"{storage.location(CARD_KEY)}: no dataset card yet (no round has been exported)")
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with local_copy(storage, f"{DATASET_DIR}/{name}") as src:
            shutil.copyfile(src, target)
    return files
