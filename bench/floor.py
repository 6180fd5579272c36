"""genrun against the floor: `genrun run` on the quickstart to its target, then one engine started once that generates
as many tokens as the run spent, both in one invocation of this script (machines are noisy).

0. A throwaway engine process (the floor's, for one batch) reads the libraries and the weights into the page cache,
   so that neither of the two timed below pays for a cold disk the other does not.
1. genrun: `python -P -m genrun.operator.cli run MANIFEST --output DIR` as a user runs it, in its own process; its
   wall time from spawn to exit. Its tokens come from the run's status (`status.json`: status.totals.tokens, what
   `genrun status --json` shows). Its engine starts and their start-up seconds come from the status's
   `engineStarts` / `startupSeconds` / `startupShare` when the run records them; else from the engine session records
   under the output (`engines/*.json`); else, for runs where every shard process loads its own engine, from the
   shard processes' logs (`_genrun/logs/<run>-r<round>-s<seed>.log` with a "shard ... done" line: one engine start
   each), their start-up estimated as the time from the runner writing the shard's job file to the shard's marker,
   less the marker's generation `seconds`, and its share of genrun's wall time.
2. The floor: a fresh process (spawned here, timed from spawn) builds the engine as the worker builds it
   (`worker.engine.make_engine` with the manifest's model and the shard seed `shards.firstSeed`), so start-up is
   process start (imports included) to engine ready; it then generates with the manifest's base sampling
   (spec.sampling, joint prompts as the worker writes them, up to `maxTokens` each) in batches of
   `generation.batchSize` prompts (64 by default) until it has generated at least the run's tokens. Its generation
   seconds are those batches' seconds pro-rated to exactly the run's tokens (tokens / the throughput measured), so
   floor_s = start-up + the run's tokens / the floor engine's throughput.

3. Where genrun's time went (`timeline`, from what its output folder records): spawn to the engine's process, the
   engine's start-up, each round's generation window (its first shard's start to its last marker) and what lies
   between windows (the merges, planning the next round), and the exit; each with how much more it took than the
   floor spends on the same (the floor's start-up; the round's tokens at the floor engine's throughput), and their sum
   by kind, which adds up to genrun_s - floor_s.

Last line: RESULT genrun_s=<wall> floor_s=<start-up + generation> ratio=<genrun/floor> engine_starts=<n>
startup_share=<genrun's start-up seconds over its engines' device-seconds (or wall)>

    python -P bench/floor.py [--manifest examples/quickstart.yaml] [--engine vllm|replay] [--target N] [--output DIR]

`--engine replay` runs both on the replay engine (recorded samples, no model): for checking the script, not a figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from genrun.contract import records as rec
from genrun.operator.cost import usage
from genrun.operator.loop import read_engine_sessions
from genrun.worker.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[1]
STATE = "_genrun"  # operator/local.py's runner bookkeeping under the output


@dataclass(frozen=True)
class EngineUse:
    starts: int
    startup_seconds: float  # device-seconds of start-up, all starts
    share: float  # of the engines' device-seconds (of genrun's wall time where the run did not record them)
    source: str


def engine_use(out: Path, wall: float) -> EngineUse:
    """How many engines genrun started and what starting them cost, from the run's output folder."""
    totals = json.loads((out / "status.json").read_text()).get("status", {}).get("totals", {})
    if totals.get("engineStarts"):
        return EngineUse(
            int(totals["engineStarts"]),
            float(totals.get("startupSeconds", 0.0)),
            float(totals.get("startupShare", 0.0)),
            "status.totals",
        )
    sessions = _sessions(out)
    if sessions:
        used = usage(sessions)  # what the status's totals count, from the same records
        return EngineUse(used.starts, used.startup_device_seconds, used.startup_share, "engines/*.json")
    return _from_logs(out, wall)


def _sessions(out: Path) -> list[rec.EngineSession]:
    """The run's engine session records, read as the run loop reads them."""
    return list(read_engine_sessions(LocalStorage(out)).values())


def _from_logs(out: Path, wall: float) -> EngineUse:
    """Every shard process that generated built its own engine (the runner of one process per shard)."""
    starts, startup = 0, 0.0
    for log in sorted((out / STATE / "logs").glob("*-r*-s*.log")):
        if " done: " not in log.read_text(errors="replace"):
            continue  # a shard already published exits before loading an engine
        starts += 1
        name = log.stem  # <run>-r<round>-s<seed>
        rnd, seed = (int(x) for x in name.rsplit("-r", 1)[1].split("-s"))
        marker = out / "shards" / f"r{rnd:04d}" / f"s{seed:010d}.done.json"
        job = out / STATE / "jobs" / f"{name}.json"
        if marker.exists() and job.exists():
            seconds = float(json.loads(marker.read_text())["seconds"])
            startup += max(0.0, marker.stat().st_mtime - job.stat().st_mtime - seconds)
    return EngineUse(starts, startup, startup / wall if wall > 0 else 0.0, f"{STATE}/logs (one engine per shard)")


@dataclass(frozen=True)
class Span:
    """One stretch of genrun's wall time: `seconds` long, of which `over` is more than the floor would spend on it
    (for a round: its generation window less its tokens at the floor engine's throughput)."""

    what: str
    seconds: float
    over: float
    kind: str  # "start" (spawn to engine ready), "round", "between" (merges, planning), "exit"


def timeline(out: Path, spawned: float, wall: float, floor_startup: float, rate: float) -> list[Span]:
    """Where genrun's wall time went, from what its output folder records (Unix times): the engine sessions' start and
    ready, each shard's completion marker (written when the shard ends: its mtime; the shard began its `seconds`
    before), each round's merge report (its mtime). A round's generation window runs from its first shard's start to
    its last marker; what lies between windows is the merges and the planning of the next round."""
    sessions = _sessions(out)
    started = min((x.started for x in sessions), default=spawned)
    ready = min((x.ready for x in sessions if x.ready), default=started)
    spans = [
        Span("runner start to the engine's process", started - spawned, started - spawned, "start"),
        Span("engine start-up (process to ready)", ready - started, ready - started - floor_startup, "start"),
    ]
    last = ready
    for plan_file in sorted((out / "rounds").glob("*/plan.json")):
        plan = rec.round_plan_from(json.loads(plan_file.read_text()))
        marks = [out / rec.shard_manifest_key(plan.round, s.seed) for s in plan.shards]
        done = [(m.stat().st_mtime, rec.shard_manifest_from(json.loads(m.read_text()))) for m in marks if m.exists()]
        if not done:
            break
        begin = min(t - m.seconds for t, m in done)
        end = max(t for t, _ in done)
        tokens = sum(m.tokens for _, m in done)
        sampled = sum(m.generated for _, m in done)
        # Not clamped at 0: an overlap (a round begun before the last merge's report) shows as a negative gap, and
        # the spans still add up to the wall time.
        spans.append(Span(f"before round {plan.round} (merge, planning)", begin - last, begin - last, "between"))
        at_floor = tokens / rate if rate > 0 else 0.0
        spans.append(Span(f"round {plan.round}: {len(done)} shard(s), {sampled} sampled, {tokens:,} tokens",
                          end - begin, end - begin - at_floor, "round"))  # fmt: skip
        report = out / rec.round_report_key(plan.round)
        last = report.stat().st_mtime if report.exists() else end
        spans.append(Span(f"round {plan.round}'s merge", last - end, last - end, "between"))
    spans.append(Span("after the last merge to exit", spawned + wall - last, spawned + wall - last, "exit"))
    return spans


def floor_seconds(startup: float, generation: float, generated: int, wanted: int) -> float:
    """Start-up plus `wanted` tokens at the throughput measured (`generated` tokens in `generation` seconds)."""
    return startup + (generation * wanted / generated if generated > 0 else 0.0)


def result_line(genrun_s: float, floor_s: float, use: EngineUse) -> str:
    ratio = genrun_s / floor_s if floor_s > 0 else float("nan")
    return (
        f"RESULT genrun_s={genrun_s:.1f} floor_s={floor_s:.1f} ratio={ratio:.3f} engine_starts={use.starts} "
        f"startup_share={use.share:.4f}"
    )


def manifest_with_target(src: Path, target: int, dst: Path) -> Path:
    doc = yaml.safe_load(src.read_text())
    if target:
        doc["spec"]["target"] = {**doc["spec"].get("target", {}), "uniqueExamples": target}
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def run_genrun(manifest: Path, out: Path, engine: str) -> tuple[float, float]:
    """genrun's wall time and the Unix time it was spawned at."""
    cmd = [sys.executable, "-P", "-m", "genrun.operator.cli", "run", str(manifest), "--output", str(out)]
    cmd += ["--engine", engine, "-q"]
    spawned = time.time()
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        sys.exit(f"floor: genrun run ended with exit code {res.returncode}: {' | '.join(tail)}")
    return wall, spawned


def run_floor(manifest: Path, engine: str, tokens: int) -> dict[str, float]:
    """The floor's engine in a fresh process; start-up timed from its spawn."""
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--child", "--manifest", str(manifest)]
    cmd += ["--engine", engine, "--tokens", str(tokens)]
    spawned = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"floor: the floor's engine process ended with exit code {res.returncode}: {res.stderr[-500:]}")
    got: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
    got["startup"] = got.pop("ready") - spawned
    return got


def child(manifest: Path, engine_kind: str, tokens: int) -> None:
    """Build the engine as the worker does, then generate at least `tokens` tokens in full batches."""
    from genrun.contract.records import ShardPlan
    from genrun.operator.policy import base_sampling
    from genrun.operator.validate import load_run_manifest
    from genrun.worker.engine import make_engine
    from genrun.worker.generate import Asker
    from genrun.worker.prompts import PromptBuilder

    _, _, spec = load_run_manifest(manifest)
    seed = spec.shards.first_seed
    engine = make_engine(engine_kind, spec, seed)
    ready = time.time()
    batch = spec.generation.batch_size or 64
    shard = ShardPlan(1, seed, 0, batch, base_sampling(spec), tuple(spec.prompt.domains))
    asker = Asker(engine, PromptBuilder.for_shard(spec, shard), shard.sampling, seed, True)  # joint: up to maxTokens
    generated = index = 0
    t0 = time.perf_counter()
    while generated < tokens:
        samples = asker.sample(list(range(index, index + batch)))
        index += batch
        generated += sum(s.completion.tokens for s in samples)
    seconds = time.perf_counter() - t0
    print(json.dumps({"ready": ready, "generation": seconds, "generated": generated, "batch": batch}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", default=str(ROOT / "examples" / "quickstart.yaml"))
    ap.add_argument("--engine", choices=("vllm", "replay"), default="vllm")
    ap.add_argument(
        "--target", type=int, default=0, help="override spec.target.uniqueExamples (default: the manifest's)"
    )
    ap.add_argument("--output", help="genrun's output folder (default: a new temporary folder); must not exist yet")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(Path(args.manifest), args.engine, args.tokens)
    if args.target < 0:
        ap.error(f"--target: must be a positive number of examples, got {args.target}")
    if args.output and Path(args.output).exists():
        ap.error(f"--output: {args.output} exists; give a new folder (genrun would resume the run there)")
    work = Path(tempfile.mkdtemp(prefix="genrun-floor-"))
    out = Path(args.output) if args.output else work / "output"
    manifest = manifest_with_target(Path(args.manifest), args.target, work / "manifest.yaml")

    # A throwaway engine first, so that genrun and the floor both start from a page cache that holds the libraries
    # and the weights: whichever ran first would otherwise also pay for reading them from disk.
    run_floor(manifest, args.engine, 1)
    wall, spawned = run_genrun(manifest, out, args.engine)
    status: dict[str, Any] = json.loads((out / "status.json").read_text())["status"]
    tokens = int(status["totals"]["tokens"])
    use = engine_use(out, wall)
    print(f"genrun: {wall:.1f} s to {status['totals']['qcPassed']} kept in {status.get('round', 0)} round(s), "
          f"{tokens:,} tokens; {use.starts} engine start(s), start-up {use.startup_seconds:.1f} s "
          f"({use.share:.1%}; from {use.source}); output {out}")  # fmt: skip

    got = run_floor(manifest, args.engine, tokens)
    floor = floor_seconds(got["startup"], got["generation"], int(got["generated"]), tokens)
    rate = got["generated"] / got["generation"] if got["generation"] > 0 else float("inf")
    print(f"floor: start-up {got['startup']:.1f} s (spawn to engine ready), then {int(got['generated']):,} tokens in "
          f"batches of {int(got['batch'])} in {got['generation']:.1f} s ({rate:,.1f} tokens/s): {tokens:,} tokens "
          f"need {floor - got['startup']:.1f} s")  # fmt: skip
    print_timeline(timeline(out, spawned, wall, got["startup"], rate), wall - floor)
    print(result_line(wall, floor, use))


def print_timeline(spans: list[Span], gap: float) -> None:
    print("where genrun's time went (over: more than the floor spends on the same: its start-up, the round's tokens "
          "at its throughput):")  # fmt: skip
    for x in spans:
        print(f"  {x.what:<64} {x.seconds:6.1f} s  over {x.over:+6.1f} s")
    by = {k: sum(x.over for x in spans if x.kind == k) for k in ("start", "round", "between", "exit")}
    print(f"  genrun - floor = {gap:+.1f} s: start {by['start']:+.1f}, rounds {by['round']:+.1f}, between rounds "
          f"{by['between']:+.1f}, exit {by['exit']:+.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
