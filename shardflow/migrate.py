"""Numbered SQL migrations, applied on every node, and node initialisation.

Migrations are ``shardflow/migrations/NNNN_slug.sql``. Each node keeps the versions it
has applied in ``shardflow.schema_migrations``. Applying takes a transaction-level
advisory lock, so any number of processes (``cluster up``, every ``Engine`` start) can
migrate the same node at once: one applies, the others wait and then find nothing to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import psycopg

from .errors import ConfigError, RoutingError
from .routing import ShardMap

# Arbitrary constant: the advisory lock key that serialises migrators on a node.
_MIGRATION_LOCK = 0x5F_5348_4152_44  # "_SHARD"

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS shardflow;
CREATE TABLE IF NOT EXISTS shardflow.schema_migrations (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""

_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """All migrations shipped with the package, in version order."""
    found = []
    for entry in resources.files("shardflow.migrations").iterdir():
        m = _NAME_RE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ConfigError(f"migrations must be numbered 1..N without gaps, found {versions}")
    return found


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> list[int]:
    """Apply the pending migrations on one node; return the versions applied."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(_BOOTSTRAP)
        rows = conn.execute("SELECT version FROM shardflow.schema_migrations").fetchall()
        done = {r[0] for r in rows}
        for mig in load_migrations():
            if mig.version in done:
                continue
            conn.execute(mig.sql)
            conn.execute(
                "INSERT INTO shardflow.schema_migrations (version, name) VALUES (%s, %s)",
                (mig.version, mig.name),
            )
            applied.append(mig.version)
    return applied


def current_version(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    row = conn.execute(
        "SELECT coalesce(max(version), 0) FROM shardflow.schema_migrations"
    ).fetchone()
    return int(str(row[0])) if row else 0


def init_node(
    conn: psycopg.Connection[tuple[object, ...]], node_name: str, shard_map: ShardMap
) -> None:
    """Record the node's identity and the shard map; create its shard partitions.

    Idempotent. Refuses, naming both sides, when the node already belongs to a cluster
    with another name or shard count: that is a shard map that disagrees with the nodes.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        row = conn.execute("SELECT node_name, shard_count FROM shardflow.node_info").fetchone()
        if row is not None:
            if row[0] != node_name or row[1] != shard_map.shard_count:
                raise RoutingError(
                    f"node {node_name!r}: the database says it is node {row[0]!r} of a "
                    f"{row[1]}-shard cluster, but the shard map says node {node_name!r} "
                    f"of a {shard_map.shard_count}-shard cluster"
                )
        else:
            conn.execute(
                "INSERT INTO shardflow.node_info (node_name, shard_count) VALUES (%s, %s)",
                (node_name, shard_map.shard_count),
            )
        conn.execute(
            """
            INSERT INTO shardflow.shard_map (shard_id, node, epoch)
            SELECT s, n, %s FROM unnest(%s::int[], %s::text[]) AS m(s, n)
            ON CONFLICT (shard_id) DO UPDATE SET node = excluded.node, epoch = excluded.epoch
            WHERE shard_map.epoch < excluded.epoch
            """,
            (shard_map.epoch, list(range(shard_map.shard_count)), list(shard_map.placement)),
        )
        for shard in shard_map.shards_of(node_name):
            conn.execute(
                "SELECT shardflow.ensure_shard(%s, %s)", (shard, shard_map.shard_count)
            )


def read_shard_map(conn: psycopg.Connection[tuple[object, ...]]) -> ShardMap:
    """The shard map as stored on a node."""
    rows = conn.execute(
        "SELECT shard_id, node, epoch FROM shardflow.shard_map ORDER BY shard_id"
    ).fetchall()
    if not rows:
        raise RoutingError("the node holds no shard map: was it initialised?")
    return ShardMap(len(rows), tuple(str(r[1]) for r in rows),
                    max(int(str(r[2])) for r in rows))


CITUS_TABLES = ("workflows", "steps", "messages", "events")


def has_citus(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone()
    return row is not None


def distribute(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    """On a Citus coordinator: distribute the workflow tables by tenant_id (colocated).
    Idempotent; returns the tables distributed now."""
    done = {str(r[0]) for r in conn.execute(
        "SELECT logicalrelid::regclass::text FROM pg_dist_partition").fetchall()}
    text = resources.files("shardflow.sql").joinpath("citus.sql").read_text("utf-8")
    statements = [s.strip() for s in text.split(";")
                  if s.strip() and not all(ln.startswith("--") for ln in s.strip().splitlines())]
    distributed = []
    for stmt in statements:
        body = "\n".join(ln for ln in stmt.splitlines() if not ln.startswith("--"))
        table = next(t for t in CITUS_TABLES if f"'shardflow.{t}'," in body)
        if f"shardflow.{table}" in done:
            continue
        conn.execute(body)
        distributed.append(table)
    return distributed
