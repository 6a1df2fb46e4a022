"""The bare baseline: a minimal grpc.aio server with generic handlers and no Headway logic.

It is what Headway is measured against in bench/run.py: the same grpc.aio, the
same server options, messages of the same size, and nothing else.

- `Echo` (unary): answers every request with a serialized UpdateOperationResponse
  (the size of what UpdateOperation returns).
- `EchoStream` (bidirectional): the same answer for every request on a stream.
- `EchoBatch` (unary): parses a BatchUpdateOperationsRequest (as Headway must) and
  answers one typical ReportProgressResponse per report in it.
- `Subscribe` (server stream): sends the request's bytes back first (when not
  empty, so a client knows it is admitted), then every published message.
- `Publish` (unary): hands the request's bytes, unparsed, to every subscriber.

Each subscriber has a queue of at most `--queue` messages; when it is full the
oldest is dropped, so an over-driven fan-out measures the delivery ceiling and
a subscriber that never reads holds a bounded amount.

    .venv/bin/python bench/bare_server.py --port N
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from headway.v1 import progress_pb2 as pb

SERVICE = "headway.bench.Bare"
# What UpdateOperation typically answers: a revision, a percent, applied, RUNNING.
ECHO_RESPONSE = pb.UpdateOperationResponse(
    revision=123_456, percent=42.5, cancel_requested=False, applied=True, state=pb.Operation.RUNNING
).SerializeToString()


# One typical BatchUpdateOperations ack (an operation id of the benchmark's length).
BATCH_ACK = pb.ReportProgressResponse(
    sequence=123_456,
    result=pb.UpdateOperationResponse.FromString(ECHO_RESPONSE),
    operation_id="batch-123",
)


def batch_echo_response(count: int, cache: dict[int, bytes]) -> bytes:
    """A BatchUpdateOperationsResponse of `count` acks, built once per count."""
    response = cache.get(count)
    if response is None:
        response = pb.BatchUpdateOperationsResponse(results=[BATCH_ACK] * count).SerializeToString()
        cache[count] = response
    return response


class FanOut:
    """Every subscriber's queue; Publish puts each message into all of them."""

    def __init__(self, queue_limit: int) -> None:
        self.queue_limit = queue_limit
        self.subscribers: set[asyncio.Queue[bytes]] = set()

    def publish(self, message: bytes) -> None:
        for queue in self.subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(message)


def handlers(fan_out: FanOut) -> grpc.GenericRpcHandler[Any, Any]:
    async def echo(request: bytes, context: Any) -> bytes:
        return ECHO_RESPONSE

    async def echo_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield ECHO_RESPONSE

    batch_responses: dict[int, bytes] = {}

    async def echo_batch(request: bytes, context: Any) -> bytes:
        count = len(pb.BatchUpdateOperationsRequest.FromString(request).updates)
        return batch_echo_response(count, batch_responses)

    async def publish(request: bytes, context: Any) -> bytes:
        fan_out.publish(request)
        return b""

    async def subscribe(request: bytes, context: Any) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=fan_out.queue_limit)
        fan_out.subscribers.add(queue)
        try:
            if request:
                yield request
            while True:
                yield await queue.get()
        finally:
            fan_out.subscribers.discard(queue)

    # No (de)serializers: requests and responses are bytes as they came.
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream),
            "EchoBatch": grpc.unary_unary_rpc_method_handler(echo_batch),
            "Publish": grpc.unary_unary_rpc_method_handler(publish),
            "Subscribe": grpc.unary_stream_rpc_method_handler(subscribe),
        },
    )


async def serve(port: int, queue_limit: int) -> None:
    # The options Headway's create_server uses, so admission and limits match.
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=None,
    )
    server.add_generic_rpc_handlers((handlers(FanOut(queue_limit)),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bare server on 127.0.0.1:{bound}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1 (0 = any)")
    parser.add_argument("--queue", type=int, default=1000, help="messages kept per subscriber")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.queue))
    return 0


if __name__ == "__main__":
    sys.exit(main())
