"""Model tests of the data path's bookkeeping: every structure that keeps per-key
lists or counters (the connection's buffer pool, the bridge's range lock, the
emulated library's request pool, the countdowns of multi-submit transfers), driven by random operation sequences and checked
against a plain model after every step.  A structure whose state can disagree with
itself drops a connection the first time a client's sizes line up (issue 18)."""

from __future__ import annotations

import errno
import sys
import threading

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from pfnbd.store import Store
from pfnbd.transmission import BufferPool
from pfnbd.volume import PF_MAX_IO_SIZE, EmulatedClient, RangeLock, VolumeBridge, _CompletionInbox

CAPACITY = 1 << 16
SIZES = st.sampled_from([0, 512, 4096, 8192, 12288, 32768, CAPACITY, 2 * CAPACITY])  # the last: alone


def test_buffer_pool_drops_kept_buffers_after_taking_the_last_of_a_size():
    """The sequence of issue 18: the kept 10-byte buffer is taken, then room is
    made for 80 bytes by dropping what is kept; the emptied size once raised
    IndexError there."""
    pool = BufferPool(100)
    pool.release(pool.take(10))
    pool.release(pool.take(20))
    pool.take(10)
    size, buffer = pool.take(80)
    assert (size, len(buffer), pool.in_use, pool.kept_bytes) == (80, 80, 90, 0)


class BufferPoolModel(RuleBasedStateMachine):
    """take / acquire / release with and without buffers, against a model of the bytes
    in use and the buffers kept for reuse."""

    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self.pool = BufferPool(CAPACITY)
        self.in_use = 0
        self.kept: dict[int, list[int]] = {}  # size -> ids of the buffers released at it
        self.held_ids: set[int] = set()

    def _took(self, size: int, with_buffer: bool, take):
        """Checks one take of `size` bytes made by `take()`."""
        reusable = list(self.kept.get(size, [])) if with_buffer else []
        held = take()
        counted, buffer = held
        assert counted == min(size, CAPACITY)  # one bigger request counts as the whole pool
        self.in_use += counted
        if with_buffer:
            assert len(buffer) == size
            assert id(buffer) not in self.held_ids, "one buffer handed out twice"
            if reusable:  # a kept buffer of its size is reused, and only of its size
                assert id(buffer) in reusable
                self.kept[size].remove(id(buffer))
            self.held_ids.add(id(buffer))
        else:
            assert buffer is None
        return held

    @rule(target=held, size=SIZES, with_buffer=st.booleans())
    def take(self, size, with_buffer):
        size = size if self.pool.fits(size) else 0
        return self._took(size, with_buffer, lambda: self.pool.take(size, with_buffer))

    @rule(target=held, size=SIZES, with_buffer=st.booleans())
    def acquire_what_fits(self, size, with_buffer):
        size = size if self.pool.fits(size) else 0

        async def acquire():
            with trio.fail_after(1):  # it fits: no wait
                return await self.pool.acquire(size, with_buffer)

        return self._took(size, with_buffer, lambda: trio.run(acquire))

    @rule(held=consumes(held))
    def release(self, held):
        counted, buffer = held
        self.pool.release(held)
        self.in_use -= counted
        if buffer is not None:
            self.held_ids.discard(id(buffer))
            if len(buffer) == counted:  # a buffer bigger than the pool is never kept
                self.kept.setdefault(counted, []).append(id(buffer))

    @invariant()
    def counts_agree(self):
        assert self.pool.in_use == self.in_use
        assert 0 <= self.pool.kept_bytes
        assert self.pool.in_use + self.pool.kept_bytes <= self.pool.capacity
        # Every size the pool keeps has a buffer to give (the bug: an empty list).
        kept = self.pool._kept
        assert all(kept.values()), kept
        assert sum(size * len(buffers) for size, buffers in kept.items()) == self.pool.kept_bytes
        for size, buffers in kept.items():
            assert all(len(buffer) == size for buffer in buffers)
            assert not {id(b) for b in buffers} & self.held_ids, "a held buffer is also kept"
        # The model's kept ids shrink to what the pool still keeps.
        for size in list(self.kept):
            self.kept[size] = [i for i in self.kept[size] if i in {id(b) for b in kept.get(size, [])}]


TestBufferPoolModel = BufferPoolModel.TestCase
TestBufferPoolModel.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


def test_buffer_pool_waiter_gets_room_a_release_makes():
    async def main():
        pool = BufferPool(CAPACITY)
        first = pool.take(CAPACITY // 2)
        second = pool.take(CAPACITY // 2)
        granted = []

        async def waiter():
            granted.append(await pool.acquire(CAPACITY))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not granted
            pool.release(first)
            await trio.testing.wait_all_tasks_blocked()
            assert not granted  # half is not enough, and the kept half is counted
            pool.release(second)
        size, buffer = granted[0]
        assert (size, len(buffer), pool.in_use, pool.kept_bytes) == (CAPACITY, CAPACITY, CAPACITY, 0)

    trio.run(main)


# --- RangeLock -----------------------------------------------------------------------

SPAN = st.tuples(st.integers(0, 15), st.integers(1, 4)).map(lambda s: (s[0] * 512, (s[0] + s[1]) * 512))


def overlapping(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["hold", "share"]), SPAN, st.integers(0, 3)), min_size=1, max_size=30))
def test_range_lock_never_lets_a_hold_overlap_anything_and_ends_empty(operations):
    """Holders and sharers of random spans, each keeping its span for a few
    scheduling rounds: a held span never overlaps another held or shared one, a
    share refused is one that would, and the lock's lists are empty at the end."""
    lock = RangeLock()
    active: dict[object, tuple[str, tuple[int, int]]] = {}

    def check(owner, kind, span):
        for other, (other_kind, other_span) in active.items():
            if other is not owner and overlapping(span, other_span):
                assert kind == other_kind == "share", (kind, span, other_kind, other_span)

    async def holder(span, rounds):
        owner = object()
        async with lock.hold(*span):
            check(owner, "hold", span)
            active[owner] = ("hold", span)
            for _ in range(rounds):
                await trio.lowlevel.checkpoint()
            del active[owner]

    async def sharer(span, rounds):
        owner = object()
        while not lock.try_share(owner, *span):
            await trio.sleep(0)
        check(owner, "share", span)
        active[owner] = ("share", span)
        for _ in range(rounds):
            await trio.lowlevel.checkpoint()
        del active[owner]
        lock.unshare(owner)

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for kind, span, rounds in operations:
                    nursery.start_soon(holder if kind == "hold" else sharer, span, rounds)
                    await trio.lowlevel.checkpoint()
        assert (lock._held, lock._waiting, lock._shared) == ([], [], {})

    trio.run(main)


# --- the emulated library's request pool ------------------------------------------------


@pytest.fixture
def volume(tmp_path):
    store = Store(tmp_path / "data")
    store.create("test_v1", 4 << 20)
    opened = EmulatedClient(store, io_depth=2).open_volume("test_v1")
    yield opened
    opened.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), st.integers(1, PF_MAX_IO_SIZE // 512)), min_size=1, max_size=40))
def test_emulated_pool_refuses_exactly_when_full_and_gives_every_request_back(volume, submits):
    """Submits past the pool (2 x io_depth) get -EAGAIN and nothing else does; once
    every callback has come the pool is empty again and keeps no more write
    buffers than it has requests."""
    pool_size = 4
    completed = threading.Semaphore(0)
    outstanding = 0
    statuses = []

    def callback(arg, status):
        statuses.append(status)
        completed.release()

    # vol_proc waits at its first batch until every submit is made.
    gate = threading.Lock()
    gate.acquire()
    image = volume._image
    real_batch = image.batch

    def gated_batch():
        with gate:
            pass
        return real_batch()

    image.batch = gated_batch
    try:
        for is_write, sectors in submits:
            buffer = memoryview(bytearray(sectors * 512))
            status = volume.iov_submit([buffer], len(buffer), 0, callback, None, is_write)
            if outstanding < pool_size:
                assert status == 0
                outstanding += 1
            else:
                assert status == -errno.EAGAIN
    finally:
        gate.release()
        for _ in range(outstanding):
            assert completed.acquire(timeout=10)
        del image.batch
    assert statuses == [0] * outstanding
    assert volume._in_flight == 0


# --- completion countdowns: start_transfer's and a round of submits' ----------------


class ShuffledBackend:
    """A library whose completions come from its own thread, in random order, some
    failing: what `_Callback` and `_Batch` count down must reach zero exactly once."""

    name = "shuffled"
    size = 64 << 20
    read_only = False
    can_discard = False

    def __init__(self, rng, failures: dict[int, int]) -> None:
        self._rng = rng
        self._failures = failures  # submit number -> the status it completes with
        self.submitted: list[tuple[int, int]] = []
        self._pending: list[tuple[object, object, int]] = []

    def iov_submit(self, iov, length, offset, callback, cbk_arg, is_write):
        number = len(self.submitted)
        self.submitted.append((offset, length))
        self._pending.append((callback, cbk_arg, self._failures.get(number, 0)))
        return 0

    def complete_all(self) -> None:
        """Completes everything submitted so far, shuffled, from another thread."""
        pending, self._pending = self._pending, []
        self._rng.shuffle(pending)
        thread = threading.Thread(target=lambda: [callback(arg, status) for callback, arg, status in pending])
        thread.start()
        thread.join()

    def close(self) -> None:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 8), st.booleans()), min_size=1, max_size=12),
       st.dictionaries(st.integers(0, 60), st.sampled_from([-errno.EIO, -errno.ENOSPC, 0xC3])),
       st.randoms(use_true_random=False))
def test_each_transfer_is_answered_once_with_its_first_failure(transfers, failures, rng):
    async def main():
        backend = ShuffledBackend(rng, failures)
        bridge = VolumeBridge(backend)
        answers: dict[int, list[int]] = {}
        expected: dict[int, set[int]] = {}
        offset = first = 0  # `first`: the number of the transfer's first submit
        for number, (pieces, is_write) in enumerate(transfers):
            buffer = memoryview(bytearray(pieces * PF_MAX_IO_SIZE))
            assert bridge.start_transfer(offset, buffer, is_write,
                                         lambda number, status: answers.setdefault(number, []).append(status), number)
            expected[number] = {failures[n] for n in range(first, first + pieces) if n in failures}
            offset += len(buffer)
            first += pieces
        bridge.submit_started()
        backend.complete_all()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(answers) == list(range(len(transfers)))
        for number, statuses in answers.items():
            assert len(statuses) == 1, f"transfer {number} answered {statuses}"
            assert statuses[0] in expected[number] if expected[number] else statuses[0] == 0
        assert bridge._mutations._shared == {}

    trio.run(main)


def test_the_inbox_delivers_each_completion_once_while_they_keep_coming():
    """Completions arrive from the library's thread while trio delivers earlier ones:
    with no lock between the two, none may be lost or delivered twice."""
    count = 50_000

    async def main():
        inbox = _CompletionInbox(trio.lowlevel.current_trio_token())
        delivered: list[int] = []
        all_in = trio.Event()

        def complete(number: int, status: int) -> None:
            delivered.append(number)
            if len(delivered) == count:
                all_in.set()

        def library() -> None:
            for number in range(count):
                inbox.callback((complete, number), 0)

        thread = threading.Thread(target=library)
        switching = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # the GIL changes hands between any two steps
        try:
            thread.start()
            with trio.fail_after(20):  # a completion lost: never all in (this takes about a second)
                await all_in.wait()
        finally:
            sys.setswitchinterval(switching)
            thread.join()
        await trio.testing.wait_all_tasks_blocked()
        assert delivered == list(range(count))

    trio.run(main)
