"""The transmission phase: one reader, concurrent handlers, one reply writer.

One task reads requests (and WRITE payloads) in order.  Each request then runs in its
own task in the connection's nursery, bounded in number and in buffered bytes, and
its reply goes out when it completes: replies leave in completion order, each one
whole under the writer's lock, never interleaved with another.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence

import attrs
import trio

from . import protocol as p
from .negotiation import Agreement, RemoteProtocolError
from .streams import ClientDisconnected, Receiver
from .volume import VolumeBridge, VolumeIOError

log = logging.getLogger(__name__)

MAX_REQUESTS_IN_FLIGHT = 64
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024  # payload and read buffers, per connection
MAX_EXTENTS = 1 << 16
MAX_ERROR_MESSAGE = 200  # QEMU drops a connection on chunks over 1000 bytes

Buffer = bytes | bytearray | memoryview

# Flags each command accepts; any other flag is EINVAL.
ALLOWED_FLAGS = {
    p.Command.READ: p.CommandFlags.DF,
    p.Command.WRITE: p.CommandFlags.FUA,
    p.Command.DISC: p.CommandFlags(0),
    p.Command.FLUSH: p.CommandFlags(0),
    p.Command.TRIM: p.CommandFlags.FUA,
    p.Command.CACHE: p.CommandFlags(0),
    p.Command.WRITE_ZEROES: p.CommandFlags.FUA | p.CommandFlags.NO_HOLE | p.CommandFlags.FAST_ZERO,
    p.Command.BLOCK_STATUS: p.CommandFlags.REQ_ONE,
}
MUTATING = {p.Command.WRITE, p.Command.TRIM, p.Command.WRITE_ZEROES}
WITH_RANGE = {p.Command.READ, p.Command.WRITE, p.Command.TRIM, p.Command.CACHE,
              p.Command.WRITE_ZEROES, p.Command.BLOCK_STATUS}
# Host errno -> NBD error; anything else is EIO.
NBD_ERRORS = {
    errno.EPERM: p.Errno.EPERM, errno.EROFS: p.Errno.EPERM, errno.EIO: p.Errno.EIO,
    errno.ENOMEM: p.Errno.ENOMEM, errno.EINVAL: p.Errno.EINVAL, errno.ENOSPC: p.Errno.ENOSPC,
    errno.EOVERFLOW: p.Errno.EOVERFLOW, errno.ENOTSUP: p.Errno.ENOTSUP,
    errno.ESHUTDOWN: p.Errno.ESHUTDOWN,
}


class RequestError(Exception):
    """A request the server answers with an NBD error instead of executing it."""

    def __init__(self, error: p.Errno, message: str) -> None:
        super().__init__(message)
        self.error = error


@attrs.frozen
class Request:
    flags: int
    command: int
    cookie: int
    offset: int
    length: int

    @classmethod
    def parse(cls, header: bytes) -> Request:
        fields = p.request_compiled.parse(header)
        if fields.magic != p.REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {fields.magic:#x}")
        return cls(fields.flags, fields.type, fields.cookie, fields.offset, fields.length)


@attrs.define
class Counters:
    requests: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class ByteBudget:
    """Bounds the bytes a connection holds for requests in flight."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._available = capacity
        self._released = trio.lowlevel.ParkingLot()

    async def acquire(self, n: int) -> int:
        n = min(n, self.capacity)  # one request may use it all, never more
        while self._available < n:
            await self._released.park()
        self._available -= n
        return n

    def release(self, n: int) -> None:
        self._available += n
        self._released.unpark_all()


class ReplyWriter:
    def __init__(self, stream: trio.abc.SendStream, structured: bool) -> None:
        self._stream = stream
        self._lock = trio.Lock()
        self.structured = structured

    async def send(self, buffers: Sequence[Buffer]) -> None:
        async with self._lock:  # a reply leaves whole, never interleaved
            for buffer in buffers:
                await self._stream.send_all(buffer)

    @staticmethod
    def simple(cookie: int, error: p.Errno = p.Errno.OK, data: Buffer = b"") -> list[Buffer]:
        header = p.simple_reply_compiled.build(dict(error=error, cookie=cookie))
        return [header, data] if data else [header]

    @staticmethod
    def chunk(cookie: int, chunk_type: p.ChunkType, payload: Buffer, data: Buffer = b"",
              done: bool = True) -> list[Buffer]:
        header = p.chunk_header_compiled.build(
            dict(flags=p.ReplyFlags.DONE if done else 0, type=chunk_type, cookie=cookie,
                 length=len(payload) + len(data))
        )
        return [header + payload, data] if data else [header + payload]

    def error(self, request: Request, error: p.Errno, message: str) -> list[Buffer]:
        if self.structured and request.command in (p.Command.READ, p.Command.BLOCK_STATUS):
            payload = p.chunk_payloads[p.ChunkType.ERROR].build(
                dict(error=error, message=message[:MAX_ERROR_MESSAGE])
            )
            return self.chunk(request.cookie, p.ChunkType.ERROR, payload)
        return self.simple(request.cookie, error)


class Transmission:
    """Serves requests on one connection until DISC, EOF or cancellation."""

    def __init__(
        self,
        stream: trio.abc.SendStream,
        receiver: Receiver,
        agreement: Agreement,
        bridge: VolumeBridge,
        read_only: bool,
    ) -> None:
        self._receiver = receiver
        self._agreement = agreement
        self._bridge = bridge
        self._read_only = read_only
        self._writer = ReplyWriter(stream, agreement.structured_replies)
        self._slots = trio.Semaphore(MAX_REQUESTS_IN_FLIGHT)
        self._budget = ByteBudget(MAX_BYTES_IN_FLIGHT)
        self._max_payload = agreement.export.block_sizes.maximum
        self.counters = Counters()
        self.reading = trio.CancelScope()

    async def run(self) -> None:
        """Returns after DISC once every request in flight has been answered."""
        async with trio.open_nursery() as handlers:
            with self.reading:
                try:
                    await self._read_requests(handlers)
                except ClientDisconnected as eof:
                    if eof.mid_message:
                        raise
                    # EOF between requests: answer what is in flight, as after DISC.

    async def _read_requests(self, handlers: trio.Nursery) -> None:
        while True:
            request = Request.parse(await self._receiver.receive_exactly(p.request.sizeof()))
            if request.command == p.Command.DISC:
                return
            await self._slots.acquire()
            try:
                reserved = await self._budget.acquire(self._buffer_size(request))
                payload = await self._receive_payload(request)
            except BaseException:
                self._slots.release()
                raise
            handlers.start_soon(self._handle, request, payload, reserved)

    def stop_reading(self) -> None:
        """Shutdown: take no new requests, finish the ones in flight."""
        self.reading.cancel()

    def _buffer_size(self, request: Request) -> int:
        if request.command in (p.Command.READ, p.Command.WRITE) and request.length <= self._max_payload:
            return request.length
        return 0

    async def _receive_payload(self, request: Request) -> memoryview | None:
        if request.command != p.Command.WRITE:
            return None
        if request.length > self._max_payload:
            # Consume it so it is never parsed as the next header; the handler refuses it.
            await self._receiver.discard(request.length)
            return None
        payload = memoryview(bytearray(request.length))
        await self._receiver.receive_into(payload)
        return payload

    async def _handle(self, request: Request, payload: memoryview | None, reserved: int) -> None:
        self.counters.requests += 1
        try:
            try:
                self._check(request)
                reply = await self._execute(request, payload)
            except RequestError as error:
                reply = self._refuse(request, error.error, str(error))
            except VolumeIOError as error:
                log.warning("request %s at %d+%d failed: %s",
                            _command_name(request.command), request.offset, request.length, error)
                reply = self._refuse(request, NBD_ERRORS.get(error.errno, p.Errno.EIO), str(error))
            await self._writer.send(reply)
        finally:
            self._budget.release(reserved)
            self._slots.release()

    def _refuse(self, request: Request, error: p.Errno, message: str) -> list[Buffer]:
        self.counters.errors += 1
        return self._writer.error(request, error, message)

    def _check(self, request: Request) -> None:
        """Refuses what the spec says to refuse, before anything is executed."""
        try:
            command = p.Command(request.command)
            allowed = ALLOWED_FLAGS[command]
        except (ValueError, KeyError):
            raise RequestError(p.Errno.EINVAL, f"unknown command {request.command}") from None
        if request.flags & ~allowed:
            raise RequestError(p.Errno.EINVAL, f"flags {request.flags:#x} are invalid for {command.name}")
        if request.flags & p.CommandFlags.DF and not self._writer.structured:
            raise RequestError(p.Errno.EINVAL, "DF needs structured replies")
        if command in MUTATING and self._read_only:
            raise RequestError(p.Errno.EPERM, "the export is read-only")
        if command in WITH_RANGE and request.offset + request.length > self._bridge.size:
            error = p.Errno.ENOSPC if command in (p.Command.WRITE, p.Command.WRITE_ZEROES) else p.Errno.EINVAL
            raise RequestError(error, "request goes past the end of the export")
        if command in (p.Command.READ, p.Command.WRITE) and request.length > self._max_payload:
            raise RequestError(p.Errno.EINVAL, f"request longer than {self._max_payload} bytes")
        if command == p.Command.BLOCK_STATUS:
            if not self._agreement.meta_contexts:
                raise RequestError(p.Errno.EINVAL, "no metadata context was negotiated")
            if request.length == 0:
                raise RequestError(p.Errno.EINVAL, "block status of zero bytes")

    async def _execute(self, request: Request, payload: memoryview | None) -> list[Buffer]:
        bridge, offset, length = self._bridge, request.offset, request.length
        fua = bool(request.flags & p.CommandFlags.FUA)
        match request.command:
            case p.Command.READ:
                data = await bridge.read(offset, length) if length else b""
                self.counters.bytes_read += length
                return self._read_reply(request, data)
            case p.Command.WRITE:
                if length:
                    await bridge.write(offset, payload, fua)
                self.counters.bytes_written += length
            case p.Command.FLUSH:
                await bridge.flush()
            case p.Command.TRIM:
                await bridge.trim(offset, length, fua)
            case p.Command.WRITE_ZEROES:
                may_trim = not request.flags & p.CommandFlags.NO_HOLE
                if request.flags & p.CommandFlags.FAST_ZERO and not bridge.can_fast_zero(may_trim):
                    raise RequestError(p.Errno.ENOTSUP, "zeroing this way is not faster than writing")
                await bridge.write_zeroes(offset, length, may_trim, fua)
            case p.Command.CACHE:
                await bridge.cache(offset, length)
            case p.Command.BLOCK_STATUS:
                return self._block_status_reply(request)
        return ReplyWriter.simple(request.cookie)

    def _read_reply(self, request: Request, data: Buffer) -> list[Buffer]:
        if not self._writer.structured:
            return ReplyWriter.simple(request.cookie, data=data)
        if not data:
            return ReplyWriter.chunk(request.cookie, p.ChunkType.NONE, b"")
        prefix = p.offset_data_prefix.build(dict(offset=request.offset))
        return ReplyWriter.chunk(request.cookie, p.ChunkType.OFFSET_DATA, prefix, data)

    def _block_status_reply(self, request: Request) -> list[Buffer]:
        limit = 1 if request.flags & p.CommandFlags.REQ_ONE else MAX_EXTENTS
        extents: list[dict] = []
        for extent in self._bridge.extents(request.offset, request.length):
            state = p.BlockState.DATA if extent.allocated else p.BlockState.HOLE | p.BlockState.ZERO
            if extents and extents[-1]["flags"] == state:
                extents[-1]["length"] += extent.length
            elif len(extents) == limit:
                break
            else:
                extents.append(dict(length=extent.length, flags=state))
        (context_id,) = self._agreement.meta_contexts
        payload = p.chunk_payloads[p.ChunkType.BLOCK_STATUS].build(
            dict(context_id=context_id, extents=extents)
        )
        return ReplyWriter.chunk(request.cookie, p.ChunkType.BLOCK_STATUS, payload)


def _command_name(command: int) -> str:
    try:
        return p.Command(command).name
    except ValueError:
        return str(command)
