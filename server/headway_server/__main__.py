"""`headway serve` / `python -m headway_server serve`: run the server until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from headway_server import auth, logs
from headway_server import config as config_module
from headway_server.server import create_server, load_credentials

log = logging.getLogger("headway.server")


async def serve(config: config_module.ServerConfig) -> None:
    server, _ = create_server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stopping: asyncio.Future[int] = loop.create_future()

    def on_signal(signum: int) -> None:
        if not stopping.done():
            stopping.set_result(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, int(sig))
    loop.add_signal_handler(signal.SIGHUP, server.reload_credentials)
    signum = await stopping
    log.info("signal received", extra={"signal": signal.Signals(signum).name})
    await server.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headway", description="Headway progress tracker")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the Headway gRPC server")
    config_module.add_arguments(serve_parser)
    args = parser.parse_args(argv)
    try:
        config = config_module.from_arguments(args)
    except ValueError as exc:
        parser.error(str(exc))
    logs.configure(config.log_level)
    if config.authenticates:
        try:  # refused here, once, rather than by every worker as it starts
            load_credentials(config)
        except auth.AuthConfigError as exc:
            print(f"headway: {exc}", file=sys.stderr)
            return 2
    if config.workers > 1:
        from headway_server.workers import supervise

        try:
            return supervise(config)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        asyncio.run(serve(config))
    except auth.AuthConfigError as exc:
        print(f"headway: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"headway: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
