"""Linux native AIO through ctypes: a batch of reads and writes in one system call.

The emulated library's `vol_proc` executes a batch of I/Os while the trio thread
serves connections.  Each `os.preadv`/`os.pwritev` lets the GIL go and takes it back,
and under load the trio thread holds it in between: the two threads hand the GIL
over twice per I/O, and on a machine where waking the other CPU is slow those
hand-overs cost more than the I/O (benchmarks/README.md, "Where the time goes").
`io_submit` takes the whole batch in one call, so the GIL is let go once per batch.

On a file opened without O_DIRECT, as the store's are, the kernel carries out each
read and write within `io_submit`, in the order given, as `pread`/`pwrite` would:
the page cache, the durability (`fdatasync` at FLUSH) and the errors are theirs, each
I/O's result is its byte count or -errno, and `io_getevents` only collects them.

Owner: the one thread that runs batches (a volume's `vol_proc`); `close` after it
has stopped.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Sequence

# x86_64 and aarch64 system call numbers (asm-generic for the latter).
_SYSCALLS = {
    "x86_64": {"io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209},
    "aarch64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4},
}
_IOCB_CMD_PREAD = 0
_IOCB_CMD_PWRITE = 1
_OPCODES = (_IOCB_CMD_PREAD, _IOCB_CMD_PWRITE)  # by is_write
# struct iocb (64 bytes): aio_data, aio_key, aio_rw_flags, aio_lio_opcode,
# aio_reqprio, aio_fildes, aio_buf, aio_nbytes, aio_offset, aio_reserved2, aio_flags,
# aio_resfd; struct io_event (32 bytes): data, obj, res, res2.
_IOCB = struct.Struct("<QIIHhIQQqQII")
_EVENT = struct.Struct("<QQqq")
# What changes from one transfer to the next, from aio_lio_opcode on: the rest of an
# iocb is written once (aio_data is its slot's index, the others are zeros).
_IOCB_TRANSFER = struct.Struct("<HhIQQq")
_IOCB_TRANSFER_AT = 16
_EVENT_FIELDS = _EVENT.size // 8  # an event read as 64-bit words: data and res among them

# The process's own symbols, not libc's handle: a preloaded library (the tests' host
# faults) sees these calls as it sees any other.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# The same function called with the GIL held: for collecting events that are already
# there, which takes no time, so the GIL need not be let go (and taken back) for it.
_libc_holding_gil = ctypes.PyDLL(None, use_errno=True)
_libc_holding_gil.syscall.restype = ctypes.c_long
_NO_WAIT = ctypes.c_long * 2  # struct timespec {0, 0}


# A read into `buffer` (writable) or a write from it: (is_write, buffer, offset).
Transfer = tuple[bool, memoryview, int]


class AioContext:
    """An `io_setup` context for batches of at most `capacity` transfers."""

    def __init__(self, capacity: int) -> None:
        calls = _SYSCALLS.get(platform.machine())
        if calls is None:
            raise OSError(errno.ENOSYS, f"no native AIO numbers for {platform.machine()}")
        self._calls = calls
        self.capacity = capacity
        self._context = ctypes.c_ulong(0)
        if _libc.syscall(calls["io_setup"], capacity, ctypes.byref(self._context)) < 0:
            code = ctypes.get_errno()  # ENOSYS, EPERM under seccomp, EAGAIN past aio-max-nr
            raise OSError(code, f"io_setup: {os.strerror(code)}")
        self._iocbs = (ctypes.c_char * (_IOCB.size * capacity))()
        self._iocb_view = memoryview(self._iocbs).cast("B")
        for index in range(capacity):
            _IOCB.pack_into(self._iocb_view, _IOCB.size * index, index, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        base = ctypes.addressof(self._iocbs)
        self._pointers = (ctypes.c_void_p * capacity)(*(base + _IOCB.size * i for i in range(capacity)))
        self._events = (ctypes.c_char * (_EVENT.size * capacity))()
        self._event_words = memoryview(self._events).cast("B").cast("q")
        self._no_wait = _NO_WAIT(0, 0)

    def run(self, fd: int, transfers: Sequence[Transfer]) -> list[int]:
        """Carries out `transfers` on `fd`, in order: each one's byte count, or -errno."""
        results = []
        for start in range(0, len(transfers), self.capacity):
            results += self._run(fd, transfers[start : start + self.capacity])
        return results

    def _run(self, fd: int, transfers: Sequence[Transfer]) -> list[int]:
        # Each c_char pins its buffer (a buffer export) until the kernel is done with it.
        pinned = []
        pin, address, pack, view = ctypes.c_char.from_buffer, ctypes.addressof, _IOCB_TRANSFER.pack_into, self._iocb_view
        at = _IOCB_TRANSFER_AT
        for is_write, buffer, offset in transfers:
            target = pin(buffer)
            pinned.append(target)
            pack(view, at, _OPCODES[is_write], 0, fd, address(target), buffer.nbytes, offset)
            at += _IOCB.size
        count = len(transfers)
        submitted = _libc.syscall(self._calls["io_submit"], self._context, count, self._pointers)
        if submitted < 0:  # about the first transfer (EINVAL, EBADF) or the context (EAGAIN)
            code = ctypes.get_errno()
            return [-code] if count == 1 else self._run_each(fd, transfers)
        # Those submitted are collected before anything else is tried: the kernel may
        # still use their buffers until then.
        results = [-errno.EIO] * count
        collected = 0
        wait = False  # first what is there, GIL held: on a buffered file, everything
        while collected < submitted:
            if wait:
                got = _libc.syscall(self._calls["io_getevents"], self._context, 1, submitted - collected,
                                    self._events, None)
            else:
                got = _libc_holding_gil.syscall(self._calls["io_getevents"], self._context, 0,
                                                submitted - collected, self._events, self._no_wait)
            wait = True
            if got < 0:
                code = ctypes.get_errno()
                if code == errno.EINTR:
                    continue
                raise OSError(code, f"io_getevents: {os.strerror(code)}")
            words = self._event_words[: got * _EVENT_FIELDS]
            for index, result in zip(words[0::_EVENT_FIELDS].tolist(), words[2::_EVENT_FIELDS].tolist()):
                results[index] = result
            collected += got
        del pinned
        if submitted < count:  # the kernel refused the first of the rest: each goes on its own
            results[submitted:] = self._run_each(fd, transfers[submitted:])
        return results

    def _run_each(self, fd: int, transfers: Sequence[Transfer]) -> list[int]:
        return [result for transfer in transfers for result in self._run(fd, [transfer])]

    def close(self) -> None:
        _libc.syscall(self._calls["io_destroy"], self._context)
