"""The README's quick start runs as written, against a real cluster."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from shardflow import clusterfile
from shardflow.clusterfile import ClusterSpec, NodeSpec

from .conftest import PerTestDB, make_tempdir

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_example_runs(db: PerTestDB) -> None:
    text = README.read_text()
    block = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S)
    assert block is not None, "README has no quick start python block"
    d = make_tempdir("shardflow-readme-")
    spec = ClusterSpec(
        nodes=tuple(NodeSpec(n.name, n.host, n.port, db.dsn_of(n.name)) for n in db.spec.nodes),
        shard_map=db.spec.shard_map,
    )
    clusterfile.save(spec, d / "cluster.json")
    (d / "quickstart.py").write_text(block.group(1))
    env = db.env()
    env["SHARDFLOW_CLUSTER"] = str(d / "cluster.json")
    out = subprocess.run([sys.executable, str(d / "quickstart.py")], env=env, cwd=d,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "receipt-o-1"


def test_the_ten_sql_questions_run(db: PerTestDB) -> None:
    """The README's operator queries run on a node (after some workflows ran there)."""
    import asyncio

    import psycopg

    text = README.read_text()
    block = re.search(r"### Ten questions.*?```sql\n(.*?)```", text, re.S)
    assert block is not None
    statements = [s.strip() for s in block.group(1).split(";") if s.strip()]
    assert len(statements) == 10
    eng = db.engine()

    @eng.workflow(name="readme.sql")
    async def flow() -> int:
        return 1

    async def go() -> None:
        async with eng:
            await (await eng.start(flow, tenant="readme-sql")).result(timeout=30)

    asyncio.run(go())
    with psycopg.connect(db.dsn_of(db.node_of_tenant("readme-sql"))) as conn:
        for sql in statements:
            conn.execute(sql).fetchall()  # raises on any mistake in the README
