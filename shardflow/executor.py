"""A worker: claims workflows on each node, runs them, heartbeats, recovers orphans.

Leases: a worker holds every workflow it runs through one heartbeat row per node
(``shardflow.workers``), renewed every ``heartbeat_interval`` by a single write: no
per-workflow heartbeat writes (hatchet#2604). When a worker stops heartbeating for
``lease_timeout``, any other worker's recovery sweep puts its running workflows back to
pending and the next claim takes them with a new fencing token; the dead (or merely
stalled) worker's late checkpoint writes then match no row and are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from . import context
from .driver import BACKGROUND, DRIVER_ERRORS, Node, Q
from .errors import (
    NonDeterminismError,
    RetryableDatabaseError,
    SerializationError,
    ShardflowError,
    StepError,
    WorkflowInterrupt,
)
from .ownership import ShardOwnership
from .serde import clean_text, dumps, error_payload, loads
from .upkeep import HeartbeatThread, NodeUpkeep

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("shardflow.worker")


@dataclass(slots=True)
class _Target:
    """What one claim loop polls: ``node`` runs the claims; ``home`` is the shardflow
    node of the workflows (their leases, queue budgets, checkpoints). The same node on
    plain Postgres; on Citus a Citus worker holding shard placements, and the
    coordinator."""

    name: str
    node: Node
    home: Node


@dataclass(slots=True)
class _Running:
    task: asyncio.Task[None]
    node: Node
    shard: int
    fence: int


class Worker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cfg = engine.config
        # the last part is the engine's tag, which its connections carry as their
        # application_name (see upkeep.worker_tag and end_frozen_sessions)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{engine.instance_tag}"
        self.running: dict[tuple[str, str], _Running] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: dict[str, asyncio.Event] = {}
        self._slot_free = asyncio.Event()
        self._stopping = False
        self.last_heartbeat: dict[str, float] = {}
        self.loop_tick = time.monotonic()
        self._beats: list[HeartbeatThread] = []
        # Shards of each node owned by a live worker that does not register some of
        # the workflows we do: (shards, the names of ours it lacks). Our sweeps claim
        # those there, else two services (or a rolling deploy adding a workflow) on
        # one cluster strand each other's work in the shards the other owns.
        self._foreign: dict[str, list[tuple[list[int], list[str]]]] = {}
        self.ownership = ShardOwnership(engine.driver, self._units, self.worker_id)
        self._targets: dict[str, _Target] = {}
        # Citus: each shard of the workflow table (a unit of ownership) -> the claim
        # target (the Citus worker holding it) and the placement's table name there
        self._placements: dict[int, tuple[str, str]] = {}
        self._listeners: dict[str, asyncpg.Connection] = {}
        # Shards known to have work (a NOTIFY, a local start, a claim that filled its
        # batch). Claims visit only these; all owned shards are swept every
        # sweep_interval, because visiting ~100 partitions costs ~10 ms of database CPU.
        self._hot: dict[str, set[int]] = {}
        self._sweep_now: set[str] = set()  # nodes whose claim loop should sweep at once
        self._to_release: list[context.WorkflowContext] = []
        # claims under way, and how many have begun: see _reconcile
        self._claims_inflight = 0
        self._claims_begun = 0
        self._claim_threshold = max(1, min(self.cfg.claim_batch,
                                           self.cfg.max_concurrency) // 2)
        # pending workflows in the shards we own, per node (metrics; every few seconds)
        self.backlog: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        driver = self.engine.driver
        # Register on every node before claiming anything: a claim by a worker without a
        # live heartbeat row would be recovered by the others at once.
        await asyncio.gather(*(self._heartbeat(n) for n in driver.nodes.values()))
        if self.engine.citus:
            await self._discover_placements()
        else:
            for node in driver.nodes.values():
                self._add_target(_Target(node.name, node, node))
        await self.ownership.rebalance()
        if self.cfg.notify:
            await self._listen()
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="tick"))
        for node in driver.nodes.values():
            beat = HeartbeatThread(self, node)
            beat.start()
            self._beats.append(beat)
            self._tasks += NodeUpkeep(self, node).tasks()
        self._tasks.append(asyncio.create_task(self._release_loop(), name="release"))
        self._tasks.append(asyncio.create_task(self._ownership_loop(), name="ownership"))

    async def stop(self) -> None:
        self._stopping = True
        for beat in self._beats:
            beat.stop.set()
        for beat in self._beats:
            # a thread stuck on a stalled node is a daemon: not waited for past a lease
            await asyncio.to_thread(beat.join, self.cfg.lease_timeout)
        for t in self._tasks:
            t.cancel()
        runs = [r.task for r in self.running.values()]
        for t in runs:
            t.cancel()
        await asyncio.gather(*self._tasks, *runs, return_exceptions=True)
        for conn in self._listeners.values():
            # on a stalled node a graceful close would wait for ever: abort after a bit
            closing = asyncio.ensure_future(conn.close())
            await asyncio.wait({closing}, timeout=2.0)
            if not closing.done():
                conn.terminate()
            closing.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        # Hand our shards and workflows back at once rather than after the lease expires.
        with contextlib.suppress(ShardflowError):
            await self.ownership.release_all()
        for node in self.engine.driver.nodes.values():
            with contextlib.suppress(ShardflowError):
                await self.engine.driver.execute(node, "release_worker", self.worker_id)
                await self.engine.driver.execute(node, "delete_worker", self.worker_id)

    def wake(self, shard: int | None = None) -> None:
        """New work: in ``shard`` if known (claim it next), else anywhere (sweep all)."""
        if shard is None or self.engine.citus:
            # on Citus a logical shard spans every placement: sweep them all
            self._sweep_now.update(self._wake)
            for ev in self._wake.values():
                ev.set()
            return
        node = self.engine.shard_map.node_of_shard(shard)
        if shard in self.ownership.owned.get(node, ()):
            self._hot.setdefault(node, set()).add(shard)
            self._wake[node].set()

    def interrupt(self, tenant: str, workflow_ids: list[str]) -> None:
        """Stop local runs of workflows that were cancelled."""
        for wid in workflow_ids:
            r = self.running.get((tenant, wid))
            if r is not None:
                r.task.cancel()

    # -- loops -----------------------------------------------------------------------

    # -- what this worker polls -------------------------------------------------------

    def _units(self) -> dict[str, list[int]]:
        """The units of ownership each shardflow node leases out."""
        smap = self.engine.shard_map
        if self.engine.citus:
            return {name: sorted(self._placements) for name in self.engine.driver.nodes}
        return {name: smap.shards_of(name) for name in self.engine.driver.nodes}

    def _target_units(self, target: _Target) -> list[int]:
        owned = self.ownership.owned.get(target.home.name, set())
        if not self.engine.citus:
            return sorted(owned)
        return sorted(u for u in owned if self._placements.get(u, ("", ""))[0] == target.name)

    def shards_of(self, node: Node) -> list[int]:
        """The logical shards of ``node`` this worker recovers and maintains."""
        if not self.engine.citus:
            return self.ownership.shards(node)
        # on Citus one logical shard spans all placements: whoever owns any of them
        return self.engine.shard_map.shards_of(node.name) if self.ownership.shards(node) else []

    def _add_target(self, target: _Target) -> None:
        if target.name in self._targets:
            return
        self._targets[target.name] = target
        self._wake[target.name] = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._claim_loop(target),
                                               name=f"claim:{target.name}"))

    async def _discover_placements(self) -> None:
        """Citus: where each shard of the workflow tables lives, read on the coordinator
        (its catalog, no distributed query); a claim loop per Citus worker node. Run
        again each ownership tick, so a rebalanced or new Citus worker is picked up."""
        driver = self.engine.driver
        placements: dict[int, tuple[str, str]] = {}
        for home in driver.nodes.values():
            parts = [f"shardflow.workflows_s{s}"
                     for s in self.engine.shard_map.shards_of(home.name)]
            for row in await driver.fetch(home, "citus_placements", parts, patience=BACKGROUND):
                node = await driver.placement_node(row["nodename"], row["nodeport"],
                                                   home.spec.dsn)
                self._add_target(_Target(node.name, node, home))
                # the placement's table: <partition>_<citus shard id>, schema shardflow
                table = f"{row['tbl'].rsplit('.', 1)[-1]}_{row['unit']}"
                placements[row["unit"]] = (node.name, table)
        self._placements = placements

    async def _listen(self) -> None:
        """LISTEN on every node so a start wakes the owner of its shard at once."""
        for node in self.engine.driver.nodes.values():
            conn = self._listeners.get(node.name)
            if conn is not None and not conn.is_closed():
                continue
            try:
                conn = await asyncpg.connect(node.spec.dsn)
                await conn.add_listener("shardflow_work", self._on_notify(node))
                self._listeners[node.name] = conn
            except DRIVER_ERRORS as exc:
                log.warning("LISTEN on node %s failed (polling meanwhile): %s", node.name, exc)

    def _on_notify(self, node: Node) -> Any:
        def callback(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            if self.engine.citus:
                self.wake()
                return
            with contextlib.suppress(ValueError):
                shard = int(payload)
                if shard in self.ownership.owned.get(node.name, ()):
                    self._hot.setdefault(node.name, set()).add(shard)
                    self._wake[node.name].set()

        return callback

    async def _ownership_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.recovery_interval)
            try:
                if self.engine.citus:
                    await self._discover_placements()
                if await self.engine.refresh_shard_map():
                    log.info("shard map changed (epoch %d)", self.engine.shard_map.epoch)
                if await self.ownership.rebalance():
                    self.wake()  # new shards: sweep them at once
            except ShardflowError as exc:
                log.warning("shard rebalance failed: %s", exc)
            except Exception:  # a bug must not stop ownership for good
                log.exception("shard rebalance crashed; trying again next tick")
            if self.cfg.notify:
                await self._listen()

    async def _claim_loop(self, target: _Target) -> None:
        names = self.engine.workflow_names
        wake = self._wake[target.name]
        cap = self.cfg.tenant_concurrency or 0
        loop = asyncio.get_running_loop()
        next_sweep = 0.0
        while not self._stopping:
            free = self.cfg.max_concurrency - len(self.running)
            # Under load, wait for half a batch of free slots rather than claiming for
            # each one that frees up: a claim has a fixed cost (it visits every shard
            # partition it names), so many claims of a few rows cost several times
            # more per workflow than a few claims of many.
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            if free < self._claim_threshold and self.running:
                # ...but never for longer than a poll: runs that wait in this process
                # (a parent awaiting a child this worker must claim) may hold the
                # slots that would fill the half batch
                self._slot_free.clear()
                try:
                    await asyncio.wait_for(self._slot_free.wait(), self.cfg.poll_interval)
                    continue  # a slot freed: look again
                except TimeoutError:
                    pass  # claim what is free
            limit = min(free, self.cfg.claim_batch)
            owned = set(self._target_units(target))
            hot = self._hot.setdefault(target.name, set())
            # shards we no longer own (rebalanced away, e.g. while our lease lapsed in a
            # failover) must leave the hot set: otherwise it never empties, no claim
            # awaits, and this loop spins without yielding, starving the event loop
            hot.intersection_update(owned)
            sweep = target.name in self._sweep_now or loop.time() >= next_sweep
            if sweep:
                self._sweep_now.discard(target.name)
                next_sweep = loop.time() + self.cfg.sweep_interval
                shards = sorted(owned)
            else:
                shards = sorted(hot & owned)
            hot.difference_update(shards)  # re-added below if they still have work
            self._claims_inflight += 1
            self._claims_begun += 1
            failed = False
            try:
                rows, gave = (await self._claim(target, shards, names, limit, cap)
                              if shards else ([], set()))
                for row in rows:
                    self._spawn(target.home, row)
                if sweep:
                    await self._claim_foreign(target, limit - len(rows), cap)
                if shards:
                    self.engine.prom.claim_batch.observe(len(rows))
            except ShardflowError as exc:
                log.warning("claim on node %s failed: %s", target.name, exc)
                rows, gave, failed = [], set(), True
                hot.update(shards)
            finally:
                self._claims_inflight -= 1
            if failed:
                await asyncio.sleep(self.cfg.poll_interval)
            # shards that may have more (see _may_have_more) are claimed from again at
            # once; the others wait for a notify or the next sweep
            hot.update(gave)
            if not hot:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        wake.wait(), max(0.0, min(self.cfg.poll_interval,
                                                   next_sweep - loop.time())))

    async def _claim_foreign(self, target: _Target, limit: int, cap: int) -> None:
        """Claim, in shards another live worker owns, the workflows that it does not
        register and we do (see ``_foreign``; at the sweep's pace)."""
        for shards, names in self._foreign.get(target.name, []):
            if limit <= 0:
                return
            rows, _ = await self._claim(target, shards, names, limit, cap)
            for row in rows:
                self._spawn(target.home, row)
            limit -= len(rows)
            self.engine.metrics["claimed_foreign"] += len(rows)

    async def _claim(self, target: _Target, units: list[int], names: list[str], limit: int,
                     cap: int) -> tuple[list[Any], set[int]]:
        """Claim on ``target``: the rows, and the units that may have more."""
        driver = self.engine.driver
        if not self.engine.citus:
            rows = await driver.claim(target.node, units, names, self.worker_id, limit,
                                      self.cfg.per_tenant_batch, cap)
            return rows, _may_have_more(rows, limit, self.cfg.per_tenant_batch)
        # Citus: budgets from the coordinator (the queue tables live there), the claim
        # on the Citus worker's placements themselves (FOR UPDATE SKIP LOCKED on plain
        # tables), then the rate-limit tokens back on the coordinator.
        budgets = await driver.fetch(target.home, "queue_budgets", limit, cap, patience=BACKGROUND)
        if not budgets:
            return [], set()
        tables = [self._placements[u][1] for u in units]

        async def claim_on_worker(budgets: list[Any]) -> list[Any]:
            return await driver.fetch(
                target.node, "claim_tables", tables,
                [b["queue"] for b in budgets], [b["budget"] for b in budgets],
                [b["tenant_cap"] for b in budgets], [b["cap_per_queue"] for b in budgets],
                names, self.worker_id, limit, self.cfg.per_tenant_batch, patience=BACKGROUND)

        if any(b["concurrency_limited"] for b in budgets):
            # Budgets read apart from the claim race with other claimers (every one
            # would start `concurrency` more). Under the lock, the running count
            # includes every earlier claim, which committed on its worker first.
            async with driver.transaction(target.home) as conn:
                await conn.execute(Q["claim_lock"])
                budgets = await conn.fetch(Q["queue_budgets"], limit, cap)
                rows = await claim_on_worker(budgets) if budgets else []
        else:
            rows = await claim_on_worker(budgets)
        limited = {b["queue"] for b in budgets if b["rate_limited"]}
        spent = [r["queue"] for r in rows if r["queue"] in limited]
        if spent:
            try:
                await driver.execute(target.home, "queue_spend", spent, patience=BACKGROUND)
            except ShardflowError as exc:
                # the claim is committed: run the workflows; the bucket refills anyway
                log.warning("spending rate tokens on node %s failed: %s",
                            target.home.name, exc)
        return rows, {units[r["slot"] - 1] for r in rows}

    async def _heartbeat(self, node: Node) -> None:
        await self.engine.driver.execute(
            node, "heartbeat", self.worker_id, socket.gethostname(), os.getpid(),
            self.engine.workflow_names, self.cfg.lease_timeout,
        )
        self.last_heartbeat[node.name] = time.monotonic()

    async def _tick_loop(self) -> None:
        # Proves to the heartbeat thread that the event loop still runs workflows.
        while True:
            self.loop_tick = time.monotonic()
            await asyncio.sleep(0.05)

    def work_found(self, node: Node, shards: set[int]) -> None:
        """Recovery put workflows of ``shards`` back to pending: claim there next."""
        if self.engine.citus:
            self.wake()
            return
        self._hot.setdefault(node.name, set()).update(shards)
        self._wake[node.name].set()

    async def _release_loop(self) -> None:
        """Hand back the workflows whose hand-back the database refused earlier."""
        while True:
            await asyncio.sleep(self.cfg.recovery_interval)
            pending, self._to_release = self._to_release, []
            for ctx in pending:
                await self._hand_back(ctx, "retried hand-back")

    async def find_foreign_work(self, node: Node) -> None:
        """Which shards of ``node`` are owned by live workers lacking some of our
        workflows (see ``_foreign``)."""
        mine = set(self.engine.workflow_names)
        owned = set(self.ownership.owned.get(node.name, ()))
        groups: dict[tuple[str, ...], list[int]] = {}
        for r in await self.engine.driver.fetch(node, "shard_owner_names",
                                                patience=BACKGROUND):
            if r["shard_id"] in owned or r["owner"] == self.worker_id:
                continue
            lacking = tuple(sorted(mine - set(r["workflow_names"] or ())))
            if lacking:
                groups.setdefault(lacking, []).append(r["shard_id"])
        self._foreign[node.name] = [(sorted(sh), list(names))
                                    for names, sh in groups.items()]

    async def reconcile(self, node: Node) -> None:
        """Hand back workflows the database says we run but we do not: a claim whose
        commit succeeded while its reply was lost (connection dropped, failover) left
        them "running" under our live lease, where recovery never looks. Only when no
        claim was under way during the read: a claim's rows are ours to spawn until it
        returns."""
        if self._claims_inflight:
            return
        begun = self._claims_begun
        # every shard of the node, not only ours: a claim in another worker's shard
        # (see _claim_foreign) can lose its reply too
        rows = await self.engine.driver.fetch(node, "my_running", self.worker_id,
                                              self.engine.shard_map.shards_of(node.name),
                                              patience=BACKGROUND)
        if self._claims_inflight or self._claims_begun != begun:
            return
        for r in rows:
            if (r["tenant_id"], r["workflow_id"]) in self.running:
                continue
            log.warning("workflow %s/%s was claimed but never received: handing it back",
                        r["tenant_id"], r["workflow_id"])
            self.engine.metrics["reconciled"] += 1
            await self.engine.driver.fetchrow(
                node, "retry_workflow_later", r["tenant_id"], r["shard_id"],
                r["workflow_id"], r["fence"], 0.0, "claimed but never received",
                patience=BACKGROUND)

    # -- running one workflow --------------------------------------------------------

    def _spawn(self, node: Node, row: Any) -> None:
        key = (row["tenant_id"], row["workflow_id"])
        task = asyncio.create_task(self._run(node, row), name=f"wf:{key[0]}/{key[1]}")
        self.running[key] = _Running(task, node, row["shard_id"], row["fence"])

        def done(_: asyncio.Task[None]) -> None:
            r = self.running.get(key)
            if r is not None and r.task is task:
                del self.running[key]
            self._slot_free.set()

        task.add_done_callback(done)

    async def _finish(self, ctx: context.WorkflowContext, status: str, output: str | None,
                      error: dict[str, Any] | None) -> None:
        err = dumps(error, what="error", max_bytes=1_000_000) if error is not None else None
        gc = self.engine.group_commit(ctx.node)
        if gc is None:
            ok = await self.engine.driver.fetchrow(
                ctx.node, "finish_workflow", ctx.tenant, ctx.shard, ctx.workflow_id,
                ctx.fence, status, output, err,
            ) is not None
        else:
            ok = await gc.workflow_finished(ctx.tenant, ctx.shard, ctx.workflow_id,
                                            ctx.fence, status, output, err)
        if ok:
            self.engine.metrics[status] += 1
            self.engine.notify_done(ctx.tenant, ctx.workflow_id)

    async def _run(self, node: Node, row: Any) -> None:
        with self.engine.span(f"workflow {row['name']}", **{
                "shardflow.tenant": row["tenant_id"], "shardflow.workflow_id":
                row["workflow_id"], "shardflow.attempt": row["attempts"],
                "shardflow.shard": row["shard_id"]}):
            await self._run_workflow(node, row)

    async def _run_workflow(self, node: Node, row: Any) -> None:
        engine = self.engine
        tenant, shard, wf_id = row["tenant_id"], row["shard_id"], row["workflow_id"]
        ctx = context.WorkflowContext(engine, tenant, shard, node, wf_id, row["name"],
                                      row["fence"])
        cm: asyncio.Timeout | None = None
        try:
            if row["attempts"] > row["max_attempts"]:
                await self._finish(ctx, "dead", None, {
                    "type": "DeadLetter",
                    "message": f"gave up after {row['attempts'] - 1} attempts "
                               f"(max_attempts={row['max_attempts']})"})
                return
            remaining = row["remaining"]
            if remaining is not None and remaining <= 0:
                await engine.cancel(tenant, wf_id, reason="timed out")
                return
            reg = engine.registered(row["name"])
            if reg is None:  # cannot happen: claims filter by our names
                return
            # a claim that knows the workflow has no checkpoints yet says so (fresh);
            # otherwise (a recovery, a resume, a fork, the fair or Citus claim) read them
            # fresh is only trusted on the first claim ever (fence 1): the claim's
            # snapshot may miss checkpoints of a run that parked (and gave its attempt
            # back) after that snapshot was taken
            if row.get("fresh") is not True or row["fence"] != 1:
                steps = await engine.driver.fetch(node, "load_steps", tenant, shard, wf_id)
                ctx.recorded = context.recorded_steps(steps)
            inputs = loads(row["inputs"])
            token = context._current.set(ctx)
            try:
                coro = reg.fn(*inputs["args"], **inputs["kwargs"])
                if remaining is not None:
                    async with asyncio.timeout(remaining) as cm:
                        result = await coro
                else:
                    result = await coro
            finally:
                context._current.reset(token)
            if ctx.fatal is not None:
                raise ctx.fatal
            try:
                out = dumps(result, what=f"result of workflow {row['name']!r}",
                            max_bytes=self.cfg.max_payload_bytes)
            except SerializationError as exc:
                await self._finish(ctx, "failed", None, error_payload(exc))
                return
            await self._finish(ctx, "succeeded", out, None)
        except WorkflowInterrupt as exc:
            log.info("workflow %s/%s interrupted: %s", tenant, wf_id, exc.reason)
            if exc.release:
                await self._hand_back(ctx, exc.reason)
        except asyncio.CancelledError:
            # cancelled here (engine stopping, workflow cancelled or taken over): nothing
            # more is written; the database already says what happens next
            raise
        except TimeoutError as exc:
            if cm is not None and cm.expired():
                await engine.cancel(tenant, wf_id, reason="timed out")
            else:
                await self._fail(ctx, exc)
        except RetryableDatabaseError as exc:
            # the database went away under us: hand the workflow back to run again
            # from its last checkpoint (a workflow left "running" under a live owner
            # would never be recovered)
            log.warning("workflow %s/%s: %s", tenant, wf_id, exc)
            await self._hand_back(ctx, str(exc))
        except Exception as exc:
            await self._fail(ctx, ctx.fatal if ctx.fatal is not None else exc)

    async def _hand_back(self, ctx: context.WorkflowContext, reason: str) -> None:
        """Put a workflow we still own back to pending (fenced), or keep trying from the
        recovery loop while the database refuses."""
        try:
            await self.engine.driver.fetchrow(
                ctx.node, "retry_workflow_later", ctx.tenant, ctx.shard, ctx.workflow_id,
                ctx.fence, 0.1, f"handed back: {reason}"[:500])
        except ShardflowError:
            self._to_release.append(ctx)

    async def _fail(self, ctx: context.WorkflowContext, exc: BaseException) -> None:
        payload = error_payload(exc)
        if isinstance(exc, NonDeterminismError):
            payload["type"] = "NonDeterminismError"
        seq = _ending_step(exc)
        if seq is not None:
            payload["step_seq"] = seq  # what resume runs again (resume_tree)
        try:
            try:
                await self._finish(ctx, "failed", None, payload)
            except ShardflowError as err:
                if isinstance(err, RetryableDatabaseError):
                    raise
                # the error itself cannot be written (a value Postgres refuses, past a
                # limit): the failure is recorded all the same, with what can be.
                # Handing the workflow back instead re-ran it until it was dead.
                log.warning("workflow %s/%s: its error could not be recorded (%s); "
                            "recording a summary", ctx.tenant, ctx.workflow_id, err)
                await self._finish(ctx, "failed", None, {
                    "type": clean_text(str(payload.get("type")), 200),
                    "message": clean_text(str(payload.get("message")), 2000),
                    "unrecorded": clean_text(f"the full error could not be stored: {err}",
                                             2000)})
        except ShardflowError as err:
            # cannot record the failure now: hand the workflow back so it runs again
            # (from its checkpoints) rather than staying "running" under a live owner
            log.warning("workflow %s/%s failed (%s) and the failure could not be "
                        "recorded: %s", ctx.tenant, ctx.workflow_id, payload["message"], err)
            self._to_release.append(ctx)


def _ending_step(exc: BaseException) -> int | None:
    """The position of the failed step that ended the workflow: the exception itself,
    or one it was raised from or while handling (a workflow that catches a StepError
    and raises its own). None when no step failure is in the chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, StepError) and cur.seq is not None:
            return cur.seq
        cur = cur.__cause__ or cur.__context__
    return None


def _may_have_more(rows: list[Any], limit: int, per_tenant: int) -> set[int]:
    """The shards a claim may have left ready work in: every shard it took from when it
    filled half its limit or more (a limit, a per-shard read or a crowded shard's
    budget may have stopped it), else those it took a tenant's whole share or more
    from. A claim that took a few rows, all under both caps, took all that was ready
    there: claiming from those shards again at once (as every shard that gave anything
    used to be) came back empty, one wasted claim per workflow at moderate load."""
    shards = {r["shard_id"] for r in rows}
    if 2 * len(rows) >= limit:
        return shards
    per = Counter(r["shard_id"] for r in rows)
    return {shard for shard, n in per.items() if n >= per_tenant}
