"""The transmission phase: one reader, requests executed concurrently, one reply writer.

One task reads requests (and their payloads) in order.  A READ or WRITE of whole
sectors starts right there and its reply is made by the callback of its last
submit; any other request runs in its own task in the connection's nursery.
Requests in flight are bounded in number and in buffered bytes, and their buffers
are reused from one request to the next.  Replies
queue in completion order, and one writer task sends all that have queued with one
`sendmsg`: each reply whole, never interleaved with another.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterable
from functools import partial
from typing import NamedTuple

import trio

from . import protocol as p
from .counters import RequestCounters
from .negotiation import Agreement, RemoteProtocolError
from .streams import Buffer, ClientDisconnected, Receiver, Sender
from .throttle import Throttle
from .volume import CACHE_CHUNK, SUBMIT_REFUSED, VolumeBridge, VolumeIOError

log = logging.getLogger(__name__)

MAX_REQUESTS_IN_FLIGHT = 64
# Payload and read buffers, per connection: many small requests, or one of any size
# (up to the 32 MiB maximum payload) on its own.  Never shared between connections: one
# whose client stalls mid-request would hold up the others (a client polling its
# connections in turn would deadlock).  4 MiB keeps nbdcopy's four connections of 64
# requests of 256 KiB as fast as 32 MiB did, in a quarter of the memory (benchmarks/README.md).
MAX_BYTES_IN_FLIGHT = 4 * 1024 * 1024
MAX_EXTENTS = 1 << 16
MAX_ERROR_MESSAGE = 200  # QEMU drops a connection on chunks over 1000 bytes

Held = tuple[int, bytearray | None]  # bytes counted against a BufferPool, and their buffer
NOTHING_HELD: Held = (0, None)
Taken = tuple[memoryview, Held]  # a request's buffer (payload or destination), and its hold

# Flags each command accepts; any other flag is EINVAL.  PAYLOAD_LEN is handled
# with the payload, before these checks.
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
# Command numbers and flags as plain ints for the checks made on every request:
# comparing with an IntEnum member looks it up on its class each time, several times
# the cost of the comparison, and `int & IntFlag` builds a flag object.
READ, WRITE, DISC, CACHE, WRITE_ZEROES, BLOCK_STATUS = map(int, (
    p.Command.READ, p.Command.WRITE, p.Command.DISC, p.Command.CACHE, p.Command.WRITE_ZEROES,
    p.Command.BLOCK_STATUS))
FUA = int(p.CommandFlags.FUA)
DF = int(p.CommandFlags.DF)
PAYLOAD_LEN = int(p.CommandFlags.PAYLOAD_LEN)
OK = int(p.Errno.OK)
DONE = int(p.ReplyFlags.DONE)
OFFSET_DATA = int(p.ChunkType.OFFSET_DATA)
OFFSET_SIZE = p.offset_data_prefix_layout.size
MUTATING = frozenset(map(int, (p.Command.WRITE, p.Command.TRIM, p.Command.WRITE_ZEROES)))
# What an export's I/O limits count, and as what (is it a write?).  As QEMU's block
# layer: reads and writes of data, a CACHE as a read and a WRITE_ZEROES as a write
# of their whole length; TRIM, FLUSH and BLOCK_STATUS are never throttled.
THROTTLED = {READ: False, CACHE: False, WRITE: True, WRITE_ZEROES: True}
WITH_RANGE = frozenset(map(int, (p.Command.READ, p.Command.WRITE, p.Command.TRIM, p.Command.CACHE,
                                  p.Command.WRITE_ZEROES, p.Command.BLOCK_STATUS)))
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


# By `extended`: a request header's layout, and the magic it must start with.
REQUEST_LAYOUTS = {False: (p.request_layout, p.REQUEST_MAGIC),
                   True: (p.extended_request_layout, p.EXTENDED_REQUEST_MAGIC)}


class Request(NamedTuple):  # not a frozen attrs class: one is made per request
    flags: int
    command: int
    cookie: int
    offset: int
    length: int  # the effect length; a payload's length when it carries one

    @property
    def name(self) -> str:
        try:
            return p.Command(self.command).name
        except ValueError:
            return str(self.command)



class BufferPool:
    """The buffers of a connection's requests in flight: bounded, and reused.

    At most `capacity` bytes are held, in use or kept for reuse, but for one request
    bigger than that, which counts as `capacity` and waits until it is alone.  A
    buffer comes back once its reply has been sent and is kept for the next request of
    its size, so steady traffic neither allocates nor faults in fresh memory; kept
    buffers are dropped when a request needs their room, and a buffer bigger than the
    pool is never kept.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._in_use = 0
        self._kept: dict[int, list[bytearray]] = {}
        self._kept_bytes = 0
        self._released = trio.lowlevel.ParkingLot()

    async def acquire(self, size: int, buffer: bool = True) -> Held:
        """`size` bytes, with a buffer of them unless `buffer` is false (then only counted)."""
        while not self.fits(size):
            await self._released.park()
        return self.take(size, buffer)

    def take(self, size: int, buffer: bool = True) -> Held:
        """`acquire` when `fits(size)`: no await, so no task switch."""
        counted = min(size, self.capacity)
        self._in_use += counted
        if buffer:
            kept = self._kept.get(size)
            if kept is not None:
                return counted, self._unkeep(size, kept)
        # Bytes only counted stand for memory the request allocates itself: kept
        # buffers make room for them too.
        self._drop_kept(self.capacity - self._in_use)
        return counted, bytearray(size) if buffer else None

    def fits(self, size: int) -> bool:
        return self._in_use + min(size, self.capacity) <= self.capacity

    def take_now(self, size: int) -> Held | None:
        """`take(size)` of a buffer if it fits, else None (then `acquire` decides)."""
        if self._in_use + size > self.capacity:
            return None
        kept = self._kept.get(size)
        if kept is None:
            return self.take(size)
        self._in_use += size  # steady traffic: a buffer of this size is there to reuse
        return size, self._unkeep(size, kept)

    def release(self, held: Held) -> None:
        self.release_all((held,))

    def release_all(self, helds: Iterable[Held]) -> None:
        """`release` of each, with one wake-up of whoever waits for room."""
        in_use, kept_bytes, kept_by_size = self._in_use, self._kept_bytes, self._kept
        for counted, buffer in helds:
            in_use -= counted
            if buffer is not None and len(buffer) == counted:  # a bigger one is let go
                kept = kept_by_size.get(counted)
                if kept is None:
                    kept_by_size[counted] = [buffer]
                else:
                    kept.append(buffer)
                kept_bytes += counted
        self._in_use, self._kept_bytes = in_use, kept_bytes
        if self._released:
            self._released.unpark_all()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def kept_bytes(self) -> int:
        return self._kept_bytes

    def _unkeep(self, size: int, kept: list[bytearray]) -> bytearray:
        """The one way a buffer leaves `_kept`: a size whose last buffer goes leaves
        with it, so every list in `_kept` has a buffer to give."""
        buffer = kept.pop()
        if not kept:
            del self._kept[size]
        self._kept_bytes -= size
        return buffer

    def _drop_kept(self, room: int) -> None:
        """Drops kept buffers, the sizes kept longest first, until they fit in `room` bytes."""
        while self._kept_bytes > room:
            size, kept = next(iter(self._kept.items()))
            self._unkeep(size, kept)


class Replies:
    """Builds replies in the form the connection negotiated: simple, structured or extended.

    Each method returns the buffers of one whole reply; the data of a READ is its own
    buffer so that it is never copied into a bigger one.
    """

    def __init__(self, structured: bool, extended: bool) -> None:
        self.structured = structured
        self.extended = extended

    def _chunk(self, request: Request, chunk_type: p.ChunkType, payload: bytes,
               data: Buffer = b"", done: bool = True) -> list[Buffer]:
        length = len(payload) + len(data)
        flags = p.ReplyFlags.DONE if done else 0
        if self.extended:
            header = p.extended_chunk_header_layout.pack(
                p.EXTENDED_REPLY_MAGIC, flags, chunk_type, request.cookie, request.offset, length)
        else:
            header = p.chunk_header_layout.pack(
                p.STRUCTURED_REPLY_MAGIC, flags, chunk_type, request.cookie, length)
        return [header + payload, data] if data else [header + payload]

    @staticmethod
    def _simple(request: Request, error: p.Errno) -> bytes:
        return p.simple_reply_layout.pack(p.SIMPLE_REPLY_MAGIC, error, request.cookie)

    def done(self, request: Request) -> list[Buffer]:
        """Success without data."""
        if self.extended:  # simple replies are forbidden under extended headers
            return self._chunk(request, p.ChunkType.NONE, b"")
        return [self._simple(request, OK)]

    def data(self, request: Request, data: Buffer) -> list[Buffer]:
        if not self.structured:
            header = self._simple(request, OK)
            return [header, data] if data else [header]
        if not data:
            return self._chunk(request, p.ChunkType.NONE, b"")
        if not self.extended:  # `_chunk`'s header and the offset in one pack
            return [p.offset_data_head_layout.pack(p.STRUCTURED_REPLY_MAGIC, DONE, OFFSET_DATA, request.cookie,
                                                   OFFSET_SIZE + len(data), request.offset), data]
        prefix = p.offset_data_prefix_layout.pack(request.offset)
        return self._chunk(request, p.ChunkType.OFFSET_DATA, prefix, data)

    def error(self, request: Request, error: p.Errno, message: str) -> list[Buffer]:
        if not self.structured:
            return [self._simple(request, error)]
        payload = p.chunk_payloads[p.ChunkType.ERROR].build(
            dict(error=error, message=message[:MAX_ERROR_MESSAGE])
        )
        return self._chunk(request, p.ChunkType.ERROR, payload)

    def block_status(self, request: Request, contexts: list[tuple[int, list[dict]]]) -> list[Buffer]:
        """One chunk per selected context, (its id, its extents), the last one DONE."""
        chunk_type = p.ChunkType.BLOCK_STATUS_EXT if self.extended else p.ChunkType.BLOCK_STATUS
        reply: list[Buffer] = []
        for index, (context_id, extents) in enumerate(contexts):
            payload = p.chunk_payloads[chunk_type].build(dict(context_id=context_id, extents=extents))
            reply += self._chunk(request, chunk_type, payload, done=index == len(contexts) - 1)
        return reply


class Transmission:
    """Serves requests on one connection until DISC, EOF or cancellation."""

    def __init__(
        self,
        stream: trio.abc.SendStream,
        receiver: Receiver,
        agreement: Agreement,
        bridge: VolumeBridge,
        read_only: bool,
        throttle: Throttle | None = None,  # the export's, shared by its connections
    ) -> None:
        self._sender = Sender(stream)
        self._receiver = receiver
        self._agreement = agreement
        self._bridge = bridge
        self._read_only = read_only
        self._throttle = throttle or Throttle()
        self._replies = Replies(agreement.structured_replies, agreement.extended_headers)
        self._buffers = BufferPool(MAX_BYTES_IN_FLIGHT)
        self._max_payload = agreement.export.block_sizes.maximum
        self._allowed_flags = allowed_flags(agreement)
        # The flags a READ or a WRITE may carry and still start with no task: the ones
        # `_check` accepts but FUA (a flush must follow).  No WRITE on a read-only export.
        self._direct_flags = {READ: DF if agreement.structured_replies else 0}
        if not read_only:
            self._direct_flags[WRITE] = 0
        self.counters = RequestCounters()
        self.reading = trio.CancelScope()
        self._shutting_down = False
        self._awaiting_header = False  # the reader is between requests: stopping it loses none
        self._in_flight = 0  # requests read whose replies have not been sent yet
        # Requests read whose reply is not queued yet, by identity (two requests may be
        # equal), with when their header arrived: what a shutdown that runs out of time
        # answers with ESHUTDOWN.
        self._unanswered: dict[int, tuple[Request, float]] | None = {}  # None once refused
        self._answered = trio.lowlevel.ParkingLot()
        # The replies queued, each whole, and what they release once sent.
        self._outbox: list[Buffer] = []
        self._outbox_holds: list[Held] = []
        self._outbox_replies = 0
        # Transfers `_started` that have completed, with their statuses: the writer
        # answers all of them in one pass before it sends.
        self._completed: list[tuple[tuple[Request, Taken], int]] = []
        self._outbox_filled = trio.lowlevel.ParkingLot()  # the writer, waiting for either
        self._handlers: trio.Nursery | None = None
        self._ended = False

    async def run(self) -> None:
        """Returns after DISC once every request in flight has been answered."""
        try:
            async with trio.open_nursery() as nursery:
                self._handlers = nursery
                nursery.start_soon(self._write_replies)
                with self.reading:
                    try:
                        await self._read_requests()
                    except ClientDisconnected as eof:
                        if eof.mid_message:
                            raise
                        # EOF between requests: answer what is in flight, as after DISC.
                while self._in_flight:
                    await self._answered.park()
                refused = self._unanswered is None
                if self._shutting_down and not refused and not self._read_only:
                    await self._flush_before_disconnect()
                nursery.cancel_scope.cancel()  # the writer, with nothing left to send
        finally:
            self._ended = True  # completions still to come have nobody to answer

    @property
    def in_flight(self) -> int:
        """Requests read and not answered yet (for metrics)."""
        return self._in_flight

    def shut_down(self) -> None:
        """Server shutdown: read no new request, answer those in flight, flush, and
        end the connection.

        The spec ("Terminating the transmission phase") has a server wait for requests
        in flight before it disconnects, and lets it hurry them with error replies.  A
        client that reconnects (QEMU's reconnect-delay, nbd-client -persist) resends
        every request it has no reply to, but hands an error reply to its guest: so
        nothing is refused here.  Requests never read (even partly received headers)
        are left to that resend.  A request whose header was read is received whole
        and served, its payload included, within the server's shutdown timeout.
        """
        self._shutting_down = True
        if self._awaiting_header:
            self.reading.cancel()

    def refuse_in_flight(self) -> None:
        """The shutdown timeout has passed: answers every request still in flight with
        ESHUTDOWN, the spec's way to hurry a shutdown.  Dropping the connection instead
        would have the client resend them elsewhere while this server may still carry
        them out, an old write landing over a newer one.  Nothing more is received."""
        self.reading.cancel()
        unanswered, self._unanswered = self._unanswered, None
        now = time.monotonic()
        for request, received in unanswered.values():
            self._queue(self._refuse(request, p.Errno.ESHUTDOWN, "the server is shutting down"), NOTHING_HELD)
            self.counters.answer(request.command, now - received)

    async def _flush_before_disconnect(self) -> None:
        """Makes the writes just answered durable before the client goes elsewhere."""
        try:
            await self._bridge.flush()
        except VolumeIOError as error:  # the client did not ask: nothing to answer it
            log.warning("flush at shutdown failed: %s", error)

    async def _read_requests(self) -> None:
        """Reads requests and starts them, for as long as the connection lasts.

        The transfers the requests of one receive start are submitted together
        (`VolumeBridge.submit_started`) before the reader waits for anything: for
        more bytes, for room, or for requests to be answered."""
        try:
            await self._read_and_start()
        finally:  # an error or a cancellation ends the reader: what it started is still submitted
            self._bridge.submit_started()

    async def _read_and_start(self) -> None:
        extended = self._agreement.extended_headers
        debug = log.isEnabledFor(logging.DEBUG)  # asked once: the level is set before serving
        receiver = self._receiver
        submit_started = self._bridge.submit_started
        layout, expected_magic = REQUEST_LAYOUTS[extended]
        new_request = partial(tuple.__new__, Request)
        while not self._shutting_down:
            # A header already buffered is taken with no coroutine: the requests one
            # receive brought are read in one go.
            header = receiver.take_unpacked(layout)
            if header is None:
                submit_started()
                self._awaiting_header = True
                try:
                    header = layout.unpack(await receiver.receive_exactly(layout.size))
                finally:
                    self._awaiting_header = False
            received = receiver.received_at  # the duration counted includes any wait here
            magic, *fields = header
            if magic != expected_magic:
                raise RemoteProtocolError(f"bad request magic {magic:#x}")
            # What Request's generated __new__ does, less its keyword handling: a third of the cost.
            request = new_request(fields)
            if debug:
                log.debug("request %s", request)
            if request.command == DISC:
                return
            if self._in_flight >= MAX_REQUESTS_IN_FLIGHT:
                submit_started()
                while self._in_flight >= MAX_REQUESTS_IN_FLIGHT:
                    await self._answered.park()
            # The export's I/O limits, before the payload is read and anything submitted:
            # a throttled client's bytes wait in its socket.
            if self._throttle.limited and (is_write := THROTTLED.get(request.command)) is not None:
                submit_started()
                await self._throttle.admit(is_write, request.length)
            self._in_flight += 1
            self._unanswered[id(request)] = (request, received)
            try:
                taken, refusal = self._take_now(request), None
                if taken is None:
                    submit_started()
                    taken, refusal = await self._receive_payload(request)
            except BaseException:
                if self._unanswered is not None:  # no ESHUTDOWN went for it: nothing will answer it
                    self._in_flight -= 1
                    del self._unanswered[id(request)]
                raise
            if refusal is not None or not self._started(request, taken):
                self._handlers.start_soon(self._handle, request, taken, refusal)
            # Its completion or its task has it now: kept here, its buffer would stay
            # alive while the next header is awaited, and after its release.
            del taken

    def _payload_length(self, request: Request) -> int:
        # The spec has WRITE set PAYLOAD_LEN under extended headers, but QEMU 10's
        # client does not, and QEMU's server reads a WRITE's payload either way: so do we.
        if request.command == WRITE or (self._agreement.extended_headers and request.flags & PAYLOAD_LEN):
            return request.length
        return 0

    def _take_now(self, request: Request) -> Taken | None:
        """What `_receive_payload` gives a READ of whole sectors, or a WRITE whose
        payload is all buffered, when the pool has room for it: taken without a
        coroutine.  None for anything else, `_receive_payload`'s to receive or refuse."""
        command, length = request.command, request.length
        if request.flags & PAYLOAD_LEN or length > self._max_payload:
            return None
        if command == READ:
            if not self._bridge.whole_sectors(request.offset, length):  # then it has a buffer of its own
                return None
        elif command != WRITE or self._receiver.buffered < length:
            return None
        held = self._buffers.take_now(length)
        if held is None:
            return None
        buffer = memoryview(held[1])
        if command == WRITE:
            self._receiver.take_into(buffer)
        return buffer, held

    async def _receive_payload(self, request: Request) -> tuple[Taken | None, RequestError | None]:
        """The request's buffer (a WRITE's payload, received; a READ's destination)
        and what it holds of the pool, or why the request is refused.

        A payload that will be refused is still consumed, so it is never parsed as
        the next header.
        """
        command = request.command
        length = self._payload_length(request)
        if length > self._max_payload:
            if self._agreement.extended_headers:
                raise RemoteProtocolError(f"payload of {length} bytes is over the maximum")
            await self._receiver.discard(length)
            return None, RequestError(p.Errno.EINVAL, f"request longer than {self._max_payload} bytes")
        if length and command != WRITE:
            await self._receiver.discard(length)
            return None, RequestError(p.Errno.EINVAL, f"{request.name} takes no payload")
        if command == WRITE:
            size, with_buffer = length, True
        elif command == READ and request.length <= self._max_payload:
            # A read of partial sectors needs a bigger buffer: the bridge makes its own.
            size, with_buffer = request.length, self._bridge.whole_sectors(request.offset, request.length)
        else:  # only counted: CACHE reads through buffers of its own
            size, with_buffer = self._cache_size(request), False
        held = (self._buffers.take(size, with_buffer) if self._buffers.fits(size)
                else await self._buffers.acquire(size, with_buffer))
        buffer = memoryview(held[1] if held[1] is not None else b"")
        if command == WRITE:
            try:
                await self._receiver.receive_into(buffer)
            except BaseException:
                self._buffers.release(held)
                raise
        return (buffer, held), None

    @staticmethod
    def _cache_size(request: Request) -> int:
        return min(request.length, CACHE_CHUNK) if request.command == CACHE else 0

    def _started(self, request: Request, taken: Taken) -> bool:
        """Starts an aligned READ or WRITE with no task of its own: its reply is made
        when its submits complete.  False when it needs a task."""
        # What `_check` would refuse, or needs a task, goes to `_handle`.
        allowed = self._direct_flags.get(request.command)
        if allowed is None or request.flags & ~allowed or request.offset + request.length > self._bridge.size:
            return False
        return self._bridge.start_transfer(
            request.offset, taken[0], request.command == WRITE, self._transferred, (request, taken))

    def _transferred(self, transfer: tuple[Request, Taken], status: int) -> None:
        """The completion of a request `_started`, in trio: left for the writer."""
        if self._ended:
            return
        completed = self._completed
        completed.append((transfer, status))
        if len(completed) == 1 and self._outbox_filled:
            self._outbox_filled.unpark_all()

    def _answer_completed(self) -> None:
        """Answers the completed transfers in one pass: one clock read and one count
        of durations per command for all of them."""
        completed, self._completed = self._completed, []
        unanswered = self._unanswered
        if unanswered is None:  # answered with ESHUTDOWN already
            self._buffers.release_all([taken[1] for (_, taken), _ in completed])
            return
        replies, outbox, holds, counters = self._replies, self._outbox, self._outbox_holds, self.counters
        now = time.monotonic()
        reads: list[float] = []  # the durations of the reads answered
        writes: list[float] = []
        read_bytes = written_bytes = 0
        for (request, taken), status in completed:
            if status:
                self._transfer_failed(request, taken, status)
                continue
            try:
                if request.command == READ:
                    outbox += replies.data(request, taken[0])
                    reads.append(now - unanswered.pop(id(request))[1])
                    read_bytes += request.length
                else:
                    outbox += replies.done(request)
                    writes.append(now - unanswered.pop(id(request))[1])
                    written_bytes += request.length
            except Exception:  # a bug fails the request, not the connection
                self._answer(request, self._internal_error(request), taken[1])
                continue
            holds.append(taken[1])
        self._outbox_replies += len(reads) + len(writes)
        counters.answer_all(READ, reads)
        counters.answer_all(WRITE, writes)
        counters.bytes_read += read_bytes
        counters.bytes_written += written_bytes

    def _transfer_failed(self, request: Request, taken: Taken, status: int) -> None:
        if self._bridge.retryable(status):
            # A refused submit was counted as an EAGAIN resubmit already; any other
            # status is a completion's, -EAGAIN included, and this is its retry.
            if status != SUBMIT_REFUSED:
                self._bridge.counters.retries += 1
            self._handlers.start_soon(self._handle, request, taken, None)  # retried there
            return
        try:
            reply = self._volume_failed(request, VolumeIOError(status))
        except Exception:
            reply = self._internal_error(request)
        self._answer(request, reply, taken[1])

    async def _handle(self, request: Request, taken: Taken | None, refusal: RequestError | None) -> None:
        buffer, held = taken or (memoryview(b""), NOTHING_HELD)
        try:
            if refusal is not None:
                raise refusal
            self._check(request)
            reply = await self._execute(request, buffer)
        except RequestError as error:
            reply = self._refuse(request, error.error, str(error))
        except VolumeIOError as error:
            reply = self._volume_failed(request, error)
        except Exception:  # a bug in serving one request fails that request, not the connection
            reply = self._internal_error(request)
        self._answer(request, reply, held)

    def _answer(self, request: Request, reply: list[Buffer], held: Held) -> None:
        if self._unanswered is None:  # answered with ESHUTDOWN already
            self._buffers.release(held)
            return
        _, received = self._unanswered.pop(id(request))
        self.counters.answer(request.command, time.monotonic() - received)
        self._queue(reply, held)

    def _queue(self, reply: list[Buffer], held: Held) -> None:
        self._outbox += reply
        self._outbox_holds.append(held)
        self._outbox_replies += 1
        # Only the first reply queued can find the writer parked: it parks with nothing to do.
        if self._outbox_replies == 1 and not self._completed and self._outbox_filled:
            self._outbox_filled.unpark_all()

    async def _write_replies(self) -> None:
        """Answers completed transfers and sends whatever replies have queued, for as
        long as the connection lasts."""
        while True:
            while not (self._outbox_replies or self._completed):
                await self._outbox_filled.park()
            if self._completed:
                self._answer_completed()
            if self._outbox_replies:
                await self._send_queued()

    async def _send_queued(self) -> None:
        """The queued replies in one go, then their buffers back to the pool (a method
        of its own: nothing of them stays referenced while the next ones are awaited)."""
        buffers, holds, sent = self._outbox, self._outbox_holds, self._outbox_replies
        self._outbox, self._outbox_holds, self._outbox_replies = [], [], 0
        await self._sender.send(buffers)
        self._buffers.release_all(holds)
        self._in_flight -= sent
        if self._answered:
            self._answered.unpark_all()

    def _volume_failed(self, request: Request, error: VolumeIOError) -> list[Buffer]:
        log.warning("%s at %d+%d failed: %s", request.name, request.offset, request.length, error)
        return self._refuse(request, NBD_ERRORS.get(error.errno, p.Errno.EIO), str(error))

    def _internal_error(self, request: Request) -> list[Buffer]:
        log.exception("%s at %d+%d failed", request.name, request.offset, request.length)
        return self._refuse(request, p.Errno.EIO, "internal server error")

    def _refuse(self, request: Request, error: p.Errno, message: str) -> list[Buffer]:
        self.counters.refuse(request.command, error)
        log.debug("refused %s at %d+%d: %s", request.name, request.offset, request.length, message)
        return self._replies.error(request, error, message)

    def _check(self, request: Request) -> None:
        """Refuses what the spec says to refuse, before anything is executed."""
        command = request.command  # a plain int: enum lookups cost on every request
        allowed = self._allowed_flags.get(command)
        if allowed is None:
            raise RequestError(p.Errno.EINVAL, f"unknown command {command}")
        if request.flags & ~allowed:
            raise RequestError(p.Errno.EINVAL, f"flags {request.flags:#x} are invalid for {request.name}")
        if request.flags & DF and not self._replies.structured:
            raise RequestError(p.Errno.EINVAL, "DF needs structured replies")
        if command in MUTATING and self._read_only:
            raise RequestError(p.Errno.EPERM, "the export is read-only")
        if command in WITH_RANGE and request.offset + request.length > self._bridge.size:
            error = p.Errno.ENOSPC if command in (WRITE, WRITE_ZEROES) else p.Errno.EINVAL
            raise RequestError(error, "request goes past the end of the export")
        if command == READ and request.length > self._max_payload:
            raise RequestError(p.Errno.EINVAL, f"read longer than {self._max_payload} bytes")
        if command == BLOCK_STATUS:
            if not self._agreement.meta_contexts:
                raise RequestError(p.Errno.EINVAL, "no metadata context was negotiated")
            if request.length == 0:
                raise RequestError(p.Errno.EINVAL, "block status of zero bytes")

    async def _execute(self, request: Request, buffer: memoryview) -> list[Buffer]:
        """Executes a checked request; `buffer` is a WRITE's payload, or where a READ
        of whole sectors lands (empty for any other)."""
        bridge, offset, length = self._bridge, request.offset, request.length
        fua = bool(request.flags & FUA)
        match request.command:
            case p.Command.READ:
                data = await bridge.read(offset, length, buffer if len(buffer) else None) if length else b""
                self.counters.bytes_read += length
                return self._replies.data(request, data)
            case p.Command.WRITE:
                if length:
                    await bridge.write(offset, buffer, fua)
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
                limit = 1 if request.flags & p.CommandFlags.REQ_ONE else MAX_EXTENTS
                return self._replies.block_status(request, [
                    (context_id, self._context_extents(name, offset, length, limit))
                    for context_id, name in self._agreement.meta_contexts.items()])
        return self._replies.done(request)


    def _context_extents(self, context: str, offset: int, length: int, limit: int) -> list[dict]:
        bridge = self._bridge
        if context == p.BASE_ALLOCATION:
            runs = ((e.length, ALLOCATION_FLAGS[e.allocated]) for e in bridge.extents(offset, length))
        elif context == p.QEMU_ALLOCATION_DEPTH:
            runs = bridge.depths(offset, length)
        else:  # negotiation offers no other kind
            since = context.removeprefix(p.QEMU_DIRTY_BITMAP)
            runs = ((e.length, DIRTY_FLAGS[e.allocated]) for e in bridge.changes(since, offset, length))
        return block_status_extents(runs, limit)


def allowed_flags(agreement: Agreement) -> dict[int, int]:
    """Command -> the flags it accepts on this connection, as plain ints.

    (On plain ints `~` complements every bit; on an IntFlag only the defined ones.)
    """
    table = {}
    for command, allowed in ALLOWED_FLAGS.items():
        if agreement.extended_headers and command == p.Command.WRITE:
            allowed |= p.CommandFlags.PAYLOAD_LEN
        if agreement.export.flags & p.TransmissionFlags.SEND_FUA:
            allowed |= p.CommandFlags.FUA  # valid on every command once advertised
        table[int(command)] = int(allowed)
    return table


# Extent flags by `Extent.allocated`, per context.
ALLOCATION_FLAGS = {True: int(p.BlockState.DATA), False: int(p.BlockState.HOLE | p.BlockState.ZERO)}
DIRTY_FLAGS = {True: p.DIRTY, False: 0}  # allocated: changed since the snapshot


def block_status_extents(runs: Iterable[tuple[int, int]], limit: int) -> list[dict]:
    """A context's descriptors from (length, flags) runs: equal neighbours merged, at
    most `limit`."""
    descriptors: list[dict] = []
    for length, state in runs:
        if descriptors and descriptors[-1]["flags"] == state:
            descriptors[-1]["length"] += length
        elif len(descriptors) == limit:
            break
        else:
            descriptors.append(dict(length=length, flags=state))
    return descriptors
