"""Move a shard to another node while workers run: copy-then-switch with a brief fence.

1. The target node gets empty partitions for the shard.
2. On the source node, one transaction takes ACCESS EXCLUSIVE locks on the shard's
   partitions: every read and write of the shard waits. This is the fence; the pause it
   causes lasts until step 4 commits and grows with the shard's size
   (``MoveReport.pause_s``). Step 4 needs ACCESS EXCLUSIVE anyway: taking a weaker lock
   first and upgrading it deadlocks with a claim that read the shard and then waits for
   the fence to lock its rows.
3. The shard's rows are streamed to the target (binary COPY) and committed there;
   workflows that were running are put back to pending, so their next owner claims them
   with a new fencing token. A worker that was running one finds its partition gone and
   stops: nothing it writes afterwards can land anywhere.
4. In the source transaction: the shard map says "target" (epoch + 1), the source's
   partitions are emptied and refuse new rows, and it commits. From here the move has
   happened; the emptied partitions are dropped afterwards.
5. The other nodes' shard maps (the target's too) are updated: not before step 4, so a
   failed move never leaves a newer map anywhere that a client could have adopted.
   Clients take the highest epoch they see, so a crash between 4 and 5 still routes
   correctly; a stale client's write reaches a node without the partition, is refused by
   Postgres, and the client reloads the map.

If anything fails before step 4 commits, the source rolls back (nothing moved) and the
target's copy is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from .clusterfile import ClusterSpec
from .config import check_number
from .errors import ClusterError, InvalidArgument, RoutingError
from .migrate import read_shard_map

TABLES = ("workflows", "steps", "messages", "events")


@dataclass(frozen=True, slots=True)
class MoveReport:
    shard: int
    source: str
    target: str
    pause_s: float
    total_s: float
    rows: dict[str, int] = field(default_factory=dict)
    epoch: int = 0
    # the emptied old partitions were dropped (else they stay, empty and refusing rows)
    dropped: bool = False


def _part(table: str, shard: int) -> sql.Composed:
    return sql.SQL("shardflow.{}").format(sql.Identifier(f"{table}_s{shard}"))


def move_shard(spec: ClusterSpec, shard: int, target: str, *,
               lock_timeout_s: float = 5.0) -> MoveReport:
    t_start = time.perf_counter()
    names = [n.name for n in spec.nodes]
    if target not in names:
        raise InvalidArgument(f"--to {target!r} is not a node of this cluster ({names})")
    # every argument checked before the first connection: the shard count never
    # changes, so the cluster file's map bounds the shard id as well as the nodes' do
    count = spec.shard_map.shard_count
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < count:
        raise InvalidArgument(f"shard {shard!r} is out of range 0..{count - 1}")
    # lock_timeout is sent in milliseconds as an int (at most 24 days)
    check_number("--lock-timeout", lock_timeout_s, low=0, low_open=True, high=86400,
                 error=InvalidArgument)
    conns: dict[str, psycopg.Connection[tuple[object, ...]]] = {}
    try:
        for n in spec.nodes:
            try:
                conns[n.name] = psycopg.connect(n.dsn, connect_timeout=10, autocommit=True)
            except psycopg.Error as exc:
                raise ClusterError(f"node {n.name} is unreachable: {exc}") from exc
        return _move(conns, shard, target, lock_timeout_s, t_start)
    except psycopg.errors.LockNotAvailable as exc:
        raise RoutingError(f"shard {shard}: the fence did not get its locks within "
                           f"--lock-timeout {lock_timeout_s:g}s (a long transaction holds "
                           "the shard); nothing moved") from exc
    finally:
        for c in conns.values():
            c.close()


def _move(conns: dict[str, psycopg.Connection[tuple[object, ...]]], shard: int, target: str,
          lock_timeout_s: float, t_start: float) -> MoveReport:
    """Steps 1-5 of the module docstring, on one open connection per node."""
    maps = {name: read_shard_map(c) for name, c in conns.items()}
    smap = max(maps.values(), key=lambda m: m.epoch)
    if not 0 <= shard < smap.shard_count:
        raise InvalidArgument(f"shard {shard} is out of range 0..{smap.shard_count - 1}")
    source = smap.node_of_shard(shard)
    if source == target:
        raise InvalidArgument(f"shard {shard} is already on node {target!r}")
    epoch = smap.epoch + 1
    src, dst = conns[source], conns[target]
    dst.execute("SELECT shardflow.ensure_shard(%s, %s)", (shard, smap.shard_count))
    for t in TABLES:
        row = dst.execute(sql.SQL("SELECT count(*) FROM {}").format(_part(t, shard))
                          ).fetchone()
        if row and row[0]:
            raise RoutingError(f"node {target!r} already holds {row[0]} rows of shard "
                               f"{shard} in {t}: refusing to overwrite them")
    rows: dict[str, int] = {}
    try:
        with src.transaction():
            src.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
            src.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                sql.SQL(", ").join(_part(t, shard) for t in TABLES)))
            t_fence = time.perf_counter()
            with dst.transaction():
                for t in TABLES:
                    rows[t] = _copy(src, dst, _part(t, shard))
                # running workflows start over (from their checkpoints) under a new
                # owner and fence; their old runs can no longer write anywhere
                dst.execute(sql.SQL(
                    "UPDATE {} SET status = 'pending', owner = NULL, ready_at = now(), "
                    "reason = 'shard moved' WHERE status = 'running'").format(
                        _part("workflows", shard)))
            src.execute("UPDATE shardflow.shard_map SET node = %s, epoch = %s "
                        "WHERE shard_id = %s", (target, epoch, shard))
            # Empty the old partitions and make them refuse every new row. Not DROP
            # here: dropping a partition locks its parent, and a worker that waits
            # on our fence while holding the parent would deadlock with us.
            for t in TABLES:
                src.execute(sql.SQL("TRUNCATE {}").format(_part(t, shard)))
                src.execute(sql.SQL(
                    "ALTER TABLE {} ADD CONSTRAINT {} CHECK (false) NOT VALID").format(
                        _part(t, shard), sql.Identifier(f"{t}_s{shard}_moved_away")))
            src.execute("DELETE FROM shardflow.shard_leases WHERE shard_id = %s", (shard,))
        pause = time.perf_counter() - t_fence
    except BaseException:
        # the source rolled back and still holds the shard: drop the target's copy
        dst.execute("SELECT shardflow.drop_shard(%s)", (shard,))
        raise
    for name, c in conns.items():
        if name != source:
            c.execute("UPDATE shardflow.shard_map SET node = %s, epoch = %s "
                      "WHERE shard_id = %s AND epoch < %s", (target, epoch, shard, epoch))
    dropped = _drop_quietly(src, shard)
    return MoveReport(shard, source, target, pause, time.perf_counter() - t_start, rows,
                      epoch, dropped)


def _drop_quietly(conn: psycopg.Connection[tuple[object, ...]], shard: int) -> bool:
    """Drop the emptied partitions, waiting only briefly each time: a DROP queued behind
    a long query on the parent table would stall every query queued behind it."""
    for _ in range(20):
        try:
            with conn.transaction():
                conn.execute("SET LOCAL lock_timeout = '200ms'")
                conn.execute("SELECT shardflow.drop_shard(%s)", (shard,))
            return True
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
            time.sleep(0.1)
    return False


def _copy(src: psycopg.Connection[tuple[object, ...]],
          dst: psycopg.Connection[tuple[object, ...]], table: sql.Composed) -> int:
    with src.cursor().copy(sql.SQL("COPY {} TO STDOUT (FORMAT binary)").format(table)) as out, \
            dst.cursor().copy(sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(table)) as inp:
        for chunk in out:
            inp.write(chunk)
    row = dst.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
    return int(str(row[0])) if row else 0
