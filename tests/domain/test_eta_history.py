"""ETA from earlier runs of the same kind (issue 14): domain.eta with a StageHistory."""

from __future__ import annotations

from headway_server.domain import eta, lifecycle
from headway_server.domain.model import Operation, StageSpec, StartSpec, State, Update

# Equal weights, but the last stage really takes three times as long.
SECONDS = {"a": 10.0, "b": 10.0, "c": 30.0}


def run(until: float | None = None, scale: float = 1.0) -> tuple[Operation, eta.EtaState]:
    """An operation through stages a, b, c (10 units each), reported every second,
    up to `until` seconds; each stage takes SECONDS x scale."""
    spec = StartSpec(kind="k", stages=tuple(StageSpec(n, 1.0) for n in SECONDS))
    op = lifecycle.new_operation("op", lifecycle.validate_start(spec, "op", ""), 0.0)
    state = eta.EtaState()
    t, sequence = 0.0, 0
    for name, seconds in SECONDS.items():
        seconds *= scale
        for i in range(int(seconds) + 1):
            if until is not None and t + i > until:
                return op, state
            sequence += 1
            done = min(10, round(10 * i / seconds))
            update = Update(sequence=sequence, stage=name, stage_completed=done, stage_total=10)
            op = lifecycle.apply_update(op, update, t + i)
            state = eta.observe(state, op, t + i)
        t += seconds
    op = lifecycle.finish(op, State.SUCCEEDED, t, call="CompleteOperation", request_id="")
    return op, state


def history(runs: int = 3, scale: float = 1.0) -> eta.StageHistory:
    ratios = [eta.run_ratios(run(scale=scale)[0]) for _ in range(runs)]
    found = eta.build_history([r for r in ratios if r is not None])
    assert found is not None
    return found


def test_finished_runs_give_each_stages_share_of_time_relative_to_its_weight() -> None:
    learned = history()
    assert learned.runs == 3
    # Shares of time 0.2 / 0.2 / 0.6 against weights 1/3 each.
    assert abs(learned.ratios["c"] - 0.588) < 0.05
    assert learned.ratios["a"] < 0 and learned.spread < 0.1


def test_history_costs_the_heavy_stage_before_it_starts() -> None:
    op, state = run(until=15)  # halfway through b: 15 s of 50
    plain = eta.estimate(state, op, 15.0)
    learned = eta.estimate(state, op, 15.0, history())
    assert plain.eta is not None and learned.eta is not None
    truth = 35.0
    assert abs(learned.eta - truth) / truth < 0.15
    assert abs(plain.eta - truth) / truth > 0.3  # today's estimator takes c for 1/3
    assert learned.confidence > plain.confidence  # consistent history: more confident


def test_history_from_a_slower_machine_still_gives_the_shares() -> None:
    op, state = run(until=15)
    learned = eta.estimate(state, op, 15.0, history(scale=2.0))
    assert learned.eta is not None and abs(learned.eta - 35.0) / 35.0 < 0.15


def test_no_history_is_todays_estimate() -> None:
    op, state = run(until=15)
    assert eta.estimate(state, op, 15.0, None) == eta.estimate(state, op, 15.0)


def test_erratic_history_lowers_confidence() -> None:
    op, state = run(until=15)
    steady = eta.estimate(state, op, 15.0, history())
    erratic = eta.StageHistory({"a": -0.5, "b": -0.5, "c": 0.6}, spread=1.5, runs=5)
    shaky = eta.estimate(state, op, 15.0, erratic)
    assert shaky.confidence < steady.confidence
