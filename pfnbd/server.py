"""Listeners, connection lifecycle, policy, statistics and shutdown.

A `Server` owns one nursery of connections.  Each connection negotiates under a
handshake deadline (STARTTLS and its TLS handshake included), then runs its
transmission phase, and ends in one log line.  Shutdown stops accepting and has each
connection read no new request, answer those in flight and disconnect, so that a
reconnecting client resends only what it had no reply to; what is still in flight
after the shutdown timeout is answered ESHUTDOWN, and whatever is left is cancelled.

Listeners are Unix sockets, TCP sockets (IPv4 and IPv6), or the sockets systemd
passes in socket activation.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import socket as stdlib_socket
import ssl
import stat
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from . import protocol as p
from .counters import RequestCounters
from .negotiation import Agreement, Channel, ExportInfo, Negotiation, RemoteProtocolError, TlsMode, negotiate
from .store import split_snapshot_name
from .streams import ClientDisconnected
from .throttle import Throttle
from .tls import TlsHandshakeError, TlsStream
from .transmission import Transmission
from .volume import RETRY_TIME_LIMIT, BackendCounters, VolumeBridge, VolumeClient

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds a client has to reach transmission
SHUTDOWN_TIMEOUT = 5.0  # seconds in-flight requests get at shutdown before ESHUTDOWN
CLOSE_TIMEOUT = 2.0  # seconds a closing connection gets to send its TLS close_notify
ACCEPT_RETRY_DELAY = 0.1  # seconds between accepts while descriptors run out
SHARES_POLL = 0.001  # seconds between looks at the other workers' connection counts
SHARES_LIMIT = 0.05  # seconds at most a worker leaves a connection for one with fewer
# accept(2): a connection that failed while queued (reset, refused by a firewall, or one
# of the network errors Linux passes on): its own failure, not the listener's.
FAILED_IN_QUEUE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
                             errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                             errno.ENETUNREACH})
BACKLOG = 128
SOCKET_MODE = 0o600  # Unix sockets: only the server's user may connect
SD_LISTEN_FDS_START = 3  # systemd passes sockets from this descriptor on
PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ListenError(Exception):
    pass


@attrs.frozen
class ConnectionShares:
    """How many connections each worker of `pfnbd serve --workers` has open, in memory
    its forked workers share, so that a connection goes to a worker with fewer.  The
    kernel wakes every worker waiting on the listener, and the first to run would take
    it: often three of fio's four connections on one.  Slot `index` is written by that
    worker alone (its `Server`); the others only read it."""

    counts: memoryview  # one int64 a worker
    index: int = 0

    @classmethod
    def shared(cls, workers: int) -> ConnectionShares:
        """In the parent, before it forks: every worker maps the same page."""
        return cls(memoryview(mmap.mmap(-1, 8 * workers)).cast("q"))

    def of_worker(self, index: int) -> ConnectionShares:
        return attrs.evolve(self, index=index)

    def publish(self, open_connections: int) -> None:
        self.counts[self.index] = open_connections

    def _another_has_fewer(self) -> bool:
        mine = self.counts[self.index]
        return any(count < mine for index, count in enumerate(self.counts) if index != self.index)

    async def accept(self, listener: trio.SocketListener) -> trio.SocketStream:
        """The next connection this worker takes.  While another worker has fewer, one
        waiting is left to it, for at most SHARES_LIMIT: it may be busy, or restarting."""
        while True:
            await trio.lowlevel.wait_readable(listener.socket)
            with trio.move_on_after(SHARES_LIMIT):
                while self._another_has_fewer():
                    await trio.sleep(SHARES_POLL)
            # Not trio's accept, which would wait, and take the next connection unasked,
            # if another worker took this one meanwhile.
            view = stdlib_socket.socket(fileno=listener.socket.fileno())
            try:
                accepted, _ = view.accept()
            except BlockingIOError:
                continue
            except OSError as error:
                if error.errno in FAILED_IN_QUEUE:
                    continue
                raise
            finally:
                view.detach()
            return trio.SocketStream(trio.socket.from_stdlib_socket(accepted))


@attrs.frozen
class Export:
    info: ExportInfo
    bridge: VolumeBridge
    read_only: bool
    throttle: Throttle = attrs.field(factory=Throttle, eq=False)  # shared by its connections


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
    retry_time_limit: float = RETRY_TIME_LIMIT, partial_sectors: bool = True,
) -> AsyncIterator[list[Export]]:
    """Opens each volume once; every connection to it shares the one bridge.
    `partial_sectors`: as `VolumeBridge` takes it."""
    bridges: list[VolumeBridge] = []
    try:
        exports = []
        for spec in specs:
            volume, snapshot = split_snapshot_name(spec.name)
            bridge = VolumeBridge(client.open_volume(volume, snapshot), retry_time_limit, partial_sectors)
            bridges.append(bridge)
            exports.append(make_export(spec, bridge, read_only))
        yield exports
    finally:
        for bridge in bridges:
            bridge.close()


def make_export(spec: ExportSpec, bridge: VolumeBridge, read_only: bool) -> Export:
    """The export of an open volume: read-only if asked, or if the volume is."""
    export_read_only = read_only or bridge.backend.read_only
    contexts = (p.BASE_ALLOCATION,
                *([p.QEMU_ALLOCATION_DEPTH] if bridge.backend.has_depths else []),
                *(p.QEMU_DIRTY_BITMAP + snapshot for snapshot in bridge.backend.dirty_bitmaps))
    info = ExportInfo(spec.name, spec.description, bridge.size, export_flags(export_read_only),
                      contexts=contexts)
    return Export(info, bridge, export_read_only)


@attrs.frozen
class Policy:
    """What the operator allows, from the options of `pfnbd serve`."""

    tls_mode: TlsMode = TlsMode.OFF
    tls_context: ssl.SSLContext | None = None  # required unless tls_mode is OFF
    max_connections: int | None = None  # None: no limit
    handshake_timeout: float = HANDSHAKE_TIMEOUT  # covers the TLS handshake too
    shutdown_timeout: float = SHUTDOWN_TIMEOUT

    def __attrs_post_init__(self) -> None:
        if self.tls_mode is not TlsMode.OFF and self.tls_context is None:
            raise ValueError(f"TLS mode {self.tls_mode.value!r} needs a TLS context")


@attrs.define(eq=False)
class _Connection:
    number: int
    peer: dict[str, object]  # logfmt fields that say who the client is
    channel: Channel
    started: float = attrs.field(factory=trio.current_time)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    agreement: Agreement | None = None
    transmission: Transmission | None = None

    def stop(self) -> None:
        if self.transmission is None:
            self.scope.cancel()  # still haggling: nothing in flight to finish
        else:
            self.transmission.shut_down()

    def refuse_in_flight(self) -> None:
        if self.transmission is not None:
            self.transmission.refuse_in_flight()

    @property
    def export(self) -> str | None:
        return None if self.agreement is None else self.agreement.export.name


@attrs.define
class _ExportTotals:
    """Per-export counters of the connections that have ended, and of the bridges
    of the exports of this name that were removed."""

    connections: int = 0
    counters: RequestCounters = attrs.Factory(RequestCounters)
    backend: BackendCounters = attrs.Factory(BackendCounters)


@attrs.frozen
class ExportStats:
    name: str
    connections: int  # ever, the active ones included
    active: int
    counters: RequestCounters
    backend: BackendCounters
    in_flight: int  # requests read and not answered yet


@attrs.frozen
class ServerStats:
    accepted: int
    active: int
    refused: int
    failed_handshakes: int  # connections that ended before transmission, other than by an abort
    exports: list[ExportStats]


# How a connection that never reached transmission may end without its handshake
# failing: the client aborted, or the server shut down or removed the export it chose.
EXPORT_REMOVED = "export removed during negotiation"
HANDSHAKE_NOT_FAILED = ("closed in negotiation", "closed by server shutdown", EXPORT_REMOVED)


class Server:
    def __init__(self, exports: Sequence[Export], policy: Policy = Policy(),
                 shares: ConnectionShares | None = None) -> None:
        # Exports can be added and removed at run time (the control socket).  `_infos`
        # is what negotiations look names up in, live; `_exports` also holds the
        # exports withdrawn from it whose connections are still ending.
        self._exports = {export.info.name: export for export in exports}
        self._infos = {export.info.name: export.info for export in exports}
        self._policy = policy
        self._connections: set[_Connection] = set()
        self._connections_changed = trio.lowlevel.ParkingLot()
        self._numbers = itertools.count(1)
        self._totals = {name: _ExportTotals() for name in self._exports}
        self._accepted = 0
        self._refused = 0
        self._failed_handshakes = 0
        self._shares = shares
        if shares is not None:  # a restarted worker's slot still has its predecessor's count
            shares.publish(0)

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
            if not await self._drained(self._policy.shutdown_timeout):
                for connection in list(self._connections):
                    connection.refuse_in_flight()
                await self._drained(CLOSE_TIMEOUT)  # for the ESHUTDOWN replies to go out
            connections.cancel_scope.cancel()

    async def _drained(self, timeout: float) -> bool:
        """Whether every connection ends within `timeout` seconds."""
        with trio.move_on_after(timeout):
            while self._connections:
                await self._connections_changed.park()
        return not self._connections

    async def _accept(self, listener: trio.abc.Listener, connections: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await (listener.accept() if self._shares is None else self._shares.accept(listener))
                except OSError as error:
                    # Out of descriptors or memory: the listener stays, and we retry.
                    log.error("accept failed: %s", error.strerror or error)
                    await trio.sleep(ACCEPT_RETRY_DELAY)
                    continue
                connections.start_soon(self.serve_connection, stream)

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """One client from handshake to close; any trio stream will do (tests use memory streams)."""
        connection = _Connection(next(self._numbers), _peer_fields(stream), Channel(stream))
        limit = self._policy.max_connections
        if limit is not None and len(self._connections) >= limit:
            # As nbdkit's limit filter does: close at once, before the greeting.
            self._refused += 1
            await trio.aclose_forcefully(stream)
            log.warning("%s", logfmt("connection", id=connection.number, **connection.peer,
                                     end=f"refused: {limit} connections already open"))
            return
        self._accepted += 1
        self._connections.add(connection)
        self._publish_count()
        log.debug("%s", logfmt("accepted", id=connection.number, **connection.peer))
        outcome = "closed"
        try:
            with connection.scope:
                outcome = await self._negotiate_and_serve(connection)
            if connection.scope.cancelled_caught:
                outcome = "closed by server shutdown"
        # Errors from the handlers' nursery come wrapped in exception groups.
        except* (RemoteProtocolError, TlsHandshakeError) as group:
            outcome = f"dropped: {group.exceptions[0]}"
        except* ClientDisconnected as group:
            outcome = str(group.exceptions[0])
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            outcome = f"connection lost: {group.exceptions[0] or 'broken pipe'}"
        finally:
            await _close(connection.channel.stream)
            self._connections.discard(connection)
            self._publish_count()
            self._connections_changed.unpark_all()
            if connection.transmission is None and outcome not in HANDSHAKE_NOT_FAILED:
                self._failed_handshakes += 1
            self._add_to_totals(connection)
            log.info("%s", _summary(connection, outcome))

    def _publish_count(self) -> None:
        if self._shares is not None:
            self._shares.publish(len(self._connections))

    async def _negotiate_and_serve(self, connection: _Connection) -> str:
        negotiation = Negotiation(self._infos, self._policy.tls_mode)
        with trio.move_on_after(self._policy.handshake_timeout) as handshake:
            connection.agreement = await negotiate(
                connection.channel, negotiation, self._policy.tls_context
            )
        if handshake.cancelled_caught:
            return "handshake timed out"
        if connection.agreement is None:
            return "closed in negotiation"
        name = connection.agreement.export.name
        if self._infos.get(name) is not connection.agreement.export:
            return EXPORT_REMOVED
        export = self._exports[name]
        channel = connection.channel
        connection.transmission = Transmission(
            channel.stream, channel.receiver, connection.agreement, export.bridge, export.read_only,
            export.throttle,
        )
        await connection.transmission.run()
        return "closed"

    # -- the export table, changed at run time -----------------------------

    def add_export(self, export: Export) -> None:
        name = export.info.name
        if name in self._exports:
            raise ValueError(f"an export named {name!r} exists already")
        self._exports[name] = export
        self._infos[name] = export.info
        self._totals.setdefault(name, _ExportTotals())

    def clients(self, name: str) -> int:
        """Connections that agreed on export `name` and have not ended."""
        return sum(1 for connection in self._connections if connection.export == name)

    def withdraw_export(self, name: str) -> None:
        """New clients no longer find `name`; its connections stop as at shutdown:
        they read no new request, answer those in flight and end."""
        del self._infos[name]
        for connection in list(self._connections):
            if connection.export == name:
                connection.stop()

    async def remove_export(self, name: str) -> Export:
        """Waits until the connections of a withdrawn export have ended, then forgets it."""
        while self.clients(name):
            await self._connections_changed.park()
        export = self._exports.pop(name)
        self._totals[name].backend.add(export.bridge.counters)
        return export

    def _add_to_totals(self, connection: _Connection) -> None:
        if connection.export is None:
            return
        totals = self._totals[connection.export]
        totals.connections += 1
        if connection.transmission is not None:
            totals.counters.add(connection.transmission.counters)

    def snapshot(self) -> ServerStats:
        """The server's counters now, ended connections and active ones together:
        copies, which the caller may read in any thread."""
        exports = []
        for name, ended in self._totals.items():
            counters, backend = RequestCounters(), BackendCounters()
            counters.add(ended.counters)
            backend.add(ended.backend)
            export = self._exports.get(name)
            if export is not None:
                backend.add(export.bridge.counters)
            active = [c for c in self._connections if c.export == name]
            in_flight = 0
            for connection in active:
                if connection.transmission is not None:
                    counters.add(connection.transmission.counters)
                    in_flight += connection.transmission.in_flight
            exports.append(ExportStats(name, ended.connections + len(active), len(active), counters, backend,
                                       in_flight))
        return ServerStats(self._accepted, len(self._connections), self._refused, self._failed_handshakes,
                           exports)

    def stats(self) -> list[str]:
        """`stats` log lines: the server's connections, then each export's counters."""
        snapshot = self.snapshot()
        lines = [logfmt("stats", accepted=snapshot.accepted, active=snapshot.active,
                        refused=snapshot.refused, failed_handshakes=snapshot.failed_handshakes)]
        for export in snapshot.exports:
            lines.append(logfmt("stats", export=export.name, connections=export.connections,
                                active=export.active, **export.counters.summary()))
        return lines


async def _close(stream: trio.abc.Stream) -> None:
    """Closes gracefully (a TLS stream sends close_notify), never for long, even when
    the connection was cancelled."""
    with trio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the transport is closed all the same
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)


def logfmt(event: str, **fields: object) -> str:
    """`event key=value ...`: values with spaces or quotes are quoted, None is left out."""
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c in text for c in ' "=\\'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _summary(connection: _Connection, outcome: str) -> str:
    fields: dict[str, object] = dict(id=connection.number, **connection.peer, export=connection.export)
    stream = connection.channel.stream
    if isinstance(stream, TlsStream):
        fields.update(tls=stream.version, client_cert=stream.peer_subject)
    if connection.agreement is not None:
        fields["replies"] = _reply_kind(connection.agreement)
        fields["contexts"] = ",".join(connection.agreement.meta_contexts.values()) or None
    if connection.transmission is not None:
        fields.update(connection.transmission.counters.summary())
    fields["seconds"] = f"{trio.current_time() - connection.started:.3f}"
    fields["end"] = outcome
    return logfmt("connection", **fields)


def _reply_kind(agreement: Agreement) -> str:
    if agreement.extended_headers:
        return "extended"
    return "structured" if agreement.structured_replies else "simple"


def _peer_fields(stream: trio.abc.Stream) -> dict[str, object]:
    """`client=HOST:PORT`, or for a Unix socket `client=unix` and the client's pid and uid."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return dict(client="?")
    if sock.family != stdlib_socket.AF_UNIX:
        try:
            return dict(client=address_name(sock.family, sock.getpeername()))
        except OSError:  # the client reset the connection already
            return dict(client="?")
    try:
        credentials = sock.getsockopt(
            stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, PEER_CREDENTIALS.size
        )
    except OSError:
        return dict(client="unix")
    pid, uid, _ = PEER_CREDENTIALS.unpack(credentials)
    return dict(client="unix", pid=pid, uid=uid)


def address_name(family: int, address) -> str:
    """How logs show a socket address: `unix:PATH`, `HOST:PORT` or `[HOST]:PORT`."""
    if family == stdlib_socket.AF_UNIX:
        return f"unix:{address}"
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listener_name(listener: trio.SocketListener) -> str:
    sock = listener.socket
    return address_name(sock.family, sock.getsockname())


async def open_unix_listener(path: Path, mode: int = SOCKET_MODE) -> trio.SocketListener:
    """Listens on a Unix socket with permissions `mode` whatever the umask; a stale
    socket file left by a crash is replaced."""
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
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        # Linux gives the socket file the mode of the socket itself, less the umask:
        # set it before bind so the file is never more open than asked, then exactly.
        os.fchmod(sock.fileno(), mode)
        # bind and listen back to back, with no checkpoint between: a client that sees
        # the file is refused only in the instant between two system calls.
        sock.bind(str(path))
        try:
            sock.listen(BACKLOG)
            os.chmod(path, mode)
        except OSError:
            remove_socket(path)
            raise
    except OSError as error:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {error.strerror}") from None
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def open_tcp_listeners(port: int, host: str) -> list[trio.SocketListener]:
    """Listens on every address `host` resolves to (IPv4 or IPv6); port 0 picks a free one."""
    try:
        return await trio.open_tcp_listeners(port, host=host, backlog=BACKLOG)
    except OSError as error:
        where = address_name(stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET,
                             (host, port))
        raise ListenError(f"cannot listen on {where}: {error.strerror or error}") from None


def systemd_listeners() -> list[trio.SocketListener] | None:
    """The listening sockets systemd passed us (socket activation), or None.

    As sd_listen_fds(3): LISTEN_FDS sockets from descriptor 3 on, meant for us only if
    LISTEN_PID is our pid.  The variables are removed so no child inherits them.
    """
    count, pid = os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_PID")
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count is None or pid != str(os.getpid()):
        return None
    if not count.isdigit() or int(count) == 0:
        raise ListenError(f"LISTEN_FDS={count!r} passes no socket")
    listeners = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        try:
            sock = stdlib_socket.socket(fileno=fd)
        except OSError as error:
            raise ListenError(f"descriptor {fd} from systemd: {error.strerror}") from None
        if sock.type != stdlib_socket.SOCK_STREAM or not sock.getsockopt(
            stdlib_socket.SOL_SOCKET, stdlib_socket.SO_ACCEPTCONN
        ):
            raise ListenError(f"descriptor {fd} from systemd is not a listening stream socket")
        os.set_inheritable(fd, False)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return listeners


SocketFile = tuple[int, int]  # st_dev and st_ino: which file a path names


def socket_file(path: Path) -> SocketFile:
    status = os.lstat(path)
    return status.st_dev, status.st_ino


def remove_socket(path: Path, only: SocketFile | None = None) -> None:
    """Unlinks the socket file at `path`; given `only`, just if the path still names
    that file: in an upgrade the next server may have bound its own there already."""
    try:
        if only is None or socket_file(path) == only:
            os.unlink(path)
    except FileNotFoundError:
        pass
