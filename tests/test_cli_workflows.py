"""`shardflow workflows show|steps|cancel|resume|retry|fork` against a real cluster:
JSON output, tables, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardflow import clusterfile
from shardflow.cli import main as cli_main

from .conftest import PerTestDB, make_tempdir
from .flows import FAST

TENANT = "cli-acme"


@pytest.fixture
def cluster_file(db: PerTestDB) -> Iterator[Path]:
    d = make_tempdir("shardflow-cli-")
    clusterfile.save(db.cluster_spec(), d / "cluster.json")
    try:
        yield d / "cluster.json"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _run_workflows(db: PerTestDB) -> None:
    """A failed workflow (after one checkpointed step) and a pending one."""
    import dataclasses

    eng = db.engine(config=dataclasses.replace(FAST, max_attempts=1))

    @eng.step(name="cli.first")
    async def first() -> int:
        return 1

    @eng.workflow(name="cli.breaks", max_attempts=1)
    async def breaks() -> None:
        await first()
        raise ValueError("boom")

    client = db.engine(run_workers=False)  # a client: what it starts stays pending

    @client.workflow(name="cli.later")
    async def later() -> None:
        return None

    async def go() -> None:
        async with eng:
            h = await eng.start(breaks, tenant=TENANT, workflow_id="wf-broken")
            with pytest.raises(Exception, match="boom"):
                await h.result(timeout=30)
        async with client:
            await client.start(later, tenant=TENANT, workflow_id="wf-pending")

    asyncio.run(go())


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    try:
        code = cli_main(list(argv))
    except SystemExit as exc:  # argparse's own errors (one line, exit 2)
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    try:
        return code, json.loads(cap.out), cap.err
    except json.JSONDecodeError:
        return code, cap.out, cap.err


def test_show_steps_retry_fork_cancel(db: PerTestDB, cluster_file: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _run_workflows(db)
    c = ["--cluster", str(cluster_file)]
    code, info, _ = _cli(capsys, "workflows", "show", TENANT, "wf-broken", "--json", *c)
    assert code == 0 and info["status"] == "failed" and "boom" in json.dumps(info["error"])

    code, steps, _ = _cli(capsys, "workflows", "steps", TENANT, "wf-broken", "--json", *c)
    assert code == 0 and [s["name"] for s in steps] == ["cli.first"]
    assert steps[0]["status"] == "done" and steps[0]["attempts"] == 1

    code, out, _ = _cli(capsys, "workflows", "steps", TENANT, "wf-broken", *c)
    assert code == 0 and "cli.first" in out  # the table

    code, forked, _ = _cli(capsys, "workflows", "fork", TENANT, "wf-broken", "--from-step",
                           "1", "--new-id", "wf-forked", "--json", *c)
    assert code == 0 and forked["workflow_id"] == "wf-forked"
    assert forked["status"] == "pending" and forked["name"] == "cli.breaks"

    code, info, _ = _cli(capsys, "workflows", "retry", TENANT, "wf-broken", "--json", *c)
    assert code == 0 and info["status"] == "pending" and info["error"] is None

    code, out, _ = _cli(capsys, "workflows", "cancel", TENANT, "wf-pending", "--json", *c)
    assert code == 0 and out["cancelled"] == ["wf-pending"]
    code, info, _ = _cli(capsys, "workflows", "show", TENANT, "wf-pending", "--json", *c)
    assert info["status"] == "cancelled"
    code, info, _ = _cli(capsys, "workflows", "resume", TENANT, "wf-pending", "--json", *c)
    assert code == 0 and info["status"] == "pending"


@pytest.mark.parametrize("argv, message", [
    (["show", TENANT, "no-such-workflow"], "no workflow 'no-such-workflow'"),
    (["retry", TENANT, "wf-pending"], "retry applies to failed or dead workflows"),
    (["fork", TENANT, "wf-broken", "--from-step", "-1"], "argument --from-step: must be >= 0"),
    (["show", "", "wf-broken"], "tenant"),
])
def test_bad_input_is_one_line_exit_2(db: PerTestDB, cluster_file: Path, argv: list[str],
                                      message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _run_workflows(db)
    code, _, err = _cli(capsys, "workflows", *argv, "--cluster", str(cluster_file))
    assert code == 2
    assert err.count("\n") == 1 and message in err, err


def test_status_and_tenants_top(db: PerTestDB, cluster_file: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    _run_workflows(db)
    c = ["--cluster", str(cluster_file)]
    code, report, _ = _cli(capsys, "status", "--shards", "--json", *c)
    assert code == 0
    nodes = report["nodes"]
    assert set(nodes) == {n.name for n in db.spec.nodes}
    assert sum(r["pending"] for r in nodes.values()) == 1  # wf-pending
    assert all(r["in_recovery"] is False for r in nodes.values())
    assert sum(r["failed_1m"] for r in nodes.values()) == 1  # wf-broken
    # every shard listed once, on its node; nobody owns them (no worker running)
    listed = [s["shard_id"] for rows in report["shards"].values() for s in rows]
    assert sorted(listed) == list(range(db.spec.shard_map.shard_count))
    assert {o for per in report["shard_owners"].values() for o in per} == {"(unowned)"}
    code, out, _ = _cli(capsys, "status", *c)
    assert code == 0 and "shardflow status" in out

    code, top, _ = _cli(capsys, "tenants", "top", "--limit", "5", "--json", *c)
    assert code == 0 and top[0]["tenant_id"] == TENANT and top[0]["pending"] == 1


def test_list_with_a_time_range(db: PerTestDB, cluster_file: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    _run_workflows(db)
    c = ["--cluster", str(cluster_file)]
    code, rows, _ = _cli(capsys, "workflows", "list", "--tenant", TENANT, "--since", "10m",
                         "--json", *c)
    assert code == 0 and {r["workflow_id"] for r in rows} == {"wf-broken", "wf-pending"}
    code, rows, _ = _cli(capsys, "workflows", "list", "--until", "2020-01-01T00:00:00",
                         "--json", *c)
    assert code == 0 and rows == []
    code, _, err = _cli(capsys, "workflows", "list", "--since", "yesterday", *c)
    assert code == 2 and "--since 'yesterday' is neither" in err
