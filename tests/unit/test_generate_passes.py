"""How many samples a shard asks the engine for at once: its first pass is sized from the loss (skips, malformed) the
previous round's shards of its sampling met, so that it fills its quota in one round trip of the engine, since
another pass costs a whole round trip at a small batch, far more than a few spare instruction samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.worker.engine import Completion, Params, ReplayEngine
from genrun.worker.generate import generate_shard
from genrun.worker.prompts import RESPONSE
from genrun.worker.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[2]
COOL, HOT = rec.Sampling(0.7, 0.9, 1.1, 0.0, 64), rec.Sampling(1.0, 0.9, 1.3, 0.0, 64)
QUOTA = 20


class Recording:
    """The replay engine, with the size of every instruction request it was sent (the engine's side of the shard)."""

    def __init__(self) -> None:
        self.engine = ReplayEngine()
        self.model = self.engine.model
        self.instruction_calls: list[int] = []

    def generate(self, prompts: list[str], params: list[Params]) -> list[list[Completion]]:
        asked = [p for p in prompts if not p.endswith(RESPONSE)]
        if asked:
            self.instruction_calls.append(len(asked))
        return self.engine.generate(prompts, params)


def _spec(tmp: Path) -> Any:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["output"] = {"path": str(tmp)}
    raw["dedup"] = {"semantic": {"enabled": False}}
    return parse_spec(raw)


def _shard(rnd: int, seed: int, sampling: rec.Sampling) -> rec.ShardPlan:
    return rec.ShardPlan(round=rnd, seed=seed, ordinal=seed - 100, examples=QUOTA, sampling=sampling)


def _finished(storage: LocalStorage, shard: rec.ShardPlan, sampled: int, rows: int) -> None:
    """A finished shard of round 1, as its marker records it."""
    marker = rec.ShardManifest(
        shard.round, shard.seed, rows, sampled, sampled - rows, 0, 0, 1000, 1.0, "", examples=rows
    )
    storage.write_bytes(rec.shard_manifest_key(shard.round, shard.seed), rec.to_json(marker).encode())


def _round_one(storage: LocalStorage, cool: tuple[int, int], hot: tuple[int, int]) -> None:
    shards = (_shard(1, 100, COOL), _shard(1, 101, HOT))
    storage.write_bytes(rec.round_plan_key(1), rec.to_json(rec.RoundPlan(1, shards, COOL)).encode())
    _finished(storage, shards[0], *cool)
    _finished(storage, shards[1], *hot)


def _first_pass(tmp: Path, rnd: int, sampling: rec.Sampling) -> tuple[int, rec.ShardManifest]:
    engine = Recording()
    storage = LocalStorage(tmp)
    marker = generate_shard(storage, _spec(tmp), _shard(rnd, 102, sampling), engine)
    return engine.instruction_calls[0], marker


def test_the_first_pass_oversamples_by_the_loss_its_arm_met_in_the_round_before(tmp_path: Path) -> None:
    """Round 1's cool shard made an example of half its samples, its hot shard of a tenth. A round-2 shard at the
    cool sampling asks for enough at a loss of a half to fill 20 (more than 40, not a whole batch of 64); one at the
    hot sampling asks for a whole batch; a round-1 shard, with nothing before it, asks at the 15% prior (under 40).
    Each still ends with its 20 examples."""
    _round_one(LocalStorage(tmp_path / "a"), cool=(40, 20), hot=(100, 10))
    cool_first, cool_marker = _first_pass(tmp_path / "a", 2, COOL)
    assert 2 * QUOTA < cool_first < 64 and cool_marker.examples_made == QUOTA

    _round_one(LocalStorage(tmp_path / "b"), cool=(40, 20), hot=(100, 10))
    hot_first, _ = _first_pass(tmp_path / "b", 2, HOT)
    assert hot_first == 64

    first, marker = _first_pass(tmp_path / "c", 1, COOL)
    assert QUOTA < first < 2 * QUOTA and marker.examples_made == QUOTA


def test_a_damaged_marker_or_plan_of_the_round_before_leaves_the_first_pass_at_the_prior(tmp_path: Path) -> None:
    """The previous round's records only guide the first pass: a damaged plan pools every readable marker, and a
    damaged marker is passed over (the merge sets it aside and reports it), so the shard still runs and fills."""
    storage = LocalStorage(tmp_path)
    _round_one(storage, cool=(40, 20), hot=(100, 10))
    storage.write_bytes(rec.round_plan_key(1), b'{"round": 1, "shards": [')
    storage.write_bytes(rec.shard_manifest_key(1, 101), b"{")
    first, marker = _first_pass(tmp_path, 2, COOL)
    assert 2 * QUOTA < first < 64 and marker.examples_made == QUOTA
