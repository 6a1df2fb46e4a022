"""`headway`: serve, watch, list, get, and report progress from shell scripts.

Every command takes --target (or HEADWAY_TARGET). A user's mistake (server
unreachable, unknown id, invalid argument) is one line on stderr and a non-zero
exit, never a traceback. `pipe` is the exception: it sits in someone's data
pipeline, so it always passes its input through and exits 0, reporting when it
can and warning on stderr when it cannot.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from google.protobuf import json_format
from headway.v1 import progress_pb2 as pb
from rich.console import Console
from rich.table import Table

from headway_client import _common
from headway_client._display import LiveView, PlainView, counts, describe, state_name
from headway_client._errors import (
    HeadwayError,
    InvalidArgument,
    OperationNotFound,
    Unavailable,
)
from headway_client._retry import RetryPolicy
from headway_client._sync import HeadwayClient

# Exit statuses of `headway watch`.
EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 2
EXIT_DELETED = 3
EXIT_USAGE = 64  # a call the server rejected as invalid, or a bad flag value
EXIT_UNAVAILABLE = 69
EXIT_NOT_FOUND = 66
EXIT_INTERRUPTED = 130

_EXIT_BY_STATE = {
    pb.Operation.SUCCEEDED: EXIT_SUCCEEDED,
    pb.Operation.FAILED: EXIT_FAILED,
    pb.Operation.CANCELLED: EXIT_CANCELLED,
}


def _as_json(op: pb.Operation) -> dict[str, Any]:
    return json_format.MessageToDict(op, preserving_proto_field_name=True)


def _key_values(
    pairs: Sequence[str], flag: str, *, integers: bool = False, numbers: bool = False
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidArgument(f"{flag} takes key=value, got {pair!r}")
        try:
            result[key] = int(value) if integers else float(value) if numbers else value
        except ValueError:
            kind = "a whole number" if integers else "a number"
            raise InvalidArgument(f"{flag} {key}: {value!r} is not {kind}") from None
    return result


def _client(args: argparse.Namespace) -> HeadwayClient:
    # A person at a terminal wants to hear quickly that the server is down.
    return HeadwayClient(
        args.target,
        timeout=args.timeout,
        retry=RetryPolicy(attempts=2, initial_backoff=0.2),
        token=args.token or None,
        tls_ca=args.tls_ca or None,
        tls_cert=args.tls_cert or None,
        tls_key=args.tls_key or None,
    )


# Commands


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        op = client.get(args.operation_id)
    if args.json:
        print(json.dumps(_as_json(op), indent=2))
    else:
        print(describe(op))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        operations = client.list(project=args.project, kind=args.kind, active_only=args.active)
    if args.json:
        print(json.dumps([_as_json(op) for op in operations], indent=2))
        return 0
    table = Table(box=None, header_style="bold")
    for column in ("ID", "KIND", "PROJECT", "STATE", "PERCENT", "PROGRESS", "STAGE", "MESSAGE"):
        table.add_column(column)
    for op in operations:
        table.add_row(
            op.id,
            op.kind,
            op.project,
            state_name(op),
            f"{op.percent:.1f}%",
            counts(op),
            op.stage,
            op.message[:50],
        )
    console = Console()
    if not console.is_terminal:
        # Scripts reading the table want whole ids, not ones cut to 80 columns.
        console = Console(width=250)
    console.print(table)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    stages: list[_common.StageArg] = []
    for spec in args.stage:
        name, _, weight = spec.partition(":")
        stages.append((name, float(weight)) if weight else name)
    with _client(args) as client:
        op = client.start_operation(
            kind=args.kind,
            project=args.project,
            dataset=args.dataset,
            labels=_key_values(args.label, "--label"),
            total=args.total,
            unit=args.unit,
            stages=stages,
            heartbeat_timeout=args.heartbeat_timeout,
            parent_id=args.parent,
            operation_id=args.id,
            request_id=args.request_id,
        )
    print(op.id)
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    request = pb.UpdateOperationRequest(operation_id=args.operation_id, sequence=args.sequence)
    for name in ("stage", "stage_completed", "stage_total", "completed", "total", "percent"):
        value = getattr(args, name)
        if value is not None:
            setattr(request, name, value)
    for name in ("message", "checkpoint"):
        if getattr(args, name) is not None:
            setattr(request, name, getattr(args, name))
    if args.paused is not None:
        request.paused = args.paused
    request.counters.update(_key_values(args.counter, "--counter", integers=True))
    request.measures.update(_key_values(args.measure, "--measure", numbers=True))
    with _client(args) as client:
        response = client.report(request)
    print(json.dumps(json_format.MessageToDict(response, preserving_proto_field_name=True)))
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    result = json.loads(args.result) if args.result else None
    with _client(args) as client:
        op = client.complete(args.operation_id, result=result, message=args.message)
    print(describe(op))
    return 0


def cmd_fail(args: argparse.Namespace) -> int:
    error = pb.OperationError(code=args.code, message=args.message, recoverable=args.recoverable)
    with _client(args) as client:
        op = client.fail(args.operation_id, error)
    print(describe(op))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        op = client.cancel(args.operation_id, args.reason)
    print(describe(op))
    return 0


def cmd_pipe(args: argparse.Namespace) -> int:
    """Like pv: passes stdin to stdout unchanged (bytes, as they come) and reports one
    unit per line. Best effort: the data never waits on, or fails with, the tracker."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING, stream=sys.stderr)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    # read1: what is there now (up to 64 KiB), so a slow producer's lines pass at once.
    read = getattr(source, "read1", source.read)
    client = HeadwayClient(
        args.target,
        timeout=args.timeout,
        retry=RetryPolicy(initial_backoff=0.2, max_backoff=5.0),
        finish_timeout=args.finish_timeout,
        token=args.token or None,
        tls_ca=args.tls_ca or None,
        tls_cert=args.tls_cert or None,
        tls_key=args.tls_key or None,
    )
    try:
        with client.start(
            kind=args.kind, project=args.project, total=args.total, unit=args.unit
        ) as op:
            print(f"headway: reporting to operation {op.id}", file=sys.stderr)
            ends_line = True
            while chunk := read(1 << 16):
                sink.write(chunk)
                sink.flush()
                ends_line = chunk.endswith(b"\n")
                if lines := chunk.count(b"\n"):
                    op.advance(lines)
            if not ends_line:
                op.advance(1)  # a last line without its newline
    finally:
        client.close()
    return 0


def _watch_events(client: HeadwayClient, args: argparse.Namespace) -> Iterator[pb.OperationEvent]:
    if args.operation_id:
        return client.watch(args.operation_id)
    return client.watch_operations(project=args.project, kind=args.kind, active_only=args.active)


def cmd_watch(args: argparse.Namespace) -> int:
    if not args.operation_id and args.project is None:
        raise InvalidArgument("watch takes an operation id or --project")
    console = Console(stderr=False)
    interactive = console.is_terminal and not args.plain
    view: LiveView | PlainView = LiveView(console) if interactive else PlainView(sys.stdout)
    seen: dict[str, pb.Operation] = {}
    synced = bool(args.operation_id)
    with _client(args) as client, view:
        # A watch has no deadline; per-call timeouts apply to unary calls only.
        for event in _watch_events(client, args):
            if event.type == pb.OperationEvent.RESET:
                for operation_id in list(seen):
                    view.remove(operation_id)
                seen.clear()
            elif event.type == pb.OperationEvent.SYNCED:
                synced = True
            elif event.type == pb.OperationEvent.DELETED:
                seen.pop(event.operation.id, None)
                view.remove(event.operation.id)
                if args.operation_id:
                    return EXIT_DELETED
            elif event.operation.id:
                seen[event.operation.id] = event.operation
                view.show(event.operation)
            if (
                synced
                and not args.follow
                and seen
                and all(op.state in _common.TERMINAL_STATES for op in seen.values())
            ):
                return max(_EXIT_BY_STATE[op.state] for op in seen.values())
    # The single-operation stream ended without a terminal state (it was deleted).
    return EXIT_DELETED


def cmd_token_new(args: argparse.Namespace) -> int:
    from headway_server import auth  # the server's own format, not a copy of it

    token = auth.new_token()
    print(f"token (give it to {args.name}; it is not stored anywhere): {token}")
    print("\nadd to the --auth-tokens file, then `kill -HUP` the server:\n")
    print(auth.token_block(args.name, token, args.project, args.role), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headway", description="Headway: progress tracking for long-running operations."
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("HEADWAY_TARGET", _common.DEFAULT_TARGET),
        help="server address (env HEADWAY_TARGET; default %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call timeout, seconds")
    parser.add_argument(
        "--token",
        default=os.environ.get("HEADWAY_TOKEN", ""),
        help="bearer token for a server with --auth-tokens (env HEADWAY_TOKEN)",
    )
    for flag, what in (
        ("ca", "CA certificate (PEM) that signed the server's: use TLS"),
        ("cert", "this client's certificate (PEM), for mTLS"),
        ("key", "this client's private key (PEM), for mTLS"),
    ):
        env = f"HEADWAY_TLS_{flag.upper()}"
        parser.add_argument(
            f"--tls-{flag}", default=os.environ.get(env, ""), help=f"{what} (env {env})"
        )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Listed for --help; main() hands `headway serve ...` to the server's own parser.
    commands.add_parser("serve", help="run the server (see `headway serve --help`)")

    watch = commands.add_parser("watch", help="live progress of an operation or a project")
    watch.add_argument("operation_id", nargs="?", default="")
    watch.add_argument("--project", help="watch every operation of this project ('' = all)")
    watch.add_argument("--kind", default="")
    watch.add_argument("--active", action="store_true", help="only queued/running/paused")
    watch.add_argument("--follow", action="store_true", help="keep watching after all end")
    watch.add_argument("--plain", action="store_true", help="line output even on a terminal")
    watch.set_defaults(func=cmd_watch)

    listing = commands.add_parser("list", help="a table of operations")
    listing.add_argument("--project", default="")
    listing.add_argument("--kind", default="")
    listing.add_argument("--active", action="store_true")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)

    get = commands.add_parser("get", help="one operation")
    get.add_argument("operation_id")
    get.add_argument("--json", action="store_true")
    get.set_defaults(func=cmd_get)

    start = commands.add_parser("start", help="start an operation and print its id")
    start.add_argument("--kind", default="")
    start.add_argument("--project", default="")
    start.add_argument("--dataset", default="")
    start.add_argument("--total", type=int, default=0)
    start.add_argument("--unit", default="")
    start.add_argument("--stage", action="append", default=[], help="NAME or NAME:WEIGHT")
    start.add_argument("--label", action="append", default=[], help="KEY=VALUE")
    start.add_argument("--heartbeat-timeout", type=float, default=None, help="seconds")
    start.add_argument("--parent", default="")
    start.add_argument("--id", default="", help="operation id (default: server-generated)")
    start.add_argument("--request-id", default="")
    start.set_defaults(func=cmd_start)

    update = commands.add_parser("update", help="report progress")
    update.add_argument("operation_id")
    update.add_argument("--sequence", type=int, default=0)
    update.add_argument("--completed", type=int)
    update.add_argument("--total", type=int)
    update.add_argument("--stage")
    update.add_argument("--stage-completed", type=int)
    update.add_argument("--stage-total", type=int)
    update.add_argument("--percent", type=float)
    update.add_argument("--message")
    update.add_argument("--checkpoint")
    update.add_argument("--counter", action="append", default=[], help="NAME=DELTA")
    update.add_argument("--measure", action="append", default=[], help="NAME=VALUE (absolute)")
    pause = update.add_mutually_exclusive_group()
    pause.add_argument("--pause", dest="paused", action="store_const", const=True)
    pause.add_argument("--resume", dest="paused", action="store_const", const=False)
    update.set_defaults(func=cmd_update, paused=None)

    complete = commands.add_parser("complete", help="end an operation as SUCCEEDED")
    complete.add_argument("operation_id")
    complete.add_argument("--message", default="")
    complete.add_argument("--result", default="", help="a JSON object")
    complete.set_defaults(func=cmd_complete)

    fail = commands.add_parser("fail", help="end an operation as FAILED")
    fail.add_argument("operation_id")
    fail.add_argument("--code", default="ERROR")
    fail.add_argument("--message", default="")
    fail.add_argument("--recoverable", action="store_true")
    fail.set_defaults(func=cmd_fail)

    cancel = commands.add_parser("cancel", help="ask an operation's producer to stop")
    cancel.add_argument("operation_id")
    cancel.add_argument("--reason", default="")
    cancel.set_defaults(func=cmd_cancel)

    pipe = commands.add_parser("pipe", help="pass stdin to stdout, one unit per line (like pv)")
    pipe.add_argument("--total", type=int, default=0)
    pipe.add_argument("--project", default="")
    pipe.add_argument("--kind", default="pipe")
    pipe.add_argument("--unit", default="lines")
    pipe.add_argument(
        "--finish-timeout",
        type=float,
        default=3.0,
        help="seconds to wait at the end for the server to take the last report (default 3)",
    )
    pipe.set_defaults(func=cmd_pipe)

    token = commands.add_parser("token", help="make credentials for --auth-tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    new = token_commands.add_parser(
        "new", help="print a fresh token and the [[token]] entry to paste into the file"
    )
    new.add_argument("--name", required=True, help="who uses it (shown in logs)")
    new.add_argument(
        "--project", action="append", required=True, help="a project it may use; '*' = all"
    )
    new.add_argument(
        "--role",
        action="append",
        required=True,
        choices=["report", "read", "admin"],
        help="report, read or admin (repeat for several)",
    )
    new.set_defaults(func=cmd_token_new)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # The server has its own flags; argparse.REMAINDER would not take them
        # when the first one starts with "--".
        from headway_server.__main__ import main as serve_main

        return serve_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except Unavailable as exc:
        if "store" in (exc.details or ""):
            # The server answered: it is its store (Redis) that is down.
            print(f"headway: server at {args.target}: {exc.details}", file=sys.stderr)
        else:
            print(
                f"headway: cannot reach a Headway server at {args.target} "
                "(is `headway serve` running? set --target or HEADWAY_TARGET)",
                file=sys.stderr,
            )
        return EXIT_UNAVAILABLE
    except OperationNotFound as exc:
        print(f"headway: not found: {exc.details}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except InvalidArgument as exc:
        print(f"headway: invalid argument: {exc.details}", file=sys.stderr)
        return EXIT_USAGE
    except HeadwayError as exc:
        print(f"headway: {exc.code.name.lower()}: {exc.details}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as exc:
        print(f"headway: --result is not JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
