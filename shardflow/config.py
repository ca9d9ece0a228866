"""Engine configuration: a frozen, keyword-only dataclass with validated defaults.

Also the number checks every boundary shares (``number_problem``, ``check_number``):
the CLI, the bench and ``EngineConfig.validate`` refuse the same things the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, ShardflowError

INT32_MAX = 2**31 - 1
"""Largest value of a Postgres ``int``: a larger count sent as a parameter fails in the
server (or, as a LIMIT, is silently clamped), so every int setting stays below it."""

MAX_SECONDS = 10 * 365 * 86400
"""Ten years: every "seconds" setting and argument stays below. Durations are added to
``now()`` in Postgres; 1e300 seconds (or inf) overflows the timestamp there, and it
does so in a worker's background loop, where it fails forever instead of once here."""

# Bounds tighter than int32 where a huge value is harmful before Postgres sees it: the
# pool preallocates a slot per connection (a million made a worker spin for minutes)
# and Postgres accepts at most a few hundred connections per node anyway.
_INT_MAX = {"pool_size": 1000}


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def number_problem(value: object, *, integer: bool = False, low: float = 0,
                   high: float = INT32_MAX, low_open: bool = False) -> str | None:
    """What is wrong with ``value`` as a number in ``low``..``high`` (``low_open``:
    ``low`` itself excluded), phrased to follow a name ("must be ..."); None when it
    is fine. bool is refused (JSON ``true`` is not 1), so are NaN and +-inf, which pass
    every ``<= 0`` check and reach Postgres; ``integer`` refuses floats."""
    bounds = f"{'>' if low_open else '>='} {_fmt(low)} and <= {_fmt(high)}"
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number (int or float)"
        return f"must be {kind} {bounds}, got {type(value).__name__} {value!r}"
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        return f"must be {bounds}, got {value!r}"
    return None


def check_number(name: str, value: object, *, integer: bool = False, low: float = 0,
                 high: float = INT32_MAX, low_open: bool = False,
                 error: type[ShardflowError] = ConfigError) -> None:
    """Raise ``error`` naming ``name`` when ``number_problem`` finds one."""
    problem = number_problem(value, integer=integer, low=low, high=high, low_open=low_open)
    if problem:
        raise error(f"{name} {problem}")


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineConfig:
    lease_timeout: float = 2.0
    """Seconds after a worker's last heartbeat before its workflows are recovered by
    another worker. Bounds recovery time after a crash. Defaults to 2.0."""

    heartbeat_interval: float = 0.5
    """Seconds between a worker's heartbeats (one write per node, for all its
    workflows). Must be well under ``lease_timeout``. Defaults to 0.5."""

    poll_interval: float = 0.25
    """Seconds an idle worker waits before polling a node for work again; a start in the
    same process wakes it at once. Defaults to 0.25."""

    sweep_interval: float = 1.0
    """Seconds between claims that visit every shard a worker owns. In between, claims
    visit only shards known to have work (a NOTIFY, a local start, a full batch): a
    visit of all ~100 shards of a node costs ~10 ms of database CPU. Bounds the delay of
    work that sends no notification (a sleep coming due, a start with notify off).
    Defaults to 1.0."""

    recovery_interval: float = 0.5
    """Seconds between sweeps for workflows orphaned by dead workers. Defaults to 0.5."""

    claim_batch: int = 64
    """Most workflows claimed from one node in one query. Defaults to 64."""

    per_tenant_batch: int = 8
    """Most workflows of one tenant taken by one claim: claims visit tenants in turn, so
    a tenant with a huge backlog cannot starve one with a single workflow. Defaults
    to 8."""

    tenant_concurrency: int | None = None
    """Most workflows of one tenant running at once on one shard owner (None: no
    limit). Defaults to None."""

    notify: bool = True
    """Send NOTIFY on start so the shard's owner claims at once instead of at its next
    poll. Turn off behind a transaction-pooling PgBouncer. Defaults to True."""

    max_concurrency: int = 512
    """Most workflows one worker process runs at once. Defaults to 512."""

    pool_size: int = 10
    """Connections per node in each process's pool. Defaults to 10."""

    max_payload_bytes: int = 1_000_000
    """Largest serialized argument list, step result or workflow result. Defaults to
    1,000,000 bytes."""

    max_attempts: int = 20
    """Runs of one workflow that may be lost (its worker died, its run crashed or was
    handed back) before it is moved to the dead-letter status ``dead``. A run that
    parks itself (a durable sleep or recv past ``suspend_after``, a graceful stop)
    gives its attempt back: waiting and messages never count. Defaults to 20."""

    suspend_after: float = 5.0
    """A durable sleep or recv wait longer than this many seconds releases the workflow
    (status pending until it is due) instead of holding a worker slot. Defaults to 5.0."""

    step_backoff_base: float = 0.1
    """First retry delay of a failing step, doubled each retry. Defaults to 0.1."""

    step_backoff_max: float = 10.0
    """Largest retry delay of a failing step. Defaults to 10.0."""

    reconnect_timeout: float = 30.0
    """Seconds a call (a start, a checkpoint write, a read) keeps retrying a node it
    cannot reach (a restart, a primary failing over) with jittered exponential backoff
    before it raises. Retried operations are idempotent by design (starts and
    checkpoints are keyed by their ids, fenced writes match one row). The worker's
    background loops retry for a second and try again on their next tick. Defaults
    to 30."""

    retention_interval: float = 10.0
    """Seconds between a worker's passes deleting expired finished workflows from the
    shards it owns (see ``Engine.set_retention``; nothing is deleted unless a retention
    is set). Defaults to 10."""

    group_commit: bool = True
    """Gather the checkpoint writes of all workflows running on one node (steps started
    and finished, workflows finished; starts; transaction steps, each in a savepoint)
    into one transaction while the previous one commits: one commit for many
    workflows, each still waiting for its own checkpoint to be durable (see
    shardflow/batcher.py). Off: one transaction per checkpoint. Ignored on Citus.
    Defaults to True."""

    group_commit_max: int = 1000
    """Most checkpoint writes in one group commit. Defaults to 1000."""

    tx_group_max: int = 50
    """Most transaction steps run in one transaction (each in a savepoint of its own)
    when group commit is on: they run one after another on one connection, so a slow
    one delays the others of its group. Past 64 subtransactions in one transaction
    every snapshot in the server gets slower. Defaults to 50."""

    vacuum_after_purged: int = 200
    """Workflows purged from one shard before the worker VACUUMs its partitions (and
    at most a minute after its first purge): small partitions see too few deletes for
    autovacuum to visit them in time, and until a VACUUM the freed space is not reused
    (see migration 0007). Each VACUUM also makes the hot statements replan (0009), so
    not after every few rows. Defaults to 200."""

    connect_timeout: float = 30.0
    """Seconds ``Engine`` start keeps retrying nodes that are briefly down. Defaults to 30."""

    tracing: bool = False
    """OpenTelemetry spans for every workflow run and step (``workflow <name>``,
    ``step <name>``, ``transaction <name>``, with tenant, workflow id, attempt), through
    the globally configured tracer provider. Needs ``opentelemetry-api``
    (``pip install 'shardflow[otel]'``). Defaults to False."""

    migrate: bool = True
    """Apply pending migrations on every node when the engine opens. Defaults to True."""

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_mapping(cls, data: object, *, source: str = "EngineConfig") -> EngineConfig:
        """An EngineConfig from a mapping of field names (``--engine-config`` JSON): an
        unknown name is refused naming it and ``source``, not as a TypeError of
        ``__init__``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must be a JSON object of EngineConfig fields, "
                              f"got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ConfigError(f"{source}: {unknown[0]!r} is not an EngineConfig field "
                              f"(fields: {', '.join(known)})")
        fields: dict[str, Any] = dict(data)
        return cls(**fields)

    def validate(self) -> None:
        # Each field by its declared type (annotations are strings here: see the
        # __future__ import). A value from JSON or a dict can be anything: "2" for a
        # timeout would otherwise fail later, in a comparison or a worker, unnamed.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            name = f"EngineConfig.{f.name}"
            kind = str(f.type)
            if kind == "bool":
                if not isinstance(value, bool):
                    raise ConfigError(f"{name} must be true or false, got "
                                      f"{type(value).__name__} {value!r}")
            elif kind.startswith("int"):
                if value is None and "None" in kind:
                    continue
                check_number(name, value, integer=True, low=1,
                             high=_INT_MAX.get(f.name, INT32_MAX))
            else:  # float: every float field is a number of seconds
                check_number(name, value, low=0, low_open=True, high=MAX_SECONDS)
        if self.heartbeat_interval >= self.lease_timeout:
            raise ConfigError(
                f"EngineConfig.heartbeat_interval ({self.heartbeat_interval}) must be less "
                f"than lease_timeout ({self.lease_timeout})"
            )
