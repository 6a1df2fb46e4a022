"""Domain errors: one class per outcome a caller must tell apart.

The servicer maps each class to a grpc.StatusCode in one table; nothing here
knows about grpc.
"""


class HeadwayError(Exception):
    """Base of every error the domain raises on purpose."""


class InvalidArgument(HeadwayError):
    """The request is malformed; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(HeadwayError):
    """The operation (or parent) does not exist."""


class Deleted(NotFound):
    """The operation existed and was deleted (its tombstone is still held), as
    opposed to never seen: a producer must not register it again."""


class AlreadyExists(HeadwayError):
    """An operation with this id exists with different parameters."""


class FailedPrecondition(HeadwayError):
    """The call is well-formed but not allowed in the operation's current state."""


class ResourceExhausted(HeadwayError):
    """The store holds its maximum number of operations."""


class Conflict(HeadwayError):
    """A compare-and-set write lost a race; the domain retries it."""


class HistoryCompacted(HeadwayError):
    """A watcher asked for changes the store no longer holds."""


class StoreUnavailable(HeadwayError):
    """The shared store (Redis) cannot be reached; the call may be retried, on
    this server or another. Nothing was written unless the store said so."""
