"""The ``shardflow`` command line.

Every error prints one line, ``shardflow: error: …``, and exits 2: argparse's (no usage
dump), shardflow's own, a driver's (libpq's messages span lines: collapsed), and any
other (named by its type; ``SHARDFLOW_DEBUG=1`` re-raises it with its traceback). The
bench and the drills, which have parsers of their own, use the same pieces
(:class:`OneLineParser`, :func:`guarded`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from . import __version__, clusterfile
from .checks import MAX_RETENTION_SECONDS
from .cliutil import (
    CLUSTER_HELP,
    DIR_HELP,
    OneLineParser,
    connect_node,
    guarded,
    number_arg,
    when_arg,
)
from .config import INT32_MAX, number_problem
from .errors import ClusterError, translate
from .localcluster import DEFAULT_SHARDS, MAX_NODES

if TYPE_CHECKING:
    pass

console = Console()
err_console = Console(stderr=True)

EPILOG = f"""examples:
  shardflow cluster up --nodes 4          start a local 4-node cluster in .shardflow/
  shardflow cluster status                nodes, roles, ports, shards
  shardflow demo                          cluster up, run workflows, print a summary
  shardflow bench --rate 50 --duration 15 a load run with a live dashboard and a report
  shardflow drill worker-crash --kill 1   SIGKILL a worker under load; recovery + audit
  shardflow worker myapp.flows:engine --processes 2
  shardflow workflows list --tenant acme --status pending
  shardflow cluster down --purge          stop every node and delete the data

cluster file (every command, the bench and the drills too): {clusterfile.RULE}.
errors: one line on stderr, exit code 2; SHARDFLOW_DEBUG=1 adds the traceback.
"""
# The most worker processes: far above any real use, low enough that a typo (2**40)
# is refused instead of forked.
MAX_PROCESSES = 256


class _Parser(OneLineParser):
    error_prog = "shardflow"


def _positive_int(high: float = INT32_MAX) -> Any:
    return number_arg(int, low=1, high=high)


def _cluster_arg(p: argparse.ArgumentParser) -> None:
    # --cluster: the flag's name before the bench and the drills' --cluster-file
    p.add_argument("--cluster-file", "--cluster", dest="cluster", type=Path, default=None,
                   metavar="FILE", help=CLUSTER_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="shardflow",
        description="Durable, multi-tenant, sharded workflows on PostgreSQL.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"shardflow {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    cl = sub.add_parser("cluster", help="manage the local multi-node Postgres cluster")
    clsub = cl.add_subparsers(dest="cluster_command", required=True, parser_class=_Parser)
    up = clsub.add_parser(
        "up",
        help="start (or reuse) a local cluster",
        description="Start N Postgres primaries on loopback, migrate them, place the shards, "
        "and write DIR/cluster.json. A second 'up' reuses the running cluster.",
    )
    up.add_argument("--nodes", type=int, default=None, help="number of primaries (default 3)")
    up.add_argument("--replicas", type=int, default=0,
                    help="streaming standbys per node, managed by Patroni + etcd (apt-get "
                         "install patroni etcd-server); synchronous replication")
    up.add_argument("--ha", action="store_true",
                    help="automatic failover with Patroni + etcd (implies --replicas 1)")
    up.add_argument("--async-replicas", action="store_true",
                    help="asynchronous replication: faster commits, and a failover may "
                         "lose the last acknowledged ones")
    up.add_argument("--shards", type=int, default=DEFAULT_SHARDS,
                    help=f"logical shards (default {DEFAULT_SHARDS}; see the README on "
                         "choosing: each node's share is one partition per table)")
    up.add_argument("--port", type=int, default=None, help="first port (default: free ports)")
    up.add_argument("--dir", type=Path, default=None, help=DIR_HELP)
    up.add_argument("--citus", action="store_true",
                    help="a Citus cluster: a coordinator and --nodes workers (default 2)")
    st = clsub.add_parser("status", help="nodes, roles, ports, pids, shards")
    st.add_argument("--dir", type=Path, default=None, help=DIR_HELP)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    dn = clsub.add_parser("down", help="stop every node of the local cluster")
    dn.add_argument("--dir", type=Path, default=None, help=DIR_HELP)
    dn.add_argument("--purge", action="store_true", help="also delete the data directory")

    mg = sub.add_parser("migrate", help="apply pending migrations on every node")
    _cluster_arg(mg)

    wk = sub.add_parser(
        "worker",
        help="run workers for an engine in your code",
        description="Import MODULE:ATTR (a shardflow.Engine) and run its workers.",
    )
    wk.add_argument("target", help="module:attribute of an Engine, e.g. myapp.flows:engine")
    wk.add_argument("--processes", type=_positive_int(MAX_PROCESSES), default=1,
                    help="worker processes; if one exits, the others are stopped and "
                         "the command fails")
    wk.add_argument("--metrics-port", type=_positive_int(65535), default=None,
                    help="serve Prometheus metrics on 127.0.0.1:PORT/metrics "
                         "(process i of --processes on PORT+i: each needs a free port)")

    wf = sub.add_parser("workflows", help="inspect workflows across all shards")
    wfsub = wf.add_subparsers(dest="wf_command", required=True, parser_class=_Parser)
    ls = wfsub.add_parser("list", help="list workflows (fans out to every node)")
    ls.add_argument("--tenant", default=None)
    ls.add_argument("--status", default=None)
    ls.add_argument("--name", default=None)
    ls.add_argument("--limit", type=_positive_int(), default=50)
    ls.add_argument("--since", type=when_arg("--since"), default=None,
                    help="created at or after: ISO time (UTC if no zone) or an age like "
                         "90s, 15m, 2h, 7d")
    ls.add_argument("--until", type=when_arg("--until"), default=None,
                    help="created before: same forms as --since")
    ls.add_argument("--json", action="store_true")
    _cluster_arg(ls)
    for cmd, text in (
            ("show", "one workflow: status, inputs, output, error, attempts, times"),
            ("steps", "a workflow's step checkpoints (attempts count re-runs)"),
            ("cancel", "cancel a workflow and its children"),
            ("resume", "run a cancelled, failed or dead workflow again from its last "
                       "checkpoint"),
            ("retry", "like resume, for failed or dead workflows only"),
            ("fork", "a new workflow replaying the checkpoints before --from-step")):
        c = wfsub.add_parser(cmd, help=text, description=text[0].upper() + text[1:] + ".",
                             epilog=f"example: shardflow workflows {cmd} acme order-42"
                             + (" --from-step 2" if cmd == "fork" else ""))
        c.add_argument("tenant")
        c.add_argument("workflow_id")
        c.add_argument("--json", action="store_true")
        _cluster_arg(c)
        if cmd == "cancel":
            c.add_argument("--reason", default="cancelled")
        if cmd == "fork":
            c.add_argument("--from-step", type=number_arg(int, low=0), required=True,
                           help="steps before this one are replayed from checkpoints")
            c.add_argument("--new-id", default=None, help="the new workflow's id")

    stp = sub.add_parser(
        "status", help="nodes and roles, shard owners, backlog, last minute, oldest pending",
        description="One view of the whole cluster, read from every node.",
        epilog="example: shardflow status --shards")
    _cluster_arg(stp)
    stp.add_argument("--shards", action="store_true", help="also every shard's backlog "
                     "and owning worker")
    stp.add_argument("--json", action="store_true")
    tn = sub.add_parser("tenants", help="per-tenant views")
    tnsub = tn.add_subparsers(dest="tenants_command", required=True, parser_class=_Parser)
    top = tnsub.add_parser("top", help="heaviest tenants by backlog, then throughput",
                           epilog="example: shardflow tenants top --limit 20")
    top.add_argument("--limit", type=_positive_int(), default=10)
    _cluster_arg(top)
    top.add_argument("--json", action="store_true")
    gr = tnsub.add_parser(
        "grant", help="a login role that can act for one tenant only (row-level security)",
        description="Create (if needed) login role ROLE on every node and let it act for "
        "TENANT only: Postgres row-level security hides and protects every other "
        "tenant's workflows from it. Connect a tenant-bound client as that role: "
        "Engine(dsns=[...user=ROLE...], tenant=TENANT, run_workers=False).",
        epilog="example: shardflow tenants grant acme --role tenant_acme")
    gr.add_argument("tenant")
    gr.add_argument("--role", required=True)
    _cluster_arg(gr)

    sc = sub.add_parser("schedules", help="cron schedules (engine.schedule(...))")
    scsub = sc.add_subparsers(dest="schedules_command", required=True, parser_class=_Parser)
    scl = scsub.add_parser("list", help="every schedule: cron, next run, ticks fired",
                           epilog="example: shardflow schedules list --tenant acme")
    scl.add_argument("--tenant", default=None)
    scl.add_argument("--json", action="store_true")
    _cluster_arg(scl)
    for cmd in ("pause", "resume"):
        c = scsub.add_parser(cmd, help=f"{cmd} one schedule",
                             epilog=f"example: shardflow schedules {cmd} acme nightly")
        c.add_argument("tenant")
        c.add_argument("schedule_id")
        _cluster_arg(c)

    rt = sub.add_parser("retention", help="how long finished workflows are kept")
    rtsub = rt.add_subparsers(dest="retention_command", required=True, parser_class=_Parser)
    rs = rtsub.add_parser("set", help="delete finished workflows SECONDS after they finish",
                          epilog="example: shardflow retention set 86400 --tenant acme")
    # checked in _retention, so that the message names "retention seconds"
    rs.add_argument("seconds", type=float)
    rc = rtsub.add_parser("clear", help="keep finished workflows forever (the default)")
    rl = rtsub.add_parser("list", help="the retention settings ('*': every other tenant)")
    for c in (rs, rc, rl):
        _cluster_arg(c)
    for c in (rs, rc):
        c.add_argument("--tenant", default=None, help="one tenant (default: all others)")
    rl.add_argument("--json", action="store_true")

    sh = sub.add_parser("shard", help="inspect and move shards")
    shsub = sh.add_subparsers(dest="shard_command", required=True, parser_class=_Parser)
    sl = shsub.add_parser("list", help="every shard: node, epoch, owning worker")
    _cluster_arg(sl)
    sl.add_argument("--json", action="store_true")
    sm = shsub.add_parser(
        "move", help="move a shard to another node while workers run",
        description="Copy the shard's rows to NODE under a brief write fence, switch the "
        "shard map, drop the old copy. Running workflows of the shard resume on the new "
        "node from their checkpoints. Prints the pause the fence caused.")
    sm.add_argument("shard", type=number_arg(int, low=0))
    sm.add_argument("--to", required=True, metavar="NODE")
    _cluster_arg(sm)
    sm.add_argument("--lock-timeout", type=number_arg(float, low=0, low_open=True,
                                                      high=86400), default=5.0,
                    help="seconds to wait for the fence (default 5, at most 86400)")

    bn = sub.add_parser(
        "bench", add_help=False,
        help="load test: workflows/s, latency, database cost per workflow, a report",
        description="Run 'shardflow bench --help' for its options.")
    bn.add_argument("bench_args", nargs=argparse.REMAINDER)

    dr = sub.add_parser(
        "drill", add_help=False,
        help="failure drill under load: failover, worker-crash, network, chaos; "
             "integrity audit",
        description="Run 'shardflow drill --help' for its options.")
    dr.add_argument("drill_args", nargs=argparse.REMAINDER)

    dm = sub.add_parser("demo", help="cluster up, start and complete workflows, print a summary")
    dm.add_argument("--nodes", type=_positive_int(MAX_NODES), default=3)
    dm.add_argument("--workflows", type=_positive_int(1_000_000), default=2000)
    dm.add_argument("--tenants", type=_positive_int(100_000), default=50)
    dm.add_argument("--dir", type=Path, default=None, help=DIR_HELP)
    return p


def _cluster(args: argparse.Namespace) -> int:
    from .localcluster import LocalCluster

    lc = LocalCluster(clusterfile.local_dir(args.dir),
                      log=lambda m: err_console.print(f"[dim]{m}[/dim]"))
    if args.cluster_command == "up":
        if args.async_replicas and not (args.ha or args.replicas):
            raise ClusterError("--async-replicas needs --replicas N or --ha")
        spec = lc.up(args.nodes, replicas=args.replicas, shard_count=args.shards,
                     base_port=args.port, citus=args.citus, ha=args.ha,
                     synchronous=not args.async_replicas)
        console.print(
            f"cluster up: {len(spec.nodes)} nodes, {spec.shard_map.shard_count} shards, "
            f"file {lc.file}"
        )
        for n in spec.nodes:
            console.print(f"  {n.name}  {clusterfile.redact(n.dsn)}")
        return 0
    if args.cluster_command == "status":
        rows = lc.status()
        if args.json:
            print(json.dumps([r.__dict__ if hasattr(r, "__dict__") else _slots(r) for r in rows]))
            return 0
        t = Table(title=f"shardflow cluster {lc.dir}")
        for col in ("node", "role", "port", "pid", "shards", "schema", "repl lag"):
            t.add_column(col)
        for r in rows:
            t.add_row(
                r.name,
                r.role if r.running else "[red]stopped[/red]",
                str(r.port),
                str(r.pid or "-"),
                str(r.shards),
                str(r.schema_version if r.schema_version is not None else "-"),
                "-" if r.replication_lag_bytes is None else f"{r.replication_lag_bytes} B",
            )
        console.print(t)
        return 0
    stopped = lc.down(purge=args.purge)
    console.print(
        f"stopped {len(stopped)} node(s)" + (f"; deleted {lc.dir}" if args.purge else "")
    )
    return 0


def _slots(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__}


def _migrate(args: argparse.Namespace) -> int:
    from .migrate import migrate

    spec = clusterfile.load(args.cluster)
    for node in spec.nodes:
        with connect_node(node) as conn:
            applied = migrate(conn)
        console.print(f"{node.name}: applied {applied or 'nothing (up to date)'}")
    return 0


def _workflow_command(args: argparse.Namespace) -> int:
    """show / steps / cancel / resume / retry / fork of one workflow."""
    from .engine import Engine
    from .errors import InvalidArgument

    async def run() -> Any:
        engine = Engine(cluster_file=args.cluster, run_workers=False)
        async with engine:
            t, w = args.tenant, args.workflow_id
            if args.wf_command == "show":
                return await engine.get_info(t, w)
            if args.wf_command == "steps":
                return await engine.steps(t, w)
            if args.wf_command == "cancel":
                return {"cancelled": await engine.cancel(t, w, reason=args.reason)}
            if args.wf_command == "retry":
                status = (await engine.get_info(t, w))["status"]
                if status not in ("failed", "dead"):
                    raise InvalidArgument(f"workflow {w!r} of tenant {t!r} is {status}; "
                                          "retry applies to failed or dead workflows")
            if args.wf_command in ("resume", "retry"):
                await engine.resume(t, w)
                return await engine.get_info(t, w)
            h = await engine.fork(t, w, from_step=args.from_step, new_workflow_id=args.new_id)
            return await engine.get_info(t, h.workflow_id)

    out = asyncio.run(run())
    if args.json:
        print(json.dumps(out, default=str))
        return 0
    if args.wf_command == "steps":
        t = Table(title=f"steps of {args.tenant}/{args.workflow_id}")
        for col in ("seq", "name", "kind", "status", "attempts", "retries", "finished"):
            t.add_column(col)
        for r in out:
            t.add_row(str(r["seq"]), r["name"], r["kind"], r["status"], str(r["attempts"]),
                      str(r.get("retries", "")), str(r.get("finished_at") or "")[:19])
        console.print(t)
    elif args.wf_command == "cancel":
        console.print(f"cancelled: {', '.join(out['cancelled']) or 'nothing (already ended)'}")
    else:
        t = Table(title=f"workflow {out['tenant_id']}/{out['workflow_id']}", show_header=False)
        t.add_column("field")
        t.add_column("value")
        for k, v in out.items():
            t.add_row(k, json.dumps(v, default=str) if isinstance(v, dict | list) else str(v))
        console.print(t)
    return 0


def _workflows(args: argparse.Namespace) -> int:
    from .engine import Engine

    if args.wf_command != "list":
        return _workflow_command(args)

    async def run() -> list[dict[str, Any]]:
        engine = Engine(cluster_file=args.cluster, run_workers=False)
        async with engine:
            return await engine.list_workflows(
                tenant=args.tenant, status=args.status, name=args.name, limit=args.limit,
                since=args.since, until=args.until)

    rows = asyncio.run(run())
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    t = Table(title=f"{len(rows)} workflow(s)")
    for col in ("tenant", "workflow", "name", "status", "attempts", "created", "finished"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["tenant_id"], r["workflow_id"], r["name"], r["status"], str(r["attempts"]),
                  str(r["created_at"])[:19], str(r["finished_at"] or "")[:19])
    console.print(t)
    return 0


def _node_rows(cluster: Path | None, query: str, *params: Any) -> list[tuple[str, Any]]:
    """(node, rows) of a named query on every shardflow node of the cluster file."""
    import psycopg

    from .driver import Q

    spec = clusterfile.load(cluster)
    out = []
    for node in spec.nodes:
        if node.role not in ("primary", "coordinator"):
            continue
        with connect_node(node, cursor_factory=psycopg.RawCursor) as conn:
            try:
                cur = conn.execute(Q[query], params)
            except psycopg.Error as exc:  # by SQLSTATE, naming the node
                raise translate(exc, context=f"node {node.name}") from exc
            cols = [d.name for d in cur.description or ()]
            out.append((node.name, [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]))
    return out


def _status(args: argparse.Namespace) -> int:
    nodes = _node_rows(args.cluster, "status_node")
    shards = _node_rows(args.cluster, "status_shards")
    report: dict[str, Any] = {"nodes": {n: rows[0] for n, rows in nodes}}
    owners: dict[str, dict[str, int]] = {}
    for n, rows in shards:
        for r in rows:
            owners.setdefault(n, {}).setdefault(str(r["owner"] or "(unowned)"), 0)
            owners[n][str(r["owner"] or "(unowned)")] += 1
    report["shard_owners"] = owners
    if args.shards:
        report["shards"] = {n: rows for n, rows in shards}
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    t = Table(title="shardflow status")
    for col in ("node", "role", "pending", "running", "done/min", "failed/min",
                "oldest pending", "live workers", "shards per owner"):
        t.add_column(col)
    for n, r in report["nodes"].items():
        t.add_row(n, "standby" if r["in_recovery"] else "primary", str(r["pending"]),
                  str(r["running"]), str(r["done_1m"]), str(r["failed_1m"]),
                  str(r["oldest_pending"] or "-")[:19], str(r["live_workers"]),
                  ", ".join(f"{o}: {c}" for o, c in sorted(owners.get(n, {}).items())))
    console.print(t)
    if args.shards:
        st = Table(title="shards")
        for col in ("node", "shard", "pending", "running", "owner"):
            st.add_column(col)
        for n, rows in shards:
            for r in rows:
                st.add_row(n, str(r["shard_id"]), str(r["pending"]), str(r["running"]),
                           str(r["owner"] or "[red]unowned[/red]"))
        console.print(st)
    return 0


def _tenants(args: argparse.Namespace) -> int:
    if args.tenants_command == "grant":
        return _grant(args)
    merged: list[dict[str, Any]] = []
    for n, rows in _node_rows(args.cluster, "tenants_top", args.limit):
        merged += [{**r, "node": n} for r in rows]
    # each node gave its top N; the cluster's top N is among them
    merged.sort(key=lambda r: (-(r["pending"] + r["running"]), -r["done_1m"], r["tenant_id"]))
    merged = merged[:args.limit]
    if args.json:
        print(json.dumps(merged, default=str))
        return 0
    t = Table(title=f"top {args.limit} tenants (backlog, then completions in the last minute)")
    for col in ("tenant", "node", "pending", "running", "done/min", "oldest pending"):
        t.add_column(col)
    for r in merged:
        t.add_row(r["tenant_id"], r["node"], str(r["pending"]), str(r["running"]),
                  str(r["done_1m"]), str(r["oldest_pending"] or "-")[:19])
    console.print(t)
    return 0


def _grant(args: argparse.Namespace) -> int:
    from .errors import InvalidArgument
    from .routing import validate_tenant

    validate_tenant(args.tenant)
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", args.role):
        raise InvalidArgument(f"--role {args.role!r} must be a lowercase Postgres "
                              "identifier (letters, digits, _; at most 63)")
    if args.role == "postgres":
        raise InvalidArgument("--role postgres is the superuser: choose a role of its own")
    for name, _rows in _node_rows(args.cluster, "grant_tenant", args.role, args.tenant):
        console.print(f"node {name}: role {args.role} may act for tenant {args.tenant}")
    return 0


def _schedules(args: argparse.Namespace) -> int:
    from .engine import Engine

    async def run() -> list[dict[str, Any]]:
        engine = Engine(cluster_file=args.cluster, run_workers=False)
        async with engine:
            if args.schedules_command == "list":
                return await engine.schedules(tenant=args.tenant)
            await engine.pause_schedule(args.tenant, args.schedule_id,
                                        paused=args.schedules_command == "pause")
            return await engine.schedules(tenant=args.tenant)

    rows = asyncio.run(run())
    if getattr(args, "json", False):
        print(json.dumps(rows, default=str))
        return 0
    t = Table(title="schedules")
    for col in ("tenant", "schedule", "cron", "workflow", "catch-up", "paused", "next run",
                "fired"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["tenant_id"], r["schedule_id"], r["cron"], r["workflow_name"],
                  r["catch_up"], "yes" if r["paused"] else "no",
                  str(r["next_run_at"])[:19], str(r["fired"]))
    console.print(t)
    return 0


def _retention(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .errors import InvalidArgument

    if args.retention_command == "set":
        # inf would be stored, then fail every purge of every worker forever; the
        # bound is Engine.set_retention's (100 years); 'retention clear' keeps forever
        problem = number_problem(args.seconds, low=0, high=MAX_RETENTION_SECONDS)
        if problem:
            raise InvalidArgument(f"retention seconds {problem} ('shardflow retention "
                                  "clear' keeps finished workflows forever)")

    async def run() -> list[dict[str, Any]]:
        engine = Engine(cluster_file=args.cluster, run_workers=False)
        async with engine:
            if args.retention_command == "set":
                await engine.set_retention(args.seconds, tenant=args.tenant)
            elif args.retention_command == "clear":
                await engine.set_retention(None, tenant=args.tenant)
            return await engine.retention()

    rows = asyncio.run(run())
    if getattr(args, "json", False):
        print(json.dumps(rows, default=str))
        return 0
    t = Table(title="retention of finished workflows")
    for col in ("tenant", "keep seconds", "updated"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["tenant_id"], f"{r['keep_seconds']:g}", str(r["updated_at"])[:19])
    console.print(t)
    return 0


def _shard(args: argparse.Namespace) -> int:
    from .shardmove import move_shard

    spec = clusterfile.load(args.cluster)
    if args.shard_command == "move":
        rep = move_shard(spec, args.shard, args.to, lock_timeout_s=args.lock_timeout)
        console.print(
            f"moved shard {rep.shard} from {rep.source} to {rep.target} (epoch {rep.epoch}): "
            f"the shard paused {rep.pause_s * 1000:.0f} ms, total {rep.total_s:.2f} s, rows "
            + ", ".join(f"{t} {n}" for t, n in rep.rows.items()))
        return 0
    rows: list[dict[str, Any]] = []
    for node in spec.nodes:
        with connect_node(node) as conn:
            held = {int(str(r[0])): (r[1], bool(r[2])) for r in conn.execute(
                "SELECT l.shard_id, l.owner, EXISTS (SELECT 1 FROM shardflow.workers k "
                "WHERE k.worker_id = l.owner AND k.lease_expires_at > now()) "
                "FROM shardflow.shard_leases l").fetchall()}
            for sid, where, epoch in conn.execute(
                    "SELECT shard_id, node, epoch FROM shardflow.shard_map WHERE node = %s "
                    "ORDER BY shard_id", (node.name,)).fetchall():
                owner, live = held.get(int(str(sid)), (None, False))
                rows.append({"shard": sid, "node": where, "epoch": epoch,
                             "owner": owner if live else None})
    rows.sort(key=lambda r: r["shard"])
    if args.json:
        print(json.dumps(rows))
        return 0
    t = Table(title=f"{len(rows)} shards")
    for col in ("shard", "node", "epoch", "owner"):
        t.add_column(col)
    for row in rows:
        t.add_row(str(row["shard"]), row["node"], str(row["epoch"]), row["owner"] or "-")
    console.print(t)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .worker import run_worker_processes

    return run_worker_processes(args.target, args.processes, args.metrics_port)


def _bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(list(args.bench_args))


def _drill(args: argparse.Namespace) -> int:
    from .drill import main as drill_main

    return drill_main(list(args.drill_args))


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(nodes=args.nodes, workflows=args.workflows, tenants=args.tenants,
                    directory=args.dir, console=console)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return guarded("shardflow", lambda: _main(args))


def _main(argv: list[str]) -> int:
    if argv[:1] in (["bench"], ["drill"]):
        # the bench and the drills have their own option parsers (also: python -m
        # shardflow.bench / shardflow.drill), and report their own errors
        if argv[0] == "drill":
            return _drill(argparse.Namespace(drill_args=argv[1:]))
        return _bench(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    handlers = {
        "cluster": _cluster,
        "migrate": _migrate,
        "workflows": _workflows,
        "worker": _worker,
        "shard": _shard,
        "status": _status,
        "retention": _retention,
        "schedules": _schedules,
        "tenants": _tenants,
        "demo": _demo,
        "bench": _bench,
        "drill": _drill,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
