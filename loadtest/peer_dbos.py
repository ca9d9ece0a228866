"""The DBOS Transact side of ``shardflow bench --peer dbos``: the same workload on DBOS.

``run_dbos_peer(...)`` runs ``bench.flow(steps, payload)`` (``steps - 1`` no-op steps,
then one transactional step that inserts a row into ``public.dbos_bench_effects``) on
DBOS Transact (the optional ``dbos`` package), on the same Postgres server, and measures
it the way ``shardflow.bench`` measures shardflow: latency and throughput from the
database's own timestamps, Postgres CPU from ``/proc``, WAL from ``pg_current_wal_lsn``.

How DBOS is deployed, and why (DBOS 3.x documentation):

* **A queue, a client and separate worker processes.** DBOS documents one way to run
  workflows in processes other than the one that starts them: the "queue worker"
  pattern (https://docs.dbos.dev/python/examples/queue-worker): worker processes
  launch DBOS and register a queue; another process enqueues with ``DBOSClient``
  (https://docs.dbos.dev/python/reference/client). ``DBOS.start_workflow`` runs the
  workflow in the calling process, so it cannot spread the work over several worker
  processes while keeping the load generator's CPU apart, as shardflow's bench does; it
  is also not how DBOS scales out ("add more servers", production checklist,
  https://docs.dbos.dev/production/checklist). DBOS's own queue benchmark
  (github.com/dbos-inc/dbos-postgres-benchmark, ``benchmarks/dbos_queue.py``) uses the
  same enqueue-then-dequeue path.
* **Queue settings** (https://docs.dbos.dev/python/reference/queues,
  https://docs.dbos.dev/python/tutorials/queue-tutorial): ``worker_concurrency``
  ("recommended for most use cases") bounds the workflows one process runs at once, so
  one poll of one worker cannot claim the whole backlog while the other idles; it needs
  a distinct ``executor_id`` per process, which each worker gets. No global concurrency
  or rate limit (they cost extra queries and locking per dequeue). ``polling_interval_sec``
  is how often each worker polls the queue: DBOS queues are polled, never notified, so
  it bounds the wait between an enqueue and its start. DBOS's default is 1 s; its
  configuration reference documents lowering such an interval to cut that wait at the
  cost of more polling (``kafka_queue_polling_interval_sec``). We use ``QUEUE_POLL_SEC``
  (measured choices below).
* **Configuration** (https://docs.dbos.dev/python/reference/configuration): system
  database ``dbos_bench_sys`` on the given server, ``sys_db_pool_size`` and
  ``max_executor_threads`` large enough for ``worker_concurrency`` workflows at once
  (the executor's default is 6 threads on 2 cores), a fixed ``application_version`` so
  every worker dequeues every workflow. No config file (``dbos-config.yaml``) is read
  or needed; ``DBOS*`` environment variables (DBOS Cloud settings) are removed from the
  child processes so the run depends only on this module.
* **The transactional step** is a datasource transaction (``@ds.transaction``,
  https://docs.dbos.dev/python/tutorials/transaction-tutorial, reference
  https://docs.dbos.dev/python/reference/datasources): DBOS 3 removed
  ``@DBOS.transaction`` and the application database setting, and datasources are
  their documented replacement. The insert and DBOS's checkpoint of the step commit
  in one transaction in the application database ``dbos_bench`` (same server), so it
  is exactly once like shardflow's ``@engine.transaction()``. Its isolation level is
  READ COMMITTED, the documented option matching shardflow's transaction step
  (DBOS's default, SERIALIZABLE, would only add predicate locking to a plain insert).
* **Sync workflow functions** (``def``, run on DBOS's executor threads), as in the
  queue-worker example: DBOS's async path runs every database call through
  ``asyncio.to_thread`` anyway, and measured slower here (below).

Tenants: DBOS has none, so each workflow's tenant (uniform or zipf over ``tenants``,
drawn exactly as shardflow's bench draws them, same seed) is the prefix of its workflow
ID, ``<tenant>/<run>-<i>``, and lands in the effect row.

Processes: ``processes`` workers (``python -m loadtest.peer_dbos _worker``) and one load
generator (``python -m loadtest.peer_dbos _load``) are started from the repository root;
the first worker is started alone so that it alone creates DBOS's schemas (DBOS's
benchmark pre-creates them the same way), the others then in parallel. Children exit
when their parent dies; all are SIGTERMed, then SIGKILLed, on the way out. Their
logs go to ``log_dir`` (in the result), which is kept for inspection, as are the two
databases (dropped and re-created at the start of the next run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import random
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, TextIO

import psycopg
from hdrh.histogram import HdrHistogram
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: the child processes run ``-m loadtest.peer_dbos`` from here."""

APP_DB = "dbos_bench"
SYS_DB = "dbos_bench_sys"
APP_NAME = "shardflow-peer-bench"
APP_VERSION = "1"
QUEUE = "bench"
WORKFLOW_NAME = "bench.flow"  # the same name as shardflow's bench workflow

# Tuning, chosen as described in the module docstring. On the 2-core VM (closed loop,
# 32 clients, 2 workers; a noisy shared machine, so only large differences count):
# worker_concurrency 8 / 16 / 32 gave 50-57 / 63-65 / 52-57 workflows/s, polling
# interval 0.01 / 0.05 / 0.2 s gave 42-59 / 52-57 / 39-55 workflows/s; async workflow
# functions (with AsyncSQLAlchemyDatasource) gave 43 vs 48-51 workflows/s for sync
# ones, at 17-18 vs 12-14 ms of worker CPU per workflow.
WORKER_CONCURRENCY = 16
"""Workflows one worker process runs at once (the queue's ``worker_concurrency``)."""
QUEUE_POLL_SEC = 0.05
"""The queue's ``polling_interval_sec`` (DBOS default 1.0)."""
RESULT_POLL_SEC = 0.05
"""``get_result(polling_interval_sec=)`` of the closed-loop clients (DBOS default 1.0);
shardflow's ``handle.result`` polls from 10 ms backing off to 500 ms."""
SYS_DB_POOL_SIZE = 32
"""``sys_db_pool_size`` of a worker (DBOS default 20): a connection for each running
workflow plus the queue, recovery and notification threads."""
EXECUTOR_THREADS = 32
"""``max_executor_threads`` of a worker: above ``WORKER_CONCURRENCY`` so a running
workflow never waits for a thread (Python's default here would be 6; DBOS's own
benchmark uses 512)."""
DATASOURCE_POOL_SIZE = 16
"""SQLAlchemy pool of the datasource (application database) in a worker."""

READY_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0
HIST_MAX_US = 3_600_000_000  # as in shardflow.bench: one hour
UNFINISHED = ("ENQUEUED", "PENDING", "DELAYED")
FAILED = ("ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED")

EFFECTS_DDL = """
CREATE TABLE public.dbos_bench_effects (
    tenant_id   text NOT NULL,
    workflow_id text NOT NULL,
    seq         int NOT NULL
)
"""
# No unique constraint on purpose (as bench_effects): a duplicate must be countable.

DOC_URLS = (
    "https://docs.dbos.dev/python/examples/queue-worker",
    "https://docs.dbos.dev/python/reference/client",
    "https://docs.dbos.dev/python/reference/queues",
    "https://docs.dbos.dev/python/tutorials/queue-tutorial",
    "https://docs.dbos.dev/python/reference/configuration",
    "https://docs.dbos.dev/python/reference/datasources",
    "https://docs.dbos.dev/production/checklist",
)


# -- what the parent hands its children -------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    sys_url: str
    app_url: str
    executor_id: str
    ready_file: str
    parent_pid: int


@dataclass(frozen=True, kw_only=True)
class LoadSpec:
    sys_url: str
    run_id: str
    rate: float | None
    concurrency: int | None
    duration: float
    tenants: int
    skew: str
    zipf_s: float
    steps: int
    payload_bytes: int
    seed: int
    drain_timeout: float
    parent_pid: int


def _sa_url(admin_dsn: str, database: str) -> str:
    """A SQLAlchemy URL (psycopg 3 driver, the one DBOS depends on) for ``database`` on
    the server of ``admin_dsn`` (a URL or a key=value DSN)."""
    from sqlalchemy.engine import URL

    p = {k: str(v) for k, v in conninfo_to_dict(admin_dsn).items() if v is not None}
    return URL.create("postgresql+psycopg", username=p.get("user"),
                      password=p.get("password"), host=p.get("host"),
                      port=int(p["port"]) if "port" in p else None,
                      database=database).render_as_string(hide_password=False)


def _dsn_for(admin_dsn: str, database: str) -> str:
    return make_conninfo(admin_dsn, dbname=database)


def _child_env() -> dict[str, str]:
    # DBOS reads DBOS__* / DBOS_* variables (cloud mode, executor id, app version):
    # the peer run must not depend on whatever the caller's environment holds.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBOS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


# -- the worker process -----------------------------------------------------------------


def _exit_with_parent(parent_pid: int) -> None:
    """In a daemon thread of a child: exit at once when the bench process is gone (it
    died without stopping us), so no worker or load generator lingers."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _tenant_of(workflow_id: str) -> str:
    return workflow_id.split("/", 1)[0]


def worker_main(spec: WorkerSpec) -> None:
    """Launch DBOS with the bench workflow, register the queue, then run until SIGTERM
    (or until the parent is gone)."""
    from dbos import DBOS, DBOSConfig, SQLAlchemyDatasource
    from sqlalchemy import text

    _exit_with_parent(spec.parent_pid)
    ds = SQLAlchemyDatasource.create(
        spec.app_url, engine_kwargs={"pool_size": DATASOURCE_POOL_SIZE,
                                     "max_overflow": DATASOURCE_POOL_SIZE})
    insert = text("INSERT INTO public.dbos_bench_effects (tenant_id, workflow_id, seq) "
                  "VALUES (:tenant, :workflow_id, :seq)")

    @DBOS.step(name="bench.noop")
    def noop(i: int) -> int:
        return i

    @ds.transaction(name="bench.effect", isolation_level="READ COMMITTED")
    def effect(workflow_id: str, seq: int) -> int:
        ds.sql_session().execute(insert, {"tenant": _tenant_of(workflow_id),
                                          "workflow_id": workflow_id, "seq": seq})
        return seq

    @DBOS.workflow(name=WORKFLOW_NAME)
    def flow(steps: int, payload: str) -> int:
        for i in range(steps - 1):
            noop(i)
        effect(str(DBOS.workflow_id), steps - 1)
        return len(payload)

    config: DBOSConfig = {
        "name": APP_NAME,
        "application_version": APP_VERSION,
        "executor_id": spec.executor_id,
        "system_database_url": spec.sys_url,
        "sys_db_pool_size": SYS_DB_POOL_SIZE,
        "max_executor_threads": EXECUTOR_THREADS,
    }
    DBOS(config=config)
    DBOS.launch()
    DBOS.register_queue(QUEUE, worker_concurrency=WORKER_CONCURRENCY,
                        polling_interval_sec=QUEUE_POLL_SEC,
                        on_conflict="always_update")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    Path(spec.ready_file).touch()
    stop.wait()
    DBOS.destroy()


# -- the load generator process ----------------------------------------------------------


class Load:
    """Enqueues workflows through ``DBOSClient`` on the schedule (open loop) or from N
    clients that each wait for their workflow's result (closed loop), and keeps the
    client-side counts (completion itself is read from the database by the parent)."""

    def __init__(self, spec: LoadSpec, client: Any) -> None:
        self.spec = spec
        self.client = client
        # Same draws as shardflow.bench.Load with the same seed: payload first, then
        # one tenant per start, so both sides get the same payload and tenant mix.
        self.rng = random.Random(spec.seed)
        self.payload = self.rng.randbytes(spec.payload_bytes).hex()[:spec.payload_bytes]
        self.tenants = [f"bench-t{i:05d}" for i in range(spec.tenants)]
        weights = ([1.0 / (k + 1) ** spec.zipf_s for k in range(spec.tenants)]
                   if spec.skew == "zipf" else [1.0] * spec.tenants)
        self.cum: list[float] = []
        total = 0.0
        for w in weights:
            total += w
            self.cum.append(total)
        self.started = 0
        self.start_errors = 0
        self.result_errors = 0
        self.last_error = ""
        self.start_lag = HdrHistogram(1, HIST_MAX_US, 3)

    async def start_one(self, i: int, due: float | None) -> Any:
        tenant = self.rng.choices(self.tenants, cum_weights=self.cum)[0]
        options = {"queue_name": QUEUE, "workflow_name": WORKFLOW_NAME,
                   "workflow_id": f"{tenant}/{self.spec.run_id}-{i}"}
        try:
            handle = await self.client.enqueue_async(options, self.spec.steps, self.payload)
        except Exception as exc:  # counted and reported: one error must not stop a load test
            self.start_errors += 1
            self.last_error = f"enqueue: {type(exc).__name__}: {exc}"[:200]
            return None
        self.started += 1
        if due is not None:
            lag = int((asyncio.get_running_loop().time() - due) * 1e6)
            self.start_lag.record_value(min(max(lag, 1), HIST_MAX_US))
        return handle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        if self.spec.rate is not None:
            await self._open_loop(loop, t0, self.spec.rate)
        else:
            await self._closed_loop(loop, t0, self.spec.concurrency or 1)

    async def _open_loop(self, loop: asyncio.AbstractEventLoop, t0: float,
                         rate: float) -> None:
        """Arrival i is due at t0 + i/rate whatever happened to the earlier ones (each
        enqueue is its own task), so a slow system cannot slow the arrivals down."""
        tasks: set[asyncio.Task[Any]] = set()
        i = 0
        while i / rate < self.spec.duration:
            due = t0 + i / rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            task = asyncio.create_task(self.start_one(i, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        while tasks:
            await asyncio.gather(*list(tasks))

    async def _closed_loop(self, loop: asyncio.AbstractEventLoop, t0: float,
                           concurrency: int) -> None:
        counter = iter(range(sys.maxsize))

        async def client() -> None:
            while loop.time() - t0 < self.spec.duration:
                handle = await self.start_one(next(counter), None)
                if handle is None:
                    continue
                try:
                    await asyncio.wait_for(
                        handle.get_result(polling_interval_sec=RESULT_POLL_SEC),
                        self.spec.drain_timeout)
                except Exception as exc:
                    self.result_errors += 1
                    self.last_error = f"result: {type(exc).__name__}: {exc}"[:200]

        await asyncio.gather(*(client() for _ in range(concurrency)))

    def summary(self, cpu_us: int) -> dict[str, Any]:
        lag = self.start_lag
        return {
            "started": self.started, "start_errors": self.start_errors,
            "result_errors": self.result_errors, "last_error": self.last_error,
            "cpu_us": cpu_us,
            "start_lag_ms": None if lag.get_total_count() == 0 else {
                "p50": lag.get_value_at_percentile(50) / 1000,
                "p99": lag.get_value_at_percentile(99) / 1000,
                "max": lag.get_max_value() / 1000},
        }


def _cpu_us() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return int((r.ru_utime + r.ru_stime) * 1e6)


def load_main(spec: LoadSpec, out: TextIO, go: TextIO) -> None:
    """Connect, say ``ready`` on ``out``, wait for ``go``, run the load, then write the
    client-side summary (one JSON line) on ``out``."""
    from dbos import DBOSClient

    _exit_with_parent(spec.parent_pid)
    # enough connections (and threads: DBOSClient's async calls are to_thread) for
    # every closed-loop client to enqueue or poll at once; 16 for the open loop
    pool = max(min(spec.concurrency or 16, 64), 5)
    client = DBOSClient(system_database_url=spec.sys_url, system_database_pool_size=pool,
                        application_name=APP_NAME)
    try:
        load = Load(spec, client)
        out.write("ready\n")
        out.flush()
        go.readline()
        cpu0 = _cpu_us()

        async def main() -> None:
            asyncio.get_running_loop().set_default_executor(
                ThreadPoolExecutor(max_workers=pool + 4))
            await load.run()

        asyncio.run(main())
        out.write(json.dumps(load.summary(_cpu_us() - cpu0)) + "\n")
        out.flush()
    finally:
        client.destroy()


# -- the parent: set-up, run, measure ------------------------------------------------------


def _recreate_databases(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for name in (APP_DB, SYS_DB):
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(_dsn_for(admin_dsn, APP_DB), autocommit=True) as conn:
        conn.execute(EFFECTS_DDL)
        # Only to read statement counts (server-wide view); absent → figure is None.
        with contextlib.suppress(psycopg.Error):
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def _postmaster_pid(conn: psycopg.Connection[Any]) -> int | None:
    """The server's postmaster if it runs on this machine (else None: no CPU figure):
    from <data_directory>/postmaster.pid, else the parent of our own backend."""
    def is_postgres(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip() in ("postgres", "postmaster")
        except OSError:
            return False

    row = conn.execute("SELECT current_setting('data_directory'), pg_backend_pid()").fetchone()
    assert row is not None
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((Path(row[0]) / "postmaster.pid").read_text().splitlines()[0])
        if is_postgres(pid):
            return pid
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path(f"/proc/{row[1]}/status").read_text().splitlines()
        ppid = int(next(s for s in status if s.startswith("PPid:")).split()[1])
        if is_postgres(ppid):
            return ppid
    return None


@dataclass
class Snapshot:
    db_cpu_us: int | None
    wal_lsn: str
    calls: int | None
    worker_cpu_us: int | None


def _snapshot(app: psycopg.Connection[Any], postmaster: int | None,
              workers: list[subprocess.Popen[bytes]]) -> Snapshot:
    """Counters at one instant (``app``: a connection to the application database,
    where the bench created pg_stat_statements)."""
    # imported here, not at the top: shardflow.bench may import this module
    from shardflow.bench import process_cpu_us, server_cpu_us

    wal = app.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert wal is not None
    calls: int | None = None
    with contextlib.suppress(psycopg.Error):
        row = app.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid IN "
            "(SELECT oid FROM pg_database WHERE datname IN (%s, %s))",
            (APP_DB, SYS_DB)).fetchone()
        calls = None if row is None else int(row[0])
    cpus = [process_cpu_us(p.pid) for p in workers]
    return Snapshot(
        db_cpu_us=None if postmaster is None else server_cpu_us(postmaster),
        wal_lsn=str(wal[0]), calls=calls,
        worker_cpu_us=None if any(c is None for c in cpus) else sum(c or 0 for c in cpus))


def _diff(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


def _per_wf(value: int | None, completed: int, digits: int = 1) -> float | None:
    return None if value is None or completed == 0 else round(value / completed, digits)


def _spawn(kind: str, spec: WorkerSpec | LoadSpec, log: Path,
           pipes: bool = False) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "loadtest.peer_dbos", kind,
             json.dumps(dataclasses.asdict(spec))],
            cwd=ROOT, env=_child_env(), stderr=f,
            stdout=subprocess.PIPE if pipes else f,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL)


def _wait_ready(procs: list[subprocess.Popen[bytes]], files: list[Path],
                log_dir: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not all(f.exists() for f in files):
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"DBOS worker {p.pid} exited with code {p.returncode} "
                                   f"during start-up (logs in {log_dir})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"DBOS workers not ready after {READY_TIMEOUT:.0f}s "
                               f"(logs in {log_dir})")
        time.sleep(0.1)


def _read_line(proc: subprocess.Popen[bytes], timeout: float, what: str,
               log_dir: Path) -> str:
    """One line from the load generator's stdout, or RuntimeError after ``timeout``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"DBOS load generator: no {what} after {timeout:.0f}s "
                               f"(log in {log_dir})")
    line = proc.stdout.readline().decode()
    if not line:
        raise RuntimeError(f"DBOS load generator exited (code {proc.wait()}) before its "
                           f"{what} (log in {log_dir})")
    return line


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for pipe in (p.stdin, p.stdout):
            if pipe is not None:
                pipe.close()


STATUS_SQL = f"""
SELECT count(*) FILTER (WHERE status = 'SUCCESS'),
       count(*) FILTER (WHERE status IN {UNFINISHED!r}),
       count(*) FILTER (WHERE status IN {FAILED!r})
  FROM dbos.workflow_status WHERE name = '{WORKFLOW_NAME}'
"""


def _scalar(conn: psycopg.Connection[Any], query: str, *params: Any) -> Any:
    row = conn.execute(query, params or None).fetchone()
    assert row is not None
    return row[0]


def _status(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    row = conn.execute(STATUS_SQL).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        _stop(procs)


def _config_text(processes: int) -> str:
    return (
        f"DBOS queue-worker deployment: {processes} worker processes (DBOS.launch, "
        f"executor_id per process, sys_db_pool_size {SYS_DB_POOL_SIZE}, "
        f"max_executor_threads {EXECUTOR_THREADS}, sync workflow functions) dequeue "
        f"queue '{QUEUE}' (worker_concurrency {WORKER_CONCURRENCY}, polling_interval_sec "
        f"{QUEUE_POLL_SEC}); one load-generator process enqueues with "
        f"DBOSClient.enqueue_async (closed loop: get_result polling {RESULT_POLL_SEC}s). "
        f"System database {SYS_DB}, application database {APP_DB} (same server); the "
        f"transactional step is a SQLAlchemyDatasource transaction, READ COMMITTED, pool "
        f"{DATASOURCE_POOL_SIZE}. Docs: " + ", ".join(DOC_URLS))


def run_dbos_peer(*, admin_dsn: str, duration: float, rate: float | None,
                  concurrency: int | None, tenants: int, skew: str, zipf_s: float,
                  steps: int, payload_bytes: int, processes: int, seed: int = 1,
                  drain_timeout: float = 120.0,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the bench workload on DBOS against the server of ``admin_dsn`` (a superuser
    DSN) and return its figures (see the module docstring). Give ``rate`` (open loop) or
    ``concurrency`` (closed loop). Raises RuntimeError when DBOS is not installed or a
    child process fails."""
    if (rate is None) == (concurrency is None):
        raise ValueError("give rate (open loop) or concurrency (closed loop), exactly one")
    if steps < 1 or processes < 1 or tenants < 1 or duration <= 0:
        raise ValueError("steps, processes and tenants must be >= 1, duration > 0")
    if skew not in ("uniform", "zipf"):
        raise ValueError(f"skew must be uniform or zipf, got {skew!r}")
    try:
        dbos_version = package_version("dbos")
    except PackageNotFoundError as exc:
        raise RuntimeError("the DBOS peer needs the dbos package: pip install dbos") from exc
    say = progress or (lambda _msg: None)

    say(f"dbos {dbos_version}: re-creating databases {APP_DB}, {SYS_DB}")
    _recreate_databases(admin_dsn)
    log_dir = Path(tempfile.mkdtemp(prefix="dbos-peer-"))
    run_id = f"r{int(time.time())}"
    sys_url, app_url = _sa_url(admin_dsn, SYS_DB), _sa_url(admin_dsn, APP_DB)
    load_spec = LoadSpec(sys_url=sys_url, run_id=run_id, rate=rate, concurrency=concurrency,
                         duration=duration, tenants=tenants, skew=skew, zipf_s=zipf_s,
                         steps=steps, payload_bytes=payload_bytes, seed=seed,
                         drain_timeout=drain_timeout, parent_pid=os.getpid())

    with psycopg.connect(_dsn_for(admin_dsn, SYS_DB), autocommit=True) as sysdb, \
            psycopg.connect(_dsn_for(admin_dsn, APP_DB), autocommit=True) as app, \
            _processes() as procs:
        postmaster = _postmaster_pid(app)
        say(f"starting {processes} DBOS worker processes (logs in {log_dir})")
        ready = [log_dir / f"worker-{i}.ready" for i in range(processes)]
        for i in range(processes):
            spec = WorkerSpec(sys_url=sys_url, app_url=app_url, executor_id=f"bench-w{i}",
                              ready_file=str(ready[i]), parent_pid=os.getpid())
            procs.append(_spawn("_worker", spec, log_dir / f"worker-{i}.log"))
            if i == 0:  # alone, so only it creates DBOS's schemas
                _wait_ready(procs, ready[:1], log_dir)
        _wait_ready(procs, ready, log_dir)
        workers = list(procs)

        loader = _spawn("_load", load_spec, log_dir / "load.log", pipes=True)
        procs.append(loader)
        _read_line(loader, READY_TIMEOUT, "ready", log_dir)
        # the measured window opens here, with every process connected and idle
        before = _snapshot(app, postmaster, workers)
        assert loader.stdin is not None
        loader.stdin.write(b"go\n")
        loader.stdin.close()
        mode = f"{rate:g}/s open loop" if rate is not None else f"concurrency {concurrency}"
        say(f"load running: {mode}, {duration:g}s")
        t0 = time.monotonic()
        while loader.poll() is None:
            time.sleep(1.0)
            for p in workers:
                if p.poll() is not None:
                    raise RuntimeError(f"DBOS worker {p.pid} died (code {p.returncode}); "
                                       f"logs in {log_dir}")
            if time.monotonic() - t0 > duration + drain_timeout + READY_TIMEOUT:
                raise RuntimeError("DBOS load generator did not finish")
            done, backlog, failed = _status(sysdb)
            say(f"{time.monotonic() - t0:.0f}s: {done} completed, {backlog} queued or "
                f"running, {failed} failed")
        client = json.loads(_read_line(loader, 5.0, "summary", log_dir))

        say("draining")
        deadline = time.monotonic() + drain_timeout
        while True:
            done, backlog, failed = _status(sysdb)
            if backlog == 0 and done + failed >= client["started"]:
                break
            if time.monotonic() > deadline:
                say(f"drain timeout: {backlog} workflows still queued or running")
                break
            time.sleep(0.5)
        # ... and closes here, once the backlog is drained
        after = _snapshot(app, postmaster, workers)
        wal = _scalar(app, "SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)",
                      after.wal_lsn, before.wal_lsn)
        rows = sysdb.execute(
            "SELECT status, created_at, updated_at FROM dbos.workflow_status "
            "WHERE name = %s", (WORKFLOW_NAME,)).fetchall()
        effect_rows = _scalar(app, "SELECT count(*) FROM public.dbos_bench_effects")
        effect_keys = _scalar(app, "SELECT count(DISTINCT (tenant_id, workflow_id, seq)) "
                                   "FROM public.dbos_bench_effects")
        pg_version = _scalar(app, "SHOW server_version")
    say("done")
    return _figures(rows=rows, effects=(int(effect_rows), int(effect_keys)), client=client,
                    before=before, after=after, wal=int(wal),
                    extra={"version": dbos_version, "postgres": pg_version,
                           "processes": processes, "log_dir": str(log_dir),
                           "mode": "open" if rate is not None else "closed",
                           "rate": rate, "concurrency": concurrency})


def _figures(*, rows: list[tuple[Any, ...]], effects: tuple[int, int],
             client: dict[str, Any], before: Snapshot, after: Snapshot, wal: int,
             extra: dict[str, Any]) -> dict[str, Any]:
    status = Counter(str(r[0]) for r in rows)
    done = [(int(r[1]), int(r[2])) for r in rows if r[0] == "SUCCESS"]
    completed = len(done)
    hist = HdrHistogram(1, HIST_MAX_US, 3)
    for created, updated in done:
        # both are ms since the epoch from the database clock (now() of the enqueue's
        # and of the completion's transaction); the histogram records µs
        hist.record_value(min(max((updated - created) * 1000, 1), HIST_MAX_US))
    t_first = min((int(r[1]) for r in rows), default=0)
    t_last = max((u for _, u in done), default=t_first)
    span_s = max(t_last - t_first, 1) / 1000
    per_sec = Counter((u - t_first) // 1000 for _, u in done)
    timeline = [(s, per_sec[s]) for s in range(max(per_sec, default=-1) + 1)]
    buf = io.BytesIO()
    hist.output_percentile_distribution(buf, 1000)  # µs recorded, written in ms

    def pct(p: float) -> float:
        return round(hist.get_value_at_percentile(p) / 1000, 3) if completed else 0.0

    return {
        "name": "dbos",
        "version": extra["version"],
        "workflows_per_sec": round(completed / span_s, 1) if completed else 0.0,
        "completed": completed,
        "failed": sum(status[s] for s in FAILED),
        "started": client["started"],
        "unfinished": sum(status[s] for s in UNFINISHED),
        "rows": len(rows),
        "duplicates": effects[0] - effects[1],
        "effect_rows": effects[0],
        "start_errors": client["start_errors"],
        "result_errors": client["result_errors"],
        "last_error": client["last_error"],
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "p999": pct(99.9),
                       "max": round(hist.get_max_value() / 1000, 3) if completed else 0.0},
        "start_lag_ms": client["start_lag_ms"],
        "duration_s": round(span_s, 3),
        "timeline": timeline,
        "hgrm": buf.getvalue().decode(),
        "db_cpu_us_per_workflow": _per_wf(_diff(before.db_cpu_us, after.db_cpu_us),
                                          completed),
        "wal_bytes_per_workflow": _per_wf(wal, completed),
        "statements_per_workflow": _per_wf(_diff(before.calls, after.calls), completed, 2),
        "worker_cpu_us_per_workflow": _per_wf(
            _diff(before.worker_cpu_us, after.worker_cpu_us), completed),
        "client_cpu_us_per_workflow": _per_wf(client["cpu_us"], completed),
        "config": _config_text(extra["processes"]),
        "settings": {
            "worker_concurrency": WORKER_CONCURRENCY, "queue_polling_interval_sec":
            QUEUE_POLL_SEC, "result_polling_interval_sec": RESULT_POLL_SEC,
            "sys_db_pool_size": SYS_DB_POOL_SIZE, "max_executor_threads": EXECUTOR_THREADS,
            "datasource_pool_size": DATASOURCE_POOL_SIZE, "isolation": "READ COMMITTED",
            "processes": extra["processes"], "mode": extra["mode"], "rate": extra["rate"],
            "concurrency": extra["concurrency"], "postgres": extra["postgres"]},
        "log_dir": extra["log_dir"],
    }


# -- child entry points (not a user-facing CLI) -----------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.peer_dbos",
                                description="child processes of run_dbos_peer()")
    p.add_argument("kind", choices=("_worker", "_load"))
    p.add_argument("spec", help="the spec as JSON")
    a = p.parse_args(argv)
    spec = json.loads(a.spec)
    if a.kind == "_worker":
        worker_main(WorkerSpec(**spec))
    else:
        # stdout carries the protocol (ready / summary): keep every print off it
        out, sys.stdout = sys.stdout, sys.stderr
        load_main(LoadSpec(**spec), out, sys.stdin)


if __name__ == "__main__":
    main()
