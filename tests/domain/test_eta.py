"""The ETA estimator (domain.eta): pure functions of an EtaState, an Operation and a time."""

from __future__ import annotations

import dataclasses
import math
import pickle
import random
from typing import Any

import pytest
from headway_server.domain import eta, lifecycle
from headway_server.domain.model import Estimate, Operation, StageSpec, StartSpec, State, Update

T0 = 1000.0


def start(
    *,
    total: int = 0,
    stages: tuple[tuple[str, float], ...] = (),
    heartbeat_timeout: float = 0.0,
) -> Operation:
    spec = StartSpec(
        total=total,
        stages=tuple(StageSpec(name, weight) for name, weight in stages),
        heartbeat_timeout=heartbeat_timeout,
    )
    spec = lifecycle.validate_start(spec, "op-eta", "")
    return lifecycle.new_operation("op-eta", spec, T0)


class Tracked:
    """An operation fed report by report to the estimator, as the service does."""

    def __init__(self, op: Operation) -> None:
        self.op = op
        self.state = eta.EtaState()

    def report(self, at: float, **fields: Any) -> Estimate:
        self.op = lifecycle.apply_update(self.op, Update(**fields), T0 + at)
        self.state = eta.observe(self.state, self.op, T0 + at)
        return self.estimate(at)

    def estimate(self, at: float) -> Estimate:
        return eta.estimate(self.state, self.op, T0 + at)


def steady(total: int = 1000, rate: float = 2.0, interval: float = 1.0, until: float = 250.0):
    """A unit-counting operation done at `rate` units/s, reported every `interval` s."""
    run = Tracked(start(total=total))
    run.report(0.0, completed=0)
    at = 0.0
    found = run.estimate(0.0)
    while at + interval <= until + 1e-9:
        at += interval
        found = run.report(at, completed=min(total, int(rate * at)))
    return run, found, at


def relative_error(found: float | None, truth: float) -> float:
    assert found is not None
    return abs(found - truth) / truth


# --- the basics -------------------------------------------------------------------------


def test_constant_rate_converges_to_the_truth() -> None:
    # 1000 units at 2/s: done at t=500.
    errors = []
    for until in (50.0, 125.0, 250.0, 375.0, 450.0):
        _, found, at = steady(until=until)
        errors.append(relative_error(found.eta, 500.0 - at))
    assert errors[-3:] == sorted(errors[-3:], reverse=True) or max(errors[-3:]) < 0.01
    assert errors[0] < 0.1
    assert max(errors[1:]) < 0.03
    assert errors[-1] < 0.02


def test_confidence_grows_as_a_steady_run_goes_on() -> None:
    early = steady(until=25.0)[1].confidence
    middle = steady(until=250.0)[1].confidence
    late = steady(until=450.0)[1].confidence
    assert 0.0 <= early < middle < late <= 1.0
    assert late > 0.7


def test_throughput_is_in_units_per_second_when_units_are_counted() -> None:
    _, found, _ = steady(until=200.0)
    assert not found.per_percent
    assert found.throughput == pytest.approx(2.0, rel=0.05)


def test_throughput_is_in_percent_per_second_without_units() -> None:
    run = Tracked(start())
    run.report(0.0, percent=0.0)
    for at in range(1, 101):
        found = run.report(float(at), percent=0.5 * at)
    assert found.per_percent
    assert found.throughput == pytest.approx(0.5, rel=0.05)
    assert relative_error(found.eta, 100.0) < 0.03


def test_no_progress_means_no_eta() -> None:
    run = Tracked(start(total=100))
    assert run.estimate(0.0).eta is None  # nothing observed yet
    found = run.report(0.0, completed=0)
    assert found.eta is None
    for at in range(1, 30):
        found = run.report(float(at), completed=0, message="warming up")
    assert found.eta is None
    assert found.confidence == 0.0
    assert run.report(30.0, completed=1).eta is not None


def test_progress_reported_at_the_first_report_is_a_starting_point_not_speed() -> None:
    # A job resumed from a checkpoint at 40 %: that 40 % took no time here.
    run = Tracked(start(total=1000))
    assert run.report(0.0, completed=400).eta is None
    for at in range(1, 101):
        found = run.report(float(at), completed=400 + 2 * at)
    # 400 units left at 2/s.
    assert relative_error(found.eta, 200.0) < 0.03


@pytest.mark.parametrize("end", [State.SUCCEEDED, State.FAILED, State.CANCELLED])
def test_terminal_operation_has_eta_zero_and_full_confidence(end: State) -> None:
    run, _, at = steady(until=100.0)
    run.op = lifecycle.finish(run.op, end, T0 + at + 1, call="Finish", request_id="")
    found = run.estimate(at + 1)
    assert found.eta == 0.0
    assert found.confidence == 1.0
    assert found.throughput == pytest.approx(2.0, rel=0.05)


def test_default_state_is_empty_and_estimates_nothing() -> None:
    op = start(total=10)
    found = eta.estimate(eta.EtaState(), op, T0)
    assert found == Estimate(throughput=0.0, per_percent=False, eta=None, confidence=0.0, at=T0)


# --- time-decayed rate ------------------------------------------------------------------


def test_rate_does_not_depend_on_report_frequency() -> None:
    # The same job reported every 0.25 s and every 5 s gives the same answer.
    _, often, _ = steady(interval=0.25, until=300.0)
    _, rarely, _ = steady(interval=5.0, until=300.0)
    assert often.eta is not None and rarely.eta is not None
    assert often.eta == pytest.approx(rarely.eta, rel=0.03)
    assert often.throughput == pytest.approx(rarely.throughput, rel=0.03)


def test_a_slowdown_is_followed_sooner_than_the_whole_run_average() -> None:
    # 4 units/s for 100 s, then 1 unit/s: 1000 units done at t = 100 + 600.
    run = Tracked(start(total=1000))
    run.report(0.0, completed=0)
    for at in range(1, 301):
        done = 4 * at if at <= 100 else 400 + (at - 100)
        found = run.report(float(at), completed=done)
    truth = 700.0 - 300.0
    naive = 300.0 * (1000 - 600) / 600
    assert relative_error(found.eta, truth) < 0.5 * abs(naive - truth) / truth
    assert found.throughput == pytest.approx(1.0, rel=0.25)


def test_erratic_rates_lower_confidence() -> None:
    _, smooth, _ = steady(until=300.0)
    run = Tracked(start(total=1000))
    run.report(0.0, completed=0)
    rng = random.Random(4)
    done = 0
    for at in range(1, 301):
        # Bursts: nothing for a while, then a lot (2 units/s on average).
        if rng.random() < 0.2:
            done = min(1000, done + rng.randint(4, 16))
        found = run.report(float(at), completed=done)
    assert found.eta is not None
    assert found.confidence < smooth.confidence


# --- paused and stalled -----------------------------------------------------------------


def test_paused_lowers_confidence_and_its_time_does_not_count() -> None:
    run, before, at = steady(until=200.0)
    paused = run.report(at + 1, completed=int(2 * (at + 1)), paused=True)
    assert run.op.state is State.PAUSED
    assert paused.confidence < before.confidence
    assert paused.throughput == 0.0
    # The clock stops: an hour later the ETA has not moved, confidence is low.
    later = run.estimate(at + 3600)
    assert later.eta == pytest.approx(paused.eta)
    assert later.confidence < before.confidence
    # Resumed an hour later at the same speed: the pause is not taken for slowness.
    resume_at = at + 3600
    run.report(resume_at, completed=int(2 * (at + 1)), paused=False)
    for step in range(1, 51):
        found = run.report(resume_at + step, completed=int(2 * (at + 1 + step)))
    done = 2 * (at + 1 + 50)
    assert relative_error(found.eta, (1000 - done) / 2) < 0.05


def test_stalled_lowers_confidence_and_keeps_falling() -> None:
    run = Tracked(start(total=1000, heartbeat_timeout=30.0))
    run.report(0.0, completed=0)
    for at in range(1, 201):
        before = run.report(float(at), completed=2 * at)
    assert run.estimate(215.0).confidence < before.confidence  # silent for a while
    stalled = lifecycle.mark_stalled(run.op, T0 + 235.0)
    assert stalled is not None
    run.op = stalled
    during = run.estimate(235.0)
    much_later = run.estimate(1200.0)
    assert during.confidence < 0.5 * before.confidence
    assert much_later.confidence < during.confidence
    # No work is assumed done while stalled: the ETA does not count down to zero.
    assert much_later.eta is not None and much_later.eta > 0.5 * (before.eta or 0.0)
    assert much_later.throughput < 0.1 * before.throughput


def test_a_stall_is_not_taken_for_the_jobs_speed() -> None:
    run = Tracked(start(total=1000, heartbeat_timeout=30.0))
    run.report(0.0, completed=0)
    for at in range(1, 201):
        run.report(float(at), completed=2 * at)
    # A ten-minute outage, then the same speed again.
    resumed = 200.0 + 600.0
    for step in range(1, 61):
        found = run.report(resumed + step, completed=400 + 2 * step)
    truth = (1000 - 520) / 2
    naive = (resumed + 60) * (1000 - 520) / 520
    assert relative_error(found.eta, truth) < 0.15
    assert relative_error(naive, truth) > 0.5


# --- stages -------------------------------------------------------------------------------


def staged_run(
    stages: list[tuple[str, float, float]], until_stage: int, until_share: float
) -> tuple[Tracked, float]:
    """Runs a plan of (name, weight, seconds) stages of 100 units each up to
    `until_share` of stage `until_stage`; returns the run and the time."""
    run = Tracked(start(stages=tuple((name, weight) for name, weight, _ in stages)))
    at = 0.0
    for index, (name, _, seconds) in enumerate(stages):
        run.report(at, stage=name, stage_completed=0, stage_total=100)
        end = until_share if index == until_stage else 1.0
        for step in range(1, int(100 * end) + 1):
            run.report(at + seconds * step / 100, stage_completed=step)
        if index == until_stage:
            return run, at + seconds * end
        at += seconds
    raise AssertionError("until_stage is past the plan")


def test_multi_stage_does_not_extrapolate_the_current_stage_to_the_whole_job() -> None:
    # Slow, fast, slow: halfway through the fast stage the job is half done.
    stages = [("fetch", 1.0, 100.0), ("parse", 1.0, 10.0), ("index", 1.0, 100.0)]
    run, at = staged_run(stages, until_stage=1, until_share=0.5)
    assert run.op.percent == pytest.approx(50.0)
    truth = 5.0 + 100.0
    # Extrapolating the fast stage's pace to the rest: 0.5 of the job at 1/30 per second.
    current_stage_only = 0.5 * 30.0
    found = run.estimate(at)
    error = relative_error(found.eta, truth)
    assert error < 0.5
    assert error < 0.5 * relative_error(current_stage_only, truth)


def test_last_stage_uses_its_own_pace_not_the_runs() -> None:
    # Two quick stages, then a slow heavy one: the run's average is far too fast.
    stages = [("clone", 1.0, 10.0), ("scan", 1.0, 10.0), ("embed", 2.0, 200.0)]
    run, at = staged_run(stages, until_stage=2, until_share=0.5)
    truth = 100.0
    whole_run = at * (100 - run.op.percent) / run.op.percent
    found = run.estimate(at)
    assert relative_error(found.eta, truth) < 0.1
    assert relative_error(whole_run, truth) > 0.5


def test_a_stage_change_lowers_confidence() -> None:
    stages = [("a", 1.0, 100.0), ("b", 1.0, 100.0), ("c", 1.0, 100.0)]
    run, at = staged_run(stages, until_stage=1, until_share=0.9)
    before = run.estimate(at).confidence
    run.report(at + 10, stage="c", stage_completed=0, stage_total=100)
    assert run.estimate(at + 10).confidence < before


def test_stage_of_unknown_size_is_given_its_weights_share() -> None:
    run = Tracked(start(stages=(("a", 1.0), ("b", 1.0))))
    run.report(0.0, stage="a", stage_completed=0, stage_total=10)
    for step in range(1, 11):
        run.report(10.0 * step, stage_completed=step)
    found = run.report(100.0, stage="b")  # no stage_total: its progress is unknown
    assert found.eta is not None
    assert relative_error(found.eta, 100.0) < 0.25
    assert found.confidence < 0.5


# --- bounded memory -------------------------------------------------------------------------


def test_state_stays_bounded_after_ten_thousand_observations() -> None:
    stages = tuple((f"s{i}", float(1 + i % 3)) for i in range(10))
    run = Tracked(start(stages=stages, heartbeat_timeout=30.0))
    rng = random.Random(7)
    at = 0.0
    sizes = []
    for stage_index, (name, _) in enumerate(stages):
        run.report(at, stage=name, stage_completed=0, stage_total=1000)
        done = 0
        for _ in range(1000):
            at += rng.choice((0.1, 0.5, 1.0, 3.0, 45.0))
            done = min(1000, done + rng.randint(0, 2))
            paused = rng.random() < 0.01
            found = run.report(at, stage_completed=done, paused=paused)
            assert found.eta is None or (math.isfinite(found.eta) and found.eta >= 0)
            assert 0.0 <= found.confidence <= 1.0
            assert math.isfinite(found.throughput) and found.throughput >= 0
        sizes.append(len(pickle.dumps(run.state)))
        assert stage_index == run.state.stage_index
    assert run.state.observations == 10 * 1001
    for field in dataclasses.fields(eta.EtaState):
        value = getattr(run.state, field.name)
        assert value is None or isinstance(value, int | float), field.name
        if isinstance(value, float):
            assert math.isfinite(value), field.name
    # A fixed set of numbers: the state does not grow with the reports.
    assert max(sizes) - min(sizes) <= 16


def test_state_and_estimate_are_immutable_values() -> None:
    state = eta.EtaState()
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.active = 1.0  # type: ignore[misc]
    assert eta.EtaState() == state
    assert hash(Estimate()) == hash(Estimate())
