"""``python -m shardflow.bench``: an honest load test of a shardflow cluster.

What it does, and why each choice:

* **Workers are separate processes** (``python -m shardflow.worker
  loadtest.benchflows:engine`` x N), so their CPU is measured apart from the load
  generator's, as in production. The bench process only starts workflows (a client
  engine, ``run_workers=False``).
* **Open loop by default**: workflows are started on a fixed arrival schedule
  (``--rate``), each start in its own task, so a slow system does not slow the arrivals
  down and hide its own latency (coordinated omission). ``--concurrency`` gives a closed
  loop (N clients that each start a workflow and wait for its result) instead.
* **Latency comes from the database**: ``finished_at - created_at`` of each workflow row,
  i.e. from the commit of its start to the commit of its completion, read at the end on
  every node. A workflow counts as completed only when its completion is committed.
  (Both columns are ``now()``, the start time of the writing transaction: each is a
  one-statement transaction, so this is within a fraction of a millisecond of its commit.)
* **Cost per workflow**: Postgres CPU from ``/proc`` (every server process of every node,
  including the ones that exited during the run), WAL bytes from ``pg_current_wal_lsn``,
  statements from ``pg_stat_statements``, worker CPU from ``/proc``; each measured over
  the load window only (after the workers are up, until the backlog is drained) and
  divided by the completed workflows.
* **Audit**: every started workflow completed exactly once (status counts per node),
  no transactional effect applied twice (``public.bench_effects``), none failed.
* **Backlog** (``--backlog N``): N pending workflows are inserted before the run,
  server side on each node, with ids of their own (``bl-``) so the audit still covers
  exactly the run's workflows, and at a priority below them (see ``BACKLOG_PRIORITY``).
  ``completed_per_sec_all`` counts every completion, theirs included, and the costs
  are then divided by every workflow completed in the window, theirs included.
* **Profile** (``--profile``): py-spy samples one worker for ~10 s of the run (without
  pausing it), and ``pg_stat_statements`` ranks the statements by execution time.

The report goes to ``results/<date>-<scenario>/`` (summary.json, report.md, latency
.hgrm, PNG plots when matplotlib is importable) and a row in ``results/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import psycopg.conninfo as psycopg_conninfo
from hdrh.histogram import HdrHistogram
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from . import __version__, clusterfile, loop
from .clusterfile import ClusterSpec, NodeSpec
from .config import INT32_MAX, MAX_SECONDS, EngineConfig, check_number
from .errors import InvalidArgument, ShardflowError
from .localcluster import POSTGRES_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: ``loadtest/`` lives here and worker processes run from here."""

WORKFLOW_NAME = "bench.flow"  # the same as loadtest.benchflows.WORKFLOW_NAME
HIST_MAX_US = 3_600_000_000  # one hour: anything slower is a failure, not a latency
SUMMARY_FIELDS = (
    "workflows_per_sec", "completed", "failed", "duplicates", "latency_ms",
    "db_cpu_us_per_workflow", "wal_bytes_per_workflow", "worker_cpu_us_per_workflow",
    "statements_per_workflow", "nodes", "shards", "tenants", "steps", "duration_s",
    "machine", "versions", "settings", "backlog", "completed_per_sec_all",
    "backlog_completed_in_window",
)
BACKLOG_PREFIX = "bl-"
"""Workflow ids of the preloaded backlog (``--backlog``): ``bl-<run id>-<n>``. A run's own
workflows are ``<run id>-<n>`` with a run id of ``b`` and hex digits, so no pattern of
the audit (``<run id>-%``) ever matches a backlog row."""
BACKLOG_PRIORITY = -1
"""The backlog's priority, below the run's own workflows (0). Within a tenant, claims
take the highest priority first, then the oldest: at the same priority the run's
workflows would wait behind the whole backlog (at 300 workflows/s, an hour for a
million), and the run would measure how long the backlog takes to drain, not the
latency of new work while N rows are pending. At -1 the backlog takes whatever capacity
the run's own workflows leave, and every claim still walks a table holding it."""


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """One benchmark run. Give ``rate`` (open loop) or ``concurrency`` (closed loop);
    stop after ``duration`` seconds of arrivals, or after ``workflows`` starts."""

    cluster_file: Path = field(default_factory=clusterfile.default_cluster_file)
    rate: float | None = None
    concurrency: int | None = None
    duration: float = 20.0
    workflows: int | None = None
    tenants: int = 100
    skew: str = "uniform"  # or "zipf"
    zipf_s: float = 1.1
    steps: int = 3
    payload_bytes: int = 100
    # each external step waits this long (a call to another service): workflows are
    # then in flight long enough for a drill to catch some mid-run
    step_ms: float = 0.0
    worker_processes: int = 2
    results_dir: Path = Path("results")
    scenario: str | None = None
    engine_config: dict[str, Any] = field(default_factory=dict)
    drain_timeout: float = 120.0
    ready_timeout: float = 60.0
    clean: bool = True
    seed: int = 1
    # locust as the load generator (closed loop: each user starts and waits)
    locust_users: int | None = None
    locust_processes: int = 1
    locust_expect_workers: int = 0
    # also write summary.json here
    json_path: Path | None = None
    # run the same workload on a peer right after (only "dbos")
    peer: str | None = None
    # delete finished workflows this many seconds after they finish, during the run
    # (shardflow's retention), and record the workflow tables' size over time
    retention: float | None = None
    # preload this many pending bench workflows (ids bl-...) before the timed run
    backlog: int = 0
    # sample one worker process with py-spy during the run and rank the statements by
    # execution time (profile-worker.txt, profile-postgres.txt)
    profile: bool = False

    def __post_init__(self) -> None:
        if self.rate is not None and self.concurrency is not None:
            raise ValueError("give --rate (open loop) or --concurrency (closed loop), not both")
        # Every number finite and bounded (NaN passes '<= 0' and then never stops the
        # load loop), named by its flag. The bounds are far above any real run.
        for flag, value, integer, low, high, low_open in (
                ("--rate", self.rate, False, 0, 1e6, True),
                ("--concurrency", self.concurrency, True, 1, 100_000, False),
                ("--duration", self.duration, False, 0, 7 * 86400, True),
                ("--workflows", self.workflows, True, 1, INT32_MAX, False),
                ("--tenants", self.tenants, True, 1, 1_000_000, False),
                ("--zipf-s", self.zipf_s, False, 0, 10, False),
                ("--steps", self.steps, True, 1, 1000, False),
                ("--payload-bytes", self.payload_bytes, True, 0, 100_000_000, False),
                ("--step-ms", self.step_ms, False, 0, 3_600_000, False),
                ("--worker-processes", self.worker_processes, True, 1, 256, False),
                ("--drain-timeout", self.drain_timeout, False, 0, 86400, True),
                ("ready_timeout", self.ready_timeout, False, 0, 86400, True),
                ("--seed", self.seed, True, -(2**63), 2**63, False),
                ("--locust-users", self.locust_users, True, 1, 1_000_000, False),
                ("--locust-processes", self.locust_processes, True, 1, 256, False),
                ("--locust-expect-workers", self.locust_expect_workers, True, 0, 10_000,
                 False),
                # >= 5: the dashboard must see each completion before it is deleted
                ("--retention", self.retention, False, 5, MAX_SECONDS, False),
                ("--backlog", self.backlog, True, 0, 1_000_000_000, False)):
            if value is not None:
                check_number(flag, value, integer=integer, low=low, high=high,
                             low_open=low_open, error=InvalidArgument)
        if self.skew not in ("uniform", "zipf"):
            raise ValueError(f"--skew must be uniform or zipf, got {self.skew!r}")
        if self.locust_users is not None:
            if self.rate is not None or self.concurrency is not None:
                raise ValueError("--locust-users is the load: give it without --rate "
                                 "or --concurrency")
            if self.workflows is not None:
                raise ValueError("--locust-users runs for --duration; --workflows does "
                                 "not apply")
            if self.peer is not None:
                raise ValueError("--peer runs with the bench's own load (--rate or "
                                 "--concurrency), not with --locust-users")
        if self.peer not in (None, "dbos"):
            raise ValueError(f"--peer: the only peer is 'dbos', got {self.peer!r}")
        if self.scenario is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}",
                                                          self.scenario):
            # it names the report directory: no '/', no '..', nothing hidden
            raise ValueError(f"--scenario must be letters, digits, '_', '.', '-' (at most "
                             f"100, not starting with '.' or '-'), got {self.scenario[:40]!r}")
        if self.backlog and (self.peer is not None or self.retention is not None
                             or self.locust_users is not None):
            # the peer would run without the backlog (not the same workload), retention
            # would delete finished backlog rows before they are counted, and the live
            # counts of a backlog run come from the bench's own starts
            raise ValueError("--backlog cannot be combined with --peer, --retention or "
                             "--locust-users")
        # refuse unknown or invalid settings up front: the workers would die of them
        EngineConfig.from_mapping(self.engine_config, source="--engine-config")

    @property
    def mode(self) -> str:
        if self.locust_users is not None:
            return "locust"
        return "closed" if self.concurrency is not None else "open"

    @property
    def effective_rate(self) -> float:
        return self.rate if self.rate is not None else 200.0

    def command_line(self) -> str:
        """The command that repeats this run."""
        args = ["python", "-m", "shardflow.bench", "--cluster-file", str(self.cluster_file)]
        if self.locust_users is not None:
            args += ["--locust-users", str(self.locust_users)]
            if self.locust_processes > 1:
                args += ["--locust-processes", str(self.locust_processes)]
            if self.locust_expect_workers:
                args += ["--locust-expect-workers", str(self.locust_expect_workers)]
        elif self.concurrency is not None:
            args += ["--concurrency", str(self.concurrency)]
        else:
            args += ["--rate", f"{self.effective_rate:g}"]
        if self.workflows is not None:
            args += ["--workflows", str(self.workflows)]
        else:
            args += ["--duration", f"{self.duration:g}"]
        args += ["--tenants", str(self.tenants), "--skew", self.skew, "--steps",
                 str(self.steps), "--payload-bytes", str(self.payload_bytes),
                 "--step-ms", f"{self.step_ms:g}",
                 "--worker-processes", str(self.worker_processes),
                 "--results-dir", str(self.results_dir)]
        if self.scenario:
            args += ["--scenario", self.scenario]
        if self.engine_config:
            args += ["--engine-config", json.dumps(self.engine_config)]
        if not self.clean:
            args.append("--keep-old")
        if self.peer:
            args += ["--peer", self.peer]
        if self.json_path:
            args += ["--json", str(self.json_path)]
        if self.retention is not None:
            args += ["--retention", f"{self.retention:g}"]
        if self.backlog:
            args += ["--backlog", str(self.backlog)]
        if self.profile:
            args.append("--profile")
        return shlex.join(args)


# -- /proc accounting ------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (the command name may contain spaces: split after
    its closing parenthesis). None when the process is gone or not visible."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def process_cpu_us(pid: int) -> int | None:
    """utime + stime of one live process, in microseconds."""
    f = _read_stat(pid)
    if f is None:
        return None
    return (int(f[11]) + int(f[12])) * 1_000_000 // CLK_TCK


def server_cpu_us(postmaster: int) -> int | None:
    """CPU of a Postgres server: the postmaster, every live child (backends, walwriter,
    checkpointer, autovacuum, ...) and, through the postmaster's cutime/cstime, every
    child that already exited and was reaped: backends come and go during a run, and
    their CPU must not vanish with them."""
    f = _read_stat(postmaster)
    if f is None:
        return None
    ticks = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        c = _read_stat(int(entry))
        if c is not None and c[1] == str(postmaster):
            ticks += int(c[11]) + int(c[12])
    return ticks * 1_000_000 // CLK_TCK


def _is_postgres(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() in ("postgres", "postmaster")
    except OSError:
        return False


async def postmaster_pid(node: NodeSpec, conn: asyncpg.Connection) -> int | None:
    """The node's postmaster: from <data_dir>/postmaster.pid (the cluster file, else the
    server's data_directory), else the parent of our own backend. None when the server
    is not on this machine (then its CPU is not measured)."""
    dirs = [node.data_dir] if node.data_dir else []
    with contextlib.suppress(asyncpg.PostgresError):
        dirs.append(str(await conn.fetchval("SELECT current_setting('data_directory')")))
    for d in dirs:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((Path(d) / "postmaster.pid").read_text().splitlines()[0])
            if _is_postgres(pid):
                return pid
    backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
    f = _read_stat(backend)
    if f is not None and _is_postgres(int(f[1])):
        return int(f[1])
    return None


# -- the cluster -----------------------------------------------------------------------


@dataclass
class NodeState:
    spec: NodeSpec
    conn: asyncpg.Connection
    postmaster: int | None = None
    has_pss: bool = False
    # live poll
    backlog: int = 0
    succeeded: int = 0
    failed: int = 0
    last_finished: dt.datetime | None = None

    async def ensure(self) -> asyncpg.Connection:
        """The connection, re-opened if a fault (a failover, a dropped link) closed it;
        a multi-host DSN then reaches the new primary."""
        if self.conn.is_closed():
            self.conn = await asyncpg.connect(self.spec.dsn, timeout=10)
        return self.conn

    async def call(self, method: str, sql: str, *args: Any) -> Any:
        """``conn.<method>(sql, *args)``, reconnecting for up to 60 s when the server
        went away under the connection (the end of a drill: the old primary is gone)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = await self.ensure()
                return await getattr(conn, method)(sql, *args)
            except (TimeoutError, OSError, asyncpg.InterfaceError,
                    asyncpg.InternalClientError, asyncpg.PostgresConnectionError,
                    asyncpg.CannotConnectNowError):
                self.conn.terminate()  # whatever state it was left in: a fresh one next
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


async def _snapshot(nodes: list[NodeState], worker_pids: list[int]) -> dict[str, Any]:
    """Counters at one instant: server CPU, WAL position, statement calls, worker CPU."""
    snap: dict[str, Any] = {"db_cpu": [], "wal": [], "calls": [], "worker_cpu": []}
    for n in nodes:
        snap["db_cpu"].append(None if n.postmaster is None else server_cpu_us(n.postmaster))
        snap["wal"].append(str(await n.call("fetchval", "SELECT pg_current_wal_lsn()::text")))
        snap["calls"].append(None if not n.has_pss else int(await n.call(
            "fetchval",
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())")))
    snap["worker_cpu"] = [process_cpu_us(p) for p in worker_pids]
    snap["client_cpu"] = int(sum(os.times()[:2]) * 1_000_000)
    snap["at"] = time.monotonic()
    return snap


def _delta(a: list[int | None], b: list[int | None]) -> int | None:
    total = 0
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            return None  # not measurable (a process not visible in /proc)
        total += y - x
    return total


# -- profiles (--profile) --------------------------------------------------------------

PROFILE_SECONDS = 10  # py-spy samples one worker this long (less in shorter runs)
PROFILE_RATE = 100  # samples per second (py-spy's default)
PROFILE_TOP = 25  # functions listed, by own and by cumulative time
PROFILE_STATEMENTS = 15  # statements listed by execution time

PSS_SQL = """
SELECT query, sum(calls)::bigint AS calls, sum(total_exec_time)::float8 AS ms
  FROM pg_stat_statements
 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
 GROUP BY query
"""


async def _pss_snapshot(servers: list[NodeState]) -> dict[str, tuple[int, float]] | None:
    """Calls and execution time (ms) per normalized statement, summed over the nodes
    (the same text has another queryid on each node: object ids differ). None when
    pg_stat_statements is absent somewhere (the figures would be partial)."""
    if not all(n.has_pss for n in servers):
        return None
    out: dict[str, tuple[int, float]] = {}
    for n in servers:
        for r in await n.call("fetch", PSS_SQL):
            calls, ms = out.get(r["query"], (0, 0.0))
            out[r["query"]] = (calls + int(r["calls"]), ms + float(r["ms"]))
    return out


def _pg_profile_text(before: dict[str, tuple[int, float]],
                     after: dict[str, tuple[int, float]], workflows: int) -> str:
    """The top statements by execution time over the window, per workflow."""
    delta = []
    for q, (calls, ms) in after.items():
        c0, m0 = before.get(q, (0, 0.0))
        if calls - c0 > 0:
            delta.append((ms - m0, calls - c0, " ".join(q.split())))
    delta.sort(reverse=True)
    total_ms = sum(d[0] for d in delta) or 1e-9
    wf = max(workflows, 1)
    lines = [
        "Postgres statements by total execution time over the measured window",
        "(pg_stat_statements, every node, summed by normalized text; per workflow = divided "
        f"by the {workflows:,} workflows completed in the window).",
        "Execution time is time in the executor (planning not included; lock waits are), "
        "not CPU time; statements run inside a function (the claim) count in the function's "
        "call (pg_stat_statements.track = top).",
        f"Total: {total_ms:,.0f} ms over {sum(d[1] for d in delta):,} calls of "
        f"{len(delta)} statements.",
        "",
        f"{'rank':>4} {'total ms':>10} {'share':>6} {'calls':>9} {'calls/wf':>8} "
        f"{'µs/wf':>8} {'µs/call':>8}  statement",
    ]
    for i, (ms, calls, q) in enumerate(delta[:PROFILE_STATEMENTS], 1):
        lines.append(f"{i:>4} {ms:>10,.1f} {ms / total_ms:>6.1%} {calls:>9,} "
                     f"{calls / wf:>8.2f} {ms * 1000 / wf:>8.1f} {ms * 1000 / calls:>8.1f}"
                     f"  {q[:220]}")
    return "\n".join(lines) + "\n"


def _py_spy_path() -> str | None:
    """py-spy next to this interpreter (a venv), else on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.is_file() else shutil.which("py-spy")


async def _py_spy(pid: int, opts: BenchOptions, report_dir: Path, console: Console) -> str:
    """Sample worker process ``pid`` with py-spy from now on; write
    ``profile-worker.folded.txt`` (py-spy's collapsed stacks, for flame graph tools) and
    ``profile-worker.txt`` (the top functions). Returns a one-line note for the report;
    a missing or failing py-spy is reported, never fatal."""
    exe = _py_spy_path()
    if exe is None:
        note = "py-spy is not installed (pip install py-spy): no worker profile"
        console.print(f"[yellow]{note}[/yellow]")
        return note
    seconds = max(1, min(PROFILE_SECONDS, math.floor(opts.duration)))
    folded = report_dir / "profile-worker.folded.txt"
    # --nonblocking: read the stacks without pausing the worker, so the profile does not
    # slow the run it measures (a sample may rarely be torn); --function: one entry per
    # function, not per line
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate",
           str(PROFILE_RATE), "--format", "raw", "--function", "--nonblocking",
           "--output", str(folded)]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout=seconds + 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        err = b"did not finish"
    if proc.returncode != 0 or not folded.is_file():
        note = (f"py-spy failed (exit {proc.returncode}): "
                f"{' '.join(err.decode(errors='replace').split())[-300:]}: no worker profile")
        console.print(f"[yellow]{note}[/yellow]")
        return note
    text = _worker_profile_text(folded.read_text(), shlex.join(
        ["py-spy", *cmd[1:-2], "--output", folded.name]), seconds)
    (report_dir / "profile-worker.txt").write_text(text)
    return f"worker process {pid} sampled for {seconds} s"


def _worker_profile_text(folded: str, command: str, seconds: int) -> str:
    """Own time (the function running) and cumulative time (the function anywhere on
    the stack, counted once per sample even when recursive), as shares of the samples."""
    own: Counter[str] = Counter()
    cum: Counter[str] = Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for f in set(frames):
            cum[f] += int(count)
    lines = [
        f"py-spy profile of one worker process: `{command}`",
        f"{total:,} samples in {seconds} s at {PROFILE_RATE} Hz (threads waiting idle are "
        f"not sampled: {total / (seconds * PROFILE_RATE):.0%} of one thread's time was busy).",
        "",
    ]
    for title, counts in (("own time (the function itself was running)", own),
                          ("cumulative time (the function was on the stack)", cum)):
        lines += [f"Top {PROFILE_TOP} functions by {title}:", "",
                  f"{'share':>6} {'samples':>8}  function"]
        lines += [f"{c / max(total, 1):>6.1%} {c:>8,}  {f}"
                  for f, c in counts.most_common(PROFILE_TOP)]
        lines.append("")
    return "\n".join(lines)


async def _backlog_counts(nodes: list[NodeState], run_id: str,
                          rows: list[tuple[str, str, float, float | None]], monitor: Monitor,
                          window_end: dict[str, Any]) -> dict[str, int]:
    """Backlog workflows completed while the run was measured: ``in_run`` between the
    run's first start and last completion (the interval its throughput divides by) and
    ``in_window`` between the cost snapshots (the interval of the CPU and WAL figures).
    Read through the finished_at index, on each node by its own clock."""
    done = [float(r[3]) for r in rows if r[1] == "succeeded" and r[3] is not None]
    t_first = min((r[2] for r in rows), default=0.0)
    t_last = max(done, default=t_first)
    since = monitor.finished_since or {}
    in_run = in_window = 0
    for n in nodes:
        r = await n.call(
            "fetchrow",
            "SELECT count(*) FILTER (WHERE finished_at BETWEEN to_timestamp($2) "
            "                        AND to_timestamp($3)) AS in_run, "
            "       count(*) FILTER (WHERE finished_at BETWEEN $4 AND $5) AS in_window "
            "  FROM shardflow.workflows WHERE finished_at >= $4 AND status = 'succeeded' "
            f"   AND name = '{WORKFLOW_NAME}' AND workflow_id LIKE $1",
            f"{BACKLOG_PREFIX}{run_id}-%", t_first, t_last, since[n.spec.name],
            window_end[n.spec.name])
        in_run += int(r["in_run"])
        in_window += int(r["in_window"])
    return {"in_run": in_run, "in_window": in_window}


def _load_benchflows() -> Any:
    """Import ``loadtest.benchflows`` from the repository root (it is not installed)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("loadtest.benchflows")


def _prepare_node(node: NodeSpec, clean: bool, effects_ddl: str) -> None:
    """Create the effects table; with ``clean``, drop earlier bench rows (only the
    bench's own workflow name) and vacuum, so every run starts from the same state, the
    once-a-second poll scans only this run's rows, and the cleanup's WAL and vacuum work
    happen before the measured window, not inside it. The bench's first contact with
    each node: one that cannot be reached fails the run here, named."""
    from .cliutil import connect_node

    with connect_node(node) as conn:
        conn.execute(effects_ddl)
        if clean:
            conn.execute(
                "DELETE FROM shardflow.steps s USING shardflow.workflows w "
                "WHERE w.name = %s AND s.tenant_id = w.tenant_id "
                "AND s.shard_id = w.shard_id AND s.workflow_id = w.workflow_id",
                (WORKFLOW_NAME,))
            conn.execute("DELETE FROM shardflow.workflows WHERE name = %s", (WORKFLOW_NAME,))
            conn.execute("TRUNCATE public.bench_effects")
            conn.execute("VACUUM (ANALYZE) shardflow.workflows, shardflow.steps")


def _set_retention(nodes: list[NodeSpec], seconds: float | None) -> None:
    """The default retention on every node for the run (None: remove it after)."""
    import psycopg

    from .driver import Q

    for n in nodes:
        with psycopg.connect(n.dsn, autocommit=True, cursor_factory=psycopg.RawCursor) as conn:
            if seconds is None:
                conn.execute(Q["clear_retention"], ("*",))
            else:
                conn.execute(Q["set_retention"], ("*", seconds))


# -- the backlog (--backlog) ---------------------------------------------------------------

# Backlog row g (0 <= g < N) belongs to tenant g % T, so the N rows spread evenly over the
# run's T tenants. One chunk inserts the rows g in [lo, hi) of this node's tenants, all
# server side: for tenant index ti the rows are g = ti + r*T, so r runs from
# ceil((lo - ti) / T) to floor((hi - 1 - ti) / T); both numerators are kept >= 0 (ti < T,
# hi > lo >= 0) so that integer division is the ceiling and the floor. shard_id comes from
# the node's own shardflow.shard_of: a tenant sent to the wrong node would hit no
# partition, and its CHECK would refuse a wrong shard.
BACKLOG_INSERT_SQL = """
INSERT INTO shardflow.workflows
    (tenant_id, shard_id, workflow_id, name, queue, priority, inputs, max_attempts)
SELECT t.name, shardflow.shard_of(t.name, %(shard_count)s), %(prefix)s || (t.ti + r * %(t)s),
       %(wf)s, %(queue)s, %(priority)s, %(inputs)s::jsonb, %(max_attempts)s
  FROM unnest(%(names)s::text[], %(tis)s::bigint[]) AS t(name, ti)
 CROSS JOIN LATERAL generate_series((%(lo)s - t.ti + %(t)s - 1) / %(t)s,
                                    (%(hi)s - 1 - t.ti + %(t)s) / %(t)s - 1) AS r
"""
# The tenants (indexes into the run's tenant list) whose shards this node holds, by the
# node's own identity and shard map: the truth on the node, even after a shard moved.
BACKLOG_TENANTS_SQL = """
SELECT t.ti - 1 AS ti
  FROM unnest(%(names)s::text[]) WITH ORDINALITY AS t(name, ti),
       shardflow.node_info i
 WHERE shardflow.shard_of(t.name, i.shard_count) IN
       (SELECT m.shard_id FROM shardflow.shard_map m WHERE m.node = i.node_name)
 ORDER BY 1
"""
BACKLOG_CHUNK = 50_000  # rows per transaction: short ones, and a progress bar that moves


def _preload_backlog(nodes: list[NodeSpec], opts: BenchOptions, run_id: str,
                     console: Console) -> dict[str, Any]:
    """Insert ``opts.backlog`` pending bench workflows (``bl-<run id>-<g>``, the bench's
    own inputs, priority :data:`BACKLOG_PRIORITY`, ready now) on the nodes that hold
    their tenants, one thread per node; then VACUUM (ANALYZE) and CHECKPOINT every node,
    so the autovacuum, statistics and checkpoint the bulk load calls for happen here,
    not inside the measured window. Returns how long each phase took and the rows per
    node."""
    import psycopg

    from .serde import dump_args

    tenants = [f"bench-t{i:05d}" for i in range(opts.tenants)]  # as Load.tenant()
    config = EngineConfig(**opts.engine_config)
    # the same payload as Load: the first draw of the seeded generator
    payload = random.Random(opts.seed).randbytes(opts.payload_bytes).hex()[
        :opts.payload_bytes]
    inputs = dump_args((opts.steps, payload, opts.step_ms), {}, workflow=WORKFLOW_NAME,
                       max_bytes=config.max_payload_bytes)
    n = opts.backlog
    rows: dict[str, int] = {}
    t0 = time.monotonic()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.completed:,.0f} / {task.total:,.0f} rows"),
                        TextColumn("{task.elapsed:.0f}s"), console=console)

    def load_node(node: NodeSpec, task: Any) -> None:
        with psycopg.connect(node.dsn, autocommit=True) as conn:
            tis = [int(r[0]) for r in conn.execute(BACKLOG_TENANTS_SQL, {"names": tenants})]
            info = conn.execute("SELECT shard_count FROM shardflow.node_info").fetchone()
            params = {"shard_count": int(info[0]) if info else 0,
                      "prefix": f"{BACKLOG_PREFIX}{run_id}-", "t": len(tenants),
                      "wf": WORKFLOW_NAME, "queue": "default", "priority": BACKLOG_PRIORITY,
                      "inputs": inputs, "max_attempts": config.max_attempts,
                      "names": [tenants[i] for i in tis], "tis": tis}
            done = 0
            for lo in range(0, n, BACKLOG_CHUNK):
                cur = conn.execute(BACKLOG_INSERT_SQL,
                                   {**params, "lo": lo, "hi": min(n, lo + BACKLOG_CHUNK)})
                done += cur.rowcount
                progress.update(task, advance=cur.rowcount)
            rows[node.name] = done

    def vacuum_node(node: NodeSpec) -> None:
        with psycopg.connect(node.dsn, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE) shardflow.workflows")
            # needs superuser or pg_checkpoint (PG 15): without it, a checkpoint may
            # land in the window, as one can in any run
            with contextlib.suppress(psycopg.Error):
                conn.execute("CHECKPOINT")

    from concurrent.futures import ThreadPoolExecutor

    with progress, ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        task = progress.add_task(f"preloading a backlog of {n:,} workflows", total=n)
        for f in [pool.submit(load_node, node, task) for node in nodes]:
            f.result()  # an error on any node stops the run before it starts
        insert_s = time.monotonic() - t0
        progress.update(task, description="VACUUM (ANALYZE) + CHECKPOINT")
        for f in [pool.submit(vacuum_node, node) for node in nodes]:
            f.result()
    if sum(rows.values()) != n:
        raise RuntimeError(f"backlog: {sum(rows.values()):,} rows inserted, {n:,} asked "
                           f"(per node {rows}): does every tenant's shard have a node?")
    total_s = time.monotonic() - t0
    console.print(f"backlog: {n:,} pending workflows preloaded in {insert_s:.1f} s "
                  f"(+ {total_s - insert_s:.1f} s VACUUM/CHECKPOINT); per node {rows}")
    return {"rows_per_node": rows, "insert_s": round(insert_s, 1),
            "total_s": round(total_s, 1)}


def _start_workers(opts: BenchOptions, report_dir: Path) -> list[subprocess.Popen[bytes]]:
    from .worker import PARENT_ENV

    env = dict(os.environ)
    env["SHARDFLOW_BENCH_CLUSTER"] = str(Path(opts.cluster_file).absolute())
    env["SHARDFLOW_BENCH_CONFIG"] = json.dumps(opts.engine_config)
    # the workers end with the bench, even a killed one (no preexec_fn: by now the
    # bench has threads, and a fork between them must not run Python code)
    env[PARENT_ENV] = str(os.getpid())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    procs = []
    for i in range(opts.worker_processes):
        log = (report_dir / f"worker-{i}.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "shardflow.worker", "loadtest.benchflows:engine"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()  # the child holds its own descriptor
    return procs


def _stop_workers(procs: list[subprocess.Popen[bytes]]) -> list[int | None]:
    """SIGTERM (a graceful stop: workflows are handed back), then SIGKILL after 30 s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes: list[int | None] = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=30))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def check_workers(procs: list[subprocess.Popen[bytes]], report_dir: Path, when: str,
                  expected: set[int] | frozenset[int] = frozenset()) -> None:
    """Fail the run, naming the worker and its last words, if a worker process exited
    (other than the pids in ``expected``: a drill's victims). A bench that ran on with
    fewer workers would report figures of another set-up; a bench whose every worker
    died would wait out its drain timeout."""
    for i, p in enumerate(procs):
        if p.poll() is None or p.pid in expected:
            continue
        log = report_dir / f"worker-{i}.log"
        lines = log.read_text(errors="replace").split("\n") if log.exists() else []
        last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
        how = (f"was killed by signal {-p.returncode}" if p.returncode < 0
               else f"exited with code {p.returncode}")
        raise ShardflowError(f"worker process {i} (pid {p.pid}) {how} {when}"
                             + (f": {last} (log: {log})" if last else ""))


async def _wait_ready(nodes: list[NodeState], procs: list[subprocess.Popen[bytes]],
                      timeout: float, console: Console, report_dir: Path) -> None:
    """Wait until every worker process heartbeats on every node and the shards are
    owned by exactly our workers, so the measured window does not include start-up
    (imports, connections, the first rebalance)."""
    pids = {p.pid for p in procs}
    deadline = time.monotonic() + timeout
    while True:
        check_workers(procs, report_dir, "during start-up")
        ready = True
        ours: set[str] = set()
        owners: set[str | None] = set()
        for n in nodes:
            rows = await n.conn.fetch("SELECT worker_id, pid FROM shardflow.workers "
                                      "WHERE lease_expires_at > now()")
            live = {r["worker_id"] for r in rows if r["pid"] in pids}
            ready &= len({r["pid"] for r in rows if r["pid"] in pids}) == len(pids)
            ours |= live
            owners |= {r["owner"] for r in await n.conn.fetch(
                "SELECT owner FROM shardflow.shard_leases")}
        if ready and owners and owners <= ours and len(owners) == min(len(pids), len(ours)):
            return
        if time.monotonic() > deadline:
            console.print("[yellow]workers not fully balanced after "
                          f"{timeout:.0f}s; measuring anyway[/yellow]")
            return
        await asyncio.sleep(0.2)


# -- faults (drills) ---------------------------------------------------------------------


@dataclass
class FaultContext:
    """What a fault injected during a run can reach."""

    procs: list[subprocess.Popen[bytes]]  # the worker processes
    nodes: list[NodeState]  # direct connections to the shardflow nodes
    spec: ClusterSpec
    console: Console
    monitor: Monitor
    # pids of worker processes the fault kills: add them before the kill, or the run
    # fails as it does when a worker dies on its own
    killed: set[int] = field(default_factory=set)


class Fault(Protocol):
    """Runs alongside the load (started with it); returns its own measurements. The
    run drains only after it returns."""

    async def run(self, ctx: FaultContext) -> dict[str, Any]: ...


# -- the load ----------------------------------------------------------------------------


class Load:
    """Starts workflows and keeps the client-side counts (the truth about completion
    comes from the database, not from here)."""

    def __init__(self, opts: BenchOptions, engine: Any, run_id: str) -> None:
        self.opts = opts
        self.engine = engine
        self.run_id = run_id
        rng = random.Random(opts.seed)
        self.rng = rng
        self.tenants = [f"bench-t{i:05d}" for i in range(opts.tenants)]
        weights = ([1.0 / (k + 1) ** opts.zipf_s for k in range(opts.tenants)]
                   if opts.skew == "zipf" else [1.0] * opts.tenants)
        total = 0.0
        self.cum: list[float] = []
        for w in weights:
            total += w
            self.cum.append(total)
        # incompressible-ish payload (Postgres compresses large jsonb; repeated 'x'
        # would make the WAL figures look better than real data does)
        self.payload = rng.randbytes(opts.payload_bytes).hex()[:opts.payload_bytes]
        self.submitted = 0
        self.acked: list[str] = []  # workflow ids whose start returned (durable)
        self.start_errors = 0
        self.result_errors = 0
        self.last_error = ""
        self.done = False
        self.t0 = 0.0
        # start lag: commit of the start minus its scheduled time (open loop); shows
        # when the client or the start path could not keep to the schedule
        self.start_lag = HdrHistogram(1, HIST_MAX_US, 3)
        self._tasks: set[asyncio.Task[None]] = set()

    def tenant(self) -> str:
        return self.rng.choices(self.tenants, cum_weights=self.cum)[0]

    async def start_one(self, i: int, due: float | None) -> Any:
        try:
            h = await self.engine.start(WORKFLOW_NAME, self.opts.steps, self.payload,
                                        self.opts.step_ms,
                                        tenant=self.tenant(),
                                        workflow_id=f"{self.run_id}-{i}")
        except Exception as exc:  # counted and shown: a load test must not stop on one
            self.start_errors += 1
            self.last_error = f"start: {type(exc).__name__}: {exc}"[:200]
            return None
        self.submitted += 1
        self.acked.append(h.workflow_id)
        if due is not None:
            lag = int((asyncio.get_running_loop().time() - due) * 1e6)
            self.start_lag.record_value(min(max(lag, 1), HIST_MAX_US))
        return h

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.t0 = loop.time()
        if self.opts.concurrency is None:
            await self._open_loop(loop)
        else:
            await self._closed_loop(loop)
        self.done = True

    def _more(self, i: int, loop: asyncio.AbstractEventLoop) -> bool:
        if self.opts.workflows is not None:
            return i < self.opts.workflows
        return loop.time() - self.t0 < self.opts.duration

    async def _open_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arrival i is due at t0 + i/rate, whatever happened to the earlier ones: each
        start runs in its own task, and a late loop catches up at once."""
        rate = self.opts.effective_rate
        i = 0
        while True:
            due = self.t0 + i / rate
            if self.opts.workflows is not None and i >= self.opts.workflows:
                break
            if self.opts.workflows is None and due - self.t0 >= self.opts.duration:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            t = asyncio.create_task(self.start_one(i, due))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
            i += 1
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def _closed_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """N clients, each starting a workflow and waiting for its result: throughput
        is then bounded by latency (and by handle.result's polling), by design."""
        counter = iter(range(sys.maxsize))

        async def client() -> None:
            while True:
                i = next(counter)
                if not self._more(i, loop):
                    return
                h = await self.start_one(i, None)
                if h is None:
                    continue
                try:
                    await h.result(timeout=self.opts.drain_timeout)
                except Exception as exc:
                    self.result_errors += 1
                    self.last_error = f"result: {type(exc).__name__}: {exc}"[:200]

        await asyncio.gather(*(client() for _ in range(self.opts.concurrency or 1)))


class LocustLoad:
    """The load from locust, headless, in a subprocess (``loadtest/locustfile.py``):
    its users start workflows through the psycopg client and wait for them. With
    ``--locust-processes K`` locust forks a master and K workers; with
    ``--locust-expect-workers W`` it runs as a master that waits for W workers started
    elsewhere. Acknowledged starts and errors come from locust's own statistics (CSV);
    latency and completion, as for every run, from the database."""

    counts_from_db = True

    def __init__(self, opts: BenchOptions, run_id: str, report_dir: Path) -> None:
        self.opts = opts
        self.run_id = run_id
        self.report_dir = report_dir
        self.submitted = 0  # while running: rows seen in the database
        self.start_errors = 0
        self.result_errors = 0
        self.last_error = ""
        self.done = False
        self.start_lag = HdrHistogram(1, HIST_MAX_US, 3)  # not measured: closed loop
        self.stats: dict[str, dict[str, Any]] = {}

    def command(self) -> list[str]:
        users = self.opts.locust_users or 1
        cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
               "--headless", "-u", str(users), "-r", str(users),
               "-t", f"{max(1, round(self.opts.duration))}s", "--stop-timeout", "30",
               "--csv", str(self.report_dir / "locust"), "--only-summary",
               # the final figures (the CSV can be written before the last users stop)
               "--json-file", str(self.report_dir / "locust_final"),
               "--loglevel", "WARNING"]
        if self.opts.locust_processes > 1:
            cmd += ["--processes", str(self.opts.locust_processes)]
        if self.opts.locust_expect_workers:
            cmd += ["--master", "--expect-workers", str(self.opts.locust_expect_workers)]
        return cmd

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SHARDFLOW_BENCH_CLUSTER"] = str(Path(self.opts.cluster_file).absolute())
        env["SHARDFLOW_LOCUST_RUN"] = self.run_id
        env["SHARDFLOW_LOCUST_TENANTS"] = str(self.opts.tenants)
        env["SHARDFLOW_LOCUST_SKEW"] = ("uniform" if self.opts.skew == "uniform"
                                       else f"zipf:{self.opts.zipf_s}")
        env["SHARDFLOW_LOCUST_STEPS"] = str(self.opts.steps)
        env["SHARDFLOW_LOCUST_PAYLOAD"] = str(self.opts.payload_bytes)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH"))
                                            if p)
        return env

    async def run(self) -> None:
        log_path = self.report_dir / "locust.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *self.command(), cwd=ROOT, env=self.env(), stdout=log,
                stderr=subprocess.STDOUT)
            try:
                await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        final = self.report_dir / "locust_final.json"
        if not final.is_file():
            tail = log_path.read_text(errors="replace")[-400:].strip()
            raise RuntimeError(f"locust wrote no statistics (exit {proc.returncode}): {tail}")
        self.stats = {e["method"]: e for e in json.loads(final.read_text())}

        def count(kind: str, key: str) -> int:
            return int(self.stats.get(kind, {}).get(key) or 0)

        self.start_errors = count("start", "num_failures")
        self.submitted = count("start", "num_requests") - self.start_errors
        self.result_errors = count("workflow", "num_failures")
        if self.start_errors or self.result_errors:
            self.last_error = f"locust reported failures: see {self.report_dir}/locust_failures.csv"
        self.done = True


# Bytes of every partition (heap, indexes, TOAST) of the workflow tables on a node.
SIZE_SQL = """
SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::bigint
  FROM pg_inherits i
 WHERE i.inhparent IN ('shardflow.workflows'::regclass, 'shardflow.steps'::regclass,
                       'shardflow.messages'::regclass, 'shardflow.events'::regclass)
"""

POLL_SQL = f"""
SELECT count(*) FILTER (WHERE status IN ('pending', 'running')) AS backlog,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status IN ('failed', 'dead', 'cancelled')) AS failed
  FROM shardflow.workflows
 WHERE name = '{WORKFLOW_NAME}' AND workflow_id LIKE $1
"""
# With a backlog (--backlog), the poll must not scan the table: POLL_SQL would read every
# pending backlog row of every partition each second (a million rows cost more Postgres
# CPU than the workflows being measured). This run's finished rows are found through the
# finished_at index from the run's start (a range over what finished since, backlog
# completions included); its pending and running ones are then what the client started
# minus those (Monitor.backlog).
POLL_FINISHED_SQL = f"""
SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status IN ('failed', 'dead', 'cancelled')) AS failed
  FROM shardflow.workflows
 WHERE finished_at >= $2::timestamptz AND name = '{WORKFLOW_NAME}' AND workflow_id LIKE $1
"""
# Latencies of the rows finished since the last poll, for the live percentiles. The
# window reaches 2 s back (and the caller drops rows it has seen) because finished_at is
# the finishing transaction's start time: a row may commit after a later poll's now().
LIVE_LATENCY_SQL = f"""
SELECT workflow_id, finished_at,
       (extract(epoch FROM finished_at - created_at) * 1000000)::bigint AS us
  FROM shardflow.workflows
 WHERE name = '{WORKFLOW_NAME}' AND workflow_id LIKE $1 AND status = 'succeeded'
   AND ($2::timestamptz IS NULL OR finished_at > $2::timestamptz - interval '2 seconds')
"""


class Monitor:
    """Polls every node once a second (one scan of this run's rows per node) and
    renders the live dashboard."""

    def __init__(self, nodes: list[NodeState], load: Load | LocustLoad, pattern: str) -> None:
        self.nodes = nodes
        self.load = load
        self.pattern = pattern
        self.live_hist = HdrHistogram(1, HIST_MAX_US, 3)
        self.seen: set[str] = set()
        self.samples: list[tuple[float, int, int]] = []  # (t, submitted, completed)
        # with retention, rows leave the tables: completions are counted as seen
        self.count_seen = load.opts.retention is not None
        self.sizes: list[tuple[float, int]] = []  # (t, bytes of the workflow tables)
        # with a backlog: each node's clock at the start of the run (see POLL_FINISHED_SQL)
        self.finished_since: dict[str, dt.datetime] | None = None
        self.completed_rate = 0.0
        self.submitted_rate = 0.0
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TaskProgressColumn(), TextColumn("{task.fields[note]}"))
        total = load.opts.workflows or load.opts.duration * (
            load.opts.effective_rate if load.opts.mode == "open" else 1)
        self.task = self.progress.add_task("completed", total=total, note="")

    @property
    def completed(self) -> int:
        if self.count_seen:
            return len(self.seen)
        return sum(n.succeeded for n in self.nodes)

    @property
    def failed(self) -> int:
        return sum(n.failed for n in self.nodes)

    @property
    def backlog(self) -> int:
        if self.finished_since is not None:
            return max(0, self.load.submitted - self.completed - self.failed)
        return sum(n.backlog for n in self.nodes)

    async def poll(self) -> None:
        for n in self.nodes:
            try:
                conn = await n.ensure()
                if self.finished_since is None:
                    row = await conn.fetchrow(POLL_SQL, self.pattern)
                else:
                    row = dict(await conn.fetchrow(POLL_FINISHED_SQL, self.pattern,
                                                   self.finished_since[n.spec.name]))
                    row["backlog"] = 0  # not counted per node (see Monitor.backlog)
                live = await conn.fetch(LIVE_LATENCY_SQL, self.pattern, n.last_finished)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    asyncpg.InternalClientError):
                # the node is failing over or unreachable (a drill): keep its last
                # figures; the next poll reconnects (terminate: a connection left
                # mid-operation by a dead server cannot even be closed politely)
                n.conn.terminate()
                continue
            n.backlog, n.succeeded, n.failed = row["backlog"], row["succeeded"], row["failed"]
            for r in live:
                if r["workflow_id"] in self.seen:
                    continue
                self.seen.add(r["workflow_id"])
                self.live_hist.record_value(min(max(int(r["us"]), 1), HIST_MAX_US))
                if n.last_finished is None or r["finished_at"] > n.last_finished:
                    n.last_finished = r["finished_at"]
        if self.count_seen:
            total = 0
            for n in self.nodes:
                with contextlib.suppress(Exception):
                    total += int(await n.conn.fetchval(SIZE_SQL))
            self.sizes.append((time.monotonic(), total))
        if isinstance(self.load, LocustLoad) and not self.load.done:
            # locust's own counts arrive when it exits; meanwhile, the rows written
            self.load.submitted = self.backlog + self.completed + self.failed
        now = time.monotonic()
        self.samples.append((now, self.load.submitted, self.completed))
        if len(self.samples) >= 2:
            (t0, s0, c0), (t1, s1, c1) = self.samples[-2], self.samples[-1]
            self.completed_rate = (c1 - c0) / max(t1 - t0, 1e-6)
            self.submitted_rate = (s1 - s0) / max(t1 - t0, 1e-6)
        opts = self.load.opts
        if self.load.done:
            self.progress.update(self.task, total=max(self.load.submitted, 1),
                                 completed=self.completed + self.failed, note="draining")
        elif opts.workflows is not None or opts.mode == "open":
            self.progress.update(self.task, completed=self.completed + self.failed,
                                 note=f"{now - self.samples[0][0]:.0f}s")
        else:
            self.progress.update(self.task, completed=now - self.samples[0][0],
                                 note=f"{now - self.samples[0][0]:.0f}s")

    def render(self) -> Group:
        t = Table(title=f"shardflow bench {self.load.run_id} ({self.load.opts.mode} loop)")
        t.add_column("metric")
        t.add_column("value", justify="right")
        h = self.live_hist
        t.add_row("submitted/s", f"{self.submitted_rate:,.0f}")
        t.add_row("completed/s", f"{self.completed_rate:,.0f}")
        t.add_row("submitted / completed", f"{self.load.submitted:,} / {self.completed:,}")
        t.add_row("latency p50 / p99 so far",
                  "-" if h.get_total_count() == 0 else
                  f"{h.get_value_at_percentile(50) / 1000:.1f} / "
                  f"{h.get_value_at_percentile(99) / 1000:.1f} ms")
        if self.finished_since is None:
            t.add_row("backlog per node (pending+running)",
                      "  ".join(f"{n.spec.name}:{n.backlog}" for n in self.nodes))
        else:
            t.add_row("this run's pending+running (all nodes)", f"{self.backlog:,}")
            t.add_row("preloaded backlog (bl-*)", f"{self.load.opts.backlog:,} rows")
        errors = self.load.start_errors + self.load.result_errors + self.failed
        t.add_row("errors", f"[red]{errors}[/red]" if errors else "0")
        if self.load.last_error:
            t.add_row("last error", self.load.last_error[:80])
        return Group(t, self.progress)


# -- the run -----------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {"cpus": os.cpu_count(), "mem_gb": round(mem_kb / 1024 / 1024, 1)}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _primaries(spec: ClusterSpec) -> list[NodeSpec]:
    """The shardflow nodes: where workflow rows are read (on Citus, the coordinator)."""
    return [n for n in spec.nodes if n.role in ("primary", "coordinator")]


def _servers(spec: ClusterSpec) -> list[NodeSpec]:
    """Every server doing the work, whose CPU and WAL count: with Citus workers."""
    return [n for n in spec.nodes if n.role in ("primary", "coordinator", "worker")]


async def _run_async(opts: BenchOptions, spec: ClusterSpec, procs: list[subprocess.Popen[bytes]],
                     run_id: str, console: Console, report_dir: Path,
                     fault: Fault | None) -> dict[str, Any]:
    flows = _load_benchflows()
    config = EngineConfig(**opts.engine_config)
    engine = flows.make_engine(Path(opts.cluster_file), config=config, run_workers=False)
    pattern = f"{run_id}-%"
    servers: list[NodeState] = []
    data = {n.name for n in _primaries(spec)}
    try:
        for ns in _servers(spec):
            conn = await asyncpg.connect(ns.dsn)
            node = NodeState(ns, conn)
            servers.append(node)
            node.postmaster = await postmaster_pid(ns, conn)
            node.has_pss = bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements')"))
        nodes = [n for n in servers if n.spec.name in data]
        first = nodes[0].conn
        pg_version = str(await first.fetchval("SHOW server_version"))
        pg_settings = {r["name"]: r["value"] for r in await first.fetch(
            "SELECT name, current_setting(name) AS value FROM pg_settings "
            "WHERE name = ANY($1::text[]) ORDER BY name", list(POSTGRES_SETTINGS))}
        await engine.open()
        await _wait_ready(nodes, procs, opts.ready_timeout, console, report_dir)
        load: Load | LocustLoad = (LocustLoad(opts, run_id, report_dir) if opts.locust_users
                                   else Load(opts, engine, run_id))
        monitor = Monitor(nodes, load, pattern)
        if opts.backlog:
            # each node's own clock, as finished_at is: the measured window's start
            monitor.finished_since = {}
            for n in nodes:
                ts = await n.conn.fetchval("SELECT clock_timestamp()")
                monitor.finished_since[n.spec.name] = ts
                n.last_finished = ts
        pss_before = await _pss_snapshot(servers) if opts.profile else None
        before = await _snapshot(servers, [p.pid for p in procs])
        await monitor.poll()
        load_task = asyncio.create_task(load.run())
        spy = (asyncio.create_task(_py_spy(procs[0].pid, opts, report_dir, console))
               if opts.profile else None)
        killed: set[int] = set()  # worker pids a fault kills on purpose
        fault_task = (asyncio.create_task(fault.run(FaultContext(
            procs=procs, nodes=nodes, spec=spec, console=console, monitor=monitor,
            killed=killed))) if fault is not None else None)
        drain_deadline: float | None = None
        with Live(monitor.render(), console=console, refresh_per_second=2,
                  transient=False) as live:
            while True:
                await asyncio.sleep(1.0)
                check_workers(procs, report_dir, "during the run", killed)
                if load_task.done() and drain_deadline is None:
                    load_task.result()  # a bug in the load generator must surface
                    drain_deadline = time.monotonic() + opts.drain_timeout
                await monitor.poll()
                live.update(monitor.render())
                if drain_deadline is not None:
                    terminal = monitor.completed + monitor.failed
                    if (monitor.backlog == 0 and terminal >= load.submitted
                            and (fault_task is None or fault_task.done())):
                        break
                    if time.monotonic() > drain_deadline:
                        console.print(f"[red]drain timeout: {monitor.backlog} workflows "
                                      f"still pending or running[/red]")
                        break
        fault_result = await fault_task if fault_task is not None else None
        after = await _snapshot(servers, [p.pid for p in procs])
        window_end = {n.spec.name: await n.call("fetchval", "SELECT clock_timestamp()")
                      for n in nodes} if opts.backlog else {}
        pss_after = await _pss_snapshot(servers) if opts.profile else None
        spy_note = await spy if spy is not None else None
        wal = 0
        for n, a, b in zip(servers, before["wal"], after["wal"], strict=True):
            # LSNs travel as text: asyncpg has no codec for pg_lsn parameters
            wal += int(await n.call(
                "fetchval", "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)",
                b, a))
        # The final read: every row of this run on every node.
        rows: list[tuple[str, str, float, float | None]] = []
        dup_keys = effect_rows = effect_keys = reruns = 0
        per_node: dict[str, dict[str, int]] = {}
        for n in nodes:
            recs = await n.call(
                "fetch",
                "SELECT workflow_id, status, extract(epoch FROM created_at)::float8 AS c, "
                "extract(epoch FROM finished_at)::float8 AS f FROM shardflow.workflows "
                # tombstones of purged workflows (retention) count as purged
                f"WHERE name = '{WORKFLOW_NAME}' AND workflow_id LIKE $1 "
                "AND status <> 'purged'", pattern)
            rows += [(r["workflow_id"], r["status"], r["c"], r["f"]) for r in recs]
            per_node[n.spec.name] = dict(Counter(r["status"] for r in recs))
            e = await n.conn.fetchrow(
                "SELECT count(*) FILTER (WHERE k > 1) AS dup, coalesce(sum(k), 0) AS total, "
                "count(*) AS keys FROM (SELECT count(*) AS k FROM public.bench_effects "
                "WHERE workflow_id LIKE $1 GROUP BY tenant_id, workflow_id, seq) x", pattern)
            # executions of non-transactional steps beyond the first: crash re-runs
            reruns += int(await n.conn.fetchval(
                "SELECT coalesce(sum(attempts - 1), 0) FROM shardflow.steps "
                "WHERE kind = 'step' AND workflow_id LIKE $1", pattern))
            dup_keys += int(e["dup"])
            effect_rows += int(e["total"])
            effect_keys += int(e["keys"])
        backlog_counts = (await _backlog_counts(nodes, run_id, rows, monitor, window_end)
                          if opts.backlog else None)
        return {
            "backlog": backlog_counts, "pss": (pss_before, pss_after), "spy_note": spy_note,
            "load": load, "monitor": monitor, "before": before, "after": after, "wal": wal,
            "rows": rows, "dup_keys": dup_keys, "effect_rows": effect_rows,
            "effect_keys": effect_keys, "per_node": per_node, "pg_version": pg_version,
            "reruns_external": reruns, "fault": fault_result,
            "pg_settings": pg_settings, "stmts_available": all(n.has_pss for n in servers),
            "db_cpu_available": all(n.postmaster is not None for n in servers),
        }
    finally:
        await engine.close()
        for n in servers:
            await n.conn.close()


def _pct(h: HdrHistogram, p: float) -> float:
    return round(h.get_value_at_percentile(p) / 1000, 3) if h.get_total_count() else 0.0


def _per_wf(value: int | None, completed: int, digits: int = 1) -> float | None:
    if value is None or completed == 0:
        return None
    return round(value / completed, digits)


def run_bench(opts: BenchOptions, console: Console, *, fault: Fault | None = None,
              monitor_spec: ClusterSpec | None = None) -> dict[str, Any]:
    """Run one benchmark; write its report; return ``{"summary", "audit",
    "report_dir", ...}`` (``summary`` is what summary.json holds).

    For drills: ``fault`` runs alongside the load (see :class:`Fault`), and
    ``monitor_spec`` is how the bench itself reaches the nodes when the workers and the
    load go through ``opts.cluster_file`` (e.g. a fault-injecting proxy)."""
    spec = monitor_spec or clusterfile.load(Path(opts.cluster_file))
    nodes = _primaries(spec)
    scenario = opts.scenario or f"bench-{len(nodes)}n-{opts.tenants}t-{opts.steps}s"
    date = dt.date.today().isoformat()
    report_dir = Path(opts.results_dir) / f"{date}-{scenario}"
    flows = _load_benchflows()
    for n in nodes:
        _prepare_node(n, opts.clean, flows.EFFECTS_DDL)
    # only now: an unreachable node leaves no empty report directory behind
    report_dir.mkdir(parents=True, exist_ok=True)
    run_id = "b" + uuid.uuid4().hex[:10]
    load_desc = (f"concurrency {opts.concurrency}" if opts.concurrency is not None
                 else f"{opts.effective_rate:g}/s")
    console.print(f"bench {run_id}: {len(nodes)} nodes, {spec.shard_map.shard_count} shards, "
                  f"{opts.worker_processes} worker processes, {opts.mode} loop ({load_desc})")
    backlog_info = _preload_backlog(nodes, opts, run_id, console) if opts.backlog else None
    if opts.retention is not None:
        _set_retention(nodes, opts.retention)
    procs = _start_workers(opts, report_dir)
    try:
        res = loop.run(_run_async(opts, spec, procs, run_id, console, report_dir, fault))
    finally:
        if opts.retention is not None:
            _set_retention(nodes, None)
        exit_codes = _stop_workers(procs)
        for log in report_dir.glob("worker-*.log"):
            if log.stat().st_size == 0:
                log.unlink()  # keep only logs that say something

    load: Load | LocustLoad = res["load"]
    rows: list[tuple[str, str, float, float | None]] = res["rows"]
    status = Counter(r[1] for r in rows)
    completed = status["succeeded"]
    failed = status["failed"] + status["dead"] + status["cancelled"]
    hist = HdrHistogram(1, HIST_MAX_US, 3)
    done_rows = [r for r in rows if r[1] == "succeeded" and r[3] is not None]
    for r in done_rows:
        hist.record_value(min(max(round((float(r[3] or 0) - r[2]) * 1e6), 1), HIST_MAX_US))
    t_first = min((r[2] for r in rows), default=0.0)
    t_last = max((float(r[3] or 0) for r in done_rows), default=t_first)
    duration = max(t_last - t_first, 1e-6)
    monitor: Monitor = res["monitor"]
    purged = 0
    if opts.retention is not None:
        # rows left the tables during the run: completions are those the dashboard saw
        # finish (each one, its latency from the same timestamps), plus the rows left
        purged = len(monitor.seen - {r[0] for r in rows})
        completed += purged
        hist = monitor.live_hist
        samples = monitor.samples
        t0 = next((t for t, s, _ in samples if s > 0), samples[0][0] if samples else 0.0)
        t1 = next((t for t, _, c in samples if c >= completed), samples[-1][0]
                  if samples else t0)
        duration = max(t1 - t0, 1e-6)
    before, after = res["before"], res["after"]
    db_cpu = _delta(before["db_cpu"], after["db_cpu"])
    calls = _delta(before["calls"], after["calls"])
    worker_cpu = _delta(before["worker_cpu"], after["worker_cpu"])
    config = EngineConfig(**opts.engine_config)
    backlog_done: dict[str, int] = res["backlog"] or {"in_run": 0, "in_window": 0}
    # the costs are divided by every workflow completed in their window: with a backlog,
    # the backlog's completions did their share of the work measured
    cost_n = completed + backlog_done["in_window"]
    summary: dict[str, Any] = {
        "workflows_per_sec": round(completed / duration, 1) if completed else 0.0,
        "completed": completed,
        "failed": failed,
        "duplicates": res["dup_keys"],
        "latency_ms": {"p50": _pct(hist, 50), "p90": _pct(hist, 90), "p99": _pct(hist, 99),
                       "p999": _pct(hist, 99.9),
                       "max": round(hist.get_max_value() / 1000, 3) if completed else 0.0},
        "db_cpu_us_per_workflow": _per_wf(db_cpu, cost_n),
        "wal_bytes_per_workflow": _per_wf(res["wal"], cost_n),
        "worker_cpu_us_per_workflow": _per_wf(worker_cpu, cost_n),
        "statements_per_workflow": _per_wf(calls, cost_n, 2),
        "nodes": len(nodes),
        "shards": spec.shard_map.shard_count,
        "tenants": opts.tenants,
        "steps": opts.steps,
        "duration_s": round(duration, 3),
        "machine": _machine(),
        "versions": {"python": platform.python_version(), "postgres": res["pg_version"],
                     "shardflow": __version__},
        "settings": {
            "engine": dataclasses.asdict(config),
            "postgres": res["pg_settings"],
            "bench": {"mode": opts.mode, "rate": opts.effective_rate if opts.mode == "open"
                      else None, "concurrency": opts.concurrency, "duration": opts.duration,
                      "workflows": opts.workflows, "skew": opts.skew,
                      "zipf_s": opts.zipf_s if opts.skew == "zipf" else None,
                      "payload_bytes": opts.payload_bytes, "step_ms": opts.step_ms,
                      "worker_processes": opts.worker_processes, "seed": opts.seed,
                      # the workers' and the load generator's (shardflow.loop)
                      "event_loop": loop.loop_name()},
        },
        "backlog": opts.backlog,
        # every completion between the run's first start and last completion, the
        # backlog's included: the throughput with N rows pending
        "completed_per_sec_all": (round((completed + backlog_done["in_run"]) / duration, 1)
                                  if completed else 0.0),
        "backlog_completed_in_window": backlog_done["in_window"],
    }
    assert tuple(summary) == SUMMARY_FIELDS
    started = load.submitted
    audit = {
        "started": started,
        "rows": len(rows),
        "completed": completed,
        "failed": failed,
        "unfinished": status["pending"] + status["running"],
        "duplicates": res["dup_keys"],
        "effect_rows": res["effect_rows"],
        "effect_keys": res["effect_keys"],
        "reruns_external": res["reruns_external"],
        "start_errors": load.start_errors,
        "result_errors": load.result_errors,
        "per_node": res["per_node"],
        "worker_exit_codes": exit_codes,
    }
    audit["purged_by_retention"] = purged
    audit["ok"] = (completed == started == len(rows) + purged == res["effect_keys"]
                   and failed == 0 and res["dup_keys"] == 0 and load.start_errors == 0)
    pss_before, pss_after = res["pss"]
    if pss_before is not None and pss_after is not None:
        (report_dir / "profile-postgres.txt").write_text(
            _pg_profile_text(pss_before, pss_after, cost_n))
    extras = {
        "backlog": backlog_info, "profile_note": res["spy_note"],
        "run_id": run_id, "hist": hist, "start_lag": load.start_lag,
        "client_cpu_us": after["client_cpu"] - before["client_cpu"],
        "window_s": after["at"] - before["at"], "rows": rows, "scenario": scenario,
        "stmts_available": res["stmts_available"],
        "db_cpu_available": res["db_cpu_available"],
        "cpu_model": _cpu_model(),
        "locust": load.stats if isinstance(load, LocustLoad) else None,
        "sizes": monitor.sizes,
    }
    _write_report(report_dir, opts, summary, audit, extras)
    if opts.peer == "dbos":
        _run_peer(opts, spec, console, summary, report_dir)
    if opts.json_path is not None:
        Path(opts.json_path).write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(console, summary, audit, report_dir)
    return {"summary": summary, "audit": audit, "report_dir": report_dir, "rows": rows,
            "acked": getattr(load, "acked", None), "fault": res["fault"], "run_id": run_id}


# -- the report --------------------------------------------------------------------------


def _run_peer(opts: BenchOptions, spec: ClusterSpec, console: Console,
              summary: dict[str, Any], report_dir: Path) -> None:
    """The same workload on DBOS Transact, right after ours, on the first node's Postgres
    server (DBOS has no sharding: one server), with as many worker processes; adds
    ``peer`` and ``ratio`` to the summary and a comparison to the report."""
    _load_benchflows()  # puts the repository root on sys.path
    peer_mod = importlib.import_module("loadtest.peer_dbos")
    node = _primaries(spec)[0]
    admin = psycopg_conninfo.make_conninfo(node.dsn, dbname="postgres")
    console.print(f"[bold]peer run: DBOS Transact on node {node.name}'s server, same "
                  "workload[/bold]")
    peer = peer_mod.run_dbos_peer(
        admin_dsn=admin, duration=opts.duration,
        rate=opts.effective_rate if opts.mode == "open" else None,
        concurrency=opts.concurrency, tenants=opts.tenants, skew=opts.skew,
        zipf_s=opts.zipf_s, steps=opts.steps, payload_bytes=opts.payload_bytes,
        processes=opts.worker_processes, seed=opts.seed, drain_timeout=opts.drain_timeout,
        progress=lambda m: console.print(f"[dim]dbos: {m}[/dim]"))
    (report_dir / "peer_dbos.json").write_text(json.dumps(
        {k: v for k, v in peer.items() if k != "hgrm"}, indent=2) + "\n")
    (report_dir / "peer_dbos_latency_ms.hgrm").write_text(peer["hgrm"])
    summary["peer"] = {"name": "dbos", "version": peer["version"],
                       "workflows_per_sec": peer["workflows_per_sec"],
                       "latency_ms": peer["latency_ms"]}
    ours, theirs = summary["workflows_per_sec"], peer["workflows_per_sec"]
    summary["ratio"] = round(ours / theirs, 2) if theirs else None
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [("workflows/s", ours, theirs),
            ("completed / failed / duplicates",
             f"{summary['completed']} / {summary['failed']} / {summary['duplicates']}",
             f"{peer['completed']} / {peer['failed']} / {peer['duplicates']}"),
            *((f"latency {k} ms", summary["latency_ms"][k], peer["latency_ms"][k])
              for k in ("p50", "p90", "p99", "max")),
            ("Postgres CPU µs per workflow", summary["db_cpu_us_per_workflow"],
             peer["db_cpu_us_per_workflow"]),
            ("WAL bytes per workflow", summary["wal_bytes_per_workflow"],
             peer["wal_bytes_per_workflow"]),
            ("statements per workflow", summary["statements_per_workflow"],
             peer["statements_per_workflow"]),
            ("worker CPU µs per workflow", summary["worker_cpu_us_per_workflow"],
             peer["worker_cpu_us_per_workflow"])]
    lines = ["", "## Side by side: DBOS Transact", "",
             f"Right after this run, the same workload (same steps, payload, tenants mix, "
             f"load, duration and number of worker processes) ran on DBOS Transact "
             f"{peer['version']} on node {node.name}'s Postgres server, on the same "
             f"machine. **Ratio (workflows/s): {summary['ratio']}x.**", "",
             "| figure | shardflow | DBOS |", "|---|---|---|",
             *(f"| {k} | {_fmt(a)} | {_fmt(b)} |" for k, a, b in rows), "",
             "How DBOS was configured (from its documentation):", "", peer["config"], "",
             "DBOS's raw figures: `peer_dbos.json`, `peer_dbos_latency_ms.hgrm`.", ""]
    if _peer_plot(report_dir, summary, peer):
        lines += ["![shardflow vs DBOS](peer.png)", ""]
    with (report_dir / "report.md").open("a") as f:
        f.write("\n".join(lines))
    console.print(f"DBOS {peer['version']}: {theirs} workflows/s, p50 "
                  f"{peer['latency_ms']['p50']} ms, p99 {peer['latency_ms']['p99']} ms; "
                  f"ratio {summary['ratio']}x")


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not
    installed (the reports then say so and carry no plots)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _peer_plot(report_dir: Path, summary: dict[str, Any], peer: dict[str, Any]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["shardflow", f"DBOS {peer['version']}"]
    a1.bar(names, [summary["workflows_per_sec"], peer["workflows_per_sec"]],
           color=["tab:blue", "tab:gray"])
    a1.set_ylabel("workflows/s (completed)")
    a1.set_title(f"throughput (ratio {summary['ratio']}x)")
    width = 0.35
    ks = ["p50", "p90", "p99"]
    xs = range(len(ks))
    a2.bar([x - width / 2 for x in xs], [summary["latency_ms"][k] for k in ks], width,
           label="shardflow", color="tab:blue")
    a2.bar([x + width / 2 for x in xs], [peer["latency_ms"][k] for k in ks], width,
           label="DBOS", color="tab:gray")
    a2.set_xticks(list(xs), ks)
    a2.set_ylabel("latency (ms), start commit to completion commit")
    a2.set_yscale("log")
    a2.legend()
    a2.set_title("latency")
    fig.tight_layout()
    fig.savefig(report_dir / "peer.png", dpi=110)
    plt.close(fig)
    return True


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.1f}{unit}"
    return f"{v:,}{unit}" if isinstance(v, int) else f"{v}{unit}"


def _figure_rows(summary: dict[str, Any], audit: dict[str, Any]) -> list[tuple[str, str]]:
    lat = summary["latency_ms"]
    return [
        ("throughput", f"{summary['workflows_per_sec']:,.1f} workflows/s "
                       f"(completed / first start to last completion)"),
        ("completed / started", f"{audit['completed']:,} / {audit['started']:,}"),
        ("failed / duplicates / unfinished",
         f"{summary['failed']} / {summary['duplicates']} / {audit['unfinished']}"),
        ("latency p50 / p90 / p99 / p99.9 / max",
         f"{lat['p50']:.1f} / {lat['p90']:.1f} / {lat['p99']:.1f} / {lat['p999']:.1f} / "
         f"{lat['max']:.1f} ms"),
        ("Postgres CPU per workflow", _fmt(summary["db_cpu_us_per_workflow"], " µs")),
        ("WAL per workflow", _fmt(summary["wal_bytes_per_workflow"], " bytes")),
        ("statements per workflow", _fmt(summary["statements_per_workflow"])),
        ("worker CPU per workflow", _fmt(summary["worker_cpu_us_per_workflow"], " µs")),
        ("nodes / shards / tenants / steps",
         f"{summary['nodes']} / {summary['shards']} / {summary['tenants']} / "
         f"{summary['steps']}"),
        ("duration", f"{summary['duration_s']:.1f} s"),
        *([("with a backlog of", f"{summary['backlog']:,} pending: "
            f"{summary['completed_per_sec_all']:,.1f} workflows/s completed in all")]
          if summary.get("backlog") else []),
    ]


def _plots(report_dir: Path, rows: list[tuple[str, str, float, float | None]],
           hist: HdrHistogram) -> str | None:
    """throughput.png and latency.png; returns a note when they could not be drawn."""
    plt = pyplot()
    if plt is None:
        return "matplotlib is not importable: no plots (pip install matplotlib)"
    if not rows:
        return "no workflows: no plots"
    t0 = min(r[2] for r in rows)
    starts: Counter[int] = Counter(int(r[2] - t0) for r in rows)
    done = [r for r in rows if r[1] == "succeeded" and r[3] is not None]
    ends: Counter[int] = Counter(int(float(r[3] or 0) - t0) for r in done)
    secs = list(range(max([*starts, *ends]) + 1))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(secs, [starts[s] for s in secs], label="started/s (start committed)")
    ax.plot(secs, [ends[s] for s in secs], label="completed/s (completion committed)")
    ax.set_xlabel("seconds since the first start")
    ax.set_ylabel("workflows per second")
    ax.set_title("throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(report_dir / "throughput.png", dpi=110)
    plt.close(fig)

    by_sec: dict[int, list[float]] = {}
    for r in done:
        by_sec.setdefault(int(float(r[3] or 0) - t0), []).append((float(r[3] or 0) - r[2]) * 1e3)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    ps = [50, 75, 90, 95, 99, 99.5, 99.9, 99.99, 100]
    a1.plot([1 / (1 - p / 100) if p < 100 else 1e5 for p in ps],
            [hist.get_value_at_percentile(p) / 1000 for p in ps], marker="o")
    a1.set_xscale("log")
    a1.set_xticks([1 / (1 - p / 100) if p < 100 else 1e5 for p in ps])
    a1.set_xticklabels([f"p{p:g}" if p < 100 else "max" for p in ps], rotation=45)
    a1.set_ylabel("latency (ms)")
    a1.set_title("latency distribution (start commit to completion commit)")
    a1.grid(alpha=0.3)
    xs = sorted(by_sec)

    def q(vals: list[float], p: float) -> float:
        s = sorted(vals)
        return s[min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1)]

    for p in (50, 99):
        a2.plot(xs, [q(by_sec[x], p) for x in xs], label=f"p{p}")
    a2.set_xlabel("seconds since the first start (by completion)")
    a2.set_ylabel("latency (ms)")
    a2.set_title("latency over time")
    a2.grid(alpha=0.3)
    a2.legend()
    fig.tight_layout()
    fig.savefig(report_dir / "latency.png", dpi=110)
    plt.close(fig)
    return None


def _write_report(report_dir: Path, opts: BenchOptions, summary: dict[str, Any],
                  audit: dict[str, Any], extras: dict[str, Any]) -> None:
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (report_dir / "audit.json").write_text(json.dumps(audit, indent=2) + "\n")
    buf = io.BytesIO()
    # values recorded in µs, written in ms (the usual .hgrm unit, as wrk2 and the
    # HdrHistogram plotter expect)
    extras["hist"].output_percentile_distribution(buf, 1000)
    (report_dir / "latency_ms.hgrm").write_bytes(buf.getvalue())
    plot_note = _plots(report_dir, extras["rows"], extras["hist"])
    lag: HdrHistogram = extras["start_lag"]
    m, v = summary["machine"], summary["versions"]
    lines = [
        f"# {extras['scenario']} ({dt.date.today().isoformat()}, run {extras['run_id']})",
        "",
        f"Audit: **{'passed' if audit['ok'] else 'FAILED'}**: {audit['started']:,} started, "
        f"{audit['completed']:,} completed (committed), {audit['failed']} failed, "
        f"{audit['duplicates']} duplicate transactional effects, {audit['unfinished']} "
        f"unfinished, {audit['start_errors']} start errors.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {k} | {val} |" for k, val in _figure_rows(summary, audit)),
        "",
        "## How it was measured",
        "",
        f"* Load: {_load_description(opts, lag, extras.get('locust'))}"
        + f"; {opts.tenants} tenants ({opts.skew}); {opts.steps} steps "
        f"({opts.steps - 1} external + 1 transactional); {opts.payload_bytes} payload bytes.",
        "* Latency: `finished_at - created_at` of each workflow row, read from every node at "
        "the end (start commit to completion commit); histogram in `latency_ms.hgrm`.",
        f"* Costs over the measured window ({extras['window_s']:.1f} s, workers up to "
        "backlog drained), divided by completed workflows: Postgres CPU = utime+stime of "
        "every server process of every node incl. exited children (/proc); WAL = "
        "`pg_wal_lsn_diff` of `pg_current_wal_lsn()` per node; statements = "
        "`pg_stat_statements` calls in the database (utility statements included"
        + ("" if extras["stmts_available"] else "; **extension absent: n/a**")
        + "); worker CPU = utime+stime of the worker processes (/proc)."
        + ("" if extras["db_cpu_available"] else " **Postgres CPU n/a: servers not local.**"),
        "* The bench's own once-a-second poll (one scan of the run's rows per node) is "
        "included in the Postgres figures.",
        f"* Load generator (client) CPU: {extras['client_cpu_us'] / 1e6:.2f} s "
        f"({_fmt(_per_wf(extras['client_cpu_us'], audit['completed']), ' µs')} per workflow),"
        " not included above.",
        "",
        "## Machine and versions",
        "",
        f"{m['cpus']} CPUs ({extras['cpu_model']}), {m['mem_gb']} GB RAM; "
        f"{platform.system()} {platform.release()}; Python {v['python']}, "
        f"PostgreSQL {v['postgres']}, shardflow {v['shardflow']}. All nodes, workers and the "
        "load generator share this machine.",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(summary["settings"], indent=2),
        "```",
        "",
        "## Command",
        "",
        "```sh",
        opts.command_line(),
        "```",
        "",
        "## Plots",
        "",
        *([f"_{plot_note}_"] if plot_note else
          ["![throughput](throughput.png)", "", "![latency](latency.png)"]),
        "",
        *_retention_section(report_dir, opts, audit, extras["sizes"]),
        *_backlog_section(opts, summary, extras.get("backlog")),
        *_profile_section(report_dir, opts, extras.get("profile_note")),
    ]
    (report_dir / "report.md").write_text("\n".join(lines))
    _update_index(Path(opts.results_dir), report_dir, summary, audit, opts)


def _load_description(opts: BenchOptions, lag: HdrHistogram,
                      locust: dict[str, Any] | None) -> str:
    if opts.mode == "open":
        return (f"open loop, {opts.effective_rate:g} starts/s on a fixed schedule (no "
                f"coordinated omission); start lag p50/p99/max "
                f"{lag.get_value_at_percentile(50) / 1000:.1f} / "
                f"{lag.get_value_at_percentile(99) / 1000:.1f} / "
                f"{lag.get_max_value() / 1000:.1f} ms")
    if opts.mode == "closed":
        return (f"closed loop, {opts.concurrency} clients each waiting on handle.result "
                "(throughput is bounded by latency and result polling)")
    procs = (f", master + {opts.locust_processes} worker processes"
             if opts.locust_processes > 1 else "")
    remote = (f", master + {opts.locust_expect_workers} remote workers"
              if opts.locust_expect_workers else "")
    text = (f"locust (`loadtest/locustfile.py`, headless{procs}{remote}), "
            f"{opts.locust_users} users each starting a workflow through the psycopg "
            "client and polling for its end (closed loop)")
    for kind, what in (("start", "start call"), ("workflow", "start to end seen by the user")):
        e = (locust or {}).get(kind)
        if e and e.get("num_requests"):
            text += (f"; locust's own {what}: {e['num_requests']:,} requests, "
                     f"{e['num_failures']} failures, mean "
                     f"{e['total_response_time'] / e['num_requests']:.1f} ms")
    return text + " (full locust statistics: `locust_*.csv`, `locust_final.json`)"


def _retention_section(report_dir: Path, opts: BenchOptions, audit: dict[str, Any],
                       sizes: list[tuple[float, int]]) -> list[str]:
    """With --retention: the workflow tables' size over the run, and a plot."""
    if opts.retention is None or not sizes:
        return []
    mb = [b / 2**20 for _, b in sizes]
    t0 = sizes[0][0]
    third = max(1, len(mb) // 3)
    lines = ["## Retention", "",
             f"Finished workflows were deleted {opts.retention:g} s after finishing "
             f"({audit['purged_by_retention']:,} during the run; completions and latency "
             "come from the dashboard's once-a-second reads, which saw every one before "
             "it went). Size of every partition (heap, indexes, TOAST) of the workflow "
             "tables, all nodes: "
             f"start {mb[0]:.1f} MB, max {max(mb):.1f} MB, end {mb[-1]:.1f} MB; mean of "
             f"the middle third {sum(mb[third:2 * third]) / max(1, len(mb[third:2 * third])):.1f}"
             f" MB vs last third {sum(mb[2 * third:]) / max(1, len(mb[2 * third:])):.1f} MB.",
             ""]
    plt = pyplot()
    if plt is None:
        return lines
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot([t - t0 for t, _ in sizes], mb)
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("MB (workflows, steps, messages, events)")
    ax.set_title(f"workflow tables' size with retention {opts.retention:g} s")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report_dir / "table_size.png", dpi=110)
    plt.close(fig)
    return [*lines, "![table size](table_size.png)", ""]


def _backlog_section(opts: BenchOptions, summary: dict[str, Any],
                     info: dict[str, Any] | None) -> list[str]:
    """With --backlog: what was preloaded and how the figures count it."""
    if not opts.backlog or info is None:
        return []
    return ["## Backlog", "",
            f"Before the run, {opts.backlog:,} pending `{WORKFLOW_NAME}` workflows (ids "
            f"`{BACKLOG_PREFIX}<run>-<n>`, the run's inputs, spread evenly over its "
            f"{opts.tenants:,} tenants, per node {info['rows_per_node']}) were inserted "
            f"server side in {info['insert_s']} s, then every node was vacuumed, analyzed "
            f"and checkpointed ({info['total_s']} s in all). They have priority "
            f"{BACKLOG_PRIORITY}, below the run's own workflows: within a tenant a claim "
            "takes the run's first, and the backlog takes the capacity they leave.", "",
            f"* All completions, the backlog's included, between the run's first start and "
            f"last completion: **{summary['completed_per_sec_all']:,.1f} workflows/s** "
            f"(the run's own: {summary['workflows_per_sec']:,.1f}/s).",
            f"* Costs per workflow are divided by every workflow completed in the measured "
            f"window: {summary['completed']:,} of the run + "
            f"{summary['backlog_completed_in_window']:,} of the backlog.",
            "* The audit covers the run's own workflows; the backlog's leftovers stay "
            "pending until the next run's cleanup (without `--keep-old`).", ""]


def _profile_section(report_dir: Path, opts: BenchOptions, note: str | None) -> list[str]:
    """With --profile: the worker's and Postgres's profiles, inline."""
    if not opts.profile:
        return []
    lines = ["## Profile", ""]
    worker = report_dir / "profile-worker.txt"
    if worker.is_file():
        lines += [f"One worker process, py-spy ({note}; `profile-worker.txt`, collapsed "
                  "stacks for flame graph tools in `profile-worker.folded.txt`). py-spy "
                  "itself used CPU during the run: the figures above include that "
                  "interference.", "", "```text", worker.read_text().rstrip(), "```", ""]
    else:
        lines += [f"_No worker profile: {note}._", ""]
    pg = report_dir / "profile-postgres.txt"
    if pg.is_file():
        lines += ["Postgres (`profile-postgres.txt`):", "", "```text",
                  pg.read_text().rstrip(), "```", ""]
    else:
        lines += ["_No Postgres profile: pg_stat_statements is not installed on every "
                  "node._", ""]
    return lines


INDEX_HEADER = [
    "# Benchmark results",
    "",
    "One row per run directory (`python -m shardflow.bench`, see `loadtest/README.md`); "
    "a re-run of the same scenario on the same day replaces its row. Performance reports "
    "(`python -m loadtest.perfreport`: sweeps, plots, a capacity model) are the "
    "`*-performance/` directories, their runs under `runs/`.",
    "",
    "| run | mode | nodes | tenants | steps | workflows/s | p50 ms | p99 ms | "
    "PG CPU µs/wf | WAL B/wf | stmts/wf | worker CPU µs/wf | audit |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def _update_index(results_dir: Path, report_dir: Path, summary: dict[str, Any],
                  audit: dict[str, Any], opts: BenchOptions) -> None:
    index = results_dir / "README.md"
    name = report_dir.name
    lat = summary["latency_ms"]
    mode = (f"open {opts.effective_rate:g}/s" if opts.mode == "open"
            else f"closed c={opts.concurrency}")
    row = (f"| [{name}]({name}/report.md) | {mode} | {summary['nodes']} | "
           f"{summary['tenants']} | {summary['steps']} | {summary['workflows_per_sec']:,.1f} | "
           f"{lat['p50']:.1f} | {lat['p99']:.1f} | {_fmt(summary['db_cpu_us_per_workflow'])} | "
           f"{_fmt(summary['wal_bytes_per_workflow'])} | "
           f"{_fmt(summary['statements_per_workflow'])} | "
           f"{_fmt(summary['worker_cpu_us_per_workflow'])} | "
           f"{'ok' if audit['ok'] else 'FAILED'} |")
    rows: list[str] = []
    if index.exists():
        lines = index.read_text().splitlines()
        # keep the rows of other runs (table rows after the separator line)
        rows = [ln for ln in lines if ln.startswith("| [") and f"[{name}]" not in ln]
    rows.append(row)
    rows.sort()
    index.write_text("\n".join([*INDEX_HEADER, *rows]) + "\n")


def _print_summary(console: Console, summary: dict[str, Any], audit: dict[str, Any],
                   report_dir: Path) -> None:
    t = Table(title="shardflow bench")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in _figure_rows(summary, audit):
        t.add_row(k, v)
    console.print(t)
    console.print("[green]audit passed[/green]" if audit["ok"] else
                  f"[red]audit FAILED[/red] {json.dumps(audit)}")
    console.print(f"report: {report_dir}")


# -- command line -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> BenchOptions:
    from .cliutil import CLUSTER_HELP, OneLineParser

    p = OneLineParser(prog="shardflow bench", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster-file", type=Path, default=None, metavar="FILE",
                   help=CLUSTER_HELP)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=float, help="open loop: starts per second (default 200)")
    g.add_argument("--concurrency", type=int, help="closed loop: concurrent clients")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals")
    p.add_argument("--workflows", type=int, help="stop after this many starts instead")
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--skew", choices=("uniform", "zipf"), default="uniform")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--payload-bytes", type=int, default=100)
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="each external step waits this long (default 0: no work)")
    p.add_argument("--worker-processes", type=int, default=2)
    p.add_argument("--results-dir", type=Path, default=Path("results"))
    p.add_argument("--scenario")
    p.add_argument("--engine-config", default="{}",
                   help='EngineConfig fields as JSON, e.g. \'{"claim_batch": 128}\'')
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--keep-old", action="store_true",
                   help="keep earlier bench rows (default: delete them before the run)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="also write summary.json to PATH")
    p.add_argument("--retention", type=float, metavar="SECONDS",
                   help="delete finished workflows SECONDS after they finish during the "
                        "run, and record the workflow tables' size over time")
    p.add_argument("--backlog", type=int, default=0, metavar="N",
                   help="before the run, preload N pending bench workflows (priority -1, "
                        "ids bl-...) over the tenants: throughput with N rows pending")
    p.add_argument("--profile", action="store_true",
                   help="sample one worker process with py-spy for ~10 s during the run "
                        "and rank the statements by execution time (profile-*.txt)")
    p.add_argument("--peer", choices=("dbos",),
                   help="then run the same workload on DBOS Transact (pip install dbos) "
                        "and report both and the ratio")
    lo = p.add_argument_group("locust as the load generator (pip install locust)")
    lo.add_argument("--locust-users", type=int,
                    help="run loadtest/locustfile.py headless with this many users "
                         "instead of the bench's own load")
    lo.add_argument("--locust-processes", type=int, default=1,
                    help="locust master + this many worker processes on this machine")
    lo.add_argument("--locust-expect-workers", type=int, default=0,
                    help="run locust as a master waiting for this many workers started "
                         "elsewhere (locust -f loadtest/locustfile.py --worker "
                         "--master-host HOST)")
    a = p.parse_args(argv)
    engine_config = engine_config_json(a.engine_config)
    return BenchOptions(
        cluster_file=clusterfile.resolve(a.cluster_file), rate=a.rate, concurrency=a.concurrency,
        duration=a.duration, workflows=a.workflows, tenants=a.tenants, skew=a.skew,
        zipf_s=a.zipf_s, steps=a.steps, payload_bytes=a.payload_bytes, step_ms=a.step_ms,
        worker_processes=a.worker_processes, results_dir=a.results_dir, scenario=a.scenario,
        engine_config=engine_config, drain_timeout=a.drain_timeout,
        clean=not a.keep_old, seed=a.seed, locust_users=a.locust_users,
        locust_processes=a.locust_processes, locust_expect_workers=a.locust_expect_workers,
        json_path=a.json, peer=a.peer, retention=a.retention, backlog=a.backlog,
        profile=a.profile)


def engine_config_json(text: str) -> dict[str, Any]:
    """``--engine-config``: a JSON object of EngineConfig fields, checked (as the bench's
    worker processes will build it) so that a bad value fails here, naming the field."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--engine-config is not JSON: {exc}") from exc
    EngineConfig.from_mapping(data, source="--engine-config")
    return dict(data)


def check_output_paths(results_dir: Path, json_path: Path | None) -> None:
    """Where the report and ``--json`` go must be usable before the run, not found
    unusable after it (when the run's figures would be lost)."""
    for d in (results_dir, *Path(results_dir).parents):
        if d.exists():
            if not d.is_dir():
                raise ValueError(f"--results-dir {results_dir}: {d} is not a directory")
            break
    if json_path is not None and (Path(json_path).is_dir()
                                  or not Path(json_path).parent.is_dir()):
        raise ValueError(f"--json {json_path}: not a file in an existing directory")


def main(argv: list[str] | None = None,
         console_factory: Callable[[], Console] = Console) -> int:
    """The bench's command line: every error is one line and exit 2, bad input before
    anything starts, a failure during the run (a node, a worker process) at once."""
    from .cliutil import guarded

    def run() -> int:
        opts = parse_args(argv)
        if opts.peer == "dbos" and importlib.util.find_spec("dbos") is None:
            raise ValueError("--peer dbos needs DBOS Transact: pip install 'shardflow[peer]'")
        if opts.locust_users is not None and importlib.util.find_spec("locust") is None:
            raise ValueError("--locust-users needs locust: pip install locust")
        if not Path(opts.cluster_file).is_file():
            raise ValueError(f"--cluster-file {opts.cluster_file} does not exist (start a "
                             f"cluster with 'shardflow cluster up')")
        check_output_paths(opts.results_dir, opts.json_path)
        result = run_bench(opts, console_factory())
        return 0 if result["audit"]["ok"] else 1

    return guarded("shardflow bench", run)


if __name__ == "__main__":
    sys.exit(main())
