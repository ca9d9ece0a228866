"""The embedded default: a local multi-node PostgreSQL cluster on loopback.

``LocalCluster(dir).up(nodes=N)`` runs initdb and pg_ctl for N primaries on free
loopback ports, tunes them for this workload (``POSTGRES_SETTINGS``), creates the
``shardflow`` database, migrates it, places the shards and writes ``cluster.json``.
Run as root, every server process runs as the ``postgres`` OS user (Postgres refuses
root). Authentication is ``trust`` on loopback only: this is a development and load-test
cluster on one machine, never listening beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

from . import clusterfile, ha
from .clusterfile import ClusterSpec, NodeSpec
from .errors import ClusterError, ClusterFileError
from .migrate import distribute, init_node, migrate
from .routing import ShardMap

DEFAULT_SHARDS = 64
# A local cluster of more Postgres servers than this is a typo, not a test bed.
MAX_NODES = 64
DATABASE = "shardflow"

# Recorded in cluster.json and in the load reports. Chosen for a co-located
# development/load-test machine: durability stays on (fsync, synchronous_commit), the
# hot queue tables are vacuumed early (their partitions also carry storage parameters,
# see migrations/0001), and WAL is sized so checkpoints do not dominate a bench run.
POSTGRES_SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "300",
    "shared_buffers": "256MB",
    "effective_cache_size": "2GB",
    "work_mem": "8MB",
    "maintenance_work_mem": "64MB",
    "fsync": "on",
    "synchronous_commit": "on",
    "wal_level": "replica",
    "wal_compression": "on",
    "max_wal_size": "4GB",
    "min_wal_size": "256MB",
    "checkpoint_timeout": "15min",
    "checkpoint_completion_target": "0.9",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "random_page_cost": "1.1",
    "autovacuum_naptime": "5s",
    "autovacuum_vacuum_cost_limit": "2000",
    "autovacuum_max_workers": "3",
    "shared_preload_libraries": "'pg_stat_statements'",
    "track_io_timing": "on",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
    "log_min_duration_statement": "1000",
}


@dataclass(frozen=True, slots=True)
class PgBinaries:
    bindir: Path
    version: str

    def tool(self, name: str) -> str:
        return str(self.bindir / name)


def find_binaries() -> PgBinaries:
    """Locate PostgreSQL 15+ server binaries.

    ``$SHARDFLOW_PG_BINDIR``, when set, is the only place looked at; otherwise
    ``pg_config --bindir``, then Debian's ``/usr/lib/postgresql/*/bin`` (newest first),
    then ``initdb`` on PATH.
    """
    candidates: list[Path] = []
    env = os.environ.get("SHARDFLOW_PG_BINDIR")
    if env:
        candidates.append(Path(env))
    else:
        pg_config = shutil.which("pg_config")
        if pg_config:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, timeout=10,
                    check=True,
                )
                candidates.append(Path(out.stdout.strip()))
        debian = sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda p: [int(x) for x in Path(p).parent.name.split(".") if x.isdigit()],
            reverse=True,
        )
        candidates.extend(Path(p) for p in debian)
        initdb = shutil.which("initdb")
        if initdb:
            candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if all((bindir / t).is_file() for t in ("initdb", "pg_ctl", "postgres")):
            out = subprocess.run(
                [str(bindir / "postgres"), "--version"], capture_output=True, text=True,
                check=False,
            )
            # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" -> "15.18"
            words = out.stdout.split()
            version = "?"
            if out.returncode == 0 and "(PostgreSQL)" in words:
                version = words[words.index("(PostgreSQL)") + 1]
            major = version.split(".")[0]
            if major.isdigit() and int(major) < 15:
                continue
            return PgBinaries(bindir, version)
    where = (f"$SHARDFLOW_PG_BINDIR={env}" if env else
             "pg_config --bindir, /usr/lib/postgresql/*/bin, PATH")
    raise ClusterError(
        f"PostgreSQL 15+ server binaries not found (looked at {where}); "
        "on Debian: apt-get install postgresql"
    )


def citus_available(bins: PgBinaries) -> bool:
    """True when the citus extension is installed for these server binaries."""
    pg_config = bins.bindir / "pg_config"
    libdir = None
    if pg_config.is_file():
        out = subprocess.run([str(pg_config), "--pkglibdir"], capture_output=True, text=True,
                             check=False)
        libdir = Path(out.stdout.strip()) if out.returncode == 0 else None
    if libdir is None:
        libdir = bins.bindir.parent / "lib"
    return (libdir / "citus.so").is_file()


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_free_port() -> int:
    # Let the kernel choose: parallel test sessions never race on a scan of the same range.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    role: str
    port: int
    pid: int | None
    running: bool
    shards: int
    replication_lag_bytes: int | None = None
    schema_version: int | None = None


def _postgres_ids() -> tuple[int, int] | None:
    """(uid, gid) of the postgres OS user when we run as root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise ClusterError(
            "running as root, but there is no 'postgres' OS user to run the servers as; "
            "on Debian: apt-get install postgresql (it creates the user)"
        ) from None
    return pw.pw_uid, pw.pw_gid


def run_as_postgres(args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command, dropping root to the postgres user (Postgres refuses root)."""
    ids = _postgres_ids()
    if ids is None:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              check=False)
    # the servers get the postgres user's own HOME, not root's (libpq reads ~/.postgresql)
    env = {**os.environ, "HOME": pwd.getpwuid(ids[0]).pw_dir}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          check=False, user=ids[0], group=ids[1], extra_groups=[], env=env)


def _accepts_writes_dsn(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            return bool(row) and not bool(row[0]) if row else False
    except psycopg.Error:
        return False


def _any_primary(members: list[ha.Member]) -> bool:
    return any(m.is_primary() for m in members)


def _accepts_writes(port: int) -> bool:
    return _accepts_writes_dsn(f"postgresql://postgres@127.0.0.1:{port}/postgres")


class LocalCluster:
    """A cluster of local Postgres primaries under one directory."""

    def __init__(
        self, directory: Path | str | None = None, *, log: Callable[[str], None] | None = None
    ) -> None:
        self.dir = Path(directory or clusterfile.DEFAULT_DIR).absolute()
        self.file = self.dir / clusterfile.FILE_NAME
        self._log = log or (lambda _msg: None)
        # where node directories live: the cluster dir, unless the postgres user cannot
        # reach it (then under its home); for an existing cluster, from cluster.json
        self._root = self.dir
        self._node_dirs: dict[str, Path] = {}

    # -- helpers ---------------------------------------------------------------------

    def _run(self, args: Sequence[str], *, what: str, timeout: float = 120) -> str:
        try:
            out = run_as_postgres(args, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{what} timed out after {timeout:.0f}s") from exc
        if out.returncode != 0:
            lines = (out.stderr or out.stdout).strip().splitlines()
            # the first line that says what went wrong beats initdb's "removing data dir"
            errs = [ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()]
            detail = (errs or lines or [f"exit code {out.returncode}"])[0]
            raise ClusterError(f"{what} failed: {detail.strip()}")
        return str(out.stdout)

    def _prepare_dir(self) -> bool:
        """Create or check the cluster directory; return True when it was created now."""
        created = False
        if self.dir.exists():
            if not self.dir.is_dir():
                raise ClusterError(f"data dir {self.dir} exists and is not a directory")
            entries = [p.name for p in self.dir.iterdir()]
            if entries and clusterfile.FILE_NAME not in entries:
                raise ClusterError(
                    f"data dir {self.dir} is not empty and holds no shardflow cluster "
                    f"(found {', '.join(sorted(entries)[:3])}); choose another --dir"
                )
        else:
            try:
                self.dir.mkdir(parents=True)
            except OSError as exc:
                raise ClusterError(
                    f"cannot create data dir {self.dir}: {exc.strerror}"
                ) from exc
            created = True
        if not os.access(self.dir, os.W_OK):
            raise ClusterError(f"data dir {self.dir} is not writable")
        if os.geteuid() == 0:
            # the servers run as postgres: give it the directory, and check it can reach it
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            os.chmod(self.dir, 0o755)
            probe = run_as_postgres(["test", "-w", str(self.dir)], timeout=10)
            if probe.returncode != 0:
                # e.g. a clone under /root (mode 700): the servers cannot reach it. Keep
                # cluster.json here, put the node data under the postgres user's home.
                home = Path(pw.pw_dir) / "shardflow" / hashlib.sha256(
                    str(self.dir).encode()).hexdigest()[:12]
                home.mkdir(parents=True, exist_ok=True)
                for d in (home.parent, home):
                    os.chown(d, pw.pw_uid, pw.pw_gid)
                self._root = home
                self._log(f"{self.dir} is not reachable by the postgres user: node data "
                          f"goes to {home}")
        return created

    def node_dir(self, name: str) -> Path:
        known = self._node_dirs.get(name)
        return known if known is not None else self._root / name

    def _write_conf(self, pgdata: Path, port: int, sockdir: Path, *, citus: bool) -> None:
        conf = dict(POSTGRES_SETTINGS)
        if citus:
            # citus must come first in shared_preload_libraries; node-to-node connections
            # stay on loopback, without TLS
            conf["shared_preload_libraries"] = "'citus,pg_stat_statements'"
            conf["citus.node_conninfo"] = "'sslmode=disable'"
        conf["port"] = str(port)
        conf["unix_socket_directories"] = f"'{sockdir}'"
        text = "# written by shardflow cluster up\n" + "".join(
            f"{k} = {v}\n" for k, v in conf.items()
        )
        (pgdata / "shardflow.conf").write_text(text)
        with (pgdata / "postgresql.conf").open("a") as f:
            f.write("\ninclude 'shardflow.conf'\n")
        (pgdata / "pg_hba.conf").write_text(
            "# loopback only, trust: a local development and load-test cluster\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "local replication all trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )

    def _pgdata(self, name: str) -> Path:
        return self.node_dir(name) / "data"

    def _is_running(self, bins: PgBinaries, name: str) -> int | None:
        pidfile = self._pgdata(name) / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def _start_node(self, bins: PgBinaries, name: str) -> None:
        pgdata = self._pgdata(name)
        logfile = self.node_dir(name) / "postgres.log"
        self._run(
            [bins.tool("pg_ctl"), "-D", str(pgdata), "-l", str(logfile), "-w", "-t", "60",
             "start"],
            what=f"starting node {name} (log: {self.node_dir(name) / 'postgres.log'})",
        )

    def _stop_node(self, bins: PgBinaries, name: str) -> None:
        if self._is_running(bins, name) is None:
            return
        self._run(
            [bins.tool("pg_ctl"), "-D", str(self._pgdata(name)), "-m", "fast", "-w", "-t", "60",
             "stop"],
            what=f"stopping node {name}",
        )

    @staticmethod
    def admin_dsn(port: int, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{port}/{database}"

    # -- public operations -------------------------------------------------------------

    def load(self) -> ClusterSpec:
        spec = clusterfile.load(self.file)
        self._node_dirs = {n.name: Path(n.data_dir).parent for n in spec.nodes if n.data_dir}
        return spec

    def up(
        self,
        nodes: int | None = None,
        *,
        replicas: int = 0,
        shard_count: int = DEFAULT_SHARDS,
        base_port: int | None = None,
        citus: bool = False,
        ha: bool = False,
        synchronous: bool = True,
    ) -> ClusterSpec:
        """Start (or reuse) the cluster. On any failure, stops what this call started.

        With ``citus``: a coordinator and ``nodes`` Citus workers; the workflow tables are
        distributed by tenant_id (Citus does the sharding; the shard map has one entry,
        the coordinator, through which every call goes)."""
        if nodes is not None and nodes < 1:
            raise ClusterError(f"--nodes must be at least 1, got {nodes}")
        if nodes is not None and nodes > MAX_NODES:
            raise ClusterError(f"--nodes must be at most {MAX_NODES}, got {nodes}")
        if replicas < 0 or replicas > 4:
            raise ClusterError(f"--replicas must be between 0 and 4, got {replicas}")
        if (ha or replicas) and citus:
            raise ClusterError("--replicas/--ha with --citus is not supported")
        if shard_count < 1 or shard_count > 4096:
            raise ClusterError(f"--shards must be between 1 and 4096, got {shard_count}")
        if base_port is not None and not 1024 <= base_port <= 65535 - (nodes or 1):
            raise ClusterError(f"--port {base_port} is out of range 1024..65535")
        bins = find_binaries()
        if self.file.exists():
            return self._reuse(bins, nodes)
        if citus and not citus_available(bins):
            raise ClusterError(
                f"--citus: the citus extension is not installed for PostgreSQL "
                f"{bins.version} ({bins.bindir}); build and install Citus 13 first")
        count = nodes or (2 if citus else 3)
        if ha or replicas:
            return self._up_ha(bins, count, replicas or 1, shard_count, base_port,
                               synchronous)
        names = ([f"node{i}" for i in range(count)] if not citus
                 else ["coordinator", *(f"worker{i}" for i in range(count))])
        ports = self._choose_ports(len(names), base_port)
        created = self._prepare_dir()
        started: list[str] = []
        try:
            for name in names:
                self.node_dir(name).mkdir(exist_ok=True)
                if os.geteuid() == 0:
                    pw = pwd.getpwnam("postgres")
                    os.chown(self.node_dir(name), pw.pw_uid, pw.pw_gid)
            for name, port in zip(names, ports, strict=True):
                self._log(f"initdb {name} (port {port})")
                pgdata = self._pgdata(name)
                self._run(
                    [bins.tool("initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
                     "--encoding=UTF8", "--locale=C", "--no-sync"],
                    what=f"initdb of node {name}",
                )
                self._write_conf(pgdata, port, self.node_dir(name), citus=citus)
                if not port_is_free(port):
                    raise ClusterError(f"port {port} for node {name} is already taken")
                self._start_node(bins, name)
                started.append(name)
            if citus:
                shard_map = ShardMap(1, ("coordinator",))
                roles = ["coordinator"] + ["worker"] * count
            else:
                shard_map = ShardMap.balanced(shard_count, names)
                roles = ["primary"] * count
            spec = ClusterSpec(
                nodes=tuple(
                    NodeSpec(name, "127.0.0.1", port, self.admin_dsn(port, DATABASE),
                             role, str(self._pgdata(name)))
                    for name, port, role in zip(names, ports, roles, strict=True)
                ),
                shard_map=shard_map,
                kind="citus" if citus else "local",
                dir=str(self.dir),
                database=DATABASE,
                settings={**POSTGRES_SETTINGS, "postgres_version": bins.version},
            )
            try:
                if citus:
                    self._init_citus(spec)
                else:
                    for node in spec.nodes:
                        self._log(f"migrate {node.name}")
                        self._init_database(node.port, node.name, shard_map)
            except psycopg.Error as exc:
                raise ClusterError(f"initialising the cluster failed: {exc}".strip()) from exc
            clusterfile.save(spec, self.file)
            return spec
        except BaseException:
            for name in started:
                with contextlib.suppress(ClusterError):
                    self._stop_node(bins, name)
            for name in names:
                shutil.rmtree(self.node_dir(name), ignore_errors=True)
            if created:
                shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _up_ha(self, bins: PgBinaries, count: int, replicas: int, shard_count: int,
               base_port: int | None, synchronous: bool) -> ClusterSpec:
        """Each node a Patroni scope of a primary and ``replicas`` standbys; one etcd."""
        patroni, etcd = ha.find_tools()
        names = [f"node{i}" for i in range(count)]
        per = 2 * (1 + replicas)  # a Postgres and a REST port per member
        ports = self._choose_ports(2 + count * per, base_port)
        created = self._prepare_dir()
        members = []
        for i, name in enumerate(names):
            for j in range(1 + replicas):
                k = 2 + i * per + 2 * j
                members.append(ha.Member(name, f"{name}-m{j}", str(self._root / name / f"m{j}"),
                                         ports[k], ports[k + 1]))
        state = ha.HAState(str(self._root / "etcd"), ports[0], ports[1], synchronous,
                           tuple(members))
        params = {k: v.strip("'") for k, v in POSTGRES_SETTINGS.items()
                  if k not in ("listen_addresses",)}
        try:
            ha.make_dirs(Path(state.etcd_dir), *(Path(m.dir) for m in members))
            self._log(f"etcd (port {state.etcd_client_port})")
            ha.start_etcd(etcd, state)
            for m in members:
                cfg = ha.member_config(m, state, str(bins.bindir), params)
                (Path(m.dir) / "patroni.yml").write_text(json.dumps(cfg, indent=2))
            # the first member of every node bootstraps it (initdb) and becomes primary
            firsts = [state.of(n)[0] for n in names]
            for m in firsts:
                self._log(f"patroni {m.name} (postgres port {m.pg_port}, rest {m.rest_port})")
                ha.start_member(patroni, m)
            for m in firsts:
                ha.wait_until(m.is_primary, 90, f"{m.name} to become primary "
                              f"(log: {m.dir}/patroni.stdout)")
                port = m.pg_port
                ha.wait_until(functools.partial(_accepts_writes, port), 60,
                              f"{m.name} to accept writes")
            shard_map = ShardMap.balanced(shard_count, names)
            for name, m in zip(names, firsts, strict=True):
                self._log(f"migrate {name}")
                self._init_database(m.pg_port, name, shard_map)
            standbys = [m for m in members if m not in firsts]
            for m in standbys:
                self._log(f"patroni {m.name} (standby, postgres port {m.pg_port})")
                ha.start_member(patroni, m)
            for m in standbys:
                check = m.is_sync_standby if synchronous else m.is_replica
                ha.wait_until(check, 120, f"{m.name} to stream from its primary"
                              + (" as the synchronous standby" if synchronous else ""))
            nodes: list[NodeSpec] = []
            for name in names:
                ms = state.of(name)
                hosts = ",".join(f"127.0.0.1:{m.pg_port}" for m in ms)
                nodes.append(NodeSpec(
                    name, "127.0.0.1", ms[0].pg_port,
                    f"postgresql://postgres@{hosts}/{DATABASE}?target_session_attrs=read-write",
                    "primary", str(ms[0].data_dir)))
                nodes += [NodeSpec(m.name, "127.0.0.1", m.pg_port,
                                   self.admin_dsn(m.pg_port, DATABASE), "standby",
                                   str(m.data_dir)) for m in ms[1:]]
            spec = ClusterSpec(
                nodes=tuple(nodes), shard_map=shard_map, kind="ha", dir=str(self.dir),
                database=DATABASE,
                settings={**POSTGRES_SETTINGS, "postgres_version": bins.version,
                          "ha": state.to_json()})
            clusterfile.save(spec, self.file)
            return spec
        except BaseException:
            ha.stop_all(state, self._log)
            for name in names:
                shutil.rmtree(self._root / name, ignore_errors=True)
            shutil.rmtree(state.etcd_dir, ignore_errors=True)
            if created:
                shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _choose_ports(self, count: int, base_port: int | None) -> list[int]:
        if base_port is None:
            ports: list[int] = []
            while len(ports) < count:
                p = pick_free_port()
                if p not in ports:
                    ports.append(p)
            return ports
        ports = [base_port + i for i in range(count)]
        for p in ports:
            if not port_is_free(p):
                raise ClusterError(f"port {p} is already taken on 127.0.0.1; choose another --port")
        return ports

    def _init_database(self, port: int, name: str, shard_map: ShardMap) -> None:
        with psycopg.connect(self.admin_dsn(port), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
        with psycopg.connect(self.admin_dsn(port, DATABASE), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            migrate(conn)
            init_node(conn, name, shard_map)

    def _init_citus(self, spec: ClusterSpec) -> None:
        for node in spec.nodes:
            with psycopg.connect(self.admin_dsn(node.port), autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
            with psycopg.connect(node.dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS citus")
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        coord = spec.nodes[0]
        with psycopg.connect(coord.dsn, autocommit=True) as conn:
            conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (coord.port,))
            for w in spec.nodes[1:]:
                conn.execute("SELECT citus_add_node('127.0.0.1', %s)", (w.port,))
            self._log("migrate coordinator, distribute the workflow tables")
            migrate(conn)
            init_node(conn, coord.name, spec.shard_map)
            distribute(conn)

    def _reuse(self, bins: PgBinaries, nodes: int | None) -> ClusterSpec:
        spec = self.load()
        if spec.kind == "ha":
            return self._reuse_ha(spec, nodes)
        if nodes is not None and nodes != len(spec.nodes):
            raise ClusterError(
                f"a {len(spec.nodes)}-node cluster already exists in {self.dir}; "
                "run 'shardflow cluster down --purge' first to make one of another size"
            )
        for node in spec.nodes:
            if self._is_running(bins, node.name) is None:
                if not port_is_free(node.port):
                    raise ClusterError(
                        f"port {node.port} of node {node.name} is taken by another process"
                    )
                self._log(f"start {node.name}")
                self._start_node(bins, node.name)
        for node in spec.nodes:
            if node.role in ("primary", "coordinator"):
                with psycopg.connect(node.dsn, autocommit=True) as conn:
                    migrate(conn)
        return spec

    def _reuse_ha(self, spec: ClusterSpec, nodes: int | None) -> ClusterSpec:
        state = ha.HAState.from_json(spec.settings["ha"])
        scopes = sorted({m.scope for m in state.members})
        if nodes is not None and nodes != len(scopes):
            raise ClusterError(
                f"a {len(scopes)}-node cluster already exists in {self.dir}; "
                "run 'shardflow cluster down --purge' first to make one of another size")
        patroni, etcd = ha.find_tools()
        if state.etcd_pid() is None:
            self._log("start etcd")
            ha.start_etcd(etcd, state)
        for m in state.members:
            if m.patroni_pid() is None:
                self._log(f"start {m.name}")
                ha.start_member(patroni, m)
        for scope in scopes:
            members = state.of(scope)
            ha.wait_until(functools.partial(_any_primary, members), 90,
                          f"node {scope} to have a primary")
        for node in spec.nodes:
            if node.role == "primary":
                ha.wait_until(functools.partial(_accepts_writes_dsn, node.dsn), 60,
                              f"node {node.name} to accept writes")
                with psycopg.connect(node.dsn, autocommit=True) as conn:
                    migrate(conn)
        return spec

    def status(self) -> list[NodeStatus]:
        spec = self.load()
        bins = find_binaries()
        placements = self._citus_placements(spec) if spec.kind == "citus" else {}
        out = []
        for node in spec.nodes:
            pid = self._is_running(bins, node.name)
            role, lag, version = node.role, None, None
            if pid is not None:
                try:
                    with psycopg.connect(node.dsn, connect_timeout=3, autocommit=True) as conn:
                        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                        if row and row[0]:
                            role = "standby"
                        elif node.role == "worker":
                            role = "citus worker"
                        elif node.role in ("primary", "standby"):
                            role = "primary"  # with Patroni, a promoted standby too
                        if node.role != "worker":
                            v = conn.execute("SELECT coalesce(max(version), 0) "
                                             "FROM shardflow.schema_migrations").fetchone()
                            version = int(v[0]) if v else None
                        if role != "standby":
                            r = conn.execute(
                                "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))"
                                " FROM pg_stat_replication"
                            ).fetchone()
                            lag = int(r[0]) if r and r[0] is not None else None
                except psycopg.Error:
                    role = "unreachable"
            shards = (placements.get(node.port, 0) if spec.kind == "citus"
                      else len(spec.shard_map.shards_of(node.name)))
            out.append(
                NodeStatus(
                    name=node.name,
                    role=role,
                    port=node.port,
                    pid=pid,
                    running=pid is not None,
                    shards=shards,
                    replication_lag_bytes=lag,
                    schema_version=version,
                )
            )
        return out

    @staticmethod
    def _citus_placements(spec: ClusterSpec) -> dict[int, int]:
        """Citus shards of shardflow.workflows per worker port, from the coordinator."""
        try:
            with psycopg.connect(spec.nodes[0].dsn, connect_timeout=3, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT nodeport, count(*) FROM citus_shards "
                    "WHERE table_name = 'shardflow.workflows'::regclass GROUP BY nodeport"
                ).fetchall()
        except psycopg.Error:
            return {}
        return {int(str(p)): int(str(n)) for p, n in rows}

    def down(self, *, purge: bool = False) -> list[str]:
        """Stop every node; with ``purge``, delete the directory. Returns the nodes stopped."""
        try:
            spec = self.load()
            names = [n.name for n in spec.nodes]
            if spec.kind == "ha":
                state = ha.HAState.from_json(spec.settings["ha"])
                stopped = ha.stop_all(state, self._log)
                if purge:
                    for d in {Path(m.dir).parent for m in state.members}:
                        shutil.rmtree(d, ignore_errors=True)
                    shutil.rmtree(state.etcd_dir, ignore_errors=True)
                    if self._root != self.dir:
                        shutil.rmtree(self._root, ignore_errors=True)
                    shutil.rmtree(self.dir, ignore_errors=True)
                return stopped
        except ClusterFileError:
            if not self.dir.exists():
                raise
            # a corrupt file must not leave servers running: stop whatever node dirs exist
            names = sorted(p.name for p in self.dir.glob("node*") if (p / "data").is_dir())
        bins = find_binaries()
        stopped = []
        for name in names:
            if self._is_running(bins, name) is not None:
                self._log(f"stop {name}")
                self._stop_node(bins, name)
                stopped.append(name)
        if purge:
            for d in self._node_dirs.values():
                shutil.rmtree(d, ignore_errors=True)
                if d.parent != self.dir:
                    with contextlib.suppress(OSError):
                        d.parent.rmdir()  # the per-cluster dir under postgres's home
            shutil.rmtree(self.dir, ignore_errors=True)
        return stopped
