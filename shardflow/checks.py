"""Checks of the values users pass in, at the boundary, before anything is written.

Each raises :class:`InvalidArgument` naming the argument. They exist because Postgres
refuses what Python accepts: a NUL character in text, a lone surrogate, a number past
int32 or past what an interval holds, NaN and infinity (which pass every ``<= 0``
test). A value that reaches Postgres and is refused there fails a whole batch of other
workflows' writes, or loops a workflow to ``dead``; refused here, it names itself.
"""

from __future__ import annotations

import math

from .errors import InvalidArgument

MAX_ID_LEN = 256
INT32_MAX = 2**31 - 1
# the longest span of seconds accepted for timeouts, delays, sleeps and retention:
# 100 years (an interval holds far more; a float past 2**53 s no longer counts seconds)
MAX_SECONDS = 100 * 366 * 86400.0


def text(value: object, argument: str, *, max_len: int = MAX_ID_LEN) -> str:
    """A non-empty str Postgres can store: no NUL, no lone surrogate, at most
    ``max_len`` characters."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{argument} must be a non-empty str, got {value!r}")
    if len(value) > max_len:
        raise InvalidArgument(f"{argument} is {len(value)} characters; the maximum is "
                              f"{max_len}")
    if "\x00" in value:
        raise InvalidArgument(f"{argument} {value[:40]!r} contains a NUL character, which "
                              "Postgres cannot store in text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{argument} {value[:40]!r} contains a lone surrogate "
                              "(not valid UTF-8)") from None
    return value


def seconds(value: object, argument: str, *, zero_ok: bool = True,
            maximum: float = MAX_SECONDS) -> float:
    """A finite number of seconds, >= 0 (or > 0), at most ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{argument} must be a number of seconds, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise InvalidArgument(f"{argument} must be a finite number of seconds, got {value!r}")
    if v < 0 or (v == 0 and not zero_ok):
        raise InvalidArgument(f"{argument} must be {'>= 0' if zero_ok else '> 0'} "
                              f"seconds, got {value!r}")
    if v > maximum:
        raise InvalidArgument(f"{argument} is {value!r} seconds; the maximum is "
                              f"{maximum:.0f}")
    return v


def int32(value: object, argument: str, *, minimum: int = -INT32_MAX - 1) -> int:
    """An int (not a bool) that fits Postgres's int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{argument} must be an int, got {value!r}")
    if not minimum <= value <= INT32_MAX:
        raise InvalidArgument(f"{argument} must be between {minimum} and {INT32_MAX}, "
                              f"got {value!r}")
    return value


def positive(value: object, argument: str) -> float:
    """A finite number > 0 (a rate)."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value <= 0 or value > 1e9:
        raise InvalidArgument(f"{argument} must be > 0 (a finite number up to 1e9), "
                              f"got {value!r}")
    return float(value)
