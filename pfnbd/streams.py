"""Exact-length reads from a trio byte stream, and vectored sends to it.

NBD messages have fixed headers and announced payload lengths, so both phases of a
connection read "exactly n bytes".  One receiver serves the whole connection so that
bytes a client pipelined past the end of negotiation are not lost.

On a socket both sides go to the socket itself: `recv_into` lands bytes in a reused
buffer (or straight in a payload's), and `sendmsg` sends a batch of replies as one
list of buffers.  Any other trio stream (tests use memory streams) works the same,
a copy slower.
"""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import Iterator, Sequence

import trio

# Large enough that one receive usually holds a whole batch of pipelined headers; it
# bounds what a connection buffers beyond the message being read.
RECEIVE_CHUNK = 256 * 1024
# Payload remainders above this are received straight into the payload's own buffer.
DIRECT_RECEIVE_THRESHOLD = 64 * 1024
IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV)
COALESCE_LIMIT = 256 * 1024  # bytes joined into one send on streams without sendmsg

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


class Receiver:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._socket = _socket_of(stream)
        self._buffer = bytearray(RECEIVE_CHUNK)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0  # the unread bytes are _buffer[_start:_end]
        self.received_at = time.monotonic()  # when bytes last landed in the buffer

    async def _receive(self, target: memoryview) -> int:
        """One receive into `target`: how many bytes landed (0 at EOF)."""
        if self._socket is not None:
            try:
                return await self._socket.recv_into(target)
            except OSError as error:
                raise _stream_error(error) from error
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
        self._socket = _socket_of(stream)

    async def send(self, buffers: Sequence[Buffer]) -> None:
        if self._socket is None:  # TLS, or a test's stream: one send_all per run of small buffers
            for run in _runs(buffers, COALESCE_LIMIT):
                await self._stream.send_all(run[0] if len(run) == 1 else b"".join(run))
            return
        pending = list(buffers)
        while pending:
            batch = pending[:IOV_MAX]
            try:
                sent = await self._socket.sendmsg(batch)
            except OSError as error:
                raise _stream_error(error) from error
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
