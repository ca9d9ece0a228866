"""Standbys and automatic failover with real Patroni + etcd processes: a node's primary
is SIGKILLed (Patroni and Postgres) under load; nothing acknowledged may be lost and no
transactional step may run twice. Skipped, with the reason, without Patroni/etcd
(``bash infra/install-ha.sh`` installs them; CI does)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from shardflow import ha
from shardflow.clusterfile import ClusterSpec
from shardflow.drill import main as drill_main
from shardflow.localcluster import LocalCluster

from .conftest import make_tempdir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("patroni") and shutil.which("etcd")),
                       reason="Patroni and etcd are not installed (bash infra/install-ha.sh)"),
]


@pytest.fixture(scope="module")
def ha_cluster() -> Iterator[tuple[ClusterSpec, LocalCluster]]:
    base = make_tempdir("shardflow-ha-")
    lc = LocalCluster(base / "c")
    spec = lc.up(1, ha=True, shard_count=8)
    try:
        yield spec, lc
    finally:
        lc.down(purge=True)
        shutil.rmtree(base, ignore_errors=True)


def test_each_node_has_a_synchronous_standby(ha_cluster: tuple[ClusterSpec, LocalCluster]
                                             ) -> None:
    spec, _ = ha_cluster
    state = ha.HAState.from_json(spec.settings["ha"])
    members = state.of("node0")
    assert len(members) == 2 and state.synchronous
    assert [m.is_primary() for m in members] == [True, False]
    assert members[1].is_sync_standby()
    primary = spec.node("node0")
    assert "target_session_attrs=read-write" in primary.dsn
    with psycopg.connect(primary.dsn) as conn:
        row = conn.execute("SELECT sync_state FROM pg_stat_replication").fetchone()
        assert row is not None and row[0] == "sync"
        setting = conn.execute("SHOW synchronous_standby_names").fetchone()
        assert setting is not None and "node0-m1" in str(setting[0])


def test_failover_drill_loses_nothing(ha_cluster: tuple[ClusterSpec, LocalCluster],
                                      tmp_path: Path) -> None:
    spec, lc = ha_cluster
    results = make_tempdir("shardflow-ha-results-")
    out = results / "drill.json"
    try:
        code = drill_main(["failover", "--cluster-file", str(lc.file), "--node", "node0",
                           "--rate", "25", "--duration", "16", "--fault-at", "4",
                           "--tenants", "20", "--worker-processes", "2",
                           "--results-dir", str(results), "--json", str(out)])
        summary = json.loads(out.read_text())
    finally:
        shutil.rmtree(results, ignore_errors=True)
    assert code == 0, summary
    assert summary["integrity_ok"] and summary["lost"] == 0
    assert summary["duplicates_tx"] == 0
    assert summary["acknowledged"] == summary["completed"] == 400
    details = summary["details"]
    assert details["new_primary"] == "node0-m1" and details["old_primary"] == "node0-m0"
    assert summary["promote_s"] is not None
    # the old primary came back as a standby of the new one
    assert details["old_primary_rejoined_s"] is not None
    state = ha.HAState.from_json(spec.settings["ha"])
    assert state.of("node0")[1].is_primary() and state.of("node0")[0].is_replica()
