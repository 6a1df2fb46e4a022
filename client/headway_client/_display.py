"""Terminal rendering of operations: live rich progress bars, or plain lines when piped."""

from __future__ import annotations

import time
from typing import IO, Any

from headway.v1 import progress_pb2 as pb
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.text import Text

STATE_STYLE = {
    pb.Operation.QUEUED: "dim",
    pb.Operation.RUNNING: "cyan",
    pb.Operation.PAUSED: "yellow",
    pb.Operation.SUCCEEDED: "green",
    pb.Operation.FAILED: "red",
    pb.Operation.CANCELLED: "magenta",
}


def state_name(op: pb.Operation) -> str:
    name = pb.Operation.State.Name(op.state)
    return f"{name} (stalled)" if op.stalled else name


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Rates:
    """Throughput and ETA: the server's estimate, else what this watcher has seen."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[float, int, float]] = {}

    def measure(self, op: pb.Operation, now: float) -> tuple[float | None, float | None]:
        """(units per second, seconds remaining) or None where it cannot be known yet."""
        first = self._first.setdefault(op.id, (now, op.completed, op.percent))
        if op.HasField("estimated_completion_time") and op.state == pb.Operation.RUNNING:
            # Count down from the server's estimate between reports.
            end = op.estimated_completion_time.ToNanoseconds() / 1e9
            units = op.throughput if op.throughput_unit != "%" and op.throughput else None
            return units, max(0.0, end - now)
        elapsed = now - first[0]
        if elapsed < 0.5 or op.state != pb.Operation.RUNNING:
            return None, None
        units = (op.completed - first[1]) / elapsed
        percent_rate = (op.percent - first[2]) / elapsed
        eta = (100.0 - op.percent) / percent_rate if percent_rate > 0 else None
        return (units if units > 0 else None), eta


def counts(op: pb.Operation) -> str:
    unit = f" {op.unit}" if op.unit else ""
    if op.total:
        return f"{op.completed}/{op.total}{unit}"
    return f"{op.completed}{unit}" if op.completed else ""


def stage_text(op: pb.Operation) -> str:
    """The current stage with its own progress, e.g. "embed 180/240"."""
    for stage in op.stages:
        if stage.name == op.stage and stage.total:
            return f"{op.stage} {stage.completed}/{stage.total}"
    return op.stage


def measures_text(op: pb.Operation) -> str:
    """The operation's measures by name, e.g. "cost_usd=1.27 quality=0.93"."""
    return " ".join(f"{name}={op.measures[name]:.4g}" for name in sorted(op.measures))


def describe(op: pb.Operation) -> str:
    """A short one-line summary: id, state, percent, units, measures."""
    return f"{op.id} {state_name(op)} {op.percent:.1f}% {counts(op)} {measures_text(op)}".rstrip()


def elapsed(op: pb.Operation, now: float) -> float | None:
    if not op.HasField("started_at"):
        return None
    end = op.finished_at.ToNanoseconds() / 1e9 if op.HasField("finished_at") else now
    return end - op.started_at.ToNanoseconds() / 1e9


def line(op: pb.Operation, rates: Rates, now: float) -> str:
    """One plain-text line describing an operation, for logs and pipes."""
    throughput, eta = rates.measure(op, now)
    parts = [op.id, state_name(op), f"{op.percent:5.1f}%"]
    if op.stage:
        parts.append(f"stage={stage_text(op)}")
    if counts(op):
        parts.append(counts(op))
    if throughput is not None:
        parts.append(f"{throughput:.1f} {op.unit or 'units'}/s")
    if eta is not None:
        parts.append(f"eta {_duration(eta)}")
    parts.append(f"elapsed {_duration(elapsed(op, now))}")
    if op.measures:
        parts.append(measures_text(op))
    if op.message:
        parts.append(f"- {op.message}")
    if op.state == pb.Operation.FAILED and op.error.message:
        parts.append(f"error {op.error.code}: {op.error.message}")
    return " ".join(parts)


class _FieldColumn(ProgressColumn):
    def __init__(self, field: str, style: str = "") -> None:
        super().__init__()
        self.field = field
        self.style = style

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get(self.field, "")), style=self.style)


class LiveView:
    """One progress row per operation, redrawn as events arrive."""

    def __init__(self, console: Console) -> None:
        self.rates = Rates()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            TextColumn("{task.percentage:>5.1f}%"),
            _FieldColumn("state"),
            _FieldColumn("stage", "blue"),
            _FieldColumn("counts"),
            _FieldColumn("throughput"),
            _FieldColumn("eta"),
            _FieldColumn("elapsed", "dim"),
            _FieldColumn("measures", "green"),
            _FieldColumn("message", "italic"),
            console=console,
            auto_refresh=True,
            refresh_per_second=8,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> LiveView:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def show(self, op: pb.Operation) -> None:
        now = time.time()
        throughput, eta = self.rates.measure(op, now)
        fields: dict[str, Any] = {
            "state": Text(state_name(op), style=STATE_STYLE.get(op.state, "")),
            "stage": stage_text(op),
            "counts": counts(op),
            "throughput": f"{throughput:.1f} {op.unit or 'units'}/s" if throughput else "",
            "eta": f"eta {_duration(eta)}" if eta is not None else "",
            "elapsed": _duration(elapsed(op, now)),
            "measures": measures_text(op),
            "message": (op.error.message if op.state == pb.Operation.FAILED else op.message)[:60],
        }
        description = f"{op.id[:11]} {op.kind[:24]}"
        task = self._tasks.get(op.id)
        if task is None:
            task = self._tasks[op.id] = self.progress.add_task(description, total=100.0, **fields)
            self.progress.update(task, completed=op.percent)
        else:
            self.progress.update(task, completed=op.percent, **fields)

    def remove(self, operation_id: str) -> None:
        task = self._tasks.pop(operation_id, None)
        if task is not None:
            self.progress.remove_task(task)


class PlainView:
    """A line per change, for output that is not a terminal."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.rates = Rates()

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.out.flush()

    def show(self, op: pb.Operation) -> None:
        print(line(op, self.rates, time.time()), file=self.out, flush=True)

    def remove(self, operation_id: str) -> None:
        print(f"{operation_id} DELETED", file=self.out, flush=True)
