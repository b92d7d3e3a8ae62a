"""Extended headers (NBD_OPT_EXTENDED_HEADERS): QEMU 10 asks for them first.

QEMU 10's qemu-io/qemu-img come from bookworm-backports, unpacked by
scripts/install-deps beside Debian 12's QEMU 7.2; a raw client checks the rules
QEMU does not exercise.
"""

import os
import socket
import struct
from pathlib import Path

import pytest

from conftest import run

QEMU10 = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pfnbd/qemu-10/usr/bin"

# Wire constants spelled out here, not imported from pfnbd: the test checks the
# server against the spec, not against its own tables.
NBDMAGIC, IHAVEOPT, OPT_REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
OPT_EXPORT_NAME, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 1, 7, 8, 10, 11
REP_ACK, REP_META_CONTEXT, REP_ERR_EXT_HEADER_REQD = 1, 4, 0x8000000A
EXTENDED_REQUEST_MAGIC, EXTENDED_REPLY_MAGIC = 0x21E41C71, 0x6E8A278C
CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_BLOCK_STATUS = 0, 1, 3, 4, 7
FLAG_PAYLOAD_LEN = 1 << 5
REPLY_NONE, REPLY_OFFSET_DATA, REPLY_BLOCK_STATUS_EXT, REPLY_ERROR = 0, 1, 6, 0x8001
EINVAL = 22


def qemu10(tool: str) -> str:
    path = QEMU10 / tool
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/install-deps")
    return str(path)


def qemu_io(uri: str, *commands: str) -> str:
    args = [qemu10("qemu-io"), "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    out = run(*args).stdout
    assert "failed" not in out and "error" not in out.lower(), out
    return out


def test_qemu10_negotiates_extended_headers_and_moves_data(server):
    qemu_io(server.uri(), "write -P 0xab 0 1M", "write -P 0x5a 1 1", "write -z -u 2M 1M",
            "write -z 4M 64k", "discard 0 64k", "flush", "aio_write -P 0x11 8M 64k", "aio_flush")
    qemu_io(server.uri(), "read -P 0 0 64k", "read -P 0xab 64k 960k", "read -P 0 2M 1M",
            "read -P 0 4M 64k", "read -P 0x11 8M 64k")
    assert "extended" in server.log()  # the connection log line names the reply mode


def test_qemu10_map_convert_and_compare(server, tmp_path):
    source = tmp_path / "source.raw"
    with open(source, "wb") as f:
        f.truncate(64 << 20)
        f.seek(5 << 20)
        f.write(os.urandom(3 << 20))
    run(qemu10("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", str(source), server.uri())
    assert run(qemu10("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(source),
               server.uri(), check=False).returncode == 0
    mapped = run(qemu10("qemu-img"), "map", "--output=json", "-f", "raw", server.uri()).stdout
    assert '"data": true' in mapped and '"data": false' in mapped


class RawClient:
    """Just enough of a client to negotiate extended headers and check replies."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        magic, opt_magic, _ = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        self.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "server closed the connection"
            data += chunk
        return data

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, echoed, kind, length = struct.unpack(">QIII", self.recv(20))
            assert (magic, echoed) == (OPT_REPLY_MAGIC, option)
            replies.append((kind, self.recv(length)))
            if kind == REP_ACK or kind & 0x80000000:
                return replies

    def go(self, name: bytes = b"test_v1", queries: tuple[bytes, ...] = (b"base:allocation",)) -> dict[bytes, int]:
        """Selects the meta contexts `queries` name and enters transmission: name -> id."""
        meta = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        meta += b"".join(struct.pack(">I", len(query)) + query for query in queries)
        replies = self.option(OPT_SET_META_CONTEXT, meta)
        assert [kind for kind, _ in replies] == [REP_META_CONTEXT] * len(queries) + [REP_ACK], replies
        selected = {payload[4:]: struct.unpack(">I", payload[:4])[0] for _, payload in replies[:-1]}
        replies = self.option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        assert replies[-1][0] == REP_ACK
        return selected

    def request(self, command: int, offset: int, length: int, cookie: int, flags: int = 0,
                payload: bytes = b"") -> tuple[int, int, int, int, int, bytes]:
        self.sock.sendall(struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, command, cookie,
                                      offset, length) + payload)
        return self.reply()

    def reply(self) -> tuple[int, int, int, int, int, bytes]:
        magic, flags, kind, cookie, offset, length = struct.unpack(">IHHQQQ", self.recv(32))
        assert magic == EXTENDED_REPLY_MAGIC  # never a simple reply under extended headers
        return flags, kind, cookie, offset, length, self.recv(length)


@pytest.fixture
def raw(server):
    client = RawClient(server.socket)
    assert client.option(OPT_EXTENDED_HEADERS) == [(REP_ACK, b"")]
    yield client
    client.sock.close()


def test_structured_reply_after_extended_headers_is_refused(raw):
    ((kind, _),) = raw.option(OPT_STRUCTURED_REPLY)
    assert kind == REP_ERR_EXT_HEADER_REQD


def test_export_name_after_extended_headers_drops_the_client(raw):
    raw.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 7) + b"test_v1")
    assert raw.sock.recv(1) == b""


def test_every_reply_is_an_extended_chunk_echoing_the_offset(raw):
    raw.go()
    data = os.urandom(8192)
    flags, kind, cookie, offset, length, _ = raw.request(CMD_WRITE, 4096, len(data), 1, FLAG_PAYLOAD_LEN, data)
    assert (flags & 1, kind, cookie, offset, length) == (1, REPLY_NONE, 1, 4096, 0)
    flags, kind, cookie, offset, _, payload = raw.request(CMD_READ, 4096, 8192, 2)
    assert (kind, cookie, offset) == (REPLY_OFFSET_DATA, 2, 4096)
    assert struct.unpack(">Q", payload[:8])[0] == 4096 and payload[8:] == data
    assert raw.request(CMD_FLUSH, 0, 0, 3)[1] == REPLY_NONE


def test_block_status_ext_with_a_64_bit_effect_length(raw):
    raw.go()
    raw.request(CMD_WRITE, 1 << 20, 4096, 1, FLAG_PAYLOAD_LEN, b"\1" * 4096)
    raw.request(CMD_TRIM, 0, 1 << 20, 2)
    _, kind, _, offset, _, payload = raw.request(CMD_BLOCK_STATUS, 0, 64 << 20, 3)
    assert (kind, offset) == (REPLY_BLOCK_STATUS_EXT, 0)
    context_id, count = struct.unpack(">II", payload[:8])
    extents = [struct.unpack(">QQ", payload[8 + 16 * i: 24 + 16 * i]) for i in range(count)]
    assert len(payload) == 8 + 16 * count
    assert extents[0] == (1 << 20, 3)  # HOLE | ZERO
    assert extents[1] == (4096, 0)  # data
    assert sum(length for length, _ in extents) == 64 << 20


def test_payload_on_a_command_without_one_is_consumed_and_refused(raw):
    raw.go()
    junk = struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, 0, CMD_READ, 99, 0, 512)  # looks like a header
    _, kind, cookie, _, _, payload = raw.request(CMD_FLUSH, 0, len(junk), 1, FLAG_PAYLOAD_LEN, junk)
    assert (kind, cookie) == (REPLY_ERROR, 1)
    assert struct.unpack(">I", payload[:4])[0] == EINVAL
    _, kind, cookie, *_ = raw.request(CMD_READ, 0, 512, 2)  # the junk was not taken for a request
    assert (kind, cookie) == (REPLY_OFFSET_DATA, 2)


def test_oversized_payload_drops_the_client(raw, server):
    raw.go()
    raw.sock.sendall(struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, FLAG_PAYLOAD_LEN, CMD_WRITE,
                                 1, 0, (32 << 20) + 512))
    assert raw.sock.recv(1) == b""
    RawClient(server.socket).sock.close()  # and the server goes on serving
