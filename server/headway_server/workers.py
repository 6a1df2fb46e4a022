"""`headway serve --workers N`: N server processes on one port, sharing the store.

Each worker is a whole server (its own event loop, watch hub and store client)
bound with SO_REUSEPORT, so the kernel spreads connections over them and one
machine uses all its cores. They share nothing but the Redis store, which is
why the memory store is refused. The supervisor restarts a worker that dies and
forwards SIGTERM/SIGINT to all of them for a graceful stop.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import time
from multiprocessing.process import BaseProcess

from headway_server import logs
from headway_server.config import ServerConfig

log = logging.getLogger("headway.workers")

# A worker that died is started again after this long (not in a tight loop).
RESTART_DELAY = 1.0


def _worker(config: ServerConfig, index: int) -> None:
    from headway_server.__main__ import serve  # the child's own import

    logs.configure(config.log_level)
    logging.getLogger("headway.server").info("worker started", extra={"worker": index})
    asyncio.run(serve(config))


def supervise(config: ServerConfig) -> int:
    """Runs config.workers server processes until SIGTERM/SIGINT; the exit code."""
    for flag, address in (("--listen", config.listen), ("--http-listen", config.http_listen)):
        if address.rsplit(":", 1)[-1] == "0":
            raise ValueError(f"--workers needs a fixed port in {flag} (port 0 differs per process)")
    context = multiprocessing.get_context("spawn")
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def start(index: int) -> BaseProcess:
        process = context.Process(
            target=_worker, args=(config, index), name=f"headway-worker-{index}"
        )
        process.start()
        return process

    workers = [start(i) for i in range(config.workers)]
    log.info("workers started", extra={"workers": config.workers, "listen": config.listen})
    while not stopping:
        time.sleep(0.2)
        for i, process in enumerate(workers):
            if not process.is_alive() and not stopping:
                log.error(
                    "worker exited; starting it again",
                    extra={"worker": i, "exitcode": process.exitcode},
                )
                time.sleep(RESTART_DELAY)
                workers[i] = start(i)
    for process in workers:
        if process.is_alive() and process.pid is not None:
            process.terminate()  # SIGTERM: each worker shuts down gracefully
    deadline = time.monotonic() + config.shutdown_grace + 5.0
    for process in workers:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    log.info("workers stopped")
    return 0
