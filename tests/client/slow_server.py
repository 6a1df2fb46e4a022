"""A real Headway server whose ProgressTracker calls answer late while a flag file exists.

Run by tests/client/test_best_effort.py as a process:
    python slow_server.py PORT FLAG_FILE DELAY_SECONDS
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc
from headway_server.config import ServerConfig
from headway_server.server import create_server


class LateAnswers(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, flag: Path, delay: float) -> None:
        self.flag = flag
        self.delay = delay

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method.startswith("/headway.v1.ProgressTracker/") and self.flag.exists():
            await asyncio.sleep(self.delay)
        return await continuation(details)


async def serve(port: int, flag: Path, delay: float) -> None:
    config = ServerConfig(listen=f"127.0.0.1:{port}", log_level="WARNING")
    server, _ = create_server(config, interceptors=[LateAnswers(flag, delay)])
    await server.start()
    await asyncio.Event().wait()  # until the test kills the process


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])))
