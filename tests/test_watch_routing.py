"""Watchers of different filters side by side under one producer: each gets exactly what
its filter matches (the hub routes changes by operation, project and parent)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from headway.v1 import progress_pb2 as pb

if TYPE_CHECKING:  # mypy knows the helpers as tests.watch_checks, pytest as watch_checks
    from tests import watch_checks as wc
else:
    import watch_checks as wc


def test_each_watcher_gets_exactly_what_its_filter_matches(grpc_stub: Any, record: Any) -> None:
    team = wc.unique("team")
    here, there = wc.unique("p"), wc.unique("q")

    def start(project: str, **fields: Any) -> str:
        op = grpc_stub.StartOperation(
            pb.StartOperationRequest(kind="crawl", project=project, total=100, **fields),
            timeout=5,
        )
        return str(op.id)

    parent = start(here)
    children = [start(here, parent_id=parent) for _ in range(2)]
    labelled_elsewhere = start(there, labels={"team": team})
    labelled_here = start(here, labels={"team": team})
    unrelated = [start(there) for _ in range(3)]
    everything = [parent, *children, labelled_elsewhere, labelled_here, *unrelated]

    def watch_many(**filter_fields: Any) -> Any:
        request = pb.WatchOperationsRequest(filter=pb.OperationFilter(**filter_fields))
        return record(grpc_stub.WatchOperations(request, timeout=30))

    watchers = {
        "project": (watch_many(project=here), {parent, *children, labelled_here}),
        "children": (watch_many(parent_id=parent), set(children)),
        "labels only": (watch_many(labels={"team": team}), {labelled_elsewhere, labelled_here}),
        "operation": (
            record(
                grpc_stub.WatchOperation(
                    pb.WatchOperationRequest(operation_id=children[0]), timeout=30
                )
            ),
            {children[0]},
        ),
    }
    events: dict[str, list[wc.Event]] = {}
    for name, (recorder, _) in watchers.items():
        first = wc.SNAPSHOT if name == "operation" else wc.SYNCED
        events[name] = wc.read_until(recorder, wc.is_type(first))

    # One producer reports into every operation, interleaved, then ends them all.
    for step in range(1, 11):
        for operation_id in everything:
            grpc_stub.UpdateOperation(
                pb.UpdateOperationRequest(
                    operation_id=operation_id, sequence=step, completed=step * 10
                ),
                timeout=5,
            )
    for operation_id in everything:
        grpc_stub.CompleteOperation(
            pb.CompleteOperationRequest(operation_id=operation_id), timeout=5
        )

    for name, (recorder, expected) in watchers.items():
        for operation_id in sorted(expected):
            if not any(
                e.operation.id == operation_id and e.operation.state in wc.TERMINAL_STATES
                for e in events[name]
            ):
                wc.read_until(recorder, wc.is_terminal(operation_id), into=events[name])
        wc.check_revisions(events[name])
        latest = wc.latest_states(events[name])
        assert set(latest) == expected, name
        wc.assert_matches_store(grpc_stub, latest, name)
