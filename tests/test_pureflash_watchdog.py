"""The binding's defences against a library that never completes an I/O.

The real library can hold an I/O for good (once its reopen of a volume fails, the I/O
waiting for it is never resent nor failed, and `pf_close_volume` waits for it forever:
see pfnbd/pureflash.py).  The fake library of test_pureflash.py, paused, holds I/O the
same way: the watchdog must fail it with EIO past the deadline, keep the caller's buffers
out of the library's reach, and `close` must return within its bound.
"""

from __future__ import annotations

import errno
import time
from types import SimpleNamespace

import pytest
import trio

from test_pureflash import KiB, MiB, Completions, cluster, fake_library, hooks, pattern  # noqa: F401 (fixtures)
from pfnbd.pureflash import WATCHDOG_PERIOD, PureFlashClient
from pfnbd.volume import VolumeBridge, VolumeIOError

DEADLINE = 0.5  # seconds: the watchdog's, for these tests


def held_volume(cluster, hooks, data: bytes = b""):
    """A volume of the fake whose completions are held, with `data` at its start."""
    with open(cluster.create("test_v1", MiB), "r+b") as image:
        image.write(data)
    volume = PureFlashClient(cluster.conf(), cluster.library, io_deadline=DEADLINE).open_volume("test_v1")
    hooks.set_paused(volume, True)
    return volume


def test_watchdog_fails_held_io_and_keeps_the_read_buffer_from_the_library(cluster, hooks):
    data = pattern(8 * KiB, seed=5)
    volume = held_volume(cluster, hooks, data)
    done = Completions()
    read_into = memoryview(bytearray(b"\xee" * 4 * KiB))
    started = time.monotonic()
    assert volume.iov_submit([read_into], 4 * KiB, 0, done.callback, "read", False) == 0
    assert volume.iov_submit([memoryview(bytearray(4 * KiB))], 4 * KiB, 4 * KiB, done.callback, "write", True) == 0
    try:
        assert done.wait(2) == {"read": -errno.EIO, "write": -errno.EIO}
        failed_after = time.monotonic() - started
        # The library lets go only now: the read it fills is no longer the caller's.
        hooks.set_paused(volume, False)
        deadline = time.monotonic() + 10
        while any(volume._in_flight) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not any(volume._in_flight), "the slots of late completions are never released"
    finally:
        hooks.set_paused(volume, False)
        volume.close()
    assert DEADLINE <= failed_after < DEADLINE + WATCHDOG_PERIOD + 2
    assert read_into == b"\xee" * 4 * KiB
    assert done.statuses == {"read": -errno.EIO, "write": -errno.EIO}  # one callback each, never two


def test_close_is_bounded_when_the_library_holds_io(cluster, hooks):
    volume = held_volume(cluster, hooks)
    volume.io_deadline = 3600  # only close may end it
    done = Completions()
    assert volume.iov_submit([memoryview(bytearray(4 * KiB))], 4 * KiB, 0, done.callback, "write", True) == 0
    still_open = SimpleNamespace(handle=volume.handle)  # for the hook, once close gave up
    started = time.monotonic()
    try:
        volume.close(timeout=0.5)
        assert time.monotonic() - started < 3
        assert done.wait(1) == {"write": -errno.EIO}
        assert volume.iov_submit([memoryview(bytearray(512))], 512, 0, done.callback, "late", False) == -errno.EBADF
    finally:
        hooks.set_paused(still_open, False)  # pf_close_volume, still running, may now return


def test_bridge_write_held_by_the_library_fails_with_eio(cluster, hooks):
    volume = held_volume(cluster, hooks)

    async def write() -> None:
        bridge = VolumeBridge(volume, retry_time_limit=DEADLINE)
        with trio.fail_after(DEADLINE + WATCHDOG_PERIOD + 5), pytest.raises(VolumeIOError) as failure:
            await bridge.write(0, memoryview(pattern(64 * KiB, seed=1)))
        assert failure.value.errno == errno.EIO

    try:
        trio.run(write)
    finally:
        hooks.set_paused(volume, False)
        volume.close()
