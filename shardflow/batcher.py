"""Group commit: a worker's checkpoint writes on one node, many workflows per commit.

Each running workflow still awaits its own checkpoint before it goes on, so nothing it
did is acknowledged before it is durable. What changes is how the writes reach the
database: while one batch commits, the next one gathers every checkpoint the other
workflows ask for, and goes as a single call of ``shardflow.checkpoint_batch``
(migration 0008): one round trip, one transaction, one WAL flush for all of them,
instead of one each. Under load the batches grow by themselves (the slower the commit,
the more is waiting for the next one); with one workflow running it costs nothing, the
batch just holds one write.

Rows are written with the same rules as the single-row statements (fence and status
checked against the workflow row, read FOR SHARE), so a batch never writes for a
workflow that another worker took over. Used on plain Postgres nodes; on Citus every
write goes on its own (a statement spanning shards would go through the coordinator).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from .driver import DRIVER_ERRORS, Q
from .errors import DatabaseError, RetryableDatabaseError, ShardflowError, translate

if TYPE_CHECKING:
    from .driver import Driver, Node

log = logging.getLogger("shardflow.batcher")

STEP_STARTED, STEP_FINISHED, WORKFLOW_FINISHED = 1, 2, 3


def _closed(what: str) -> ShardflowError:
    return ShardflowError(f"the engine closed before {what} was written")


def _fail(futures: list[asyncio.Future[Any]], exc: BaseException) -> None:
    for f in futures:
        if not f.done():
            f.set_exception(exc)


def _spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    # an empty context: the flusher serves every workflow, it must not carry (and keep
    # alive) the context of whichever one happened to start it
    return asyncio.create_task(coro, name=name, context=contextvars.Context())
_WIDTH = {STEP_STARTED: 6, STEP_FINISHED: 11, WORKFLOW_FINISHED: 7}


@dataclass(slots=True)
class _Batch:
    rows: dict[int, list[tuple[Any, ...]]] = field(
        default_factory=lambda: {STEP_STARTED: [], STEP_FINISHED: [], WORKFLOW_FINISHED: []})
    futures: dict[int, list[asyncio.Future[int | None]]] = field(
        default_factory=lambda: {STEP_STARTED: [], STEP_FINISHED: [], WORKFLOW_FINISHED: []})
    size: int = 0


class GroupCommit:
    """The checkpoint writer of one node in one process."""

    def __init__(self, driver: Driver, node: Node, *, max_batch: int) -> None:
        self.driver = driver
        self.node = node
        self.max_batch = max_batch
        self._next = _Batch()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        # figures for the bench and metrics: batches written and rows in them
        self.batches = 0
        self.rows = 0

    async def step_started(self, tenant: str, shard: int, workflow_id: str, fence: int,
                           seq: int, name: str) -> int | None:
        """Attempts of the step so far (1 on its first run), or None if fenced out."""
        return await self._submit(STEP_STARTED,
                                  (tenant, shard, workflow_id, fence, seq, name))

    async def step_finished(self, tenant: str, shard: int, workflow_id: str, fence: int,
                            seq: int, name: str, kind: str, status: str,
                            output: str | None, error: str | None, retries: int) -> bool:
        return await self._submit(STEP_FINISHED, (
            tenant, shard, workflow_id, fence, seq, name, kind, status, output, error,
            retries)) is not None

    async def workflow_finished(self, tenant: str, shard: int, workflow_id: str, fence: int,
                                status: str, output: str | None, error: str | None) -> bool:
        return await self._submit(WORKFLOW_FINISHED, (
            tenant, shard, workflow_id, fence, status, output, error)) is not None

    async def _submit(self, op: int, row: tuple[Any, ...]) -> int | None:
        if self._closed:
            raise _closed("a checkpoint")
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        batch = self._next
        batch.rows[op].append(row)
        batch.futures[op].append(fut)
        batch.size += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = _spawn(self._flush_loop(), f"group-commit:{self.node.name}")
        return await fut

    async def _flush_loop(self) -> None:
        # One batch in flight per node: what arrives meanwhile waits for the next one,
        # which is what makes the batches grow with the load.
        while self._next.size:
            batch, self._next = self._next, _Batch()
            if batch.size > self.max_batch:
                batch, self._next = _split(batch, self.max_batch, self._next)
            await self._write(batch)

    async def _write(self, batch: _Batch) -> None:
        args: list[list[Any]] = []
        for op in (STEP_STARTED, STEP_FINISHED, WORKFLOW_FINISHED):
            rows = batch.rows[op]
            if rows:
                args.extend(list(col) for col in zip(*rows, strict=True))
            else:
                args.extend([] for _ in range(_WIDTH[op]))
        futures = [f for futs in batch.futures.values() for f in futs]
        try:
            result = await self.driver.fetch(self.node, "checkpoint_batch", *args,
                                             lane="checkpoints")
        except ShardflowError as exc:
            if batch.size > 1 and not isinstance(exc, RetryableDatabaseError):
                # one bad row (the database refused it) must not fail the others: each
                # one again on its own, so only the culprit gets the error
                for single in _singles(batch):
                    await self._write(single)
                return
            _fail(futures, exc)
            return
        except Exception as exc:  # a bug: the writes' owners get an error, not a hang
            log.exception("group commit on node %s crashed", self.node.name)
            _fail(futures, ShardflowError(f"group commit on node {self.node.name} "
                                          f"crashed: {exc!r}"))
            return
        except BaseException:  # cancelled: the engine is closing
            _fail(futures, _closed("a checkpoint"))
            raise
        self.batches += 1
        self.rows += batch.size
        got: dict[tuple[int, int], int] = {(r["op"], r["idx"]): r["val"] for r in result}
        for op, futs in batch.futures.items():
            for i, f in enumerate(futs, start=1):
                if not f.done():
                    f.set_result(got.get((op, i)))

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        _fail([f for futs in self._next.futures.values() for f in futs],
              _closed("a checkpoint"))
        self._next = _Batch()


def _singles(batch: _Batch) -> list[_Batch]:
    """Each write of ``batch`` as a batch of its own."""
    out = []
    for op in (STEP_STARTED, STEP_FINISHED, WORKFLOW_FINISHED):
        for row, fut in zip(batch.rows[op], batch.futures[op], strict=True):
            one = _Batch()
            one.rows[op].append(row)
            one.futures[op].append(fut)
            one.size = 1
            out.append(one)
    return out


def _split(batch: _Batch, limit: int, rest: _Batch) -> tuple[_Batch, _Batch]:
    """The first ``limit`` writes of ``batch``, and the others in front of ``rest``."""
    head, tail = _Batch(), _Batch()
    n = 0
    for op in (STEP_STARTED, STEP_FINISHED, WORKFLOW_FINISHED):
        for row, fut in zip(batch.rows[op], batch.futures[op], strict=True):
            dest = head if n < limit else tail
            dest.rows[op].append(row)
            dest.futures[op].append(fut)
            dest.size += 1
            n += 1
    for op in (STEP_STARTED, STEP_FINISHED, WORKFLOW_FINISHED):
        tail.rows[op].extend(rest.rows[op])
        tail.futures[op].extend(rest.futures[op])
    tail.size += rest.size
    return head, tail


class StartBatcher:
    """Concurrent ``engine.start`` calls for one node, gathered like checkpoints: one
    ``insert_workflows`` statement (one commit) for all the starts that arrived while
    the previous one committed. Each start returns once its own row is committed."""

    def __init__(self, driver: Driver, node: Node, *, max_batch: int, notify: bool) -> None:
        self.driver = driver
        self.node = node
        self.max_batch = max_batch
        self.notify = notify
        self._rows: list[tuple[Any, ...]] = []
        self._futures: list[asyncio.Future[bool]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self, row: tuple[Any, ...]) -> bool:
        """Insert one workflow row (the columns of ``insert_workflows``); False when the
        (tenant, id) existed already."""
        if self._closed:
            raise _closed("a start")
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._rows.append(row)
        self._futures.append(fut)
        if self._flusher is None or self._flusher.done():
            self._flusher = _spawn(self._flush_loop(), f"start-batch:{self.node.name}")
        return await fut

    async def _flush_loop(self) -> None:
        while self._rows:
            rows, futs = self._rows[:self.max_batch], self._futures[:self.max_batch]
            del self._rows[:self.max_batch], self._futures[:self.max_batch]
            await self._insert(rows, futs)

    async def _insert(self, rows: list[tuple[Any, ...]],
                      futs: list[asyncio.Future[bool]]) -> None:
        try:
            inserted = await insert_rows(self.driver, self.node, rows, self.notify)
        except ShardflowError as exc:
            if len(rows) > 1 and not isinstance(exc, RetryableDatabaseError):
                # one refused row (e.g. a tenant filed under a shard this node no
                # longer holds) must not fail the other starts: each on its own
                for row, fut in zip(rows, futs, strict=True):
                    await self._insert([row], [fut])
                return
            _fail(list(futs), exc)
            return
        except Exception as exc:
            log.exception("start batch on node %s crashed", self.node.name)
            _fail(list(futs), ShardflowError(f"start batch on node {self.node.name} "
                                             f"crashed: {exc!r}"))
            return
        except BaseException:
            _fail(list(futs), _closed("a start"))
            raise
        for i, f in enumerate(futs, start=1):
            if not f.done():
                f.set_result(i in inserted)

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        _fail(list(self._futures), _closed("a start"))
        self._rows.clear()
        self._futures.clear()


async def insert_rows(driver: Driver, node: Node, rows: list[tuple[Any, ...]],
                      notify: bool) -> set[int]:
    """Insert workflow rows (tenant, shard, id, name, queue, priority, inputs,
    max_attempts, timeout, delay) on ``node`` in one statement: the 1-based positions of
    those inserted (the others existed already). Idempotent, so retried on a failover."""
    cols = [list(c) for c in zip(*rows, strict=True)]
    result = await driver.fetch(node, "insert_workflows", *cols, notify)
    return {r["idx"] for r in result}


@dataclass(slots=True)
class TxOutcome:
    """What became of one transaction step in a group: ``ok`` (``output`` is its
    recorded result, committed with its writes), ``recorded`` (another run recorded
    this position first: nothing ran), ``fenced`` (the workflow is no longer ours:
    nothing ran), or ``error`` (the step raised ``error``; its writes were rolled back,
    the others' committed)."""

    kind: str
    output: str | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class _TxOp:
    tenant: str
    shard: int
    workflow_id: str
    fence: int
    seq: int
    name: str
    run: Callable[[asyncpg.Connection], Coroutine[Any, Any, str]]
    future: asyncio.Future[TxOutcome]
    # the submitting workflow's context (shardflow.tenant(), workflow_id(), spans):
    # the step runs in the group's task, but must see its own workflow
    context: contextvars.Context


class _StepFailed(Exception):
    """A step of a group raised while the group ran without savepoints."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index)
        self.index = index
        self.error = error


class TxBatcher:
    """Transaction steps of many workflows on one node, one transaction per group.

    A transaction step's writes must commit with its checkpoint, so these cannot go
    through :class:`GroupCommit`. Instead, while one group runs, the next gathers, and
    runs as: BEGIN; ``tx_lock`` (every workflow row FOR SHARE at its fence, and which
    positions are recorded already); each step's function; ``tx_checkpoints`` for
    every step; COMMIT. Per step, only the step's own statements, instead of four more
    round trips, and one commit per group instead of one per step. If a step raises,
    the group is rolled back and run again with each step in a savepoint of its own,
    that step left out and reported as failed.

    What users see: steps of one group run one after another on one connection, in
    one transaction, so a slow step delays the others of its group, and a step sees
    the writes of the steps before it in the group (as if they had committed just
    before). A group is at most ``max_batch`` steps (subtransactions past 64 per
    transaction make every snapshot in the server slower).
    """

    def __init__(self, driver: Driver, node: Node, *, max_batch: int) -> None:
        self.driver = driver
        self.node = node
        self.max_batch = max_batch
        self._ops: list[_TxOp] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self.groups = 0
        self.steps = 0

    async def run(self, tenant: str, shard: int, workflow_id: str, fence: int, seq: int,
                  name: str, run: Callable[[asyncpg.Connection], Coroutine[Any, Any, str]]
                  ) -> TxOutcome:
        """Run ``run(conn)`` (the step; returns its serialized result) in a group."""
        if self._closed:
            raise _closed(f"transaction step {name!r}")
        fut: asyncio.Future[TxOutcome] = asyncio.get_running_loop().create_future()
        self._ops.append(_TxOp(tenant, shard, workflow_id, fence, seq, name, run, fut,
                               contextvars.copy_context()))
        if self._flusher is None or self._flusher.done():
            self._flusher = _spawn(self._flush_loop(), f"tx-group:{self.node.name}")
        return await fut

    async def _flush_loop(self) -> None:
        while self._ops:
            group = self._ops[:self.max_batch]
            del self._ops[:self.max_batch]
            futures = [op.future for op in group]
            try:
                outcomes = await self._run_group(group)
            except (ShardflowError, *DRIVER_ERRORS) as exc:
                _fail(futures, exc if isinstance(exc, ShardflowError) else translate(
                    exc, context=f"transaction group on node {self.node.name}"))
                continue
            except Exception as exc:  # a bug: the steps' owners get an error, not a hang
                log.exception("transaction group on node %s crashed", self.node.name)
                _fail(futures, ShardflowError(f"transaction group on node "
                                              f"{self.node.name} crashed: {exc!r}"))
                continue
            except BaseException:  # cancelled: the engine is closing
                _fail(futures, _closed("a transaction step"))
                raise
            self.groups += 1
            self.steps += len(group)
            for op, outcome in zip(group, outcomes, strict=True):
                if op.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    op.future.set_exception(outcome)
                else:
                    op.future.set_result(outcome)

    async def _run_group(self, group: list[_TxOp]) -> list[TxOutcome | BaseException]:
        """Run the group; an outcome per step, or the error of the engine's own
        statements for that step (a refused checkpoint, a lost connection).

        First without savepoints (one round trip less per step). If a step raises, the
        group is rolled back and run again, each step in a savepoint, that step reported
        as failed (the others' writes are made again: a transaction step may run more
        than once, its commit happens once). If something fails that no step raised —
        a deferred constraint at COMMIT, a step that swallowed the error of one of its
        statements and left the transaction aborted — the culprit is unknown: each
        step then runs in a transaction of its own, so only the culprit fails, with
        its own error, and the others commit. Before this, such an error failed the
        whole group: every workflow in it was handed back and paid an attempt, the
        culprit looped to 'dead' with its error lost.
        """
        pool = await self.driver.lane(self.node, "transactions")
        failed: dict[int, BaseException] = {}
        async with pool.acquire() as conn:
            for careful in (False, True):
                tr = conn.transaction()
                await tr.start()
                try:
                    outcomes = await self._in_transaction(conn, group, careful, failed)
                    await tr.commit()
                    return list(outcomes)
                except _StepFailed as sf:
                    failed[sf.index] = sf.error
                    with contextlib.suppress(*DRIVER_ERRORS):
                        await tr.rollback()
                    if conn.is_closed():
                        # the connection died under the step (a restart, a dropped
                        # link): not the step's fault; the group again, by its callers
                        raise RetryableDatabaseError(
                            f"transaction group on node {self.node.name}: the connection "
                            f"was lost ({sf.error})") from None
                    continue
                except BaseException as exc:
                    if not conn.is_closed():
                        with contextlib.suppress(*DRIVER_ERRORS):
                            await tr.rollback()
                    if _retryable(exc):
                        raise  # the whole group again, by its callers (a lost connection)
                    if not isinstance(exc, Exception):
                        raise
                    break
            return [await self._alone(conn, op, failed.get(i))
                    for i, op in enumerate(group, start=1)]

    async def _alone(self, conn: asyncpg.Connection, op: _TxOp,
                     known: BaseException | None) -> TxOutcome | BaseException:
        """``op`` in a transaction of its own: an error of the step or of its COMMIT is
        the step's; one of the engine's statements is returned as the exception."""
        if known is not None:
            # it raised in this group already: not run again, but its workflow must
            # still be ours for the error to be recorded (the caller's checkpoint
            # of the failure is fenced)
            return TxOutcome("error", error=known)
        tr = conn.transaction()
        stage = "engine"
        try:
            await tr.start()
            # careful: a step that left the transaction aborted is named by its
            # savepoint's RELEASE, not blamed on the engine's checkpoint after it
            outcome = (await self._in_transaction(conn, [op], True, {}))[0]
            stage = "commit"
            await tr.commit()
            return outcome
        except _StepFailed as sf:
            with contextlib.suppress(*DRIVER_ERRORS):
                await tr.rollback()
            if conn.is_closed():  # lost under the step: not its fault, try again
                return RetryableDatabaseError(f"transaction step {op.name!r}: the "
                                              f"connection was lost ({sf.error})")
            return TxOutcome("error", error=sf.error)
        except Exception as exc:
            if stage != "commit" and not conn.is_closed():
                with contextlib.suppress(*DRIVER_ERRORS):
                    await tr.rollback()
            err = exc if isinstance(exc, ShardflowError) else translate(
                exc, context=f"transaction step {op.name!r}")
            if stage == "commit" and not isinstance(err, RetryableDatabaseError):
                return TxOutcome("error", error=err)  # e.g. its deferred constraint
            return err
        except BaseException:
            if not conn.is_closed():
                with contextlib.suppress(*DRIVER_ERRORS):
                    await tr.rollback()
            raise

    async def _in_transaction(self, conn: asyncpg.Connection, group: list[_TxOp],
                              careful: bool, failed: dict[int, BaseException]
                              ) -> list[TxOutcome]:
        locked = await conn.fetch(
            Q["tx_lock"], [o.tenant for o in group], [o.shard for o in group],
            [o.workflow_id for o in group], [o.fence for o in group],
            [o.seq for o in group])
        state = {r["idx"]: (r["owned"], r["recorded"]) for r in locked}
        outcomes: list[TxOutcome] = []
        done: list[tuple[_TxOp, str]] = []
        ran = False
        for i, op in enumerate(group, start=1):
            owned, recorded = state.get(i, (False, False))
            if not owned:
                outcomes.append(TxOutcome("fenced"))
                continue
            if recorded:
                outcomes.append(TxOutcome("recorded"))
                continue
            if i in failed:
                outcomes.append(TxOutcome("error", error=failed[i]))
                continue
            if ran:
                # what the step before set with SET LOCAL / SET LOCAL ROLE ends with
                # its own transaction when it runs alone: here, before the next one
                await conn.execute(_RESET)
            ran = True
            if careful:
                await conn.execute("SAVEPOINT shardflow_step")
            try:
                output = await asyncio.create_task(op.run(conn), context=op.context)
            except (ShardflowError, Exception) as exc:  # the step's own failure
                if isinstance(exc, DRIVER_ERRORS):  # e.g. a deadlock victim: retryable
                    exc = translate(exc, context=f"transaction step {op.name!r}")
                if not careful:
                    raise _StepFailed(i, exc) from None
                await conn.execute(_UNDO_STEP)  # this step's writes only
                outcomes.append(TxOutcome("error", error=exc))
                continue
            if careful:
                try:
                    # fails if the step caught the error of one of its statements and
                    # returned: the transaction is aborted, and only this step's
                    # savepoint can bring it back
                    await conn.execute("RELEASE SAVEPOINT shardflow_step")
                except asyncpg.InFailedSQLTransactionError as exc:
                    await conn.execute(_UNDO_STEP)
                    outcomes.append(TxOutcome("error", error=DatabaseError(
                        f"transaction step {op.name!r} returned after one of its "
                        "statements failed (the error was caught inside the step, which "
                        "left its transaction aborted); to go on after a failed "
                        "statement, run it in 'async with conn.transaction():'",
                        sqlstate=exc.sqlstate)))
                    continue
            done.append((op, output))
            outcomes.append(TxOutcome("ok", output=output))
        if done:
            if ran:
                await conn.execute(_RESET)  # the checkpoints as the engine, not a SET ROLE
            await conn.execute(
                Q["tx_checkpoints"], [o.tenant for o, _ in done], [o.shard for o, _ in done],
                [o.workflow_id for o, _ in done], [o.seq for o, _ in done],
                [o.name for o, _ in done], [out for _, out in done])
        return outcomes

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        _fail([op.future for op in self._ops], _closed("a transaction step"))
        self._ops.clear()


# RESET ALL leaves the role alone (GUC_NO_RESET_ALL); the connection's start-up settings
# (jit off) are its reset values, so they stay.
_RESET = "RESET ALL; RESET ROLE"
_UNDO_STEP = "ROLLBACK TO SAVEPOINT shardflow_step; RELEASE SAVEPOINT shardflow_step"


def _retryable(exc: BaseException) -> bool:
    """A failure of the whole group that its callers retry (a lost connection, a
    deadlock at COMMIT), not one to blame on a step."""
    if isinstance(exc, DRIVER_ERRORS):
        exc = translate(exc)
    return isinstance(exc, RetryableDatabaseError)
