"""Test fixtures: a real 3-node Postgres cluster per test session, a fresh database per test.

The session starts real ``postgres`` processes (as the postgres OS user when run as
root) in a temporary directory. Each test gets its own database on every node, cloned
from a migrated and shard-initialised template, so tests never see each other's rows
and can run in parallel (pytest-xdist gives every worker process its own cluster).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from shardflow import Engine, EngineConfig
from shardflow.clusterfile import ClusterSpec, NodeSpec
from shardflow.localcluster import LocalCluster
from shardflow.migrate import init_node, migrate

from .flows import EFFECTS_DDL, FAST

TEST_SHARDS = 16
TEMPLATE = "sf_template"
ROOT = Path(__file__).resolve().parent.parent

def make_tempdir(prefix: str) -> Path:
    """A temp dir the postgres OS user can reach (pytest's own tmp is root-only)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    return d


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterSpec]:
    """A real 3-node local cluster for the whole session."""
    base = make_tempdir("shardflow-test-")
    lc = LocalCluster(base / "cluster")
    spec = lc.up(3, shard_count=TEST_SHARDS)
    try:
        for node in spec.nodes:
            admin = LocalCluster.admin_dsn(node.port)
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
            with psycopg.connect(LocalCluster.admin_dsn(node.port, TEMPLATE),
                                 autocommit=True) as conn:
                migrate(conn)
                init_node(conn, node.name, spec.shard_map)
                conn.execute(EFFECTS_DDL)  # the user table of the test workflows
        yield spec
    finally:
        lc.down(purge=True)
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class PerTestDB:
    """One test's database on every node of the session cluster."""

    spec: ClusterSpec
    name: str

    @property
    def dsns(self) -> list[str]:
        return [LocalCluster.admin_dsn(n.port, self.name) for n in self.spec.nodes]

    def dsn_of(self, node_name: str) -> str:
        return LocalCluster.admin_dsn(self.spec.node(node_name).port, self.name)

    def node_of_tenant(self, tenant: str) -> str:
        return self.spec.shard_map.route(tenant)[1]

    def connect(self, node_name: str) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.dsn_of(node_name), autocommit=True)

    def tenant_conn(self, tenant: str) -> psycopg.Connection[tuple[object, ...]]:
        return self.connect(self.node_of_tenant(tenant))

    def cluster_spec(self) -> ClusterSpec:
        """A cluster spec whose DSNs point at this test's databases."""
        return ClusterSpec(
            nodes=tuple(NodeSpec(n.name, n.host, n.port, self.dsn_of(n.name))
                        for n in self.spec.nodes),
            shard_map=self.spec.shard_map,
        )

    def run_all(self, sql: str) -> None:
        """Run a statement on every node (e.g. a user table for transactional steps)."""
        for node in self.spec.nodes:
            with self.connect(node.name) as conn:
                conn.execute(sql)

    def scalar(self, tenant: str, sql: str, *params: object) -> object:
        """One value from the tenant's node."""
        with self.tenant_conn(tenant) as conn:
            row = conn.execute(sql, params).fetchone()
            return None if row is None else row[0]

    def engine(self, config: EngineConfig = FAST, **kw: object) -> Engine:
        return Engine(dsns=self.dsns, config=config, **kw)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that builds engines on this database."""
        env = dict(os.environ)
        env["SHARDFLOW_TEST_DSNS"] = ",".join(self.dsns)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        return env


@pytest.fixture
def db(cluster: ClusterSpec) -> Iterator[PerTestDB]:
    name = "t_" + uuid.uuid4().hex[:12]
    for node in cluster.nodes:
        with psycopg.connect(LocalCluster.admin_dsn(node.port), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    yield PerTestDB(cluster, name)
    for node in cluster.nodes:
        with psycopg.connect(LocalCluster.admin_dsn(node.port), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


PYTHON = sys.executable
