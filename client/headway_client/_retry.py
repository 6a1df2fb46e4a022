"""Retries with exponential backoff and full jitter, for UNAVAILABLE and DEADLINE_EXCEEDED.

Safe because every write Headway accepts is idempotent: starts carry an id or
request_id, reports a sequence, finishes a request_id.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

from headway_client._errors import status_of

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failed call is retried. attempts=1 disables retries."""

    attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        """The sleeps between attempts: full jitter over an exponential cap."""
        cap = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield random.uniform(0, cap)
            cap = min(self.max_backoff, cap * self.multiplier)


# Reports are retried for about half a minute before a strict producer hears of it.
REPORT_RETRY = RetryPolicy(attempts=20, max_backoff=2.0)
# One attempt: the producers' background sender retries in rounds, with backoff.
ONCE = RetryPolicy(attempts=1)
# Watches reconnect until the caller gives up.
RECONNECT = RetryPolicy(attempts=1_000_000, max_backoff=2.0)


def retryable(exc: BaseException) -> bool:
    return status_of(exc) in RETRYABLE


def call_with_retry(call: Callable[[], T], policy: RetryPolicy) -> T:
    for delay in policy.delays():
        try:
            return call()
        except grpc.RpcError as exc:
            if not retryable(exc):
                raise
        time.sleep(delay)
    return call()


async def acall_with_retry(call: Callable[[], Awaitable[T]], policy: RetryPolicy) -> T:
    for delay in policy.delays():
        try:
            return await call()
        except grpc.RpcError as exc:
            if not retryable(exc):
                raise
        await asyncio.sleep(delay)
    return await call()
