"""Tenant isolation enforced by Postgres: a client bound to one tenant, connected as a
role granted that tenant only (`shardflow tenants grant`), can neither read nor change
another tenant's workflows — tried through the engine and with plain SQL."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import shardflow
from shardflow import InvalidArgument, clusterfile
from shardflow.cli import main as cli_main

from .conftest import PerTestDB, make_tempdir
from .flows import FAST

A, B = "acme-iso", "globex-iso"


@pytest.fixture
def roles(db: PerTestDB) -> Iterator[tuple[str, str, Path]]:
    d = make_tempdir("shardflow-rls-")
    clusterfile.save(db.cluster_spec(), d / "cluster.json")
    ra, rb = (f"t_{uuid.uuid4().hex[:10]}" for _ in range(2))
    for role, tenant in ((ra, A), (rb, B)):
        assert cli_main(["tenants", "grant", tenant, "--role", role,
                         "--cluster", str(d / "cluster.json")]) == 0
    try:
        yield ra, rb, d / "cluster.json"
    finally:
        for dsn in db.dsns:  # roles are per server: drop them again
            with psycopg.connect(dsn, autocommit=True) as conn:
                for role in (ra, rb):
                    conn.execute(f'DROP OWNED BY "{role}"')
                    conn.execute(f'DROP ROLE "{role}"')
        shutil.rmtree(d, ignore_errors=True)


def _as(dsn: str, role: str) -> str:
    return dsn.replace("postgres@", f"{role}@", 1)


async def test_a_tenant_role_cannot_cross_tenants(db: PerTestDB,
                                                  roles: tuple[str, str, Path]) -> None:
    ra, _rb, _ = roles
    service = db.engine()

    @service.workflow(name="iso.flow")
    async def flow(x: int) -> int:
        return x * 10

    async with service:
        a1 = await service.start(flow, 1, tenant=A, workflow_id="a1")
        b1 = await service.start(flow, 2, tenant=B, workflow_id="b1")
        assert [await a1.result(timeout=30), await b1.result(timeout=30)] == [10, 20]

        client = shardflow.Engine(dsns=[_as(d, ra) for d in db.dsns], tenant=A,
                                  run_workers=False, config=FAST)

        @client.workflow(name="iso.flow")
        async def same(x: int) -> int:
            return x * 10

        async with client:
            assert (await client.get_info(A, "a1"))["status"] == "succeeded"
            mine = await client.start(same, 5)  # the bound tenant by default
            assert await mine.result(timeout=30) == 50
            assert {r["tenant_id"] for r in await client.list_workflows()} == {A}
            with pytest.raises(InvalidArgument, match="bound to tenant"):
                await client.get_info(B, "b1")
            with pytest.raises(InvalidArgument, match="bound to tenant"):
                await client.start(same, 1, tenant=B)

        # the database refuses it too, whatever the client does
        shard = db.spec.shard_map.shard(B)
        with psycopg.connect(_as(db.dsn_of(db.node_of_tenant(B)), ra),
                             autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM shardflow.workflows "
                               "WHERE tenant_id = %s", (B,)).fetchone()
            assert row is not None and row[0] == 0
            cur = conn.execute("UPDATE shardflow.workflows SET status = 'cancelled' "
                               "WHERE tenant_id = %s", (B,))
            assert cur.rowcount == 0
            with pytest.raises(psycopg.errors.InsufficientPrivilege,
                               match="row-level security"):
                conn.execute(
                    "INSERT INTO shardflow.workflows (tenant_id, shard_id, workflow_id, "
                    "name, inputs) VALUES (%s, %s, 'forged', 'iso.flow', '{}')", (B, shard))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT * FROM shardflow.workflows_s{shard}")  # no bypass
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM shardflow.tenant_roles")  # who else is there
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM shardflow.shard_map")
        b_info = await service.get_info(B, "b1")
        assert b_info["status"] == "succeeded" and b_info["output"] == 20


def test_a_tenant_bound_engine_is_a_client_only(db: PerTestDB) -> None:
    with pytest.raises(InvalidArgument, match="run_workers=False"):
        shardflow.Engine(dsns=db.dsns, tenant=A)


@pytest.mark.parametrize("argv, message", [
    (["tenants", "grant", "acme", "--role", "Bad-Name"], "lowercase Postgres identifier"),
    (["tenants", "grant", "acme", "--role", "postgres"], "superuser"),
    (["tenants", "grant", "", "--role", "t_ok"], "tenant"),
])
def test_bad_grant_input(argv: list[str], message: str,
                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
