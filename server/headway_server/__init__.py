"""Headway server: servicer, domain and store layers behind `create_server`."""

from headway_server.config import ServerConfig
from headway_server.server import HeadwayServer, create_server

__all__ = ["HeadwayServer", "ServerConfig", "create_server"]
