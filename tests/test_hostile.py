"""Hostile clients on raw sockets: every malformed input of issue 4 gets the answer
`doc/proto.md` gives it, and no client can take the server or anyone's data down.

One `pfnbd serve` process takes the whole abuse (so its peak memory covers all of it),
over its Unix socket.  The client is `fuzz/nbdwire.py`, written from the spec with
`struct` and sharing no code with pfnbd.  Each test names the spec section it checks.

Invariants checked after each case:
* after an error reply, the same connection still works: a READ returns the right data;
* after a forced disconnect, another client is served and its data is untouched.

Where pfnbd is wrong today, the test states the spec's answer and is marked
`xfail(strict=True)` with the bug; whoever fixes the bug removes the marker.
"""

from __future__ import annotations

import itertools
import os
import resource
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Cli, Server, pfnbd_command, wait_for_socket
from fuzz.nbdwire import (
    BASE_ALLOCATION,
    IHAVEOPT,
    NBDMAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    Cmd,
    CmdFlag,
    ConnectionClosed,
    Err,
    HandshakeFlag,
    InfoType,
    NbdClient,
    Opt,
    Rep,
    TFlag,
    info_request,
    meta_context_request,
    option_data_name,
    pattern,
    request_header,
)
from fuzz.reporting import report

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB  # test_v1; larger than the maximum payload, so "too long" is not "out of bounds"
OTHER_SIZE = 1 * MiB
MAX_PAYLOAD = 32 * MiB  # advertised in NBD_INFO_BLOCK_SIZE (checked below)
PATTERN = pattern(4, 64 * KiB)  # written at offset 0 once; no test writes there
BYSTANDER = 1 * MiB  # where the other client of `assert_others_served` writes
SCRATCH_START, SCRATCH_END, SCRATCH_SIZE = 2 * MiB, 24 * MiB, 128 * KiB
BIG_RANGE = (24 * MiB, SIZE)  # 40 MiB, for TRIM/WRITE_ZEROES longer than the maximum payload
PEAK_RSS_LIMIT = 160 * MiB  # measured ~50 MiB; a connection may hold 64 MiB in flight
EXTENDED_REQUEST_MAGIC = 0x21E41C71  # extended headers, never negotiated here

WRITING = (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM)
WITH_RANGE = (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS)


def memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and VmPeak (peak virtual size) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmPeak"):
            fields[key] = int(value.split()[0]) * KiB
    return fields


@pytest.fixture(scope="module")
def nbd_server(tmp_path_factory, request):
    """`pfnbd serve` with test_v1 (64 MiB, PATTERN at 0) and other (1 MiB), for the module."""
    directory = tmp_path_factory.mktemp("hostile")
    cli = Cli(directory / "data")
    cli.run("volume", "create", "test_v1", "--size", str(SIZE))
    cli.run("volume", "create", "other", "--size", str(OTHER_SIZE))
    sock, log_path = directory / "nbd.sock", directory / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            pfnbd_command("serve", "--socket", str(sock), "--volume", "test_v1", "--volume", "other"),
            env=cli.env, stdout=log, stderr=subprocess.STDOUT,
        )
    wait_for_socket(process, sock, log_path)
    server = Server(process=process, log_path=log_path, socket=sock)
    try:
        with NbdClient.unix(sock) as seeder:
            seeder.handshake()
            export = seeder.go("test_v1")
            assert export.block_sizes == (512, 4096, MAX_PAYLOAD), export
            seeder.write(0, PATTERN)
            seeder.disconnect()
        yield server
        assert process.poll() is None, f"pfnbd serve died under abuse:\n{server.log()}"
        peak = memory(process.pid)["VmHWM"]
    finally:
        if process.poll() is None:
            code = server.stop()
            assert code == 0, f"pfnbd serve exited {code} on SIGTERM:\n{server.log()}"
    report(request.config, f"pfnbd serve peak RSS under test_hostile: {peak / MiB:.1f} MiB")
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / MiB:.1f} MiB under abuse"


_scratch_regions = itertools.count(SCRATCH_START, SCRATCH_SIZE)


@pytest.fixture
def scratch() -> int:
    """A region of test_v1 that only the current test writes to."""
    offset = next(_scratch_regions)
    assert offset + SCRATCH_SIZE <= SCRATCH_END, "out of scratch regions: raise SCRATCH_END"
    return offset


class Clients:
    """Opens connections to the server and closes them at teardown."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._open: list[NbdClient] = []

    def raw(self) -> NbdClient:
        client = NbdClient.unix(self.server.socket)
        self._open.append(client)
        return client

    def haggling(self, flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> NbdClient:
        client = self.raw()
        client.handshake(flags)
        return client

    def transmission(self, structured: bool = True, contexts=(BASE_ALLOCATION,),
                     export: str = "test_v1") -> NbdClient:
        client = self.haggling()
        client.go(export, structured, contexts if structured else ())
        return client

    def close(self) -> None:
        for client in self._open:
            client.close()


@pytest.fixture
def clients(nbd_server):
    opened = Clients(nbd_server)
    yield opened
    opened.close()


def assert_alive(client: NbdClient) -> None:
    """The connection still works after an error: a READ returns the right data."""
    assert client.pending == 0
    assert client.read(4 * KiB, 8 * KiB) == PATTERN[4 * KiB : 12 * KiB]


def assert_haggling_goes_on(client: NbdClient) -> None:
    """Option haggling still works: GO succeeds and a READ returns the right data."""
    client.go("test_v1")
    assert_alive(client)


def assert_others_served(server: Server) -> None:
    """Another client is served and nothing it owns was touched."""
    assert server.process.poll() is None, f"pfnbd serve died:\n{server.log()}"
    with NbdClient.unix(server.socket) as other:
        other.handshake()
        other.go("test_v1", structured=True)
        assert other.read(0, len(PATTERN)) == PATTERN
        data = os.urandom(4 * KiB)
        other.write(BYSTANDER, data)
        assert other.read(BYSTANDER, len(data)) == data
        other.disconnect()


def assert_dropped(client: NbdClient, server: Server) -> None:
    """The server hard-disconnects this client and keeps serving everyone else."""
    client.expect_disconnect()
    assert_others_served(server)


def expect_error(reply, error: Err) -> None:
    assert reply.error == error, f"expected {error!r}, got {reply.error} {reply.message!r}"


# ---------------------------------------------------------------------------
# Greeting: the client's flags ("Client flags": unknown or unadvertised -> drop).

@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not an NBD client at all
    struct.pack(">QII", IHAVEOPT, Opt.GO, 0),  # an option before the flags
    b"\xff\xff\xff\xff",
], ids=["http", "option-before-flags", "all-ones"])
def test_garbage_instead_of_client_flags_is_dropped(clients, nbd_server, garbage):
    client = clients.raw()
    client.recv_exactly(18)
    client.send(garbage)
    assert_dropped(client, nbd_server)


@pytest.mark.parametrize("flags", [
    HandshakeFlag.FIXED_NEWSTYLE | 1 << 2,
    HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES | 1 << 31,
    HandshakeFlag.FIXED_NEWSTYLE | 0xFF00,
], ids=["bit2", "bit31", "bits8-15"])
def test_unknown_client_flags_are_dropped(clients, nbd_server, flags):
    # Regression: `flags & ~known` on an IntFlag never fired (~ keeps only defined bits).
    client = clients.raw()
    client.handshake(flags)
    assert_dropped(client, nbd_server)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_advertised_no_zeroes_flag_is_honoured(clients, no_zeroes):
    """NO_ZEROES is advertised, so a client may set it ("Handshake flags")."""
    flags = HandshakeFlag.FIXED_NEWSTYLE | (HandshakeFlag.NO_ZEROES if no_zeroes else 0)
    client = clients.raw()
    assert client.handshake(flags) & HandshakeFlag.NO_ZEROES
    export = client.export_name("test_v1")  # reads 10 or 134 bytes, padding checked
    assert export.size == SIZE
    assert_alive(client)


def test_client_vanishing_mid_flags_leaves_server_serving(clients, nbd_server):
    client = clients.raw()
    client.recv_exactly(18)
    client.send(b"\x00\x00")
    client.close()
    assert_others_served(nbd_server)


# ---------------------------------------------------------------------------
# Option haggling.


@pytest.mark.parametrize("magic", [0, NBDMAGIC, IHAVEOPT ^ 1, REQUEST_MAGIC], ids=hex)
def test_bad_option_magic_is_dropped(clients, nbd_server, magic):
    client = clients.haggling()
    client.send_option(Opt.LIST, magic=magic)
    assert_dropped(client, nbd_server)


@pytest.mark.parametrize("option", [0, Opt.PEEK_EXPORT, 12, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF], ids=hex)
@pytest.mark.parametrize("data", [b"", b"some option data"], ids=["empty", "with-data"])
def test_unknown_option_gets_err_unsup_and_haggling_goes_on(clients, option, data):
    """Baseline: unknown options get NBD_REP_ERR_UNSUP and the next message is parsed."""
    client = clients.haggling()
    (reply,) = client.option(option, data)
    assert reply.type == Rep.ERR_UNSUP, reply
    assert_haggling_goes_on(client)


def test_long_unknown_option_gets_err_unsup(clients):
    """Longer than the server buffers (64 KiB), still unknown: Baseline wants ERR_UNSUP."""
    client = clients.haggling()
    (reply,) = client.option(0x1234, bytes(65 * KiB))
    assert reply.type == Rep.ERR_UNSUP, reply
    assert_haggling_goes_on(client)


def test_starttls_without_tls_gets_policy_or_unsup(clients):
    """NOTLS mode: NBD_OPT_STARTTLS MUST get NBD_REP_ERR_POLICY or NBD_REP_ERR_UNSUP."""
    client = clients.haggling()
    (reply,) = client.option(Opt.STARTTLS)
    assert reply.type in (Rep.ERR_POLICY, Rep.ERR_UNSUP), reply
    assert_haggling_goes_on(client)


@pytest.mark.parametrize("option", [Opt.LIST, Opt.STRUCTURED_REPLY], ids=lambda o: o.name)
def test_options_that_carry_no_data_refuse_data(clients, option):
    """NBD_OPT_LIST and NBD_OPT_STRUCTURED_REPLY with data: NBD_REP_ERR_INVALID."""
    client = clients.haggling()
    (reply,) = client.option(option, b"\x00\x00\x00\x00")
    assert reply.type == Rep.ERR_INVALID, reply
    # The refused STRUCTURED_REPLY enabled nothing: GO without it gets simple replies
    # and no DF; a READ still works (the client rejects a chunk it did not negotiate).
    export = client.go("test_v1")
    assert not export.flags & TFlag.SEND_DF
    assert_alive(client)


def test_list_after_refused_list_names_every_export(clients):
    client = clients.haggling()
    assert client.option(Opt.LIST, b"x")[-1].type == Rep.ERR_INVALID
    replies = client.option(Opt.LIST)
    assert replies[-1].type == Rep.ACK
    names = set()
    for reply in replies[:-1]:
        assert reply.type == Rep.SERVER
        (length,) = struct.unpack(">I", reply.payload[:4])
        assert length <= len(reply.payload) - 4
        names.add(reply.payload[4 : 4 + length].decode())
    assert names == {"test_v1", "other"}


def test_set_meta_context_before_structured_reply_is_invalid(clients):
    """SET_META_CONTEXT MUST NOT precede STRUCTURED_REPLY: SHOULD get ERR_INVALID, and
    selects nothing, so BLOCK_STATUS later is EINVAL."""
    client = clients.haggling()
    (reply,) = client.option(Opt.SET_META_CONTEXT, meta_context_request("test_v1", [BASE_ALLOCATION]))
    assert reply.type == Rep.ERR_INVALID, reply
    client.go("test_v1", structured=True)
    expect_error(client.request(Cmd.BLOCK_STATUS, 0, 4096), Err.EINVAL)
    assert_alive(client)


def _go_data(name: bytes, count: int, requests: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", count) + requests


# Option payloads whose lengths disagree with their content.  Each entry: option,
# data, whether STRUCTURED_REPLY must come first.  proto.md: GO/INFO name length "MUST
# be no larger than the option data length - 6"; META_CONTEXT "a query length that
# would require reading beyond the original length ... MUST fail with ERR_INVALID".
MALFORMED_OPTIONS = {
    "go-trailing-byte": (Opt.GO, info_request("test_v1") + b"\0", False),
    "info-trailing-bytes": (Opt.INFO, info_request("test_v1", [InfoType.NAME]) + b"xyz", False),
    "go-too-short-for-header": (Opt.GO, b"\0\0\0", False),
    "go-no-info-count": (Opt.GO, option_data_name("test_v1"), False),
    "go-info-count-past-end": (Opt.GO, _go_data(b"test_v1", 3, struct.pack(">H", 3)), False),
    "go-name-length-past-end": (Opt.GO, struct.pack(">I", 1000) + b"test_v1\0\0", False),
    "go-name-length-max": (Opt.GO, struct.pack(">I", 0xFFFFFFFF) + b"test_v1\0\0", False),
    "go-name-length-one-past": (Opt.GO, struct.pack(">I", 8) + b"test_v1\0\0", False),
    "info-name-length-past-end": (Opt.INFO, struct.pack(">I", 0x10000) + bytes(6), False),
    "set-query-length-past-end": (
        Opt.SET_META_CONTEXT,
        option_data_name("test_v1") + struct.pack(">I", 1) + struct.pack(">I", 100) + b"base:allocation",
        True),
    "set-query-count-past-end": (
        Opt.SET_META_CONTEXT, meta_context_request("test_v1", [BASE_ALLOCATION])[:-19]
        + struct.pack(">I", 2) + option_data_name(BASE_ALLOCATION), True),
    "set-name-length-past-end": (Opt.SET_META_CONTEXT, struct.pack(">I", 50) + b"test_v1" + bytes(4), True),
    "set-no-query-count": (Opt.SET_META_CONTEXT, option_data_name("test_v1"), True),
    "list-meta-trailing-byte": (Opt.LIST_META_CONTEXT, meta_context_request("test_v1", []) + b"\0", True),
    "list-meta-query-length-max": (
        Opt.LIST_META_CONTEXT,
        option_data_name("test_v1") + struct.pack(">II", 1, 0xFFFFFFFF) + b"base:", True),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_OPTIONS))
def test_option_lengths_disagreeing_with_content_get_err_invalid(clients, case):
    option, data, needs_structured = MALFORMED_OPTIONS[case]
    client = clients.haggling()
    if needs_structured:
        client.structured_reply()
    (reply,) = client.option(option, data)
    assert reply.type == Rep.ERR_INVALID, reply
    assert_haggling_goes_on(client)


def test_option_header_shorter_than_its_data_desynchronises_into_a_drop(clients, nbd_server):
    """The header says 8 bytes of a 13-byte GO: those 8 are invalid (ERR_INVALID), and
    the 5 left over start a header with a bad magic, which MAY be dropped."""
    client = clients.haggling()
    (reply,) = client.option(Opt.GO, info_request("test_v1"), length=8)
    assert reply.type == Rep.ERR_INVALID, reply
    client.send(bytes(11))  # completes a 16-byte header whose magic is wrong
    assert_dropped(client, nbd_server)


def test_export_name_of_unknown_export_is_dropped(clients, nbd_server):
    """NBD_OPT_EXPORT_NAME of an unknown export: the server MUST terminate the session."""
    client = clients.haggling()
    client.send_option(Opt.EXPORT_NAME, b"no-such-export")
    assert_dropped(client, nbd_server)


@pytest.mark.parametrize("option", [Opt.GO, Opt.INFO], ids=lambda o: o.name)
def test_go_or_info_of_unknown_export_gets_err_unknown(clients, option):
    client = clients.haggling()
    (reply,) = client.option(option, info_request("no-such-export"))
    assert reply.type == Rep.ERR_UNKNOWN, reply
    assert_haggling_goes_on(client)


@pytest.mark.parametrize("option", [Opt.GO, Opt.SET_META_CONTEXT], ids=lambda o: o.name)
def test_error_messages_stay_within_the_string_limit(clients, option):
    """'Conventions': strings, error messages included, MUST be at most 4096 bytes, even
    when the message names a 5000-byte export the client asked for."""
    client = clients.haggling()
    client.structured_reply()
    name = "n" * 5000
    data = info_request(name) if option == Opt.GO else meta_context_request(name, [BASE_ALLOCATION])
    (reply,) = client.option(option, data)  # NbdClient checks the 4096-byte limit
    assert reply.is_error, reply
    assert_haggling_goes_on(client)


def test_oversized_go_is_refused_and_haggling_goes_on(clients):
    """An option longer than the server will buffer: NBD_REP_ERR_TOO_BIG ("The request or
    the reply is too large to process"), its data skipped, haggling goes on."""
    client = clients.haggling()
    (reply,) = client.option(Opt.GO, bytes(1 * MiB))
    assert reply.type == Rep.ERR_TOO_BIG, reply
    assert_haggling_goes_on(client)


def test_huge_option_length_is_never_allocated(clients, nbd_server):
    """An option header announcing ~4 GiB: the server must not allocate what an
    untrusted length says.  Stream 256 MiB of it and watch the server's memory."""
    before = memory(nbd_server.process.pid)
    client = clients.haggling()
    client.send_option(Opt.GO, length=0xFFFFFFFF)
    block = bytes(1 * MiB)
    for _ in range(256):
        client.send(block)
    after = memory(nbd_server.process.pid)
    assert after["VmRSS"] - before["VmRSS"] < 64 * MiB, (before, after)
    assert after["VmPeak"] - before["VmPeak"] < 1024 * MiB, (before, after)  # not even reserved
    client.close()  # vanishes mid-option
    assert_others_served(nbd_server)


def test_abort_gets_ack_then_the_server_closes(clients, nbd_server):
    """NBD_OPT_ABORT: the server MUST reply NBD_REP_ACK (and SHOULD ignore any data)."""
    for data in (b"", b"ignored data"):
        client = clients.haggling()
        (reply,) = client.option(Opt.ABORT, data)
        assert reply.type == Rep.ACK, reply
        assert client.expect_disconnect() == b""
    assert_others_served(nbd_server)


def test_abort_with_long_data_still_gets_ack(clients):
    """ABORT with more data than the server buffers: still ACK, the data ignored."""
    client = clients.haggling()
    (reply,) = client.option(Opt.ABORT, bytes(65 * KiB))
    assert reply.type == Rep.ACK, reply
    client.expect_disconnect()


def test_abort_then_vanish_without_reading_the_ack(clients, nbd_server):
    """The server SHOULD gracefully handle a client closing right after ABORT."""
    for _ in range(10):
        client = clients.haggling()
        client.send_option(Opt.ABORT)
        client.close()
    assert_others_served(nbd_server)


@pytest.mark.parametrize("cut", ["mid-header", "mid-data"])
def test_client_vanishing_mid_option(clients, nbd_server, cut):
    client = clients.haggling()
    message = struct.pack(">QII", IHAVEOPT, Opt.GO, 100) + bytes(10)
    client.send(message[:8] if cut == "mid-header" else message)
    client.close()
    assert_others_served(nbd_server)


# ---------------------------------------------------------------------------
# Transmission: framing.


@pytest.mark.parametrize("magic", [0, SIMPLE_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC ^ 1], ids=hex)
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_bad_request_magic_is_dropped(clients, nbd_server, magic, structured):
    """A request without NBD_REQUEST_MAGIC breaks a MUST: the server MAY hard-disconnect
    (there is no cookie it could answer reliably)."""
    client = clients.transmission(structured)
    client.send(request_header(Cmd.READ, 0, 512, cookie=1, magic=magic))
    assert_dropped(client, nbd_server)


@pytest.mark.parametrize("cut", [10, 27], ids=["10-bytes", "27-bytes"])
def test_client_vanishing_mid_request_header(clients, nbd_server, cut):
    client = clients.transmission()
    client.send(request_header(Cmd.READ, 0, 512, cookie=1)[:cut])
    client.close()
    assert_others_served(nbd_server)


def test_client_vanishing_mid_write_payload_writes_nothing(clients, nbd_server, scratch):
    """A WRITE whose payload never fully arrived changes nothing, and others go on."""
    client = clients.transmission()
    before = client.read(scratch, SCRATCH_SIZE)
    client.send(request_header(Cmd.WRITE, scratch, SCRATCH_SIZE, cookie=7) + b"\xab" * (SCRATCH_SIZE // 2))
    client.close()
    assert_others_served(nbd_server)
    with clients.transmission() as other:
        assert other.read(scratch, SCRATCH_SIZE) == before


def test_client_vanishing_with_replies_pending(clients, nbd_server):
    """Many large READs, then the client closes without reading a single reply."""
    client = clients.transmission()
    for _ in range(32):
        client.send_request(Cmd.READ, 0, 1 * MiB)
    client.close()
    assert_others_served(nbd_server)


def test_disc_answers_every_request_in_flight_first(clients, scratch):
    """NBD_CMD_DISC: the server MUST handle all outstanding requests, then close."""
    client = clients.transmission()
    data = pattern(scratch, SCRATCH_SIZE)
    cookies = [client.send_request(Cmd.WRITE, scratch + i, 4 * KiB, payload=data[i : i + 4 * KiB])
               for i in range(0, SCRATCH_SIZE, 4 * KiB)]
    cookies.append(client.send_request(Cmd.FLUSH))
    client.send_request(Cmd.DISC)
    replies = client.collect()
    assert sorted(replies) == sorted(cookies)
    assert all(reply.error == 0 for reply in replies.values())
    assert client.expect_disconnect() == b""
    with clients.transmission() as other:
        assert other.read(scratch, SCRATCH_SIZE) == data


# ---------------------------------------------------------------------------
# Transmission: commands and flags ("Request types", "Command flags", "Error values").


@pytest.mark.parametrize("command", [8, 9, 0x7F, 0xFFFF], ids=["RESIZE-unadvertised", "9", "0x7f", "0xffff"])
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_unknown_command_gets_einval(clients, command, structured):
    """The server SHOULD return NBD_EINVAL if it receives an unknown command."""
    client = clients.transmission(structured)
    expect_error(client.request(command, 0, 512), Err.EINVAL)
    assert_alive(client)


# Flags not documented for the command: NBD_EINVAL ("Error values").  PAYLOAD_LEN
# belongs to extended headers, never negotiated here; bits 6-15 are undefined.
# (Regression: bits 6-15 were accepted, as `flags & ~allowed` on an IntFlag keeps
# only its defined bits; a WRITE with one even wrote.)
BAD_FLAGS = [
    (Cmd.READ, CmdFlag.NO_HOLE), (Cmd.READ, CmdFlag.REQ_ONE), (Cmd.READ, CmdFlag.FAST_ZERO),
    (Cmd.READ, CmdFlag.PAYLOAD_LEN), (Cmd.READ, 1 << 15),
    (Cmd.WRITE, CmdFlag.NO_HOLE), (Cmd.WRITE, CmdFlag.DF), (Cmd.WRITE, CmdFlag.REQ_ONE),
    (Cmd.WRITE, CmdFlag.FAST_ZERO), (Cmd.WRITE, 1 << 6),
    (Cmd.FLUSH, CmdFlag.NO_HOLE), (Cmd.FLUSH, CmdFlag.DF), (Cmd.FLUSH, 1 << 9),
    (Cmd.TRIM, CmdFlag.NO_HOLE), (Cmd.TRIM, CmdFlag.DF), (Cmd.TRIM, CmdFlag.FAST_ZERO),
    (Cmd.CACHE, CmdFlag.DF), (Cmd.CACHE, CmdFlag.REQ_ONE), (Cmd.CACHE, 1 << 12),
    (Cmd.WRITE_ZEROES, CmdFlag.DF), (Cmd.WRITE_ZEROES, CmdFlag.REQ_ONE), (Cmd.WRITE_ZEROES, 1 << 7),
    (Cmd.BLOCK_STATUS, CmdFlag.NO_HOLE), (Cmd.BLOCK_STATUS, CmdFlag.DF),
    (Cmd.BLOCK_STATUS, CmdFlag.FAST_ZERO), (Cmd.BLOCK_STATUS, 1 << 14),
]


def _bad_flag_cases():
    for structured in (True, False):
        for command, flag in BAD_FLAGS:
            if command == Cmd.BLOCK_STATUS and not structured:
                continue  # without a context it is EINVAL whatever the flags
            yield pytest.param(command, flag, structured,
                               id=f"{'structured' if structured else 'simple'}-{command.name}-{int(flag):#x}")


@pytest.mark.parametrize("command, flag, structured", _bad_flag_cases())
def test_flag_invalid_for_command_gets_einval_and_changes_nothing(clients, scratch, command, flag,
                                                                   structured):
    client = clients.transmission(structured)
    before = client.read(scratch, 8 * KiB)
    # A refused WRITE's payload is still consumed (never parsed as the next header).
    payload = b"\xee" * (8 * KiB) if command == Cmd.WRITE else None
    reply = client.request(command, scratch, 8 * KiB, flag, payload)
    expect_error(reply, Err.EINVAL)
    assert client.read(scratch, 8 * KiB) == before
    assert_alive(client)


def test_df_without_structured_replies_gets_einval(clients):
    """DF MUST NOT be set unless NBD_FLAG_SEND_DF, which needs structured replies."""
    client = clients.transmission(structured=False)
    assert not client.export.flags & TFlag.SEND_DF
    expect_error(client.request(Cmd.READ, 0, 512, CmdFlag.DF), Err.EINVAL)
    assert_alive(client)


@pytest.mark.parametrize("command", [Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM, Cmd.READ, Cmd.FLUSH, Cmd.CACHE,
                                     Cmd.BLOCK_STATUS], ids=lambda c: c.name)
def test_fua_is_accepted_on_every_command(clients, scratch, command):
    """'Command flags': FUA is valid on every command once NBD_FLAG_SEND_FUA is
    advertised, and the server MUST accept it (even by ignoring it)."""
    client = clients.transmission()
    assert client.export.flags & TFlag.SEND_FUA
    offset, length = (0, 0) if command == Cmd.FLUSH else (scratch, 4 * KiB)
    reply = client.request(command, offset, length, CmdFlag.FUA)
    expect_error(reply, Err.OK)
    assert_alive(client)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_block_status_without_a_context_gets_einval(clients, structured):
    """BLOCK_STATUS with no metadata context selected: NBD_EINVAL."""
    client = clients.transmission(structured, contexts=())
    expect_error(client.request(Cmd.BLOCK_STATUS, 0, 4096), Err.EINVAL)
    assert_alive(client)


@pytest.mark.parametrize("selection", ["other-export", "no-queries", "unknown-context"])
def test_block_status_when_set_meta_context_selected_nothing_for_this_export(clients, selection):
    """The final SET_META_CONTEXT must name the export of GO and return a context;
    otherwise BLOCK_STATUS is not allowed and gets NBD_EINVAL."""
    client = clients.haggling()
    client.structured_reply()
    name, queries = {"other-export": ("other", [BASE_ALLOCATION]), "no-queries": ("test_v1", []),
                     "unknown-context": ("test_v1", ["x-nothing:here"])}[selection]
    selected = client.set_meta_context(name, queries)
    assert bool(selected) == (selection == "other-export")
    client.go("test_v1")
    expect_error(client.request(Cmd.BLOCK_STATUS, 0, 4096), Err.EINVAL)
    assert_alive(client)


def test_block_status_reports_written_data_and_holes(clients, scratch):
    client = clients.transmission()
    client.request(Cmd.TRIM, scratch, SCRATCH_SIZE)
    client.write(scratch, pattern(1, 4 * KiB))
    (context_id,) = client.export.contexts
    reply = client.request(Cmd.BLOCK_STATUS, scratch, 8 * KiB)
    first, *rest = reply.extents[context_id]
    assert first == (4 * KiB, 0)
    assert rest and rest[0][1] == STATE_HOLE | STATE_ZERO
    one = client.request(Cmd.BLOCK_STATUS, scratch, 2 * KiB, CmdFlag.REQ_ONE)
    assert one.extents[context_id] == [(2 * KiB, 0)]
    assert_alive(client)


# ---------------------------------------------------------------------------
# Transmission: ranges.

OUT_OF_BOUNDS = {
    "at-end": (SIZE, 512),
    "straddling-end": (SIZE - 512, 1024),
    "past-end": (SIZE + 4 * KiB, 512),
    "offset-2^63": (1 << 63, 512),
    # offset + length wraps around 2**64 to a small number: a C server that adds
    # them in 64 bits would see 512 bytes at offset 0.
    "wraps-64-bits": ((1 << 64) - 512, 1024),
    "wraps-to-zero": ((1 << 64) - 1, 1),
}
# "Error values": ENOSPC for writes past the end, EINVAL for reads, trims and the
# rest ("Size constraints": NBD_EINVAL if a request would exceed the export size).
OUT_OF_BOUNDS_ERROR = {Cmd.WRITE: Err.ENOSPC, Cmd.WRITE_ZEROES: Err.ENOSPC}


@pytest.mark.parametrize("where", sorted(OUT_OF_BOUNDS))
@pytest.mark.parametrize("command", WITH_RANGE, ids=lambda c: c.name)
def test_out_of_bounds_requests_are_refused_and_change_nothing(clients, command, where):
    offset, length = OUT_OF_BOUNDS[where]
    client = clients.transmission()
    last_sector = client.read(SIZE - 512, 512)
    payload = b"\xcc" * length if command == Cmd.WRITE else None
    reply = client.request(command, offset, length, payload=payload)
    expect_error(reply, OUT_OF_BOUNDS_ERROR.get(command, Err.EINVAL))
    assert client.read(SIZE - 512, 512) == last_sector
    assert client.read(0, 1024) == PATTERN[:1024]  # where a wrapped range would land
    assert_alive(client)


@pytest.mark.parametrize("at_end", [False, True], ids=["at-start", "at-end"])
@pytest.mark.parametrize("command", WITH_RANGE, ids=lambda c: c.name)
def test_zero_length_requests_get_a_reply_and_change_nothing(clients, scratch, command, at_end):
    """Zero-length requests: behaviour unspecified, but the server SHOULD NOT disconnect;
    whatever it answers is one well-formed reply, and no data changes."""
    client = clients.transmission()
    offset = SIZE if at_end else scratch
    client.write(scratch, pattern(scratch, 4 * KiB))
    reply = client.request(command, offset, 0)
    if reply.error == 0 and command == Cmd.READ:
        assert reply.data == b""
    assert client.read(scratch, 4 * KiB) == pattern(scratch, 4 * KiB)
    assert_alive(client)


def test_write_above_maximum_payload_is_consumed_not_parsed_as_requests(clients, nbd_server, scratch):
    """A WRITE longer than the advertised maximum (a client MUST NOT send it): the
    server refuses it and consumes its payload, or hard-disconnects.  The payload is
    made of valid READ headers: answering any of them means it was parsed as requests."""
    client = clients.transmission()
    smuggled = request_header(Cmd.READ, 0, 512, cookie=0xBAD)
    payload = smuggled * ((MAX_PAYLOAD + 4 * KiB) // len(smuggled))
    try:
        reply = client.request(Cmd.WRITE, scratch, len(payload), payload=payload)
    except ConnectionClosed:
        assert_others_served(nbd_server)
        return
    assert reply.error != 0, "a WRITE above the advertised maximum payload succeeded"
    assert client.read(scratch, 4 * KiB) == bytes(4 * KiB)  # nothing of it was written
    assert_alive(client)  # NbdClient fails on a reply to cookie 0xBAD


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_read_above_maximum_payload(clients, structured):
    """Simple replies: a READ above the maximum "will fail".  Structured replies: the
    server MAY serve it in chunks or refuse it (NBD_EOVERFLOW or NBD_EINVAL)."""
    client = clients.transmission(structured)
    reply = client.request(Cmd.READ, 0, MAX_PAYLOAD + 512)
    if structured:
        assert reply.error in (Err.OK, Err.EOVERFLOW, Err.EINVAL), reply.error
        if reply.error == 0:
            assert reply.data[: len(PATTERN)] == PATTERN
    else:
        assert reply.error != 0, "a simple READ above the maximum payload succeeded"
    assert_alive(client)


@pytest.mark.parametrize("command", [Cmd.WRITE_ZEROES, Cmd.TRIM], ids=lambda c: c.name)
def test_effect_length_above_maximum_payload(clients, command):
    """TRIM/WRITE_ZEROES may exceed the maximum payload: the server SHOULD NOT
    disconnect and MAY answer NBD_EOVERFLOW or NBD_EINVAL."""
    client = clients.transmission()
    start, end = BIG_RANGE
    assert end - start > MAX_PAYLOAD
    client.write(start + 4 * KiB, pattern(2, 4 * KiB))
    reply = client.request(command, start, end - start)
    assert reply.error in (Err.OK, Err.EOVERFLOW, Err.EINVAL), reply.error
    if reply.error == 0:  # pfnbd trims whole sectors to holes: both read back as zeros
        assert client.read(start + 4 * KiB, 4 * KiB) == bytes(4 * KiB)
    assert_alive(client)


def test_refused_requests_pipelined_with_good_ones(clients, scratch):
    """Errors in the middle of a pipeline: every request gets its own reply."""
    client = clients.transmission()
    data = pattern(scratch + 1, 4 * KiB)
    good_write = client.send_request(Cmd.WRITE, scratch, len(data), payload=data)
    bad_write = client.send_request(Cmd.WRITE, SIZE, 4 * KiB, payload=b"\x11" * 4 * KiB)
    unknown = client.send_request(0x99, 0, 0)
    bad_flag = client.send_request(Cmd.READ, 0, 512, CmdFlag.NO_HOLE)
    read = client.send_request(Cmd.READ, 0, 4 * KiB)
    replies = client.collect()
    assert replies[good_write].error == 0
    assert replies[bad_write].error == Err.ENOSPC
    assert replies[unknown].error == Err.EINVAL
    assert replies[bad_flag].error == Err.EINVAL
    assert replies[read].data == PATTERN[: 4 * KiB]
    assert client.read(scratch, len(data)) == data


# ---------------------------------------------------------------------------
# Read-only exports and whole-server robustness (fresh servers).


@pytest.mark.parametrize("command", WRITING, ids=lambda c: c.name)
def test_writes_to_a_read_only_export_get_eperm(start_server, command):
    """NBD_FLAG_READ_ONLY: the server MUST error write operations (SHOULD be EPERM)."""
    server = start_server(None, "--read-only")
    with NbdClient.unix(server.socket) as client:
        client.handshake()
        export = client.go("test_v1", structured=True)
        assert export.flags & TFlag.READ_ONLY
        payload = b"\x22" * 4 * KiB if command == Cmd.WRITE else None
        reply = client.request(command, 0, 4 * KiB, payload=payload)
        expect_error(reply, Err.EPERM)
        assert client.read(0, 4 * KiB) == bytes(4 * KiB)


def _spawn_server(cli: Cli, tmp_path: Path, *listen: str) -> tuple[subprocess.Popen, Path]:
    """`pfnbd serve` of a 1 MiB test_v1 for tests that try to kill it: the caller stops
    it (they check survival themselves, so the exit code is not asserted)."""
    cli.run("volume", "create", "test_v1", "--size", "1M")
    log_path = tmp_path / "whole-server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(pfnbd_command("serve", "--volume", "test_v1", *listen),
                                   env=cli.env, stdout=log, stderr=subprocess.STDOUT)
    return process, log_path


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _first_sector(client: NbdClient) -> bytes:
    with client:
        client.handshake()
        client.go("test_v1")
        return client.read(0, 512)


def test_tcp_clients_resetting_right_after_connect_do_not_kill_the_server(cli, tmp_path):
    """Regression: getpeername() on a connection the client had already reset raised
    ENOTCONN out of serve_connection and took the whole server down."""
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process, log_path = _spawn_server(cli, tmp_path, "--bind", "127.0.0.1", "--port", str(port))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except ConnectionRefusedError:
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
        for _ in range(300):
            rude = socket.socket()
            rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            try:
                rude.connect(("127.0.0.1", port))
            except ConnectionRefusedError:
                break  # the server is gone already
            rude.close()  # SO_LINGER 0: RST instead of FIN
        time.sleep(0.5)
        assert process.poll() is None, f"pfnbd serve died:\n{log_path.read_text()}"
        client = NbdClient(socket.create_connection(("127.0.0.1", port), timeout=10))
        assert _first_sector(client) == bytes(512)
    finally:
        _stop(process)


def test_file_descriptor_exhaustion_does_not_kill_the_server(cli, tmp_path):
    """Regression: accept() failing with EMFILE (idle clients hold every descriptor)
    ended the server; now it serves again once descriptors free up."""
    sock_path = tmp_path / "fd.sock"
    process, log_path = _spawn_server(cli, tmp_path, "--socket", str(sock_path))
    idle = []
    try:
        wait_for_socket(process, sock_path, log_path)
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (64, 64))
        for _ in range(100):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(str(sock_path))  # the listen backlog takes them even when accept() fails
            idle.append(sock)
        time.sleep(1)
        for sock in idle:
            sock.close()
        time.sleep(0.5)
        assert process.poll() is None, f"pfnbd serve died:\n{log_path.read_text()}"
        assert _first_sector(NbdClient.unix(sock_path)) == bytes(512)
    finally:
        for sock in idle:
            sock.close()
        _stop(process)
