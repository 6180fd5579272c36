"""The per-tier duplicate counts come from one ordered list, contract.records.DUPLICATE_TIERS: the merge's tiers are
the worker's registered ones, every serialised form keeps its key names and order (`exact_duplicates`, ...), and a
tier added to the list is counted in every output a user reads (report JSON and Markdown, status, `genrun status`,
metrics, dataset card, HTML page) with no other change."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from genrun.contract import records as rec
from genrun.contract.api import parse_spec, to_manifest
from genrun.contract.status import RunStatus, Totals
from genrun.operator.charts import render_html
from genrun.operator.metrics import Metrics
from genrun.operator.planner import Observed, RunRef, decide
from genrun.operator.show import camel, print_status
from genrun.worker import merge, merge_report, merge_write, online, tiers
from genrun.worker.dedup_config import DedupConfig
from genrun.worker.export import render_card
from genrun.worker.merge_report import render_markdown
from genrun.worker.storage import LocalStorage
from prometheus_client import generate_latest

from tests.helpers import example_row, write_shard

ROOT = Path(__file__).resolve().parents[2]


def report(**duplicates: int) -> rec.RoundReport:
    unique, discarded = 60, 5
    return rec.RoundReport(round=1, shards=1, generated=100, new_unique=unique, new_qc_passed=50,
                           generated_total=unique + sum(duplicates.values()) + discarded, unique_total=unique,
                           qc_passed_total=50, duplicates=duplicates, discarded=discarded, discarded_total=discarded,
                           qc_rejected={"truncated": 10}, dedup_tiers=("exact", "near"))  # fmt: skip


def test_the_merge_tiers_are_the_contracts_in_order_and_online_is_last() -> None:
    assert [t.name for t in tiers.TIERS] == list(rec.MERGE_TIERS)
    assert (*rec.MERGE_TIERS, rec.ONLINE_TIER) == rec.DUPLICATE_TIERS


def test_the_report_json_keeps_one_key_per_tier_in_todays_order_and_reads_back() -> None:
    r = report(exact=1, near=2, semantic=3, online=4)
    keys = list(rec.plain(r))
    at = keys.index("skipped_online")
    assert keys[at : at + 6] == ["skipped_online", "exact_duplicates", "near_duplicates", "semantic_duplicates",
                                 "online_duplicates", "discarded"]  # fmt: skip
    doc = json.loads(rec.to_json(r))
    assert (doc["exact_duplicates"], doc["online_duplicates"]) == (1, 4) and "duplicates" not in doc
    assert rec.round_report_from(doc) == r
    assert [k for k in camel(r) if k.endswith("Duplicates")] == [
        "exactDuplicates", "nearDuplicates", "semanticDuplicates", "onlineDuplicates", "topDuplicates"]  # fmt: skip


def test_a_report_without_a_tier_counts_it_zero_and_an_unknown_tier_is_an_error() -> None:
    doc = json.loads(rec.to_json(report(exact=1)))
    del doc["semantic_duplicates"]  # a report written before the tier existed
    assert rec.round_report_from(doc).duplicates == {"exact": 1, "near": 0, "semantic": 0, "online": 0}
    with pytest.raises(ValueError, match=r"RoundReport.duplicates: unknown dedup tier\(s\) \['prefix'\]"):
        report(prefix=1)


def test_a_status_reads_tier_counts_with_defaults_and_drops_junk() -> None:
    totals = Totals.from_dict({"duplicates": {"near": 3, "exact": "x", "bogus": 2}})
    assert totals.duplicates == {"exact": 0, "near": 3, "semantic": 0, "online": 0}
    assert list(totals.to_dict()["duplicates"]) == list(rec.DUPLICATE_TIERS)


def test_a_tier_added_to_the_contract_is_counted_in_every_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A made-up "prefix" tier, added to the contract's list only: each output lists it in its place."""
    monkeypatch.setattr(rec, "DUPLICATE_TIERS", ("exact", "near", "semantic", "prefix", "online"))
    monkeypatch.setattr(rec, "MERGE_TIERS", ("exact", "near", "semantic", "prefix"))
    r = report(exact=1, near=2, semantic=3, prefix=4, online=5)
    assert rec.Accounting.total(r).problems() == []
    assert json.loads(rec.to_json(r))["prefix_duplicates"] == 4 and camel(r)["prefixDuplicates"] == 4
    assert "| Duplicates (all rounds): exact / near / semantic / prefix / online | 1 / 2 / 3 / 4 / 5 |" in (
        render_markdown(r, "sft")
    )
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    spec = parse_spec(raw)
    assert "| exact / near / semantic / prefix / online duplicates | 1 / 2 / 3 / 4 / 5 |" in render_card(
        to_manifest(spec), "sft", [r], {}
    )
    status = decide(RunRef("sft"), spec, dataclasses.replace(Observed(), reports={1: r})).status
    assert status.totals.to_dict()["duplicates"] == {"exact": 1, "near": 2, "semantic": 3, "prefix": 4, "online": 5}
    assert RunStatus.from_dict(status.to_dict()) == status

    m = Metrics()
    m.runs.update("data", "sft", 100, status, {})
    assert (
        'genrun_duplicates_total{name="sft",namespace="data",tier="prefix"} 4.0' in generate_latest(m.registry).decode()
    )

    doc = {"metadata": {"name": "sft"}, "spec": raw, "status": status.to_dict()}
    (tmp_path / rec.STATUS_KEY).write_text(json.dumps(doc))
    assert print_status(str(tmp_path)) == 0
    assert "  duplicates: 1 exact, 2 near, 3 semantic, 4 prefix; unique counts" in capsys.readouterr().out

    page = render_html("sft", [r], target=100)
    assert "15 rows dropped as duplicates: 1 exact, 2 near, 3 semantic, 4 prefix, 5 online;" in page
    assert "<td>prefix duplicate</td><td>4</td>" in page and ">prefix</text>" in page


class PrefixTier:
    """docs/dedup-tiers.md's worked example, as written there."""

    name: ClassVar[str] = "prefix"
    reason: ClassVar[str] = "prefix_duplicate"

    def enabled(self, cfg: DedupConfig) -> bool:
        return True

    def apply(self, rows: tiers.RoundRows, dec: tiers.Decisions) -> None:
        surv = np.flatnonzero(dec.kept)
        keys = [str(k)[:200] for k in rows.survivor_keys(surv).to_pylist()]
        first: dict[str, int] = {}
        for row, key in zip(surv.tolist(), keys, strict=True):
            if key in first:
                dec.kept[row] = False
                dec.tier[row] = tiers.code(self)
                dec.root[row] = dec.ids[first[key]]
            else:
                first[key] = row

    def online(self, state: tiers.OnlineState) -> tiers.OnlineCheck | None:
        kept: set[str] = set()  # the prefixes of the rows this shard kept

        def check(batch: tiers.Batch) -> None:
            for row in batch.alive().tolist():
                prefix = batch.keys[row][:200]
                if prefix in kept:
                    batch.skip(np.array([row]), tiers.SHARD, self)
                else:
                    kept.add(prefix)

        return check


HEAD = "Explain, step by step and with one worked example, how a household budget " * 3  # over 200 characters


def test_the_docs_prefix_tier_registered_by_patching_is_counted_by_the_merge(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Emulated registration: the docs' PrefixTier is put into worker/tiers.py's TIERS (and the contract's list) by
    patching the module attributes, and the names the merge's modules imported from it, instead of editing the files.
    A real merge then drops the row by it and counts it in the report, its JSON and its Markdown."""
    registered = (*tiers.TIERS, PrefixTier())
    reasons = tuple(t.reason for t in registered)
    monkeypatch.setattr(rec, "DUPLICATE_TIERS", ("exact", "near", "semantic", "prefix", "online"))
    monkeypatch.setattr(rec, "MERGE_TIERS", ("exact", "near", "semantic", "prefix"))
    for module in (tiers, merge_report):
        monkeypatch.setattr(module, "TIERS", registered)
    for module in (tiers, merge_report, merge_write, merge):
        monkeypatch.setattr(module, "DUPLICATE_REASONS", reasons)
    storage = LocalStorage(tmp_path / "out")
    write_shard(storage, 1, 100, [example_row(HEAD + "works for a family of four."),
                                  example_row(HEAD + "works for a student living alone."),
                                  example_row("Name three prime numbers.")], skipped=2)  # fmt: skip
    spec = parse_spec({"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "output": {"path": "/x"},
                       "dedup": {"nearDuplicates": False, "semantic": {"enabled": False}}})  # fmt: skip
    r = merge.merge_round(storage, spec, "t", 1, [(1, 100)])
    assert r.duplicates == {"exact": 0, "near": 0, "semantic": 0, "prefix": 1, "online": 2}
    assert r.dedup_tiers == ("exact", "near", "prefix") and rec.Accounting.total(r).problems() == []
    assert json.loads(storage.read_bytes(rec.round_report_key(1)))["prefix_duplicates"] == 1
    md = storage.read_bytes(f"{rec.merge_prefix(1)}/report.md").decode()
    assert "| Duplicates (all rounds): exact / near / semantic / prefix / online | 0 / 0 / 0 / 1 / 2 |" in md
    rejected = pq.read_table(storage.location(rec.rejected_part_key(1))).to_pylist()
    assert [(x["reject_reason"], x["instruction"].endswith("alone.")) for x in rejected] == [("prefix_duplicate", True)]


def test_the_docs_prefix_tier_registered_by_patching_runs_in_the_generators_online_skip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Emulated registration, as above: with the docs' PrefixTier in TIERS, a shard's online skip runs its check
    after the shipped ones, with no other change: a candidate whose prefix the shard kept (in this batch or an earlier
    one) is skipped as seen in the shard and counted under the tier."""
    cfg = DedupConfig(near=False)
    pair = [HEAD + "works for a family of four.", HEAD + "works for a student living alone."]
    assert online.OnlineSkip(cfg, None).filter(pair) == ([True, True], 0, 0)  # the shipped tiers keep both
    monkeypatch.setattr(tiers, "TIERS", (*tiers.TIERS, PrefixTier()))
    monkeypatch.setattr(online, "TIERS", tiers.TIERS)
    skip = online.OnlineSkip(cfg, None)
    first = skip.filter([HEAD + "works for a family of four.", "Name three prime numbers.",
                         HEAD + "works for a student living alone."])  # fmt: skip
    second = skip.filter([HEAD + "works for a retired couple.", "Name three prime numbers."])
    assert first == ([True, True, False], 0, 1) and second == ([False, False], 0, 2)
    assert skip.skipped == {"exact": 1, "near": 0, "semantic": 0, "prefix": 2}


def test_the_shard_path_imports_no_process_pool() -> None:
    """The online skip runs the merge's tier objects, but a shard's process never forks: importing the shard's code
    loads neither the merge's execution machinery nor a process pool."""
    probe = ("import sys, genrun.worker.generate, genrun.worker.online; "
             "print(sorted(m for m in ('genrun.worker.runtime', 'genrun.worker.merge', 'concurrent.futures.process', "
             "'multiprocessing') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
