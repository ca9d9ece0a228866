"""Migrations, the schema snapshot, and the database refusing misrouted rows."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import psycopg
import pytest

from shardflow.errors import MisroutedWrite, RoutingError, translate
from shardflow.localcluster import LocalCluster, find_binaries
from shardflow.migrate import current_version, init_node, load_migrations, migrate
from shardflow.routing import ShardMap

from .conftest import PerTestDB

SNAPSHOT = Path(__file__).resolve().parent.parent / "shardflow" / "sql" / "schema.sql"


def _dump_schema(dsn: str) -> str:
    bins = find_binaries()
    out = subprocess.run(
        [bins.tool("pg_dump"), "--schema-only", "--no-owner", "--no-privileges",
         "--schema=shardflow", "--exclude-table=shardflow.schema_migrations", dsn],
        capture_output=True, text=True, check=True,
    ).stdout
    # drop version banners and session settings: they differ between pg_dump builds
    lines = [ln for ln in out.splitlines()
             if ln and not ln.startswith("--") and not ln.startswith("SET ")
             and not ln.startswith("SELECT pg_catalog.set_config")
             and not ln.startswith("\\restrict") and not ln.startswith("\\unrestrict")]
    return "\n".join(lines) + "\n"


def _fresh_db(db: PerTestDB, name: str) -> str:
    port = db.spec.nodes[0].port
    with psycopg.connect(LocalCluster.admin_dsn(port), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return LocalCluster.admin_dsn(port, name)


def test_migrations_rebuild_the_schema_snapshot(db: PerTestDB) -> None:
    """A fresh migrate produces exactly shardflow/sql/schema.sql."""
    dsn = _fresh_db(db, db.name + "_snap")
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)
    dumped = _dump_schema(dsn)
    if os.environ.get("SHARDFLOW_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(dumped)
    assert SNAPSHOT.exists(), "no schema.sql: run with SHARDFLOW_UPDATE_SNAPSHOT=1 once"
    assert dumped == SNAPSHOT.read_text(), (
        "the migrations no longer produce shardflow/sql/schema.sql: add a migration, then "
        "refresh the snapshot with SHARDFLOW_UPDATE_SNAPSHOT=1")


def test_migrate_is_idempotent_and_versioned(db: PerTestDB) -> None:
    dsn = _fresh_db(db, db.name + "_idem")
    with psycopg.connect(dsn, autocommit=True) as conn:
        first = migrate(conn)
        second = migrate(conn)
        assert first == [m.version for m in load_migrations()]
        assert second == []
        assert current_version(conn) == len(load_migrations())


def test_concurrent_migrators_apply_once(db: PerTestDB) -> None:
    """Many processes migrating one node at once: one applies, the others wait."""
    dsn = _fresh_db(db, db.name + "_conc")
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                results.append(migrate(conn))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(len(r) for r in results) == [0] * 5 + [len(load_migrations())]


def test_row_for_a_tenant_on_the_wrong_node_is_refused(db: PerTestDB) -> None:
    """Postgres itself rejects a workflow row sent to a node that lacks its shard."""
    smap = db.spec.shard_map
    tenant = "acme"
    shard, home = smap.route(tenant)
    wrong = next(n.name for n in db.spec.nodes if n.name != home)
    insert = ("INSERT INTO shardflow.workflows (tenant_id, shard_id, workflow_id, name, inputs)"
              " VALUES (%s, %s, 'w1', 'f', '{}')")
    with db.connect(wrong) as conn, pytest.raises(psycopg.errors.CheckViolation) as info:
        conn.execute(insert, (tenant, shard))
    assert isinstance(translate(info.value), MisroutedWrite)
    with db.connect(home) as conn:
        conn.execute(insert, (tenant, shard))
        # and a row filed under the wrong shard on the right node is refused too
        other = next(s for s in smap.shards_of(home) if s != shard)
        with pytest.raises(psycopg.errors.CheckViolation, match="tenant_shard"):
            conn.execute(insert, (tenant, other))


def test_every_shard_lives_on_exactly_one_node(db: PerTestDB) -> None:
    owners: dict[int, list[str]] = {}
    for node in db.spec.nodes:
        with db.connect(node.name) as conn:
            rows = conn.execute(
                "SELECT (regexp_match(relname, '_s(\\d+)$'))[1]::int FROM pg_class "
                "WHERE relname LIKE 'workflows\\_s%' AND relkind = 'r'").fetchall()
            for (s,) in rows:
                owners.setdefault(s, []).append(node.name)
            stored = conn.execute("SELECT count(*) FROM shardflow.shard_map").fetchone()
            assert stored is not None and stored[0] == db.spec.shard_map.shard_count
    assert sorted(owners) == list(range(db.spec.shard_map.shard_count))
    for s, nodes in owners.items():
        assert nodes == [db.spec.shard_map.node_of_shard(s)]


def test_init_node_refuses_a_disagreeing_shard_map(db: PerTestDB) -> None:
    with db.connect("node0") as conn, pytest.raises(RoutingError, match="16-shard cluster"):
        init_node(conn, "node0", ShardMap.balanced(32, ["node0", "node1", "node2"]))
    with db.connect("node0") as conn, pytest.raises(RoutingError, match="node 'node1'"):
        init_node(conn, "node1", db.spec.shard_map)
