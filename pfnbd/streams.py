"""Exact-length reads from a trio byte stream, and vectored sends to it.

NBD messages have fixed headers and announced payload lengths, so both phases of a
connection read "exactly n bytes".  One receiver serves the whole connection so that
bytes a client pipelined past the end of negotiation are not lost.

On a socket both sides make the system calls on its descriptor themselves (`_Direct`):
`readv` lands bytes in a reused buffer (or straight in a payload's), and `writev` sends
a batch of replies as one list of buffers.  Any other trio stream (TLS; tests use memory
streams) goes through trio's stream methods, a copy slower.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import trio

# Large enough that one receive usually holds a whole batch of pipelined headers; it
# bounds what a connection buffers beyond the message being read.
RECEIVE_CHUNK = 256 * 1024
# Payload remainders above this are received straight into the payload's own buffer.
DIRECT_RECEIVE_THRESHOLD = 64 * 1024
IOV_MAX = 1024  # buffers per writev (Linux's UIO_MAXIOV)
COALESCE_LIMIT = 256 * 1024  # bytes joined into one send on streams without sendmsg
YIELD_EVERY = 16  # socket calls in a row that may succeed with no schedule point (`_Direct`)

Buffer = bytes | bytearray | memoryview


class ClientDisconnected(Exception):
    """The client closed its side of the connection (EOF), mid-message or between."""

    def __init__(self, mid_message: bool) -> None:
        super().__init__("client closed the connection" + (" mid-message" if mid_message else ""))
        self.mid_message = mid_message


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def _stream_error(error: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """An error of the socket as `trio.SocketStream` would have raised it."""
    if error.errno == errno.EBADF:
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(error)


class _Direct:
    """One direction's system calls on a trio socket's descriptor, with a schedule
    point only where one is due.

    trio's socket methods make a pass of its run loop after every call that succeeds.
    A connection's reader and writer each give the loop its turn once a batch anyway
    (the reader waits for the client's next requests, the writer parks until the next
    completions), so those passes bought nothing: without them a 4 KiB read took 3-12%
    less CPU (benchmarks/README.md, "The twenty-third session").  Here calls that
    succeed yield once every YIELD_EVERY in a row that did not wait for the socket: a
    client that keeps the socket full still lets the other tasks run.  (The reader
    parks anyway once MAX_REQUESTS_IN_FLIGHT are unanswered, and the writer once it has
    sent what had completed.)  Every call is a cancellation point, as trio's are.

    The descriptor is asked of the socket at each call: once trio has closed it, that
    is -1 and the call fails with EBADF, never reaching a descriptor reused since.
    Owner: the one task of the connection that reads, or the one that writes."""

    def __init__(self, socket: trio.socket.SocketType,
                 wait: Callable[[trio.socket.SocketType], Any]) -> None:
        self._socket = socket
        self._wait = wait  # trio.lowlevel.wait_readable or wait_writable
        self._unyielded = 0  # calls in a row that neither waited for the socket nor yielded

    async def call(self, function: Callable[[int, Sequence[Buffer]], int], buffers: Sequence[Buffer]) -> int:
        """`function(descriptor, buffers)` (os.readv, os.writev) once the socket is ready."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                result = function(self._socket.fileno(), buffers)
            except BlockingIOError:
                await self._wait(self._socket)
                self._unyielded = -1  # this call waited: the count starts again after it
                continue
            except OSError as error:
                raise _stream_error(error) from error
            self._unyielded += 1
            if self._unyielded >= YIELD_EVERY:
                await trio.lowlevel.cancel_shielded_checkpoint()
                self._unyielded = 0
            return result


class Receiver:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        socket = _socket_of(stream)
        self._direct = None if socket is None else _Direct(socket, trio.lowlevel.wait_readable)
        self._buffer = bytearray(RECEIVE_CHUNK)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0  # the unread bytes are _buffer[_start:_end]
        self.received_at = time.monotonic()  # when bytes last landed in the buffer

    async def _receive(self, target: memoryview) -> int:
        """One receive into `target`: how many bytes landed (0 at EOF)."""
        if self._direct is not None:
            return await self._direct.call(os.readv, [target])
        data = await self._stream.receive_some(len(target))
        target[: len(data)] = data
        return len(data)

    async def _fill(self, n: int, mid_message: bool) -> None:
        """Receives until at least `n` (at most RECEIVE_CHUNK) bytes are unread."""
        unread = self._end - self._start  # fewer than n: moving them to the front is cheap
        self._buffer[:unread] = self._view[self._start : self._end]
        self._start, self._end = 0, unread
        while self._end < n:
            received = await self._receive(self._view[self._end :])
            if not received:
                raise ClientDisconnected(mid_message or self._end > 0)
            self._end += received
            self.received_at = time.monotonic()

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet: what `take_*` can have without waiting."""
        return self._end - self._start

    def take_into(self, target: memoryview) -> int:
        """Moves what is buffered into `target`, up to its length; how much it moved."""
        taken = min(self._end - self._start, len(target))
        target[:taken] = self._view[self._start : self._start + taken]
        self._start += taken
        return taken

    def take_unpacked(self, layout: struct.Struct) -> tuple | None:
        """The next `layout.size` bytes unpacked if they are all buffered, else None
        (and nothing taken): `receive_exactly` and `unpack` without a coroutine or a
        copy, for the requests a receive brought together."""
        start = self._start
        if self._end - start < layout.size:
            return None
        self._start = start + layout.size
        return layout.unpack_from(self._buffer, start)

    async def receive_exactly(self, n: int) -> bytes:
        """The next `n` bytes, at most RECEIVE_CHUNK: headers and small payloads."""
        if self._end - self._start < n:
            await self._fill(n, mid_message=False)
        start = self._start
        self._start += n
        return bytes(self._view[start : self._start])

    async def receive_into(self, target: memoryview) -> None:
        """Fill `target` completely.  The rest of a small payload comes through the
        buffer, with whatever the client pipelined after it; a large one lands in
        `target` directly."""
        filled = self.take_into(target)
        if len(target) - filled <= DIRECT_RECEIVE_THRESHOLD:
            if filled < len(target):
                await self._fill(len(target) - filled, mid_message=True)
                self.take_into(target[filled:])
            return
        while filled < len(target):
            received = await self._receive(target[filled:])
            if not received:
                raise ClientDisconnected(mid_message=True)
            filled += received

    async def discard(self, n: int) -> None:
        """Skip `n` bytes without holding more than one buffer of them."""
        while n > 0:
            if self._end == self._start:
                await self._fill(1, mid_message=True)
            taken = min(n, self._end - self._start)
            self._start += taken
            n -= taken


class Sender:
    """Sends lists of buffers in order, as few system calls as the socket allows."""

    def __init__(self, stream: trio.abc.SendStream) -> None:
        self._stream = stream
        socket = _socket_of(stream)
        self._direct = None if socket is None else _Direct(socket, trio.lowlevel.wait_writable)

    async def send(self, buffers: Sequence[Buffer]) -> None:
        if self._direct is None:  # TLS, or a test's stream: one send_all per run of small buffers
            for run in _runs(buffers, COALESCE_LIMIT):
                await self._stream.send_all(run[0] if len(run) == 1 else b"".join(run))
            return
        pending = list(buffers)
        while pending:
            batch = pending[:IOV_MAX]
            sent = await self._direct.call(os.writev, batch)
            # Mostly all of it went: then nothing needs walking through.
            pending = pending[IOV_MAX:] if sent == sum(map(len, batch)) else _drop_sent(pending, sent)


def _drop_sent(buffers: list[Buffer], sent: int) -> list[Buffer]:
    """What is left of `buffers` once their first `sent` bytes have gone."""
    for index, buffer in enumerate(buffers):
        if sent < len(buffer):
            rest = buffers[index:]
            rest[0] = memoryview(buffer)[sent:]
            return rest
        sent -= len(buffer)
    return []


def _runs(buffers: Sequence[Buffer], limit: int) -> Iterator[list[Buffer]]:
    """Consecutive buffers in runs of at most `limit` bytes (a bigger buffer on its own)."""
    run: list[Buffer] = []
    size = 0
    for buffer in buffers:
        if run and size + len(buffer) > limit:
            yield run
            run, size = [], 0
        run.append(buffer)
        size += len(buffer)
    if run:
        yield run
