"""Random byte streams into negotiation and into transmission.

Each example opens a connection, writes a stream (random bytes mixed with messages
that have the right magic and random fields, so the fuzzer gets past the first
check), closes its sending side and reads everything the server sends back.
Properties:
* the server answers and closes within a deadline (it is never stuck, never spins);
* what it sends is a sequence of well-formed replies, each to a message the client
  actually sent, in the framing the spec gives (the client frames its own stream
  the same way to know what was sent);
* a stream that ended cleanly got a reply to every message;
* the server survives: a client that stayed connected through all examples, and a
  new one, still read the right data from an export the fuzzer never touches.
"""

from __future__ import annotations

import socket
import struct

import attrs
import pytest
from hypothesis import assume, event, example, given
from hypothesis import strategies as st

from .inprocess import InProcessServer
from .nbdwire import (
    GREETING,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_HEADER,
    REQUEST,
    REQUEST_MAGIC,
    Cmd,
    ConnectionClosed,
    HandshakeFlag,
    NbdClient,
    Opt,
    Pending,
    Rep,
    info_request,
    meta_context_request,
    pattern,
)

VOLUMES = {"fuzz": 1 << 20, "canary": 64 << 10}
CANARY = pattern(99, VOLUMES["canary"])
DEADLINE = 10.0  # seconds for the server to answer everything and close

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
garbage = st.binary(min_size=1, max_size=48)


@attrs.frozen
class Harness:
    server: InProcessServer
    bystander: NbdClient  # connected before the first example, used after each

    def check_survival(self) -> None:
        self.server.check()
        assert self.bystander.read(0, 4096) == CANARY[:4096]
        with self.server.connect() as newcomer:
            newcomer.handshake()
            newcomer.go("canary", structured=True)
            assert newcomer.read(0, len(CANARY)) == CANARY
            newcomer.disconnect()


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    with InProcessServer(tmp_path_factory.mktemp("raw"), VOLUMES) as server:
        with server.connect() as bystander:
            bystander.handshake()
            bystander.go("canary")
            bystander.write(0, CANARY)
            yield Harness(server, bystander)


def exchange(client: NbdClient, stream: bytes) -> None:
    """Sends the stream and half-closes: the server has all it will ever get."""
    client.sock.settimeout(DEADLINE)
    try:
        client.sock.sendall(stream)
        client.sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server hung up before reading it all: allowed after a broken rule


# ---------------------------------------------------------------------------
# Negotiation.

# Names of no export: the fuzzer must not reach transmission by chance here.
names = st.text(max_size=12).map(lambda name: f"no-{name}")


@st.composite
def option_message(draw) -> bytes:
    option = draw(st.one_of(st.sampled_from(list(Opt)), u32))
    data = draw(st.one_of(
        st.binary(max_size=40),
        st.builds(info_request, names, st.lists(u16, max_size=4)),
        st.builds(meta_context_request, names, st.lists(st.text(max_size=16), max_size=3)),
    ))
    lies = draw(st.integers(0, 3)) == 0  # the header's length, sometimes
    return OPTION_HEADER.pack(IHAVEOPT, option, draw(u32) if lies else len(data)) + data


def frame_options(stream: bytes) -> tuple[list[tuple[int, bytes]], bool]:
    """The options (number, data) the server can read whole from `stream`, as the spec
    frames them, and whether the stream ended cleanly (not inside a message, no bad
    magic).  The server reads no option after ABORT or EXPORT_NAME."""
    sent, at = [], 0
    while at < len(stream):
        if len(stream) - at < OPTION_HEADER.size:
            return sent, False
        magic, option, length = OPTION_HEADER.unpack_from(stream, at)
        if magic != IHAVEOPT or length > len(stream) - at - OPTION_HEADER.size:
            return sent, False
        start = at + OPTION_HEADER.size
        sent.append((option, stream[start : start + length]))
        at = start + length
        if option in (Opt.ABORT, Opt.EXPORT_NAME):
            break
    return sent, True


@given(st.lists(st.one_of(option_message(), option_message(), option_message(), garbage), max_size=12),
       st.booleans())
@example([struct.pack(">QII", IHAVEOPT, Opt.LIST, 0xFFFFFFFF)], True)
@example([struct.pack(">QII", IHAVEOPT, Opt.GO, 5) + b"\xff\xff\xff\xff\x00"], True)
def test_random_options_are_answered_or_dropped_in_time(harness, segments, no_zeroes):
    flags = HandshakeFlag.FIXED_NEWSTYLE | (HandshakeFlag.NO_ZEROES if no_zeroes else 0)
    stream = b"".join(segments)
    sent, clean = frame_options(stream)
    with harness.server.connect(timeout=DEADLINE) as client:
        client.handshake(flags)
        exchange(client, stream)
        in_transmission = False  # then the rest of the stream is requests: not checked here
        for option, data in sent:
            if option == Opt.EXPORT_NAME:
                # An unknown export: "the server MUST terminate the session" (no reply);
                # the default export "" starts transmission.
                in_transmission = data in (b"", *(name.encode() for name in VOLUMES))
                break
            try:
                replies = [client.receive_option_reply(option)]
                while not replies[-1].is_final:
                    replies.append(client.receive_option_reply(option))
            except ConnectionClosed:
                assert not clean, f"no reply to option {option} of a clean stream"
                break
            event(f"reply {replies[-1].type:#x}")
            if option == Opt.GO and replies[-1].type == Rep.ACK:
                in_transmission = True
                break
        left = client.expect_disconnect(DEADLINE)  # the server closes within the deadline
        assert in_transmission or left == b"", f"{len(left)} bytes the options do not explain"
    harness.check_survival()


@given(st.binary(max_size=256))
def test_random_bytes_instead_of_a_handshake(harness, stream):
    """Whatever arrives in place of the client flags and options."""
    with harness.server.connect(timeout=DEADLINE) as client:
        greeting = client.recv_exactly(GREETING.size)
        assert greeting[:16] == struct.pack(">QQ", NBDMAGIC, IHAVEOPT)
        exchange(client, stream)
        client.expect_disconnect(DEADLINE)
    harness.check_survival()


# ---------------------------------------------------------------------------
# Transmission.

commands = st.one_of(st.sampled_from(list(Cmd)), st.sampled_from([Cmd.READ, Cmd.WRITE]), u16)
flags = st.one_of(st.just(0), st.just(0), st.sampled_from([1, 2, 4, 8, 16, 32]), u16)
offsets = st.one_of(st.integers(0, VOLUMES["fuzz"]), st.sampled_from([VOLUMES["fuzz"] - 512, 1 << 63]), u64)
request_lengths = st.one_of(st.integers(0, 8192), st.sampled_from([0, 1 << 20, (1 << 25) + 1]), u32)


@st.composite
def request_message(draw, cookie: int) -> bytes:
    command, length = draw(commands), draw(request_lengths)
    header = REQUEST.pack(REQUEST_MAGIC, draw(flags), command, cookie, draw(offsets), length)
    if command != Cmd.WRITE:
        return header
    # The payload is complete unless it is too big to send, or the fuzzer cuts it.
    whole = length <= 8192 and draw(st.integers(0, 3)) > 0
    size = length if whole else draw(st.integers(0, min(length, 8192)))
    return header + pattern(cookie, size)


@st.composite
def transmission_streams(draw) -> bytes:
    """Requests with unique cookies, and perhaps one run of garbage among them."""
    segments = [draw(request_message(cookie)) for cookie in range(1, draw(st.integers(0, 12)) + 1)]
    if draw(st.booleans()):
        segments.insert(draw(st.integers(0, len(segments))), draw(garbage))
    return b"".join(segments)


def frame_requests(stream: bytes) -> tuple[list[tuple[int, Pending]], bool]:
    """The requests the server can read whole, by cookie, and whether the stream ended
    cleanly (DISC, or EOF between requests)."""
    requests, at = [], 0
    while at < len(stream):
        if len(stream) - at < REQUEST.size:
            return requests, False
        magic, flags_, command, cookie, offset, length = REQUEST.unpack_from(stream, at)
        if magic != REQUEST_MAGIC:
            return requests, False
        at += REQUEST.size + (length if command == Cmd.WRITE else 0)
        if at > len(stream):
            return requests, False
        if command == Cmd.DISC:
            return requests, True
        requests.append((cookie, Pending(command, flags_, offset, length)))
    return requests, True


@given(transmission_streams(), st.booleans(), st.booleans())
@example(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, 0xFFFFFFFF) + b"\0" * 100, True, True)
@example(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 1, (1 << 64) - 512, 1024), False, False)
def test_random_requests_are_answered_or_dropped_in_time(harness, stream, structured, contexts):
    requests, clean = frame_requests(stream)
    assume(len({cookie for cookie, _ in requests}) == len(requests))  # garbage may repeat a cookie
    with harness.server.connect(timeout=DEADLINE) as client:
        client.handshake()
        client.go("fuzz", structured, ["base:allocation"] if structured and contexts else ())
        for cookie, request in requests:
            client.track(cookie, request)
        exchange(client, stream)
        count = f"{len(requests)}" if len(requests) < 4 else "4+"
        event(f"{'clean' if clean else 'cut'} stream, {count} requests")
        try:
            while client.pending:
                reply = client.receive_reply()  # checks each reply against the request it answers
                event(f"reply error {reply.error}")
        except ConnectionClosed:
            assert not clean, f"{client.pending} requests of a clean stream got no reply"
        else:
            assert client.expect_disconnect(DEADLINE) == b"", "a reply to no request"
    harness.check_survival()
