"""Checks of the values users pass in, at the boundary, before anything is written.

Each raises :class:`InvalidArgument` naming the argument; the numbers are judged by
``config.check_number``, as the CLI and ``EngineConfig`` judge theirs. They exist because Postgres
refuses what Python accepts: a NUL character in text, a lone surrogate, a number past
int32 or past what an interval holds, NaN and infinity (which pass every ``<= 0``
test). A value that reaches Postgres and is refused there fails a whole batch of other
workflows' writes, or loops a workflow to ``dead``; refused here, it names itself.
"""

from __future__ import annotations

from .config import INT32_MAX, MAX_SECONDS, check_number

__all__ = ["INT32_MAX", "MAX_ID_LEN", "MAX_RETENTION_SECONDS", "MAX_SECONDS", "int32",
           "positive", "seconds", "text"]
from .errors import InvalidArgument

MAX_ID_LEN = 256
# retention may be kept for longer than any timeout or sleep (compliance)
MAX_RETENTION_SECONDS = 100 * 366 * 86400


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
    check_number(argument, value, low=0, low_open=not zero_ok, high=maximum,
                 error=InvalidArgument)
    return float(value)  # type: ignore[arg-type]


def int32(value: object, argument: str, *, minimum: int = -INT32_MAX - 1) -> int:
    """An int (not a bool) that fits Postgres's int."""
    check_number(argument, value, integer=True, low=minimum, high=INT32_MAX,
                 error=InvalidArgument)
    return value  # type: ignore[return-value]


def positive(value: object, argument: str) -> float:
    """A finite number > 0 (a rate), at most 1e9."""
    check_number(argument, value, low=0, low_open=True, high=1e9, error=InvalidArgument)
    return float(value)  # type: ignore[arg-type]
