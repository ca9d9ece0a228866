"""Cron expressions: five fields (minute hour day-of-month month day-of-week), or six
with seconds first. ``*``, lists ``a,b``, ranges ``a-b``, steps ``*/n`` and ``a-b/n``;
month and weekday names (``jan``, ``mon``); weekday 0 or 7 is Sunday. As in cron, when
both day fields are restricted a day matches either."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from .errors import InvalidArgument

_NAMES = {
    "month": {m: i + 1 for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"])},
    "weekday": {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
}
_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31),
           ("month", 1, 12), ("weekday", 0, 7))


def _field(text: str, name: str, lo: int, hi: int, expr: str) -> frozenset[int]:
    out: set[int] = set()
    names = _NAMES.get(name, {})
    for part in text.lower().split(","):
        base, _, step_s = part.partition("/")
        try:
            step = int(step_s) if step_s else 1
            if base == "*":
                a, b = lo, hi
            elif "-" in base:
                x, y = base.split("-", 1)
                a, b = names.get(x) or int(x), names.get(y) or int(y)
            else:
                a = names.get(base) or int(base)
                b = hi if step_s else a
        except ValueError:
            raise InvalidArgument(f"cron {expr!r}: {name} field {text!r} is not a number, "
                                  "range, list or step") from None
        if step < 1 or not lo <= a <= b <= hi:
            raise InvalidArgument(f"cron {expr!r}: {name} field {text!r} is out of range "
                                  f"{lo}-{hi}")
        out.update(range(a, b + 1, step))
    if name == "weekday" and 7 in out:
        out = (out - {7}) | {0}
    return frozenset(out)


@dataclass(frozen=True)
class Cron:
    expr: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    days_any: bool
    weekdays_any: bool

    @classmethod
    def parse(cls, expr: str) -> Cron:
        if not isinstance(expr, str):
            raise InvalidArgument(f"cron must be a string, got {expr!r}")
        parts = expr.split()
        if len(parts) == 5:
            parts = ["0", *parts]
        if len(parts) != 6:
            raise InvalidArgument(f"cron {expr!r} must have 5 fields (minute hour day "
                                  "month weekday) or 6 (seconds first)")
        sets = [_field(p, n, lo, hi, expr) for p, (n, lo, hi) in zip(parts, _FIELDS,
                                                                      strict=True)]
        sec, mins, hrs, days, months, wdays = sets
        return cls(expr, sec, mins, hrs, days, months, wdays, days_any=parts[3] == "*",
                   weekdays_any=parts[5] == "*")

    def _day_ok(self, d: dt.datetime) -> bool:
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        if self.days_any or self.weekdays_any:
            return dom and dow
        return dom or dow

    def next_after(self, t: dt.datetime) -> dt.datetime:
        """The first tick strictly after ``t`` (timezone-aware; UTC)."""
        c = t.astimezone(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=1)
        limit = c + dt.timedelta(days=366 * 5)
        while c < limit:
            if c.month not in self.months:
                c = (c.replace(day=1, hour=0, minute=0, second=0)
                     + dt.timedelta(days=32)).replace(day=1)
            elif not self._day_ok(c):
                c = c.replace(hour=0, minute=0, second=0) + dt.timedelta(days=1)
            elif c.hour not in self.hours:
                c = c.replace(minute=0, second=0) + dt.timedelta(hours=1)
            elif c.minute not in self.minutes:
                c = c.replace(second=0) + dt.timedelta(minutes=1)
            elif c.second not in self.seconds:
                c += dt.timedelta(seconds=1)
            else:
                return c
        raise InvalidArgument(f"cron {self.expr!r} never fires (e.g. February 30)")
