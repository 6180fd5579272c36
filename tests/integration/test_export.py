"""`<output>/dataset/` loads where users load data: Hugging Face `datasets` (both configs of the card) and pandas read
the folder `worker/export.py` completes, and `genrun push` stages exactly that folder.

The rows, round plans and reports come from a real local run (replay engine). Until the incremental merge writes
`dataset/data/train-rNNNN.parquet` itself, the test lays the parts out from the run's cumulative dataset: round r's
part is the rows of round r, in the contract schema (records.example_schema)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.worker.export import CARD_KEY, export_dataset, messages_jsonl_key, messages_key, part_metadata
from genrun.worker.storage import LocalStorage

from tests.integration.test_local_run import run, small_manifest

pytestmark = pytest.mark.integration
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # `datasets` reads local folders; nothing may reach the network


def _layout_parts(out: Path, raw_spec: dict, run_name: str) -> list[rec.RoundReport]:
    storage = LocalStorage(str(out))
    reports = []
    for rdir in sorted((out / "merge").glob("r*")):
        reports.append(rec.round_report_from(json.loads((rdir / "report.json").read_text())))
    if (out / "dataset" / "data").exists():  # the incremental merge wrote the parts itself
        return reports
    latest = pq.read_table(out / "merge" / f"r{reports[-1].round:04d}" / "dataset.parquet")
    assert latest.schema.equals(rec.example_schema(), check_metadata=False)
    (out / "dataset" / "data").mkdir(parents=True)
    for r in reports:
        part = latest.filter(latest.column("round").to_numpy() == r.round)
        pq.write_table(
            part.cast(rec.example_schema().with_metadata(part_metadata(raw_spec, run_name))),
            storage.location(f"dataset/data/train-r{r.round:04d}.parquet"),
        )
    return reports


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict, list[rec.RoundReport]]]:
    tmp = tmp_path_factory.mktemp("export")
    res = run(["run", str(small_manifest(tmp)), "--engine", "replay", "--jobs", "2", "-q"])
    assert res.returncode == 0, res.stderr
    out = tmp / "local"
    raw_spec = json.loads((out / "status.json").read_text())["spec"]
    reports = _layout_parts(out, raw_spec, "local")
    assert len(reports) >= 2
    storage = LocalStorage(str(out))
    for r in reports:  # as the merge calls it, round after round
        export_dataset(storage, raw_spec, "local", r)
    yield out, raw_spec, reports


def test_datasets_loads_the_folder_and_both_configs(
    exported: tuple[Path, dict, list[rec.RoundReport]], tmp_path: Path
) -> None:
    import datasets

    out, _, reports = exported
    kept = reports[-1].qc_passed_total
    ds = datasets.load_dataset(str(out / "dataset"), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == kept
    assert set(ds.column_names) == {name for name, _ in rec.EXAMPLE_COLUMNS}
    assert sorted(set(ds["round"])) == [r.round for r in reports if r.new_qc_passed]
    chat = datasets.load_dataset(str(out / "dataset"), "messages", split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert chat.num_rows == kept and chat.column_names == ["messages"]
    first = chat[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[0]["content"] == ds[0]["instruction"] and first[1]["content"] == ds[0]["response"]


def test_two_outputs_never_load_each_others_rows(
    exported: tuple[Path, dict, list[rec.RoundReport]], tmp_path: Path
) -> None:
    """`datasets` caches a local folder by its name (`dataset`, in every output) and a hash of the card's metadata:
    an output with other rows must not be served the first one's cached table."""
    import datasets

    out, raw_spec, reports = exported
    cache = str(tmp_path / "hf-cache")
    first = datasets.load_dataset(str(out / "dataset"), split="train", cache_dir=cache)
    assert first.num_rows == reports[-1].qc_passed_total
    other = tmp_path / "other"
    shutil.copytree(out, other)
    last = reports[-1].round
    (other / f"dataset/data/train-r{last:04d}.parquet").unlink()
    export_dataset(LocalStorage(str(other)), raw_spec, "local", reports[-2])
    second = datasets.load_dataset(str(other / "dataset"), split="train", cache_dir=cache)
    assert second.num_rows == reports[-2].qc_passed_total != first.num_rows


def test_pandas_reads_the_parts_with_the_spec_in_their_metadata(
    exported: tuple[Path, dict, list[rec.RoundReport]],
) -> None:
    import pandas as pd

    out, raw_spec, reports = exported
    df = pd.read_parquet(out / "dataset" / "data")
    assert len(df) == reports[-1].qc_passed_total
    assert df.groupby("round").size().to_dict() == {r.round: r.new_qc_passed for r in reports if r.new_qc_passed}
    meta = json.loads(pq.read_schema(next((out / "dataset" / "data").glob("*.parquet"))).metadata[b"genrun"])
    # The spec as applied, raw or with defaults filled in (the merge has it parsed): the same spec either way.
    assert parse_spec(meta["spec"]) == parse_spec(raw_spec) and meta["run"] == "local" and meta["version"]
    last = reports[-1]
    jl = pd.read_json(out / messages_jsonl_key(last.round), lines=True)
    assert len(jl) == last.new_qc_passed and list(jl.columns) == ["messages"]
    chat_meta = json.loads(pq.read_schema(out / messages_key(last.round)).metadata[b"genrun"])
    assert parse_spec(chat_meta["spec"]) == parse_spec(raw_spec) and chat_meta["report"] == rec.plain(last)


def test_card_front_matter_and_what_it_records(exported: tuple[Path, dict, list[rec.RoundReport]]) -> None:
    out, raw_spec, reports = exported
    card = (out / CARD_KEY).read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    last = reports[-1]
    assert front["configs"][0] == {
        "config_name": "default", "default": True, "data_files": [{"split": "train", "path": "data/train-*.parquet"}]
    }  # fmt: skip
    assert front["size_categories"] == ["n<1K"] and "synthetic" in front["tags"]
    # a content fingerprint per config (datasets' cache key), and no `splits` without the num_bytes datasets requires
    # (it warned on every load): tests/integration/test_figures.py loads the folder and checks for no warning
    assert [i["config_name"] for i in front["dataset_info"]] == ["default", "messages"]
    assert all("splits" not in i and "content" in i["description"] for i in front["dataset_info"])
    assert front["license"] == "unknown" and front["language"] == ["en"]
    assert "&id" not in card.split("---\n")[1]  # plain YAML, no anchors
    body = card.split("---\n", 2)[2]
    assert raw_spec["model"]["name"] in body
    for domain in raw_spec["prompt"]["domains"]:
        assert domain in body
    plan1 = rec.round_plan_from(json.loads((out / rec.round_plan_key(1)).read_text()))
    arms = "; ".join(dict.fromkeys(s.sampling.describe() for s in plan1.shards))
    assert (
        f"| 1 | {reports[0].shards} | {min(plan1.seeds)}-{max(plan1.seeds)} | {arms} | {reports[0].generated:,} |"
        in body
    )
    assert f"| kept (unique and QC-passed) | {last.qc_passed_total:,} |" in body
    assert f"| duplication ratio | {last.duplication_ratio:.1%} |" in body
    assert "Jaccard threshold 0.8" in body and "128 permutations" in body
    for reason, n in last.qc_rejected.items():
        assert f"| {reason} | {n:,} |" in body
    from genrun.worker.export import genrun_version

    assert f"genrun](https://github.com/genrun/genrun) {genrun_version()}" in body
    applied = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert applied["target"] == raw_spec["target"] and applied["dedup"]["threshold"] == 0.8  # defaults filled in


def test_export_is_a_pure_function_of_what_exists(
    exported: tuple[Path, dict, list[rec.RoundReport]], tmp_path: Path
) -> None:
    """Rerunning gives the same bytes; a messages file that is missing (a crash) comes back; a part a re-merge no
    longer writes loses its export too."""
    out, raw_spec, reports = exported
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    storage = LocalStorage(str(copy))

    def files() -> dict[Path, bytes]:
        return {
            p: p.read_bytes()
            for p in [*(copy / "dataset").rglob("*"), *copy.glob("merge/*/messages.jsonl")]
            if p.is_file()
        }

    before = files()
    (copy / messages_key(1)).unlink()
    (copy / messages_jsonl_key(1)).unlink()
    export_dataset(storage, raw_spec, "local", reports[-1])
    assert files() == before
    export_dataset(storage, parse_spec(raw_spec), "local", reports[-1])  # as the merge has it: parsed
    assert (copy / CARD_KEY).read_bytes() == before[copy / CARD_KEY]
    last = reports[-1].round
    (copy / f"dataset/data/train-r{last:04d}.parquet").unlink()
    export_dataset(storage, raw_spec, "local", reports[-2])
    assert not (copy / messages_key(last)).exists() and not (copy / messages_jsonl_key(last)).exists()


def test_push_stages_only_the_dataset_and_fails_in_one_line_offline(
    exported: tuple[Path, dict, list[rec.RoundReport]],
) -> None:
    """No network here, and huggingface_hub has no local Hub: this checks the upload plan (`--dry-run`) and that the
    real client is reached and refuses cleanly under HF_HUB_OFFLINE=1. The upload call itself is not exercised."""
    out, _, reports = exported
    dry = run(["push", str(out), "--repo", "me/quick", "--dry-run"])
    assert dry.returncode == 0, dry.stderr
    listed = [x.strip() for x in dry.stdout.splitlines()[1:]]
    rounds = [r.round for r in reports]
    assert listed == [
        "README.md",
        *[f"data/train-r{r:04d}.parquet" for r in rounds],
        *[f"messages/train-r{r:04d}.parquet" for r in rounds],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test"}
    res = run(["push", str(out), "--repo", "me/quick"], env=env)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("genrun: error: push to me/quick:") and "offline" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_push_before_any_export_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(json.dumps({"metadata": {"name": "x"}, "spec": {}, "status": {}}))
    res = run(["push", str(tmp_path), "--repo", "me/x", "--dry-run"])
    assert res.returncode == 2 and "no dataset card yet" in res.stderr and "Traceback" not in res.stderr
