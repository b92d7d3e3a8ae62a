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
pickle.  Queries are numbered and each answer carries its query's number: an answer
that came too late for its scrape is told from the next one's and dropped.
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator

import attrs
import trio

from .counters import RequestCounters
from .server import ExportStats, Server, ServerStats
from .volume import BackendCounters

QUERY = struct.Struct("<Q")  # its number
ANSWER_HEAD = struct.Struct("<QQ")  # the query's number, the pickle's length
# A worker answers from trio's thread between requests: far within this, unless it is
# stalled, and then a scrape must not stall with it (it shows the worker's last counts).
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
        received = bytearray()
        while chunk := await stream.receive_some():
            received += chunk
            while len(received) >= QUERY.size:
                (number,) = QUERY.unpack_from(received)
                del received[: QUERY.size]
                answer = pickle.dumps(server.snapshot())
                await stream.send_all(ANSWER_HEAD.pack(number, len(answer)) + answer)


class Link:
    """The parent's end of one worker's link."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self._received = bytearray()  # answers, or parts of them, not taken yet
        self._asked = 0  # the number of the last query

    def ask(self, timeout: float) -> ServerStats:
        """The worker's stats now; TimeoutError if it does not answer in `timeout`
        seconds (its answer, when it comes, is dropped), EOFError or another OSError
        once it is gone."""
        self._asked += 1
        self.socket.settimeout(timeout)
        self.socket.sendall(QUERY.pack(self._asked))
        deadline = time.monotonic() + timeout
        while True:
            while (answer := self._next_answer()) is not None:
                number, pickled = answer
                if number == self._asked:
                    return pickle.loads(pickled)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer in {timeout} s")
            self.socket.settimeout(remaining)
            chunk = self.socket.recv(1 << 16)
            if not chunk:
                raise EOFError("the worker closed its link")
            self._received += chunk

    def _next_answer(self) -> tuple[int, bytes] | None:
        if len(self._received) < ANSWER_HEAD.size:
            return None
        number, length = ANSWER_HEAD.unpack_from(self._received)
        end = ANSWER_HEAD.size + length
        if len(self._received) < end:
            return None
        pickled = bytes(self._received[ANSWER_HEAD.size : end])
        del self._received[:end]
        return number, pickled


class WorkerStats:
    """The parent's links to its workers, and what exited ones counted.

    Owner: `_lock`.  The supervisor's thread makes a link at each fork
    (`forking`) while the metrics server's threads query them (`snapshot`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[int, Link] = {}  # by worker index
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
            self._links[index] = Link(ours)
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
            link.socket.close()
        assert self._forked_end is not None, "worker_end outside forking"
        return self._forked_end

    def snapshot(self) -> ServerStats:
        """Every worker's stats now, summed with what exited ones counted."""
        with self._lock:
            answers = []
            for index, link in list(self._links.items()):
                try:
                    self._last[index] = link.ask(QUERY_TIMEOUT)
                except TimeoutError:  # stalled: its last counts, until it answers again
                    pass
                except (OSError, EOFError, pickle.UnpicklingError):  # gone
                    self._unlink(index)
                    continue
                if index in self._last:
                    answers.append(self._last[index])
            return combined([self._exited, *answers])

    def _unlink(self, index: int) -> None:  # with _lock held
        link = self._links.pop(index, None)
        if link is not None:
            link.socket.close()
        last = self._last.pop(index, None)
        if last is not None:
            self._exited = combined([self._exited, counted_only(last)])
