"""A small blocking NBD client written from `doc/proto.md` with `struct`.

It deliberately shares no code with pfnbd (not even its construct schemas), so the
tests built on it check pfnbd against the spec rather than against itself.  It does
what a well-behaved client does, and lets a test do what a hostile one does: every
message can be sent raw, with a wrong magic, a lying length or cut short.

Every reply it receives is checked against the spec's MUSTs for that reply (magic,
cookie, chunk rules); a violation raises `ProtocolViolation`, naming the section.
"""

from __future__ import annotations

import enum
import os
import random
import socket
import struct
import time
from collections.abc import Sequence

import attrs

# Magic numbers ("Handshake", "Request message", "... reply message" in proto.md).
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

GREETING = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK_HEADER = struct.Struct(">IHHQI")
MAX_STRING = 4096  # "Conventions": strings MUST be no longer than 4096 bytes
ERROR_BIT = 1 << 31


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = ERROR_BIT | 1
    ERR_POLICY = ERROR_BIT | 2
    ERR_INVALID = ERROR_BIT | 3
    ERR_PLATFORM = ERROR_BIT | 4
    ERR_TLS_REQD = ERROR_BIT | 5
    ERR_UNKNOWN = ERROR_BIT | 6
    ERR_SHUTDOWN = ERROR_BIT | 7
    ERR_BLOCK_SIZE_REQD = ERROR_BIT | 8
    ERR_TOO_BIG = ERROR_BIT | 9


class InfoType(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5  # extended headers only


class Chunk(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class Err(enum.IntEnum):
    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


STATE_HOLE = 1 << 0  # base:allocation
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"
REPLY_FLAG_DONE = 1 << 0


class ConnectionClosed(Exception):
    """The server closed (or reset) the connection."""


class ProtocolViolation(AssertionError):
    """The server sent something the spec forbids."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ProtocolViolation(message)


@attrs.frozen
class OptionReply:
    option: int
    type: int
    payload: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & ERROR_BIT)

    @property
    def is_final(self) -> bool:
        return self.is_error or self.type == Rep.ACK


@attrs.frozen
class Export:
    name: str
    size: int
    flags: int
    structured: bool = False
    contexts: dict[int, str] = attrs.field(factory=dict)  # id -> name, as SET_META_CONTEXT answered
    block_sizes: tuple[int, int, int] | None = None


@attrs.frozen
class Pending:
    command: int
    flags: int
    offset: int
    length: int


@attrs.define
class Reply:
    cookie: int
    error: int
    data: bytes | None = None  # READ payload, reassembled from chunks
    extents: dict[int, list[tuple[int, int]]] = attrs.field(factory=dict)  # context id -> [(length, flags)]
    message: str = ""  # from an error chunk
    content_chunks: int = 0
    covered: list[tuple[int, int]] = attrs.field(factory=list)  # READ: request-relative spans


def option_data_name(name: bytes | str) -> bytes:
    """u32 length + name, the way INFO, GO and the META_CONTEXT options start."""
    raw = name.encode() if isinstance(name, str) else name
    return struct.pack(">I", len(raw)) + raw


def info_request(name: bytes | str, requests: Sequence[int] = ()) -> bytes:
    return option_data_name(name) + struct.pack(f">H{len(requests)}H", len(requests), *requests)


def meta_context_request(name: bytes | str, queries: Sequence[str]) -> bytes:
    data = option_data_name(name) + struct.pack(">I", len(queries))
    return data + b"".join(option_data_name(query) for query in queries)


def request_header(command: int, offset: int = 0, length: int = 0, flags: int = 0,
                   cookie: int = 0, magic: int = REQUEST_MAGIC) -> bytes:
    return REQUEST.pack(magic, flags, command, cookie, offset, length)


class NbdClient:
    """One connection.  Blocking socket calls, each bounded by `timeout` seconds."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.export: Export | None = None
        self.no_zeroes = False
        self.structured = False  # NBD_OPT_STRUCTURED_REPLY was acknowledged
        self.contexts: dict[int, str] = {}  # what the last SET_META_CONTEXT selected...
        self.contexts_export: str | None = None  # ...and for which export
        self._pending: dict[int, Pending] = {}
        self._partial: dict[int, Reply] = {}
        self._cookies = iter(range(1, 1 << 62))

    @classmethod
    def unix(cls, path: os.PathLike | str, timeout: float = 10.0) -> NbdClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        return cls(sock, timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as error:
            raise ConnectionClosed(str(error)) from None

    def recv_exactly(self, n: int) -> bytes:
        chunks, missing = [], n
        while missing:
            try:
                chunk = self.sock.recv(min(missing, 1 << 20))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ConnectionClosed(f"server closed the connection {n - missing} bytes into {n}")
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def expect_disconnect(self, timeout: float = 5.0) -> bytes:
        """Waits for the server to close; returns whatever it still sent first."""
        received = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"server kept the connection open for {timeout} s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return bytes(received)
            except TimeoutError:
                raise AssertionError(f"server kept the connection open for {timeout} s") from None
            if not chunk:
                return bytes(received)
            received += chunk

    # -- handshake --------------------------------------------------------

    def handshake(self, flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> int:
        """Reads the greeting and answers with client `flags`; returns the server's flags."""
        magic, option_magic, server_flags = GREETING.unpack(self.recv_exactly(GREETING.size))
        check((magic, option_magic) == (NBDMAGIC, IHAVEOPT), f"bad greeting {magic:#x} {option_magic:#x}")
        check(server_flags & HandshakeFlag.FIXED_NEWSTYLE, "server is not fixed newstyle")
        check(not server_flags & ~(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES),
              f"server set undefined handshake flags {server_flags:#x}")
        self.no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
        self.send(struct.pack(">I", flags))
        return server_flags

    def send_option(self, option: int, data: bytes = b"", length: int | None = None,
                    magic: int = IHAVEOPT) -> None:
        self.send(OPTION_HEADER.pack(magic, option, len(data) if length is None else length) + data)

    def receive_option_reply(self, option: int) -> OptionReply:
        magic, replied_to, reply_type, length = OPTION_REPLY_HEADER.unpack(
            self.recv_exactly(OPTION_REPLY_HEADER.size))
        check(magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}")
        check(replied_to == option, f"reply to option {replied_to} while option {option} was pending")
        reply = OptionReply(replied_to, reply_type, self.recv_exactly(length))
        if reply.is_error:
            check(len(reply.payload) <= MAX_STRING, f"error message of {len(reply.payload)} bytes "
                  f"(strings MUST be no longer than {MAX_STRING} bytes, 'Conventions')")
            check(b"\0" not in reply.payload, "NUL in an error message")
            reply.payload.decode()  # UTF-8 or UnicodeDecodeError
        elif reply.type == Rep.ACK:
            check(length == 0, "NBD_REP_ACK carries data")
        return reply

    def option(self, option: int, data: bytes = b"", length: int | None = None) -> list[OptionReply]:
        """Sends one option and returns its replies, the final one last."""
        self.send_option(option, data, length)
        replies = [self.receive_option_reply(option)]
        while not replies[-1].is_final:
            replies.append(self.receive_option_reply(option))
        return replies

    def structured_reply(self) -> None:
        (reply,) = self.option(Opt.STRUCTURED_REPLY)
        check(reply.type == Rep.ACK, f"STRUCTURED_REPLY answered {reply.type:#x}")
        self.structured = True

    def set_meta_context(self, name: str, queries: Sequence[str]) -> dict[int, str]:
        """Selects contexts; returns {id: name} as the server answered."""
        self.contexts, self.contexts_export = {}, name  # a SET replaces, even when it fails
        replies = self.option(Opt.SET_META_CONTEXT, meta_context_request(name, queries))
        check(replies[-1].type == Rep.ACK, f"SET_META_CONTEXT answered {replies[-1].type:#x}")
        for reply in replies[:-1]:
            check(reply.type == Rep.META_CONTEXT, f"unexpected reply {reply.type:#x} to SET_META_CONTEXT")
            (context_id,) = struct.unpack(">I", reply.payload[:4])
            check(context_id not in self.contexts, "two contexts with one id")
            self.contexts[context_id] = reply.payload[4:].decode()
        return dict(self.contexts)

    def go(self, name: str = "", structured: bool = False, contexts: Sequence[str] = (),
           info_requests: Sequence[int] = (InfoType.BLOCK_SIZE,)) -> Export:
        """The usual road to transmission: [STRUCTURED_REPLY, SET_META_CONTEXT,] GO."""
        if structured and not self.structured:
            self.structured_reply()
        if contexts:
            self.set_meta_context(name, contexts)
        replies = self.option(Opt.GO, info_request(name, info_requests))
        check(replies[-1].type == Rep.ACK, f"GO {name!r} answered {replies[-1].type:#x}: "
              f"{replies[-1].payload[:200]!r}")
        size = flags = block_sizes = None
        for reply in replies[:-1]:
            check(reply.type == Rep.INFO, f"unexpected reply {reply.type:#x} to GO")
            (info_type,) = struct.unpack(">H", reply.payload[:2])
            if info_type == InfoType.EXPORT:
                check(len(reply.payload) == 12, "NBD_INFO_EXPORT length is not 12")
                size, flags = struct.unpack(">QH", reply.payload[2:])
            elif info_type == InfoType.BLOCK_SIZE:
                check(len(reply.payload) == 14, "NBD_INFO_BLOCK_SIZE length is not 14")
                block_sizes = struct.unpack(">III", reply.payload[2:])
        check(size is not None, "GO succeeded without NBD_INFO_EXPORT")
        return self._enter_transmission(Export(name, size, flags, block_sizes=block_sizes))

    def export_name(self, name: str) -> Export:
        self.send_option(Opt.EXPORT_NAME, name.encode())
        reply = self.recv_exactly(10 if self.no_zeroes else 134)
        size, flags = struct.unpack(">QH", reply[:10])
        check(reply[10:] == bytes(len(reply) - 10), "EXPORT_NAME padding is not zeros")
        return self._enter_transmission(Export(name, size, flags))

    def _enter_transmission(self, export: Export) -> Export:
        selected = self.contexts if self.contexts_export == export.name else {}
        export = attrs.evolve(export, structured=self.structured, contexts=dict(selected))
        check(export.flags & TFlag.HAS_FLAGS, "NBD_FLAG_HAS_FLAGS is clear")
        check(bool(export.flags & TFlag.SEND_DF) <= export.structured,
              "NBD_FLAG_SEND_DF without structured replies")
        self.export = export
        return export

    # -- transmission -----------------------------------------------------

    def send_request(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
                     payload: bytes | None = None, cookie: int | None = None,
                     magic: int = REQUEST_MAGIC) -> int:
        """Sends a request (a WRITE's payload defaults to `length` zero bytes)."""
        cookie = next(self._cookies) if cookie is None else cookie
        if command == Cmd.WRITE and payload is None:
            payload = bytes(length)
        if command != Cmd.DISC:
            self._pending[cookie] = Pending(command, flags, offset, length)
        self.send(request_header(command, offset, length, flags, cookie, magic) + (payload or b""))
        return cookie

    def track(self, cookie: int, request: Pending) -> None:
        """Expects a reply to a request sent as raw bytes, and checks it as any other."""
        assert cookie not in self._pending, f"cookie {cookie:#x} is already in flight"
        self._pending[cookie] = request

    @property
    def pending(self) -> int:
        return len(self._pending)

    def receive_reply(self) -> Reply:
        """Reads messages until one request's reply is complete, and returns it."""
        while True:
            magic = self.recv_exactly(4)
            if magic == struct.pack(">I", SIMPLE_REPLY_MAGIC):
                return self._simple_reply(magic)
            check(magic == struct.pack(">I", STRUCTURED_REPLY_MAGIC), f"bad reply magic {magic.hex()}")
            check(self.export.structured, "structured reply chunk without NBD_OPT_STRUCTURED_REPLY")
            reply = self._chunk(magic)
            if reply is not None:
                return reply

    def _simple_reply(self, magic: bytes) -> Reply:
        _, error, cookie = SIMPLE_REPLY.unpack(magic + self.recv_exactly(SIMPLE_REPLY.size - 4))
        request = self._take(cookie)
        check(cookie not in self._partial, "simple reply after structured chunks of the same request")
        if request.command == Cmd.READ:
            check(not self.export.structured,
                  "simple reply to NBD_CMD_READ under structured replies ('Structured reply chunk message')")
        data = None
        if request.command == Cmd.READ and error == 0:
            data = self.recv_exactly(request.length)
        return Reply(cookie, error, data)

    def _take(self, cookie: int) -> Pending:
        check(cookie in self._pending, f"reply for cookie {cookie:#x}, which is not in flight")
        return self._pending[cookie] if cookie in self._partial else self._pending.pop(cookie)

    def _chunk(self, magic: bytes) -> Reply | None:
        _, flags, chunk_type, cookie, length = CHUNK_HEADER.unpack(
            magic + self.recv_exactly(CHUNK_HEADER.size - 4))
        payload = self.recv_exactly(length)
        check(cookie in self._pending, f"chunk for cookie {cookie:#x}, which is not in flight")
        request = self._pending[cookie]
        reply = self._partial.setdefault(cookie, Reply(cookie, 0))
        if request.command == Cmd.READ and reply.data is None:
            reply.data = bytearray(request.length)
        _apply_chunk(reply, request, chunk_type, payload)
        if not flags & REPLY_FLAG_DONE:
            check(chunk_type != Chunk.NONE, "NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")
            return None
        del self._partial[cookie], self._pending[cookie]
        _check_complete(reply, request)
        return reply

    def request(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes | None = None) -> Reply:
        """One request and its reply, nothing else in flight."""
        assert not self._pending, "request() with other requests in flight"
        cookie = self.send_request(command, offset, length, flags, payload)
        reply = self.receive_reply()
        check(reply.cookie == cookie, "reply to a request never sent")
        return reply

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        reply = self.request(Cmd.READ, offset, length, flags)
        assert reply.error == 0, f"READ {offset}+{length} failed: {Err(reply.error)!r} {reply.message}"
        return bytes(reply.data)

    def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        reply = self.request(Cmd.WRITE, offset, len(data), flags, data)
        assert reply.error == 0, f"WRITE {offset}+{len(data)} failed: {Err(reply.error)!r} {reply.message}"

    def collect(self) -> dict[int, Reply]:
        """Replies to everything in flight, by cookie."""
        replies = {}
        while self._pending:
            reply = self.receive_reply()
            replies[reply.cookie] = reply
        return replies

    def disconnect(self) -> None:
        """NBD_CMD_DISC, then wait for the server to close."""
        self.send_request(Cmd.DISC)
        self.expect_disconnect()
        self.close()


def _apply_chunk(reply: Reply, request: Pending, chunk_type: int, payload: bytes) -> None:
    """Folds one chunk into `reply`, checking the rules of 'Structured reply types'."""
    if chunk_type in (Chunk.ERROR, Chunk.ERROR_OFFSET):
        check(len(payload) >= 6, "error chunk shorter than 6 bytes")
        error, message_length = struct.unpack(">IH", payload[:6])
        tail = 8 if chunk_type == Chunk.ERROR_OFFSET else 0
        check(len(payload) == 6 + message_length + tail, "error chunk length disagrees with its message")
        check(error != 0, "error chunk with error 0")
        message = payload[6 : 6 + message_length]
        check(b"\0" not in message, "NUL in an error message")
        reply.message = message.decode()
        reply.error = reply.error or error
        return
    check(chunk_type != Chunk.NONE or not payload, "NBD_REPLY_TYPE_NONE with a payload")
    if chunk_type == Chunk.NONE:
        return
    if chunk_type in (Chunk.OFFSET_DATA, Chunk.OFFSET_HOLE):
        check(request.command == Cmd.READ, f"read chunk in the reply to command {request.command}")
        if chunk_type == Chunk.OFFSET_DATA:
            check(len(payload) >= 9, "OFFSET_DATA chunk without data")
            (offset,) = struct.unpack(">Q", payload[:8])
            data, size = payload[8:], len(payload) - 8
        else:
            check(len(payload) == 12, "OFFSET_HOLE chunk length is not 12")
            offset, size = struct.unpack(">QI", payload)
            check(size > 0, "OFFSET_HOLE of size 0")
            data = bytes(size)
        start = offset - request.offset
        check(0 <= start and start + size <= request.length, "read chunk outside the request")
        check(all(start + size <= s or e <= start for s, e in reply.covered), "overlapping read chunks")
        reply.covered.append((start, start + size))
        reply.data[start : start + size] = data
        reply.content_chunks += 1
        return
    if chunk_type == Chunk.BLOCK_STATUS:
        check(request.command == Cmd.BLOCK_STATUS, "BLOCK_STATUS chunk in the reply to another command")
        check(len(payload) >= 12 and (len(payload) - 4) % 8 == 0, "BLOCK_STATUS chunk length is not 4+8n")
        (context_id,) = struct.unpack(">I", payload[:4])
        check(context_id not in reply.extents, "two BLOCK_STATUS chunks for one context")
        extents = list(struct.iter_unpack(">II", payload[4:]))
        check(all(length > 0 for length, _ in extents), "zero-length extent")
        reply.extents[context_id] = extents
        return
    raise ProtocolViolation(f"unknown chunk type {chunk_type:#x}")


def _check_complete(reply: Reply, request: Pending) -> None:
    if request.command == Cmd.READ:
        if reply.error == 0:
            covered = sum(e - s for s, e in reply.covered)
            check(covered == request.length, f"successful READ covers {covered} of {request.length} bytes")
        if request.flags & CmdFlag.DF:
            check(reply.content_chunks <= 1, "DF read answered with more than one content chunk")
        reply.data = bytes(reply.data) if reply.error == 0 else None
    if request.command == Cmd.BLOCK_STATUS and reply.error == 0:
        check(reply.extents, "successful BLOCK_STATUS without a BLOCK_STATUS chunk")
        for extents in reply.extents.values():
            if request.flags & CmdFlag.REQ_ONE:
                check(len(extents) == 1, "REQ_ONE answered with several extents")
                check(extents[0][0] <= request.length, "REQ_ONE extent longer than the request")


def pattern(seed: int, length: int) -> bytes:
    """Reproducible data no two tests share by accident."""
    return random.Random(seed).randbytes(length)
