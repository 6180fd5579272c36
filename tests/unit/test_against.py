"""spec.dedup.against: validation of the field, the seed built from earlier runs and datasets (genrun.worker.against),
the generators' online check and the merge's round 1 starting from it. Real files, the real merge and generator
(replay engine: the recorded SmolLM2 outputs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from genrun.contract import records as rec
from genrun.contract.api import SpecError, parse_spec
from genrun.worker.against import AgainstError, load_against
from genrun.worker.dedup import dedup_keys
from genrun.worker.merge import seed_state
from genrun.worker.storage import LocalStorage

from tests.helpers import example_row, write_shard

ROOT = Path(__file__).resolve().parents[2]


def _raw(tmp: Path, against: list[str], **dedup: Any) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["output"] = {"path": str(tmp / "out")}
    raw["dedup"] = {"against": against, **dedup}
    return raw


@pytest.mark.parametrize(
    ("against", "message"),
    [
        (["data/old"], r"spec\.dedup\.against\[0\]: 'data/old' is a relative path; name an earlier run's output"),
        (["https://x.org/d.jsonl"], r"against\[0\]: .* is not a folder, file or s3:// URI \(only s3:// is supported\)"),
        (["/data/../etc"], r"against\[0\]: must not hold a '\.\.' segment"),
        (["s3://A_bucket/x"], r"against\[0\]: bucket 'A_bucket' may hold only lowercase"),
        (["/old", "/old/"], r"against\[1\]: '/old/' is listed twice \(also against\[0\]\)"),
        (["OUT"], r"against\[0\]: is this run's own output\.path"),
    ],
)
def test_bad_sources_name_the_field_and_the_fix(tmp_path: Path, against: list[str], message: str) -> None:
    raw = _raw(tmp_path, [a.replace("OUT", str(tmp_path / "out")) for a in against])
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_good_sources_parse_and_default_is_empty(tmp_path: Path) -> None:
    spec = parse_spec(_raw(tmp_path, ["/data/run-a", "s3://datasets/alpaca/train.jsonl", "/data/b.parquet"]))
    assert spec.dedup.against == ("/data/run-a", "s3://datasets/alpaca/train.jsonl", "/data/b.parquet")
    assert parse_spec({**_raw(tmp_path, []), "dedup": {}}).dedup.against == ()


def _earlier_run(tmp: Path) -> tuple[Path, list[str]]:
    """A genrun run output made by the real merge: one round, two shards, a repeat and a QC reject among them."""
    from genrun.worker.merge import merge_round

    out = tmp / "run-a"
    storage = LocalStorage(out)
    rows = ["How do I bake sourdough bread at home?", "What is the capital city of France?",
            "How do I bake sourdough bread at home?", "Explain how a bicycle gear system works."]  # fmt: skip
    write_shard(storage, 1, 100, [example_row(t) for t in rows[:2]])
    write_shard(storage, 1, 101, [example_row(rows[2]), example_row(rows[3], response="")])  # rejected by QC
    spec = parse_spec(_raw(tmp / "a", []))
    merge_round(storage, spec, "a", 1, [(1, 100), (1, 101)])
    return out, [rows[0], rows[1], rows[3]]  # every unique instruction, QC-rejected ones too


def test_seed_from_a_run_output_and_datasets_in_three_layouts(tmp_path: Path) -> None:
    run_dir, run_rows = _earlier_run(tmp_path)
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Name three primary colours.", "input": "", "output": "Red..."}]))
    share = tmp_path / "ds" / "sharegpt.jsonl"
    share.parent.mkdir()
    share.write_text(json.dumps({"conversations": [{"from": "human", "value": "What is a prime number?"},
                                                   {"from": "gpt", "value": "A number..."}]}) + "\n")  # fmt: skip
    pq.write_table(pa.table({"instruction": ["How many days are there in a week?"], "response": ["Seven."]}),
                   tmp_path / "ds" / "part.parquet")  # fmt: skip
    spec = parse_spec(_raw(tmp_path, [str(run_dir), str(alpaca), str(tmp_path / "ds")]))
    seed = load_against(spec)
    assert seed is not None
    expected = dedup_keys([*run_rows, "Name three primary colours.", "How many days are there in a week?", "What is a prime number?"])  # fmt: skip
    assert sorted(seed.keys) == sorted(expected) and len(seed.keys) == 6
    assert [n for _, n in seed.sources] == [3, 1, 2]  # the run: its kept rows only, not its dataset files again
    probe = dedup_keys(["What is the capital city of France?", "what is the capital city of france",
                        "How do I bake sourdough bread at home today?", "Tell me a joke."])  # fmt: skip
    from genrun.worker.dedup import MinHasher

    sigs = MinHasher(spec.dedup.num_perm, 1, spec.dedup.shingle_size).signatures(probe)
    exact = seed.seen.contains_exact(probe)
    near = seed.seen.contains_near(sigs)
    assert exact.tolist() == [True, True, False, False] and near.tolist()[2:] == [True, False]
    assert (
        (seed.seen.ids < 0).all() and seed.semantic is not None and len(seed.semantic) == 6
    )  # semantic: on by default


def test_unreadable_sources_are_one_line_errors_naming_the_entry(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for against, words in (
        ([str(tmp_path / "empty")], "spec.dedup.against[0]: " + str(tmp_path / "empty") + ": holds no run output"),
        ([str(tmp_path / "empty"), str(tmp_path / "nope.jsonl")], "spec.dedup.against[1]: "),
    ):
        if len(against) == 2:
            (tmp_path / "empty" / "x.jsonl").write_text('{"instruction": "Hi there, who are you?"}\n')
        with pytest.raises(AgainstError) as err:
            load_against(parse_spec(_raw(tmp_path, against)))
        assert str(err.value).startswith(words) and "\n" not in str(err.value)


def test_the_generator_skips_what_an_earlier_run_wrote(tmp_path: Path) -> None:
    """The same shard (same seed: the replay engine gives the same instructions) run again against the first run's
    shard file: nothing the first run wrote is written again, and the skips count as seen."""
    from genrun.operator.planner import make_round
    from genrun.worker.engine import ReplayEngine
    from genrun.worker.generate import generate_shard

    spec_a = parse_spec(_raw(tmp_path / "a", []))
    s = spec_a.sampling
    shard = make_round(spec_a, 1, 1, rec.Sampling(s.temperature, s.top_p, s.repetition_penalty, 0.0, 64), {}, "")
    shard = shard.shards[0]
    a = LocalStorage(tmp_path / "a" / "out")
    generate_shard(a, spec_a, shard, ReplayEngine())
    first = tmp_path / "a" / "out" / rec.shard_data_key(1, shard.seed)
    spec_b = parse_spec(_raw(tmp_path / "b", [str(first)]))
    m = generate_shard(LocalStorage(tmp_path / "b" / "out"), spec_b, shard, ReplayEngine())
    keys_a = set(dedup_keys(pq.read_table(first).column("instruction").to_pylist()))
    keys_b = dedup_keys(
        pq.read_table(tmp_path / "b" / "out" / rec.shard_data_key(1, shard.seed)).column("instruction").to_pylist()
    )
    assert m.skipped_online >= len(keys_a) > 0 and not keys_a & set(keys_b)


def test_the_merge_starts_round_one_from_the_seed_and_later_rounds_keep_it(tmp_path: Path) -> None:
    """The merge Job's round 1 (merge_round) seeds its state from the sources (seed_state on State.empty), then
    round 2 loads the state, the seed's round-0 chunk included."""
    from genrun.worker.dedup_config import DedupConfig
    from genrun.worker.merge import State, merge_round

    run_dir, _run_rows = _earlier_run(tmp_path)
    spec = parse_spec(_raw(tmp_path, [str(run_dir)]))
    state = State.empty(DedupConfig.from_spec(spec.dedup))
    seed = seed_state(LocalStorage(tmp_path / "scratch"), spec, state)
    assert seed is not None and state.totals.rows == 3
    storage = LocalStorage(tmp_path / "out")
    write_shard(storage, 1, 100, [example_row("What is the capital city of France?"),
                                  example_row("How do I grow tomatoes on a balcony?")])  # fmt: skip
    r1 = merge_round(storage, spec, "t", 1, [(1, 100)])
    assert (r1.new_unique, r1.duplicates["exact"]) == (1, 1)
    write_shard(storage, 2, 101, [example_row("Explain how a bicycle gear system works."),
                                  example_row("How do I grow tomatoes on a balcony?"),
                                  example_row("What is the boiling point of water at sea level?")])  # fmt: skip
    r2 = merge_round(storage, spec, "t", 2, [(1, 100), (2, 101)])
    assert r2.new_unique == 1 and r2.duplicates["exact"] == 3 and r2.unique_total == 2
    rejected = pq.read_table(tmp_path / "out" / rec.rejected_part_key(2)).to_pylist()
    assert {r["instruction"]: r["duplicate_of"] for r in rejected if r["reject_reason"] == "exact_duplicate"}[
        "Explain how a bicycle gear system works."
    ] < 3  # names the seed row (ids 0..2)


def test_genrun_dedup_takes_folders_and_a_run_output_as_seen(tmp_path: Path, capsys: Any) -> None:
    """`genrun dedup FOLDER --against RUN_OUTPUT`: the run output gives its kept instructions (as spec.dedup.against
    reads it), a dataset folder its files; the last stdout line is the JSON counts."""
    from genrun.operator.cli import main as genrun_main

    run_dir, _ = _earlier_run(tmp_path)
    ds = tmp_path / "new"
    ds.mkdir()
    (ds / "a.jsonl").write_text(
        "".join(
            json.dumps({"instruction": t, "output": "x"}) + "\n"
            for t in ["What is the capital city of France?", "How do I keep basil alive indoors?"]
        )
    )
    pq.write_table(pa.table({"instruction": ["Explain how a bicycle gear system works."]}), ds / "b.parquet")
    code = genrun_main(["dedup", str(ds), "--against", str(run_dir), "--output", str(tmp_path / "o"), "--no-semantic",
                        "--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1]) == {"rows": 3, "kept": 1, "exact": 2, "near": 0, "semantic": 0}
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["against_rows"] == 3  # the run's three kept (unique) instructions, not its dataset files again
    (tmp_path / "void").mkdir()
    assert genrun_main(["dedup", str(tmp_path / "void"), "--output", str(tmp_path / "o2")]) == 2
    assert "void: a folder with no .jsonl, .json or .parquet file" in capsys.readouterr().err
