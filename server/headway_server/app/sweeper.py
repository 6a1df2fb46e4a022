"""The sweeper: heartbeat leases and retention on a clock, beside the server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from headway_server.app.service import OperationService

log = logging.getLogger("headway.sweeper")


class Sweeper:
    """Runs `service.sweep()` every `interval` seconds until stopped.

    `after_sweep` (e.g. publishing gauges to metrics) runs after each sweep.
    """

    def __init__(
        self,
        service: OperationService,
        *,
        interval: float,
        after_sweep: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.service = service
        self.interval = interval
        self.after_sweep = after_sweep
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="headway-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.service.sweep()
                if self.after_sweep is not None:
                    await self.after_sweep()
            except Exception:
                # A failed sweep must not end leases and retention for good.
                log.exception("sweep failed")
