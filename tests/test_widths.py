"""Protocol fields at their full width: 64-bit cookies with the high half set on
every kind of reply, extended-header lengths above 4 GiB, offsets near 2**63.

Small cookies and lengths under 4 GiB cannot tell a 64-bit field from one cut to
32 bits; these values can.  The clients are the suite's spec-written ones:
fuzz/nbdwire.py (simple and structured replies; it refuses a reply whose cookie is
not in flight) and test_extended_headers.RawClient (extended headers).
"""

from __future__ import annotations

import struct

import pytest

from fuzz.nbdwire import BASE_ALLOCATION, Cmd, Err, NbdClient, pattern
from test_extended_headers import (
    CMD_BLOCK_STATUS, CMD_READ, CMD_TRIM, CMD_WRITE, FLAG_PAYLOAD_LEN, OPT_EXTENDED_HEADERS, REP_ACK,
    REPLY_BLOCK_STATUS_EXT, REPLY_ERROR, REPLY_NONE, REPLY_OFFSET_DATA, RawClient,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
HIGH_COOKIES = [0xFFFFFFFF00000001, 1 << 32, (1 << 64) - 1, 0x8000000000000000]
BIG = 6 * GiB  # a sparse volume with room past 4 GiB
FAR = 5 * GiB  # data written here, beyond what a 32-bit length reaches from 0
CMD_WRITE_ZEROES = 6
STATE_DATA, STATE_HOLE_ZERO = 0, 3


def connect(server, structured: bool) -> NbdClient:
    client = NbdClient.unix(server.socket)
    client.handshake()
    client.go("test_v1", structured=structured, contexts=[BASE_ALLOCATION] if structured else ())
    return client


def answer(client: NbdClient, command: int, cookie: int, offset: int = 0, length: int = 0,
           payload: bytes | None = None, flags: int = 0):
    """One request with `cookie`; nbdwire raises if the reply names any other."""
    client.send_request(command, offset, length, flags, payload, cookie=cookie)
    reply = client.receive_reply()
    assert reply.cookie == cookie
    return reply


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_high_cookies_come_back_whole_on_every_reply(server, structured):
    data = pattern(1, 8 * KiB)
    with connect(server, structured) as client:
        for cookie in HIGH_COOKIES:
            assert answer(client, Cmd.WRITE, cookie, 4096, len(data), data).error == 0  # simple / NONE
            assert answer(client, Cmd.READ, cookie, 4096, len(data)).data == data  # data / OFFSET_DATA
            assert answer(client, Cmd.FLUSH, cookie).error == 0
            refused = answer(client, Cmd.READ, cookie, 64 * MiB, 512)  # simple error / ERROR chunk
            assert refused.error == Err.EINVAL
            if structured:
                status = answer(client, Cmd.BLOCK_STATUS, cookie, 0, 1 * MiB)  # BLOCK_STATUS chunk
                assert status.error == 0 and status.extents
        # Several in flight at once, told apart only by their high halves.
        cookies = [(n << 32) | 7 for n in range(1, 9)]
        for n, cookie in enumerate(cookies):
            client.send_request(Cmd.READ, n * 4096, 4096, cookie=cookie)
        assert sorted(client.collect()) == sorted(cookies)


@pytest.fixture
def extended(server):
    client = RawClient(server.socket)
    assert client.option(OPT_EXTENDED_HEADERS) == [(REP_ACK, b"")]
    client.go()
    yield client
    client.sock.close()


@pytest.fixture
def big_extended(start_server):
    server = start_server({"test_v1": str(BIG)})
    client = RawClient(server.socket)
    assert client.option(OPT_EXTENDED_HEADERS) == [(REP_ACK, b"")]
    client.go()
    yield client
    client.sock.close()


def chunks(client: RawClient, first) -> list:
    """All chunks of one reply, `first` already read."""
    replies = [first]
    while not replies[-1][0] & 1:  # NBD_REPLY_FLAG_DONE
        replies.append(client.reply())
    return replies


def test_high_cookies_on_every_extended_reply(extended):
    data = pattern(2, 4 * KiB)
    for cookie in HIGH_COOKIES:
        reply = extended.request(CMD_WRITE, 0, len(data), cookie, FLAG_PAYLOAD_LEN, data)
        assert reply[1:3] == (REPLY_NONE, cookie)
        read = chunks(extended, extended.request(CMD_READ, 0, len(data), cookie))
        assert [(kind, c) for _, kind, c, *_ in read if kind != REPLY_NONE] == [(REPLY_OFFSET_DATA, cookie)]
        status = chunks(extended, extended.request(CMD_BLOCK_STATUS, 0, 1 * MiB, cookie))
        assert status[0][1:3] == (REPLY_BLOCK_STATUS_EXT, cookie)
        assert all(c == cookie for _, _, c, *_ in status)
        error = extended.request(CMD_READ, 64 * MiB, 512, cookie)
        assert error[1:3] == (REPLY_ERROR, cookie)


def extents_of(payload: bytes) -> list[tuple[int, int]]:
    _, count = struct.unpack(">II", payload[:8])
    return [struct.unpack(">QQ", payload[8 + 16 * i : 24 + 16 * i]) for i in range(count)]


def block_status(client: RawClient, offset: int, length: int) -> list[tuple[int, int]]:
    replies = chunks(client, client.request(CMD_BLOCK_STATUS, offset, length, 1))
    ((payload,),) = [(r[5],) for r in replies if r[1] == REPLY_BLOCK_STATUS_EXT]
    return extents_of(payload)


def read(client: RawClient, offset: int, length: int) -> bytes:
    replies = chunks(client, client.request(CMD_READ, offset, length, 2))
    data = bytearray(length)
    for _, kind, _, _, _, payload in replies:
        assert kind in (REPLY_OFFSET_DATA, REPLY_NONE, 2), kind  # 2: OFFSET_HOLE
        if kind == REPLY_OFFSET_DATA:
            (at,) = struct.unpack(">Q", payload[:8])
            data[at - offset : at - offset + len(payload) - 8] = payload[8:]
    return bytes(data)


def test_block_status_over_more_than_4_gib(big_extended):
    data = pattern(3, 64 * KiB)
    big_extended.request(CMD_WRITE, FAR, len(data), 1, FLAG_PAYLOAD_LEN, data)
    extents = block_status(big_extended, 0, FAR + 1 * GiB)
    assert extents[0] == (FAR, STATE_HOLE_ZERO)  # one hole longer than 4 GiB
    assert extents[1] == (len(data), STATE_DATA)


@pytest.mark.parametrize("command", [CMD_TRIM, CMD_WRITE_ZEROES], ids=["trim", "write_zeroes"])
def test_trim_and_write_zeroes_over_more_than_4_gib(big_extended, command):
    data = pattern(4, 64 * KiB)
    for offset in (0, FAR):
        big_extended.request(CMD_WRITE, offset, len(data), 1, FLAG_PAYLOAD_LEN, data)
    reply = big_extended.request(command, 0, FAR + len(data), 3)  # 5 GiB + 64 KiB: 64 KiB mod 2**32
    assert reply[1] == REPLY_NONE, reply[:2]
    assert read(big_extended, FAR, len(data)) == bytes(len(data))
    assert read(big_extended, 0, len(data)) == bytes(len(data))


def test_read_longer_than_4_gib_is_refused(big_extended):
    _, kind, cookie, _, _, payload = big_extended.request(CMD_READ, 0, (4 * GiB) + 4096, 5)
    assert (kind, cookie) == (REPLY_ERROR, 5)
    assert struct.unpack(">I", payload[:4])[0] == Err.EINVAL
    assert read(big_extended, 0, 4096) == bytes(4096)  # and the connection goes on


def test_offsets_near_2_to_the_63_are_refused_and_the_connection_goes_on(server):
    with connect(server, structured=True) as client:
        for offset, length in [((1 << 63) - 4096, 4096), (1 << 63, 512), ((1 << 64) - 512, 1024),
                               ((1 << 64) - 512, 512)]:
            for command in (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS, Cmd.CACHE):
                reply = answer(client, command, 0xFFFFFFFF00000001, offset, length,
                               bytes(length) if command == Cmd.WRITE else None)
                assert reply.error in (Err.EINVAL, Err.ENOSPC), (command, offset, reply)
        assert answer(client, Cmd.READ, 1, 0, 512).error == 0


def test_extended_offsets_near_2_to_the_63_are_refused(big_extended):
    for offset, length in [((1 << 63) - 4096, 4096), (BIG - 4096, 1 << 62), (4096, (1 << 64) - 4096)]:
        for command in (CMD_READ, CMD_TRIM, CMD_BLOCK_STATUS):
            _, kind, cookie, *_ = big_extended.request(command, offset, length, 9)
            assert (kind, cookie) == (REPLY_ERROR, 9), (command, offset, length)
    assert read(big_extended, 0, 4096) == bytes(4096)
