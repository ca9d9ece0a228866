"""Standbys and automatic failover for the local cluster: Patroni + etcd as local processes.

``shardflow cluster up --replicas N`` (or ``--ha``, which means ``--replicas 1`` unless
told otherwise) runs each shardflow node as a Patroni "scope" of ``1 + N`` members
(a primary and N streaming standbys), all registered in one single-member etcd, every
process on 127.0.0.1 and run as the postgres OS user. Patroni bootstraps the primary
(initdb), clones the standbys (pg_basebackup), manages replication and fails over.

Settings (found by measuring on Debian 12's Patroni 3.0.2 and etcd 3.4; see the README):

* ``ttl 5 / loop_wait 1 / retry_timeout 2``: a lost primary is replaced in ~5 s; 5/1/2
  is the lowest that works (with ``retry_timeout 1`` the leader could not keep its key).
  Patroni >= 3.2 silently raises ttl to >= 20 s and retry_timeout to >= 3 s.
* ``synchronous_mode`` (default): a commit returns only once a standby has it, so no
  acknowledged write is lost in a failover; not strict, so writes go on (unprotected,
  reported) while the only standby is down. ``--async-replicas`` turns it off: faster
  commits, and a failover can lose the last acknowledged ones.
* ``primary_start_timeout 0``: a crashed primary fails over at once (safe with synchronous
  mode) instead of being restarted in place.
* ``failsafe_mode``: the single etcd is not a single point of failure for writes.
* Patroni starts Postgres detached: stopping a member means Patroni *and* its Postgres.
  Patroni 3.0.2 can acknowledge and then lose a commit if it is restarted while its old
  primary Postgres still runs (fixed in 3.1.2), so a member is always restarted with
  its Postgres stopped first.

Clients reach a node through a multi-host DSN with ``target_session_attrs=read-write``,
which finds whichever member is primary now.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ClusterError

NAMESPACE = "/shardflow/"


def find_tools() -> tuple[str, str]:
    """(patroni, etcd) executables, or a clear error saying how to get them."""
    patroni, etcd = shutil.which("patroni"), shutil.which("etcd")
    if not patroni or not etcd:
        missing = [n for n, p in (("patroni", patroni), ("etcd", etcd)) if not p]
        raise ClusterError(
            f"--replicas/--ha need Patroni and etcd ({', '.join(missing)} not found); on "
            "Debian: apt-get install patroni etcd-server")
    return patroni, etcd


def spawn(args: list[str], log: Path, cwd: Path) -> int:
    """Start a daemon as the postgres user in a session of its own (it outlives us)."""
    ids: dict[str, Any] = {}
    home = os.environ.get("HOME", "/")
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        ids = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        home = pw.pw_dir
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"}
    with log.open("ab") as f:
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                             start_new_session=True, **ids)
    return p.pid


def http_status(port: int, path: str, timeout: float = 0.5) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (OSError, ValueError):
        return None, b""


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours is not alive
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


@dataclass(frozen=True, slots=True)
class Member:
    scope: str  # the shardflow node
    name: str  # e.g. node0-m1
    dir: str
    pg_port: int
    rest_port: int

    @property
    def data_dir(self) -> Path:
        return Path(self.dir) / "data"

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def patroni_pid(self) -> int | None:
        try:
            pid = int((Path(self.dir) / "patroni.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def is_primary(self) -> bool:
        return http_status(self.rest_port, "/primary")[0] == 200

    def is_sync_standby(self) -> bool:
        return http_status(self.rest_port, "/sync")[0] == 200

    def is_replica(self) -> bool:
        return http_status(self.rest_port, "/replica")[0] == 200


@dataclass(frozen=True, slots=True)
class HAState:
    """What cluster.json records of the HA processes (``settings["ha"]``)."""

    etcd_dir: str
    etcd_client_port: int
    etcd_peer_port: int
    synchronous: bool
    members: tuple[Member, ...]

    def to_json(self) -> str:
        return json.dumps({
            "etcd_dir": self.etcd_dir, "etcd_client_port": self.etcd_client_port,
            "etcd_peer_port": self.etcd_peer_port, "synchronous": self.synchronous,
            "members": [vars_of(m) for m in self.members]})

    @classmethod
    def from_json(cls, text: str) -> HAState:
        d = json.loads(text)
        return cls(d["etcd_dir"], int(d["etcd_client_port"]), int(d["etcd_peer_port"]),
                   bool(d["synchronous"]), tuple(Member(**m) for m in d["members"]))

    def of(self, scope: str) -> list[Member]:
        return [m for m in self.members if m.scope == scope]

    def etcd_pid(self) -> int | None:
        try:
            pid = int((Path(self.etcd_dir) / "etcd.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None


def vars_of(m: Member) -> dict[str, Any]:
    return {"scope": m.scope, "name": m.name, "dir": m.dir, "pg_port": m.pg_port,
            "rest_port": m.rest_port}


def start_etcd(etcd: str, state: HAState) -> None:
    d = Path(state.etcd_dir)
    peer = f"http://127.0.0.1:{state.etcd_peer_port}"
    client = f"http://127.0.0.1:{state.etcd_client_port}"
    pid = spawn([etcd, "--name", "sf-etcd", "--data-dir", str(d / "data"),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"sf-etcd={peer}", "--initial-cluster-token",
                 "shardflow-ha", "--initial-cluster-state", "new", "--logger", "zap",
                 "--log-outputs", "stderr", "--log-level", "warn",
                 "--auto-compaction-mode", "revision", "--auto-compaction-retention", "1000"],
                d / "etcd.log", d)
    (d / "etcd.pid").write_text(str(pid))
    wait_until(lambda: http_status(state.etcd_client_port, "/health")[0] == 200, 30,
               f"etcd on port {state.etcd_client_port} (log: {d / 'etcd.log'})")


def member_config(m: Member, state: HAState, bindir: str,
                  parameters: dict[str, str]) -> dict[str, Any]:
    """Patroni's configuration of one member (written as JSON, which YAML reads)."""
    return {
        "scope": m.scope, "namespace": NAMESPACE, "name": m.name,
        "log": {"level": "WARNING", "dir": str(Path(m.dir) / "log"), "file_num": 2,
                "file_size": 10485760},
        "restapi": {"listen": f"127.0.0.1:{m.rest_port}",
                    "connect_address": f"127.0.0.1:{m.rest_port}"},
        "etcd3": {"hosts": f"127.0.0.1:{state.etcd_client_port}"},
        "bootstrap": {
            "dcs": {
                "ttl": 5, "loop_wait": 1, "retry_timeout": 2,
                "maximum_lag_on_failover": 1048576, "primary_start_timeout": 0,
                "synchronous_mode": state.synchronous, "synchronous_mode_strict": False,
                "failsafe_mode": True,
                "postgresql": {"use_pg_rewind": True, "use_slots": True,
                               "parameters": {**parameters, "wal_log_hints": "on",
                                              "hot_standby": "on",
                                              "wal_keep_size": "128MB"}},
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, {"auth": "trust"}],
        },
        "postgresql": {
            "listen": f"127.0.0.1:{m.pg_port}", "connect_address": f"127.0.0.1:{m.pg_port}",
            "data_dir": str(m.data_dir), "bin_dir": bindir,
            "pgpass": str(Path(m.dir) / "pgpass"),
            # a spread checkpoint would make a standby's clone wait for most of
            # checkpoint_timeout (15 min here) once the primary has written anything
            "basebackup": [{"checkpoint": "fast"}],
            "authentication": {"superuser": {"username": "postgres"},
                               "replication": {"username": "replicator"},
                               "rewind": {"username": "postgres"}},
            "parameters": {"unix_socket_directories": m.dir},
            "pg_hba": ["local all all trust", "host all all 127.0.0.1/32 trust",
                       "host replication all 127.0.0.1/32 trust"],
        },
        # 3.0.2 logs a watchdog warning every loop unless safety_margin is -1
        "watchdog": {"mode": "off", "safety_margin": -1},
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False,
                 "nosync": False},
    }


def make_dirs(*dirs: Path) -> None:
    """Create directories (and their parents) owned by the postgres user."""
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for x in (d.parent, d):
                os.chown(x, pw.pw_uid, pw.pw_gid)


def start_member(patroni: str, m: Member) -> None:
    """Start a member's Patroni, its Postgres stopped first (see the module docstring)."""
    make_dirs(Path(m.dir) / "log")
    stop_postgres(m)
    pid = spawn([patroni, str(Path(m.dir) / "patroni.yml")], Path(m.dir) / "patroni.stdout",
                Path(m.dir))
    (Path(m.dir) / "patroni.pid").write_text(str(pid))


def stop_postgres(m: Member) -> None:
    pid = m.postmaster_pid()
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def kill_member(m: Member) -> list[int]:
    """SIGKILL a member as a machine loss would: Patroni, the postmaster and every
    child of it. Returns the pids killed."""
    post = m.postmaster_pid()
    pids = [p for p in (m.patroni_pid(), post) if p]
    if post is not None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError):
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == post:
                    pids.append(int(proc.name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def stop_all(state: HAState, log: Callable[[str], None]) -> list[str]:
    """Stop every member (standbys first, so no failover is triggered), then etcd."""
    stopped = []
    primaries = {m.name for m in state.members if m.is_primary()}
    for m in sorted(state.members, key=lambda m: m.name in primaries):
        pid = m.patroni_pid()
        if pid is not None:
            log(f"stop {m.name}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # Patroni stops its Postgres
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            stopped.append(m.name)
        stop_postgres(m)  # an orphaned Postgres too
    pid = state.etcd_pid()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    return stopped
