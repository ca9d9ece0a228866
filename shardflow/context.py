"""Inside a running workflow: step positions, replay, and the durable primitives.

A workflow is replayed from its start every time a worker claims it. Each durable call
(step, transaction, sleep, recv, send, child start/result, set_event, patch) takes the
next position ``seq``; if a checkpoint exists at that position the recorded outcome is
returned without running anything, else the call runs and checkpoints before the
workflow moves on. A recorded step of another name or kind at a position means the code
changed under a running workflow: :class:`NonDeterminismError`, never silent corruption.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from . import checks
from .batcher import TxOutcome
from .driver import Node, Q
from .errors import (
    DatabaseError,
    InvalidArgument,
    MisroutedWrite,
    NonDeterminismError,
    RetryableDatabaseError,
    ShardflowError,
    StepError,
    WorkflowInterrupt,
    is_retryable_sqlstate,
)
from .serde import dumps, error_payload, loads

if TYPE_CHECKING:
    from .engine import Engine

_current: ContextVar[WorkflowContext | None] = ContextVar("shardflow_workflow", default=None)


def current() -> WorkflowContext | None:
    return _current.get()


def require(what: str) -> WorkflowContext:
    ctx = _current.get()
    if ctx is None:
        raise InvalidArgument(f"{what} can only be called inside a workflow")
    return ctx


@dataclass(slots=True)
class Recorded:
    seq: int
    name: str
    kind: str
    status: str
    output: str | None
    error: str | None
    attempts: int
    wake_at: float | None


_MISSING = object()


def _refused(exc: ShardflowError, what: str) -> BaseException:
    """What a checkpoint write the database refused becomes. A data exception
    (SQLSTATE class 22: a value Postgres cannot store; 54: past a limit) is the
    workflow's own: it fails with that error, recorded. Anything else (the shard moved,
    the node is gone) interrupts the run, which resumes from its checkpoints wherever
    the workflow lives now; handing a data error back instead re-ran the workflow until
    it was dead, with its error lost."""
    if (isinstance(exc, DatabaseError)
            and not isinstance(exc, RetryableDatabaseError | MisroutedWrite)
            and (exc.sqlstate or "")[:2] in ("22", "54")):
        return exc
    return WorkflowInterrupt(f"{what} failed: {exc}", release=True)


@dataclass(eq=False)  # hashed by identity: the engine keeps sets of waiting contexts
class WorkflowContext:
    engine: Engine
    tenant: str
    shard: int
    node: Node
    workflow_id: str
    name: str
    fence: int
    recorded: dict[int, Recorded] = field(default_factory=dict)
    seq: int = 0
    # a NonDeterminismError is kept here so the workflow fails with it even if the
    # body catches the exception and carries on
    fatal: BaseException | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.workflow_id)

    def _next(self, name: str, kind: str) -> tuple[int, Recorded | None]:
        seq = self.seq
        self.seq += 1
        rec = self.recorded.get(seq)
        if rec is not None and (rec.name != name or rec.kind != kind):
            err = NonDeterminismError(
                f"workflow {self.workflow_id!r} of tenant {self.tenant!r}: at position {seq} "
                f"the code asked for {kind} {name!r} but the history records "
                f"{rec.kind} {rec.name!r}; use shardflow.patch() to change running code"
            )
            self.fatal = err
            raise err
        return seq, rec

    def _peek(self) -> Recorded | None:
        return self.recorded.get(self.seq)

    @property
    def _cfg(self) -> Any:
        return self.engine.config

    def _fenced_out(self, what: str) -> WorkflowInterrupt:
        return WorkflowInterrupt(
            f"workflow {self.workflow_id!r} is no longer owned by this worker ({what})"
        )

    def _dump(self, value: Any, what: str) -> str:
        return dumps(value, what=what, max_bytes=self._cfg.max_payload_bytes)

    async def _write(self, query: str, *args: Any) -> Any:
        """A checkpoint write. If the database refuses it (the shard moved away, the node
        is gone), the workflow is interrupted, not failed: user code cannot catch that,
        and the workflow resumes from its checkpoints wherever it lives now."""
        try:
            return await self.engine.driver.fetchrow(self.node, query, *args)
        except ShardflowError as exc:
            raise _refused(exc, f"checkpoint write {query}") from exc

    async def _finish_step(self, seq: int, name: str, kind: str, status: str,
                           output: str | None, error: str | None, retries: int = 0) -> None:
        gc = self.engine.group_commit(self.node)
        if gc is None:
            ok = await self._write(
                "step_finished", self.tenant, self.shard, self.workflow_id,
                self.fence, seq, name, kind, status, output, error, retries,
            ) is not None
        else:
            try:
                ok = await gc.step_finished(self.tenant, self.shard, self.workflow_id,
                                            self.fence, seq, name, kind, status, output,
                                            error, retries)
            except ShardflowError as exc:
                raise _refused(exc, f"checkpoint of {kind} {name!r}") from exc
        if not ok:
            raise self._fenced_out(f"checkpoint of {kind} {name!r}")

    async def _step_started(self, seq: int, name: str) -> int | None:
        """Record an attempt of step ``name`` at ``seq``: attempts so far, or None when
        the workflow is no longer ours."""
        gc = self.engine.group_commit(self.node)
        if gc is None:
            row = await self._write("step_started", self.tenant, self.shard,
                                    self.workflow_id, self.fence, seq, name)
            return None if row is None else int(row["attempts"])
        try:
            return await gc.step_started(self.tenant, self.shard, self.workflow_id,
                                         self.fence, seq, name)
        except ShardflowError as exc:
            raise _refused(exc, f"start of step {name!r}") from exc

    def _backoff(self, attempt: int) -> float:
        return float(min(self._cfg.step_backoff_max, self._cfg.step_backoff_base * 2**attempt))

    # -- steps -----------------------------------------------------------------------

    async def run_step(self, fn: Callable[..., Awaitable[Any]], name: str, retries: int,
                       args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        seq, rec = self._next(name, "step")
        if rec is not None and rec.status == "done":
            return loads(rec.output)
        if rec is not None and rec.status == "error":
            raise StepError(name, loads(rec.error), seq=seq)
        t0 = time.perf_counter()
        try:
            with self.engine.span(f"step {name}", **{"shardflow.tenant": self.tenant,
                                                     "shardflow.workflow_id":
                                                     self.workflow_id, "shardflow.seq": seq}):
                return await self._run_step(fn, seq, name, retries, args, kwargs)
        finally:
            self.engine.prom.step_seconds.labels("step").observe(time.perf_counter() - t0)

    async def _run_step(self, fn: Callable[..., Awaitable[Any]], seq: int, name: str,
                        retries: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Record the attempt before running: after a crash the next run increments
        # attempts, so every re-run of an external side effect is counted.
        attempts = await self._step_started(seq, name)
        if attempts is None:
            raise self._fenced_out(f"start of step {name!r}")
        if attempts > 1:
            self.engine.metrics["step_reruns"] += 1
        attempt = 0
        while True:
            try:
                result = await fn(*args, **kwargs)
                out = self._dump(result, f"result of step {name!r}")
                break
            except (ShardflowError, Exception) as exc:
                if isinstance(exc, InvalidArgument) or attempt >= retries:
                    payload = error_payload(exc)
                    await self._finish_step(seq, name, "step", "error", None,
                                            json.dumps(payload), attempt)
                    raise StepError(name, payload, seq=seq) from exc
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1
        await self._finish_step(seq, name, "step", "done", out, None, attempt)
        return json.loads(out)

    async def run_transaction(self, fn: Callable[..., Awaitable[Any]], name: str,
                              retries: int, args: tuple[Any, ...],
                              kwargs: dict[str, Any]) -> Any:
        seq, rec = self._next(name, "transaction")
        if rec is not None:
            return self._replay(rec)
        t0 = time.perf_counter()
        try:
            with self.engine.span(f"transaction {name}", **{
                    "shardflow.tenant": self.tenant, "shardflow.workflow_id":
                    self.workflow_id, "shardflow.seq": seq}):
                return await self._run_transaction(fn, seq, name, retries, args, kwargs)
        finally:
            self.engine.prom.step_seconds.labels("transaction").observe(
                time.perf_counter() - t0)

    async def _run_transaction(self, fn: Callable[..., Awaitable[Any]], seq: int, name: str,
                               retries: int, args: tuple[Any, ...],
                               kwargs: dict[str, Any]) -> Any:
        tb = self.engine.tx_batcher(self.node)
        if tb is None:
            return await self._run_transaction_alone(fn, seq, name, retries, args, kwargs)

        async def step(conn: asyncpg.Connection) -> str:
            return self._dump(await fn(conn, *args, **kwargs),
                              f"result of transaction {name!r}")

        attempt = transient = 0
        while True:
            try:
                outcome = await tb.run(self.tenant, self.shard, self.workflow_id, self.fence,
                                       seq, name, step)
                exc: BaseException | None = outcome.error
            except RetryableDatabaseError as err:  # the whole group failed (connection)
                outcome, exc = TxOutcome("error"), err
            except ShardflowError as err:
                raise WorkflowInterrupt(f"transaction {name!r}: {err}", release=True) from err
            if outcome.kind == "ok":
                return json.loads(outcome.output or "null")
            if outcome.kind == "recorded":
                return await self._reload(seq)
            if outcome.kind == "fenced":
                raise self._fenced_out(f"checkpoint of transaction {name!r}")
            if isinstance(exc, RetryableDatabaseError):
                # not the step's fault (a deadlock victim, a dropped connection): retried,
                # bounded, then the workflow is left to recovery
                transient += 1
                if transient > 10:
                    raise WorkflowInterrupt(f"transaction {name!r}: {exc}", release=True
                                            ) from exc
                await asyncio.sleep(self._backoff(transient))
                continue
            assert exc is not None
            if isinstance(exc, InvalidArgument) or attempt >= retries:
                payload = error_payload(exc)
                await self._finish_step(seq, name, "transaction", "error", None,
                                        json.dumps(payload), attempt)
                raise StepError(name, payload, seq=seq) from exc
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1

    async def _run_transaction_alone(self, fn: Callable[..., Awaitable[Any]], seq: int,
                                     name: str, retries: int, args: tuple[Any, ...],
                                     kwargs: dict[str, Any]) -> Any:
        """The transaction step in a transaction of its own (group commit off, Citus)."""
        attempt = transient = 0
        while True:
            try:
                async with self.engine.driver.transaction(self.node) as conn:
                    result = await fn(conn, *args, **kwargs)
                    out = self._dump(result, f"result of transaction {name!r}")
                    try:
                        # A plain INSERT, no ON CONFLICT: if another run already
                        # checkpointed this position, the unique violation aborts this
                        # transaction and with it the user's writes: exactly once.
                        ok = await conn.fetchrow(
                            Q["insert_step_strict"], self.tenant, self.shard,
                            self.workflow_id, self.fence, seq, name, "transaction", "done",
                            out, None, None,
                        )
                    except asyncpg.UniqueViolationError:
                        raise _AlreadyRecorded() from None
                    except asyncpg.PostgresError as exc:
                        if is_retryable_sqlstate(exc.sqlstate):
                            # a deadlock victim (e.g. of a shard move taking locks on
                            # this node): rolled back, and retried below
                            raise
                        # the checkpoint itself was refused (e.g. the shard moved away):
                        # not the step's fault; the rollback undoes the user's writes
                        raise WorkflowInterrupt(f"checkpoint of {name!r} refused: {exc}",
                                                release=True) from exc
                    if ok is None:
                        raise self._fenced_out(f"checkpoint of transaction {name!r}")
                return json.loads(out)
            except _AlreadyRecorded:
                return await self._reload(seq)
            except WorkflowInterrupt:
                raise
            except RetryableDatabaseError as exc:
                # a deadlock victim, a serialization failure, a dropped connection: not
                # the step's fault, and retrying is safe (the checkpoint insert makes the
                # step exactly once). Bounded, then the workflow is left to recovery.
                transient += 1
                if transient > 10:
                    raise WorkflowInterrupt(f"transaction {name!r}: {exc}", release=True
                                            ) from exc
                await asyncio.sleep(self._backoff(transient))
            except Exception as exc:
                if isinstance(exc, InvalidArgument) or attempt >= retries:
                    payload = error_payload(exc)
                    await self._finish_step(seq, name, "transaction", "error", None,
                                            json.dumps(payload), attempt)
                    raise StepError(name, payload, seq=seq) from exc
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1

    def _replay(self, rec: Recorded) -> Any:
        if rec.status == "error":
            raise StepError(rec.name, loads(rec.error), seq=rec.seq)
        return loads(rec.output)

    async def _reload(self, seq: int) -> Any:
        rows = await self.engine.driver.fetch(
            self.node, "load_steps", self.tenant, self.shard, self.workflow_id
        )
        for r in rows:
            if r["seq"] == seq:
                return self._replay(_recorded(r))
        raise self._fenced_out(f"reload of step {seq}")

    # -- durable sleep -----------------------------------------------------------------

    async def sleep(self, seconds: float) -> None:
        seconds = checks.seconds(seconds, "sleep seconds")
        seq, rec = self._next("sleep", "sleep")
        if rec is not None:
            wake = float(loads(rec.output))
        else:
            wake = time.time() + float(seconds)
            await self._finish_step(seq, "sleep", "sleep", "done", json.dumps(wake), None)
        await self._wait_until(wake)

    async def _wait_until(self, wake: float) -> None:
        remaining = wake - time.time()
        if remaining > self._cfg.suspend_after:
            await self.suspend(wake)
        if remaining > 0:
            await asyncio.sleep(remaining)

    async def suspend(self, until: float) -> None:
        """Release the workflow until ``until``; a message sent to it wakes it earlier."""
        async with self.engine.driver.transaction(self.node) as conn:
            row = await conn.fetchrow(
                Q["suspend_workflow"], self.tenant, self.shard, self.workflow_id, self.fence,
                until,
            )
            if row is None:
                raise self._fenced_out("suspend")
            # A message committed before we took the row lock is seen by this new
            # statement; one committed after must wait for our lock and then wakes us
            # (see send): no message can be missed while we are parked.
            await conn.execute(Q["wake_if_messages"], self.tenant, self.shard,
                               self.workflow_id)
        raise WorkflowInterrupt("suspended")

    # -- messages ------------------------------------------------------------------------

    async def recv(self, topic: str, timeout: float) -> Any:
        checks.text(topic, "recv topic")
        timeout = checks.seconds(timeout, "recv timeout")
        name = f"recv:{topic}"
        seq, rec = self._next(name, "recv")
        if rec is not None and rec.status == "done":
            return loads(rec.output)["message"]
        if rec is None:
            deadline = time.time() + float(timeout)
            await self._finish_step(seq, name, "recv", "waiting",
                                    json.dumps({"deadline": deadline}), None)
        else:
            deadline = float(loads(rec.output)["deadline"])
        self.engine.register_waiter(self)
        try:
            while True:
                got = await self._take(seq, topic)
                if got is not _MISSING:
                    return got
                remaining = deadline - time.time()
                if remaining <= 0:
                    await self._complete_recv(seq, None)
                    return None
                if remaining > self._cfg.suspend_after:
                    await self.suspend(deadline)
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(),
                                           min(remaining, self._cfg.poll_interval))
        finally:
            self.engine.unregister_waiter(self)

    async def _take(self, seq: int, topic: str) -> Any:
        async with self.engine.driver.transaction(self.node) as conn:
            if await conn.fetchrow(Q["lock_fence"], self.tenant, self.shard,
                                   self.workflow_id, self.fence) is None:
                raise self._fenced_out("recv")
            msg = await conn.fetchrow(Q["take_message"], self.tenant, self.shard,
                                      self.workflow_id, topic)
            if msg is None:
                return _MISSING
            # The message is deleted in the transaction that checkpoints it: it is
            # delivered exactly once, also when two recoverers race (dbos-ts#1205).
            payload = loads(msg["payload"])
            await conn.execute(Q["update_step_done"], self.tenant, self.shard,
                               self.workflow_id, seq, json.dumps({"message": payload}))
            return payload

    async def _complete_recv(self, seq: int, payload: Any) -> None:
        async with self.engine.driver.transaction(self.node) as conn:
            if await conn.fetchrow(Q["lock_fence"], self.tenant, self.shard,
                                   self.workflow_id, self.fence) is None:
                raise self._fenced_out("recv timeout")
            await conn.execute(Q["update_step_done"], self.tenant, self.shard,
                               self.workflow_id, seq, json.dumps({"message": payload}))

    async def send(self, tenant: str, workflow_id: str, topic: str, message: Any) -> None:
        checks.text(topic, "topic")
        checks.text(workflow_id, "workflow_id")
        seq, rec = self._next(f"send:{topic}", "send")
        if rec is not None:
            return
        # The idempotency key makes a re-run of this send (after a crash between the
        # message insert and the checkpoint) insert nothing the second time.
        # length-prefixed: tenants may contain '/', and ('a/b', 'c') must not make
        # the same key as ('a', 'b/c')
        key = f"{len(self.tenant)}:{self.tenant}/{self.workflow_id}/{seq}"
        await self.engine.send(tenant, workflow_id, topic, message, idempotency_key=key,
                               _from_workflow=True)
        await self._finish_step(seq, f"send:{topic}", "send", "done", "null", None)

    # -- events ----------------------------------------------------------------------

    async def set_event(self, key: str, value: Any) -> None:
        checks.text(key, "event key")
        name = f"event:{key}"
        seq, rec = self._next(name, "set_event")
        if rec is not None:
            return
        payload = self._dump(value, f"value of event {key!r}")
        try:
            async with self.engine.driver.transaction(self.node) as conn:
                # the workflow row first, like every worker transaction: a shard move
                # locks the shard's tables in the same order and cannot deadlock with us
                if await conn.fetchrow(Q["lock_fence"], self.tenant, self.shard,
                                       self.workflow_id, self.fence) is None:
                    raise self._fenced_out(f"set_event {key!r}")
                await conn.execute(Q["set_event"], self.tenant, self.shard,
                                   self.workflow_id, key, payload)
                try:
                    ok = await conn.fetchrow(
                        Q["insert_step_strict"], self.tenant, self.shard, self.workflow_id,
                        self.fence, seq, name, "set_event", "done", "null", None, None,
                    )
                except asyncpg.UniqueViolationError:
                    raise _AlreadyRecorded() from None
                if ok is None:
                    raise self._fenced_out(f"set_event {key!r}")
        except _AlreadyRecorded:
            return

    # -- versioning ------------------------------------------------------------------

    async def patch(self, name: str) -> bool:
        """True when this execution runs the patched code path.

        New executions record a patch marker and take the new path. A replay of a
        workflow that started before the patch finds another step at this position
        (or nothing left), takes the old path and consumes no position.
        """
        checks.text(name, "patch name")
        rec = self._peek()
        if rec is not None:
            if rec.kind == "patch" and rec.name == f"patch:{name}":
                self.seq += 1
                return True
            return False
        seq, _ = self._next(f"patch:{name}", "patch")
        await self._finish_step(seq, f"patch:{name}", "patch", "done", "true", None)
        return True

    # -- child workflows -------------------------------------------------------------

    async def start_child(self, name: str, inputs: str, workflow_id: str | None,
                          queue: str, priority: int, timeout: float | None) -> str:
        seq, rec = self._next(f"child:{name}", "child")
        if rec is not None:
            return str(loads(rec.output))
        child_id = workflow_id or f"{self.workflow_id[:240]}.c{seq}"
        max_attempts = self.engine.max_attempts_of(name)
        try:
            async with self.engine.driver.transaction(self.node) as conn:
                # the child row and the parent's checkpoint commit together: a child is
                # started exactly once whatever crashes. The checkpoint first: if another
                # run recorded this position, its child is the one (not "id taken").
                try:
                    ok = await conn.fetchrow(
                        Q["insert_step_strict"], self.tenant, self.shard, self.workflow_id,
                        self.fence, seq, f"child:{name}", "child", "done",
                        json.dumps(child_id), None, None,
                    )
                except asyncpg.UniqueViolationError:
                    raise _AlreadyRecorded() from None
                if ok is None:
                    raise self._fenced_out(f"start of child {child_id!r}")
                inserted = await conn.fetchrow(
                    Q["insert_workflow"], self.tenant, self.shard, child_id, name, queue,
                    priority, inputs, self.workflow_id, max_attempts, timeout, 0.0,
                    self._cfg.notify,
                )
                if inserted is None:
                    # an existing workflow is not this parent's child: adopting it would
                    # hand this workflow another's result (the rollback undoes the
                    # checkpoint)
                    raise InvalidArgument(
                        f"child workflow_id {child_id!r} of tenant {self.tenant!r} is "
                        "already used by another workflow")
        except _AlreadyRecorded:
            return str(await self._reload(seq))
        self.engine.wake_workers(self.shard)
        return child_id

    async def child_result(self, tenant: str, child_id: str, timeout: float | None) -> Any:
        """Wait for another workflow (a child, or any workflow of any tenant) and
        checkpoint its outcome, so a replay sees the same result."""
        name = f"child_result:{child_id}"
        seq, rec = self._next(name, "child_result")
        if rec is None:
            outcome = await self.engine.wait_terminal(tenant, child_id, timeout)
            await self._finish_step(seq, name, "child_result", "done",
                                    json.dumps(outcome), None)
        else:
            outcome = loads(rec.output)
        return self.engine.outcome_value(tenant, child_id, outcome)


class _AlreadyRecorded(Exception):
    """Another execution already checkpointed this position."""


def _recorded(r: Any) -> Recorded:
    return Recorded(r["seq"], r["name"], r["kind"], r["status"], r["output"], r["error"],
                    r["attempts"], r["wake_at"])


def recorded_steps(rows: list[Any]) -> dict[int, Recorded]:
    return {r["seq"]: _recorded(r) for r in rows}


# -- the public functions used inside workflow code -----------------------------------------

async def sleep(seconds: float) -> None:
    """Durable sleep: survives restarts; a long sleep frees the worker meanwhile."""
    await require("shardflow.sleep").sleep(seconds)


async def recv(topic: str, timeout: float = 60.0) -> Any:
    """Receive the next message sent to this workflow on ``topic``, or None at timeout."""
    return await require("shardflow.recv").recv(topic, timeout)


async def set_event(key: str, value: Any) -> None:
    """Publish ``value`` under ``key`` for this workflow (read with ``engine.get_event``)."""
    await require("shardflow.set_event").set_event(key, value)


async def patch(name: str) -> bool:
    """Branch on a code change without breaking workflows already in flight."""
    return await require("shardflow.patch").patch(name)


def workflow_id() -> str:
    """The id of the running workflow."""
    return require("shardflow.workflow_id").workflow_id


def tenant() -> str:
    """The tenant of the running workflow."""
    return require("shardflow.tenant").tenant
