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
from .errors import ShardflowError, translate

if TYPE_CHECKING:
    from .driver import Driver, Node

log = logging.getLogger("shardflow.batcher")

STEP_STARTED, STEP_FINISHED, WORKFLOW_FINISHED = 1, 2, 3
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
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        batch = self._next
        batch.rows[op].append(row)
        batch.futures[op].append(fut)
        batch.size += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(),
                                                name=f"group-commit:{self.node.name}")
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
        try:
            result = await self.driver.fetch(self.node, "checkpoint_batch", *args,
                                             lane="checkpoints")
        except (ShardflowError, OSError) as exc:
            for futs in batch.futures.values():
                for f in futs:
                    if not f.done():
                        f.set_exception(exc)
            return
        except BaseException as exc:  # cancelled (engine closing): nobody is left waiting
            for futs in batch.futures.values():
                for f in futs:
                    if not f.done():
                        f.cancel()
            if not isinstance(exc, Exception):
                raise
            log.exception("group commit on node %s crashed", self.node.name)
            return
        self.batches += 1
        self.rows += batch.size
        got: dict[tuple[int, int], int] = {(r["op"], r["idx"]): r["val"] for r in result}
        for op, futs in batch.futures.items():
            for i, f in enumerate(futs, start=1):
                if not f.done():
                    f.set_result(got.get((op, i)))

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher


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

    async def start(self, row: tuple[Any, ...]) -> bool:
        """Insert one workflow row (the columns of ``insert_workflows``); False when the
        (tenant, id) existed already."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._rows.append(row)
        self._futures.append(fut)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(),
                                                name=f"start-batch:{self.node.name}")
        return await fut

    async def _flush_loop(self) -> None:
        while self._rows:
            rows, futs = self._rows[:self.max_batch], self._futures[:self.max_batch]
            del self._rows[:self.max_batch], self._futures[:self.max_batch]
            try:
                inserted = await insert_rows(self.driver, self.node, rows, self.notify)
            except ShardflowError as exc:
                for f in futs:
                    if not f.done():
                        f.set_exception(exc)
                continue
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
            for i, f in enumerate(futs, start=1):
                if not f.done():
                    f.set_result(i in inserted)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher


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
        self.groups = 0
        self.steps = 0

    async def run(self, tenant: str, shard: int, workflow_id: str, fence: int, seq: int,
                  name: str, run: Callable[[asyncpg.Connection], Coroutine[Any, Any, str]]
                  ) -> TxOutcome:
        """Run ``run(conn)`` (the step; returns its serialized result) in a group."""
        fut: asyncio.Future[TxOutcome] = asyncio.get_running_loop().create_future()
        self._ops.append(_TxOp(tenant, shard, workflow_id, fence, seq, name, run, fut,
                               contextvars.copy_context()))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(),
                                                name=f"tx-group:{self.node.name}")
        return await fut

    async def _flush_loop(self) -> None:
        while self._ops:
            group = self._ops[:self.max_batch]
            del self._ops[:self.max_batch]
            try:
                outcomes = await self._run_group(group)
            except (ShardflowError, *DRIVER_ERRORS) as exc:
                err = exc if isinstance(exc, ShardflowError) else translate(
                    exc, context=f"transaction group on node {self.node.name}")
                for op in group:
                    if not op.future.done():
                        op.future.set_exception(err)
                continue
            except BaseException:
                for op in group:
                    op.future.cancel()
                raise
            self.groups += 1
            self.steps += len(group)
            for op, outcome in zip(group, outcomes, strict=True):
                if not op.future.done():
                    op.future.set_result(outcome)

    async def _run_group(self, group: list[_TxOp]) -> list[TxOutcome]:
        pool = await self.driver.lane(self.node, "transactions")
        failed: dict[int, BaseException] = {}
        async with pool.acquire() as conn:
            # First without savepoints (one round trip less per step); if a step
            # raises, the group is rolled back and run again, each step in a savepoint,
            # that step reported as failed (the others' writes are made again: a
            # transaction step may run more than once, its commit happens once).
            for careful in (False, True):
                await conn.execute("BEGIN")
                try:
                    outcomes = await self._in_transaction(conn, group, careful, failed)
                    await conn.execute("COMMIT")
                    return outcomes
                except _StepFailed as sf:
                    failed[sf.index] = sf.error
                    await conn.execute("ROLLBACK")
                except BaseException:
                    if not conn.is_closed():
                        with contextlib.suppress(*DRIVER_ERRORS):
                            await conn.execute("ROLLBACK")
                    raise
        raise AssertionError("unreachable: the careful pass raises no _StepFailed")

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
        savepoint = False
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
            if careful:
                # a fresh savepoint for this step (the previous one's writes are kept)
                await conn.execute("RELEASE SAVEPOINT step; SAVEPOINT step" if savepoint
                                   else "SAVEPOINT step")
                savepoint = True
            try:
                output = await asyncio.create_task(op.run(conn), context=op.context)
            except (ShardflowError, Exception) as exc:  # the step's own failure
                if isinstance(exc, DRIVER_ERRORS):  # e.g. a deadlock victim: retryable
                    exc = translate(exc, context=f"transaction step {op.name!r}")
                if not careful:
                    raise _StepFailed(i, exc) from None
                await conn.execute("ROLLBACK TO SAVEPOINT step")
                outcomes.append(TxOutcome("error", error=exc))
                continue
            done.append((op, output))
            outcomes.append(TxOutcome("ok", output=output))
        if done:
            await conn.execute(
                Q["tx_checkpoints"], [o.tenant for o, _ in done], [o.shard for o, _ in done],
                [o.workflow_id for o, _ in done], [o.seq for o, _ in done],
                [o.name for o, _ in done], [out for _, out in done])
        return outcomes

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
