"""DSN passwords never reach messages; TLS settings in a DSN pass through to both
drivers (asyncpg for the engine, psycopg for the sync client and admin paths)."""

from __future__ import annotations

import dataclasses

import pytest

import shardflow
from shardflow.clusterfile import redact
from shardflow.syncclient import SyncClient

from .conftest import PerTestDB
from .flows import FAST


@pytest.mark.parametrize("dsn, shown", [
    ("postgresql://app:s3cret@db1:5432,db2:5432/x?sslmode=require",
     "postgresql://app:***@db1:5432,db2:5432/x?sslmode=require"),
    ("host=db1 user=app password='a b' sslmode=verify-full",
     "host=db1 user=app password=*** sslmode=verify-full"),
    ("postgresql://app@db1/x", "postgresql://app@db1/x"),
])
def test_redact(dsn: str, shown: str) -> None:
    assert redact(dsn) == shown
    assert "s3cret" not in redact(dsn) and "a b" not in redact(dsn)


async def test_tls_settings_pass_through_to_both_drivers(db: PerTestDB) -> None:
    # the local servers have no TLS: sslmode=disable must be honoured by both drivers
    # (asyncpg's own default, "prefer", would try TLS first); sslmode=require must fail
    dsns = [d + "?sslmode=disable" for d in db.dsns]
    eng = shardflow.Engine(dsns=dsns, config=FAST)

    @eng.workflow(name="tls.flow")
    async def flow() -> str:
        return "ok"

    async with eng:
        assert await (await eng.start(flow, tenant="tls")).result(timeout=30) == "ok"
    client = SyncClient(dsns=dsns)
    try:
        assert client.start("tls.flow", tenant="tls", workflow_id="tls-2") == "tls-2"
    finally:
        client.close()
    strict = shardflow.Engine(dsns=[d + "?sslmode=require" for d in db.dsns],
                              config=dataclasses.replace(FAST, connect_timeout=1.0))
    with pytest.raises(shardflow.ShardflowError):
        async with strict:
            pass
