"""`shardflow cluster up|status|down` on real servers, and its one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from .conftest import make_tempdir


def sf(*args: str, env: dict[str, str] | None = None,
       cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardflow.cli", *args], capture_output=True,
                          text=True, timeout=180, env=env, cwd=cwd)


def assert_one_line_error(out: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("shardflow: error: ")
    assert fragment in lines[0], lines[0]


def alive(pid: int) -> bool:
    """True if pid runs (a zombie awaiting its reaper counts as stopped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture
def tmp(request: pytest.FixtureRequest) -> Iterator[Path]:
    d = make_tempdir("shardflow-cli-")
    yield d
    sf("cluster", "down", "--dir", str(d / "c"), "--purge")
    shutil.rmtree(d, ignore_errors=True)


def test_up_status_reuse_down(tmp: Path) -> None:
    d = str(tmp / "c")
    up = sf("cluster", "up", "--nodes", "2", "--shards", "8", "--dir", d)
    assert up.returncode == 0, up.stderr
    spec = json.loads((tmp / "c" / "cluster.json").read_text())
    assert [n["name"] for n in spec["nodes"]] == ["node0", "node1"]
    assert sorted(set(spec["placement"])) == ["node0", "node1"]
    st = sf("cluster", "status", "--dir", d, "--json")
    rows = json.loads(st.stdout)
    assert [r["running"] for r in rows] == [True, True]
    assert [r["shards"] for r in rows] == [4, 4]
    assert {r["role"] for r in rows} == {"primary"}
    pids = [r["pid"] for r in rows]
    # each node answers, and has the schema
    for n in spec["nodes"]:
        with psycopg.connect(n["dsn"]) as conn:
            row = conn.execute("SELECT node_name, shard_count FROM shardflow.node_info").fetchone()
            assert row == (n["name"], 8)
    # a second up reuses the running cluster
    again = sf("cluster", "up", "--dir", d)
    assert again.returncode == 0, again.stderr
    assert [r["pid"] for r in json.loads(sf("cluster", "status", "--dir", d, "--json").stdout)] == pids
    # asking for another size is refused, naming the existing cluster
    other = sf("cluster", "up", "--nodes", "3", "--dir", d)
    assert_one_line_error(other, "a 2-node cluster already exists")
    table = sf("cluster", "status", "--dir", d)
    assert "node0" in table.stdout and "primary" in table.stdout
    down = sf("cluster", "down", "--dir", d)
    assert down.returncode == 0 and "stopped 2 node(s)" in down.stdout
    assert not any(alive(pid) for pid in pids)
    rows = json.loads(sf("cluster", "status", "--dir", d, "--json").stdout)
    assert [r["running"] for r in rows] == [False, False]


def test_nodes_zero_is_refused(tmp: Path) -> None:
    assert_one_line_error(sf("cluster", "up", "--nodes", "0", "--dir", str(tmp / "c")),
                          "--nodes must be at least 1")
    assert not (tmp / "c").exists()


def test_taken_port_is_refused_and_nothing_is_left(tmp: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = sf("cluster", "up", "--nodes", "1", "--port", str(port), "--dir", str(tmp / "c"))
    assert_one_line_error(out, f"port {port} is already taken")
    assert not (tmp / "c").exists()


def test_foreign_data_dir_is_refused(tmp: Path) -> None:
    (tmp / "c").mkdir()
    (tmp / "c" / "precious.txt").write_text("not ours")
    assert_one_line_error(sf("cluster", "up", "--dir", str(tmp / "c")),
                          "is not empty and holds no shardflow cluster")
    assert (tmp / "c" / "precious.txt").read_text() == "not ours"


def test_corrupt_cluster_file_is_named(tmp: Path) -> None:
    (tmp / "c").mkdir()
    (tmp / "c" / "cluster.json").write_text("{not json")
    assert_one_line_error(sf("cluster", "status", "--dir", str(tmp / "c")), "is corrupt")
    (tmp / "c" / "cluster.json").write_text('{"format": 1, "nodes": []}')
    assert_one_line_error(sf("cluster", "status", "--dir", str(tmp / "c")), "is corrupt")


def test_missing_binaries_say_how_to_install(tmp: Path) -> None:
    env = dict(os.environ, SHARDFLOW_PG_BINDIR=str(tmp / "nothing-here"))
    assert_one_line_error(sf("cluster", "up", "--dir", str(tmp / "c"), env=env),
                          "apt-get install postgresql")
    assert not (tmp / "c").exists()


def test_unwritable_data_dir_is_refused(tmp: Path) -> None:
    blocker = tmp / "file"
    blocker.write_text("")
    assert_one_line_error(sf("cluster", "up", "--dir", str(blocker / "c")), "cannot create data dir")


def test_a_dir_the_postgres_user_cannot_reach_still_works(tmp: Path) -> None:
    """Run as root from a clone under a 0700 directory (like /root): cluster.json stays
    there, the node data goes under the postgres user's home, and down --purge cleans up."""
    if os.geteuid() != 0:
        pytest.skip("only root runs servers as another user")
    private = tmp / "private"
    private.mkdir(mode=0o700)
    d = str(private / "c")
    up = sf("cluster", "up", "--nodes", "1", "--shards", "4", "--dir", d)
    assert up.returncode == 0, up.stderr
    spec = json.loads((private / "c" / "cluster.json").read_text())
    data_dir = Path(spec["nodes"][0]["data_dir"])
    assert not str(data_dir).startswith(str(private)) and data_dir.is_dir()
    rows = json.loads(sf("cluster", "status", "--dir", d, "--json").stdout)
    assert [r["running"] for r in rows] == [True]
    assert sf("cluster", "down", "--dir", d, "--purge").returncode == 0
    assert not data_dir.exists() and not data_dir.parent.parent.exists()


def test_cluster_commands_follow_shardflow_cluster(tmp: Path) -> None:
    """Without --dir, `cluster up|status|down` use the directory of $SHARDFLOW_CLUSTER, as
    every other command reads that file: up, then shard list, find the same cluster."""
    env = dict(os.environ, SHARDFLOW_CLUSTER=str(tmp / "c" / "cluster.json"))
    up = sf("cluster", "up", "--nodes", "1", "--shards", "4", env=env, cwd=tmp)
    assert up.returncode == 0, up.stderr
    assert (tmp / "c" / "cluster.json").is_file() and not (tmp / ".shardflow").exists()
    listed = sf("shard", "list", "--json", env=env, cwd=tmp)
    assert listed.returncode == 0, listed.stderr
    assert [r["shard"] for r in json.loads(listed.stdout)] == [0, 1, 2, 3]
    rows = json.loads(sf("cluster", "status", "--json", env=env, cwd=tmp).stdout)
    assert [r["running"] for r in rows] == [True]
    assert sf("cluster", "down", env=env, cwd=tmp).returncode == 0
