"""The counters of a server's workers, summed for the parent's `/metrics`.

With `pfnbd serve --workers N` each worker counts what its own connections do
(`Server.snapshot`), and the parent serves nothing.  Before each fork the parent makes
a socket pair, its link to that worker: a scrape of the parent's `/metrics` asks every
worker over its link and sums the answers.  A worker answers in trio
(`answer_queries`), from the same snapshot its own `/metrics` would take.

The sums only grow, as Prometheus expects of a counter, across a worker's death: the
parent keeps the last counts each worker gave and adds them to the sum once the worker
is gone (what it counted after the last scrape is lost with it).  Its open
connections and requests in flight went with it.

A link is private to the parent and one of its forks, so what travels on it is a
pickle.
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import struct
import threading
from collections.abc import Iterable, Iterator

import attrs
import trio

from .counters import RequestCounters
from .server import ExportStats, Server, ServerStats
from .volume import BackendCounters

QUERY = b"?"
ANSWER_LENGTH = struct.Struct("<Q")
# A worker answers from trio's thread between requests: far within this, unless it
# hangs, and then a scrape must not hang with it.
QUERY_TIMEOUT = 5.0

NO_STATS = ServerStats(0, 0, 0, 0, [])


def combined(stats: Iterable[ServerStats]) -> ServerStats:
    """The sum of several processes' stats, exports matched by name."""
    accepted = active = refused = failed = 0
    exports: dict[str, ExportStats] = {}
    for one in stats:
        accepted += one.accepted
        active += one.active
        refused += one.refused
        failed += one.failed_handshakes
        for export in one.exports:
            summed = exports.get(export.name)
            if summed is None:
                summed = exports[export.name] = ExportStats(export.name, 0, 0, RequestCounters(),
                                                            BackendCounters(), 0)
            summed.counters.add(export.counters)
            summed.backend.add(export.backend)
            exports[export.name] = attrs.evolve(summed, connections=summed.connections + export.connections,
                                                active=summed.active + export.active,
                                                in_flight=summed.in_flight + export.in_flight)
    return ServerStats(accepted, active, refused, failed, list(exports.values()))


def counted_only(stats: ServerStats) -> ServerStats:
    """What an exited worker leaves of `stats`: its counts, nothing open."""
    return attrs.evolve(stats, active=0, exports=[attrs.evolve(export, active=0, in_flight=0)
                                                  for export in stats.exports])


async def answer_queries(server: Server, link: socket.socket, shutdown: trio.Event) -> None:
    """In a worker: answers the parent's queries on `link` until `shutdown`."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_answer, server, trio.SocketStream(trio.socket.from_stdlib_socket(link)))
        await shutdown.wait()
        nursery.cancel_scope.cancel()


async def _answer(server: Server, stream: trio.SocketStream) -> None:
    async with stream:
        while await stream.receive_some(len(QUERY)):
            answer = pickle.dumps(server.snapshot())
            await stream.send_all(ANSWER_LENGTH.pack(len(answer)) + answer)


class WorkerStats:
    """The parent's links to its workers, and what exited ones counted.

    Owner: `_lock`.  The supervisor's thread makes a link at each fork
    (`forking`) while the metrics server's threads query them (`snapshot`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[int, socket.socket] = {}  # by worker index: the parent's ends
        self._last: dict[int, ServerStats] = {}  # by worker index: its last answer
        self._exited = NO_STATS  # the counts of workers gone, summed
        self._forked_end: socket.socket | None = None  # the worker's end, across a fork

    @contextlib.contextmanager
    def forking(self, index: int) -> Iterator[None]:
        """Around the fork of worker `index` (again, if it exited): its new link.
        The fork's child never leaves this block; the parent keeps only its own end."""
        ours, theirs = socket.socketpair()
        with self._lock:
            self._unlink(index)
            self._links[index] = ours
        self._forked_end = theirs
        try:
            yield
        finally:
            self._forked_end = None
            theirs.close()

    def worker_end(self) -> socket.socket:
        """In a worker, first thing after its fork: its end of its link.  The parent's
        ends are closed here, not taken by the lock (the child has one thread, and
        the lock may have been held by another thread of the parent at the fork)."""
        for link in self._links.values():
            link.close()
        assert self._forked_end is not None, "worker_end outside forking"
        return self._forked_end

    def snapshot(self) -> ServerStats:
        """Every worker's stats now, summed with what exited ones counted."""
        with self._lock:
            answers = []
            for index, link in list(self._links.items()):
                try:
                    answers.append(self._query(link))
                except (OSError, EOFError, pickle.UnpicklingError):
                    # Gone, or too slow to trust the link again: a late answer would be
                    # taken for the next query's.
                    self._unlink(index)
                    continue
                self._last[index] = answers[-1]
            return combined([self._exited, *answers])

    def _unlink(self, index: int) -> None:  # with _lock held
        link = self._links.pop(index, None)
        if link is not None:
            link.close()
        last = self._last.pop(index, None)
        if last is not None:
            self._exited = combined([self._exited, counted_only(last)])

    @staticmethod
    def _query(link: socket.socket) -> ServerStats:
        link.settimeout(QUERY_TIMEOUT)
        link.sendall(QUERY)
        (length,) = ANSWER_LENGTH.unpack(_receive_exactly(link, ANSWER_LENGTH.size))
        return pickle.loads(_receive_exactly(link, length))


def _receive_exactly(link: socket.socket, length: int) -> bytes:
    data = bytearray()
    while len(data) < length:
        chunk = link.recv(length - len(data))
        if not chunk:
            raise EOFError("the worker closed its link")
        data += chunk
    return bytes(data)
