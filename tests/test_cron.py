"""The cron parser and next-tick computation (pure functions)."""

from __future__ import annotations

import datetime as dt

import pytest

from shardflow import InvalidArgument
from shardflow.cron import Cron

T = dt.datetime(2026, 11, 24, 10, 52, 30, tzinfo=dt.UTC)  # a Tuesday


@pytest.mark.parametrize("expr, expected", [
    ("* * * * *", dt.datetime(2026, 11, 24, 10, 53, 0, tzinfo=dt.UTC)),
    ("*/2 * * * * *", dt.datetime(2026, 11, 24, 10, 52, 32, tzinfo=dt.UTC)),
    ("0 9 * * mon-fri", dt.datetime(2026, 11, 25, 9, 0, tzinfo=dt.UTC)),
    ("30 2 1 * *", dt.datetime(2026, 12, 1, 2, 30, tzinfo=dt.UTC)),
    ("0 0 29 feb *", dt.datetime(2028, 2, 29, 0, 0, tzinfo=dt.UTC)),
    ("15,45 10 * * *", dt.datetime(2026, 11, 25, 10, 15, tzinfo=dt.UTC)),
    ("0 12 * * 0", dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)),  # Sunday
    ("0 12 * * 7", dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)),
    ("0 0 1 * fri", dt.datetime(2026, 11, 27, 0, 0, tzinfo=dt.UTC)),  # either day field
])
def test_next_after(expr: str, expected: dt.datetime) -> None:
    assert Cron.parse(expr).next_after(T) == expected


@pytest.mark.parametrize("expr, message", [
    ("* * * *", "must have 5 fields"),
    ("61 * * * *", "out of range"),
    ("x * * * *", "not a number"),
    ("*/0 * * * *", "out of range"),
    ("0 0 30 feb *", "never fires"),
])
def test_malformed(expr: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Cron.parse(expr).next_after(T)
