"""Every error shardflow raises on purpose derives from :class:`ShardflowError`.

The tree::

    ShardflowError
    ├── ConfigError                 bad configuration (names the field)
    ├── ClusterError                local cluster manager: binaries, ports, data dirs
    │   └── ClusterFileError        missing or corrupt cluster file
    ├── InvalidArgument             bad input at an API boundary (names the argument)
    │   ├── InvalidTenant           tenant id of the wrong type, empty or too long
    │   ├── SerializationError      arguments/results that cannot be serialized
    │   ├── PayloadTooLarge         serialized payload over ``max_payload_bytes``
    │   └── UnknownWorkflowName     ``start`` of a name this engine did not register
    ├── RoutingError                shard map disagrees with the nodes, node missing
    ├── DatabaseError               a driver error translated at the boundary
    │   ├── RetryableDatabaseError  SQLSTATE class 08, 40001, 40P01, 57P01..: safe to retry
    │   └── MisroutedWrite          a row reached a node that does not own its shard
    ├── WorkflowNotFound            no workflow with that (tenant, id)
    ├── WorkflowFailed              ``result()`` of a failed/cancelled/dead workflow
    │   └── WorkflowCancelled
    ├── NonDeterminismError         replay asked for another step than the one recorded
    ├── LeaseLost                   another worker took the workflow over (fencing)
    └── StepError                   a step failed after all its retries

    BaseException
    └── WorkflowInterrupt           raised inside a workflow to unwind it when it is
                                    cancelled or suspended; derives from BaseException so
                                    user ``except Exception`` blocks cannot swallow it.

Driver errors are translated by SQLSTATE in :func:`translate`, keeping ``__cause__``.
"""

from __future__ import annotations

from typing import Any


class ShardflowError(Exception):
    """Root of every error shardflow raises on purpose."""


class ConfigError(ShardflowError):
    """A configuration value is invalid; the message names the field."""


class ClusterError(ShardflowError):
    """The local cluster manager cannot do what was asked."""


class ClusterFileError(ClusterError):
    """The cluster file is missing, unreadable or corrupt."""


class InvalidArgument(ShardflowError, ValueError):
    """Bad input at an API boundary; the message names the argument."""


class InvalidTenant(InvalidArgument):
    """A tenant id of the wrong type, empty, too long or with forbidden characters."""


class SerializationError(InvalidArgument):
    """A value cannot be serialized to JSON; the message says which one."""


class PayloadTooLarge(InvalidArgument):
    """A serialized payload is larger than ``EngineConfig.max_payload_bytes``."""


class UnknownWorkflowName(InvalidArgument):
    """``start`` was given a workflow name this engine has not registered."""


class RoutingError(ShardflowError):
    """The shard map and the nodes disagree, or a node is missing."""


class DatabaseError(ShardflowError):
    """A database error, translated at the boundary. ``sqlstate`` keeps the code."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class RetryableDatabaseError(DatabaseError):
    """Connection loss, serialization failure, deadlock, shutdown: safe to retry."""


class MisroutedWrite(DatabaseError):
    """A row was sent to a node that does not hold its shard, and Postgres refused it."""


class WorkflowNotFound(ShardflowError, LookupError):
    """No workflow with that tenant and id."""

    def __init__(self, tenant: str, workflow_id: str) -> None:
        super().__init__(f"no workflow {workflow_id!r} for tenant {tenant!r}")
        self.tenant = tenant
        self.workflow_id = workflow_id


class WorkflowFailed(ShardflowError):
    """The workflow ended in a state other than success."""

    def __init__(self, tenant: str, workflow_id: str, status: str, error: Any) -> None:
        detail = error.get("message") if isinstance(error, dict) else error
        super().__init__(
            f"workflow {workflow_id!r} of tenant {tenant!r} ended {status}: {detail}"
        )
        self.tenant = tenant
        self.workflow_id = workflow_id
        self.status = status
        self.error = error


class WorkflowCancelled(WorkflowFailed):
    """The workflow was cancelled (or timed out)."""


class NonDeterminismError(ShardflowError):
    """On replay the workflow asked for a different step than the one recorded."""


class LeaseLost(ShardflowError):
    """This worker no longer holds the workflow: another worker took over (fencing)."""


class StepError(ShardflowError):
    """A step failed after all its retries; ``error`` is the recorded error."""

    def __init__(self, step: str, error: dict[str, Any], *, seq: int | None = None) -> None:
        super().__init__(f"step {step!r} failed: {error.get('type')}: {error.get('message')}")
        self.step = step
        self.error = error
        # the step's position: a workflow that this failure ended records it, so that
        # resume re-runs exactly that step
        self.seq = seq


class WorkflowInterrupt(BaseException):
    """Unwinds a workflow coroutine that was cancelled, suspended or fenced off.

    A BaseException on purpose: a workflow body's ``except Exception`` must not be
    able to swallow it and carry on writing checkpoints.
    """

    def __init__(self, reason: str, *, release: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        # True when this worker still owns the workflow but cannot go on (a checkpoint
        # write failed): it must hand the workflow back, or it would stay "running"
        # under a live owner and never be recovered.
        self.release = release


# SQLSTATEs after which the same operation may simply be tried again: every
# operation shardflow sends is idempotent by design (keys, fences, ON CONFLICT).
_RETRYABLE_STATES = {"40001", "40P01", "57P01", "57P02", "57P03", "55P03", "25006"}


def is_retryable_sqlstate(sqlstate: str | None) -> bool:
    if not sqlstate:
        return False
    return sqlstate.startswith("08") or sqlstate in _RETRYABLE_STATES


def _lost_connection(exc: BaseException) -> bool:
    """A driver error that means "the server went away or is not the primary (yet)":
    a failover, a restart, a dropped link. Such errors carry no SQLSTATE. Checked by
    class name so that this module needs neither driver."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"ConnectionError", "OSError", "TimeoutError",
                # asyncpg: no member of a multi-host DSN is read-write (mid-failover),
                # or a pooled connection left in a broken protocol state by a server
                # that died mid-operation ("cannot switch to state ..."); the driver
                # replaces the pool's connections before retrying
                "TargetServerAttributeNotMatched", "InternalClientError",
                # psycopg: connection failed or broken
                "OperationalError"}:
        return True
    # asyncpg: an operation on a connection the server closed under it
    return "InterfaceError" in names and "connection" in str(exc) and (
        "closed" in str(exc) or "lost" in str(exc))


def translate(exc: BaseException, *, context: str = "") -> ShardflowError:
    """Map a driver exception (asyncpg or psycopg) to a shardflow error by SQLSTATE."""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is None:
        diag = getattr(exc, "diag", None)
        sqlstate = getattr(diag, "sqlstate", None)
    prefix = f"{context}: " if context else ""
    msg = f"{prefix}{exc}"
    err: ShardflowError
    if sqlstate == "23514" and ("no partition of relation" in str(exc)
                                or "_moved_away" in str(exc)):
        err = MisroutedWrite(msg, sqlstate=sqlstate)
    elif is_retryable_sqlstate(sqlstate) or (sqlstate is None and _lost_connection(exc)):
        err = RetryableDatabaseError(msg, sqlstate=sqlstate)
    else:
        err = DatabaseError(msg, sqlstate=sqlstate)
    err.__cause__ = exc
    return err
