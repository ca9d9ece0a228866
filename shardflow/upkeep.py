"""A worker's upkeep of each node: heartbeats, in-flight checks, orphan recovery,
schedules and retention.

Every loop here runs once per node, on its own: a node that stalls (a network
partition that drops nothing and forwards nothing, a frozen primary) holds up only its
own loops. When they ran over the nodes one after another, one frozen worker holding a
row lock on one node stopped crash recovery on every node, and one stalled node could
expire a worker's heartbeats, and so its leases, everywhere.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import psycopg

from .cron import Cron
from .driver import BACKGROUND, Node, Q
from .errors import ShardflowError

if TYPE_CHECKING:
    from .executor import Worker

log = logging.getLogger("shardflow.worker")


def worker_tag(worker_id: str) -> str:
    """The part of a worker id its connections carry as application_name."""
    return worker_id.rsplit(":", 1)[-1]


async def forever(what: str, node: Node, interval: Callable[[], float],
                  body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` every ``interval()`` seconds for ``node`` until cancelled. A failure
    is logged and the next tick tries again: a bug must not stop upkeep for good."""
    while True:
        await asyncio.sleep(interval())
        try:
            await body()
        except ShardflowError as exc:
            log.warning("%s on node %s failed: %s", what, node.name, exc)
        except Exception:
            log.exception("%s on node %s crashed; trying again next tick", what, node.name)


class NodeUpkeep:
    """The upkeep loops of one worker for one shardflow node."""

    def __init__(self, worker: Worker, node: Node) -> None:
        self.w = worker
        self.node = node
        self.cfg = worker.cfg
        self.driver = worker.engine.driver
        self._ticks = 0
        # retention: purged rows per shard since that shard's last VACUUM, and when
        self._dirty: dict[int, int] = {}
        self._since: dict[int, float] = {}

    def tasks(self) -> list[asyncio.Task[None]]:
        n, cfg = self.node, self.cfg
        loops: list[tuple[str, Callable[[], float], Callable[[], Awaitable[None]]]] = [
            ("in-flight check", lambda: cfg.heartbeat_interval, self.watch),
            ("recovery sweep", lambda: cfg.recovery_interval, self.recover),
            ("schedules", lambda: cfg.poll_interval * 2, self.schedules),
        ]
        if not self.w.engine.citus:  # not on Citus yet: the purge joins a local table
            loops.append(("retention pass", lambda: cfg.retention_interval, self.retention))
        return [asyncio.create_task(forever(what, n, every, body), name=f"{what}:{n.name}")
                for what, every, body in loops]

    # -- in-flight -------------------------------------------------------------------

    async def watch(self) -> None:
        """Stop local runs that lost their workflow (cancelled, taken over)."""
        last = self.w.last_heartbeat.get(self.node.name, 0.0)
        if time.monotonic() - last > self.cfg.lease_timeout:
            # Our lease may have lapsed. The runs go on: if another worker took a
            # workflow over, its fence refuses our writes and the run stops; if nobody
            # did, cancelling here would leave it "running" for good.
            log.warning("no heartbeat on node %s for %.1fs", self.node.name,
                        time.monotonic() - last)
            return
        mine = [(k, r) for k, r in self.w.running.items() if r.node is self.node]
        if not mine:
            return
        rows = await self.driver.fetch(
            self.node, "check_inflight", [k[0] for k, _ in mine], [k[1] for k, _ in mine],
            [r.fence for _, r in mine], [r.shard for _, r in mine], patience=BACKGROUND)
        for row in rows:
            key = (row["tenant_id"], row["workflow_id"])
            r = self.w.running.get(key)
            if r is not None:
                r.task.cancel()
            self.w.engine.notify_done(*key)

    # -- recovery --------------------------------------------------------------------

    async def recover(self) -> None:
        """Orphans of workers that stopped heartbeating go back to pending; sessions
        such a worker left frozen inside a transaction are ended so that the rows they
        lock can be recovered (next pass) and sent to and cancelled."""
        self._ticks += 1
        node, w = self.node, self.w
        # these two also where we own no shard (all of them another worker's): we
        # claim there the workflows their owners lack
        if self._ticks % 4 == 1 and not w.engine.citus:
            await w.find_foreign_work(node)
        if self._ticks % 10 == 0:
            await w.reconcile(node)
        shards = w.shards_of(node)
        if not shards:
            return
        live = [r["worker_id"] for r in
                await self.driver.fetch(node, "live_workers", patience=BACKGROUND)]
        citus = w.engine.citus
        rows = await self.driver.fetch(
            node, "recover_orphans_citus" if citus else "recover_orphans", shards, live,
            self.cfg.lease_timeout, patience=BACKGROUND)
        if rows:
            w.engine.metrics["recovered"] += len(rows)
            log.info("recovered %d workflow(s) on node %s", len(rows), node.name)
            w.work_found(node, {r["shard_id"] for r in rows})
        if self._ticks % 10 == 0:
            row = await self.driver.fetchrow(node, "backlog_pending", shards,
                                             patience=BACKGROUND)
            w.backlog[node.name] = int(row["n"]) if row else 0
        if self._ticks % 20 == 0:
            names = [r["name"] for r in
                     await self.driver.fetch(node, "live_workflow_names", patience=BACKGROUND)]
            await self.driver.execute(node, "mark_unrunnable", shards, names,
                                      patience=BACKGROUND)
            await self.driver.execute(node, "prune_workers", patience=BACKGROUND)
        if not citus:
            # last, and on its own: whatever it meets must not stop the rest above
            try:
                row = await self.driver.fetchrow(
                    node, "end_frozen_sessions", [worker_tag(x) for x in live],
                    self.cfg.lease_timeout, patience=BACKGROUND)
            except ShardflowError as exc:
                log.warning("ending frozen sessions on node %s failed: %s", node.name, exc)
                return
            if row is not None and row["ended"]:
                w.engine.metrics["frozen_sessions_ended"] += int(row["ended"])
                log.warning("ended %d session(s) of stopped workers left in a "
                            "transaction on node %s", row["ended"], node.name)

    # -- schedules -------------------------------------------------------------------

    async def schedules(self) -> None:
        """Fire due schedule ticks on the shards this worker owns (migration 0006)."""
        shards = self.w.shards_of(self.node)
        if not shards:
            return
        for row in await self.driver.fetch(self.node, "due_schedules", shards,
                                           patience=BACKGROUND):
            await self._fire(row)

    async def _fire(self, row: Any) -> None:
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
        max_attempts = self.w.engine.max_attempts_of(row["workflow_name"])
        async with self.driver.transaction(self.node) as conn:
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
                    max_attempts, None, 0.0, self.cfg.notify)
        self.w.engine.metrics["schedule_ticks"] += len(ticks)

    # -- retention -------------------------------------------------------------------

    async def retention(self) -> None:
        """Delete expired finished workflows (small batches per shard) from the shards
        this worker owns, and VACUUM the partitions that lost enough rows, so the tables
        stay as small as the retention says (migration 0007 says why autovacuum alone
        does not keep up with small partitions)."""
        node = self.node
        shards = self.w.shards_of(node)
        if not shards:
            return
        rows = await self.driver.fetch(node, "purge_finished", shards, 500,
                                       patience=BACKGROUND)
        now = time.monotonic()
        for r in rows:
            s = r["shard_id"]
            self._dirty[s] = self._dirty.get(s, 0) + int(r["purged"])
            self._since.setdefault(s, now)
            self.w.engine.metrics["purged"] += int(r["purged"])
        owned = set(shards)
        for s in [s for s in self._dirty if s not in owned]:
            # moved or rebalanced away: its partitions may be gone here
            self._dirty.pop(s, None)
            self._since.pop(s, None)
        due = sorted(s for s, count in self._dirty.items()
                     if count >= self.cfg.vacuum_after_purged or now - self._since[s] >= 60.0)
        # forgotten before the VACUUM: one that fails (a partition dropped by a shard
        # move meanwhile) is not tried again forever
        for s in due:
            self._dirty.pop(s, None)
            self._since.pop(s, None)
        if due:
            await self.driver.vacuum_shards(node, due)
            self.w.engine.metrics["vacuumed_shards"] += len(due)


class HeartbeatThread(threading.Thread):
    """Renews one worker's lease on one node from a thread of its own.

    In a thread, with its own connection, so that a busy event loop (hundreds of
    workflows queued for pool connections) cannot delay the heartbeat past the lease
    and get its own healthy workflows recovered by others; one thread per node, so
    that a node that stalls (a statement that never returns) cannot delay the
    heartbeats of the others. It still stops renewing when the event loop has not
    ticked for half a lease: a wedged process must lose its workflows, not hold them
    forever.
    """

    def __init__(self, worker: Worker, node: Node) -> None:
        super().__init__(name=f"shardflow-heartbeat-{node.name}", daemon=True)
        self.worker = worker
        self.node = node
        self.stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None

    def _beat(self) -> None:
        w = self.worker
        conn = self._conn
        if conn is None or conn.closed:
            # a statement timeout of a lease: a heartbeat that takes longer than that
            # is worthless anyway, and the thread must come back to try again
            ms = int(w.cfg.lease_timeout * 1000)
            conn = self._conn = psycopg.connect(
                self.node.spec.dsn, autocommit=True, connect_timeout=2,
                cursor_factory=psycopg.RawCursor,
                options=f"-c statement_timeout={ms}",
                # a host that died with our statement in flight: the socket errors
                # instead of waiting for ever (a stall of one node only holds its thread)
                keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                tcp_user_timeout=max(ms, 1000),
                application_name=f"shardflow heartbeat {worker_tag(w.worker_id)}")
        conn.execute(Q["heartbeat"], (w.worker_id, socket.gethostname(), os.getpid(),
                                      w.engine.workflow_names, w.cfg.lease_timeout))
        w.engine.prom.lease_renewals.labels(self.node.name).inc()
        w.last_heartbeat[self.node.name] = time.monotonic()

    def run(self) -> None:
        w = self.worker
        try:
            while not self.stop.wait(w.cfg.heartbeat_interval):
                if time.monotonic() - w.loop_tick > w.cfg.lease_timeout / 2:
                    log.warning("event loop stalled: not renewing the lease")
                    continue
                try:
                    self._beat()
                except psycopg.Error as exc:
                    log.warning("heartbeat on node %s failed: %s", self.node.name, exc)
                    if self._conn is not None:
                        self._conn.close()
                        self._conn = None
        finally:
            if self._conn is not None:
                self._conn.close()
