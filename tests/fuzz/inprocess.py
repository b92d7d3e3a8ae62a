"""pfnbd's `Server` run by trio in a thread of the test process, on a Unix socket.

Hypothesis opens hundreds of connections per test; a server in a subprocess would
cost a start-up per example and hide its crashes in a log.  Here the server is set up
the way `pfnbd serve` sets it up (`cli._serve`: `open_exports` then `Server.run`), and
an exception escaping it is re-raised in the test: a crash fails the test loudly.
"""

from __future__ import annotations

import threading
from pathlib import Path

import trio

from pfnbd.server import ExportSpec, Server, open_exports, open_unix_listener
from pfnbd.store import Store
from pfnbd.volume import EmulatedClient

from .nbdwire import NbdClient

START_TIMEOUT = 30.0


class ServerCrashed(AssertionError):
    pass


class InProcessServer:
    """`with InProcessServer(dir, {"alpha": 1 << 20}) as server:` serves those volumes
    at `server.socket` until the block ends."""

    def __init__(self, directory: Path, volumes: dict[str, int]) -> None:
        self.socket = directory / "nbd.sock"
        self._store = Store(directory / "data")
        self._volumes = volumes
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._shutdown: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pfnbd-in-process", daemon=True)

    def __enter__(self) -> InProcessServer:
        for name, size in self._volumes.items():
            self._store.create(name, size)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise AssertionError(f"in-process server did not start in {START_TIMEOUT} s")
        self.check()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._shutdown.set, trio_token=self._token)
            self._thread.join(START_TIMEOUT)
        assert not self._thread.is_alive(), "in-process server did not stop"
        self.check()

    def check(self) -> None:
        """Fails if the server has crashed."""
        if self._error is not None:
            raise ServerCrashed(f"the server crashed: {self._error!r}") from self._error
        if self._ready.is_set() and not self._thread.is_alive() and not self._shutdown.is_set():
            raise ServerCrashed("the server thread ended on its own")

    def connect(self, timeout: float = 10.0) -> NbdClient:
        return NbdClient.unix(self.socket, timeout)

    def _run(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as error:  # handed to the test thread by check()
            self._error = error
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._shutdown = trio.Event()
        specs = [ExportSpec(name, f"fuzz volume {name}") for name in self._volumes]
        async with open_exports(EmulatedClient(self._store), specs, read_only=False) as exports:
            listener = await open_unix_listener(self.socket)
            async with trio.open_nursery() as nursery:
                await nursery.start(Server(exports).run, [listener], self._shutdown)
                self._ready.set()
