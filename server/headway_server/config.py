"""Server configuration: a frozen dataclass, filled from flags and HEADWAY_* variables."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

from headway_server.app.watch import (
    DEFAULT_MIN_INTERVAL,
    DEFAULT_YIELD_RATIO,
    MAX_MIN_INTERVAL,
)
from headway_server.store.base import redacted

STORE_SCHEMES = ("redis://", "rediss://", "unix://")


def is_loopback(listen: str) -> bool:
    """Whether a --listen address only accepts this machine's connections."""
    host = listen.rpartition(":")[0].strip("[]") if ":" in listen else listen
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name (or "0.0.0.0"-like wildcard): reachable from outside


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds from "500ms", "30s", "5m", "1h", "2d" or a plain number of seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 30s, 5m, 1h)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    retention: float = 3600.0
    max_operations: int = 100_000
    # Kubernetes' watch cache bookmarks about once a minute too: a bookmark only
    # advances a quiet stream's resume point (resuming from an older revision
    # costs one read), and at 10 s, 10,000 idle watchers cost ~8 % of a core
    # (bench: unrelated_watchers). Dead connections are found by keepalive.
    bookmark_interval: float = 60.0
    shutdown_grace: float = 5.0
    history_size: int = 10_000
    log_level: str = "INFO"
    # How often leases and retention are checked; a test knob more than a user one.
    sweep_interval: float = 1.0
    # Streams opened at once beyond grpc's default queue are refused with
    # CANCELLED (about 20% of 3,000 at once on this hardware), so raise it.
    max_pending_requests: int = 100_000
    max_message_bytes: int = 4 * 1024 * 1024
    # HTTP/2 keepalive pings to every client connection, so that a watcher
    # whose host vanished is dropped (and its stream freed) within about
    # keepalive_time + keepalive_timeout, whatever the bookmark interval.
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    # Prometheus endpoint ("host:port"); empty = none.
    metrics_listen: str = ""
    # Alert thresholds (see domain/alerts.py).
    slow_fraction: float = 0.5
    error_rate_threshold: float = 0.1
    eta_slip_seconds: float = 60.0
    # After a round of watch sends, time left to producers, relative to how
    # long the round took (see domain/watch.py); 0 = none, no batching pauses.
    watch_yield_ratio: float = DEFAULT_YIELD_RATIO
    # Pacing of watch streams that do not ask for their own (see domain/watch.py).
    watch_min_interval: float = DEFAULT_MIN_INTERVAL
    # "memory" (this process only) or a Redis URL shared by many server processes.
    store: str = "memory"
    # Server processes on one port (SO_REUSEPORT), sharing the store.
    workers: int = 1
    # A TOML file of token hashes, projects and roles (see auth.py); "" = none.
    auth_tokens: str = ""
    # JWT bearer tokens: the signer's public key (PEM or JWKS file) and the
    # issuer and audience tokens must name.
    auth_jwt_key: str = ""
    auth_jwt_issuer: str = ""
    auth_jwt_audience: str = ""
    # Serve a non-loopback address without authentication (protected mode off).
    insecure: bool = False
    # TLS: the server's certificate chain and key (PEM files); with a client CA,
    # clients must present a certificate it signed (mTLS).
    # Limits (0 = none): active operations per project, open watch streams per
    # principal (per server process), answered RESOURCE_EXHAUSTED.
    max_active_operations_per_project: int = 0
    max_watch_streams_per_principal: int = 0
    # HTTP/JSON gateway address ("" = none), on the same loop and store.
    http_listen: str = ""
    # Origins whose pages may call the HTTP API (CORS); none by default.
    http_cors_origins: tuple[str, ...] = ()
    # Reflection asks for a token too (else it is open, like health).
    auth_reflection: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""

    def __post_init__(self) -> None:
        for name in (
            "retention",
            "bookmark_interval",
            "shutdown_grace",
            "sweep_interval",
            "watch_yield_ratio",
            "watch_min_interval",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative")
        if self.bookmark_interval == 0 or self.sweep_interval == 0:
            raise ValueError("bookmark_interval and sweep_interval must be above zero")
        if self.watch_min_interval > MAX_MIN_INTERVAL:
            raise ValueError(f"watch_min_interval must be at most {MAX_MIN_INTERVAL:g}s")
        if self.store != "memory" and not self.store.startswith(STORE_SCHEMES):
            raise ValueError(
                f"store must be 'memory' or a redis://, rediss:// or unix:// URL "
                f"(got {self.store.split('@')[-1]!r})"
            )
        if self.workers > 1 and self.store == "memory":
            raise ValueError(
                "--workers above 1 needs a shared store: each process would hold "
                "its own memory store; use --store redis://host:port/db"
            )
        if self.auth_jwt_key and not (self.auth_jwt_issuer and self.auth_jwt_audience):
            raise ValueError("--auth-jwt-key needs --auth-jwt-issuer and --auth-jwt-audience")
        if self.auth_reflection and not self.authenticates:
            raise ValueError("--auth-reflection needs --auth-tokens or --auth-jwt-key")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        for address in filter(None, (self.listen, self.http_listen)):
            if not (self.authenticates or self.insecure or is_loopback(address)):
                raise ValueError(
                    f"refusing to serve {address} without authentication: anyone who "
                    "reaches it could read, report, cancel and delete anything. Give "
                    "--auth-tokens FILE (tokens: `headway token new`), or --insecure "
                    "if something else guards the port"
                )
        for name in ("max_active_operations_per_project", "max_watch_streams_per_principal"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative (0 = no limit)")
        for name in ("max_operations", "history_size", "max_pending_requests", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    @property
    def authenticates(self) -> bool:
        """Whether calls must carry credentials."""
        return bool(self.auth_tokens or self.auth_jwt_key)

    @property
    def store_name(self) -> str:
        """The store, for logs: a URL's password left out."""
        return self.store if self.store == "memory" else redacted(self.store)


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
    return origins


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not true or false: {text!r}")


# flag -> (field, parser); each also read from HEADWAY_<FLAG>.
_FLAGS: dict[str, Callable[[str], object]] = {
    "listen": str,
    "retention": parse_duration,
    "max-operations": int,
    "bookmark-interval": parse_duration,
    "shutdown-grace": parse_duration,
    "history": int,
    "log-level": str,
    "sweep-interval": parse_duration,
    "metrics-listen": str,
    "slow-fraction": float,
    "error-rate-threshold": float,
    "eta-slip": parse_duration,
    "watch-yield-ratio": float,
    "watch-min-interval": parse_duration,
    "store": str,
    "workers": int,
    "http-listen": str,
    "http-cors-origin": _origins,
    "auth-tokens": str,
    "auth-jwt-key": str,
    "auth-jwt-issuer": str,
    "auth-jwt-audience": str,
    "insecure": _flag,
    "auth-reflection": _flag,
    "max-active-operations-per-project": int,
    "max-watch-streams-per-principal": int,
    "tls-cert": str,
    "tls-key": str,
    "tls-client-ca": str,
}
_FIELD = {
    "history": "history_size",
    "eta-slip": "eta_slip_seconds",
    "http-cors-origin": "http_cors_origins",
}
_HELP = {
    "listen": "address to serve on; port 0 picks a free one",
    "retention": "how long terminal operations are kept (e.g. 1h)",
    "max-operations": "operations stored before StartOperation is RESOURCE_EXHAUSTED",
    "bookmark-interval": "BOOKMARK period on quiet watch streams",
    "shutdown-grace": "time given to in-flight calls on SIGTERM/SIGINT",
    "history": "deletion tombstones kept for watchers that resume",
    "log-level": "DEBUG, INFO, WARNING or ERROR",
    "sweep-interval": "how often heartbeat leases and retention are checked",
    "metrics-listen": "serve Prometheus metrics at host:port /metrics (empty = off)",
    "slow-fraction": "SLOW alert below this fraction of typical or earlier throughput",
    "error-rate-threshold": "HIGH_ERROR_RATE alert above this many errors per unit",
    "eta-slip": "ETA_SLIPPING alert when the estimated end moves later by more than this",
    "watch-yield-ratio": "after each round of watch sends, pause for producers this many "
    "times the round's length (at most 100ms); watchers then get batched changes",
    "watch-min-interval": "pacing of watch streams that ask for none: at most one change "
    "message per interval, with the latest state of what changed (0 = every state)",
    "store": "where operations live: memory (this process) or "
    "redis://[:password@]host:port/db[?namespace=name] (also rediss://), shared by "
    "every server process using it and kept across restarts",
    "workers": "server processes on one port (SO_REUSEPORT) sharing a Redis store",
    "auth-tokens": "TOML file of token hashes with their projects and roles; every call "
    "then needs 'authorization: Bearer <token>' (re-read on SIGHUP)",
    "http-listen": "serve the HTTP/JSON API, its SSE watches and the dashboard too, at "
    "host:port (empty = off; HTTPS with --tls-cert)",
    "http-cors-origin": "origins (comma-separated, e.g. https://ops.example.com) whose pages "
    "may call the HTTP API; * for any",
    "auth-jwt-key": "PEM public key or JWKS file: bearer tokens may be JWTs it signed "
    "(asymmetric algorithms only; claims projects, roles, exp)",
    "auth-jwt-issuer": "the iss a JWT must name",
    "auth-jwt-audience": "the aud a JWT must name",
    "insecure": "serve a non-loopback address without authentication (true/false)",
    "auth-reflection": "server reflection asks for a valid token too (true/false)",
    "max-active-operations-per-project": "StartOperation is RESOURCE_EXHAUSTED when the "
    "project has this many queued, running or paused operations (0 = no limit)",
    "max-watch-streams-per-principal": "a token (or client certificate) may hold this many "
    "watch streams open on one server process (0 = no limit)",
    "tls-cert": "PEM certificate chain: serve TLS (with --tls-key)",
    "tls-key": "PEM private key of --tls-cert",
    "tls-client-ca": "PEM CA certificates: clients must present a certificate one signed "
    "(mTLS); its subject is a principal ([[client]] in --auth-tokens)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    for flag in _FLAGS:
        name = _FIELD.get(flag, flag.replace("-", "_"))
        env = "HEADWAY_" + flag.replace("-", "_").upper()
        switch = {"nargs": "?", "const": "true"} if _FLAGS[flag] is _flag else {}
        parser.add_argument(
            f"--{flag}",
            dest=name,
            default=None,
            help=f"{_HELP[flag]} (env {env}; default {getattr(defaults, name)})",
            **switch,  # type: ignore[arg-type]
        )


def from_arguments(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Flags win over HEADWAY_* environment variables, which win over defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for flag, parse in _FLAGS.items():
        name = _FIELD.get(flag, flag.replace("-", "_"))
        env = "HEADWAY_" + flag.replace("-", "_").upper()
        raw = getattr(args, name, None)
        source = f"--{flag}"
        if raw is None and env in environ:
            raw, source = environ[env], env
        if raw is not None:
            try:
                values[name] = parse(raw)
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from exc
    known = {f.name for f in fields(ServerConfig)}
    return ServerConfig(**{k: v for k, v in values.items() if k in known})  # type: ignore[arg-type]


def parse(argv: Sequence[str]) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="headway serve")
    add_arguments(parser)
    return from_arguments(parser.parse_args(argv))
