"""The NBD wire format: constants and construct schemas, no I/O.

Every structure the fixed-newstyle protocol puts on the wire is one schema here; the
schema both builds and parses it.  The layers above import from here and never
spell a magic number or a field layout themselves.  Names follow `doc/proto.md`
with the `NBD_` prefix (and the family prefix) dropped: `NBD_OPT_GO` is `Option.GO`.
"""

from __future__ import annotations

import enum
import struct

from construct import (
    Bytes,
    Const,
    FormatField,
    GreedyBytes,
    GreedyRange,
    GreedyString,
    If,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    Padding,
    PrefixedArray,
    Struct,
    Switch,
    Terminated,
    this,
)

# Magic numbers.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# Sizes the spec fixes.
EXPORT_NAME_PADDING = 124
MAX_STRING_LENGTH = 4096  # names and descriptions: "SHOULD NOT exceed 4096 bytes"
SECTOR = 512


class HandshakeFlags(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlags(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Option(enum.IntEnum):
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
    EXTENDED_HEADERS = 11


_REP_ERROR = 1 << 31


class OptionReply(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERROR | 1
    ERR_POLICY = _REP_ERROR | 2
    ERR_INVALID = _REP_ERROR | 3
    ERR_PLATFORM = _REP_ERROR | 4
    ERR_TLS_REQD = _REP_ERROR | 5
    ERR_UNKNOWN = _REP_ERROR | 6
    ERR_SHUTDOWN = _REP_ERROR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERROR | 8
    ERR_TOO_BIG = _REP_ERROR | 9
    ERR_EXT_HEADER_REQD = _REP_ERROR | 10

    @property
    def is_error(self) -> bool:
        return bool(self & _REP_ERROR)


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlags(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlags(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlags(enum.IntFlag):
    DONE = 1 << 0


class ChunkType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class Errno(enum.IntEnum):
    """Error values on the wire (they match Linux errno numbers, not the host's)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class BlockState(enum.IntFlag):
    """Extent flags of the `base:allocation` metadata context."""

    DATA = 0
    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"
# QEMU's namespace: `qemu:dirty-bitmap:NAME` has one extent flag, bit 0 set where
# the bitmap is dirty.
QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"
DIRTY = 1 << 0
# `qemu:allocation-depth`: each extent's flags are the depth in the backing chain its
# data comes from, 1 for the export's own layer, 0 where no layer has it.
QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"

# ---------------------------------------------------------------------------
# Handshake.

greeting = Struct(
    "magic" / Const(NBDMAGIC, Int64ub),
    "option_magic" / Const(IHAVEOPT, Int64ub),
    "flags" / Int16ub,
)

client_flags = Struct("flags" / Int32ub)

option_header = Struct(
    "magic" / Int64ub,  # checked by the caller: a bad magic is a protocol error, not a parse error
    "option" / Int32ub,
    "length" / Int32ub,
)

option_reply_header = Struct(
    "magic" / Const(OPTION_REPLY_MAGIC, Int64ub),
    "option" / Int32ub,
    "type" / Int32ub,
    "length" / Int32ub,
)

# The reply to NBD_OPT_EXPORT_NAME: build with `padded=True` unless both sides agreed
# on NO_ZEROES.
export_name_reply = Struct(
    "size" / Int64ub,
    "flags" / Int16ub,
    If(this._params.padded, Padding(EXPORT_NAME_PADDING)),
)

# Option request payloads.  Each ends in Terminated: an option whose length
# disagrees with its content is invalid, never silently accepted.
name = PascalString(Int32ub, "utf8")

info_request = Struct(
    "name" / name,
    "requests" / PrefixedArray(Int16ub, Int16ub),
    Terminated,
)

meta_context_request = Struct(
    "name" / name,
    "queries" / PrefixedArray(Int32ub, PascalString(Int32ub, "utf8")),
    Terminated,
)

# Option reply payloads.
server_reply = Struct(
    "name" / name,
    "description" / GreedyString("utf8"),
)

info_reply = Struct(
    "type" / Int16ub,
    "info"
    / Switch(
        this.type,
        {
            Info.EXPORT: Struct("size" / Int64ub, "flags" / Int16ub),
            Info.NAME: Struct("name" / GreedyString("utf8")),
            Info.DESCRIPTION: Struct("description" / GreedyString("utf8")),
            Info.BLOCK_SIZE: Struct(
                "minimum" / Int32ub, "preferred" / Int32ub, "maximum" / Int32ub
            ),
        },
    ),
)

meta_context_reply = Struct(
    "context_id" / Int32ub,
    "name" / GreedyString("utf8"),
)

# ---------------------------------------------------------------------------
# Transmission.

request = Struct(
    "magic" / Int32ub,  # checked by the caller, see option_header
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int32ub,
)

# With NBD_OPT_EXTENDED_HEADERS: the length is 64 bits, a payload length when the
# PAYLOAD_LEN flag is set and an effect length otherwise.
extended_request = Struct(
    "magic" / Int32ub,
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int64ub,
)

simple_reply = Struct(
    "magic" / Const(SIMPLE_REPLY_MAGIC, Int32ub),
    "error" / Int32ub,
    "cookie" / Int64ub,
)

chunk_header = Struct(
    "magic" / Const(STRUCTURED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "length" / Int32ub,
)

# Every reply under extended headers: the offset echoes the request's.
extended_chunk_header = Struct(
    "magic" / Const(EXTENDED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int64ub,
)

extent = Struct("length" / Int32ub, "flags" / Int32ub)
extent_ext = Struct("length" / Int64ub, "flags" / Int64ub)

# Chunk payloads by type.  OFFSET_DATA's payload is its offset followed by the data;
# the writer sends the data as a separate buffer, so only the offset is a schema.
chunk_payloads = {
    ChunkType.NONE: Struct(),
    ChunkType.OFFSET_DATA: Struct("offset" / Int64ub, "data" / GreedyBytes),
    ChunkType.OFFSET_HOLE: Struct("offset" / Int64ub, "size" / Int32ub),
    ChunkType.BLOCK_STATUS: Struct(
        "context_id" / Int32ub, "extents" / GreedyRange(extent)
    ),
    ChunkType.BLOCK_STATUS_EXT: Struct(
        "context_id" / Int32ub, "extents" / PrefixedArray(Int32ub, extent_ext)
    ),
    ChunkType.ERROR: Struct("error" / Int32ub, "message" / PascalString(Int16ub, "utf8")),
    ChunkType.ERROR_OFFSET: Struct(
        "error" / Int32ub,
        "message" / PascalString(Int16ub, "utf8"),
        "offset" / Int64ub,
    ),
}

offset_data_prefix = Struct("offset" / Int64ub)
# An OFFSET_DATA chunk's header with the offset its payload starts with: the reply to
# nearly every READ, packed in one go.
offset_data_head = Struct(*chunk_header.subcons, *offset_data_prefix.subcons)

# A whole structured reply chunk, header and payload: what a client parses.
structured_chunk = Struct("header" / chunk_header, "payload" / Bytes(this.header.length))
extended_chunk = Struct("header" / extended_chunk_header, "payload" / Bytes(this.header.length))


def fixed_layout(schema: Struct) -> struct.Struct:
    """The `struct` form of a schema of big-endian integer fields (constants included):
    the per-request path packs and unpacks with it, some thirty times faster than
    construct.  Its values are the schema's fields in order; tests check both agree."""
    formats = []
    for field in schema.subcons:
        kind = field.subcon.subcon if isinstance(field.subcon, Const) else field.subcon
        if not isinstance(kind, FormatField) or not kind.fmtstr.startswith(">"):
            raise TypeError(f"field {field.name!r} is not a big-endian integer")
        formats.append(kind.fmtstr[1:])
    return struct.Struct(">" + "".join(formats))


# The schemas of the per-request path in `struct` form.
request_layout = fixed_layout(request)
extended_request_layout = fixed_layout(extended_request)
simple_reply_layout = fixed_layout(simple_reply)
chunk_header_layout = fixed_layout(chunk_header)
extended_chunk_header_layout = fixed_layout(extended_chunk_header)
offset_data_prefix_layout = fixed_layout(offset_data_prefix)
offset_data_head_layout = fixed_layout(offset_data_head)
