"""Driver errors map to shardflow errors at the boundary; the ones that mean "the server
went away or is not the primary yet" (a failover) must be retryable, or a failover
fails workflows and starts instead of waiting for the new primary."""

from __future__ import annotations

import asyncpg
import psycopg
import pytest

from shardflow.errors import DatabaseError, RetryableDatabaseError, translate


@pytest.mark.parametrize("exc", [
    asyncpg.exceptions.TargetServerAttributeNotMatched(
        'None of the hosts match the target attribute requirement "read-write"'),
    asyncpg.InterfaceError("cannot perform operation: connection is closed"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle "
                                                   "of operation"),
    asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in "
                                "progress"),
    ConnectionRefusedError(111, "Connect call failed"),
    TimeoutError(),
    psycopg.OperationalError("connection failed: Connection refused"),
    asyncpg.exceptions.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only "
                                                   "transaction"),
])
def test_lost_connections_are_retryable(exc: BaseException) -> None:
    err = translate(exc, context="start on node node0")
    assert isinstance(err, RetryableDatabaseError), (type(exc), err)
    assert str(err).startswith("start on node node0: ")


@pytest.mark.parametrize("exc", [
    asyncpg.exceptions.UniqueViolationError("duplicate key"),
    asyncpg.InterfaceError("the number of query arguments cannot exceed 32767"),
    asyncpg.exceptions.UndefinedTableError("relation does not exist"),
])
def test_other_errors_are_not(exc: BaseException) -> None:
    err = translate(exc)
    assert isinstance(err, DatabaseError) and not isinstance(err, RetryableDatabaseError)


@pytest.mark.parametrize("exc, line", [
    (psycopg.OperationalError('connection failed: connection to server at "127.0.0.1", '
                              "port 1 failed: Connection refused\n\tIs the server running?"),
     'OperationalError: connection failed: connection to server at "127.0.0.1", port 1 '
     "failed: Connection refused Is the server running?"),
    (DatabaseError("node node0:\n  relation does not exist"),
     "node node0: relation does not exist"),
    (ValueError("--rate must be > 0, got nan"), "--rate must be > 0, got nan"),
    (TimeoutError(), "TimeoutError"),
    (RuntimeError("cannot reach postgresql://app:s3cret@db:5432/x"),
     "RuntimeError: cannot reach postgresql://app:***@db:5432/x"),
])
def test_cli_error_line_is_one_line(exc: BaseException, line: str) -> None:
    """The CLI's error line: whitespace collapsed (libpq's messages span lines), the
    type named unless the message is written for users, passwords redacted."""
    from shardflow.cliutil import error_line

    assert error_line(exc) == line
