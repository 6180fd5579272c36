"""The bandit policy: sampling arms, their measured rewards, how a round's shards are spread over arms, and how big
a round is.

Pure, like the planner that calls it: no I/O, no clock; its only randomness is a stream seeded by the run's seed
(spec.shards.firstSeed) and the round (`round_rng`), so a restart that re-decides a round draws the same numbers (and
a recorded round plan is read back rather than re-decided anyway), and the plan is a function of (spec, observed).

Why Thompson sampling and not UCB: a round is a *batch* of shards decided at once. UCB is deterministic and would
give every shard of the batch to the same arm; sampling each shard's arm from the posterior spreads the batch in
proportion to each arm's probability of being best, which is what a batch should do. The share of a round that goes
to arms other than the current best estimate is capped (`spec.policy.exploration`). The same reasoning picks each
shard's attribute cell (a second Thompson sampler over the same per-shard yields).

Exploration is cheap by construction: the pilot gives each arm a probe of at least `probe_examples` (the fewest
examples whose all failing QC retires the arm at `spec.policy.retireConfidence`), an arm is retired as soon as the
exact upper bound of its QC-pass rate is below the floor, and later rounds grow at most GROWTH-fold from the evidence.

Reward of an arm = new unique QC-passed examples per 1k generated tokens. Its yield per example has a Beta posterior
(kept of examples written) whose evidence decays by `DISCOUNT` per round of age, because the yield of every arm falls
as the dataset fills (the same instruction becomes a duplicate the second time); tokens per example are measured.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import TypeVar

from genrun.contract.api import GenerationRunSpec
from genrun.contract.records import EngineSession, RoundPlan, RoundReport, Sampling, ShardPlan, ShardYield
from genrun.contract.status import ArmEntry, CellEntry
from genrun.operator import cost

DISCOUNT = 0.7  # weight of a round's evidence per round of age
MAX_ARMS = 16  # the CRD's maxItems on spec.policy.arms, and the ladder's length bound
MIN_SHARD_EXAMPLES = 16  # per shard after the pilot (unless examplesPerShard is smaller): each shard is a marker, two files and a merge input
TOKENS_PER_EXAMPLE_PRIOR = 400.0  # an instruction and its response, before the run has measured its own
EXACT_BOUND_MAX = 2000  # unique rows up to which the QC-pass bound is exact (Clopper-Pearson); Wilson above
PRIOR_WEIGHT = 2.0  # examples' worth of the pooled prior (Beta(1, 1) is worth 2)
TOKENS_PRIOR_WEIGHT = 10.0  # examples' worth of the pooled tokens per example (see tokens_per_example)
GROWTH = 4  # a round commits at most this multiple of the examples generated before it (see size_round)
UNREACHABLE = 2**62  # examples needed at a yield of 0


def round4(x: float) -> float:
    return round(x, 4)  # keeps 0.7 + 0.1 from printing as 0.7999999999


def base_sampling(spec: GenerationRunSpec) -> Sampling:
    s = spec.sampling
    return Sampling(s.temperature, s.top_p, s.repetition_penalty, s.min_p, s.max_tokens)


def arm_id(s: Sampling) -> str:
    out = f"t{s.temperature:g}-p{s.top_p:g}-r{s.repetition_penalty:g}"
    return out + (f"-m{s.min_p:g}" if s.min_p else "")


def arms(spec: GenerationRunSpec) -> tuple[Sampling, ...]:
    """The arm space: spec.policy.arms, or else the escalation ladder from spec.sampling to its ceilings."""
    base = base_sampling(spec)
    if spec.policy.arms:
        return tuple(
            Sampling(a.temperature, a.top_p, a.repetition_penalty, a.min_p, base.max_tokens) for a in spec.policy.arms
        )
    e = spec.escalation
    out = [base]
    while len(out) < MAX_ARMS:
        last = out[-1]
        t = min(e.max_temperature, round4(last.temperature + e.temperature_step))
        p = min(e.max_repetition_penalty, round4(last.repetition_penalty + e.repetition_penalty_step))
        if (t, p) == (last.temperature, last.repetition_penalty):
            break
        out.append(Sampling(t, last.top_p, p, last.min_p, last.max_tokens))
    return tuple(out)


def round_rng(spec: GenerationRunSpec, rnd: int) -> random.Random:
    """The planner's random stream for round `rnd`: derived from the run's seed (spec.shards.firstSeed, which already
    decides every shard's samples) and the round, so a restart re-decides a round identically and two runs of one
    spec (an outage's rerun, a reference run under another name) plan the same rounds."""
    digest = hashlib.sha256(f"genrun-planner/{spec.shards.first_seed}/round-{rnd}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ----------------------------------------------------------------------------------------------------------
# Evidence per arm


@dataclass
class ArmStats:
    sampling: Sampling
    shards: int = 0
    examples: int = 0  # raw counts (reported; retirement reads them)
    tokens: int = 0
    unique: int = 0
    kept: int = 0
    w_examples: float = 0.0  # discounted towards recent rounds (the posterior reads these)
    w_tokens: float = 0.0
    w_kept: float = 0.0
    retired: bool = False
    prior: tuple[float, float] = (1.0, 1.0)  # Beta prior of the yield per example, set by arm_stats (pooled)

    @property
    def id(self) -> str:
        return arm_id(self.sampling)

    def add(self, w: float, shards: int, examples: float, tokens: float, unique: float, kept: float) -> None:
        self.shards += shards
        self.examples += round(examples)
        self.tokens += round(tokens)
        self.unique += round(unique)
        self.kept += round(kept)
        self.w_examples += w * examples
        self.w_tokens += w * tokens
        self.w_kept += w * kept

    @property
    def tried(self) -> bool:
        return self.w_examples > 0

    @property
    def posterior(self) -> tuple[float, float]:
        """Beta(prior_a + kept, prior_b + examples - kept) of the yield per example (discounted counts)."""
        return self.prior[0] + self.w_kept, self.prior[1] + max(0.0, self.w_examples - self.w_kept)

    @property
    def mean_yield(self) -> float:
        a, b = self.posterior
        return a / (a + b)

    @property
    def yield_sd(self) -> float:
        a, b = self.posterior
        return math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))

    @property
    def qc_pass_rate(self) -> float:
        return self.kept / self.unique if self.unique else 0.0


A = TypeVar("A", bound=ArmStats)


def shard_yields(
    rounds: Mapping[int, RoundPlan], reports: Mapping[int, RoundReport]
) -> Iterator[tuple[int, ShardPlan, ShardYield]]:
    """(round, the shard's plan, its merged figures) of every merged shard, rounds in order."""
    for rnd in sorted(reports):
        plan = rounds.get(rnd)
        if plan is None:
            continue
        by_seed = {s.seed: s for s in plan.shards}
        for y in reports[rnd].per_shard:
            if y.seed in by_seed:
                yield rnd, by_seed[y.seed], y


def shard_arm(shard: ShardPlan) -> Sampling:
    return shard.sampling


def arm_stats(
    spec: GenerationRunSpec, rounds: Mapping[int, RoundPlan], reports: Mapping[int, RoundReport]
) -> list[ArmStats]:
    """Each arm's evidence from every round with a report, shard by shard (each shard's figures measured against
    what existed before its round)."""
    stats = {s: ArmStats(s) for s in arms(spec)}
    for rnd in sorted(reports):
        for s in {shard_arm(s) for s in rounds[rnd].shards} if rnd in rounds else ():
            stats.setdefault(s, ArmStats(s))
    latest = max(reports, default=0)
    for rnd, shard, y in shard_yields(rounds, reports):
        w = DISCOUNT ** (latest - rnd)
        stats[shard_arm(shard)].add(w, 1, y.rows, y.tokens, y.new_unique, y.new_qc_passed)
    out = list(stats.values())
    _judge(spec, out)
    return out


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k) = I_{1-p}(n - k, k + 1), the regularized incomplete beta function: a continued fraction
    of O(sqrt(n)) terms, not a sum of k + 1 terms, which at thousands of rows per judged arm is slow enough to stall
    the operator's event loop."""
    if k < 0:
        return 0.0
    if p <= 0 or k >= n:
        return 1.0
    if p >= 1:
        return 0.0
    return _betainc(n - k, k + 1, 1 - p)


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b), by the modified Lentz continued fraction (Numerical Recipes 6.4),
    taken on the side of x where it converges fast."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return min(1.0, front * _beta_fraction(a, b, x) / a)
    return max(0.0, 1 - front * _beta_fraction(b, a, 1 - x) / b)


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15

    def nonzero(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 100_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1 / nonzero(1 + num * d)
            c = nonzero(1 + num / c)
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h


def qc_upper_bound(passed: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound of a QC-pass rate from `passed` of `n` rows: exact (Clopper-Pearson, the
    largest p with P(X <= passed | n, p) >= 1 - confidence) up to EXACT_BOUND_MAX rows, Wilson's score bound above."""
    if n <= 0 or passed >= n:
        return 1.0
    if passed == 0:
        return 1 - float((1 - confidence) ** (1 / n))  # the exact bound's closed form
    if n > EXACT_BOUND_MAX:
        z, p = NormalDist().inv_cdf(confidence), passed / n
        centre = p + z * z / (2 * n)
        return min(1.0, (centre + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n))
    lo, hi = passed / n, 1.0
    for _ in range(40):  # bisection: the CDF falls as p rises
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _binom_cdf(passed, n, mid) > 1 - confidence else (lo, mid)
    return hi


def probe_examples(spec: GenerationRunSpec) -> int:
    """The fewest examples whose all failing QC retires an arm with spec.policy.retireConfidence: the smallest n with
    1 - (1 - confidence)^(1/n) < minQcPassRate (the exact bound for 0 passes of n)."""
    floor, conf = spec.escalation.min_qc_pass_rate, spec.policy.retire_confidence
    if floor >= 1:
        return 1
    if floor <= 0:
        return spec.shards.examples_per_shard
    n = max(1, math.floor(math.log(1 - conf) / math.log(1 - floor)))
    while qc_upper_bound(0, n, conf) >= floor:  # the closed form's float edge, checked against the bound itself
        n += 1
    return n


def tokens_per_example(stats: Sequence[ArmStats], a: ArmStats) -> float:
    """The arm's measured tokens per example, shrunk towards the pooled figure of the arms tried by
    TOKENS_PRIOR_WEIGHT examples' worth (response lengths vary a lot per sample: a few examples say little, and an
    arm must not win on a short first reading); the pooled figure alone for an untried arm; 1 when nothing was tried
    (rewards then rank by yield alone)."""
    tok = sum(s.w_tokens for s in stats)
    ex = sum(s.w_examples for s in stats if s.w_tokens > 0)
    if tok <= 0 or ex <= 0:
        return 1.0
    pooled = tok / ex
    own = a.w_examples if a.w_tokens > 0 else 0.0
    return (a.w_tokens + TOKENS_PRIOR_WEIGHT * pooled) / (own + TOKENS_PRIOR_WEIGHT)


def reward(stats: Sequence[ArmStats], a: ArmStats) -> float:
    """Posterior mean of new unique QC-passed examples per 1k tokens."""
    return 1000 * a.mean_yield / tokens_per_example(stats, a)


def planning_yield(stats: Sequence[ArmStats], a: ArmStats) -> float:
    """The yield to size a round with: the arm's posterior mean once tried; an untried arm is assumed to do as well
    as the tried ones on average (its optimistic prior drives exploration, not sizing)."""
    if a.tried:
        return a.mean_yield
    tried = [s for s in stats if s.tried]
    return sum(s.mean_yield for s in tried) / len(tried) if tried else 0.5


def mix_yield(stats: Sequence[ArmStats], picks: Sequence[ArmStats]) -> tuple[float, float]:
    """(mean, standard deviation) of the yield per example of a round whose shards run `picks` (arms independent;
    an untried arm gets the tried arms' mean and the widest tried spread)."""
    tried = [s for s in stats if s.tried]
    wide = max((s.yield_sd for s in tried), default=math.sqrt(1 / 12))
    mean = sum(planning_yield(stats, a) for a in picks) / len(picks)
    # Shards of one arm share its one uncertain yield: the spread averages over arms, not over shards.
    share = {id(a): sum(p is a for p in picks) / len(picks) for a in picks}
    var = sum((share[id(a)] * (a.yield_sd if a.tried else wide)) ** 2 for a in {id(p): p for p in picks}.values())
    return mean, math.sqrt(var)


def active(stats: Sequence[A]) -> list[A]:
    live = [a for a in stats if not a.retired]
    return live or [max(stats, key=lambda a: reward(stats, a))]


def best(stats: Sequence[A]) -> A:
    return max(active(stats), key=lambda a: reward(stats, a))


def allocate(stats: Sequence[A], n: int, exploration: float, rng: random.Random) -> list[A]:
    """Thompson sampling: each of the n shards goes to the arm whose posterior draw of reward is highest; at most
    exploration * n shards go to arms other than the best posterior mean (rounded at random, up with probability
    its fraction, so that a round of few shards still explores at that rate on average). Returned in arm order."""
    live = active(stats)
    top = best(stats)
    picks: list[A] = []
    for _ in range(n):
        draws = [1000 * rng.betavariate(*a.posterior) / tokens_per_example(stats, a) for a in live]
        picks.append(live[max(range(len(live)), key=draws.__getitem__)])
    raw = exploration * n
    cap = math.floor(raw) + (rng.random() < raw - math.floor(raw))
    others = [i for i, a in enumerate(picks) if a is not top]
    for i in others[cap:]:
        picks[i] = top
    order = {id(a): i for i, a in enumerate(stats)}
    return sorted(picks, key=lambda a: order[id(a)])


# ----------------------------------------------------------------------------------------------------------
# Sizing


def examples_needed(need: int, y: float, confidence: float, sd: float = 0.0) -> int:
    """The fewest examples n whose kept count reaches `need` with probability `confidence`, when each example is kept
    with probability y and y itself is known only to +- sd (its posterior spread): the kept count's predictive
    variance is then n*y*(1-y) + (n*sd)^2, not the binomial's alone, which would claim a confidence the estimate
    does not have. Normal approximation with continuity correction: n*y - sqrt(z^2*n*y*(1-y) + n^2*(z*sd)^2) >=
    need - 0.5, with z*sd at most y/2 (a spread wider than that is planned at half the yield, as the budget's last
    round is: the next round, measured better, corrects it)."""
    if need <= 0:
        return 0
    if y <= 0:
        return UNREACHABLE
    y = min(y, 1.0)
    z = NormalDist().inv_cdf(confidence)
    zs = min(z * max(sd, 0.0), y / 2)
    t = need - 0.5
    a, b = y * y - zs * zs, 2 * y * t + z * z * y * (1 - y)
    root = (b + math.sqrt(max(0.0, b * b - 4 * a * t * t))) / (2 * a)
    return max(need, math.ceil(root - 1e-9))


@dataclass(frozen=True)
class Sizing:
    shards: int
    examples: int  # per shard
    precise: bool  # True when this round is sized to reach the target
    why: str


def examples_for(
    spec: GenerationRunSpec, need: int, y: float, sd: float, last_round: bool, rounds_left: int = 0, floor: int = 0
) -> tuple[int, bool, str]:
    """Examples for a round that may reach the target: enough to reach it with spec.policy.stopConfidence at the
    estimated yield y +- sd (`examples_needed`), but no more than keeps the overshoot within spec.policy.maxOvershoot
    of the target should the yield be at the optimistic end of its estimate (y + z*sd). When that cap binds, the
    round approaches the target and the next one, measured better, finishes; that needs a round after this one to
    finish in and one to correct a miss, so with `rounds_left` (this one included; 0: unknown) below 3 the round is
    sized to finish. Approaching also only pays when it saves examples: the round that finishes has at least `floor`
    examples (a shard's least), so when finishing now needs no more than the cap plus that floor, this round
    finishes (fewer examples in all, and one round fewer). The last round the budget allows cannot be corrected: it
    is sized at the pessimistic end of the estimate (y - z*sd, at least y/2) instead."""
    p = spec.policy
    if last_round and y > 0:
        y, sd = max(y / 2, y - NormalDist().inv_cdf(p.stop_confidence) * sd), 0.0
    n = examples_needed(need, y, p.stop_confidence, sd)
    why = f"{need} more needed at a yield of {y:.3f}"
    why += f" +- {sd:.3f}" if sd > 0 and n != UNREACHABLE else ""
    why += f": {n} examples reach it with probability {p.stop_confidence:g}"
    if last_round:
        why += " (the budget's last round: sized at the low end of the yield estimate)"
    if last_round or n == UNREACHABLE or 0 < rounds_left < 3:
        return n, True, why
    y_hi = min(1.0, y + NormalDist().inv_cdf(p.stop_confidence) * sd)
    cap = math.floor((need + p.max_overshoot * spec.target.unique_examples) / y_hi)
    if cap >= n:
        return n, True, why
    if n <= cap + floor:
        return n, True, f"{why} (approaching with {max(1, cap)} would leave a round of at least {floor} to finish)"
    return (
        max(1, cap),
        False,
        (
            f"{need} more needed at a yield of {y:.3f} +- {sd:.3f}: {max(1, cap)} examples approach the target without "
            f"passing it by more than {p.max_overshoot:.0%} even at a yield of {y_hi:.3f}; the next round finishes"
        ),
    )


def starts_own_engine(spec: GenerationRunSpec) -> bool:
    """Whether each shard Job loads the model itself (spec.worker.engine: perShard, no spec.model.endpoint) rather than
    call an engine that is already warm (the run's own, or the user's server)."""
    return spec.worker.engine == "perShard" and spec.model.endpoint is None


def min_shard_examples(
    spec: GenerationRunSpec, stats: Sequence[ArmStats] = (), sessions: Sequence[EngineSession] = ()
) -> int:
    """The fewest examples a shard gets after the pilot. On a warm engine a shard costs only its tokens, so the floor
    is MIN_SHARD_EXAMPLES. A shard Job that starts its own engine is made large enough for its start-up to stay
    within a tenth of its device time (operator/cost.py), at the run's measured start-up, throughput and tokens per
    example once it has them, the priors before."""
    eps = spec.shards.examples_per_shard
    floor = min(MIN_SHARD_EXAMPLES, eps)
    if not starts_own_engine(spec):
        return floor
    profile = cost.profile_for(cost.prior(spec.worker.gpus), sessions)
    tried = [a for a in stats if a.tried]
    tpe = tokens_per_example(stats, best(tried)) if tried else TOKENS_PER_EXAMPLE_PRIOR
    return min(eps, max(floor, cost.min_job_examples(profile, tpe if tpe > 1 else TOKENS_PER_EXAMPLE_PRIOR)))


def shard_examples(spec: GenerationRunSpec, per: int, floor: int | None = None) -> int:
    """Examples per shard, between `floor` (min_shard_examples) and spec.shards.examplesPerShard."""
    eps = spec.shards.examples_per_shard
    return min(eps, max(min_shard_examples(spec) if floor is None else floor, per))


def size_round(
    spec: GenerationRunSpec,
    need: int,
    y: float,
    sd: float,
    room_examples: int,
    room_shards: int,
    last_round: bool,
    measured: int = 0,
    rounds_left: int = 0,
    floor: int | None = None,
) -> Sizing:
    """A round that can reach the target is sized by `examples_for` (shards and examples per shard); one that cannot
    is as large as the per-round cap and the budget allow. While the budget leaves `rounds_left` >= 4 rounds (this
    one included), a round commits at most GROWTH x the `measured` examples generated so far, so that each round is
    decided on evidence at least 1/GROWTH its size (the pilot's few examples never commit the whole need)."""
    e, eps = spec.escalation, spec.shards.examples_per_shard
    cap = min(e.max_shards_per_round, room_shards)
    floor = min_shard_examples(spec) if floor is None else floor
    n, precise, why = examples_for(spec, need, y, sd, last_round, rounds_left, floor)
    grown = GROWTH * measured
    # Growth needs rounds after this one to approach, finish and correct a miss in: with fewer left, commit now.
    if measured and rounds_left >= 4 and n > grown and grown < min(cap * eps, room_examples):
        shards = max(min(e.min_shards_per_round, cap), math.ceil(grown / eps))
        per = shard_examples(spec, math.ceil(grown / shards), floor)
        why = f"{why}; this round grows to at most {GROWTH}x the {measured} examples measured so far"
        return Sizing(shards, per, False, f"{why} -> {shards} shard(s) x {per}")
    if n <= min(cap * eps, room_examples):
        shards = max(min(e.min_shards_per_round, cap), math.ceil(n / eps))
        per = shard_examples(spec, math.ceil(n / shards), floor)
        return Sizing(shards, per, precise, f"{why} -> {shards} shard(s) x {per}")
    per = min(eps, max(1, room_examples // max(1, cap)))
    cap = min(cap, max(1, room_examples // per))  # fewer examples left than shards: fewer shards, never over budget
    shown = "no yield measured yet" if n == UNREACHABLE else f"~{n} examples"
    why = f"{need} more needed at a yield of {y:.3f} per example ({shown}): a full round of {cap} shard(s)"
    return Sizing(cap, per, False, why)


def pilot(spec: GenerationRunSpec) -> tuple[list[Sampling], list[int], str]:
    """Round 1 under the bandit: pilotShare of the target in examples (the least the run can need), spread evenly
    over the arms, each arm's probe at least `probe_examples` (enough to retire an arm that passes no QC) and at
    most examplesPerShard per shard; and the shard that runs spec.sampling itself a real one (`base_commitment`).
    Returns (arm per shard, examples per shard, why)."""
    space = arms(spec)
    eps = spec.shards.examples_per_shard
    probe = min(eps, probe_examples(spec))
    want = max(1, math.ceil(spec.policy.pilot_share * spec.target.unique_examples))
    cap = min(spec.escalation.max_shards_per_round, spec.budget.max_shards)
    n = max(1, min(cap, max(len(space), math.ceil(want / eps))))
    per = min(eps, max(probe, math.ceil(want / n)))
    # Fewer shards than arms: spread the shards evenly over the arm list (its ends included).
    idx = [round(i * (len(space) - 1) / (n - 1)) if n > 1 else 0 for i in range(n)] if n < len(space) else None
    picked = sorted([space[i] for i in idx] if idx is not None else [space[i % len(space)] for i in range(n)],
                    key=space.index)  # fmt: skip
    why = (
        f"pilot: {n} shard(s) x {per} examples over {len({arm_id(s) for s in picked})} arm(s) "
        f"(spec.policy.pilotShare={spec.policy.pilot_share:g} of the target; {probe} examples retire an arm that "
        f"passes no QC with confidence {spec.policy.retire_confidence:g})"
    )
    base, sizes = base_sampling(spec), [per] * n
    commit = base_commitment(spec, per * n, per * (n - 1)) if base in picked else 0
    if commit > per:
        sizes[picked.index(base)] = commit
        why += (
            f"; the shard at spec.sampling ({arm_id(base)}) writes {commit} (at most {GROWTH}x the pilot's examples, "
            "examplesPerShard, and with the probes the prior's approach round and the budget)"
        )
    return picked, sizes, why


def base_commitment(spec: GenerationRunSpec, probes: int, others: int) -> int:
    """Examples for round 1's shard at spec.sampling, the arm the user chose (the one a run without the bandit would
    use throughout). A round's engine passes are latency-bound at a small batch (a decode step costs nearly as much for
    a few sequences as for dozens), so a pilot of probes alone is mostly latency, and it leaves round 2 sized from a
    handful of examples: too wide an estimate to finish in. So that shard does real work while the other arms are
    probed: at most GROWTH x the `probes` (the bound the growth rule puts on later rounds: what round 1 commits before
    any evidence stays a bounded multiple of its exploration), examplesPerShard, and, with the `others` examples of
    the round's other shards, what an approach round would commit at the uninformed prior (a yield of
    0.5 +- sqrt(1/12)) and what the budget's maxGeneratedExamples allows."""
    b = spec.budget
    prior, _, _ = examples_for(
        spec, spec.target.unique_examples, 0.5, math.sqrt(1 / 12), b.max_rounds <= 1, b.max_rounds
    )
    return min(spec.shards.examples_per_shard, GROWTH * probes, prior - others, b.max_generated_examples - others)


def projections(
    spec: GenerationRunSpec, stats: Sequence[ArmStats], need: int, rounds_done: int
) -> tuple[int | None, int | None]:
    """(tokens still to generate, rounds in all) to reach the target at the best arm's measured yield."""
    if need <= 0:
        return 0, rounds_done
    tried = [a for a in active(stats) if a.tried]
    if not tried:
        return None, None
    top = max(tried, key=lambda a: reward(stats, a))
    n = examples_needed(need, top.mean_yield, spec.policy.stop_confidence)
    per_round = spec.escalation.max_shards_per_round * spec.shards.examples_per_shard
    return math.ceil(n * tokens_per_example(stats, top)), rounds_done + math.ceil(n / per_round)


def arm_status(stats: Sequence[ArmStats]) -> tuple[ArmEntry, ...]:
    return tuple(
        ArmEntry(
            arm=a.id,
            temperature=a.sampling.temperature,
            top_p=a.sampling.top_p,
            repetition_penalty=a.sampling.repetition_penalty,
            min_p=a.sampling.min_p,
            shards=a.shards,
            examples=a.examples,
            tokens=a.tokens,
            kept=a.kept,
            reward_per_1k_tokens=round(1000 * a.w_kept / a.w_tokens, 4) if a.w_tokens > 0 else 0.0,
            qc_pass_rate=round(a.qc_pass_rate, 4),
            retired=a.retired,
        )
        for a in stats[:MAX_ARMS]
    )


# ----------------------------------------------------------------------------------------------------------
# Attribute cells: the second factor of an arm. A shard runs one sampling arm and one cell; the two are chosen by
# two bandits over the same per-shard yields (a factorised model: a cell's yield is measured over every sampling,
# a sampling's over every cell), so the arm space grows as samplings + cells, not samplings x cells.

Cell = tuple[tuple[str, str], ...]


def cells(spec: GenerationRunSpec) -> tuple[Cell, ...]:
    """Every combination of one value per attribute, in spec order; (()) when the spec has no attributes."""
    out: list[Cell] = [()]
    for a in spec.prompt.attributes:
        out = [(*c, (a.name, v)) for c in out for v in a.values]
    return tuple(out)


def pilot_cells(spec: GenerationRunSpec, n: int, rng: random.Random) -> list[Cell]:
    """The pilot's n shards cycle through the cells in an order drawn from the run's stream (no cells: none)."""
    if not spec.prompt.attributes:
        return []
    order = list(cells(spec))
    rng.shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def cell_id(cell: Cell) -> str:
    return ",".join(f"{k}={v}" for k, v in cell) or "(all)"


@dataclass
class CellStats(ArmStats):
    cell: Cell = ()

    @property
    def id(self) -> str:
        return cell_id(self.cell)


def cell_stats(
    spec: GenerationRunSpec, rounds: Mapping[int, RoundPlan], reports: Mapping[int, RoundReport]
) -> list[CellStats]:
    """Each cell's evidence from the per-shard yields (shards planned without a cell count for none), with the
    same discount, retirement and pooled prior as the sampling arms."""
    base = base_sampling(spec)
    stats = {c: CellStats(base, cell=c) for c in cells(spec)}
    latest = max(reports, default=0)
    for rnd, shard, y in shard_yields(rounds, reports):
        if shard.cell in stats:
            w = DISCOUNT ** (latest - rnd)
            stats[shard.cell].add(w, 1, y.rows, y.tokens, y.new_unique, y.new_qc_passed)
    out = list(stats.values())
    _judge(spec, out)
    return out


def _judge(spec: GenerationRunSpec, out: Sequence[ArmStats]) -> None:
    """Retirement on the exact QC-pass bound, and the prior (shared by arms and cells). The prior is empirical-Bayes:
    the pooled yield of the live arms tried, worth PRIOR_WEIGHT examples. A flat Beta(1, 1) would pull a good arm
    seen on a few examples towards 0.5 and hand the "best" label (and the exploration cap's protection) to whichever
    arm happened to get more examples; an untried arm is expected to do as well as the live arms on average."""
    floor, conf = spec.escalation.min_qc_pass_rate, spec.policy.retire_confidence
    for a in out:
        a.retired = a.unique > 0 and qc_upper_bound(a.kept, a.unique, conf) < floor
    live = [a for a in out if not a.retired and a.w_examples > 0]
    ex = sum(a.w_examples for a in live)
    if ex > 0:
        m = min(0.99, max(0.01, sum(a.w_kept for a in live) / ex))
        for a in out:
            a.prior = (PRIOR_WEIGHT * m, PRIOR_WEIGHT * (1 - m))


def _matches(cell: Cell, match: Mapping[str, str]) -> bool:
    d = dict(cell)
    return all(d.get(k) == v for k, v in match.items())


def allocate_cells(
    spec: GenerationRunSpec, stats: Sequence[CellStats], n: int, per: int, rng: random.Random
) -> tuple[list[Cell], str]:
    """A cell for each of n shards of `per` examples: Thompson sampling with the exploration cap, then the quotas:
    the cells matching a quota get enough shards (each to the matching cell of the best estimated reward) that,
    at the posterior mean yields, they hold minShare of all kept rows once this round is merged:
    held + F*yc >= q * (kept + F*yc + (E - F)*yo) for E = n * per examples of which F go to them.
    Returns (cells, why) in draw order."""
    if len(stats) == 1:
        return [stats[0].cell] * n, ""
    out = [p.cell for p in allocate(stats, n, spec.policy.exploration, rng)]
    kept = sum(s.kept for s in stats)
    notes = []
    for q in spec.prompt.quotas:
        fill = [s for s in active(stats) if _matches(s.cell, q.match)] or [
            s for s in stats if _matches(s.cell, q.match)
        ]
        if not fill:
            continue
        top = max(fill, key=lambda s: reward(stats, s))
        rest = [s for s in active(stats) if not _matches(s.cell, q.match)] or [top]
        yc, yo = top.mean_yield, sum(s.mean_yield for s in rest) / len(rest)
        held, total = sum(s.kept for s in stats if _matches(s.cell, q.match)), n * per
        f = (q.min_share * (kept + total * yo) - held) / max(1e-9, (1 - q.min_share) * yc + q.min_share * yo) / total
        want = min(n, math.ceil(max(0.0, f) * n))
        have = [i for i, c in enumerate(out) if _matches(c, q.match)]
        others = [i for i, c in enumerate(out) if not _matches(c, q.match)]
        for i in others[: max(0, want - len(have))]:
            out[i] = top.cell
        if want:
            notes.append(
                f"quota {cell_id(tuple(q.match.items()))} >= {q.min_share:g} ({held}/{kept} kept): {want} shard(s)"
            )
    return out, "; ".join(notes)


def cell_factor(stats: Sequence[CellStats], picks: Sequence[Cell]) -> float:
    """How the cells drawn for a round scale its yield: their mean posterior yield over the live cells' pooled
    yield (the factorised model: a shard's yield = its sampling arm's yield x this factor)."""
    by = {s.cell: s for s in stats}
    pooled = stats[0].prior[0] / sum(stats[0].prior) if stats else 1.0
    if not picks or pooled <= 0:
        return 1.0
    return sum(by[c].mean_yield for c in picks) / len(picks) / pooled


def cell_status(stats: Sequence[CellStats]) -> tuple[CellEntry, ...]:
    return tuple(
        CellEntry(
            cell=c.id,
            attributes=dict(c.cell),
            shards=c.shards,
            examples=c.examples,
            tokens=c.tokens,
            kept=c.kept,
            yield_=round(c.kept / c.examples, 4) if c.examples else 0.0,
            reward_per_1k_tokens=round(1000 * c.w_kept / c.w_tokens, 4) if c.w_tokens > 0 else 0.0,
            qc_pass_rate=round(c.qc_pass_rate, 4),
            retired=c.retired,
        )
        for c in stats
        if c.shards
    )
