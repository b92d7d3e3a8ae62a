"""The PureFlash client emulation keeps the library's rules, and the bridge keeps data."""

import errno
import random
import threading
import tracemalloc

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from pfnbd.store import Store
from pfnbd.volume import (
    PF_MAX_IO_SIZE, SUBMIT_REFUSED, EmulatedClient, Faults, VolumeBridge, VolumeIOError, ZERO_PIECE, chunk_buffers,
)

SIZE = 4 * 1024 * 1024


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path)
    store.create("v", SIZE)
    return store


class Completions:
    """Collects callbacks with the thread they ran on."""

    def __init__(self):
        self.done = threading.Event()
        self.results = []

    def __call__(self, arg, status):
        self.results.append((arg, status, threading.current_thread().name))
        self.done.set()


def test_submit_rules_are_the_librarys(store):
    volume = EmulatedClient(store).open_volume("v")
    try:
        cb = Completions()
        buf = [memoryview(bytearray(512))]
        assert volume.iov_submit(buf, 512, 1, cb, None, False) == -errno.EINVAL
        assert volume.iov_submit([memoryview(bytearray(100))], 100, 0, cb, None, False) == -errno.EINVAL
        big = [memoryview(bytearray(PF_MAX_IO_SIZE + 512))]
        assert volume.iov_submit(big, PF_MAX_IO_SIZE + 512, 0, cb, None, False) == -errno.EINVAL
        assert cb.results == []
    finally:
        volume.close()


def test_callbacks_run_on_the_volumes_own_thread(store):
    volume = EmulatedClient(store).open_volume("v")
    try:
        cb = Completions()
        assert volume.iov_submit([memoryview(bytearray(512))], 512, 0, cb, "arg", False) == 0
        assert cb.done.wait(5)
        ((arg, status, thread),) = cb.results
        assert (arg, status) == ("arg", 0)
        assert thread == "vol_proc:v" != threading.current_thread().name
    finally:
        volume.close()


def test_pool_of_twice_io_depth_then_eagain(store):
    volume = EmulatedClient(store, io_depth=2, faults=Faults(delay=0.2)).open_volume("v")
    try:
        cb = Completions()
        buf = [memoryview(bytearray(512))]
        statuses = [volume.iov_submit(buf, 512, 0, cb, i, False) for i in range(5)]
        assert statuses == [0, 0, 0, 0, -errno.EAGAIN]
    finally:
        volume.close()  # waits for the four in flight
    assert len(cb.results) == 4


def test_write_data_is_copied_at_submit(store):
    volume = EmulatedClient(store, faults=Faults(delay=0.1)).open_volume("v")
    data = bytearray(b"a" * 512)
    cb = Completions()
    try:
        assert volume.iov_submit([memoryview(data)], 512, 0, cb, None, True) == 0
        data[:] = b"b" * 512  # the caller reuses its buffer right away
        assert cb.done.wait(5)
        out = memoryview(bytearray(512))
        cb2 = Completions()
        volume.iov_submit([out], 512, 0, cb2, None, False)
        assert cb2.done.wait(5)
        assert bytes(out) == b"a" * 512
    finally:
        volume.close()


def run_bridge(store, body, retry_time_limit=30.0, **client_options):
    async def main():
        bridge = VolumeBridge(EmulatedClient(store, **client_options).open_volume("v"), retry_time_limit)
        try:
            return await body(bridge)
        finally:
            bridge.close()

    return trio.run(main)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20_000), st.integers(1, 5000)), min_size=1, max_size=12)
       | st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 300_000)), min_size=1, max_size=4),
       st.integers(0, 2**32))
def test_concurrent_unaligned_writes_to_disjoint_ranges_all_land(tmp_path_factory, ranges, seed):
    """Read-modify-write of shared edge sectors must not lose a neighbour's bytes."""
    store = Store(tmp_path_factory.mktemp("d"))
    store.create("v", SIZE)
    # Make the ranges disjoint (they may still share sectors) by trimming overlaps.
    spans, taken = [], []
    for offset, length in sorted(ranges):
        end = min(SIZE, offset + length)
        if taken and offset < taken[-1]:
            offset = taken[-1]
        if offset < end:
            spans.append((offset, end))
            taken.append(end)
    rng = random.Random(seed)
    model = bytearray(SIZE)
    writes = []
    for offset, end in spans:
        data = rng.randbytes(end - offset)
        model[offset:end] = data
        writes.append((offset, data))

    async def body(bridge):
        async with trio.open_nursery() as nursery:
            for offset, data in writes:
                nursery.start_soon(bridge.write, offset, memoryview(bytearray(data)))
        return bytes(await bridge.read(0, SIZE))

    assert run_bridge(store, body) == bytes(model)


def test_unaligned_read_and_write_round_trip(store):
    async def body(bridge):
        await bridge.write(1, memoryview(bytearray(b"\x5a")))
        await bridge.write(1000, memoryview(bytearray(b"xyz" * 100_000)))
        return bytes(await bridge.read(0, 3)), bytes(await bridge.read(999, 5)), bytes(await bridge.read(300_999, 2))

    assert run_bridge(store, body) == (b"\0\x5a\0", b"\0xyzx", b"z\0")


def test_write_zeroes_and_trim_leave_holes_that_read_as_zeroes(store):
    async def body(bridge):
        await bridge.write(0, memoryview(bytearray(b"\xff" * SIZE)))
        await bridge.write_zeroes(1000, 1_000_000, may_trim=True)
        await bridge.trim(2_000_000, 100_000)
        return bytes(await bridge.read(0, SIZE)), list(bridge.extents(0, SIZE))

    data, extents = run_bridge(store, body)
    expected = bytearray(b"\xff" * SIZE)
    expected[1000:1_001_000] = bytes(1_000_000)
    # Trim releases whole sectors only: its partial edge sectors keep their data.
    trimmed_start, trimmed_end = -(-2_000_000 // 512) * 512, 2_100_000 // 512 * 512
    expected[trimmed_start:trimmed_end] = bytes(trimmed_end - trimmed_start)
    assert data == bytes(expected)
    holes = [(e.offset, e.offset + e.length) for e in extents if not e.allocated]
    assert holes and all(1000 <= lo and hi <= 2_100_000 for lo, hi in holes)


def test_no_hole_zeroes_stay_allocated(store):
    async def body(bridge):
        await bridge.write_zeroes(0, 1 << 20, may_trim=False)
        return list(bridge.extents(0, 1 << 20))

    assert [e.allocated for e in run_bridge(store, body)] == [True]


def test_no_hole_zeroes_of_a_large_range_hold_memory_and_the_range_a_piece_at_a_time(tmp_path):
    size = 256 << 20
    store = Store(tmp_path)
    store.create("v", size)
    finished = []

    async def zero_all(bridge):
        await bridge.write_zeroes(0, size, may_trim=False)
        finished.append("zeroes")

    async def write_start(bridge):
        await bridge.write(0, memoryview(b"\xaa" * 4096))
        finished.append("write")

    async def body(bridge):
        await bridge.write_zeroes(0, 16 << 20, may_trim=False)  # what is made once
        tracemalloc.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(zero_all, bridge)
                await trio.sleep(0.01)  # the zeroing is under way, past its first piece
                nursery.start_soon(write_start, bridge)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak = run_bridge(store, body)
    # The emulated library copies what it is given to write, as the real one does: at
    # most a piece of it is in flight.
    assert peak < ZERO_PIECE + (2 << 20), f"zeroing {size} bytes took {peak} bytes of memory"
    # A write at the start waited for the piece it overlapped, not for the whole range.
    assert finished == ["write", "zeroes"]


def test_eagain_storm_is_retried_until_done(store):
    payload = random.Random(1).randbytes(SIZE)

    async def body(bridge):
        await bridge.write(0, memoryview(bytearray(payload)))
        return bytes(await bridge.read(0, SIZE))

    assert run_bridge(store, body, io_depth=1) == payload


def test_retryable_failures_are_retried(store):
    payload = random.Random(2).randbytes(1 << 20)

    async def body(bridge):
        await bridge.write(0, memoryview(bytearray(payload)))
        return bytes(await bridge.read(0, 1 << 20))

    assert run_bridge(store, body, faults=Faults(error_rate=0.3, status=0xC3, seed=7)) == payload


@pytest.mark.parametrize("status", [-errno.EIO, 0xC3])
def test_persistent_failures_surface_as_errors(store, status):
    async def body(bridge):
        with pytest.raises(VolumeIOError) as failure:
            await bridge.write(0, memoryview(bytearray(4096)))
        return failure.value.errno

    faults = Faults(error_rate=1.0, status=status)
    assert run_bridge(store, body, retry_time_limit=0.5, faults=faults) == errno.EIO


def test_chunk_buffers_regroups_without_copying():
    a, b = memoryview(bytearray(300)), memoryview(bytearray(500))
    chunks = list(chunk_buffers([a, b], 512))
    assert [sum(map(len, c)) for c in chunks] == [512, 288]
    assert all(piece.obj in (a.obj, b.obj) for c in chunks for piece in c)


def test_injected_delay_is_latency_not_a_queue(store):
    """64 reads delayed 0.2 s each overlap, as round trips to a cluster would."""

    async def body(bridge):
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(bridge.read, i * 4096, 4096)
        return trio.current_time() - start

    assert run_bridge(store, body, faults=Faults(delay=0.2)) < 0.2 * 64 / 4


class Answers:
    """The `on_done` of `start_transfer`: keeps every status it is called with, and
    checks that it comes with its transfer's token."""

    def __init__(self):
        self.statuses = []
        self.first = trio.Event()

    def __call__(self, token, status):
        assert token is self
        self.statuses.append(status)
        self.first.set()


def test_start_transfer_runs_a_request_as_many_submits_and_answers_once(store):
    payload = random.Random(3).randbytes(5 * PF_MAX_IO_SIZE + 4096)

    async def body(bridge):
        answers = Answers()
        assert bridge.start_transfer(8192, memoryview(bytearray(payload)), True, answers, answers)
        bridge.submit_started()
        await answers.first.wait()
        await trio.sleep(0.05)  # a second answer would come in this time
        return answers.statuses, bytes(await bridge.read(8192, len(payload)))

    assert run_bridge(store, body) == ([0], payload)


def test_start_transfer_refused_midway_reports_a_retryable_status(store):
    async def body(bridge):
        answers, refused = Answers(), Answers()
        # A pool of two requests: the third submit of four is refused.
        assert bridge.start_transfer(0, memoryview(bytearray(4 * PF_MAX_IO_SIZE)), False, answers, answers)
        # With the pool full, a transfer whose only submit is refused is answered at once.
        assert bridge.start_transfer(0, memoryview(bytearray(4096)), True, refused, refused)
        bridge.submit_started()
        assert refused.statuses == [SUBMIT_REFUSED]
        await answers.first.wait()
        return answers.statuses, bridge.retryable(answers.statuses[0]), bridge.counters.eagain_resubmits

    assert run_bridge(store, body, io_depth=1, faults=Faults(delay=0.2)) == ([SUBMIT_REFUSED], True, 3)


def test_started_transfers_wait_for_submit_started(store):
    """Nothing reaches the library before `submit_started`: the reader's requests of
    one receive go to it together."""

    async def body(bridge):
        answers = Answers()
        assert bridge.start_transfer(0, memoryview(bytearray(4096)), False, answers, answers)
        await trio.sleep(0.05)
        before = list(answers.statuses), bridge.counters.submits
        bridge.submit_started()
        await answers.first.wait()
        return before, answers.statuses, bridge.counters.submits

    assert run_bridge(store, body) == (([], 0), [0], 1)


def test_start_transfer_takes_only_whole_sectors(store):
    async def body(bridge):
        never = lambda token, status: pytest.fail("nothing was started")  # noqa: E731
        return [bridge.start_transfer(offset, memoryview(bytearray(length)), True, never, None)
                for offset, length in [(1, 512), (0, 100), (0, 0)]]

    assert run_bridge(store, body) == [False, False, False]
