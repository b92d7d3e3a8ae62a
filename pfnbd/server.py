"""Listeners, connection lifecycle and shutdown.

A `Server` owns one nursery of connections.  Each connection negotiates under a
handshake deadline, then runs its transmission phase.  Shutdown is cancellation in
two steps: stop accepting and stop reading requests, let every request in flight be
answered (bounded by a drain deadline), then cancel whatever is left.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket as stdlib_socket
import stat
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from . import protocol as p
from .negotiation import ExportInfo, Negotiation, RemoteProtocolError, negotiate
from .store import split_snapshot_name
from .streams import ClientDisconnected, Receiver
from .transmission import Transmission
from .volume import RETRY_TIME_LIMIT, VolumeBridge, VolumeClient

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds a client has to reach transmission
DRAIN_TIMEOUT = 30.0  # seconds in-flight requests get at shutdown


class ListenError(Exception):
    pass


@attrs.frozen
class Export:
    info: ExportInfo
    bridge: VolumeBridge
    read_only: bool


def export_flags(read_only: bool) -> p.TransmissionFlags:
    flags = (
        p.TransmissionFlags.HAS_FLAGS | p.TransmissionFlags.SEND_FLUSH | p.TransmissionFlags.SEND_FUA
        | p.TransmissionFlags.SEND_TRIM | p.TransmissionFlags.SEND_WRITE_ZEROES
        | p.TransmissionFlags.SEND_FAST_ZERO | p.TransmissionFlags.SEND_CACHE
        | p.TransmissionFlags.CAN_MULTI_CONN  # one bridge per volume serves every connection
    )
    if read_only:
        writes = (p.TransmissionFlags.SEND_FUA | p.TransmissionFlags.SEND_TRIM
                  | p.TransmissionFlags.SEND_WRITE_ZEROES | p.TransmissionFlags.SEND_FAST_ZERO)
        return (flags & ~writes) | p.TransmissionFlags.READ_ONLY
    return flags


@attrs.frozen
class ExportSpec:
    """An export to open: `volume` or `volume@snapshot`, and how LIST describes it."""

    name: str
    description: str


@asynccontextmanager
async def open_exports(
    client: VolumeClient, specs: Sequence[ExportSpec], read_only: bool,
    retry_time_limit: float = RETRY_TIME_LIMIT,
) -> AsyncIterator[list[Export]]:
    """Opens each volume once; every connection to it shares the one bridge."""
    bridges: list[VolumeBridge] = []
    try:
        exports = []
        for spec in specs:
            volume, snapshot = split_snapshot_name(spec.name)
            bridge = VolumeBridge(client.open_volume(volume, snapshot), retry_time_limit)
            bridges.append(bridge)
            export_read_only = read_only or bridge.backend.read_only
            info = ExportInfo(spec.name, spec.description, bridge.size, export_flags(export_read_only))
            exports.append(Export(info, bridge, export_read_only))
        yield exports
    finally:
        for bridge in bridges:
            bridge.close()


@attrs.define(eq=False)
class _Connection:
    number: int
    peer: str
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    transmission: Transmission | None = None

    def stop(self) -> None:
        if self.transmission is None:
            self.scope.cancel()  # still haggling: nothing in flight to finish
        else:
            self.transmission.shut_down()


class Server:
    def __init__(self, exports: Sequence[Export]) -> None:
        self._exports = {export.info.name: export for export in exports}
        self._infos = [export.info for export in exports]
        self._connections: set[_Connection] = set()
        self._connections_changed = trio.lowlevel.ParkingLot()
        self._numbers = itertools.count(1)

    async def run(
        self,
        listeners: Sequence[trio.abc.Listener],
        shutdown: trio.Event,
        *,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serves until `shutdown` is set, then drains and returns."""
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(self._accept, listener, connections)
                task_status.started()
                await shutdown.wait()
                acceptors.cancel_scope.cancel()
            for connection in list(self._connections):
                connection.stop()
            with trio.move_on_after(DRAIN_TIMEOUT):
                while self._connections:
                    await self._connections_changed.park()
            connections.cancel_scope.cancel()

    async def _accept(self, listener: trio.abc.Listener, connections: trio.Nursery) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                connections.start_soon(self.serve_connection, stream)

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """One client from handshake to close; any trio stream will do (tests use memory streams)."""
        connection = _Connection(next(self._numbers), _peer_name(stream))
        self._connections.add(connection)
        outcome = "closed"
        agreement = None
        try:
            with connection.scope:
                receiver = Receiver(stream)
                with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
                    agreement = await negotiate(stream, receiver, Negotiation(self._infos))
                if handshake.cancelled_caught:
                    outcome = "handshake timed out"
                elif agreement is not None:
                    export = self._exports[agreement.export.name]
                    connection.transmission = Transmission(
                        stream, receiver, agreement, export.bridge, export.read_only
                    )
                    await connection.transmission.run()
            if connection.scope.cancelled_caught:
                outcome = "closed by server shutdown"
        # Errors from the handlers' nursery come wrapped in exception groups.
        except* RemoteProtocolError as group:
            outcome = f"dropped: {group.exceptions[0]}"
        except* ClientDisconnected as group:
            outcome = str(group.exceptions[0])
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            outcome = f"connection lost: {group.exceptions[0] or 'broken pipe'}"
        finally:
            await trio.aclose_forcefully(stream)
            self._connections.discard(connection)
            self._connections_changed.unpark_all()
            log.info("%s", _summary(connection, agreement, outcome))


def _summary(connection: _Connection, agreement, outcome: str) -> str:
    parts = [f"connection {connection.number} from {connection.peer}: {outcome}"]
    if agreement is not None:
        parts.append(f"export={agreement.export.name!r}")
        parts.append("extended" if agreement.extended_headers else "structured" if agreement.structured_replies else "simple")
    if connection.transmission is not None:
        c = connection.transmission.counters
        parts.append(f"requests={c.requests} errors={c.errors} "
                     f"read={c.bytes_read} written={c.bytes_written}")
    return " ".join(parts)


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "?"
    if sock.family == stdlib_socket.AF_UNIX:
        return "unix"
    host, port = sock.getpeername()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_unix_listener(path: Path) -> trio.SocketListener:
    """Listens on a Unix socket; a stale socket file left by a crash is replaced."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ListenError(f"{path} exists and is not a socket")
        probe = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            await probe.connect(str(path))
        except OSError as error:
            if error.errno != errno.ECONNREFUSED:
                raise ListenError(f"cannot probe {path}: {error.strerror}") from None
            path.unlink()  # nobody listens: left over from a crash
        else:
            raise ListenError(f"{path} is in use by another server")
        finally:
            probe.close()
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {error.strerror}") from None
    return trio.SocketListener(sock)


async def open_tcp_listeners(port: int, host: str | None) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as error:
        raise ListenError(f"cannot listen on {host or '*'}:{port}: {error.strerror}") from None


def remove_socket(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
