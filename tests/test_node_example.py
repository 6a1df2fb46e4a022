"""The Node.js example (examples/node) works against the real server.

README: "Producers (workers in any language) ... through the generated stubs of
protos/headway/v1/progress.proto" and "Orchestrators probe it with the standard
grpc.health.v1.Health service". A Node producer, a batched producer (BatchUpdateOperations)
and a watcher built with @grpc/grpc-js
and @grpc/proto-loader from the project's own protos must interoperate with it.

Needs `node` and `npm`; the module is skipped without them. Dependencies are installed
once per module with `npm ci` from the committed lock file. When the npm registry cannot
be reached the module is skipped, except in CI (env CI=true), where that is a failure.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

import grpc
import pytest
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
INSTALL_TIMEOUT = 180.0
LINE_TIMEOUT = 20.0  # one JSON line from a node process (includes node's start-up)
EXIT_TIMEOUT = 30.0  # a node process finishing after its last expected input
# npm's messages when the registry is unreachable (DNS, refused, reset, timeouts, proxy, 5xx).
NETWORK_ERROR = re.compile(
    r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH"
    r"|ESOCKETTIMEDOUT|ERR_SOCKET_TIMEOUT|network|proxy|\bE5\d\d\b",
    re.IGNORECASE,
)

State = pb.Operation.State
Stub = pb_grpc.ProgressTrackerStub

# Installing from the registry can take far longer than the suite's 60 s default, and the
# module fixture's set-up counts against the first test that uses it.
pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 120)


def uid(prefix: str = "node") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


# --- Installing the example -----------------------------------------------------------------


def _unavailable(message: str) -> NoReturn:
    """Skips, or fails in CI, when the npm registry cannot be used."""
    if IN_CI:
        pytest.fail(f"{message} (CI=true: the Node example must be tested in CI)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def node_example() -> Path:
    """examples/node with its dependencies installed exactly as package-lock.json pins them."""
    if NODE is None or NPM is None:
        missing = " and ".join(name for name, path in (("node", NODE), ("npm", NPM)) if not path)
        pytest.skip(f"node/npm not found: {missing} not on PATH; install Node.js 18.3+ with npm")
    has_lock = (EXAMPLE / "package-lock.json").is_file()
    # --ignore-scripts: no install script is needed (protobufjs's postinstall only concerns
    # its CLI); --prefer-offline: use npm's cache when it has the pinned tarballs.
    command = [NPM, "ci" if has_lock else "install", "--prefer-offline", "--ignore-scripts"]
    env = dict(os.environ, npm_config_audit="false", npm_config_fund="false")
    env["npm_config_update_notifier"] = "false"
    try:
        result = subprocess.run(
            [*command, "--no-audit", "--no-fund"],
            cwd=EXAMPLE,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"`npm {command[1]}` in {EXAMPLE} took over {INSTALL_TIMEOUT:.0f} s")
    if result.returncode != 0:
        output = f"{result.stdout}\n{result.stderr}".strip()
        tail = "\n".join(output.splitlines()[-15:])
        if NETWORK_ERROR.search(output):
            reasons = [line for line in output.splitlines() if NETWORK_ERROR.search(line)]
            _unavailable(
                f"npm registry unreachable (`npm {command[1]}` in {EXAMPLE} failed): "
                + " | ".join(reasons[:3])
            )
        pytest.fail(f"`npm {command[1]}` failed in {EXAMPLE}:\n{tail}")
    return EXAMPLE


# --- Running node ---------------------------------------------------------------------------


class NodeProcess:
    """A node script whose stdout JSON lines are read in a thread, each read bounded."""

    def __init__(
        self, cwd: Path, args: tuple[str, ...], stdin: bool, env: dict[str, str] | None = None
    ) -> None:
        assert NODE is not None
        self.args = args
        self.proc = subprocess.Popen(
            [NODE, *args],
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stderr,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def _collect(self, stream: IO[str]) -> None:
        self._stderr.extend(stream)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def _describe(self) -> str:
        return f"node {' '.join(self.args)} (exit {self.proc.poll()}), stderr:\n{self.stderr}"

    def line(self, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        """The next stdout line, parsed as one JSON object."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s from {self._describe()}") from None
        if line is None:
            self._lines.put(None)
            raise AssertionError(f"output ended early: {self._describe()}")
        record = json.loads(line)
        assert isinstance(record, dict), line
        return record

    def send_line(self, text: str = "") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{text}\n")
        self.proc.stdin.close()

    def finish(self, timeout: float = EXIT_TIMEOUT) -> tuple[int, list[dict[str, Any]]]:
        """Waits for the exit; returns the exit code and the stdout lines not read yet."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s: {self._describe()}") from None
        for thread in self._threads:
            thread.join(5)
        records = []
        while (line := self._lines.get(timeout=1)) is not None:
            records.append(json.loads(line))
        self._lines.put(None)
        return code, records

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for thread in self._threads:
            thread.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def node(node_example: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Starts `node ARGS...` in examples/node; every process is killed at teardown."""
    started: list[NodeProcess] = []

    def run(*args: str, stdin: bool = False, env: dict[str, str] | None = None) -> NodeProcess:
        process = NodeProcess(node_example, args, stdin, env)
        started.append(process)
        return process

    yield run
    for process in started:
        process.close()


# --- The example itself ---------------------------------------------------------------------


def test_example_uses_the_project_protos_and_ignores_node_modules() -> None:
    copies = [p for p in EXAMPLE.rglob("*.proto") if "node_modules" not in p.parts]
    assert copies == [], f"examples/node must load ../../protos, not copies: {copies}"
    package = json.loads((EXAMPLE / "package.json").read_text())
    assert package["private"] is True
    assert set(package["dependencies"]) == {"@grpc/grpc-js", "@grpc/proto-loader"}
    assert (EXAMPLE / "package-lock.json").is_file()
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "examples/node/node_modules/" in ignored


@pytest.mark.parametrize("service", ["", "headway.v1.ProgressTracker"])
def test_health_check_reports_serving(
    node: Callable[..., NodeProcess], grpc_addr: str, service: str
) -> None:
    args = ("watcher.js", grpc_addr, "--health", *([service] if service else []))
    process = node(*args)
    code, records = process.finish()
    assert code == 0, process.stderr
    assert records == [{"health": "SERVING", "service": service}]


def test_health_check_of_unknown_service_fails(
    node: Callable[..., NodeProcess], grpc_addr: str
) -> None:
    process = node("watcher.js", grpc_addr, "--health", "no.such.Service")
    code, records = process.finish()
    assert (code, records) == (1, [])
    assert json.loads(process.stderr)["code"] == "NOT_FOUND"


def test_watcher_follows_the_producer_to_success(
    node: Callable[..., NodeProcess], grpc_addr: str, grpc_stub: Stub
) -> None:
    op_id, project = uid(), "node-example"
    # The producer starts the operation, then waits for a line on stdin: the watcher is
    # attached (its SNAPSHOT read) before the first report, so it sees them live.
    producer = node(
        "producer.js",
        grpc_addr,
        project,
        "--id",
        op_id,
        "--wait",
        "--interval-ms",
        "50",
        stdin=True,
    )
    started = producer.line()
    assert started == {
        "step": "started",
        "id": op_id,
        "project": project,
        "state": "QUEUED",
        "revision": started["revision"],
    }
    watcher = node("watcher.js", grpc_addr, op_id)
    snapshot = watcher.line()
    assert snapshot == {
        "type": "SNAPSHOT",
        "revision": started["revision"],
        "state": "QUEUED",
        "percent": 0,
        "epoch": snapshot["epoch"],  # the first event of a stream tells the store's epoch
    }
    assert snapshot["epoch"]
    producer.send_line()

    producer_code, steps = producer.finish()
    assert producer_code == 0, producer.stderr
    watcher_code, later_events = watcher.finish()
    assert watcher_code == 0, watcher.stderr

    # The producer: four applied reports with increasing sequences and revisions, a retried
    # duplicate acknowledged without effect, then completion.
    assert [step["step"] for step in steps] == ["updated"] * 4 + ["retried", "completed"]
    updates, retried, completed = steps[:4], steps[4], steps[5]
    assert [u["sequence"] for u in updates] == [1, 2, 3, 4]
    assert [u["stage"] for u in updates] == ["fetch", "process", "process", "process"]
    assert [u["percent"] for u in updates] == [25, 50, 75, 100]  # weights fetch 1, process 3
    assert all(u["applied"] and u["state"] == "RUNNING" for u in updates)
    revisions = [started["revision"]] + [u["revision"] for u in updates] + [completed["revision"]]
    assert revisions == sorted(set(revisions)), f"revisions not strictly increasing: {revisions}"
    assert retried["applied"] is False
    assert retried["sequence"] == 4
    assert retried["revision"] == updates[-1]["revision"]
    assert completed["id"] == op_id
    assert completed["state"] == "SUCCEEDED"
    assert completed["percent"] == 100
    assert completed["counters"] == {"fetched": 3, "processed": 3}  # the retry added nothing

    # The watcher: SNAPSHOT then CHANGED events (BOOKMARKs may come in between), strictly
    # increasing revisions, each one a state the producer made, ending in SUCCEEDED at 100.
    events = [snapshot, *(e for e in later_events if e["type"] != "BOOKMARK")]
    assert [e["type"] for e in events] == ["SNAPSHOT"] + ["CHANGED"] * (len(events) - 1)
    seen = [e["revision"] for e in events]
    assert seen == sorted(set(seen)), f"watch revisions not strictly increasing: {seen}"
    assert set(seen) <= set(revisions), f"watch saw revisions {seen}, producer made {revisions}"
    percents = [e["percent"] for e in events]
    assert percents == sorted(percents)
    assert any(e["state"] == "RUNNING" for e in events), f"no live progress seen: {events}"
    assert events[-1] == {
        "type": "CHANGED",
        "revision": completed["revision"],
        "state": "SUCCEEDED",
        "percent": 100,
    }

    # The server, through the Python stubs, holds what the Node producer reported.
    stored = grpc_stub.GetOperation(pb.GetOperationRequest(operation_id=op_id), timeout=5)
    assert stored.state == State.SUCCEEDED
    assert stored.revision == completed["revision"]
    assert (stored.kind, stored.project, dict(stored.labels)) == (
        "node-demo",
        project,
        {"client": "node"},
    )
    assert dict(stored.counters) == {"fetched": 3, "processed": 3}
    assert stored.last_sequence == 4
    assert stored.percent == 100
    assert [(s.name, s.weight, s.state) for s in stored.stages] == [
        ("fetch", 1, pb.Stage.State.DONE),
        ("process", 3, pb.Stage.State.DONE),
    ]
    assert stored.checkpoint == "process-3"
    assert stored.heartbeat_timeout.seconds == 30
    assert stored.result.fields["processed"].number_value == 3


def test_watcher_resumes_with_from_revision_and_from_epoch(
    node: Callable[..., NodeProcess], grpc_addr: str, grpc_stub: Stub
) -> None:
    op_id = uid()
    started = grpc_stub.StartOperation(
        pb.StartOperationRequest(operation_id=op_id, kind="k", project="node-epoch"), timeout=5
    )
    first = node("watcher.js", grpc_addr, op_id)
    snapshot = first.line()
    epoch = snapshot["epoch"]
    update = pb.UpdateOperationRequest(operation_id=op_id, sequence=1, completed=1)
    changed = grpc_stub.UpdateOperation(update, timeout=5)
    grpc_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=op_id), timeout=5)
    code, _ = first.finish()
    assert code == 0, first.stderr

    # In the server's epoch: the changes after the revision, nothing again.
    resumed = node(
        "watcher.js", grpc_addr, op_id, "--from-revision", str(started.revision),
        "--from-epoch", epoch,
    )  # fmt: skip
    code, records = resumed.finish()
    assert code == 0, resumed.stderr
    assert [(r["type"], r.get("epoch")) for r in records if r["type"] != "BOOKMARK"] == [
        ("CHANGED", epoch)
    ]
    assert records[-1]["state"] == "SUCCEEDED"
    assert records[-1]["revision"] > changed.revision

    # From another epoch (a restarted memory server's, say): RESET, then a SNAPSHOT.
    other = node(
        "watcher.js", grpc_addr, op_id, "--from-revision", str(started.revision),
        "--from-epoch", "0123456789abcdef",
    )  # fmt: skip
    code, records = other.finish()
    assert code == 0, other.stderr
    assert [(r["type"], r.get("epoch")) for r in records if r["type"] != "BOOKMARK"] == [
        ("RESET", epoch),
        ("SNAPSHOT", None),
    ]
    assert records[-1]["state"] == "SUCCEEDED"


def test_producer_defaults_to_a_server_picked_id_in_project_node_demo(
    node: Callable[..., NodeProcess], grpc_addr: str, grpc_stub: Stub
) -> None:
    producer = node("producer.js", grpc_addr, "--interval-ms", "0")
    code, steps = producer.finish()
    assert code == 0, producer.stderr
    assert [step["step"] for step in steps] == ["started"] + ["updated"] * 4 + [
        "retried",
        "completed",
    ]
    op_id = steps[0]["id"]
    assert op_id and steps[-1]["id"] == op_id
    stored = grpc_stub.GetOperation(pb.GetOperationRequest(operation_id=op_id), timeout=5)
    assert stored.state == State.SUCCEEDED
    assert (stored.project, stored.kind) == ("node-demo", "node-demo")
    assert dict(stored.counters) == {"fetched": 3, "processed": 3}
    # A measure reported from Node: absolute, declared SUM at start.
    assert dict(stored.measures) == {"cost_usd": 1.25}
    assert [(m.name, m.aggregation) for m in stored.measure_specs] == [
        ("cost_usd", pb.MeasureSpec.SUM)
    ]
    assert steps[-1]["measures"] == {"cost_usd": 1.25}


def test_watcher_of_an_unknown_operation_fails_with_not_found(
    node: Callable[..., NodeProcess], grpc_addr: str
) -> None:
    watcher = node("watcher.js", grpc_addr, uid("missing"))
    code, records = watcher.finish()
    assert (code, records) == (1, [])
    assert json.loads(watcher.stderr)["code"] == "NOT_FOUND"


def test_producer_acknowledges_a_cancel_request_while_running(
    node: Callable[..., NodeProcess], grpc_addr: str, grpc_stub: Stub
) -> None:
    op_id = uid()
    # A second between reports leaves ample time to cancel after the first one.
    producer = node("producer.js", grpc_addr, "--id", op_id, "--interval-ms", "1000")
    assert producer.line()["step"] == "started"
    assert producer.line()["step"] == "updated"
    cancelled = grpc_stub.CancelOperation(
        pb.CancelOperationRequest(operation_id=op_id, reason="test"), timeout=5
    )
    assert (cancelled.state, cancelled.cancel_requested) == (State.RUNNING, True)
    code, steps = producer.finish()
    assert code == 0, producer.stderr
    assert [step["step"] for step in steps] == ["updated", "cancelled"]
    assert steps[0]["sequence"] == 2
    assert steps[1]["state"] == "CANCELLED"
    stored = grpc_stub.GetOperation(pb.GetOperationRequest(operation_id=op_id), timeout=5)
    assert stored.state == State.CANCELLED
    assert stored.error.code == "CANCELLED"
    assert stored.revision == steps[1]["revision"]


def test_producer_stops_when_cancelled_while_queued(
    node: Callable[..., NodeProcess], grpc_addr: str, grpc_stub: Stub
) -> None:
    op_id = uid()
    producer = node("producer.js", grpc_addr, "--id", op_id, "--wait", stdin=True)
    assert producer.line()["step"] == "started"
    cancelled = grpc_stub.CancelOperation(pb.CancelOperationRequest(operation_id=op_id), timeout=5)
    assert cancelled.state == State.CANCELLED  # a QUEUED operation is cancelled at once
    producer.send_line()
    code, steps = producer.finish()
    assert code == 0, producer.stderr
    assert steps == [
        {"step": "cancelled", "id": op_id, "state": "CANCELLED", "revision": cancelled.revision}
    ]


# --- The batched producer -------------------------------------------------------------------


class CountReportCalls(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts the report calls the server receives, by method name."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.calls[details.method.rsplit("/", 1)[-1]] += 1
        return await continuation(details)


def list_project(stub: Stub, project: str) -> list[pb.Operation]:
    request = pb.ListOperationsRequest(filter=pb.OperationFilter(project=project), page_size=1000)
    operations: list[pb.Operation] = []
    while True:
        page = stub.ListOperations(request, timeout=5)
        operations.extend(page.operations)
        if not page.next_page_token:
            return operations
        request.page_token = page.next_page_token


def test_batch_producer_reports_on_many_operations_per_call(
    node: Callable[..., NodeProcess], server_factory: Callable[..., Any]
) -> None:
    counter = CountReportCalls()
    server = server_factory(interceptors=[counter])
    count, rounds, project = 1200, 3, uid("node-batch")
    producer = node(
        "batch_producer.js",
        server.address,
        project,
        "--count",
        str(count),
        "--rounds",
        str(rounds),
        "--interval-ms",
        "0",
        "--include-unknown",
    )
    code, steps = producer.finish()
    assert code == 0, producer.stderr
    assert [step["step"] for step in steps] == ["started"] + ["batch"] * rounds + [
        "retried",
        "completed",
    ]
    started, batches, retried, completed = steps[0], steps[1:-2], steps[-2], steps[-1]
    assert (started["project"], started["count"], len(set(started["ids"]))) == (
        project,
        count,
        count,
    )
    # Over 1000 reports: two calls a round. The unknown operation's report is
    # rejected on its own; every other report of the round is applied.
    assert [b["calls"] for b in batches] == [2] * rounds
    assert [b["reports"] for b in batches] == [count + 1] + [count] * (rounds - 1)
    assert [b["applied"] for b in batches] == [count] * rounds
    assert [[r["code"] for r in b["rejected"]] for b in batches] == [["NOT_FOUND"]] + [[]] * (
        rounds - 1
    )
    assert batches[-1]["percent"] == 100
    assert (retried["reports"], retried["applied"], retried["rejected"]) == (count, 0, [])
    assert completed == {
        "step": "completed",
        "count": count,
        "states": {"SUCCEEDED": count},
        "calls": 2 * (rounds + 1),
    }

    # The server saw batch calls only, and holds every operation's exact state.
    assert counter.calls["BatchUpdateOperations"] == 2 * (rounds + 1)
    assert counter.calls["UpdateOperation"] == counter.calls["ReportProgress"] == 0
    with grpc.insecure_channel(server.address) as channel:
        stored = list_project(Stub(channel), project)
    assert {op.id for op in stored} == set(started["ids"])
    for op in stored:
        assert (op.state, op.completed, op.total, op.percent) == (
            State.SUCCEEDED,
            rounds,
            rounds,
            100,
        )
        assert dict(op.counters) == {"files": rounds}  # the retried round added nothing
        assert op.last_sequence == rounds
        assert op.labels["client"] == "node"


# --- Best effort: the job never depends on the tracker -------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def warnings_of(process: NodeProcess) -> list[str]:
    return [json.loads(line)["warning"] for line in process.stderr.splitlines() if line]


def test_tracked_job_runs_to_its_end_without_a_server(node: Callable[..., NodeProcess]) -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    job = node(
        "tracked_job.js", address, "--items", "10", "--interval-ms", "10",
        "--finish-timeout-ms", "500",
    )  # fmt: skip
    code, records = job.finish()
    assert code == 0, job.stderr
    op_id = records[0]["id"]
    assert records == [
        {"step": "started", "id": op_id},
        {"step": "done", "id": op_id, "items": 10, "tracked": False, "state": None},
    ]
    warnings = warnings_of(job)
    assert sum("cannot reach" in w for w in warnings) == 1, warnings  # one per outage
    assert time.monotonic() - started < LINE_TIMEOUT


def test_tracked_job_registers_late_and_again_after_a_restart(
    node: Callable[..., NodeProcess], server_factory: Callable[..., Any]
) -> None:
    """Down at start, then up (the operation appears late), then restarted empty (it is
    registered again under the same id): it ends SUCCEEDED with exact counters."""
    port = free_port()
    project = uid("tracked")
    job = node(
        "tracked_job.js", f"127.0.0.1:{port}", project, "--items", "60",
        "--interval-ms", "40", "--finish-timeout-ms", "15000",
    )  # fmt: skip
    op_id = job.line()["id"]
    time.sleep(0.3)
    first = server_factory(listen=f"127.0.0.1:{port}")
    with grpc.insecure_channel(first.address) as channel:
        stub = Stub(channel)
        deadline = time.monotonic() + 10
        while not list_project(stub, project):  # registered late
            assert time.monotonic() < deadline, job.stderr
            time.sleep(0.05)
    first.shutdown(0.0)  # the process stays; its memory store is gone with the server
    time.sleep(0.3)
    second = server_factory(listen=f"127.0.0.1:{port}")  # an empty store
    code, records = job.finish()
    assert code == 0, job.stderr
    assert records == [
        {"step": "done", "id": op_id, "items": 60, "tracked": True, "state": "SUCCEEDED"}
    ]
    with grpc.insecure_channel(second.address) as channel:
        [stored] = list_project(Stub(channel), project)
    assert (stored.id, stored.state, stored.completed) == (op_id, State.SUCCEEDED, 60)
    assert dict(stored.counters) == {"items": 60}  # every item counted once
    warnings = warnings_of(job)
    assert any("registering it again" in w for w in warnings), warnings


def test_tracked_job_leaves_a_deleted_operation_deleted(
    node: Callable[..., NodeProcess], grpc_addr: str, grpc_stub: Stub
) -> None:
    project = uid("deleted")
    job = node(
        "tracked_job.js", grpc_addr, project, "--items", "40", "--interval-ms", "25",
        "--finish-timeout-ms", "2000",
    )  # fmt: skip
    op_id = job.line()["id"]
    deadline = time.monotonic() + 10
    while not list_project(grpc_stub, project):
        assert time.monotonic() < deadline, job.stderr
        time.sleep(0.05)
    grpc_stub.DeleteOperation(pb.DeleteOperationRequest(operation_id=op_id), timeout=5)
    code, records = job.finish()
    assert code == 0, job.stderr
    assert records == [{"step": "done", "id": op_id, "items": 40, "tracked": False, "state": None}]
    assert list_project(grpc_stub, project) == []  # not brought back
    assert any("deleted on the server" in w for w in warnings_of(job))


def test_node_clients_use_a_token_and_tls_from_the_environment(
    node: Callable[..., NodeProcess], server_factory: Any, tmp_path: Path
) -> None:
    import trustme
    from headway_server import auth

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    token = auth.new_token()
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(auth.token_block("node", token, ["node-demo"], ["report"]))
    server = server_factory(
        auth_tokens=str(tokens), tls_cert=str(files["cert"]), tls_key=str(files["key"])
    )
    tls = {"HEADWAY_TLS_CA": str(files["ca"])}
    producer = node(
        "producer.js", server.address, "--interval-ms", "0", env={**tls, "HEADWAY_TOKEN": token}
    )
    code, steps = producer.finish()
    assert code == 0, producer.stderr
    assert steps[-1]["step"] == "completed"
    refused = node("producer.js", server.address, "--interval-ms", "0", env=tls)
    code, steps = refused.finish()
    assert code == 1
    assert "UNAUTHENTICATED" in refused.stderr + json.dumps(steps), (steps, refused.stderr)
