"""The real PureFlash client library behind the `VolumeBackend` interface.

`PureFlashClient` loads a shared build of `libs5common` (PureFlash builds only a static
archive; `scripts/pureflash-cluster build` links the shared one, see the README) and opens
volumes of a real cluster with `pf_open_volume`; `PureFlashVolume` submits with `pf_iov_submit` and hands each
completion to the bridge's callback, as `EmulatedVolume` does, but from a completion thread
of its own, a batch at a time: the library's thread (`vol_proc`) runs no Python, only
pfnbd's small C handler (scripts/pureflash/pfnbd_completions.c), see `PureFlashVolume`.

Bound with ctypes rather than cffi: ctypes ships with CPython, so the binding adds no
dependency and no compile step, and an ABI of five functions and two structs is short
enough to declare by hand, which is what cffi would have saved.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import select
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

from .cpus import started_away
from .store import Extent, human_size, split_snapshot_name
from .volume import S5_LIB_VER, IoHandler, VolumeOpenError

log = logging.getLogger(__name__)

LIBRARY_ENV = "PFNBD_PUREFLASH_LIB"
DEFAULT_CONF = Path("/etc/pureflash/pf.conf")  # what the library reads when given no file

class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class PfClientVolumeInfo(ctypes.Structure):
    """pf_client_api.h's struct, field for field in the header's order."""

    _fields_ = [
        ("status", ctypes.c_char * 64),
        ("volume_name", ctypes.c_char * 128),
        ("snap_name", ctypes.c_char * 128),
        ("volume_size", ctypes.c_uint64),
        ("volume_id", ctypes.c_uint64),
        ("shard_count", ctypes.c_int),
        ("rep_count", ctypes.c_int),
        ("meta_ver", ctypes.c_int),
        ("snap_seq", ctypes.c_int),
    ]


_c_volume = ctypes.c_void_p  # struct PfClientVolume *, opaque
_c_off_t = ctypes.c_int64  # off_t on 64-bit Linux, the only platform PureFlash builds for

_SIGNATURES = {
    "pf_open_volume": (_c_volume, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]),
    "pf_close_volume": (None, [_c_volume]),
    "pf_get_volume_size": (ctypes.c_uint64, [_c_volume]),
    "pf_query_volume_info": (ctypes.c_int, [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(PfClientVolumeInfo),
    ]),
    "pf_iov_submit": (ctypes.c_int, [
        _c_volume, ctypes.POINTER(Iovec), ctypes.c_uint, ctypes.c_size_t, _c_off_t,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,  # ulp_io_handler: pfnbd_ring_handler
    ]),
}


# Called with the GIL held: pf_iov_submit only fills an iocb and posts it to vol_proc's
# queue (a spinlock that vol_proc holds for a pointer swap, and an eventfd write), and
# waits on no Python thread.  Releasing the GIL around it made every submit a chance for
# the completion thread to take the GIL, and the trio thread then waited out that
# thread's whole batch before its next submit.
_HOLDING_THE_GIL = {"pf_iov_submit"}


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Loads `libs5common` from `path`, else from $PFNBD_PUREFLASH_LIB, and declares its ABI.

    A CDLL: calls release the GIL, so that `pf_close_volume` can wait for the library's
    threads; but the functions in `_HOLDING_THE_GIL` come from a PyDLL of the same file.
    """
    path = path or os.environ.get(LIBRARY_ENV)
    if not path:
        raise VolumeOpenError(
            f"no PureFlash client library: set {LIBRARY_ENV} to a shared build of libs5common"
        )
    try:
        library = ctypes.CDLL(os.fspath(path))
        holding_the_gil = ctypes.PyDLL(os.fspath(path))  # the same handle: dlopen counts it
    except OSError as error:
        raise VolumeOpenError(f"cannot load the PureFlash client library: {error}") from None
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            function = getattr(holding_the_gil if name in _HOLDING_THE_GIL else library, name)
        except AttributeError:
            raise VolumeOpenError(f"{path} is not a PureFlash client library: it has no {name}") from None
        function.restype, function.argtypes = restype, argtypes
        setattr(library, name, function)
    return library


COMPLETIONS_ENV = "PFNBD_COMPLETIONS_LIB"
COMPLETIONS_NAME = "libpfnbd_completions.so"  # built beside libs5common.so by scripts/pureflash-cluster
RING_SLOTS = 1024  # submits a volume may have in flight, abandoned ones included (the library allows 255)
DRAIN_BATCH = 256  # completions taken from the ring per call
MIN_IO_DEADLINE = 10.0  # the library waits 5 s before it reopens a volume that lost its store
WATCHDOG_PERIOD = 1.0  # how often the completion thread looks for I/O past its deadline
CLOSE_TIMEOUT = 10.0  # a healthy library closes in milliseconds


class Completion(ctypes.Structure):
    """pfnbd_completions.c's struct pfnbd_completion."""

    _fields_ = [("slot", ctypes.c_uint32), ("status", ctypes.c_int32)]


_c_ring = ctypes.c_void_p  # struct pfnbd_ring *, opaque
_RING_SIGNATURES = {
    "pfnbd_ring_new": (_c_ring, [ctypes.c_uint32]),
    "pfnbd_ring_free": (None, [_c_ring]),
    "pfnbd_ring_fd": (ctypes.c_int, [_c_ring]),
    "pfnbd_ring_slot": (ctypes.c_void_p, [_c_ring, ctypes.c_uint32]),
    "pfnbd_ring_drain": (ctypes.c_uint32, [_c_ring, ctypes.POINTER(Completion), ctypes.c_uint32]),
}


def load_completions(library_path: str | os.PathLike) -> ctypes.CDLL:
    """The completion ring (scripts/pureflash/pfnbd_completions.c): from
    $PFNBD_COMPLETIONS_LIB, else beside the client library at `library_path`."""
    path = os.environ.get(COMPLETIONS_ENV) or Path(library_path).with_name(COMPLETIONS_NAME)
    try:
        shim = ctypes.CDLL(os.fspath(path))
    except OSError as error:
        raise VolumeOpenError(
            f"cannot load pfnbd's completion ring {path} (scripts/pureflash-cluster build puts it "
            f"beside libs5common.so; or set {COMPLETIONS_ENV}): {error}"
        ) from None
    for name, (restype, argtypes) in _RING_SIGNATURES.items():
        function = getattr(shim, name)
        function.restype, function.argtypes = restype, argtypes
    return shim


def _c_string(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


LOG_SAYS_WHY = "the library's log says why"  # a failure with no errno of its own


def _status_text(status: int) -> str:
    return os.strerror(-status) if status < 0 and status != -1 else LOG_SAYS_WHY


# One of the library's error lines (S5LOG_ERROR): "[ERRO date time]message(file:line:function) ".
_ERROR_LINE = re.compile(r"^\[ERRO [^]]*\](?P<message>.*?)(?:\([^()]*:\d+:\w+\))?\s*$", re.MULTILINE)


class _HeldStderr:
    """What is written to file descriptor 2 from now until `release`, kept in a file.

    The library and its ZooKeeper client log there from C, so only the descriptor
    can hold their lines back.  Owner: the thread that made it, which releases it."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self._held = tempfile.TemporaryFile()
        self._stderr = os.dup(2)
        os.dup2(self._held.fileno(), 2)

    def release(self, pass_on: bool) -> str:
        """Gives stderr back and returns what was held, written to it first if `pass_on`."""
        os.dup2(self._stderr, 2)
        os.close(self._stderr)
        with self._held:
            self._held.seek(0)
            data = self._held.read()
        if pass_on:
            with open(2, "wb", closefd=False) as stderr:
                stderr.write(data)
        return data.decode(errors="replace")


class _LibraryCall:
    """The log of one call into the library, held or not (`library_log_held`)."""

    def __init__(self, held: _HeldStderr | None) -> None:
        self._held = held

    def failed(self) -> str | None:
        """The call failed: the library's last error message from what was held, which
        goes to stderr only with debug logging."""
        held, self._held = self._held, None
        if held is None:
            return None
        return _last_error(held.release(pass_on=log.isEnabledFor(logging.DEBUG)))

    def succeeded(self) -> None:
        """What was held goes to stderr, as if never held."""
        held, self._held = self._held, None
        if held is not None:
            held.release(pass_on=True)


def _last_error(text: str) -> str | None:
    """The message of the library's last error line in `text`, if it has one."""
    messages = [match["message"].strip() for match in _ERROR_LINE.finditer(text)]
    return next((message for message in reversed(messages) if message), None)


def _label(name: str, snap: str | None) -> str:
    return f"{name}@{snap}" if snap else name


@attrs.frozen
class VolumeInfo:
    """What `pf_query_volume_info` tells about a volume, without opening it."""

    status: str
    volume_name: str
    snap_name: str
    size: int
    id: int
    shard_count: int
    replicas: int
    meta_ver: int
    snap_seq: int

    @classmethod
    def from_struct(cls, info: PfClientVolumeInfo) -> VolumeInfo:
        def text(raw: bytes) -> str:
            return raw.decode(errors="replace")

        return cls(
            text(info.status), text(info.volume_name), text(info.snap_name), info.volume_size,
            info.volume_id, info.shard_count, info.rep_count, info.meta_ver, info.snap_seq,
        )

    def describe(self) -> str:
        """Worded like `VolumeMeta.describe`."""
        replicas = "replica" if self.replicas == 1 else "replicas"
        return f"PureFlash volume {self.volume_name}, {human_size(self.size)}, {self.replicas} {replicas}"


class PureFlashClient:
    """`pf_open_volume` against a real cluster, with the shape of `EmulatedClient`."""

    def __init__(
        self, conf: str | os.PathLike | None = None, library: str | os.PathLike | None = None,
        io_deadline: float = MIN_IO_DEADLINE,
    ) -> None:
        """`conf`: the client configuration (None: the library's /etc/pureflash/pf.conf).
        `library`: the shared libs5common (None: $PFNBD_PUREFLASH_LIB).  `io_deadline`:
        seconds after which a submit the library has not completed fails with EIO
        (`serve` gives its --retry-timeout, but at least `MIN_IO_DEADLINE`)."""
        self.conf = None if conf is None else Path(conf)
        conf_path = self.conf or DEFAULT_CONF
        if not os.access(conf_path, os.R_OK):
            raise VolumeOpenError(f"cannot read the PureFlash configuration {conf_path}")
        library = library or os.environ.get(LIBRARY_ENV)
        self._library = load_library(library)
        self._shim = load_completions(library)
        self.io_deadline = io_deadline
        self._log_held = False  # within `library_log_held`

    @contextlib.contextmanager
    def library_log_held(self) -> Iterator[None]:
        """Within the block, what the library logs while it opens or queries a volume
        is passed on to stderr once the call has succeeded; when it fails, the error
        raised gives the library's last error line as the reason, and the rest is
        passed on only with debug logging.  So a command given a volume that does not
        exist, or a cluster it cannot reach, says so in one line, not among hundreds of
        the library's and ZooKeeper's.

        For a command's start, while nothing else writes to stderr: the library's
        lines are told from everyone else's only by when they come."""
        self._log_held = True
        try:
            yield
        finally:
            self._log_held = False

    @contextlib.contextmanager
    def _library_call(self) -> Iterator[_LibraryCall]:
        """One call to open or query a volume, its log held if `library_log_held`."""
        held = None
        if self._log_held:
            try:
                held = _HeldStderr()
            except OSError as error:  # no temporary file: the library's lines go by as they come
                log.debug("cannot hold the library's log back: %s", error)
        call = _LibraryCall(held)
        try:
            yield call
        finally:
            call.succeeded()  # whatever is still held: nothing failed, or not in the library

    def _conf_arg(self) -> bytes | None:
        return None if self.conf is None else os.fsencode(self.conf)

    def open_volume(self, name: str, snap: str | None = None, lib_ver: int = S5_LIB_VER) -> PureFlashVolume:
        """Opens a volume's head, or read-only one of its snapshots."""
        with self._library_call() as call, started_away():  # the threads it starts (pfnbd/cpus.py)
            handle = self._library.pf_open_volume(_c_string(name), self._conf_arg(), _c_string(snap), lib_ver)
            if not handle:  # NULL is all the library says; it logs the reason itself
                raise VolumeOpenError(
                    f"cannot open PureFlash volume {_label(name, snap)} (configuration "
                    f"{self.conf or DEFAULT_CONF}): {call.failed() or LOG_SAYS_WHY}")
        return PureFlashVolume(self._library, self._shim, handle, name, snap, self.io_deadline)

    def query_volume_info(self, name: str, snap: str | None = None, lib_ver: int = S5_LIB_VER) -> VolumeInfo:
        info = PfClientVolumeInfo()  # zeroed: some library versions leave fields unset
        with self._library_call() as call:
            status = self._library.pf_query_volume_info(
                _c_string(name), self._conf_arg(), _c_string(snap), lib_ver, ctypes.byref(info)
            )
            if status == -errno.ENOENT:  # the library's "not exists or can't be open" says no more
                call.failed()
                raise VolumeOpenError(f"no PureFlash volume {_label(name, snap)}")
            if status:
                raise VolumeOpenError(f"cannot query PureFlash volume {_label(name, snap)}: "
                                      f"{call.failed() or _status_text(status)}")
        return VolumeInfo.from_struct(info)

    def describe(self, name: str) -> str:
        """What NBD_OPT_LIST and INFO say of export `name` or `name@snap`, like `Store.describe`.

        A snapshot is described from its head's information: upstream's query with a
        snapshot name fails (-ENOMEM, an unassigned escape buffer), and a snapshot has
        its head's replicas."""
        volume, snap = split_snapshot_name(name)
        head = self.query_volume_info(volume).describe()
        return head if snap is None else f"snapshot {snap} of {head}, read-only"


@attrs.define(slots=True)
class _InFlight:
    """A submit from `pf_iov_submit` until the library calls back.

    The binding owns, until then, a read's bounce buffer, which the library fills on its
    own thread.  A read lands in the caller's buffers only once the library is done, from
    the bounce buffer: so a read the watchdog failed (`abandoned`) can never scribble on a
    buffer the caller reused.  A write's data the library copies at submit."""

    callback: IoHandler
    cbk_arg: object
    deadline: float
    read_into: Sequence[memoryview] | None  # a read's destination
    bounce: _Bounce | None  # what the library reads into instead
    abandoned: bool = False


@attrs.frozen
class _Bounce:
    """A buffer of the binding's own, with its iovec, kept for reuse: what the library
    reads into, or what a write is gathered into for the library to copy."""

    data: memoryview
    iovec: Iovec  # over `data`, which `pin` keeps exported for as long as the bounce lives
    pin: ctypes.Array

    @classmethod
    def new(cls, length: int) -> _Bounce:
        data = memoryview(bytearray(length))
        pin = (ctypes.c_char * length).from_buffer(data)
        return cls(data, Iovec(ctypes.addressof(pin), length), pin)


class PureFlashVolume:
    """An open volume of a real cluster, as a `VolumeBackend`.

    Completions do not run Python on the library's thread: the library calls
    pfnbd_completions.c's handler, which queues (slot, status) in a ring and signals an
    eventfd; this volume's completion thread (`_drain`) wakes once per batch, takes the
    GIL once, and runs the batch's callbacks.  The bridge's callback is its
    `_CompletionInbox`, which enters trio through `TrioToken.run_sync_soon`, once per
    batch, as the project's rule for foreign threads wants.  The same thread is the
    watchdog: a submit the library has not completed `io_deadline` seconds after it was
    made is completed to its caller with -EIO (the library can lose I/O for good: once a
    reopen fails, the I/O waiting for it is never resent nor failed), and its buffers stay
    here until the library lets go of them.  A write failed so may still land later if the
    library reconnects and resends it before its own `io_timeout` (pf.conf, 30 s) has
    passed; a deadline (serve's --retry-timeout, 30 s by default) no shorter than that
    leaves the library to fail such writes itself.
    """

    can_discard = False  # the library has no trim: the bridge writes zeros instead
    dirty_bitmaps = ()  # the client API cannot tell what changed since a snapshot,
    has_depths = False  # nor where a snapshot's data lies

    def __init__(self, library: ctypes.CDLL, shim: ctypes.CDLL, handle: int, name: str, snap: str | None,
                 io_deadline: float) -> None:
        self._library = library
        self._shim = shim
        self.handle: int | None = handle  # the library's struct PfClientVolume *
        self.name = _label(name, snap)
        self.size: int = library.pf_get_volume_size(handle)
        self.read_only = snap is not None
        self.io_deadline = io_deadline
        self._ring = shim.pfnbd_ring_new(RING_SLOTS)
        if not self._ring:
            library.pf_close_volume(handle)
            raise VolumeOpenError(f"cannot open PureFlash volume {self.name}: no memory for its completion ring")
        self._handler = ctypes.cast(shim.pfnbd_ring_handler, ctypes.c_void_p).value
        self._cbk_args = [shim.pfnbd_ring_slot(self._ring, slot) for slot in range(RING_SLOTS)]
        # A slot goes from `_free` to `_in_flight` at submit and back once the library
        # has called back; list.pop/append and item assignment are atomic under the GIL,
        # and a slot is touched by one thread at a time: the submitter, then `_drain`.
        self._in_flight: list[_InFlight | None] = [None] * RING_SLOTS
        self._free = list(range(RING_SLOTS - 1, -1, -1))
        self._bounces: dict[int, list[_Bounce]] = {}  # read bounce buffers kept for reuse
        self._closing = False  # set by close: no submit from then on
        self._stopping = False
        self._give_up = threading.Event()  # set by close: the library will not let go
        self._given_up = threading.Event()  # set by `_drain` once it failed all in flight
        self._drainer = threading.Thread(target=self._drain, name=f"pfnbd completions {self.name}", daemon=True)
        self._drainer.start()

    def iov_submit(
        self, iov: Sequence[memoryview], length: int, offset: int,
        callback: IoHandler, cbk_arg: object, is_write: bool,
    ) -> int:
        if self._closing:
            return -errno.EBADF
        if is_write and self.read_only:
            return -errno.EROFS
        # The library indexes its shards by offset unchecked: out of range is a crash.
        if offset < 0 or offset + length > self.size:
            return -errno.EINVAL
        try:
            slot = self._free.pop()
        except IndexError:
            return -errno.EAGAIN
        kept = self._bounces.get(length)
        bounce = kept.pop() if kept else _Bounce.new(length)
        if is_write:
            # One copy into a buffer whose iovec is built already: cheaper than an iovec
            # array and a pin per submit over the caller's buffers.
            position = 0
            for buffer in iov:
                bounce.data[position : position + len(buffer)] = buffer
                position += len(buffer)
        # Registered first: the completion may come before pf_iov_submit returns.
        self._in_flight[slot] = _InFlight(
            callback, cbk_arg, time.monotonic() + self.io_deadline, None if is_write else iov,
            None if is_write else bounce)
        status = self._library.pf_iov_submit(
            self.handle, bounce.iovec, 1, length, offset, self._handler, self._cbk_args[slot], int(is_write))
        if is_write:  # copied by the library: free again
            self._keep(bounce)
        if status:
            self._release(slot)
        return status

    def _keep(self, bounce: _Bounce) -> None:
        self._bounces.setdefault(len(bounce.data), []).append(bounce)

    def _release(self, slot: int) -> None:
        io = self._in_flight[slot]
        self._in_flight[slot] = None
        if io.bounce is not None:
            self._keep(io.bounce)
        self._free.append(slot)

    def _drain(self) -> None:  # the volume's completion thread
        fd = self._shim.pfnbd_ring_fd(self._ring)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        batch = (Completion * DRAIN_BATCH)()
        next_check = time.monotonic() + WATCHDOG_PERIOD
        while True:
            poller.poll(max(0.0, next_check - time.monotonic()) * 1000)
            while (taken := self._shim.pfnbd_ring_drain(self._ring, batch, DRAIN_BATCH)):
                for completion in batch[:taken]:
                    self._complete(completion.slot, completion.status)
                if taken < DRAIN_BATCH:
                    break
            if self._stopping:
                return
            if self._give_up.is_set() and not self._given_up.is_set():
                self._fail_overdue(float("inf"))
                self._given_up.set()
            if (now := time.monotonic()) >= next_check:
                self._fail_overdue(now)
                next_check = now + WATCHDOG_PERIOD

    def _complete(self, slot: int, status: int) -> None:  # on the completion thread
        io = self._in_flight[slot]
        if io is None:  # the library's bug; the ring refuses a second one once full
            log.error("volume %s: the library completed slot %d twice, status %d", self.name, slot, status)
            return
        if io.abandoned:
            log.warning("volume %s: the library completed an I/O the watchdog had failed, status %d",
                        self.name, status)
        else:
            if io.read_into is not None and not status:
                position = 0
                for buffer in io.read_into:
                    buffer[:] = io.bounce.data[position : position + len(buffer)]
                    position += len(buffer)
            io.callback(io.cbk_arg, status)
        self._release(slot)

    def _fail_overdue(self, now: float) -> None:  # on the completion thread
        overdue = [io for io in self._in_flight if io is not None and not io.abandoned and io.deadline <= now]
        if overdue:
            log.error("volume %s: %d I/Os not completed by the library within %.0f s: failed with EIO, "
                      "their buffers kept until it lets go", self.name, len(overdue), self.io_deadline)
        for io in overdue:
            io.abandoned = True
            io.callback(io.cbk_arg, -errno.EIO)

    def discard_submit(self, offset: int, length: int, callback: IoHandler, cbk_arg: object) -> int:
        return -errno.EOPNOTSUPP

    def allocation(self, offset: int, length: int) -> Iterator[Extent]:
        """The library cannot tell what was never written: all of it is data."""
        yield Extent(offset, length, True)

    def changes(self, since: str, offset: int, length: int) -> Iterator[Extent]:
        raise OSError(errno.ENOTSUP, "the PureFlash client API cannot tell what changed")

    def depths(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        raise OSError(errno.ENOTSUP, "the PureFlash client API cannot tell allocation depth")

    def flush(self) -> None:
        """Nothing to do: an acknowledged write is already on every replica."""

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """`pf_close_volume`, which returns once every in-flight I/O has called back, and
        then every callback delivered; at most `timeout` seconds.

        The library can hold I/O forever (see the class), and then `pf_close_volume`
        never returns: it runs on a thread of its own, and past `timeout` the volume
        stays open, with its ring, slots and buffers (the library may still write
        into them), for the rest of the process; every I/O still in flight is failed
        with EIO, so that no caller waits for it."""
        if self._closing:
            return
        self._closing = True
        closer = threading.Thread(target=self._library.pf_close_volume, args=(self.handle,),
                                  name=f"pf_close_volume {self.name}", daemon=True)
        closer.start()
        closer.join(timeout)
        self.handle = None
        if closer.is_alive():
            log.error("volume %s: pf_close_volume did not return within %.0f s; left to the library",
                      self.name, timeout)
            self._give_up.set()  # the completion thread fails them: callbacks come from it alone
            os.eventfd_write(self._shim.pfnbd_ring_fd(self._ring), 1)
            self._given_up.wait(timeout)
            return
        self._stopping = True
        os.eventfd_write(self._shim.pfnbd_ring_fd(self._ring), 1)
        self._drainer.join()
        self._shim.pfnbd_ring_free(self._ring)
        self._ring = None
        if any(io is not None for io in self._in_flight):
            log.error("volume %s closed with I/Os never completed", self.name)


__all__ = ["COMPLETIONS_ENV", "COMPLETIONS_NAME", "LIBRARY_ENV", "PureFlashClient", "PureFlashVolume", "VolumeInfo", "load_library"]
