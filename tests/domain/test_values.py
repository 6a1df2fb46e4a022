"""domain.values: frozen values built and copied through their builders stay
ordinary frozen dataclass values."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from headway_server.domain.model import Estimate, Operation, StartSpec, State, Update, evolve


def test_built_values_are_frozen_values_of_their_own_class() -> None:
    op = Operation(id="a", spec=StartSpec(kind="k"))
    copied = evolve(op, state=State.RUNNING, completed=3)
    for value in (op, copied, Estimate(1.0, eta=2.0)):
        assert type(value) in (Operation, Estimate)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, dataclasses.fields(value)[0].name, None)
        assert pickle.loads(pickle.dumps(value)) == value
    assert (copied.state, copied.completed, copied.id) == (State.RUNNING, 3, "a")
    assert (op.state, op.completed) == (State.QUEUED, 0)
    assert copied == dataclasses.replace(op, state=State.RUNNING, completed=3)


def test_defaults_and_default_factories_are_the_dataclass_ones() -> None:
    first, second = Update(), Update(sequence=2)
    assert (first.sequence, first.stage, first.pause_reason) == (0, None, "")
    assert first.counters == {} and first.counters is not second.counters
    assert Operation(id="a", spec=StartSpec()).labels == {}
    with pytest.raises(TypeError):
        Operation(spec=StartSpec())  # type: ignore[call-arg]


def test_evolve_rejects_what_is_not_a_field() -> None:
    op = Operation(id="a", spec=StartSpec(kind="k"))
    for name in ("nope", "kind"):  # "kind" reads through to the spec
        with pytest.raises(TypeError, match=name):
            evolve(op, **{name: 1})
