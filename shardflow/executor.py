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
import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import psycopg

from . import context
from .cron import Cron
from .driver import BACKGROUND, DRIVER_ERRORS, Node, Q
from .errors import (
    NonDeterminismError,
    RetryableDatabaseError,
    SerializationError,
    ShardflowError,
    WorkflowInterrupt,
)
from .ownership import ShardOwnership
from .serde import dumps, error_payload, loads

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
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.running: dict[tuple[str, str], _Running] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: dict[str, asyncio.Event] = {}
        self._slot_free = asyncio.Event()
        self._stopping = False
        self._last_heartbeat: dict[str, float] = {}
        self._loop_tick = time.monotonic()
        self._beat: _HeartbeatThread | None = None
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
        self._tasks.append(asyncio.create_task(self._watch_loop(), name="watch"))
        self._beat = _HeartbeatThread(self)
        self._beat.start()
        self._tasks.append(asyncio.create_task(self._recovery_loop(), name="recovery"))
        self._tasks.append(asyncio.create_task(self._ownership_loop(), name="ownership"))
        self._tasks.append(asyncio.create_task(self._retention_loop(), name="retention"))
        self._tasks.append(asyncio.create_task(self._schedule_loop(), name="schedules"))

    async def stop(self) -> None:
        self._stopping = True
        if self._beat is not None:
            self._beat.stop.set()
            await asyncio.to_thread(self._beat.join)
        for t in self._tasks:
            t.cancel()
        runs = [r.task for r in self.running.values()]
        for t in runs:
            t.cancel()
        await asyncio.gather(*self._tasks, *runs, return_exceptions=True)
        for conn in self._listeners.values():
            with contextlib.suppress(Exception):
                await conn.close()
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

    def _shards(self, node: Node) -> list[int]:
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
        self._last_heartbeat[node.name] = time.monotonic()

    async def _tick_loop(self) -> None:
        # Proves to the heartbeat thread that the event loop still runs workflows.
        while True:
            self._loop_tick = time.monotonic()
            await asyncio.sleep(0.05)

    async def _watch_loop(self) -> None:
        """Stop local runs that lost their workflow (cancelled, taken over), and all runs
        on a node where our lease may have lapsed."""
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            now = time.monotonic()
            for node in self.engine.driver.nodes.values():
                last = self._last_heartbeat.get(node.name, 0.0)
                if now - last > self.cfg.lease_timeout:
                    # Our lease may have lapsed. The runs go on: if another worker took
                    # a workflow over, its fence refuses our writes and the run stops;
                    # if nobody did, cancelling here would leave it "running" for good.
                    log.warning("no heartbeat on node %s for %.1fs", node.name, now - last)
                    continue
                try:
                    await self._check_inflight(node)
                except ShardflowError as exc:
                    log.warning("in-flight check on node %s failed: %s", node.name, exc)
                except Exception:
                    log.exception("in-flight check on node %s crashed", node.name)

    async def _check_inflight(self, node: Node) -> None:
        mine = [(k, r) for k, r in self.running.items() if r.node is node]
        if not mine:
            return
        rows = await self.engine.driver.fetch(
            node, "check_inflight", [k[0] for k, _ in mine], [k[1] for k, _ in mine],
            [r.fence for _, r in mine], [r.shard for _, r in mine],
            patience=BACKGROUND)
        for row in rows:
            key = (row["tenant_id"], row["workflow_id"])
            r = self.running.get(key)
            if r is not None:
                r.task.cancel()
            self.engine.notify_done(*key)

    async def _schedule_loop(self) -> None:
        """Fire due schedule ticks on the shards this worker owns (see migration 0006)."""
        while True:
            await asyncio.sleep(self.cfg.poll_interval * 2)
            for node in self.engine.driver.nodes.values():
                shards = self._shards(node)
                if not shards:
                    continue
                try:
                    for row in await self.engine.driver.fetch(
                            node, "due_schedules", shards, patience=BACKGROUND):
                        await self._fire(node, row)
                except ShardflowError as exc:
                    log.warning("schedules on node %s failed: %s", node.name, exc)
                except Exception:
                    log.exception("schedules on node %s crashed", node.name)

    async def _fire(self, node: Node, row: Any) -> None:
        cron = Cron.parse(row["cron"])
        now = dt.datetime.fromtimestamp(row["now"], dt.UTC)
        ticks = [row["next_run_at"]]
        while len(ticks) < 1000:  # bounded: the rest on the next pass
            nxt = cron.next_after(ticks[-1])
            if nxt > now:
                break
            ticks.append(nxt)
        if row["catch_up"] == "skip":
            ticks = ticks[-1:]
        nxt = cron.next_after(ticks[-1])
        driver = self.engine.driver
        async with driver.transaction(node) as conn:
            ok = await conn.fetchrow(
                Q["advance_schedule"], row["tenant_id"], row["shard_id"], row["schedule_id"],
                row["next_run_at"], nxt.timestamp(), ticks[-1].timestamp(), len(ticks))
            if ok is None:
                return  # another worker fired these ticks
            for tick in ticks:
                await conn.fetchrow(
                    Q["insert_workflow"], row["tenant_id"], row["shard_id"],
                    f"{row['schedule_id']}@{tick.strftime('%Y%m%dT%H%M%SZ')}",
                    row["workflow_name"], row["queue"], 0, row["inputs"], None,
                    self.cfg.max_attempts, None, 0.0, self.cfg.notify)
        self.engine.metrics["schedule_ticks"] += len(ticks)

    async def _retention_loop(self) -> None:
        """Delete expired finished workflows (small batches per shard) from the shards
        this worker owns, and VACUUM the partitions that lost enough rows, so the tables
        stay as small as the retention says (migration 0007 says why autovacuum alone
        does not keep up with small partitions)."""
        if self.engine.citus:
            return  # not on Citus yet: the purge joins a coordinator-local table
        # purged rows per (node, shard) since that shard's last VACUUM, and when it was
        dirty: dict[tuple[str, int], int] = {}
        since: dict[tuple[str, int], float] = {}
        while True:
            await asyncio.sleep(self.cfg.retention_interval)
            for node in self.engine.driver.nodes.values():
                shards = self._shards(node)
                if not shards:
                    continue
                try:
                    rows = await self.engine.driver.fetch(
                        node, "purge_finished", shards, 500, patience=BACKGROUND)
                    now = time.monotonic()
                    for r in rows:
                        key = (node.name, r["shard_id"])
                        dirty[key] = dirty.get(key, 0) + int(r["purged"])
                        since.setdefault(key, now)
                        self.engine.metrics["purged"] += int(r["purged"])
                    owned = set(shards)
                    for key in [k for k in dirty if k[0] == node.name and k[1] not in owned]:
                        # moved or rebalanced away: its partitions may be gone here
                        dirty.pop(key, None)
                        since.pop(key, None)
                    due = sorted(s for (n, s), count in dirty.items() if n == node.name
                                 and (count >= self.cfg.vacuum_after_purged
                                      or now - since[(n, s)] >= 60.0))
                    # forgotten before the VACUUM: one that fails (a partition dropped
                    # by a shard move meanwhile) is not tried again forever
                    for s in due:
                        dirty.pop((node.name, s), None)
                        since.pop((node.name, s), None)
                    if due:
                        await self.engine.driver.vacuum_shards(node, due)
                        self.engine.metrics["vacuumed_shards"] += len(due)
                except ShardflowError as exc:
                    log.warning("retention pass on node %s failed: %s", node.name, exc)
                except Exception:
                    log.exception("retention pass on node %s crashed", node.name)

    async def _recovery_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self.cfg.recovery_interval)
            ticks += 1
            pending, self._to_release = self._to_release, []
            for ctx in pending:
                await self._hand_back(ctx, "retried hand-back")
            for node in self.engine.driver.nodes.values():
                if not self._shards(node):
                    continue
                try:
                    live = [r["worker_id"] for r in
                            await self.engine.driver.fetch(node, "live_workers",
                                                           patience=BACKGROUND)]
                    rows = await self.engine.driver.fetch(node, "recover_orphans",
                                                          self._shards(node), live,
                                                          self.cfg.lease_timeout,
                                                          patience=BACKGROUND)
                    if rows:
                        self.engine.metrics["recovered"] += len(rows)
                        log.info("recovered %d workflow(s) on node %s", len(rows), node.name)
                        if self.engine.citus:
                            self.wake()
                        else:
                            self._hot.setdefault(node.name, set()).update(
                                r["shard_id"] for r in rows)
                            self._wake[node.name].set()
                    if ticks % 10 == 0:
                        await self._reconcile(node)
                        row = await self.engine.driver.fetchrow(
                            node, "backlog_pending", self._shards(node), patience=BACKGROUND)
                        self.backlog[node.name] = int(row["n"]) if row else 0
                    if ticks % 20 == 0:
                        names = [r["name"] for r in
                                 await self.engine.driver.fetch(node, "live_workflow_names",
                                                                patience=BACKGROUND)]
                        await self.engine.driver.execute(node, "mark_unrunnable",
                                                         self._shards(node), names,
                                                         patience=BACKGROUND)
                        await self.engine.driver.execute(node, "prune_workers", patience=BACKGROUND)
                except ShardflowError as exc:
                    log.warning("recovery sweep on node %s failed: %s", node.name, exc)
                except Exception:  # a bug must not stop recovery for good
                    log.exception("recovery sweep on node %s crashed", node.name)

    async def _reconcile(self, node: Node) -> None:
        """Hand back workflows the database says we run but we do not: a claim whose
        commit succeeded while its reply was lost (connection dropped, failover) left
        them "running" under our live lease, where recovery never looks. Only when no
        claim was under way during the read: a claim's rows are ours to spawn until it
        returns."""
        if self._claims_inflight:
            return
        begun = self._claims_begun
        rows = await self.engine.driver.fetch(node, "my_running", self.worker_id,
                                              self._shards(node), patience=BACKGROUND)
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
            if row.get("fresh") is not True:
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
        try:
            await self._finish(ctx, "failed", None, payload)
        except ShardflowError as err:
            # cannot record the failure now: hand the workflow back so it runs again
            # (from its checkpoints) rather than staying "running" under a live owner
            log.warning("workflow %s/%s failed (%s) and the failure could not be "
                        "recorded: %s", ctx.tenant, ctx.workflow_id, payload["message"], err)
            self._to_release.append(ctx)


class _HeartbeatThread(threading.Thread):
    """Renews this worker's lease on every node from a thread of its own.

    In a thread, with its own connections, so that a busy event loop (hundreds of
    workflows queued for pool connections) cannot delay the heartbeat past the lease
    and get its own healthy workflows recovered by others. It still stops renewing when
    the event loop has not ticked for half a lease: a wedged process must lose its
    workflows, not hold them forever.
    """

    def __init__(self, worker: Worker) -> None:
        super().__init__(name=f"shardflow-heartbeat-{worker.worker_id}", daemon=True)
        self.worker = worker
        self.stop = threading.Event()
        self._conns: dict[str, psycopg.Connection[Any]] = {}

    def _beat(self, node: Node) -> None:
        w = self.worker
        conn = self._conns.get(node.name)
        if conn is None or conn.closed:
            conn = psycopg.connect(node.spec.dsn, autocommit=True, connect_timeout=2,
                                   cursor_factory=psycopg.RawCursor)
            self._conns[node.name] = conn
        conn.execute(Q["heartbeat"], (w.worker_id, socket.gethostname(), os.getpid(),
                                      w.engine.workflow_names, w.cfg.lease_timeout))
        w.engine.prom.lease_renewals.labels(node.name).inc()
        w._last_heartbeat[node.name] = time.monotonic()

    def run(self) -> None:
        w = self.worker
        try:
            while not self.stop.wait(w.cfg.heartbeat_interval):
                if time.monotonic() - w._loop_tick > w.cfg.lease_timeout / 2:
                    log.warning("event loop stalled: not renewing the lease")
                    continue
                for node in list(w.engine.driver.nodes.values()):
                    try:
                        self._beat(node)
                    except psycopg.Error as exc:
                        log.warning("heartbeat on node %s failed: %s", node.name, exc)
                        bad = self._conns.pop(node.name, None)
                        if bad is not None:
                            bad.close()
        finally:
            for conn in self._conns.values():
                conn.close()


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
