"""ETA and throughput: a small, bounded estimator fed with every applied report.

The service keeps an `EtaState` per operation (a fixed set of numbers stored on
the Operation value), calls `observe` after each applied report and `estimate`
whenever it wants an `Estimate` (after a report, and periodically so that a
paused or stalled operation's confidence falls); after a report both at once,
with `observe_and_estimate`.

Design
------
Progress is the fraction of the whole job done (`op.percent / 100`, which
already follows the stage plan's weights); time is *active* time: an interval
that began PAUSED does not count, and of a silence longer than the heartbeat
timeout (a stall) only the timeout counts, so an outage is not mistaken for the
job's speed. Pace is active seconds per fraction of the job. Progress already
reported at the first observation (a job resumed from a checkpoint) is a
starting point, not speed.

The remaining work is split in two:

- The current *segment*: the running stage of a plan, or the whole job without
  one. Its recent pace is time-decayed: decayed sums of progress and of active
  time, each interval counted by the time it covered (so the figure does not
  depend on how often reports come), with a half-life of a tenth of the
  segment's age, at least three report intervals, within [2 s, 15 min] (short
  jobs react within seconds, long ones are not swayed by one slow minute). Its
  average pace is the segment's whole history (for a job without a plan, the
  whole run's average). If pace changes linearly with progress, the average is
  the pace at the segment's middle and the decayed pace the pace a little
  behind the current point (the mean age of its weights), so the two give the
  current pace and its slope. How much of that departure from the average is
  believed depends on how it stands out of the noise: the *wander* of the
  recent pace (the EWMA of how much log(recent / average) moves from one
  half-life to the next) is large for bursts and jitter, which then fall back
  to the average, and small for a steady trend, which is then followed. The
  slope is damped, and followed no further ahead than the history it was seen on.
- The plan's stages not started yet: their weight times the run's average pace.
  Stages of one plan run at different speeds, and the current stage's speed
  says nothing about the next one's, so extrapolating it to the whole job (what
  a plain rate does) is wrong both ways; the run's average over every stage so
  far is the unbiased guess. A young stage's own pace is likewise shrunk
  towards the run's average until it has some progress of its own (about 5 %).

Confidence is 1 / (1 + (u / 0.25)^2), where u is the expected relative error:
the root of the sum of squares of (a) how far ahead the ETA reaches compared
with the active time behind it (early in a run), (b) the share of the remaining
time that rests on the run's average (stages not started yet, a stage just
entered) times the spread of the stage speeds seen so far, (c) the segment's
noise (the wander above, as much of it as the estimate follows) and how far the
estimate departs from the plain average, and (d) a stage just entered, whose
pace is about to be revised. It is halved while paused, and falls further while
stalled or silent for longer than the usual report interval.

History of the kind
-------------------
A stage plan's weights are often wrong, and the same kind of job has usually run
before. When an operation with a plan succeeds, `run_ratios` keeps how long each
stage took relative to its weight: log((share of the run's time) / (share of
the plan's weight)), which does not depend on how fast the machine was. The
stats aggregate holds the last runs per kind and summarises them with
`build_history` (per stage the median, and a pooled robust spread). With a
`StageHistory`, the time shares of this operation's stages are known up to a
scale; the scale is this run's own: its active time over the shares of the
stages it has done (and of the running one, as far as it got). Stages not
started yet are then costed from the history, and a young stage's prior pace
too, blended with the run's average pace by a weight that grows with the number
of runs and falls when they disagree. Confidence uses the history's spread in
place of the spread of stage speeds seen so far: higher when earlier runs agree,
lower when they are erratic. Without history (or for a job resumed from a
checkpoint, whose early time is unknown) nothing changes.

Everything here is pure: no clock, no I/O, no grpc.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from headway_server.domain.model import Estimate, Operation, StageState, State
from headway_server.domain.values import fast_init

# Half-life of the decayed pace: this fraction of the segment's active age, within bounds.
HALF_LIFE_FRACTION = 0.1
MIN_HALF_LIFE = 2.0
MAX_HALF_LIFE = 900.0
HALF_LIFE_REPORTS = 3.0
# Throughput (what the operation shows) is smoothed at least this much.
MIN_THROUGHPUT_HALF_LIFE = 10.0
# The drift (log of recent / average pace) is sampled every half-life, and at
# most every this many report intervals.
SAMPLE_REPORTS = 3.0
# Weight of one sample in the EWMA of the drift's squared change.
WANDER_SMOOTHING = 0.1
# Wander assumed before any sample, and its weight in samples.
WANDER_PRIOR = 0.3
WANDER_PRIOR_WEIGHT = 2.0
# Weight of one interval in the EWMA of the report interval.
GAP_SMOOTHING = 0.2
# The recent pace is taken as at most this many times the average pace.
MAX_PACE_RATIO = 10.0
# A trend may shorten the rest to no less than this share of the current pace's.
MIN_PACE_RATIO = 0.3
# Damping of the slope of the pace.
TREND_DAMPING = 0.5
# The trend is followed this many times as far ahead as the history it was seen on.
TREND_HORIZON = 1.0
# A young stage's pace is shrunk towards the run's until it has about this much
# of its own progress (a fraction of the stage).
STAGE_PRIOR = 0.05
# Spread (standard deviation of log pace) between stages before two finished.
STAGE_SPREAD_PRIOR = 0.5
STAGE_SPREAD_PRIOR_WEIGHT = 2.0
# Uncertainty of a stage just entered, falling as it makes progress of its own:
# its pace, still the run's, is about to be revised.
FRESH_STAGE_UNCERTAINTY = 0.3
# Uncertainty per sqrt(seconds remaining / active seconds so far).
EARLY_UNCERTAINTY = 0.15
# Uncertainty per unit of |log(ETA / ETA at the segment's average pace)|.
MODEL_UNCERTAINTY = 0.5
# A predicted relative error of this gives confidence 0.5.
CONFIDENCE_SCALE = 0.25
# Confidence factors while paused and while stalled.
PAUSED_CONFIDENCE = 0.5
STALLED_CONFIDENCE = 0.3

# History: runs kept per kind (by the stats aggregate), the blend weight's
# prior (runs / (runs + HISTORY_PRIOR_RUNS)), the spread at which an erratic
# history is trusted half as much, and the floor of the spread assumed.
HISTORY_RUNS = 32
HISTORY_PRIOR_RUNS = 1.0
HISTORY_SPREAD_SCALE = 0.5
MIN_HISTORY_SPREAD = 0.05

_LN2 = math.log(2.0)
_FINISHED = (StageState.DONE, StageState.SKIPPED)


@fast_init
@dataclass(frozen=True, slots=True)
class EtaState:
    """The estimator's memory for one operation: a fixed set of numbers."""

    # Wall time of the last observation (None before the first).
    last_at: float | None = None
    observations: int = 0
    # Active seconds since the first observation (pauses and stalls left out).
    active: float = 0.0
    # Whether the operation was PAUSED at the last observation.
    paused: bool = False
    # EWMA of the wall time between reports (stalls and pauses left out).
    gap: float = 0.0
    # Fraction of the job done, and units, at the first and the last observation.
    base_fraction: float = 0.0
    fraction: float = 0.0
    base_units: int = 0
    units: int = 0
    # Decayed active time and amount done (units, or fraction of the job when
    # the operation counts none) over the whole run: the throughput.
    run_time: float = 0.0
    run_amount: float = 0.0
    # The current segment: the running stage's index (-1: none, or no plan),
    # the active time at its start, and its progress (as a fraction of the
    # job) at its start and at the last observation.
    stage_index: int = -1
    segment_start: float = 0.0
    segment_base: float = 0.0
    segment_progress: float = 0.0
    # Decayed active time and progress within the segment (the recent pace).
    decayed_time: float = 0.0
    decayed_progress: float = 0.0
    # Active time since the drift was last sampled; the last sample in this
    # segment (None: none yet); the EWMA of its squared change between samples,
    # and the number of changes seen.
    since_sample: float = 0.0
    drift: float | None = None
    wander: float = 0.0
    samples: int = 0
    # Finished stages: count, mean and sum of squared deviations of their log
    # pace (Welford), for the spread of stage speeds.
    stages_seen: int = 0
    stage_log_mean: float = 0.0
    stage_log_m2: float = 0.0


@dataclass(frozen=True, slots=True)
class StageHistory:
    """What earlier successful runs of a kind say about its stages."""

    # Stage name -> median of log((share of the run's time) / (share of weight)).
    ratios: Mapping[str, float]
    # Robust spread of those logs around their stage's median, pooled.
    spread: float
    runs: int


def run_ratios(op: Operation) -> dict[str, float] | None:
    """log(time share / weight share) per stage of a finished run, over the stages
    it ran (skipped ones left out); None when it has nothing to learn from."""
    if not op.planned or op.state is not State.SUCCEEDED:
        return None
    ran = [
        (s.name, s.weight, s.finished_at - s.started_at)
        for s in op.stages
        if s.state is StageState.DONE and s.started_at is not None and s.finished_at is not None
    ]
    if len(ran) < 2 or any(seconds <= 0 or weight <= 0 for _, weight, seconds in ran):
        return None
    time = sum(seconds for _, _, seconds in ran)
    weights = sum(weight for _, weight, _ in ran)
    return {name: math.log((seconds / time) / (weight / weights)) for name, weight, seconds in ran}


def build_history(runs: Sequence[Mapping[str, float]]) -> StageHistory | None:
    """The median per stage and the pooled spread (1.4826 x the median absolute
    deviation) of some runs' `run_ratios`; None without runs."""
    if not runs:
        return None
    by_stage: dict[str, list[float]] = {}
    for ratios in runs:
        for name, value in ratios.items():
            by_stage.setdefault(name, []).append(value)
    medians = {name: statistics.median(values) for name, values in by_stage.items()}
    deviations = [
        abs(value - medians[name]) for name, values in by_stage.items() for value in values
    ]
    # A single run says nothing of the spread: assume the no-history prior.
    spread = 1.4826 * statistics.median(deviations) if len(runs) > 1 else STAGE_SPREAD_PRIOR
    return StageHistory(medians, max(MIN_HISTORY_SPREAD, spread), len(runs))


class _Costing(NamedTuple):
    """What a history says about the operation at hand."""

    # Weight of the history against the run's average pace, in [0, 1).
    weight: float
    # Active seconds of the whole run, and the time shares of the running stage
    # and of the stages not started yet.
    scale: float
    current: float
    future: float
    # Expected spread of log stage time (for confidence).
    spread: float


def _costing(state: EtaState, op: Operation, plan: _Plan, history: StageHistory) -> _Costing | None:
    if state.base_fraction > 0 or state.active <= 0:
        return None  # resumed from a checkpoint: the time its progress took is unknown
    stages = op.stages
    ratios = history.ratios
    sizes = [s.weight * math.exp(ratios.get(s.name, 0.0)) for s in stages]
    norm = sum(sizes)
    if norm <= 0:
        return None
    done = future = current = 0.0
    # How this run's finished stages fit the history: log(seconds / share),
    # whose spread around its mean is 0 when the shares are right.
    fit: list[float] = []
    for i, stage in enumerate(stages):
        if stage.state is StageState.DONE:
            done += sizes[i]
            if stage.started_at is not None and stage.finished_at is not None:
                seconds = stage.finished_at - stage.started_at
                if seconds > 0 and sizes[i] > 0:
                    fit.append(math.log(seconds / sizes[i]))
        elif stage.state is StageState.PENDING:
            future += sizes[i]
    if plan.stage_index >= 0 and stages[plan.stage_index].state is StageState.RUNNING:
        current = sizes[plan.stage_index]
        if plan.progress is not None and plan.share > 0:
            done += current * plan.progress / plan.share
            active = state.active
        else:
            # How far the running stage got is unknown: scale by the stages before it.
            active = state.segment_start
    else:
        active = state.active
    if done <= 0 or active <= 0:
        return None
    spread = history.spread
    if len(fit) >= 2:
        # The run's own stages so far disagree with the history: trust it less.
        mean = sum(fit) / len(fit)
        misfit = math.sqrt(sum((x - mean) ** 2 for x in fit) / (len(fit) - 1))
        spread = max(spread, misfit)
    consistency = 1.0 / (1.0 + (spread / HISTORY_SPREAD_SCALE) ** 2)
    trust = history.runs / (history.runs + HISTORY_PRIOR_RUNS)
    spread = math.sqrt(spread**2 + STAGE_SPREAD_PRIOR**2 / (history.runs + 1))
    return _Costing(
        trust * consistency, active * norm / done, current / norm, future / norm, spread
    )


class _Plan(NamedTuple):
    """Where the job stands, in fractions of the whole job."""

    # The segment: the running stage's index, or -1 (no plan, or none running).
    stage_index: int
    # The segment's share of the job, and its progress (None: the stage's size
    # is unknown).
    share: float
    progress: float | None
    # Share of the job in stages not started yet.
    future: float


def _fraction(op: Operation) -> float:
    return min(1.0, max(0.0, op.percent / 100.0))


def _counts_units(op: Operation) -> bool:
    return op.total > 0 or op.completed > 0


def _plan(op: Operation) -> _Plan:
    if not op.planned:
        return _Plan(-1, 1.0, _fraction(op), 0.0)
    weights = sum(s.weight for s in op.stages)
    if weights <= 0:
        return _Plan(-1, 1.0, _fraction(op), 0.0)
    future = sum(s.weight for s in op.stages if s.state is StageState.PENDING) / weights
    index = next((i for i, s in enumerate(op.stages) if s.name == op.stage), -1)
    if index < 0:
        return _Plan(-1, 0.0, None, future)
    stage = op.stages[index]
    share = stage.weight / weights
    progress: float | None = None
    if stage.state in _FINISHED:
        progress = share
    elif stage.total > 0:
        progress = share * min(1.0, stage.completed / stage.total)
    return _Plan(index, share, progress, future)


def _half_life(age: float, gap: float) -> float:
    """A share of the segment's age, but always a few report intervals: a rate
    over one interval is what jumps with the report frequency."""
    return min(MAX_HALF_LIFE, max(MIN_HALF_LIFE, HALF_LIFE_FRACTION * age, HALF_LIFE_REPORTS * gap))


def _decay(
    time: float, amount: float, dt: float, delta: float, half_life: float
) -> tuple[float, float]:
    """Adds an interval of `dt` active seconds that did `delta` to decayed sums.

    The work is taken as spread evenly over the interval, so one long interval
    weighs as much as many short ones covering the same time: the result does
    not depend on how often reports come."""
    if dt <= 0:
        return time, amount + delta
    lam = _LN2 / half_life
    keep = math.exp(-lam * dt)
    weight = (1.0 - keep) / lam
    return time * keep + weight, amount * keep + delta / dt * weight


def _recent_pace(decayed_time: float, decayed_progress: float, average: float) -> float:
    """The decayed pace, at most MAX_PACE_RATIO times the average pace."""
    if decayed_time <= 0:
        return average
    if decayed_progress * MAX_PACE_RATIO * average <= decayed_time:
        return MAX_PACE_RATIO * average
    return decayed_time / decayed_progress


def observe(state: EtaState, op: Operation, now: float) -> EtaState:
    """The state after an applied report that left the operation as `op`."""
    return _observe(state, op, now, _plan(op))


def observe_and_estimate(
    state: EtaState, op: Operation, now: float, history: StageHistory | None = None
) -> tuple[EtaState, Estimate]:
    """`observe`, then `estimate` at the same time: what every applied report
    needs (it is on the path of every report), with their shared work done once."""
    plan = _plan(op)
    observed = _observe(state, op, now, plan)
    return observed, _estimate(observed, op, now, plan, history)


def _observe(state: EtaState, op: Operation, now: float, plan: _Plan) -> EtaState:
    fraction = _fraction(op)
    counts_units = _counts_units(op)
    units = op.completed if counts_units else 0
    paused = op.state is State.PAUSED
    if state.last_at is None:
        return EtaState(
            last_at=now,
            observations=1,
            paused=paused,
            base_fraction=fraction,
            fraction=fraction,
            base_units=units,
            units=units,
            stage_index=plan.stage_index,
            segment_base=plan.progress or 0.0,
            segment_progress=plan.progress or 0.0,
        )

    # How much of the time since the last report counts.
    wall = max(0.0, now - state.last_at)
    stall = op.heartbeat_timeout > 0 and wall > op.heartbeat_timeout
    gap = state.gap
    if state.paused:
        dt = 0.0
    elif stall:
        # The producer promised a report within the heartbeat timeout: time
        # beyond it is an outage, not the job's pace.
        dt = op.heartbeat_timeout
    else:
        dt = wall
        if wall > 0:
            gap = wall if gap <= 0 else gap + GAP_SMOOTHING * (wall - gap)
    active = state.active + dt

    amount = float(units - state.units) if counts_units else fraction - state.fraction
    run_time, run_amount = _decay(
        state.run_time,
        state.run_amount,
        dt,
        max(0.0, amount),
        max(MIN_THROUGHPUT_HALF_LIFE, _half_life(active, gap)),
    )

    stages_seen, stage_log_mean, stage_log_m2 = (
        state.stages_seen,
        state.stage_log_mean,
        state.stage_log_m2,
    )
    segment_start, segment_base = state.segment_start, state.segment_base
    progress = state.segment_progress
    decayed_time, decayed_progress = state.decayed_time, state.decayed_progress
    since_sample, drift = state.since_sample + dt, state.drift
    wander, samples = state.wander, state.samples
    if plan.stage_index != state.stage_index:
        # A new stage: record how fast the last one went, start a fresh segment.
        log_pace = _finished_log_pace(state, op, active)
        if log_pace is not None:
            stages_seen += 1
            delta = log_pace - stage_log_mean
            stage_log_mean += delta / stages_seen
            stage_log_m2 += delta * (log_pace - stage_log_mean)
        segment_start, segment_base = active, plan.progress or 0.0
        progress = segment_base
        decayed_time = decayed_progress = since_sample = 0.0
        drift = None
    elif plan.progress is not None:
        delta = max(0.0, plan.progress - progress)
        progress += delta
        age = active - segment_start
        half_life = _half_life(age, gap)
        decayed_time, decayed_progress = _decay(
            decayed_time, decayed_progress, dt, delta, half_life
        )
        done = progress - segment_base
        if since_sample >= max(SAMPLE_REPORTS * gap, half_life) and done > 0:
            # How far the recent pace is from the average, and how much that
            # moved since the last sample: trends move it slowly, bursts and
            # jitter a lot.
            average = age / done
            sample = math.log(_recent_pace(decayed_time, decayed_progress, average) / average)
            if drift is not None:
                wander += WANDER_SMOOTHING * ((sample - drift) ** 2 - wander)
                samples += 1
            drift, since_sample = sample, 0.0
    return EtaState(
        last_at=now,
        observations=state.observations + 1,
        active=active,
        paused=paused,
        gap=gap,
        base_fraction=state.base_fraction,
        fraction=fraction,
        base_units=state.base_units,
        units=units,
        run_time=run_time,
        run_amount=run_amount,
        stage_index=plan.stage_index,
        segment_start=segment_start,
        segment_base=segment_base,
        segment_progress=progress,
        decayed_time=decayed_time,
        decayed_progress=decayed_progress,
        since_sample=since_sample,
        drift=drift,
        wander=wander,
        samples=samples,
        stages_seen=stages_seen,
        stage_log_mean=stage_log_mean,
        stage_log_m2=stage_log_m2,
    )


def _finished_log_pace(state: EtaState, op: Operation, active: float) -> float | None:
    """log(active seconds per fraction of the job) of the segment that just ended."""
    if state.stage_index < 0 or state.stage_index >= len(op.stages):
        return None
    weights = sum(s.weight for s in op.stages)
    stage = op.stages[state.stage_index]
    elapsed = active - state.segment_start
    if stage.state is StageState.SKIPPED or weights <= 0 or stage.weight <= 0 or elapsed <= 0:
        return None
    return math.log(elapsed * weights / stage.weight)


def estimate(
    state: EtaState, op: Operation, now: float, history: StageHistory | None = None
) -> Estimate:
    """Throughput, seconds remaining from `now`, and confidence; `history`:
    earlier runs of the operation's kind, if any."""
    return _estimate(state, op, now, None, history)


def _estimate(
    state: EtaState,
    op: Operation,
    now: float,
    plan: _Plan | None,
    history: StageHistory | None = None,
) -> Estimate:
    """`estimate`, with `_plan(op)` if the caller has it."""
    per_percent = not _counts_units(op)
    if op.state.terminal:
        done = (
            100.0 * (_fraction(op) - state.base_fraction)
            if per_percent
            else float(op.completed - state.base_units)
        )
        throughput = max(0.0, done) / state.active if state.active > 0 else 0.0
        return Estimate(throughput, per_percent, 0.0, 1.0, now)
    if state.last_at is None:
        return Estimate(0.0, per_percent, None, 0.0, now)
    silent = max(0.0, now - state.last_at)
    usual = state.gap if state.gap > 0 else 1.0
    paused = op.state is State.PAUSED
    throughput = 0.0
    if state.run_time > 0 and not paused:
        # The decayed rate, taking a silence beyond the usual interval as idle.
        idle = silent - usual
        if idle > 0:
            lam = _LN2 / max(MIN_THROUGHPUT_HALF_LIFE, _half_life(state.active, state.gap))
            keep = math.exp(-lam * idle)
            time = state.run_time * keep + (1.0 - keep) / lam
            throughput = state.run_amount * keep / time * (100.0 if per_percent else 1.0)
        else:
            # Nothing idle to decay (as right after a report): the same figure
            # with keep = 1, without the exponential.
            throughput = state.run_amount / state.run_time * (100.0 if per_percent else 1.0)
    forecast = _remaining(state, op, _plan(op) if plan is None else plan, history)
    if forecast is None:
        return Estimate(throughput, per_percent, None, 0.0, now)
    remaining, uncertainty = forecast
    if not paused:
        # Work goes on between reports, but is not assumed to beyond the usual interval.
        remaining = max(0.0, remaining - min(silent, usual))
    confidence = 1.0 / (1.0 + (uncertainty / CONFIDENCE_SCALE) ** 2)
    if paused:
        confidence *= PAUSED_CONFIDENCE
    elif op.stalled or (state.observations > 2 and silent > 3 * usual + 1.0):
        timeout = max(op.heartbeat_timeout, 10 * usual, 1.0)
        confidence *= STALLED_CONFIDENCE / (1.0 + silent / timeout)
    elif silent > 2 * usual:
        confidence *= 2 * usual / silent
    return Estimate(throughput, per_percent, remaining, min(1.0, max(0.0, confidence)), now)


def _remaining(
    state: EtaState, op: Operation, plan: _Plan, history: StageHistory | None
) -> tuple[float, float] | None:
    """Active seconds remaining as of the last observation, and its expected
    relative error; None without progress since the first observation to go by."""
    done = state.fraction - state.base_fraction
    if done <= 0 or state.active <= 0:
        return None
    run_pace = state.active / done
    future = plan.future * run_pace
    costing = None
    if history is not None and op.planned:
        costing = _costing(state, op, plan, history)
        if costing is not None:
            trust = costing.weight
            future = trust * costing.scale * costing.future + (1.0 - trust) * future
    age = state.active - state.segment_start
    if plan.progress is None or plan.stage_index != state.stage_index:
        # The stage's size is unknown: expect it to take its weight's share
        # (its share of earlier runs' time, with history).
        expected = plan.share * run_pace
        if costing is not None:
            trust = costing.weight
            expected = trust * costing.scale * costing.current + (1.0 - trust) * expected
        current, noise, prior = max(expected - age, 0.1 * expected), 0.0, 1.0
    else:
        left = max(0.0, plan.share - plan.progress)
        current, noise = _segment(state, left, age, run_pace)
        prior = 0.0
        if op.planned:
            # Shrink a young stage's pace towards the run's (with history:
            # towards its share of earlier runs' time, at this run's scale).
            evidence = max(0.0, state.segment_progress - state.segment_base) / plan.share
            prior = STAGE_PRIOR / (evidence + STAGE_PRIOR)
            expected = left * run_pace
            if costing is not None and plan.share > 0:
                trust = costing.weight
                from_history = costing.scale * costing.current * left / plan.share
                expected = trust * from_history + (1.0 - trust) * expected
            current = (1.0 - prior) * current + prior * expected
    total = current + future
    if total <= 0:
        return 0.0, 0.0
    # The spread of stage speeds: the finished stages' sample variance, with the
    # prior counted as STAGE_SPREAD_PRIOR_WEIGHT more stages; with history, the
    # history's own spread weighs in as its runs do.
    freedom = max(0, state.stages_seen - 1)
    stage_spread = math.sqrt(
        (state.stage_log_m2 + STAGE_SPREAD_PRIOR_WEIGHT * STAGE_SPREAD_PRIOR**2)
        / (freedom + STAGE_SPREAD_PRIOR_WEIGHT)
    )
    if costing is not None and history is not None:
        runs = history.runs / (history.runs + HISTORY_PRIOR_RUNS)
        stage_spread = runs * costing.spread + (1.0 - runs) * stage_spread
    # The parts of the error: early in the run, resting on the run's average
    # (unseen stages, a young stage), the segment's noise, a stage just entered.
    early = EARLY_UNCERTAINTY * math.sqrt(total / state.active)
    unseen = stage_spread * (future + prior * current) / total
    segment = noise * current / total
    fresh = FRESH_STAGE_UNCERTAINTY * prior if op.planned else 0.0
    return total, math.sqrt(early**2 + unseen**2 + segment**2 + fresh**2)


def _segment(state: EtaState, left: float, age: float, run_pace: float) -> tuple[float, float]:
    """Seconds to do `left` (a fraction of the job) of the current segment, and
    the expected relative error of that figure."""
    done = state.segment_progress - state.segment_base
    if done <= 0 or age <= 0:
        return left * run_pace, 0.0
    average = age / done
    half_life = _half_life(age, state.gap)
    lam = _LN2 / half_life
    recent = _recent_pace(state.decayed_time, state.decayed_progress, average)
    # The mean age of the decayed sums' weights (a window filling since `span`).
    filled = min(lam * state.decayed_time, 1.0 - 1e-9)
    mean_age = 0.0
    if filled > 1e-9:
        span = -math.log(1.0 - filled) / lam
        mean_age = 1.0 / lam - span * (1.0 - filled) / filled
    # Pace linear in progress: the average is the pace at the middle of the
    # segment, the recent pace the pace `lag` behind the current point; the
    # line through both gives the current pace (extrapolated in log pace, and
    # only over a lag short enough not to blow up the noise) and the slope.
    lag = mean_age / recent
    departure = math.log(recent / average)
    slope, stretch = 0.0, 1.0
    if lag <= done / 4:
        slope = (recent - average) / (done / 2 - lag)
        stretch = 1.0 + lag / (done / 2 - lag)
    signal = departure * stretch
    # The noise of that signal: the wander, times the stretch.
    n = state.samples
    wander = state.wander / (1.0 - (1.0 - WANDER_SMOOTHING) ** n) if n else 0.0
    noise2 = (n * wander + WANDER_PRIOR_WEIGHT * WANDER_PRIOR**2) / (n + WANDER_PRIOR_WEIGHT)
    noise2 *= stretch * stretch
    # Believe the departure from the average as much as it stands out of the noise.
    keep = signal * signal / (signal * signal + noise2) if signal else 0.0
    pace = average * math.exp(keep * signal)
    trend = TREND_DAMPING * keep * slope
    # The trend is followed no further ahead than the history it was seen on.
    ahead = min(left, TREND_HORIZON * done)
    seconds = ahead * (pace + trend * ahead / 2) + (left - ahead) * (pace + trend * ahead)
    seconds = max(seconds, MIN_PACE_RATIO * left * pace)
    plain = left * average
    model = abs(math.log(seconds / plain)) if plain > 0 and seconds > 0 else 0.0
    # The recent pace carries the wander's noise; the average a share of it (it
    # spans age / half-life windows).
    spread2 = noise2 * (keep**2 + (1.0 - keep) ** 2 * min(1.0, half_life / age))
    return seconds, math.sqrt(spread2 + (MODEL_UNCERTAINTY * model) ** 2)
