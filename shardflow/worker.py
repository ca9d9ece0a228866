"""``shardflow worker module:engine --processes N``: worker processes for your engine.

Each process imports the target, opens the engine with workers and runs until SIGTERM
or SIGINT, then stops gracefully (its workflows are handed back at once). The parent
supervises: it forwards signals and exits when the children have.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import logging
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from . import loop
from .errors import InvalidArgument

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
    obj = getattr(module, attr, None)
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


def run_worker_processes(target: str, processes: int, metrics_port: int | None = None
                         ) -> int:
    """Run ``processes`` worker processes; with ``metrics_port`` P, process i serves
    Prometheus metrics on 127.0.0.1:P+i."""
    load_engine(target)  # fail fast, with one clear line, before forking anything
    if processes == 1:
        return serve_one(target, metrics_port)
    children = [
        subprocess.Popen([sys.executable, "-m", "shardflow.worker", target,
                          *([str(metrics_port + i)] if metrics_port is not None else [])],
                         # the supervisor has no threads yet: preexec_fn is safe here
                         preexec_fn=_die_with_parent)  # noqa: PLW1509
        for i in range(processes)
    ]

    def forward(signum: int, _frame: object) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [c.wait() for c in children]
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(serve_one(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None))
