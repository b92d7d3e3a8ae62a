"""The data path built for speed: its memory bound, and the pieces it is made of."""

import re
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from conftest import run_libnbd
from fuzz.nbdwire import Cmd, NbdClient, Pending, pattern, request_header
from pfnbd.streams import Receiver, Sender, _drop_sent, _runs
from pfnbd.transmission import BufferPool
from pfnbd.volume import RangeLock

MiB = 1 << 20

# 16 connections each keep four 32 MiB writes, then four 32 MiB reads, in flight, and
# check every read against what was written.
SIXTEEN_CONNECTIONS = r"""
import sys
import nbd
MiB = 1 << 20
handles = []
for _ in range(16):
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    handles.append(h)

def wait(pending):
    for h, cookie in pending:
        while not h.aio_command_completed(cookie):
            h.poll(-1)

def slot(i, j):
    return ((i * 4 + j) % 15) * 32 * MiB

def pattern(i, j):
    return bytes([i * 4 + j + 1]) * (32 * MiB)

wait([(h, h.aio_pwrite(pattern(i, j), slot(i, j))) for i, h in enumerate(handles) for j in range(4)])
# Writes to one slot from different connections raced: the last one acknowledged is not
# known, so each slot must hold one of the patterns written to it, whole.
buffers = [(i, j, nbd.Buffer(32 * MiB)) for i in range(16) for j in range(4)]
wait([(handles[i], handles[i].aio_pread(b, slot(i, j))) for i, j, b in buffers])
written = {}
for i in range(16):
    for j in range(4):
        written.setdefault(slot(i, j), set()).add(pattern(i, j)[:1])

def whole_pattern_of(data, at):
    return data[:1] in written[at] and data.count(data[:1]) == len(data)

ok = all(whole_pattern_of(bytes(b.to_bytearray()), slot(i, j)) for i, j, b in buffers)
print("ok" if ok else "corrupt")
"""


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def test_sixteen_connections_of_32_mib_requests_stay_within_the_memory_bound(start_server):
    # 64 requests of 32 MiB in flight would be 2 GiB of buffers: each connection holds
    # one of them at a time (more than its pool, so alone), the emulated library ~30 MiB
    # of write copies.
    server = start_server({"test_v1": "512M"})
    out = run_libnbd(SIXTEEN_CONNECTIONS, server.uri(), timeout=240)
    peak = peak_rss_mib(server.process.pid)
    assert out.split() == ["ok"], out + server.log()
    print(f"peak RSS with sixteen connections of 32 MiB requests: {peak:.0f} MiB")
    assert peak < 16 * 32 + 160, f"peak RSS {peak:.0f} MiB"


def send_reads(client: NbdClient, count: int, length: int) -> None:
    """`count` READs of `length` bytes, back to back, in one send: the server receives
    them together."""
    for cookie in range(count):
        client.track(cookie, Pending(Cmd.READ, 0, cookie * length, length))
    client.send(b"".join(request_header(Cmd.READ, cookie * length, length, cookie=cookie) for cookie in range(count)))


def test_more_requests_in_one_receive_than_may_be_in_flight_are_all_answered(start_server):
    """The reader starts the reads of one receive and submits them together, before it
    waits for anything: here, for replies to make room under its limit of requests in
    flight.  Were they not submitted first, that wait would never end."""
    server = start_server({"test_v1": "64M"})
    data = pattern(5, 300 * 4096)
    with NbdClient.unix(server.socket) as client:
        client.handshake()
        client.go("test_v1")
        client.write(0, data)
        send_reads(client, 300, 4096)
        replies = client.collect()
    assert all(reply.error == 0 for reply in replies.values())
    assert b"".join(bytes(replies[cookie].data) for cookie in range(300)) == data


def test_writes_sent_with_disc_in_one_send_are_carried_out_and_answered(start_server):
    """DISC ends the reader at once: the writes it started before are still submitted,
    answered, and on the volume."""
    server = start_server({"test_v1": "64M"})
    data = pattern(6, 8 * 4096)
    with NbdClient.unix(server.socket) as client:
        client.handshake()
        client.go("test_v1")
        for cookie in range(8):
            client.track(cookie, Pending(Cmd.WRITE, 0, cookie * 4096, 4096))
        client.send(b"".join(request_header(Cmd.WRITE, cookie * 4096, 4096, cookie=cookie)
                             + data[cookie * 4096 : (cookie + 1) * 4096] for cookie in range(8))
                    + request_header(Cmd.DISC))
        replies = client.collect()
        assert client.expect_disconnect() == b""
    assert sorted(replies) == list(range(8)) and all(reply.error == 0 for reply in replies.values())
    with NbdClient.unix(server.socket) as check:
        check.handshake()
        check.go("test_v1")
        assert check.read(0, len(data)) == data


def test_a_write_started_is_answered_while_the_next_payload_is_awaited(start_server):
    """The reader waits for the rest of the second write's payload; the first write,
    started from the same receive, is submitted and answered meanwhile: the client sends
    the rest only once it has that answer."""
    server = start_server({"test_v1": "64M"})
    first, second = pattern(7, 4096), pattern(8, 1 << 20)
    with NbdClient.unix(server.socket) as client:
        client.handshake()
        client.go("test_v1")
        client.track(1, Pending(Cmd.WRITE, 0, 0, len(first)))
        client.track(2, Pending(Cmd.WRITE, 0, 4096, len(second)))
        client.send(request_header(Cmd.WRITE, 0, len(first), cookie=1) + first
                    + request_header(Cmd.WRITE, 4096, len(second), cookie=2) + second[:1000])
        assert client.receive_reply().cookie == 1
        client.send(second[1000:])
        assert client.receive_reply().cookie == 2
        assert client.read(0, 4096 + len(second)) == first + second


def test_a_read_started_is_not_held_back_by_the_throttle_of_the_next(start_server):
    """At one read a second, the second read of a pair sent together waits most of a
    second for the throttle; the first, admitted at once, is answered at once."""
    server = start_server({"test_v1": "64M"}, "--throttle", "iops_rd=1")
    with NbdClient.unix(server.socket) as client:
        client.handshake()
        client.go("test_v1")
        started = time.monotonic()
        send_reads(client, 2, 4096)
        client.receive_reply()
        first = time.monotonic() - started
        client.receive_reply()
        second = time.monotonic() - started
    assert first < 0.5 <= second, (first, second)


def test_drop_sent_keeps_what_a_partial_sendmsg_left():
    buffers = [b"abc", b"", memoryview(b"defgh"), b"ij"]
    assert _drop_sent(buffers, 0) == buffers
    assert [bytes(b) for b in _drop_sent(buffers, 2)] == [b"c", b"", b"defgh", b"ij"]
    assert [bytes(b) for b in _drop_sent(buffers, 3)] == [b"defgh", b"ij"]
    assert [bytes(b) for b in _drop_sent(buffers, 9)] == [b"j"]
    assert _drop_sent(buffers, 10) == []


def test_runs_join_small_buffers_and_leave_big_ones_alone():
    buffers = [b"a" * 3, b"b" * 3, b"c" * 10, b"d", b"e"]
    assert list(_runs(buffers, 6)) == [[b"aaa", b"bbb"], [b"c" * 10], [b"d", b"e"]]


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_receiver_and_sender_over_a_stream_without_sendmsg(chunk):
    """Headers and payloads of any size come through a memory stream exactly."""
    payload = bytes(range(256)) * 1024  # past the direct-receive threshold

    async def main():
        client, server = trio.testing.memory_stream_pair()
        receiver = Receiver(server)

        async def send():
            await Sender(client).send([b"head", payload, b"tail" * 3])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            assert await receiver.receive_exactly(4) == b"head"
            target = memoryview(bytearray(len(payload)))
            await receiver.receive_into(target)
            assert target == payload
            await receiver.discard(4)
            small = memoryview(bytearray(8))
            await receiver.receive_into(small)
            assert bytes(small) == b"tail" * 2

    trio.run(main)


def test_shared_spans_keep_out_held_ones_and_wait_for_none():
    """Whole-sector writes share spans with each other; a read-modify-write holds its
    span alone, and once one waits for a span no new write shares it."""

    async def main():
        lock = RangeLock()
        first, second = object(), object()
        assert lock.try_share(first, 0, 4096)
        assert lock.try_share(second, 0, 4096)  # sharing writers do not wait for each other
        held = trio.Event()

        async def read_modify_write():
            async with lock.hold(512, 1024):
                held.set()
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_modify_write)
            await trio.testing.wait_all_tasks_blocked()
            assert not held.is_set()  # it waits for the shared spans
            assert not lock.try_share(object(), 1000, 2000)  # and keeps new ones out
            assert lock.try_share(object(), 4096, 8192)  # elsewhere, sharing goes on
            lock.unshare(first)
            lock.unshare(second)
            await held.wait()
            assert not lock.try_share(object(), 0, 4096)  # held: no sharing
        assert lock.try_share(object(), 0, 4096)

    trio.run(main)


def test_buffer_pool_reuses_a_returned_buffer_of_the_same_size():
    async def main():
        pool = BufferPool(1 * MiB)
        first = await pool.acquire(4096)
        pool.release(first)
        again = await pool.acquire(4096)
        other = await pool.acquire(8192)
        return first[1] is again[1], other[1] is not first[1], len(other[1])

    assert trio.run(main) == (True, True, 8192)


def test_buffer_pool_holds_at_most_its_capacity_kept_buffers_included():
    async def main():
        pool = BufferPool(1 * MiB)
        held = [await pool.acquire(256 * 1024) for _ in range(4)]
        for h in held:
            pool.release(h)
        # Four kept buffers fill the pool: a request of another size drops what it needs.
        big = await pool.acquire(512 * 1024)
        kept = sum(len(buffers) * size for size, buffers in pool._kept.items())
        granted = False
        with trio.move_on_after(0.1):
            await pool.acquire(768 * 1024)  # only 512 KiB can be free: it waits
            granted = True
        counted = await pool.acquire(512 * 1024, buffer=False)
        return len(big[1]), kept, granted, counted

    assert trio.run(main) == (512 * 1024, 512 * 1024, False, (512 * 1024, None))


def test_buffer_pool_takes_a_request_bigger_than_itself_alone_and_keeps_none_of_it():
    async def main():
        pool = BufferPool(1 * MiB)
        small = await pool.acquire(4096)
        granted = []

        async def big():
            granted.append(await pool.acquire(3 * MiB))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(big)
            await trio.testing.wait_all_tasks_blocked()
            waited = not granted  # a small request is in flight: the big one waits
            pool.release(small)
        counted, buffer = granted[0]
        full = not pool.fits(512)  # the big one fills the pool while it is held
        pool.release(granted[0])
        return waited, counted, len(buffer), full, pool.in_use, pool.kept_bytes

    assert trio.run(main) == (True, 1 * MiB, 3 * MiB, True, 0, 0)
