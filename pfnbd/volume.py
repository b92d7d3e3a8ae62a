"""PureFlash volumes for the NBD layer: the client-library emulation and the bridge.

Two halves, one narrow interface between them (`VolumeBackend`):

* `EmulatedClient` / `EmulatedVolume` behave like PureFlash's `libs5common` against a
  cluster embedded in the data directory: submits of 512-aligned chunks of at most
  128 KiB, `-EAGAIN` once `2 * io_depth` are in flight, write data copied at submit,
  and completion callbacks delivered on the volume's own thread (`vol_proc`), never
  the submitter's.  `pureflash.py` binds the real library to the same interface.

* `VolumeBridge` turns NBD requests into such submits from trio: it splits a request
  into chunks, submits them all, retries `-EAGAIN` with backoff, and parks the
  requesting task until the last callback.  Callbacks cross into trio only through
  `TrioToken.run_sync_soon`, in batches (the trio form of QEMU's pfbd bottom half).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Protocol, TypeVar

import attrs
import trio

from .cpus import current_cpu, follow, yield_on_wakeup
from .store import Extent, HeadImage, ReadOnlyHead, SnapshotImage, Store, StoreError, split_snapshot_name

log = logging.getLogger(__name__)

# The client library's constants (pf_client_api.h).
PF_MAX_IO_DEPTH = 255
PF_MAX_IO_SIZE = 128 << 10
S5_LIB_VER = 0x00010000
DEFAULT_IO_DEPTH = 120
SECTOR = 512

T = TypeVar("T")
IoHandler = Callable[[object, int], None]  # ulp_io_handler(cbk_arg, complete_status)
NO_DATA = memoryview(b"")


class VolumeOpenError(Exception):
    pass


class VolumeBackend(Protocol):
    """An open PureFlash volume: the C API's calls plus what the cluster can tell.

    `iov_submit` is `pf_iov_submit`.  The rest are what the NBD layer needs beyond it,
    each with a meaning the real library can honour:
    `can_discard`/`discard_submit` release space (the real library has no such call,
    so it says no and the bridge writes zeros); `allocation` reports what was never
    written (the real library reports everything allocated); `flush` makes completed
    writes durable (a no-op for the real library: an acknowledged write is already
    on its replicas); `changes(since, ...)` reports where the volume may differ from
    its snapshot `since`, for each snapshot in `dirty_bitmaps`, and `depths` which
    layer of a snapshot's chain each byte comes from, where `has_depths` (neither
    for the real library, whose client API cannot tell).
    """

    name: str  # VOLUME or VOLUME@SNAP, for the log
    size: int
    read_only: bool
    can_discard: bool
    dirty_bitmaps: Sequence[str]  # older snapshots `changes` can compare with
    has_depths: bool

    def iov_submit(
        self, iov: Sequence[memoryview], length: int, offset: int,
        callback: IoHandler, cbk_arg: object, is_write: bool,
    ) -> int: ...

    def discard_submit(self, offset: int, length: int, callback: IoHandler, cbk_arg: object) -> int: ...

    def allocation(self, offset: int, length: int) -> Iterator[Extent]: ...

    def changes(self, since: str, offset: int, length: int) -> Iterator[Extent]: ...

    def depths(self, offset: int, length: int) -> Iterator[tuple[int, int]]: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class VolumeClient(Protocol):
    """Opens volumes: the emulated cluster's client, or the real library's binding."""

    def open_volume(self, name: str, snap: str | None = None) -> VolumeBackend: ...


# ---------------------------------------------------------------------------
# The emulated client library.


# Not frozen: a frozen class costs a setattr call per field, per I/O.  Compared by
# identity: `vol_proc` looks for its closing None among them.
@attrs.define(eq=False)
class _Io:
    kind: str  # "read", "write" or "discard"
    offset: int
    length: int
    buffers: Sequence[memoryview] | memoryview  # the caller's for a read, the library's own copy for a write
    callback: IoHandler
    cbk_arg: object


@attrs.frozen
class Faults:
    """Faults the emulated library injects, to test what sits above it.

    `error_rate` of completions fail with `status` (a negative errno or a positive
    PureFlash status such as 0xC3) without doing their I/O; every completion is
    delayed by `delay` seconds.  A tiny `io_depth` on the client makes -EAGAIN storms.
    """

    error_rate: float = 0.0
    status: int = -errno.EIO
    delay: float = 0.0
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if self.status == 0:
            raise ValueError("an injected status must be non-zero")
        if self.delay < 0:
            raise ValueError("delay must not be negative")


class EmulatedClient:
    """`pf_open_volume` against the embedded cluster in a data directory."""

    def __init__(self, store: Store, io_depth: int = DEFAULT_IO_DEPTH, faults: Faults = Faults(),
                 read_only: bool = False) -> None:
        self.store = store
        self.io_depth = io_depth
        self.faults = faults
        self.read_only = read_only  # heads open read-only too, taking no writer's lock

    def open_volume(self, name: str, snap: str | None = None, lib_ver: int = S5_LIB_VER) -> EmulatedVolume:
        """Opens a volume's head, or read-only one of its snapshots."""
        if lib_ver != S5_LIB_VER:
            raise VolumeOpenError(f"library version {lib_ver:#x} is not {S5_LIB_VER:#x}")
        if not 0 < self.io_depth <= PF_MAX_IO_DEPTH:
            raise VolumeOpenError(f"io_depth must be 1..{PF_MAX_IO_DEPTH}")
        export = f"{name}@{snap}" if snap else name
        try:
            image = self.store.open_image(export, self.read_only)
        except StoreError as error:  # as the real binding: a volume that cannot be opened
            raise VolumeOpenError(str(error)) from None
        return EmulatedVolume(self.store, image, export, self.io_depth, self.faults)


class EmulatedVolume:
    can_discard = True

    def __init__(self, store: Store, image: HeadImage | ReadOnlyHead | SnapshotImage, name: str, io_depth: int,
                 faults: Faults = Faults()) -> None:
        self._store = store
        self._image = image
        self._volume, self._snapshot = split_snapshot_name(name)
        meta = store.get(self._volume)
        older = meta.snapshots[: meta.snapshot_index(self._snapshot)] if self._snapshot else meta.snapshots
        self.dirty_bitmaps = tuple(snapshot.name for snapshot in older)
        self.has_depths = isinstance(image, SnapshotImage)
        self._faults = faults
        self._random = random.Random(faults.seed)
        self.name = name
        self.size = image.size
        self.read_only = not image.writable
        self._pool_size = 2 * io_depth
        self._in_flight = 0
        self._closed = False
        self._pool_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Io | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._vol_proc, name=f"vol_proc:{name}", daemon=True)
        self._thread.start()

    # -- the submitting side (any thread) ---------------------------------

    def iov_submit(
        self, iov: Sequence[memoryview], length: int, offset: int,
        callback: IoHandler, cbk_arg: object, is_write: bool,
    ) -> int:
        if self._closed:
            return -errno.EBADF
        # Past the end is refused as the real binding refuses it (the library itself
        # would index a shard that does not exist).
        if offset % SECTOR or length % SECTOR or length > PF_MAX_IO_SIZE or offset + length > self.size:
            return -errno.EINVAL
        if is_write and self.read_only:
            return -errno.EROFS
        if not self._take_slot():
            return -errno.EAGAIN
        if not is_write:  # reads land in `iov`
            self._queue.put(_Io("read", offset, length, iov, callback, cbk_arg))
            return 0
        # Write data is the library's own copy from here on, as the real library's is
        # (its buffers are 128 KiB each; these are the write's size, so that 4 KiB
        # writes do not hold 128 KiB each).
        data = memoryview(bytearray(iov[0]) if len(iov) == 1 else bytearray().join(iov))
        if len(data) != length:  # iovecs longer than the length given: the library takes `length`
            data = data[:length]
        self._queue.put(_Io("write", offset, length, data, callback, cbk_arg))
        return 0

    def discard_submit(self, offset: int, length: int, callback: IoHandler, cbk_arg: object) -> int:
        if self._closed:
            return -errno.EBADF
        if offset % SECTOR or length % SECTOR or offset + length > self.size:
            return -errno.EINVAL
        if self.read_only:
            return -errno.EROFS
        if not self._take_slot():
            return -errno.EAGAIN
        self._queue.put(_Io("discard", offset, length, NO_DATA, callback, cbk_arg))
        return 0

    def _take_slot(self) -> bool:
        """One request of the pool; False when every request is taken."""
        with self._pool_lock:
            if self._in_flight >= self._pool_size:
                return False
            self._in_flight += 1
            return True

    def allocation(self, offset: int, length: int) -> Iterator[Extent]:
        return self._image.extents(offset, length)

    def changes(self, since: str, offset: int, length: int) -> Iterator[Extent]:
        try:
            yield from self._store.changes(self._volume, since, self._snapshot, offset, length)
        except StoreError as error:  # `since` deleted meanwhile
            raise OSError(errno.ENOENT, str(error)) from None

    def depths(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        return self._image.depths(offset, length)

    def flush(self) -> None:
        self._image.sync()

    def close(self) -> None:
        """Waits for every in-flight I/O, like `pf_close_volume`; submits after it get
        -EBADF (the binding's answer for a closed handle), and a second close is harmless."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._image.close()

    # -- vol_proc: the volume's own thread --------------------------------

    def _vol_proc(self) -> None:
        yield_on_wakeup()  # a submit wakes it without preempting the submitter
        # It takes every I/O queued at once, executes them, then completes them: one
        # burst of callbacks per batch, which the bridge carries into trio together.
        # Completions held back by an injected delay wait in `delayed`, due time
        # first: each I/O is late by the delay, but they overlap as a network's round
        # trips would.
        delayed: list[tuple[float, int, _Io, int]] = []
        sequence = itertools.count()
        while self._run_batch(delayed, sequence):
            pass

    def _run_batch(self, delayed: list[tuple[float, int, _Io, int]], sequence: Iterator[int]) -> bool:
        """One batch; False once the volume is closing.  A method of its own so that
        nothing of a completed batch (its I/Os' buffers, which are the submitter's
        again) stays referenced while the next one is awaited."""
        timeout = max(0.0, delayed[0][0] - time.monotonic()) if delayed else None
        taken = self._take_queued(timeout)  # never wait while holding the batch
        closing = None in taken  # the last: nothing is submitted after it
        finished = self._execute_batch([io for io in taken if io is not None])
        if self._faults.delay:
            due = time.monotonic() + self._faults.delay
            for io, status in finished:
                heapq.heappush(delayed, (due, next(sequence), io, status))
            finished = []
        now = time.monotonic()
        while delayed and (closing or delayed[0][0] <= now):
            _, _, io, status = heapq.heappop(delayed)
            finished.append((io, status))
        self._complete(finished)
        return not closing

    def _take_queued(self, timeout: float | None) -> list[_Io | None]:
        """Everything queued, waiting up to `timeout` for the first; [] if none came."""
        try:
            taken = [self._queue.get_nowait()]
        except queue.Empty:
            try:
                self._image.idle()  # about to wait: nothing is kept from other processes
            except Exception:  # the barrier goes with the next batch's release instead
                log.exception("volume %s: letting the snapshot barrier go failed", self.name)
            try:
                taken = [self._queue.get(timeout=timeout)]
            except queue.Empty:
                return []
        while True:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                return taken

    def _execute_batch(self, ios: list[_Io]) -> list[tuple[_Io, int]]:
        """Each I/O with its status.  The image failing to start or end a batch fails
        every I/O of it: one may have been done, but none is reported done."""
        if not ios:
            return []
        try:
            with self._image.batch():
                statuses = self._execute_in_order(ios)
        except Exception:
            log.exception("volume %s: a batch of %d I/Os failed", self.name, len(ios))
            return [(io, -errno.EIO) for io in ios]
        return list(zip(ios, statuses))

    def _execute_in_order(self, ios: list[_Io]) -> list[int]:
        """Runs of reads and writes of one buffer go to the image together (in one
        system call where the kernel allows, pfnbd/aio.py); a discard or a scattered
        read goes on its own between them."""
        statuses: list[int] = []
        run: list[_Io] = []
        for io in ios:
            if io.length and (io.kind == "write" or (io.kind == "read" and len(io.buffers) == 1)):
                run.append(io)
                continue
            statuses += self._transfer_run(run)
            run = []
            statuses.append(self._execute(io))
        return statuses + self._transfer_run(run)

    def _complete(self, finished: list[tuple[_Io, int]]) -> None:
        with self._pool_lock:
            self._in_flight -= len(finished)
        for io, status in finished:
            try:
                io.callback(io.cbk_arg, status)
            except Exception:  # the submitter's bug: the other callbacks are still owed
                log.exception("volume %s: the callback of a %s raised", self.name, io.kind)

    def _injected_fault(self) -> int:
        if self._faults.error_rate and self._random.random() < self._faults.error_rate:
            return self._faults.status
        return 0

    def _transfer_run(self, run: list[_Io]) -> list[int]:
        faults = [self._injected_fault() for _ in run] if self._faults.error_rate else None
        chosen = run if faults is None else [io for io, fault in zip(run, faults) if not fault]
        if not chosen:
            return faults or []
        try:
            results = self._image.transfers([
                (True, io.buffers, io.offset) if io.kind == "write" else (False, io.buffers[0], io.offset)
                for io in chosen])
        except Exception:  # a bug must fail these I/Os, not end the thread every submitter waits on
            log.exception("volume %s: %d transfers failed", self.name, len(chosen))
            results = [-errno.EIO] * len(chosen)
        statuses = [0] * len(chosen)
        for index, (io, result) in enumerate(zip(chosen, results)):
            if result >= io.length:
                continue
            if result < 0:
                log.error("volume %s: %s at offset %d failed: %s", self.name, io.kind, io.offset,
                          os.strerror(-result))
                statuses[index] = result
            elif io.kind == "read":  # past the end of the image file: zeros
                _zero_tail(io.buffers, result)
            else:  # the image writes whole or fails: never report part of a write done
                log.error("volume %s: write at offset %d stored %d of %d bytes", self.name, io.offset,
                          result, io.length)
                statuses[index] = -errno.EIO
        if faults is None:
            return statuses
        done = iter(statuses)
        return [fault or next(done) for fault in faults]

    def _execute(self, io: _Io) -> int:
        """A discard, a scattered read or an empty transfer."""
        if status := self._injected_fault():
            return status
        try:
            if io.kind == "discard":
                self._image.punch_hole(io.offset, io.length)
            elif io.kind == "read":
                done = self._image.readv(io.buffers, io.offset)
                if done < io.length:  # past the end of the image file: zeros
                    _zero_tail(io.buffers, done)
            else:
                self._image.writev([io.buffers], io.offset)
        except OSError as error:
            log.error("volume %s: %s at offset %d failed: %s", self.name, io.kind, io.offset, error)
            return -(error.errno or errno.EIO)
        except Exception:  # a bug must fail this I/O, not end the thread every submitter waits on
            log.exception("volume %s: %s at offset %d failed", self.name, io.kind, io.offset)
            return -errno.EIO
        return 0


def _zero_tail(buffers: Sequence[memoryview], start: int) -> None:
    position = 0
    for buffer in buffers:
        end = position + len(buffer)
        if end > start:
            cut = max(0, start - position)
            buffer[cut:] = bytes(len(buffer) - cut)
        position = end


# ---------------------------------------------------------------------------
# The bridge from trio to a backend.


class VolumeIOError(Exception):
    """A submit or completion failed; `errno` is a positive host errno."""

    def __init__(self, status: int, reason: str | None = None) -> None:
        self.status = status
        # Positive statuses are PureFlash message statuses (0xC3 connection lost...).
        self.errno = -status if status < 0 else errno.EIO
        super().__init__(reason or (f"PureFlash I/O failed with status {status:#x}" if status > 0
                                    else f"PureFlash I/O failed: {errno.errorcode.get(-status, -status)}"))


class _Batch:
    """One round of submits: the task parks until the last one completes."""

    __slots__ = ("task", "outstanding", "failures")

    def __init__(self) -> None:
        self.task = trio.lowlevel.current_task()
        self.outstanding = 1  # the submitter's own hold, dropped once all are submitted
        self.failures: dict[int, int] = {}  # submit index -> status

    def complete(self, index: int, status: int) -> None:
        if status:
            self.failures[index] = status
        self.outstanding -= 1
        if self.outstanding == 0:
            trio.lowlevel.reschedule(self.task)


class _Callback:
    """Submits whose completion calls `function(token, status)` in trio: no task waits
    on them.

    `status` is 0, or the first failure.  A write's span in the bridge's `RangeLock`
    is shared until the last submit completes."""

    __slots__ = ("function", "token", "mutations", "outstanding", "status")

    def __init__(self, function: Callable[[T, int], None], token: T, mutations: RangeLock | None,
                 submits: int) -> None:
        self.function = function
        self.token = token
        self.mutations = mutations
        self.outstanding = submits
        self.status = 0

    def complete(self, index: int, status: int) -> None:
        if status and not self.status:
            self.status = status
        self.outstanding -= 1
        if self.outstanding:
            return
        if self.mutations is not None:
            self.mutations.unshare(self)
        self.function(self.token, self.status)


class _CompletionInbox:
    """Carries callbacks from the library's thread into trio, a batch per wake-up, and
    keeps that thread on the trio thread's CPU (pfnbd/cpus.py says why).

    A submit's `cbk_arg` is `(complete, arg)`: its completion calls `complete(arg,
    status)` in trio."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        # Appended to by the library's threads and emptied by trio with no lock: a
        # deque's append and popleft are each atomic.
        self._pending: deque[tuple[tuple[Callable[[Any, int], None], Any], int]] = deque()
        # A `_deliver` is on its way.  Set by the library's thread, cleared by
        # `_deliver` before it looks at what is pending: whatever comes after that
        # schedules the next one.
        self._scheduled = False
        self._trio_cpu = current_cpu()  # written in trio, read by the library's thread

    def callback(self, cbk_arg: object, status: int) -> None:  # runs on the library's thread
        self._pending.append((cbk_arg, status))
        if not self._scheduled:
            self._scheduled = True
            follow(self._trio_cpu)
            self._token.run_sync_soon(self._deliver)

    def _deliver(self) -> None:  # runs in trio
        self._trio_cpu = current_cpu()
        self._scheduled = False
        pending = self._pending
        for _ in range(len(pending)):
            (complete, arg), status = pending.popleft()
            complete(arg, status)


class RangeLock:
    """Serialises mutations whose sector-aligned spans overlap.

    A write that is not sector-aligned is a read-modify-write of its edge sectors; any
    other mutation of those sectors in between would be lost, so they wait (`hold`).
    A write of whole sectors in one submit loses nobody's data and is lost by nobody
    but such a read-modify-write: it only shares its span (`try_share`), which keeps
    out, and stays out of, the held spans and those waiting to be held.
    """

    def __init__(self) -> None:
        self._held: list[tuple[int, int]] = []
        self._waiting: list[tuple[int, int]] = []
        self._shared: dict[object, tuple[int, int]] = {}  # owner -> span
        self._released = trio.lowlevel.ParkingLot()

    @asynccontextmanager
    async def hold(self, start: int, end: int):
        span = (start, end)
        if _overlap(self._held, span) or _overlap(self._shared.values(), span):
            self._waiting.append(span)
            try:
                while _overlap(self._held, span) or _overlap(self._shared.values(), span):
                    await self._released.park()
            finally:
                self._waiting.remove(span)
        self._held.append(span)
        try:
            yield
        finally:
            self._held.remove(span)
            self._released.unpark_all()

    def try_share(self, owner: object, start: int, end: int) -> bool:
        """Shares [start, end) under `owner` unless it is held or waited for."""
        span = (start, end)
        if (self._held or self._waiting) and (_overlap(self._held, span) or _overlap(self._waiting, span)):
            return False
        self._shared[owner] = span
        return True

    def unshare(self, owner: object) -> None:
        del self._shared[owner]
        if self._waiting:  # who parks on `_released` waits in `hold`, its span in `_waiting`
            self._released.unpark_all()


def _overlap(spans: Iterable[tuple[int, int]], span: tuple[int, int]) -> bool:
    start, end = span
    return any(s < end and start < e for s, e in spans)


ZEROES = memoryview(bytes(PF_MAX_IO_SIZE))
ZERO_PIECE = 16 << 20  # WRITE_ZEROES and TRIM work, and hold their range, this much at a time
CACHE_CHUNK = 64 * PF_MAX_IO_SIZE  # a CACHE request reads this much at a time
EAGAIN_FIRST_DELAY = 50e-6
EAGAIN_MAX_DELAY = 10e-3
DISCARD_CHUNK = 1 << 30
# Completion statuses worth resubmitting: the library was busy, or lost its
# connection to a store node and may find another (PureFlash message statuses).
PF_STATUS_CONNECTION_LOST = 0xC3
PF_STATUS_NO_RESOURCE = 0xCF
# What `submit_started` completes a submit with that the library refused with -EAGAIN
# (counted then as an EAGAIN resubmit), so that its caller can tell it from an
# -EAGAIN the library's callback reports for an I/O it took, which is a retry.  No
# status of the library's is this value: it is neither an errno nor a message status.
SUBMIT_REFUSED = -errno.EAGAIN - (1 << 16)
RETRYABLE = {-errno.EAGAIN, PF_STATUS_CONNECTION_LOST, PF_STATUS_NO_RESOURCE, SUBMIT_REFUSED}
RETRY_TIME_LIMIT = 30.0  # as PureFlash's io_timeout: past it, the cluster is gone
RETRY_FIRST_DELAY = 1e-3
RETRY_MAX_DELAY = 1.0

Submit = Callable[[IoHandler, object], int]  # one pf_*_submit call, given callback and cbk_arg


def align_down(n: int) -> int:
    return n - n % SECTOR


def align_up(n: int) -> int:
    return align_down(n + SECTOR - 1)


def chunk_buffers(buffers: Sequence[memoryview], limit: int) -> Iterator[list[memoryview]]:
    """Regroups buffers into lists of at most `limit` bytes, views only, no copies."""
    chunk: list[memoryview] = []
    room = limit
    for buffer in buffers:
        while buffer:
            piece, buffer = buffer[:room], buffer[room:]
            chunk.append(piece)
            room -= len(piece)
            if room == 0:
                yield chunk
                chunk, room = [], limit
    if chunk:
        yield chunk


@attrs.define
class BackendCounters:
    """What a bridge asked of its backend, for metrics."""

    submits: int = 0  # calls of the library's submit functions, resubmits included
    eagain_resubmits: int = 0  # submits made again because the library said -EAGAIN
    retries: int = 0  # times failed submits were made again after a transient completion status

    def add(self, other: BackendCounters) -> None:
        self.submits += other.submits
        self.eagain_resubmits += other.eagain_resubmits
        self.retries += other.retries


class VolumeBridge:
    """NBD-shaped operations on a backend volume, for trio tasks.

    Offsets and lengths are in bytes and need no alignment; bounds are the caller's
    to check (the library does not).  Errors raise `VolumeIOError`.

    Without `partial_sectors` (other processes write the volume too), a write or
    zeroing that is not whole sectors fails with EINVAL: its read-modify-write of an
    edge sector is kept from other mutations of that sector only in this process, and
    would lose another process's write to the rest of the sector.
    """

    def __init__(self, backend: VolumeBackend, retry_time_limit: float = RETRY_TIME_LIMIT,
                 partial_sectors: bool = True) -> None:
        self.backend = backend
        self.retry_time_limit = retry_time_limit
        self.partial_sectors = partial_sectors
        self.size = backend.size
        self._inbox = _CompletionInbox(trio.lowlevel.current_trio_token())
        self._mutations = RangeLock()
        # Set once a flush fails.  The kernel may have dropped the dirty pages of the
        # writes that flush covered, so a later flush that succeeds would prove
        # nothing: writes and flushes fail until the volume is opened again.
        self._flush_failure: VolumeIOError | None = None
        self._closed = False
        self.counters = BackendCounters()
        # What `start_transfer` started and `submit_started` has not submitted yet:
        # (piece, offset, cbk_arg, is_write).  Trio's alone.
        self._started: list[tuple[memoryview, int, object, bool]] = []

    # -- submitting -------------------------------------------------------

    async def _submit_all(self, submits: Sequence[Submit]) -> None:
        """Runs every submit to completion, retrying what PureFlash says is transient."""
        pending = range(len(submits))
        delay = RETRY_FIRST_DELAY
        deadline = trio.current_time() + self.retry_time_limit
        while failures := await self._submit_round(submits, pending):
            status = next(iter(failures.values()))
            if trio.current_time() >= deadline or not all(map(self.retryable, failures.values())):
                raise VolumeIOError(status)
            log.debug("retrying %d of %d submits after status %#x", len(failures), len(submits), status)
            self.counters.retries += 1
            with trio.CancelScope(shield=True):  # a retried write must finish, as any other
                await trio.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_DELAY)
            pending = sorted(failures)

    async def _submit_round(self, submits: Sequence[Submit], indices: Iterable[int]) -> dict[int, int]:
        """Submits `indices` of `submits` and waits for their callbacks: the failed
        ones, with their statuses.  A submit refused outright ends the round, and it
        counts as failed with that status, as does every submit after it, never made."""
        batch = _Batch()
        indices = list(indices)
        counters = self.counters
        # The library owns our buffers until every callback: never abandon a batch.
        with trio.CancelScope(shield=True):
            for position, index in enumerate(indices):
                delay = EAGAIN_FIRST_DELAY
                counters.submits += 1
                while (status := submits[index](self._inbox.callback, (batch.complete, index))) == -errno.EAGAIN:
                    counters.submits += 1
                    counters.eagain_resubmits += 1
                    await trio.sleep(delay)
                    delay = min(2 * delay, EAGAIN_MAX_DELAY)
                if status:
                    batch.failures.update(dict.fromkeys(indices[position:], status))
                    break
                batch.outstanding += 1
            batch.outstanding -= 1
            if batch.outstanding:
                await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return batch.failures

    async def _transfer(self, offset: int, buffers: Sequence[memoryview], is_write: bool) -> None:
        """Reads into or writes from `buffers` at an aligned offset, 128 KiB a submit."""
        submits = []
        position = offset
        for iov in chunk_buffers(buffers, PF_MAX_IO_SIZE):
            length = sum(map(len, iov))
            submits.append(lambda cb, arg, iov=iov, length=length, at=position: (
                self.backend.iov_submit(iov, length, at, cb, arg, is_write)))
            position += length
        await self._submit_all(submits)

    async def _discard(self, offset: int, length: int) -> None:
        await self._submit_all([
            lambda cb, arg, start=start: self.backend.discard_submit(
                start, min(DISCARD_CHUNK, offset + length - start), cb, arg)
            for start in range(offset, offset + length, DISCARD_CHUNK)
        ])

    def start_transfer(self, offset: int, buffer: memoryview, is_write: bool,
                       on_done: Callable[[T, int], None], token: T) -> bool:
        """Starts a transfer of whole sectors, 128 KiB a submit, with no task to park.

        Its submits are made by the next `submit_started`: the caller starts the
        transfers one receive brought, then submits them back to back, so that the
        library's thread is woken once for all of them rather than once each.

        `on_done(token, status)` runs in trio once every submit has completed: 0, or
        the first status one failed with, a submit the library refused included
        (with `SUBMIT_REFUSED` for its -EAGAIN; `retryable` says whether `read`/`write`
        would have tried again).  False, with
        nothing started, when only `read`/`write` can do it: not whole sectors, or in
        conflict with a mutation.
        """
        length = len(buffer)
        if not (length and self.whole_sectors(offset, length)) or (is_write and self._flush_failure):
            return False
        started = self._started
        if length <= PF_MAX_IO_SIZE and not is_write:  # the commonest request: one submit, no span to unshare
            started.append((buffer, offset, (on_done, token), False))
            return True
        completion = _Callback(on_done, token, self._mutations if is_write else None, -(-length // PF_MAX_IO_SIZE))
        if is_write and not self._mutations.try_share(completion, offset, offset + length):
            return False
        cbk_arg = (completion.complete, 0)
        if length <= PF_MAX_IO_SIZE:  # one submit: the buffer as it is, not a slice of it
            started.append((buffer, offset, cbk_arg, True))
        else:
            started += [(buffer[start : start + PF_MAX_IO_SIZE], offset + start, cbk_arg, is_write)
                        for start in range(0, length, PF_MAX_IO_SIZE)]
        return True

    def submit_started(self) -> None:
        """Makes the submits of the transfers started since the last call.  Whoever
        starts transfers calls it before it waits for anything: their completions,
        which it may be waiting for, come only once they are submitted.  A submit the
        library refuses completes at once with its status (-EAGAIN as `SUBMIT_REFUSED`)."""
        started, self._started = self._started, []
        for piece, offset, cbk_arg, is_write in started:
            if status := self._submit(piece, offset, cbk_arg, is_write):
                complete, arg = cbk_arg
                complete(arg, SUBMIT_REFUSED if status == -errno.EAGAIN else status)

    def _submit(self, piece: memoryview, offset: int, cbk_arg: object, is_write: bool) -> int:
        """One submit of `submit_started`'s, counted: the library's status."""
        self.counters.submits += 1
        status = self.backend.iov_submit([piece], len(piece), offset, self._inbox.callback, cbk_arg, is_write)
        if status == -errno.EAGAIN:  # made again by `read`/`write`, or after on_done
            self.counters.eagain_resubmits += 1
        return status

    @staticmethod
    def whole_sectors(offset: int, length: int) -> bool:
        """Whether a range needs no read-modify-write: `start_transfer` and `read`
        with a buffer of its own take only such ranges."""
        return not (offset % SECTOR or length % SECTOR)

    @staticmethod
    def retryable(status: int) -> bool:
        return status in RETRYABLE

    # -- NBD-shaped operations --------------------------------------------

    async def read(self, offset: int, length: int, into: memoryview | None = None) -> memoryview:
        """The data, read into `into` if given (only for `whole_sectors`), else into
        a buffer of its own."""
        if into is not None:
            await self._transfer(offset, [into], is_write=False)
            return into
        start, end = align_down(offset), align_up(offset + length)
        buffer = memoryview(bytearray(end - start))
        await self._transfer(start, [buffer], is_write=False)
        return buffer[offset - start : offset - start + length]

    def _refuse_if_flush_failed(self) -> None:
        if self._flush_failure is not None:
            raise self._flush_failure

    def _refuse_partial_sectors(self, offset: int, length: int) -> None:
        if not (self.partial_sectors or self.whole_sectors(offset, length)):
            raise VolumeIOError(-errno.EINVAL, f"{offset}+{length} is not whole {SECTOR}-byte sectors, "
                                               "which a server with several workers cannot merge")

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        self._refuse_if_flush_failed()
        self._refuse_partial_sectors(offset, len(data))
        start, end = align_down(offset), align_up(offset + len(data))
        async with self._mutations.hold(start, end):
            await self._write_locked(offset, [data])
        if fua:
            await self.flush()

    async def _write_locked(self, offset: int, buffers: list[memoryview]) -> None:
        """Writes at any offset: partial edge sectors are read, merged and rewritten."""
        length = sum(map(len, buffers))
        start, end = align_down(offset), align_up(offset + length)
        if offset > start:
            head = await self.read(start, SECTOR)
            buffers = [head[: offset - start], *buffers]
        if offset + length < end:
            tail = await self.read(end - SECTOR, SECTOR)
            buffers = [*buffers, tail[SECTOR - (end - offset - length) :]]
        await self._transfer(start, buffers, is_write=True)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        """Zeroes a range; with `may_trim`, whole sectors may be released instead.

        ZERO_PIECE at a time, each piece under its own hold of its range: however
        large the request, it keeps a range from other writers, and memory, only for
        as long as one piece takes."""
        self._refuse_if_flush_failed()
        self._refuse_partial_sectors(offset, length)
        end = offset + length
        while offset < end:
            piece_end = min(end, align_down(offset) + ZERO_PIECE)
            await self._write_zeroes_piece(offset, piece_end - offset, may_trim)
            offset = piece_end
        if fua:
            await self.flush()

    async def _write_zeroes_piece(self, offset: int, length: int, may_trim: bool) -> None:
        start, end = align_down(offset), align_up(offset + length)
        async with self._mutations.hold(start, end):
            if not (may_trim and self.backend.can_discard):
                await self._write_zeroes_locked(offset, length, skip_holes=may_trim)
            else:
                inner_start, inner_end = align_up(offset), align_down(offset + length)
                if inner_start >= inner_end:  # inside one sector
                    await self._write_zeroes_locked(offset, length, skip_holes=False)
                else:
                    await self._write_zeroes_locked(offset, inner_start - offset, skip_holes=False)
                    await self._discard(inner_start, inner_end - inner_start)
                    await self._write_zeroes_locked(inner_end, offset + length - inner_end, skip_holes=False)

    async def _write_zeroes_locked(self, offset: int, length: int, skip_holes: bool) -> None:
        if length == 0:
            return
        # With the range locked nothing can fill a hole under us, so holes, which
        # already read as zeros, need no writing.
        extents = self.extents(offset, length) if skip_holes else [Extent(offset, length, True)]
        for extent in extents:
            if extent.allocated:
                count, rest = divmod(extent.length, PF_MAX_IO_SIZE)
                buffers = [ZEROES] * count + ([ZEROES[:rest]] if rest else [])
                await self._write_locked(extent.offset, buffers)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Releases the whole sectors of a range; trimmed space reads back as zeros."""
        inner_start, inner_end = align_up(offset), align_down(offset + length)
        if inner_start < inner_end:
            await self.write_zeroes(inner_start, inner_end - inner_start, may_trim=True, fua=fua)

    def can_fast_zero(self, may_trim: bool) -> bool:
        return may_trim and self.backend.can_discard

    async def flush(self) -> None:
        self._refuse_if_flush_failed()
        try:
            await trio.to_thread.run_sync(self.backend.flush)
        except OSError as error:
            reason = (f"flush of {self.backend.name} failed ({error.strerror or error}): writes may be"
                      " lost; writes and flushes fail until the volume is opened again")
            log.error("%s", reason)
            self._flush_failure = VolumeIOError(-(error.errno or errno.EIO), reason)
            raise self._flush_failure from error

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch: read the range and drop it, a chunk at a time."""
        for start in range(offset, offset + length, CACHE_CHUNK):
            await self.read(start, min(CACHE_CHUNK, offset + length - start))

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """The allocation of a range; a failure to learn it raises `VolumeIOError`."""
        return self._block_status(self.backend.allocation, offset, length)

    def changes(self, since: str, offset: int, length: int) -> Iterator[Extent]:
        """Where the volume may differ from its snapshot `since` (`allocated`: changed)."""
        return self._block_status(partial(self.backend.changes, since), offset, length)

    def depths(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """(length, depth) runs of a snapshot's allocation depth."""
        return self._block_status(self.backend.depths, offset, length)

    def _block_status(self, source: Callable[[int, int], Iterator[T]], offset: int, length: int) -> Iterator[T]:
        try:
            yield from source(offset, length)
        except OSError as error:
            log.error("block status of %s at %d+%d failed: %s", self.backend.name, offset, length, error)
            raise VolumeIOError(-(error.errno or errno.EIO)) from error

    def close(self) -> None:
        """Once; again is a no-op (an export deleted at run time is closed then and at exit)."""
        if not self._closed:
            self._closed = True
            self.backend.close()

