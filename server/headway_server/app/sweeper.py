"""The sweeper: heartbeat leases and retention on a clock, beside the server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from headway_server.app.service import OperationService
from headway_server.domain.errors import StoreUnavailable

log = logging.getLogger("headway.sweeper")

STOP_TIMEOUT = 5.0


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
        self._store_lost = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="headway-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: a sweep stuck in a store call must not hold shutdown up.
            done, _ = await asyncio.wait({self._task}, timeout=STOP_TIMEOUT)
            if not done:
                log.warning("sweeper did not stop in time")
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.service.sweep()
                if self.after_sweep is not None:
                    await self.after_sweep()
            except StoreUnavailable as exc:
                # Said once per outage (health says the rest), not every interval.
                if not self._store_lost:
                    log.warning("sweeps wait for the store", extra={"detail": str(exc)})
                self._store_lost = True
                continue
            except Exception:
                # A failed sweep must not end leases and retention for good.
                log.exception("sweep failed")
            self._store_lost = False
