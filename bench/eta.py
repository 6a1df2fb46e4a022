"""ETA evaluation harness: the server's estimator against two baselines.

Replays synthetic operations whose true finish time is known through the same
code the server runs (`lifecycle.new_operation`, `lifecycle.apply_update`,
`lifecycle.mark_stalled`, then `eta.observe` / `eta.estimate`) on a fake clock,
and through two baselines fed the same reports:

- naive: elapsed / fraction done (elapsed * (1 - f) / f);
- tqdm: tqdm's exponential moving average with smoothing 0.3: EMAs of the
  progress and of the time between updates (bias-corrected, as tqdm does),
  rate = EMA(dn) / EMA(dt), eta = left / rate.

Profiles: constant rate, slowing down, speeding up, bursty with pauses,
multi-stage with unequal stage speeds (a weighted stage plan), one long stall;
each with several seeds (durations, report intervals, noise, units or plain
percent all drawn per seed).

History profiles (issue 14): operations of one kind whose stage plan's weights
are wrong (each stage's real share of the time differs from its weight, the
same way on every run of the kind), replayed after 3 to 6 earlier runs of the
same kind have finished, whose stage history (eta.run_ratios, summarised by
eta.build_history as the server's stats do) the estimator is given:

- misweighted: the new run is like the earlier ones (its own size, speed and noise);
- faster-machine: the new run goes twice as fast throughout (history in seconds
  would mislead);
- shifted-shares: the new run's stage speeds are drawn afresh, unrelated to the
  earlier runs' (the history misleads about the stages themselves).

Each is scored for the estimator with history ("headway"), the same estimator
without it ("no-history", today's behaviour), and the baselines. The goals, on
the MdAPE pooled over 10, 25 and 50 % done: misweighted at most half of
no-history's; faster-machine no more than 10 % above it.

Prints the median absolute percentage error (MdAPE) of the ETA at 10, 25, 50,
75 and 90 % done (at the first report at or past each), per profile and overall
("all" pools the five checkpoints; "overall" pools the profiles), per method,
and the Spearman rank correlation between the server's confidence and its
actual error over all its samples; writes the figures as JSON
(bench/results/eta.json unless --json PATH). An estimator with no ETA at a
checkpoint is charged 100 %. The goal: overall MdAPE at least 25 % lower than
the better baseline's, and a correlation of -0.3 or below.

    .venv/bin/python bench/eta.py [--quick] [--json PATH] [--seeds N] [--seed-base N]
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headway_server.domain import eta, lifecycle
from headway_server.domain.model import Operation, StageSpec, StartSpec, State, Update

PROFILES = ("constant", "slowing", "speeding", "bursty", "multistage", "stall")
METHODS = ("headway", "naive", "tqdm")
HISTORY_PROFILES = ("misweighted", "faster-machine", "shifted-shares")
HISTORY_METHODS = ("headway", "no-history", "naive", "tqdm")
# Checkpoints the history goals pool, and the goals (headway / no-history).
EARLY = (10, 25, 50)
HISTORY_GOALS = {"misweighted": 0.5, "faster-machine": 1.1}
EARLIER_RUNS = (3, 6)
CHECKPOINTS = (10, 25, 50, 75, 90)
TQDM_SMOOTHING = 0.3
# An estimator that gives no ETA at a checkpoint is charged this error.
MISSING_ERROR = 1.0
HEARTBEAT_TIMEOUT = 30.0
# Integration step of the simulated work (seconds).
STEP = 0.5
GOAL_IMPROVEMENT = 0.25
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "eta.json"


# --- synthetic jobs -----------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    weight: float
    # Seconds the stage takes at multiplier 1 and no noise.
    seconds: float
    units: int


@dataclass
class Job:
    """How a synthetic operation behaves; `simulate` turns it into reports."""

    profile: str
    seed: int
    stages: list[Stage]
    planned: bool
    # Units for the whole job (0: the producer reports plain percent).
    units: int
    interval: float
    noise: float
    noise_time: float
    # Speed multiplier from (true fraction done, time).
    pace: Callable[[float, float], float] = lambda f, t: 1.0
    # Whether the producer stays silent at time t (and it's not working).
    silent: Callable[[float], bool] = lambda t: False
    # (fraction done, seconds) of a stall: no work and no reports.
    stall: tuple[float, float] | None = None


@dataclass
class Sample:
    profile: str
    seed: int
    checkpoint: int
    truth: float
    errors: dict[str, float]
    confidence: float


@dataclass
class RunResult:
    samples: list[Sample] = field(default_factory=list)
    # Confidence while stalled or paused vs while reporting normally.
    quiet_confidence: list[float] = field(default_factory=list)
    normal_confidence: list[float] = field(default_factory=list)


def _loguniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def make_job(profile: str, seed: int, quick: bool) -> Job:
    rng = random.Random(f"{profile}-{seed}")
    duration = _loguniform(rng, 150, 400) if quick else _loguniform(rng, 200, 1200)
    interval = _loguniform(rng, 0.5, 3.0) if quick else _loguniform(rng, 0.4, 4.0)
    units = 0 if rng.random() < 0.3 else int(_loguniform(rng, 200, 100_000))
    noise = rng.uniform(0.05, 0.35)
    noise_time = rng.uniform(2.0, 20.0)
    job = Job(
        profile=profile,
        seed=seed,
        stages=[Stage("work", 1.0, duration, units)],
        planned=False,
        units=units,
        interval=interval,
        noise=noise,
        noise_time=noise_time,
    )
    if profile == "slowing":
        k = rng.uniform(0.4, 0.8)
        job.pace = lambda f, t: 1.0 - k * f
        job.stages[0].seconds *= 1 - k / 2
    elif profile == "speeding":
        k = rng.uniform(1.0, 3.0)
        job.pace = lambda f, t: 1.0 + k * f
        job.stages[0].seconds *= 1 + k / 2
    elif profile == "bursty":
        # Work in bursts separated by idle gaps (rate limits, queue waits); during
        # the gaps the producer keeps reporting (half the seeds) or goes quiet.
        cycles: list[tuple[float, float]] = []  # (burst end, gap end)
        t = 0.0
        mean_burst, mean_gap = rng.uniform(3, 15), rng.uniform(3, 20)
        while t < 20 * duration:
            burst = rng.uniform(0.3, 1.7) * mean_burst
            gap = rng.uniform(0.3, 1.7) * mean_gap
            cycles.append((t + burst, t + burst + gap))
            t += burst + gap
        ends = [c[1] for c in cycles]

        def in_gap(t: float) -> bool:
            i = bisect.bisect_right(ends, t)
            return i < len(cycles) and t >= cycles[i][0]

        share = mean_burst / (mean_burst + mean_gap)
        job.pace = lambda f, t: 0.0 if in_gap(t) else 1.0 / share
        if rng.random() < 0.5:
            job.silent = in_gap
    elif profile == "multistage":
        count = rng.randint(3, 6)
        weights = [float(rng.randint(1, 5)) for _ in range(count)]
        speeds = [math.exp(rng.gauss(0.0, 0.8)) for _ in range(count)]
        norm = sum(w * s for w, s in zip(weights, speeds, strict=True))
        job.stages = [
            Stage(
                f"stage{i}",
                w,
                duration * w * s / norm,
                int(_loguniform(rng, 20, 20_000)),
            )
            for i, (w, s) in enumerate(zip(weights, speeds, strict=True))
        ]
        job.planned = True
        job.units = 0
    elif profile == "stall":
        job.stall = (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.8) * duration)
    return job


@dataclass
class Report:
    at: float
    update: Update
    # True fraction done, for the record.
    fraction: float


def simulate(job: Job) -> tuple[list[Report], list[float], float]:
    """The producer's reports, the times at which it was silent (for periodic
    estimates), and the true finish time."""
    rng = random.Random(f"noise-{job.profile}-{job.seed}")
    total_seconds = sum(s.seconds for s in job.stages)
    weights = sum(s.weight for s in job.stages)
    reports: list[Report] = []
    quiet: list[float] = []
    t = 0.0
    stage = 0
    x = 0.0  # fraction of the current stage done
    z = 0.0  # AR(1) log-noise
    stalled_for = 0.0
    stall = job.stall
    sequence = 0

    def true_fraction() -> float:
        done = sum(s.weight for s in job.stages[:stage])
        return (done + job.stages[stage].weight * x) / weights

    def report(at: float) -> None:
        nonlocal sequence
        sequence += 1
        f = min(1.0, true_fraction())
        if job.planned:
            s = job.stages[stage]
            update = Update(
                sequence=sequence,
                stage=s.name,
                stage_completed=min(s.units, int(s.units * x)),
                stage_total=s.units,
            )
        elif job.units:
            update = Update(sequence=sequence, completed=min(job.units, int(job.units * f)))
        else:
            update = Update(sequence=sequence, percent=round(100.0 * f, 1))
        reports.append(Report(at, update, f))

    report(0.0)
    next_report = job.interval * random.Random(job.seed).uniform(0.5, 1.5)
    finish = math.inf
    while finish == math.inf:
        if t > 50 * total_seconds:
            raise RuntimeError(f"{job.profile} seed {job.seed} never finished")
        h = min(STEP, max(1e-6, next_report - t))
        f = true_fraction()
        if stall is not None and f >= stall[0] and stalled_for < stall[1]:
            # No work and no reports until the stall is over.
            stalled_for += h
            t += h
            if t >= next_report:
                quiet.append(t)
                next_report = t + job.interval * rng.uniform(0.5, 1.5)
            continue
        keep = math.exp(-h / job.noise_time)
        z = keep * z + math.sqrt(1 - keep * keep) * rng.gauss(0.0, 1.0)
        speed = job.pace(f, t) * math.exp(job.noise * z - job.noise**2 / 2)
        rate = speed / job.stages[stage].seconds
        if rate > 0 and x + rate * h >= 1.0:
            used = (1.0 - x) / rate
            t += used
            x = 0.0
            if stage + 1 == len(job.stages):
                finish = t
                break
            stage += 1
            if job.planned:
                report(t)  # entering a stage is reported at once, as the client does
            continue
        x += rate * h
        t += h
        if t >= next_report - 1e-9:
            if job.silent(t):
                quiet.append(t)
            else:
                report(t)
            next_report = t + job.interval * rng.uniform(0.5, 1.5)
    return reports, quiet, finish


# --- baselines ----------------------------------------------------------------------------


class Naive:
    def __init__(self) -> None:
        self.start: float | None = None

    def observe(self, f: float, now: float) -> None:
        if self.start is None:
            self.start = now

    def eta(self, f: float, now: float) -> float | None:
        if self.start is None or f <= 0:
            return None
        return (now - self.start) * (1.0 - f) / f


class Tqdm:
    """tqdm's EMA: separate smoothed progress and time increments, bias-corrected."""

    def __init__(self, smoothing: float = TQDM_SMOOTHING) -> None:
        self.alpha = smoothing
        self.dn = self.dt = 0.0
        self.calls = 0
        self.last: tuple[float, float] | None = None

    def observe(self, f: float, now: float) -> None:
        if self.last is not None:
            dn, dt = f - self.last[0], now - self.last[1]
            self.dn = self.alpha * dn + (1 - self.alpha) * self.dn
            self.dt = self.alpha * dt + (1 - self.alpha) * self.dt
            self.calls += 1
        self.last = (f, now)

    def eta(self, f: float, now: float) -> float | None:
        if self.calls == 0 or self.dn <= 0 or self.dt <= 0:
            return None
        return (1.0 - f) * self.dt / self.dn  # the bias corrections cancel in the ratio


# --- replay -------------------------------------------------------------------------------


def _ape(found: float | None, truth: float) -> float:
    if found is None:
        return MISSING_ERROR
    return abs(found - truth) / truth


def _new_operation(job: Job) -> Operation:
    spec = StartSpec(
        kind=f"bench-{job.profile}",
        total=job.units,
        stages=tuple(StageSpec(s.name, s.weight) for s in job.stages) if job.planned else (),
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
    )
    spec = lifecycle.validate_start(spec, "op-bench", "")
    return lifecycle.new_operation("op-bench", spec, 0.0)


def finished_ratios(job: Job) -> dict[str, float] | None:
    """What the server's stats learn from `job` once it succeeds (eta.run_ratios)."""
    reports, _, finish = simulate(job)
    op = _new_operation(job)
    for item in reports:
        op = lifecycle.apply_update(op, item.update, item.at)
    op = lifecycle.finish(op, State.SUCCEEDED, finish, call="CompleteOperation", request_id="")
    return eta.run_ratios(op)


def replay(job: Job, history: eta.StageHistory | None = None) -> RunResult:
    """Scores the estimator (with `history` when given, and then also without
    it as "no-history") and the baselines on `job`."""
    reports, quiet, finish = simulate(job)
    op: Operation = _new_operation(job)
    state = eta.EtaState()
    naive, tqdm = Naive(), Tqdm()
    result = RunResult()
    pending = list(CHECKPOINTS)
    events: list[tuple[float, Report | None]] = [(r.at, r) for r in reports]
    events += [(t, None) for t in quiet]
    events.sort(key=lambda e: (e[0], e[1] is None))
    for index, (at, item) in enumerate(events):
        if item is None:
            # A silent moment: the server's sweeper may mark the operation
            # stalled, and the estimate is refreshed.
            stalled = lifecycle.mark_stalled(op, at)
            if stalled is not None:
                op = stalled
            if op.stalled:
                result.quiet_confidence.append(eta.estimate(state, op, at).confidence)
            continue
        op = lifecycle.apply_update(op, item.update, at)
        state = eta.observe(state, op, at)
        f = op.percent / 100.0
        naive.observe(f, at)
        tqdm.observe(f, at)
        if not pending or op.percent < pending[0]:
            if index % 10 == 0:
                result.normal_confidence.append(eta.estimate(state, op, at).confidence)
            continue
        found = eta.estimate(state, op, at, history)
        plain = eta.estimate(state, op, at) if history is not None else found
        result.normal_confidence.append(found.confidence)
        while pending and op.percent >= pending[0]:
            checkpoint = pending.pop(0)
            truth = finish - at
            if truth <= 0:
                continue
            result.samples.append(
                Sample(
                    job.profile,
                    job.seed,
                    checkpoint,
                    truth,
                    {
                        "headway": _ape(found.eta, truth),
                        "no-history": _ape(plain.eta, truth),
                        "naive": _ape(naive.eta(f, at), truth),
                        "tqdm": _ape(tqdm.eta(f, at), truth),
                    },
                    found.confidence,
                )
            )
    return result


# --- history profiles ---------------------------------------------------------------------


def make_history_jobs(profile: str, seed: int, quick: bool) -> tuple[list[Job], Job]:
    """The earlier runs of one kind, and the new run to score.

    A kind has a stage plan whose weights are wrong: each stage's real speed
    differs from its weight by a factor drawn once per kind (as the multistage
    profile draws per run); each run has its own size, report interval, noise,
    and a small per-stage jitter of its own."""
    rng = random.Random(f"kind-{profile}-{seed}")
    count = rng.randint(3, 6)
    weights = [float(rng.randint(1, 5)) for _ in range(count)]
    log_speeds = [rng.gauss(0.0, 0.8) for _ in range(count)]
    earlier = rng.randint(*EARLIER_RUNS)

    def run(index: int, *, speed: float = 1.0, speeds: list[float] | None = None) -> Job:
        run_rng = random.Random(f"run-{profile}-{seed}-{index}")
        job = make_job("multistage", seed * 1000 + index, quick)
        job.profile = profile
        duration = sum(s.seconds for s in job.stages) / speed
        chosen = speeds if speeds is not None else log_speeds
        factors = [math.exp(x + run_rng.gauss(0.0, 0.15)) for x in chosen]
        norm = sum(w * f for w, f in zip(weights, factors, strict=True))
        job.stages = [
            Stage(f"stage{i}", w, duration * w * f / norm, int(_loguniform(run_rng, 20, 20_000)))
            for i, (w, f) in enumerate(zip(weights, factors, strict=True))
        ]
        job.seed = seed
        return job

    history = [run(i) for i in range(earlier)]
    if profile == "faster-machine":
        # The earlier runs' own durations, halved: the same work twice as fast.
        new = run(earlier)
        for stage in new.stages:
            stage.seconds /= 2
    elif profile == "shifted-shares":
        new = run(earlier, speeds=[rng.gauss(0.0, 0.8) for _ in range(count)])
    else:
        new = run(earlier)
    return history, new


def replay_with_history(profile: str, seed: int, quick: bool) -> RunResult:
    earlier, new = make_history_jobs(profile, seed, quick)
    runs = [r for r in (finished_ratios(job) for job in earlier) if r is not None]
    return replay(new, eta.build_history(runs))


def summarize_history(samples: list[Sample]) -> dict[str, dict[str, dict[str, float | None]]]:
    """As `summarize`, for the history profiles, with "early" pooling 10-50 % done."""
    rows: dict[str, dict[str, dict[str, float | None]]] = {}
    for row in HISTORY_PROFILES:
        chosen = [s for s in samples if s.profile == row]
        rows[row] = {}
        for method in HISTORY_METHODS:
            cells: dict[str, float | None] = {}
            for checkpoint in CHECKPOINTS:
                cells[str(checkpoint)] = _median_pct(
                    [s.errors[method] for s in chosen if s.checkpoint == checkpoint]
                )
            cells["early"] = _median_pct(
                [s.errors[method] for s in chosen if s.checkpoint in EARLY]
            )
            cells["all"] = _median_pct([s.errors[method] for s in chosen])
            rows[row][method] = cells
    return rows


# --- statistics ---------------------------------------------------------------------------


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share their average rank
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on ranks, ties averaged)."""
    if len(xs) != len(ys) or len(xs) < 2:
        return math.nan
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan


def _median_pct(values: list[float]) -> float | None:
    return 100.0 * statistics.median(values) if values else None


def summarize(samples: list[Sample]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{row: {method: {"10": MdAPE %, ..., "all": MdAPE %}}} for each profile and overall."""
    rows: dict[str, dict[str, dict[str, float | None]]] = {}
    for row in (*PROFILES, "overall"):
        chosen = [s for s in samples if row in ("overall", s.profile)]
        rows[row] = {}
        for method in METHODS:
            cells: dict[str, float | None] = {}
            for checkpoint in CHECKPOINTS:
                cells[str(checkpoint)] = _median_pct(
                    [s.errors[method] for s in chosen if s.checkpoint == checkpoint]
                )
            cells["all"] = _median_pct([s.errors[method] for s in chosen])
            rows[row][method] = cells
    return rows


def format_table(
    rows: dict[str, dict[str, dict[str, float | None]]], *, title: str = ""
) -> Iterator[str]:
    first = next(iter(rows.values()))
    columns = [f"{c}%" if c.isdigit() else c for c in next(iter(first.values()))]
    yield f"MdAPE of the ETA (%) at each fraction done{title}"
    yield f"{'profile':<14} {'method':<10} " + " ".join(f"{c:>6}" for c in columns)
    for row, methods in rows.items():
        for i, (method, cells) in enumerate(methods.items()):
            values = " ".join(f"{v:6.1f}" if v is not None else f"{'-':>6}" for v in cells.values())
            yield f"{row if i == 0 else '':<14} {method:<10} {values}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few, short runs (seconds)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--seeds", type=int, help="seeds per profile (default 3 quick, 100 full)")
    parser.add_argument("--seed-base", type=int, default=0, help="first seed")
    args = parser.parse_args(argv)
    seeds = args.seeds or (3 if args.quick else 100)
    started = time.perf_counter()
    samples: list[Sample] = []
    quiet_confidence: list[float] = []
    normal_confidence: list[float] = []
    for profile in PROFILES:
        for seed in range(args.seed_base, args.seed_base + seeds):
            result = replay(make_job(profile, seed, args.quick))
            samples += result.samples
            quiet_confidence += result.quiet_confidence
            normal_confidence += result.normal_confidence
    history_samples: list[Sample] = []
    for profile in HISTORY_PROFILES:
        for seed in range(args.seed_base, args.seed_base + seeds):
            history_samples += replay_with_history(profile, seed, args.quick).samples
    history_rows = summarize_history(history_samples)
    history_goals: dict[str, dict[str, Any]] = {}
    for profile, limit in HISTORY_GOALS.items():
        with_history = history_rows[profile]["headway"]["early"]
        without = history_rows[profile]["no-history"]["early"]
        ratio = with_history / without if with_history is not None and without else math.nan
        history_goals[profile] = {"ratio": ratio, "goal": limit, "met": ratio <= limit}
    rows = summarize(samples)
    correlation = spearman([s.confidence for s in samples], [s.errors["headway"] for s in samples])
    overall = {m: rows["overall"][m]["all"] for m in METHODS}
    baseline = min(v for m, v in overall.items() if m != "headway" and v is not None)
    server = overall["headway"]
    improvement = 1.0 - server / baseline if server is not None and baseline else math.nan
    error_goal = improvement >= GOAL_IMPROVEMENT
    # "Clearly negative": a rank correlation of -0.3 or below.
    correlation_goal = correlation <= -0.3
    elapsed = time.perf_counter() - started
    history_correlation = spearman(
        [s.confidence for s in history_samples], [s.errors["headway"] for s in history_samples]
    )

    mode = "quick" if args.quick else "full"
    print(
        f"ETA harness ({mode}): {len(PROFILES)} profiles x {seeds} seeds, {len(samples)} samples; "
        f"{len(HISTORY_PROFILES)} history profiles, {len(history_samples)} samples"
    )
    print()
    for line in format_table(rows):
        print(line)
    print()
    print(
        f"overall MdAPE: headway {server:.1f}%, better baseline {baseline:.1f}% "
        f"-> {100 * improvement:.0f}% lower (goal >= {100 * GOAL_IMPROVEMENT:.0f}%): "
        f"{'met' if error_goal else 'NOT met'}"
    )
    print(
        f"Spearman(confidence, error) for headway: {correlation:+.2f} "
        f"(goal <= -0.30): {'met' if correlation_goal else 'NOT met'}"
    )
    if quiet_confidence and normal_confidence:
        print(
            f"median confidence: {statistics.median(normal_confidence):.2f} after reports, "
            f"{statistics.median(quiet_confidence):.2f} while stalled"
        )
    print()
    for line in format_table(history_rows, title=" (history profiles; early = 10-50 %)"):
        print(line)
    print()
    for profile, goal in history_goals.items():
        print(
            f"{profile}: MdAPE at 10-50 % done with history / without = {goal['ratio']:.2f} "
            f"(goal <= {goal['goal']:g}): {'met' if goal['met'] else 'NOT met'}"
        )
    history_met = all(goal["met"] for goal in history_goals.values())
    met = error_goal and correlation_goal and history_met
    print(f"goal: {'met' if met else 'NOT met'} ({elapsed:.1f}s)")

    output: dict[str, Any] = {
        "mode": mode,
        "seeds": seeds,
        "seed_base": args.seed_base,
        "samples": len(samples),
        "checkpoints": list(CHECKPOINTS),
        "methods": list(METHODS),
        "mdape_percent": rows,
        "spearman_confidence_error": correlation,
        "overall_improvement": improvement,
        "goal": {
            "error_met": error_goal,
            "correlation_met": correlation_goal,
            "history_met": history_met,
            "met": met,
        },
        "history": {
            "mdape_percent": history_rows,
            "goals": history_goals,
            "spearman_confidence_error": history_correlation,
        },
        "median_confidence": {
            "reporting": statistics.median(normal_confidence) if normal_confidence else None,
            "stalled": statistics.median(quiet_confidence) if quiet_confidence else None,
        },
        "seconds": elapsed,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(output, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
