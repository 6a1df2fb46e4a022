"""Stores: the async interface the domain writes through, and its implementations."""

from headway_server.store.base import Changes, OperationStore, Page
from headway_server.store.memory import MemoryStore

__all__ = ["Changes", "MemoryStore", "OperationStore", "Page"]
