"""Stores: the async interface the domain writes through, and its implementations."""

from headway_server.store.base import Changes, OperationStore, Page
from headway_server.store.memory import MemoryStore


def open_store(url: str, *, max_operations: int, history_size: int) -> OperationStore:
    """The store a --store value names: "memory", or a Redis URL."""
    if url == "memory":
        return MemoryStore(max_operations=max_operations, history_size=history_size)
    # Imported here: the memory store needs no Redis client.
    from headway_server.store.redis import RedisStore

    return RedisStore(url, max_operations=max_operations, history_size=history_size)


__all__ = ["Changes", "MemoryStore", "OperationStore", "Page", "open_store"]
