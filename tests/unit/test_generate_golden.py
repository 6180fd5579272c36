"""generate_shard's output kept equal, row for row: the same spec, shard and engine give the same rows in the same
order, the same rejects and the same manifest counts (tokens included) as the recorded golden file. The engine is the
replay engine (recorded real SmolLM2-135M outputs; its samples follow the per-request seeds), so a change that alters
what the generator asks for, in which order, or what it keeps shows here.

The golden file was written by the generator before its stages were split out (issue 11, item 6), rewritten once
when rows gained the `attributes` column (every other value unchanged), and once when the generator began to run the
instruction side of QC before responses (`generation.qcBeforeResponse`, on by default): each instructions-first case
lost the rows whose instruction the merge's QC rejects (low log-probability here), with their response tokens, and
the `ungated` case (the check off) keeps the earlier output of `domains`; and once when shard markers gained
`examples` (the examples the shard's plan asked; every other value unchanged). To rewrite it after an intended change of
output: GENRUN_REGOLDEN=1 pytest tests/unit/test_generate_golden.py, and say why in the commit.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.worker.engine import Completion, Params, ReplayEngine
from genrun.worker.generate import generate_shard
from genrun.worker.prompts import INSTRUCTION, RESPONSE
from genrun.worker.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "generate-golden.json.gz"
CELL = (("task", "compare"), ("audience", "kids"))
ATTRIBUTES = [
    {"name": "task", "values": ["explain", "how-to", "compare"]},
    {"name": "audience", "values": ["kids", "experts"]},
]
# The quality columns come from an embedding model: kept to 4 decimals and compared within one unit of the last place,
# so that another CPU's float sums agree.
ROUNDED = ("relevance", "domain_margin")
TEXTS = ("instruction", "response", "text")


def _spec(case: str, tmp: Path) -> Any:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["output"] = {"path": str(tmp / case)}
    raw["generation"] = {"batchSize": 16}  # several batches per shard: the loop's sizing and carry-over matter
    # The goldens were recorded with the semantic tier off; the "semantic" case turns it on.
    raw["dedup"] = {**raw.get("dedup", {}), "semantic": {"enabled": False}}
    p = raw["prompt"]
    if case == "plain":
        p.pop("domains")
    elif case == "joint":
        raw["generation"]["mode"] = "joint"
    elif case == "ungated":
        raw["generation"]["qcBeforeResponse"] = False
    elif case == "best_of_3":
        raw["bestOfN"] = {"n": 3}
    elif case == "judge":
        raw["bestOfN"] = {"n": 3, "critic": "judge"}
    elif case == "semantic":
        raw["dedup"] = {"semantic": {"enabled": True}}
    elif case in ("attributes", "attributes_cell"):
        p["attributes"] = ATTRIBUTES
    elif case == "against":  # an earlier shard's rows count as seen: the online check against a seen-index
        raw["dedup"] = {**raw.get("dedup", {}), "against": [str(tmp / "domains" / rec.shard_data_key(1, 100))]}
    return parse_spec(raw)


CASES = (
    "plain",
    "domains",
    "malformed",
    "joint",
    "best_of_3",
    "judge",
    "semantic",
    "attributes",
    "attributes_cell",
    "against",
    "ungated",
)


def _shard(case: str, spec: Any) -> rec.ShardPlan:
    return rec.ShardPlan(
        round=1,
        seed=100,
        ordinal=3,
        examples=150 if case == "semantic" else 40,
        sampling=rec.Sampling(0.7, 0.9, 1.1, 0.0, 64),
        domains=tuple(spec.prompt.domains),
        cell=CELL if case == "attributes_cell" else (),
    )


class JointReplay:
    """Joint mode over the replay engine (which records instructions and responses apart): an instruction prompt's
    completion is the recorded instruction, the response marker and a response recorded for it."""

    def __init__(self, engine: ReplayEngine) -> None:
        self.engine, self.model = engine, engine.model

    def generate(self, prompts: list[str], params: list[Params]) -> list[list[Completion]]:
        out = []
        for prompt, p, cands in zip(prompts, params, self.engine.generate(prompts, params), strict=True):
            ins = cands[0]
            resp = self.engine.generate([f"{prompt}{ins.text.strip()}\n\n{RESPONSE}"], [p])[0][0]
            text = f"{ins.text}\n\n{RESPONSE}{resp.text}"
            lp = None if ins.logprob is None or resp.logprob is None else ins.logprob + resp.logprob
            out.append([Completion(text, ins.tokens + resp.tokens, lp, resp.finish_reason)])
        return out


class Rigged:
    """The replay engine with what it never records: every 5th instruction (by request seed) cut by max_tokens, every
    7th response empty after parsing, and a judge that scores 1-10 by a hash of its prompt."""

    def __init__(self, engine: ReplayEngine) -> None:
        self.engine, self.model = engine, engine.model

    def generate(self, prompts: list[str], params: list[Params]) -> list[list[Completion]]:
        out = []
        for prompt, p, cands in zip(prompts, params, self.engine.generate(prompts, params), strict=True):
            if prompt.endswith(INSTRUCTION):
                c = cands[0]
                out.append([Completion(c.text, c.tokens, c.logprob, "length")] if p.seed % 5 == 0 else cands)
            elif prompt.endswith(RESPONSE):
                c = cands[0]
                bad = Completion("### Instruction: more", c.tokens, c.logprob, c.finish_reason)
                out.append([bad, *cands[1:]] if p.seed % 7 == 0 else cands)
            else:
                score = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 10 + 1
                out.append([Completion(f" {score}/10", 3, -1.0, "stop")])
        return out


def _plain(v: Any, key: str = "") -> Any:
    if key in TEXTS:  # a digest keeps the file small; the first words say which text it was
        return f"{v[:24]}.. {hashlib.sha256(v.encode()).hexdigest()[:16]}"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and key in ROUNDED:
        return round(v, 4)
    return v


def _same_row(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal rows; the embedding model's scores (ROUNDED, to 4 places) within one unit of the last place: another CPU's
    float kernels move them by ~1e-5, which can round either way (0.1915 on one machine, 0.1914 on another)."""
    if a.keys() != b.keys():
        return False
    return all(
        abs(a[k] - b[k]) <= 1.5e-4
        if k in ROUNDED and isinstance(a[k], float) and isinstance(b[k], float)
        else a[k] == b[k]
        for k in a
    )


def run_cases(tmp: Path) -> dict[str, Any]:
    """Every case's rows, rejects and manifest counts (not its seconds or locations), as plain JSON values."""
    out: dict[str, Any] = {}
    engine = ReplayEngine()
    for case in CASES:
        spec = _spec(case, tmp)
        storage = LocalStorage(tmp / case)
        use = JointReplay(engine) if case == "joint" else Rigged(engine) if case in ("judge", "malformed") else engine
        m = generate_shard(storage, spec, _shard(case, spec), use)
        rows = pq.read_table(tmp / case / rec.shard_data_key(1, 100)).to_pylist()
        rejected = pq.read_table(tmp / case / rec.shard_rejected_key(1, 100)).to_pylist()
        counts = {k: v for k, v in rec.plain(m).items() if k not in ("seconds", "data", "rejected")}
        out[case] = {
            "manifest": counts,
            "rows": [{k: _plain(v, k) for k, v in r.items()} for r in rows],
            "rejected": [{k: _plain(v, k) for k, v in r.items()} for r in rejected],
        }
    return out


def test_generate_shard_output_equals_the_golden_file(tmp_path: Path) -> None:
    got = run_cases(tmp_path)
    if os.environ.get("GENRUN_REGOLDEN"):
        GOLDEN.write_bytes(gzip.compress(json.dumps(got, sort_keys=True, indent=0).encode(), mtime=0))
    want = json.loads(gzip.decompress(GOLDEN.read_bytes()))
    assert sorted(got) == sorted(want)
    for case in CASES:
        g, w = got[case], want[case]
        assert g["manifest"] == w["manifest"], case
        assert len(g["rows"]) == len(w["rows"]), case
        for i, (a, b) in enumerate(zip(g["rows"], w["rows"], strict=True)):
            assert _same_row(a, b), f"{case}: row {i} differs: {a} != {b}"
        assert g["rejected"] == w["rejected"], case
    # The cases exercise what they name (else the golden file would pin less than it claims).
    assert want["best_of_3"]["rows"][0]["candidates"] == 3 and want["judge"]["rows"][0]["critic_score"] is not None
    assert want["semantic"]["rows"][0]["generated_domain"] and want["against"]["manifest"]["skipped_online"] > 0
    assert all(r["domain"] == "" for r in want["plain"]["rows"]) and want["domains"]["rows"][0]["domain"]
    assert {r["reason"] for r in want["malformed"]["rejected"]} == {
        "instruction_truncated",
        "empty_response",
        "low_logprob",
    }
    early = want["domains"]["manifest"]["qc_rejected_before_response"]
    assert early and not want["ungated"]["manifest"]["qc_rejected_before_response"]
    assert len(want["domains"]["rows"]) + sum(early.values()) == len(want["ungated"]["rows"])
    assert {r["attributes"] for r in want["attributes_cell"]["rows"]} == {json.dumps(dict(CELL))}
    assert len({r["critic_score"] for r in want["judge"]["rows"]}) > 2


@pytest.mark.parametrize("case", ["domains"])
def test_a_published_shard_is_not_generated_again(tmp_path: Path, case: str) -> None:
    """Resume: a shard whose marker exists returns the marker and writes nothing (a retried Job exits at once)."""
    spec = _spec(case, tmp_path)
    storage = LocalStorage(tmp_path / case)
    first = generate_shard(storage, spec, _shard(case, spec), ReplayEngine())
    data = tmp_path / case / rec.shard_data_key(1, 100)
    before = data.stat().st_mtime_ns, data.read_bytes()

    class Refuses:
        model = "none"

        def generate(self, prompts: list[str], params: list[Any]) -> list[Any]:
            raise AssertionError("a published shard sampled again")

    assert generate_shard(storage, spec, _shard(case, spec), Refuses()) == first
    assert (data.stat().st_mtime_ns, data.read_bytes()) == before
