"""Bad input at the boundary, by class (issue 14): every command, the bench's and the
drills' included, answers one line on stderr and exit code 2, names what is wrong, and
writes nothing first. Each command runs as a subprocess, as a user runs it."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardflow import EngineConfig, clusterfile
from shardflow.clusterfile import ClusterSpec, NodeSpec
from shardflow.errors import ConfigError
from shardflow.routing import ShardMap

from .conftest import PerTestDB, make_tempdir
from .flows import FAST

ROOT = Path(__file__).resolve().parent.parent
FAST_JSON = json.dumps({"lease_timeout": FAST.lease_timeout,
                        "heartbeat_interval": FAST.heartbeat_interval,
                        "recovery_interval": FAST.recovery_interval,
                        "poll_interval": FAST.poll_interval,
                        "sweep_interval": FAST.sweep_interval})


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``shardflow ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "shardflow.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd or ROOT)


def one_line_error(out: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2, exactly one line on stderr (no traceback), naming every fragment."""
    lines = out.stderr.splitlines()
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert ": error: " in lines[0], lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dead(tmp_path: Path) -> Path:
    """A cluster file whose two nodes are on a port with nothing listening."""
    port = free_port()
    dsn = f"postgresql://postgres@127.0.0.1:{port}/shardflow"
    spec = ClusterSpec(nodes=(NodeSpec("node0", "127.0.0.1", port, dsn),
                              NodeSpec("node1", "127.0.0.1", port, dsn)),
                       shard_map=ShardMap.balanced(8, ["node0", "node1"]))
    clusterfile.save(spec, tmp_path / "dead.json")
    return tmp_path / "dead.json"


@pytest.fixture
def live(db: PerTestDB) -> Iterator[Path]:
    """A cluster file of this test's databases on the session cluster."""
    d = make_tempdir("shardflow-badinput-")
    clusterfile.save(db.cluster_spec(), d / "cluster.json")
    yield d / "cluster.json"
    subprocess.run(["rm", "-rf", str(d)], check=False)


def children(pid: int) -> list[int]:
    """Child pids of ``pid`` (Linux)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# -- 1 and 2: driver errors, overflow, crashed children: one line, not a traceback -------


@pytest.mark.parametrize("argv, prefix", [
    (["shard", "list"], "shardflow"),
    (["shard", "move", "1", "--to", "node1"], "shardflow"),
    (["migrate"], "shardflow"),
    (["status"], "shardflow"),  # libpq's message spans two lines: collapsed
    (["bench", "--duration", "1"], "shardflow bench"),
    (["drill", "worker-crash"], "shardflow drill"),
])
def test_an_unreachable_node_is_named_in_one_line(dead: Path, argv: list[str],
                                                  prefix: str) -> None:
    """A command that reaches the nodes names the one it cannot reach, in one line."""
    flag = "--cluster" if prefix == "shardflow" else "--cluster-file"  # as ever spelled
    line = one_line_error(run(*argv, flag, str(dead)), "node node0 is unreachable",
                          "Connection refused")
    assert line.startswith(f"{prefix}: error: ")


def test_bench_leaves_no_report_when_a_node_is_unreachable(dead: Path, tmp_path: Path) -> None:
    """The bench reaches every node before it creates its report directory."""
    one_line_error(run("bench", "--cluster-file", str(dead), "--results-dir",
                       str(tmp_path / "results")), "node node0 is unreachable")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--since", "999999999d"], "--since '999999999d' is too far back"),
    (["--until", "9" * 30 + "m"], "is too far back"),
    (["--since", "0001-01-01T00:00:00+14:00"], "is out of range"),
])
def test_a_time_out_of_range_is_refused(dead: Path, argv: list[str], fragment: str) -> None:
    """`workflows list --since/--until` past datetime's range: one line, not OverflowError."""
    one_line_error(run("workflows", "list", *argv, "--cluster", str(dead)), fragment)


@pytest.mark.parametrize("argv, prog, fragment", [
    (["bench", "--rate", "x"], "shardflow bench", "argument --rate"),
    (["bench", "--no-such-flag"], "shardflow bench", "--no-such-flag"),
    (["drill", "bogus"], "shardflow drill", "argument kind"),
    (["drill"], "shardflow drill", "kind"),
    (["drill", "worker-crash", "--kill", "x"], "shardflow drill", "argument --kill"),
])
def test_bench_and_drill_parse_errors_are_one_line(argv: list[str], prog: str,
                                                   fragment: str) -> None:
    """The bench's and the drills' own parsers print one line, not the whole usage."""
    assert one_line_error(run(*argv), fragment).startswith(f"{prog}: error: ")


def test_drill_chaos_missing_is_one_line() -> None:
    """`shardflow drill chaos` dispatches to shardflow.chaos, and says so in one line
    when that module is not there."""
    code = ("import sys; sys.modules['shardflow.chaos'] = None; "
            "from shardflow.drill import main; sys.exit(main(['chaos', '--help']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    one_line_error(out, "chaos drill is not available")
    assert "chaos" in run("drill", "--help").stdout


def test_debug_env_shows_the_traceback(dead: Path) -> None:
    """SHARDFLOW_DEBUG=1 re-raises: the traceback is there for a bug report."""
    out = run("shard", "list", "--cluster", str(dead),
              env=dict(os.environ, SHARDFLOW_DEBUG="1"))
    assert out.returncode != 0 and "Traceback" in out.stderr


def _target(tmp_path: Path, dsn: str) -> Path:
    """A module ``badtarget`` with an engine on ``dsn`` that gives up connecting fast."""
    (tmp_path / "badtarget.py").write_text(
        "from shardflow import Engine, EngineConfig\n"
        f"engine = Engine(dsns=[{dsn!r}], config=EngineConfig(connect_timeout=1))\n")
    return tmp_path


def test_worker_metrics_ports_are_checked_before_forking(tmp_path: Path, dead: Path) -> None:
    """Process i serves metrics on PORT+i: PORT+N-1 past 65535, or a port in use, is
    refused before any process starts."""
    cwd = _target(tmp_path, clusterfile.load(dead).nodes[0].dsn)
    one_line_error(run("worker", "badtarget:engine", "--processes", "2", "--metrics-port",
                       "65535", cwd=cwd, timeout=20), "--metrics-port 65535", "65536")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # port - 1 is most likely free: then port, process 1's, is the one named
        one_line_error(run("worker", "badtarget:engine", "--processes", "2",
                           "--metrics-port", str(port - 1), cwd=cwd, timeout=20),
                       "--metrics-port: port", "is not free")


def test_worker_processes_failing_alike_make_one_line(tmp_path: Path, dead: Path) -> None:
    """N worker processes that all fail (an unreachable node) report one line, naming
    the process and the node."""
    cwd = _target(tmp_path, clusterfile.load(dead).nodes[0].dsn)
    one_line_error(run("worker", "badtarget:engine", "--processes", "2", cwd=cwd,
                       timeout=30), "worker process", "cannot connect to node", "stopped the other 1")


def test_worker_processes_fail_as_a_whole(db: PerTestDB) -> None:
    """When one worker process dies (SIGKILL), the supervisor stops the others and fails
    in one line instead of running on with fewer processes."""
    parent = subprocess.Popen([sys.executable, "-m", "shardflow.cli", "worker",
                               "tests.flows:engine", "--processes", "2"], env=db.env(),
                              cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        kids = wait_for(lambda: len(children(parent.pid)) == 2 and children(parent.pid), 30,
                        "two worker processes")
        time.sleep(1.0)  # past their imports
        os.kill(kids[0], signal.SIGKILL)
        assert parent.wait(timeout=20) == 2
        err = parent.stderr.read() if parent.stderr else ""
        out = subprocess.CompletedProcess(parent.args, 2, "", err)
        one_line_error(out, "killed by signal 9", "stopped the other 1")
        assert not any(Path(f"/proc/{k}").exists() for k in kids)  # stopped and reaped
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_bench_fails_at_once_when_a_worker_dies(live: Path, tmp_path: Path) -> None:
    """A bench worker process that dies during the run fails the bench at once, naming
    the process, instead of measuring on with fewer workers or hanging."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "shardflow.cli", "bench", "--cluster-file", str(live),
         "--duration", "30", "--rate", "20", "--tenants", "10", "--worker-processes", "2",
         "--results-dir", str(tmp_path / "results"), "--engine-config", FAST_JSON],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def workers() -> list[int]:
            return [c for c in children(bench.pid)
                    if b"shardflow.worker" in Path(f"/proc/{c}/cmdline").read_bytes()]

        victim, other = wait_for(lambda: len(workers()) == 2 and workers(), 60,
                                 "bench workers")
        time.sleep(3.0)  # into the run
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        assert bench.wait(timeout=40) == 2
        assert time.monotonic() - t_kill < 30  # not at the end of the 30 s run
        out = subprocess.CompletedProcess(bench.args, 2, "", bench.stderr.read()
                                          if bench.stderr else "")
        line = one_line_error(out, "worker process", f"pid {victim}", "killed by signal 9")
        assert line.startswith("shardflow bench: error: ")
        assert not Path(f"/proc/{other}").exists()  # the other one stopped and reaped
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()


# -- 3 and 4: EngineConfig fields by type and range; numbers finite and bounded ---------


@pytest.mark.parametrize("field, value, expected", [
    ("lease_timeout", "2", "a number (int or float)"),
    ("lease_timeout", math.nan, "> 0 and <= 315360000"),
    ("lease_timeout", math.inf, "> 0 and <= 315360000"),
    ("reconnect_timeout", 1e300, "> 0 and <= 315360000"),
    ("poll_interval", True, "a number (int or float)"),
    ("claim_batch", 2**40, ">= 1 and <= 2147483647"),
    ("claim_batch", 1.5, "an integer"),
    ("max_attempts", "3", "an integer"),
    ("max_attempts", False, "an integer"),
    ("pool_size", 10**6, "<= 1000"),
    ("tenant_concurrency", 0, ">= 1"),
    ("notify", 1, "true or false"),
    ("tracing", "yes", "true or false"),
])
def test_engine_config_checks_each_field(field: str, value: object, expected: str) -> None:
    """EngineConfig refuses a value of the wrong type or range, naming the field."""
    with pytest.raises(ConfigError, match=f"EngineConfig.{field} must be") as info:
        EngineConfig(**{field: value})  # type: ignore[arg-type]
    assert expected in str(info.value)


def test_engine_config_accepts_ints_for_seconds_and_none_where_allowed() -> None:
    """Seconds fields take ints; tenant_concurrency takes None; unknown fields are named."""
    cfg = EngineConfig(lease_timeout=5, connect_timeout=1, tenant_concurrency=None)
    assert cfg.lease_timeout == 5
    with pytest.raises(ConfigError, match="'bogus' is not an EngineConfig field"):
        EngineConfig.from_mapping({"bogus": 1}, source="--engine-config")


@pytest.mark.parametrize("config, fragment", [
    ('{"lease_timeout": "2"}', "EngineConfig.lease_timeout must be a number"),
    ('{"lease_timeout": 1e300}', "EngineConfig.lease_timeout must be > 0"),
    ('{"claim_batch": 1099511627776}', "EngineConfig.claim_batch must be >= 1"),
    ('{"pool_size": 1000000}', "EngineConfig.pool_size"),
    ('{"notify": 0}', "EngineConfig.notify must be true or false"),
    ('[1]', "--engine-config must be a JSON object"),
])
def test_bench_engine_config_names_the_field(dead: Path, tmp_path: Path, config: str,
                                             fragment: str) -> None:
    """A bad --engine-config value is refused up front, naming the field and the type
    expected, before a worker process could die of it."""
    one_line_error(run("bench", "--cluster-file", str(dead), "--engine-config", config,
                       "--results-dir", str(tmp_path / "r")), fragment)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["bench", "--rate", "nan"], "--rate must be > 0"),
    (["bench", "--rate", "inf"], "--rate must be > 0"),
    (["bench", "--rate", "1e12"], "--rate must be > 0 and <= 1000000"),
    (["bench", "--duration", "inf"], "--duration must be > 0"),
    (["bench", "--drain-timeout", "nan"], "--drain-timeout"),
    (["bench", "--retention", "inf"], "--retention must be >= 5"),
    (["bench", "--tenants", str(2**40)], "--tenants must be >= 1"),
    (["bench", "--step-ms", "nan"], "--step-ms"),
    (["bench", "--zipf-s", "inf"], "--zipf-s"),
    (["drill", "worker-crash", "--fault-at", "nan"], "--fault-at must be > 0"),
    (["drill", "network", "--fault-for", "inf"], "--fault-for must be > 0"),
    (["drill", "worker-crash", "--duration", "nan"], "--duration must be > 0"),
    (["drill", "worker-crash", "--rate", "inf"], "--rate must be > 0"),
    (["drill", "worker-crash", "--engine-config", '{"lease_timeout": "1"}'],
     "EngineConfig.lease_timeout"),
    (["retention", "set", "inf"], "retention seconds must be >= 0"),
    (["retention", "set", "1e300"], "retention seconds must be >= 0"),
    (["retention", "set", "nan"], "retention seconds must be >= 0"),
    (["retention", "set", "-inf"], "retention seconds must be >= 0"),  # not "required"
    (["bench", "--rate", "-1e3"], "--rate must be > 0"),
    (["shard", "move", "1", "--to", "node1", "--lock-timeout", "nan"], "--lock-timeout"),
    (["shard", "move", "1", "--to", "node1", "--lock-timeout", "inf"], "--lock-timeout"),
    (["shard", "move", str(2**40), "--to", "node1"], "argument shard"),
    (["tenants", "top", "--limit", str(2**40)], "--limit"),
    (["workflows", "list", "--limit", str(2**40)], "--limit"),
    (["workflows", "fork", "t", "w", "--from-step", str(2**40)], "--from-step"),
    (["demo", "--workflows", str(2**40)], "--workflows"),
    (["cluster", "up", "--nodes", str(2**40)], "--nodes must be at most"),
])
def test_numbers_are_finite_and_bounded(dead: Path, tmp_path: Path, argv: list[str],
                                        fragment: str) -> None:
    """NaN, +-inf and huge numbers are refused at the command line, naming the argument,
    before any node is reached (the cluster file here has none that answers)."""
    if argv[0] in ("bench", "drill"):
        argv = [*argv, "--results-dir", str(tmp_path / "r")]
    if argv[0] == "cluster":
        argv = [*argv, "--dir", str(tmp_path / "c")]
    elif argv[0] in ("bench", "drill"):
        argv = [*argv, "--cluster-file", str(dead)]
    elif argv[0] != "demo":
        argv = [*argv, "--cluster", str(dead)]
    one_line_error(run(*argv), fragment)
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


# -- 5: written before refused -----------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["--rate", "0"], "--rate must be > 0"),
    (["--tenants", "0"], "--tenants"),
    (["--engine-config", '{"claim_batch": 0}'], "EngineConfig.claim_batch"),
])
def test_drill_network_writes_nothing_before_checking(dead: Path, tmp_path: Path,
                                                      argv: list[str], fragment: str) -> None:
    """The network drill checks every option before it starts its proxy and writes its
    copy of the cluster file (with the DSNs)."""
    results = tmp_path / "results"
    one_line_error(run("drill", "network", "--cluster-file", str(dead), "--results-dir",
                       str(results), *argv), fragment)
    assert not results.exists() or not list(results.glob(".drill-network-*"))


def test_bench_checks_where_it_writes_before_the_run(dead: Path, tmp_path: Path) -> None:
    """A report directory under a file, a --json in no directory, a --scenario that
    climbs out of --results-dir: refused before any node is reached."""
    (tmp_path / "file").write_text("")
    for argv, fragment in (
            (["--results-dir", str(tmp_path / "file" / "r")], "is not a directory"),
            (["--json", str(tmp_path / "no" / "x.json")], "--json"),
            (["--scenario", "../../escaped", "--results-dir", str(tmp_path / "r")],
             "--scenario must be")):
        one_line_error(run("bench", "--cluster-file", str(dead), *argv), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dead.json", "file"]


# -- 6: one cluster-file rule ------------------------------------------------------------


def test_resolve_flag_then_env_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """--cluster-file beats $SHARDFLOW_CLUSTER, which beats .shardflow/cluster.json."""
    monkeypatch.delenv("SHARDFLOW_CLUSTER", raising=False)
    assert clusterfile.resolve(None) == Path(".shardflow/cluster.json")
    monkeypatch.setenv("SHARDFLOW_CLUSTER", "/env/cluster.json")
    assert clusterfile.resolve(None) == Path("/env/cluster.json")
    assert clusterfile.resolve(Path("/flag.json")) == Path("/flag.json")
    assert clusterfile.default_cluster_file() == Path("/env/cluster.json")


@pytest.mark.parametrize("argv, prog", [
    (["bench", "--duration", "1"], "shardflow bench"),
    (["drill", "worker-crash"], "shardflow drill"),
    (["shard", "list"], "shardflow"),
    (["migrate"], "shardflow"),
])
def test_every_command_honours_shardflow_cluster(dead: Path, tmp_path: Path,
                                                 argv: list[str], prog: str) -> None:
    """Without --cluster-file, the bench and the drills read $SHARDFLOW_CLUSTER too (run
    from a directory without .shardflow/, so only the variable can name the nodes)."""
    env = dict(os.environ, SHARDFLOW_CLUSTER=str(dead))
    line = one_line_error(run(*argv, env=env, cwd=tmp_path), "node node0 is unreachable")
    assert line.startswith(f"{prog}: error: ")


@pytest.mark.parametrize("argv", [["bench", "--help"], ["drill", "--help"],
                                  ["workflows", "list", "--help"], ["--help"]])
def test_help_states_the_rule(argv: list[str]) -> None:
    """Every --help names $SHARDFLOW_CLUSTER as the default of --cluster-file."""
    out = run(*argv)
    assert out.returncode == 0 and "SHARDFLOW_CLUSTER" in out.stdout
    assert "--cluster-file" in out.stdout


def test_cluster_commands_refuse_a_variable_they_cannot_manage(tmp_path: Path) -> None:
    """`cluster status` manages DIR/cluster.json: $SHARDFLOW_CLUSTER naming another file
    name is refused with a hint, not silently read elsewhere."""
    env = dict(os.environ, SHARDFLOW_CLUSTER=str(tmp_path / "mine.json"))
    one_line_error(run("cluster", "status", env=env, cwd=tmp_path), "give --dir")
