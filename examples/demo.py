"""`make demo`: a server, a simulated multi-stage ingestion job, and `headway watch` on it
(also live on the dashboard, whose address it prints)."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time

from headway_client import HeadwayClient
from headway_client.cli import main as headway

STAGES = [("clone", 1), ("parse", 3), ("embed", 5), ("index", 1)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_serving(client: HeadwayClient) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            client.list(project="demo")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def simulate_job(client: HeadwayClient, started: threading.Event, ids: list[str]) -> None:
    """A repository ingestion: four stages of different speeds, counters per item type."""
    files = 240
    with client.start(
        kind="github-ingest",
        project="demo",
        total=files,
        unit="files",
        stages=STAGES,
        labels={"repo": "acme/widgets"},
    ) as op:
        ids.append(op.id)
        started.set()
        op.stage("clone", total=1, message="cloning acme/widgets")
        time.sleep(1.0)
        op.update(stage_completed=1)
        for name, delay in (("parse", 0.01), ("embed", 0.02), ("index", 0.005)):
            op.stage(name, total=files, message=f"{name} files")
            for i in range(files):
                time.sleep(delay * random.uniform(0.5, 1.5))
                op.update(
                    stage_completed=i + 1,
                    # Files count as done once indexed, the last stage.
                    completed=i + 1 if name == "index" else None,
                    counters={"issues": random.randint(0, 2)} if name == "parse" else None,
                    checkpoint=f"file-{i:04d}",
                )
        op.update(message="done")


def main() -> int:
    port = free_port()
    target = f"127.0.0.1:{port}"
    http = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "headway_server",
            "serve",
            "--listen",
            target,
            "--http-listen",
            http,
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        with HeadwayClient(target) as client:
            wait_until_serving(client)
            started, ids = threading.Event(), []  # type: ignore[var-annotated]
            job = threading.Thread(target=simulate_job, args=(client, started, ids), daemon=True)
            job.start()
            started.wait(10)
            print(f"Headway on {target}; watching operation {ids[0]} (Ctrl-C to stop)")
            print(f"Dashboard: http://{http}/#/op/{ids[0]}\n")
            status = headway(["--target", target, "watch", ids[0]])
            job.join(5)
            print(f"\nheadway watch exited with status {status}")
            return status
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    sys.exit(main())
