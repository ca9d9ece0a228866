"""The driver layer: connection pools per node and every SQL call the engine makes.

The engine never writes SQL; it calls a method here, which runs a named block of
``sql/queries.sql`` on the node that holds the tenant's shard. Driver errors are
translated to shardflow errors (by SQLSTATE) at this boundary.
"""

from __future__ import annotations

import asyncio
import random
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

import asyncpg
import psycopg.conninfo

from .clusterfile import NodeSpec
from .errors import RetryableDatabaseError, RoutingError, ShardflowError, translate
from .routing import ShardMap

T = TypeVar("T")

# Everything asyncpg raises that translate() understands: server errors, socket errors,
# and client-side errors (a closed connection; no read-write host during a failover).
DRIVER_ERRORS = (asyncpg.PostgresError, OSError, asyncpg.InterfaceError,
                 asyncpg.InternalClientError)
Record = Any  # asyncpg.Record: untyped upstream

_BLOCK_RE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries() -> dict[str, str]:
    """Named blocks of ``sql/queries.sql``: ``-- name: x`` up to the next one."""
    text = resources.files("shardflow.sql").joinpath("queries.sql").read_text("utf-8")
    parts = _BLOCK_RE.split(text)
    queries = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        # drop the leading comment lines of a block, keep the statement
        lines = [ln for ln in body.strip().splitlines() if not ln.startswith("--")]
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


Q = load_queries()


def dsn_for_server(dsn: str, host: str, port: int) -> str:
    """``dsn``'s settings (user, password, database, TLS) for another server: how a
    worker reaches a Citus worker node that the coordinator's catalog names."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params.pop("host", None)
    params.pop("port", None)
    params.pop("hostaddr", None)
    user = urllib.parse.quote(str(params.pop("user", "")), safe="")
    password = params.pop("password", None)
    auth = f"{user}:{urllib.parse.quote(str(password), safe='')}" if password else user
    db = urllib.parse.quote(str(params.pop("dbname", "")), safe="")
    query = urllib.parse.urlencode({k: str(v) for k, v in params.items() if v is not None})
    host_part = f"[{host}]" if ":" in host else host
    return (f"postgresql://{auth}{'@' if auth else ''}{host_part}:{port}/{db}"
            + (f"?{query}" if query else ""))


@dataclass(slots=True)
class Node:
    spec: NodeSpec
    pool: asyncpg.Pool | None = None
    # one-connection pools for the hot loops of a process (see Driver.fetch's lane)
    lanes: dict[str, asyncpg.Pool] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name


async def _with_retry(
    op: Callable[[], Awaitable[T]], *, what: str, patience: float, base: float = 0.05,
    pool: asyncpg.Pool | None = None,
) -> T:
    """Run an idempotent operation, retrying connection-class failures (a restarting
    node, a failover) with jittered exponential backoff for up to ``patience`` seconds.
    Other errors go straight up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    i = 0
    while True:
        try:
            return await op()
        except ShardflowError:
            raise
        except DRIVER_ERRORS as exc:
            err = translate(exc, context=what)
            if not isinstance(err, RetryableDatabaseError) or loop.time() >= deadline:
                raise err from exc
            if pool is not None and isinstance(exc, asyncpg.InternalClientError):
                # a connection in a broken state went back to the pool: replace them all
                await pool.expire_connections()
        delay = min(1.0, base * 2**i) * (0.5 + random.random())
        await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))
        i += 1


# See Driver._create_pool. A transaction step that awaits something else than its
# connection for longer than this (an HTTP call inside the transaction) is rolled back.
IDLE_IN_TRANSACTION_TIMEOUT = "60s"

# A background call that has not answered after this many seconds is given up on (the
# node stalls: a frozen host, a partition that drops nothing and forwards nothing).
STALL_TIMEOUT = 10.0


async def _bounded(node: Node, pool: asyncpg.Pool, method: str, sql: str,
                   args: tuple[Any, ...], what: str) -> Any:
    """``conn.<method>(sql, *args)`` on a connection of ``pool``, or
    RetryableDatabaseError after STALL_TIMEOUT without an answer.

    Neither asyncpg's own ``timeout=`` nor ``asyncio.wait_for`` bounds a call on a
    stalled connection: both wait for the cancellation of the query, which goes over
    the same stalled network. So the call runs as a task, and when it has not answered
    in time its connection is terminated (closed on our side, no goodbye), which ends
    the task and gives the pool its slot back; the caller goes on: a loop that visits
    the nodes one after another (the ownership loop, a shard-map refresh) must not stop
    at one stalled node."""
    held: list[asyncpg.Connection] = []

    async def call() -> Any:
        async with pool.acquire() as conn:
            held.append(conn)
            return await getattr(conn, method)(sql, *args)

    task = asyncio.ensure_future(call())
    # if abandoned, its outcome is nobody's: retrieved so that asyncio does not log it
    task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
    try:
        done, _ = await asyncio.wait({task}, timeout=STALL_TIMEOUT)
    except asyncio.CancelledError:
        # the caller stops (the engine closes): the call is cancelled as any other
        # would be. Not terminated: connections ended under a pool that is closing
        # were released twice ("release() called on a free connection holder")
        task.cancel()
        raise
    if task in done:
        return task.result()
    # a query in flight: its connection is terminated (cancelling it would wait on the
    # stalled link, holding the pool's slot); still waiting for a connection: the wait
    # is cancelled (else the statement would run later, unheard: a claim whose rows
    # nobody starts)
    for conn in held:
        conn.terminate()
    if not held:
        task.cancel()
    raise RetryableDatabaseError(f"{what}: no answer from node {node.name} within "
                                 f"{STALL_TIMEOUT:g}s (stalled?)")


# Background loops (claims, recovery, ownership) retry briefly: they run again on
# their next tick, and must not stall other nodes' work behind one unreachable node.
BACKGROUND = 1.0


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Skip asyncpg's default reset on release (UNLISTEN *, RESET ALL, ...): one extra
    round trip per pool use, and shardflow never changes session state on a pooled
    connection (LISTEN runs on connections of its own). Transaction steps that set
    configuration must use SET LOCAL, which ends with their transaction."""


class Driver:
    """Pools for every node of a cluster, routed by the shard map."""

    def __init__(self, nodes: Sequence[NodeSpec], shard_map: ShardMap, *, pool_size: int,
                 connect_timeout: float, reconnect_timeout: float = 30.0,
                 application_name: str = "shardflow") -> None:
        self.nodes = {n.name: Node(n) for n in nodes}
        # Citus worker nodes, where workers claim from shard placements directly; not
        # part of the shard map (every other call goes through the coordinator)
        self.placement_nodes: dict[str, Node] = {}
        self.shard_map = shard_map
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self.patience = reconnect_timeout
        self.application_name = application_name
        missing = sorted(set(shard_map.placement) - set(self.nodes))
        if missing:
            raise RoutingError(f"the shard map places shards on node(s) {missing}, "
                               f"which the cluster does not list ({sorted(self.nodes)})")

    async def open(self) -> None:
        await asyncio.gather(*(self._open_node(n) for n in self.nodes.values()))

    async def _create_pool(self, node: Node, size: int, *, user_code: bool = False
                           ) -> asyncpg.Pool:
        # short OLTP statements: compiling them costs more than it saves
        settings = {
            "jit": "off",
            # how recovery recognises the sessions of a worker that froze (SIGSTOP, a
            # paused VM) inside a transaction and ends them: see end_frozen_sessions
            "application_name": self.application_name,
        }
        if not user_code:
            # the backstop for any other frozen client holding row locks (a send, a
            # transaction step run alone): its transaction is rolled back after a
            # minute idle, rather than blocking that workflow's checkpoints, sends and
            # cancels for as long as the process stays frozen. Not on the lane of
            # grouped transaction steps: one slow step there would kill its whole
            # group, again and again (a worker's own frozen sessions are ended by the
            # others' recovery, see end_frozen_sessions)
            settings["idle_in_transaction_session_timeout"] = IDLE_IN_TRANSACTION_TIMEOUT
        if not user_code:
            # shardflow's own statements are planned for their values, every time: a
            # cached generic plan is made once, from the statistics of that moment, and
            # one made while a partition looked empty (a quiet node after a VACUUM)
            # reads the whole partition per call once it has filled up (a planner
            # audit found this for most key lookups). A custom plan prunes to the one
            # partition at plan time and sees its current size. The hot statements
            # are functions that choose their own plans (migrations 0008-0016). The
            # lane where users' transaction steps run keeps Postgres's default.
            settings["plan_cache_mode"] = "force_custom_plan"
        # min_size 0: a pool keeping a minimum reconnects in the background, which
        # during a failover only fills the log with its failures
        return await asyncpg.create_pool(
            node.spec.dsn, min_size=0, max_size=size,
            max_inactive_connection_lifetime=60, reset=_keep_session,
            server_settings=settings,
        )

    async def _open_node(self, node: Node) -> None:
        # Start-up waits for a node that is briefly down instead of crashing
        # (dbos-transact-py#150): retry until connect_timeout.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        delay = 0.1
        while True:
            try:
                node.pool = await self._create_pool(node, self._pool_size)
                return
            except DRIVER_ERRORS as exc:
                err = translate(exc, context=f"connecting to node {node.name}")
                if not isinstance(err, RetryableDatabaseError) or loop.time() > deadline:
                    raise err from exc
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

    async def placement_node(self, host: str, port: int, like: str) -> Node:
        """A pool on the Citus worker node host:port, connecting with the settings of
        DSN ``like`` (opened once, kept until close)."""
        name = f"{host}:{port}"
        node = self.placement_nodes.get(name)
        if node is None:
            node = Node(NodeSpec(name, host, port, dsn_for_server(like, host, port),
                                 role="citus worker"))
            await self._open_node(node)
            self.placement_nodes[name] = node
        return node

    async def close(self) -> None:
        for node in [*self.nodes.values(), *self.placement_nodes.values()]:
            for pool in [*node.lanes.values(), *([node.pool] if node.pool else [])]:
                # a graceful close waits for every connection to come back: one held
                # by a call to a stalled node never does, so after a while, abort
                try:
                    await asyncio.wait_for(asyncio.shield(pool.close()), STALL_TIMEOUT)
                except TimeoutError:
                    pool.terminate()
            node.lanes.clear()
            node.pool = None

    # -- routing ---------------------------------------------------------------------

    def node_for_shard(self, shard: int) -> Node:
        return self.nodes[self.shard_map.node_of_shard(shard)]

    def pool(self, node: Node) -> asyncpg.Pool:
        if node.pool is None:
            raise ShardflowError("the engine is not open: use 'async with engine:'")
        return node.pool

    # -- primitives ------------------------------------------------------------------

    async def fetch(self, node: Node, query: str, *args: Any,
                    patience: float | None = None, lane: str | None = None) -> list[Record]:
        """Rows of ``query`` on ``node``. ``lane``: on a connection of its own, kept for
        one loop of this process (the claim loop, the group commit writer) rather than
        any pooled one: their statements span every shard partition of the node, and
        their plan, made once per connection, costs tens of milliseconds to make (and
        to remake after autovacuum touches a partition) — once per lane, not once per
        pooled connection."""
        pool = self.pool(node) if lane is None else await self.lane(node, lane)
        rows: list[Record] = await self._run(node, pool, "fetch", query, args, patience)
        return rows

    async def _run(self, node: Node, pool: asyncpg.Pool, method: str, query: str,
                   args: tuple[Any, ...], patience: float | None) -> Any:
        """``pool.<method>(query, *args)``, retried for ``patience`` seconds (the
        driver's default when None); a background call (patience BACKGROUND) is also
        bounded in time (see _bounded)."""
        sql = Q[query]
        what = f"{query} on node {node.name}"
        call = getattr(pool, method)
        if patience == BACKGROUND:
            return await _with_retry(lambda: _bounded(node, pool, method, sql, args, what),
                                     what=what, pool=pool, patience=patience)
        return await _with_retry(lambda: call(sql, *args), what=what, pool=pool,
                                 patience=self.patience if patience is None else patience)

    async def lane(self, node: Node, lane: str) -> asyncpg.Pool:
        """The one-connection pool ``lane`` of ``node`` (made on first use)."""
        self.pool(node)  # refuses when the engine is closed
        pool = node.lanes.get(lane)
        if pool is None:
            pool = node.lanes[lane] = await self._create_pool(
                node, 1, user_code=lane == "transactions")
        return pool

    async def fetchrow(self, node: Node, query: str, *args: Any,
                       patience: float | None = None) -> Record | None:
        return await self._run(node, self.pool(node), "fetchrow", query, args, patience)

    async def execute(self, node: Node, query: str, *args: Any,
                      patience: float | None = None) -> str:
        return str(await self._run(node, self.pool(node), "execute", query, args, patience))

    @asynccontextmanager
    async def transaction(self, node: Node) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction on ``node``; errors translated on the way out."""
        try:
            async with self.pool(node).acquire() as conn, conn.transaction():
                yield conn
        except DRIVER_ERRORS as exc:
            raise translate(exc, context=f"transaction on node {node.name}") from exc

    async def vacuum_shards(self, node: Node, shards: Sequence[int]) -> None:
        """VACUUM the partitions of ``shards`` on ``node`` (see migration 0007): the
        space of purged rows is reused at once instead of after autovacuum's visit."""
        tables = ", ".join(f'shardflow."{t}_s{int(s)}"' for s in shards
                           for t in ("workflows", "steps", "messages", "events"))
        sql = Q["vacuum_partitions"].format(tables=tables)
        await _with_retry(lambda: self.pool(node).execute(sql),
                          what=f"vacuum on node {node.name}", pool=node.pool,
                          patience=BACKGROUND)

    # -- shard-routed calls (tenant and shard are always explicit) ------------------------

    async def on_shard(self, shard: int, query: str, *args: Any) -> list[Record]:
        return await self.fetch(self.node_for_shard(shard), query, *args)

    async def row_on_shard(self, shard: int, query: str, *args: Any) -> Record | None:
        return await self.fetchrow(self.node_for_shard(shard), query, *args)

    async def insert_workflow(self, *, tenant: str, shard: int, workflow_id: str, name: str,
                              queue: str, priority: int, inputs: str, parent_id: str | None,
                              max_attempts: int, timeout: float | None,
                              delay: float, notify: bool) -> bool:
        """Insert a workflow row; False when (tenant, id) already existed."""
        row = await self.row_on_shard(
            shard, "insert_workflow", tenant, shard, workflow_id, name, queue, priority,
            inputs, parent_id, max_attempts, timeout, delay, notify,
        )
        return row is not None

    async def claim(self, node: Node, shards: list[int], names: list[str], worker_id: str,
                    limit: int, per_tenant: int, tenant_cap: int) -> list[Record]:
        return await self.fetch(node, "claim_workflows", shards, names, worker_id, limit,
                                per_tenant, tenant_cap, patience=BACKGROUND, lane="claim")
