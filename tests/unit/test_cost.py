"""Device time: the cost model's arithmetic, the run's engine sessions summed into the status the planner publishes,
and the series a scrape shows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from genrun.contract.api import RunRef, parse_spec
from genrun.contract.records import EngineSession
from genrun.contract.status import RunStatus
from genrun.operator import cost
from genrun.operator.metrics import Metrics
from genrun.operator.planner import Observed, decide
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]


def test_device_seconds_count_every_start_and_the_tokens_at_the_throughput() -> None:
    p = cost.CostProfile(startup_seconds=120, tokens_per_second=3000, devices=2)
    assert p.device_seconds(300_000, starts=1) == 2 * (120 + 100)
    assert p.device_seconds(300_000, starts=10) == 2 * (1200 + 100)
    assert p.startup_share(300_000, starts=1) == pytest.approx(120 / 220)
    assert cost.prior(0) == cost.CPU_PRIOR and cost.prior(4).devices == 4


def test_a_job_that_starts_its_own_engine_is_sized_to_keep_the_start_up_under_its_share() -> None:
    p = cost.CostProfile(startup_seconds=120, tokens_per_second=3000)
    n = cost.min_job_examples(p, tokens_per_example=300, overhead_share=0.1)
    job = p.device_seconds(n * 300, starts=1)
    assert p.startup_seconds <= 0.1 * job + 1e-9  # n is enough ...
    assert p.startup_seconds > 0.1 * p.device_seconds((n - 1) * 300, starts=1)  # ... and the fewest that is


def _session(name: str, started: float, ready: float, last: float, **kw: object) -> EngineSession:
    return EngineSession(name=name, started=started, ready=ready, last=last, **kw)  # type: ignore[arg-type]


def test_usage_sums_held_time_and_start_up_over_sessions_and_devices() -> None:
    sessions = [
        _session("a", 100.0, 120.0, 400.0, devices=2, accelerator="gpu", tokens=9000, busy_seconds=3.0, stopped=True),
        _session("b", 500.0, 0.0, 530.0, devices=2, accelerator="gpu"),  # killed while loading: all start-up
    ]
    u = cost.usage(sessions)
    assert u.starts == 2
    assert u.device_seconds == 2 * 300 + 2 * 30
    assert u.startup_device_seconds == 2 * 20 + 2 * 30
    assert u.startup_share == pytest.approx(100 / 660)
    measured = cost.profile_for(cost.GPU_PRIOR, sessions)
    assert measured.startup_seconds == 20.0 and measured.tokens_per_second == 3000.0  # only the session that got ready
    assert cost.profile_for(cost.GPU_PRIOR, []).startup_seconds == cost.GPU_PRIOR.startup_seconds
    assert math.isinf(cost.CostProfile(1, 0).generation_seconds(1))


def test_the_status_and_the_metrics_show_the_engines_device_time() -> None:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    ref = RunRef("data", "sft", 1)
    sessions = (_session("e1", 0.0, 20.0, 420.0, tokens=9000, busy_seconds=360.0, stopped=True),)
    totals = decide(ref, parse_spec(raw), Observed(engines=sessions)).status.totals
    assert (totals.engine_starts, totals.engine_seconds, totals.startup_seconds) == (1, 420.0, 20.0)
    assert totals.startup_share == pytest.approx(20 / 420, abs=1e-4) and totals.gpu_hours == pytest.approx(
        420 / 3600, abs=1e-4
    )
    status = RunStatus.from_dict({"totals": RunStatus(totals=totals).to_dict()["totals"]})
    assert status.totals.engine_seconds == 420.0  # through the wire form the CRD declares

    m = Metrics()
    m.runs.update("data", "sft", 100, status, {}, budget_used=0.0)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(generate_latest(m.registry).decode()) for s in fam.samples}  # fmt: skip
    lbl = (("name", "sft"), ("namespace", "data"))
    assert got[("genrun_engine_device_seconds_total", lbl)] == 420.0
    assert got[("genrun_engine_startup_device_seconds_total", lbl)] == 20.0
    assert got[("genrun_engine_starts_total", lbl)] == 1


def test_shards_that_start_their_own_engine_are_sized_by_its_start_up_and_warm_ones_are_not() -> None:
    from genrun.operator import policy as pol

    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["shards"] = {**raw.get("shards", {}), "examplesPerShard": 20_000}
    shared = parse_spec(raw)
    own = parse_spec({**raw, "worker": {**raw.get("worker", {}), "engine": "perShard", "gpus": 2}})
    assert pol.min_shard_examples(shared) == pol.MIN_SHARD_EXAMPLES  # a warm engine: tokens are the only cost
    cold = pol.min_shard_examples(own)  # the GPU prior: 120 s to start, 3,000 tokens/s
    assert cold == cost.min_job_examples(cost.prior(2), pol.TOKENS_PER_EXAMPLE_PRIOR) > pol.MIN_SHARD_EXAMPLES
    # The run's own engines started in 12 s: a tenth of the prior's start-up, so shards a tenth as large do.
    fast = (_session("p", 0.0, 12.0, 100.0, devices=2, accelerator="gpu", tokens=264_000, busy_seconds=88.0),)
    assert pol.min_shard_examples(own, (), fast) == pytest.approx(cold / 10, rel=0.05)
    assert pol.shard_examples(own, 1) == cold and pol.shard_examples(shared, 1) == pol.MIN_SHARD_EXAMPLES
