"""Argument parsing and one-line errors shared by every command line of shardflow
(``shardflow``, the bench, the drills, the worker processes).

Every error prints one line, ``PROG: error: …``, and exits 2: argparse's (no usage
dump), shardflow's own, a driver's (libpq's messages span lines: collapsed), and any
other (named by its type; ``SHARDFLOW_DEBUG=1`` re-raises it with its traceback).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from . import clusterfile
from .clusterfile import NodeSpec
from .config import INT32_MAX, number_problem
from .errors import ClusterError, ShardflowError

if TYPE_CHECKING:
    import psycopg

CLUSTER_HELP = (f"the cluster file (default: ${clusterfile.ENV} if set, else "
                f"{clusterfile.DEFAULT_DIR / clusterfile.FILE_NAME})")
DIR_HELP = (f"the local cluster's directory, holding {clusterfile.FILE_NAME} (default: the "
            f"directory of ${clusterfile.ENV}, else {clusterfile.DEFAULT_DIR})")
DEBUG_ENV = "SHARDFLOW_DEBUG"

def error_line(exc: BaseException) -> str:
    """``exc`` as one line: whitespace collapsed (libpq's messages span two lines),
    passwords redacted (a driver may echo a DSN), the type named unless it is one of
    the errors whose message is written for users."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, ShardflowError | ValueError) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return clusterfile.redact(text)


def guarded(prog: str, run: Callable[[], int]) -> int:
    """``run()``; any exception becomes ``PROG: error: …`` (one line) and exit 2.
    argparse's own exits (``--help``, its errors) are SystemExit and pass through."""
    try:
        return run()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{prog}: error: {error_line(exc)}", file=sys.stderr, flush=True)
        return 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``PROG: error: MESSAGE``, exit 2:
    argparse's default prints the whole usage first (for the bench, 25 lines)."""

    error_prog: str | None = None  # PROG, when not the parser's own prog

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes only -5 and -.5 for negative numbers, so '--rate -inf' or
        # 'retention set -1e3' came out as "expected one argument": values reach the
        # range checks, which say what is wrong with them
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.error_prog or self.prog}: error: {' '.join(message.split())}\n")


def number_arg(kind: type[int] | type[float], *, low: float = 1, high: float = INT32_MAX,
               low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite ``kind`` in low..high (see ``config.number_problem``);
    argparse prefixes the message with the argument's name."""
    integer = kind is int

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if integer else 'a number'}, got {text[:40]!r}"
            ) from None
        problem = number_problem(value, integer=integer, low=low, high=high,
                                 low_open=low_open)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def when_arg(flag: str) -> Callable[[str], dt.datetime]:
    """An argparse type: an ISO time (UTC when it has no zone) or an age (90s, 15m, 2h,
    7d) before now."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def parse(text: str) -> dt.datetime:
        if text and text[-1] in units and text[:-1].isdigit() and text.isascii():
            try:
                return dt.datetime.now(dt.UTC) - dt.timedelta(
                    seconds=int(text[:-1]) * units[text[-1]])
            except (OverflowError, ValueError):  # past year 1, or past int's digits
                raise argparse.ArgumentTypeError(
                    f"{flag} {text[:40]!r} is too far back (before year 1)") from None
        try:
            when = dt.datetime.fromisoformat(text)
            when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
            # in UTC now: year 1 at +14:00 is year 0 in UTC, which neither Python
            # nor the driver can carry to Postgres
            return when.astimezone(dt.UTC)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} {text[:40]!r} is neither an ISO time nor an age like 15m") from None
        except OverflowError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is out of range") from None

    return parse


def connect_node(node: NodeSpec, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg connection to ``node``; failing, a ClusterError naming the node."""
    import psycopg

    try:
        return psycopg.connect(node.dsn, connect_timeout=5, autocommit=True, **kwargs)
    except psycopg.Error as exc:
        raise ClusterError(f"node {node.name} is unreachable: {exc}") from exc
