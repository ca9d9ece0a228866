"""Moving a shard between nodes while workers run loses nothing and runs nothing twice."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from shardflow import InvalidArgument, RoutingError
from shardflow.shardmove import move_shard

from .conftest import PerTestDB
from .flows import make_engine
from .test_crash import Workers, workers  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


def effects_everywhere(db: PerTestDB, wf: str) -> dict[str, int]:
    """Transactional effects of a workflow, summed over every node."""
    out: dict[str, int] = {}
    for node in db.spec.nodes:
        with db.connect(node.name) as conn:
            for what, n in conn.execute("SELECT what, count(*) FROM public.effects "
                                        "WHERE workflow_id = %s GROUP BY what", (wf,)).fetchall():
                out[what] = out.get(what, 0) + n
    return out


def _dump_state(db: PerTestDB, shard: int) -> None:
    """What a stuck move looks like, for the test log."""
    for node in db.spec.nodes:
        with db.connect(node.name) as conn:
            print(node.name, "map", conn.execute(
                "SELECT node, epoch FROM shardflow.shard_map WHERE shard_id = %s",
                (shard,)).fetchall())
            print(node.name, "leases", conn.execute("SELECT * FROM shardflow.shard_leases "
                                                    "WHERE shard_id = %s", (shard,)).fetchall())
            print(node.name, "workers", conn.execute(
                "SELECT worker_id, lease_expires_at > now() FROM shardflow.workers").fetchall())
            print(node.name, "workflows", conn.execute(
                "SELECT status, owner, count(*) FROM shardflow.workflows WHERE shard_id = %s "
                "GROUP BY 1, 2", (shard,)).fetchall())


async def test_move_a_shard_under_load(db: PerTestDB, workers: Workers) -> None:  # noqa: F811
    smap = db.spec.shard_map
    shard = smap.shard("mover-0")
    source = smap.node_of_shard(shard)
    target = next(n.name for n in db.spec.nodes if n.name != source)
    movers = [t for t in (f"mover-{i}" for i in range(5000)) if smap.shard(t) == shard][:15]
    others = [f"other-{i}" for i in range(15)]
    for _ in range(2):
        workers.spawn(block=False)
    async with make_engine(db.dsns, run_workers=False) as client:
        handles = []
        for t in movers + others:
            for j in range(4):
                handles.append(await client.start("steady", j, tenant=t, workflow_id=f"{t}-{j}"))
        await asyncio.sleep(0.4)  # mid-flight
        report = await asyncio.to_thread(move_shard, db.cluster_spec(), shard, target)
        try:
            results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
        except TimeoutError:
            _dump_state(db, shard)
            raise
    assert results == [j for _ in movers + others for j in range(4)]
    assert report.source == source and report.target == target
    on_shard = 4 * len([t for t in movers + others if smap.shard(t) == shard])
    assert report.rows["workflows"] == on_shard
    for h in handles:
        # every transactional step took effect exactly once, wherever it ran
        assert effects_everywhere(db, h.workflow_id) == {"s0": 1, "s1": 1, "s2": 1}, h
    with db.connect(source) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (f"shardflow.workflows_s{shard}",)).fetchone()
        assert row == (None,)
        m = conn.execute("SELECT node FROM shardflow.shard_map WHERE shard_id = %s",
                         (shard,)).fetchone()
        assert m == (target,)
    with db.connect(target) as conn:
        row = conn.execute("SELECT count(*) FROM shardflow.workflows WHERE shard_id = %s "
                           "AND status = 'succeeded'", (shard,)).fetchone()
        assert row == (on_shard,)
    print(f"shard {shard} moved {source}->{target}: pause {report.pause_s * 1000:.0f} ms")


async def test_move_refuses_bad_requests(db: PerTestDB) -> None:
    spec = db.cluster_spec()
    shard = spec.shard_map.shard("x")
    home = spec.shard_map.node_of_shard(shard)
    with pytest.raises(InvalidArgument, match="already on node"):
        move_shard(spec, shard, home)
    with pytest.raises(InvalidArgument, match="not a node of this cluster"):
        move_shard(spec, shard, "node9")
    with pytest.raises(InvalidArgument, match="out of range"):
        move_shard(spec, 999, "node0")
    other = next(n.name for n in spec.nodes if n.name != home)
    # a target that somehow holds rows of the shard is not overwritten
    with db.connect(other) as conn:
        conn.execute("SELECT shardflow.ensure_shard(%s, %s)", (shard, spec.shard_map.shard_count))
        conn.execute("INSERT INTO shardflow.workflows (tenant_id, shard_id, workflow_id, name, "
                     "inputs) VALUES ('x', %s, 'stray', 'f', '{}')", (shard,))
    with pytest.raises(RoutingError, match="already holds 1 rows"):
        move_shard(spec, shard, other)


def test_shard_cli_lists_and_moves(db: PerTestDB) -> None:
    from shardflow import clusterfile

    from .conftest import make_tempdir

    d = make_tempdir("shardflow-shardcli-")
    clusterfile.save(db.cluster_spec(), d / "cluster.json")
    cf = str(d / "cluster.json")
    out = subprocess.run([sys.executable, "-m", "shardflow.cli", "shard", "list", "--cluster", cf,
                          "--json"], capture_output=True, text=True, timeout=60)
    rows = json.loads(out.stdout)
    assert [r["shard"] for r in rows] == list(range(16))
    moved = subprocess.run([sys.executable, "-m", "shardflow.cli", "shard", "move", "3", "--to",
                            "node0" if rows[3]["node"] != "node0" else "node1", "--cluster", cf],
                           capture_output=True, text=True, timeout=60)
    assert moved.returncode == 0, moved.stderr
    assert "the shard paused" in moved.stdout
    bad = subprocess.run([sys.executable, "-m", "shardflow.cli", "shard", "move", "3", "--to",
                          "nowhere", "--cluster", cf], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'nowhere' is not a node" in bad.stderr
