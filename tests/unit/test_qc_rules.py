"""One record per QC rule (genrun.contract.qc_rules): the worker's builders, the API's name type and defaults, both
CRDs and the docs' parameter table say what the records say."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import yaml
from genrun.contract import api, qc_rules
from genrun.contract.api import QcFilter, SpecError, parse_spec
from genrun.worker.qc import RULES, QcPipeline

ROOT = Path(__file__).resolve().parents[2]
CRDS = (ROOT / "crds" / "generationrun.yaml", ROOT / "charts" / "genrun" / "crds" / "generationrun.yaml")


def test_the_worker_registers_one_builder_per_record_and_an_instruction_side_where_the_record_says() -> None:
    assert list(RULES) == list(qc_rules.NAMES)
    for name, rule in RULES.items():
        assert rule.facts is qc_rules.BY_NAME[name]
        assert (rule.instruction_side is not None) == rule.facts.instruction_side, name
    side = QcPipeline.instruction_side([QcFilter(n) for n in qc_rules.NAMES])  # type: ignore[arg-type]
    assert [name for name, _ in side.filters] == list(qc_rules.INSTRUCTION_SIDE_RULES)


def test_the_api_names_and_default_filters_are_the_records() -> None:
    assert typing.get_args(api.QcFilterName) == qc_rules.NAMES
    spec = parse_spec({"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "output": {"path": "/tmp/x"}})
    assert tuple(f.name for f in spec.qc.filters) == qc_rules.DEFAULT_RULES


@pytest.mark.parametrize("crd_path", CRDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_crd_lists_the_records_and_leaves_their_parameters_to_the_contract(crd_path: Path) -> None:
    """The enum and the default list are the records'; `params` has no schema of its own, so the records' bounds are
    the only ones (the API checks them with messages that name the rule)."""
    crd = yaml.safe_load(crd_path.read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    filters = props["qc"]["properties"]["filters"]
    assert tuple(filters["items"]["properties"]["name"]["enum"]) == qc_rules.NAMES
    assert tuple(f["name"] for f in filters["default"]) == qc_rules.DEFAULT_RULES
    params = filters["items"]["properties"]["params"]
    assert params.get("x-kubernetes-preserve-unknown-fields") is True and "properties" not in params


def test_the_docs_list_each_rule_with_its_parameters_defaults_and_reasons() -> None:
    text = (ROOT / "docs" / "manifest.md").read_text()
    for rule in qc_rules.RULES:
        row = re.search(rf"^\| `{rule.name}` \|(.*)$", text, re.MULTILINE)
        assert row, f"docs/manifest.md has no QC table row for {rule.name}"
        params, reasons = row.group(1).split("|")[:2]
        for p in rule.params:
            shown = f"`{p.key}`" + ("" if p.default is None else f" {str(p.default).lower()}")
            assert shown in params, (rule.name, shown)
        for reason in rule.reasons:
            assert f"`{reason}`" in reasons, (rule.name, reason)


def _spec_with(name: str, params: dict[str, object]) -> dict[str, object]:
    return {
        "model": {"name": "m"},
        "target": {"uniqueExamples": 10},
        "output": {"path": "/tmp/x"},
        "prompt": {"domains": ["a"]},
        "bestOfN": {"critic": "judge"},
        "qc": {"filters": [{"name": name, "params": params}]},
    }


@pytest.mark.parametrize("rule", qc_rules.RULES, ids=lambda r: r.name)
def test_each_records_bounds_are_what_the_api_enforces(rule: qc_rules.QcRule) -> None:
    """Every default passes; a bounded parameter passes at its bounds and is refused just past them, naming the
    field and the range."""
    parse_spec(_spec_with(rule.name, rule.defaults))
    for p in rule.params:
        if p.low is None or p.high is None:
            continue
        step = 1 if p.type is int else 0.001
        parse_spec(_spec_with(rule.name, {p.key: p.type(p.low)}))
        parse_spec(_spec_with(rule.name, {p.key: p.type(p.high)}))
        for bad in (p.low - step, p.high + step):
            with pytest.raises(SpecError) as exc:
                parse_spec(_spec_with(rule.name, {p.key: p.type(bad)}))
            assert f"spec.qc.filters[0].params.{p.key}: must be in [" in str(exc.value)
