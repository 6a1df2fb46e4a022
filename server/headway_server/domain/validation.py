"""Input limits and checks; each failure names the field it is about."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from headway_server.domain.errors import InvalidArgument

MAX_ID_LENGTH = 128
MAX_NAME_LENGTH = 128  # kind, project, dataset, unit
MAX_KEY_LENGTH = 63  # label keys, counter names, stage names
MAX_LABEL_VALUE_LENGTH = 256
MAX_LABELS = 64
MAX_COUNTERS = 64
MAX_STAGES = 64
MAX_MESSAGE_BYTES = 4 * 1024
MAX_CHECKPOINT_BYTES = 4 * 1024
MAX_STRUCT_BYTES = 16 * 1024
MAX_HEARTBEAT_TIMEOUT = 7 * 24 * 3600.0
MAX_EPOCH_LENGTH = 64  # a watch's from_epoch

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def check_id(field: str, value: str, *, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(field, f"is longer than {MAX_ID_LENGTH} characters")
    if not _ID.fullmatch(value):
        raise InvalidArgument(
            field, "must start with a letter or digit and use only A-Z a-z 0-9 . _ : -"
        )


def check_name(field: str, value: str, limit: int = MAX_NAME_LENGTH) -> None:
    if len(value) > limit:
        raise InvalidArgument(field, f"is longer than {limit} characters")


def check_bytes(field: str, value: str, limit: int) -> None:
    # UTF-8 takes at most 4 bytes a character: most values need no encoding.
    if 4 * len(value) > limit and len(value.encode()) > limit:
        raise InvalidArgument(field, f"is larger than {limit} bytes")


def check_count(field: str, value: int) -> None:
    if value < 0:
        raise InvalidArgument(field, f"must not be negative (got {value})")


def check_number(field: str, value: float, *, low: float, high: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be a finite number (got {value})")
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be within [{low:g}, {high:g}] (got {value:g})")


def check_struct(field: str, value: Mapping[str, Any] | None) -> None:
    if value is None:
        return
    try:
        encoded = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise InvalidArgument(field, "must not contain NaN or infinite numbers") from exc
    if len(encoded.encode()) > MAX_STRUCT_BYTES:
        raise InvalidArgument(field, f"is larger than {MAX_STRUCT_BYTES} bytes")


def check_labels(field: str, labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(field, f"has more than {MAX_LABELS} entries")
    for key, value in labels.items():
        if not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidArgument(f"{field}[{key!r}]", f"key must be 1-{MAX_KEY_LENGTH} characters")
        if len(value) > MAX_LABEL_VALUE_LENGTH:
            raise InvalidArgument(
                f"{field}[{key!r}]", f"value is longer than {MAX_LABEL_VALUE_LENGTH} characters"
            )


def check_counter_deltas(field: str, deltas: Mapping[str, int]) -> None:
    for key, delta in deltas.items():
        if not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidArgument(
                f"{field}[{key!r}]", f"name must be 1-{MAX_KEY_LENGTH} characters"
            )
        check_count(f"{field}[{key!r}]", delta)
