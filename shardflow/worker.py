"""``shardflow worker module:engine --processes N``: worker processes for your engine.

Each process imports the target, opens the engine with workers and runs until SIGTERM
or SIGINT, then stops gracefully (its workflows are handed back at once). The parent
supervises: it forwards signals and exits when the children have. The processes run as
one: if one exits on its own (an error, a kill), the parent stops the others and fails
with one line saying which and why, instead of running on at a fraction of its capacity
unnoticed. The target and the metrics ports are checked before anything is forked.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import loop
from .errors import InvalidArgument, ShardflowError

if TYPE_CHECKING:
    from .engine import Engine


def load_engine(target: str) -> Engine:
    from .engine import Engine

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgument(f"worker target must look like module:attribute, got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(f"cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:  # the module itself failed: say so, in one line
        raise InvalidArgument(f"cannot import module {module_name!r}: importing it raised "
                              f"{type(exc).__name__}: {exc}") from exc
    if not hasattr(module, attr):
        raise InvalidArgument(f"module {module_name!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if not isinstance(obj, Engine):
        raise InvalidArgument(f"{target} is {type(obj).__name__}, not a shardflow.Engine")
    return obj


async def _serve(engine: Engine) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await engine.run_worker(stop)


def serve_one(target: str, metrics_port: int | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SHARDFLOW_LOG", "WARNING"),
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    engine = load_engine(target)
    if metrics_port is not None:
        engine.serve_metrics(metrics_port)
    loop.run(_serve(engine))
    return 0


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the supervisor dies, even by SIGKILL,
    so no worker outlives its supervisor unseen (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


PARENT_ENV = "SHARDFLOW_WORKER_PARENT"
"""Set by a parent that starts workers without preexec_fn (the bench, which has threads
by then): the worker arranges its own SIGTERM on the parent's death, at start-up."""
ERROR_FILE_ENV = "SHARDFLOW_WORKER_ERROR_FILE"
"""Where a supervised worker writes its one-line error instead of stderr: the supervisor
prints the first one only, so N workers failing alike still make one line."""


def _check_metrics_ports(port: int, processes: int) -> None:
    """Process i serves on port + i: every one of those must exist and be free now,
    or one child would die at start-up while the others ran on."""
    last = port + processes - 1
    if last > 65535:
        raise InvalidArgument(f"--metrics-port {port} with --processes {processes}: process "
                              f"i serves on {port}+i, up to {last}, past 65535")
    for i in range(processes):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + i))
            except OSError as exc:
                raise InvalidArgument(f"--metrics-port: port {port + i} (for worker process "
                                      f"{i}) is not free: {exc.strerror}") from exc


def run_worker_processes(target: str, processes: int, metrics_port: int | None = None
                         ) -> int:
    """Run ``processes`` worker processes; with ``metrics_port`` P, process i serves
    Prometheus metrics on 127.0.0.1:P+i."""
    load_engine(target)  # fail fast, with one clear line, before forking anything
    if metrics_port is not None:
        _check_metrics_ports(metrics_port, processes)
    if processes == 1:
        return serve_one(target, metrics_port)
    with tempfile.TemporaryDirectory(prefix="shardflow-worker-") as errors:
        return _supervise(target, processes, metrics_port, Path(errors))


def _supervise(target: str, processes: int, metrics_port: int | None, errors: Path) -> int:
    children = []
    for i in range(processes):
        env = dict(os.environ, **{ERROR_FILE_ENV: str(errors / f"{i}.err")})
        children.append(subprocess.Popen(
            [sys.executable, "-m", "shardflow.worker", target,
             *([str(metrics_port + i)] if metrics_port is not None else [])], env=env,
            # the supervisor has no threads yet: preexec_fn is safe here
            preexec_fn=_die_with_parent))  # noqa: PLW1509
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while not stopping and all(c.poll() is None for c in children):
        time.sleep(0.2)
    if stopping:
        return max((c.wait() for c in children), default=0)
    # a child exited without being asked to: the group goes down with it
    i, dead = next((i, c) for i, c in enumerate(children) if c.poll() is not None)
    forward(signal.SIGTERM, None)
    for c in children:
        c.wait()
    err = errors / f"{i}.err"
    why = (err.read_text(encoding="utf-8").strip() if err.exists() else
           f"killed by signal {-dead.returncode}" if dead.returncode < 0 else
           f"exited with code {dead.returncode}")
    raise ShardflowError(f"worker process {i} (pid {dead.pid}): {why}; stopped the other "
                         f"{processes - 1}")


def _main(argv: list[str]) -> int:
    """``python -m shardflow.worker TARGET [METRICS_PORT]``: one worker process."""
    from .cliutil import DEBUG_ENV, error_line

    parent = os.environ.get(PARENT_ENV)
    if parent:
        _die_with_parent()
        if str(os.getppid()) != parent:  # the parent died before the line above
            return 1
    try:
        return serve_one(argv[0], int(argv[1]) if len(argv) > 1 else None)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        line = error_line(exc)
        report = os.environ.get(ERROR_FILE_ENV)
        if report:
            Path(report).write_text(line + "\n", encoding="utf-8")
        else:
            print(f"shardflow worker: error: {line}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
