"""A TCP proxy on loopback that a drill can cut: the network fault of ``shardflow drill``.

It runs in a thread of its own (its own event loop), so the load generator's loop does
not slow the traffic it forwards. Modes:

* ``pass``: forward both ways;
* ``drop``: reset every open connection and refuse new ones (a node or link down);
* ``stall``: keep connections open but forward nothing (a partition that leaves
  sockets hanging: the nastier case, no error until someone times out); bytes read
  meanwhile are delivered when the stall ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

MODES = ("pass", "drop", "stall")


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.port = 0
        self.connections = 0  # accepted since start, for the report
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="shardflow-netproxy", daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None

    def start(self) -> int:
        """Listen on a free loopback port; return it."""
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        self.port = fut.result(timeout=10)
        return self.port

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"proxy mode must be one of {MODES}, got {mode!r}")
        asyncio.run_coroutine_threadsafe(self._set_mode(mode), self._loop).result(timeout=10)

    def stop(self) -> None:
        if not self._thread.is_alive():  # never started (the drill failed first)
            self._loop.close()
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _serve(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _set_mode(self, mode: str) -> None:
        assert self._flowing is not None
        self.mode = mode
        if mode == "stall":
            self._flowing.clear()
            return
        self._flowing.set()
        if mode == "drop":
            for w in list(self._writers):
                w.transport.abort()  # RST: the client sees the connection die at once

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "drop":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                await self._flowing.wait()  # a stall holds the bytes here
                if self.mode == "drop":
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            # one direction ending ends the connection (Postgres has no half-close use)
            writer.transport.abort()
