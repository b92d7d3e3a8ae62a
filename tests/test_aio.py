"""Batches of reads and writes in one system call (pfnbd/aio.py), and the store's
`transfers` over it: the same bytes, statuses and copy-before-write as one call per
I/O, which is what the store falls back to where the kernel refuses native AIO."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys

import pytest

from pfnbd import store as store_module
from pfnbd.aio import AioContext
from pfnbd.store import CHUNK, Store

MiB = 1 << 20
SIZE = 4 * MiB


def test_a_batch_runs_in_order_and_reports_each_result(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(bytes(64 * 1024))
    fd = os.open(path, os.O_RDWR)
    aio = AioContext(4)  # smaller than the batch: it takes several submits
    try:
        first, second = memoryview(bytearray(b"a" * 4096)), memoryview(bytearray(b"b" * 4096))
        landed = memoryview(bytearray(4096))
        past_end = memoryview(bytearray(8192))
        results = aio.run(fd, [(True, first, 0), (True, second, 0), (False, landed, 0),
                               (True, first, 8192), (False, past_end, 60 * 1024), (False, landed[:512], 4096)])
        assert results == [4096, 4096, 4096, 4096, 4096, 512]
        assert bytes(landed[:512]) == bytes(512) and bytes(landed[512:]) == b"b" * 3584  # in order
        assert os.pread(fd, 4096, 8192) == b"a" * 4096
    finally:
        aio.close()
        os.close(fd)


def test_a_transfer_the_kernel_refuses_fails_alone(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(bytes(8192))
    read_only = os.open(path, os.O_RDONLY)
    aio = AioContext(8)
    try:
        buffer = memoryview(bytearray(b"x" * 4096))
        landed = memoryview(bytearray(4096))
        results = aio.run(read_only, [(False, landed, 0), (True, buffer, 0), (False, landed, 4096)])
        assert results == [4096, -errno.EBADF, 4096]
    finally:
        aio.close()
        os.close(read_only)


@pytest.fixture(params=["native AIO", "one call per I/O"])
def store(request, tmp_path, monkeypatch):
    if request.param == "one call per I/O":
        def refused(capacity):
            raise OSError(errno.ENOSYS, "io_setup: refused by the test")
        monkeypatch.setattr(store_module, "AioContext", refused)
    store = Store(tmp_path / "data")
    store.create("v", SIZE)
    return store


def test_batched_writes_keep_what_a_snapshot_needs_and_read_back(store):
    rng = random.Random(7)
    head = store.open_image("v")
    try:
        before = rng.randbytes(SIZE)
        assert head.transfers([(True, memoryview(bytearray(before)), 0)]) == [SIZE]
        store.create_snapshot("v", "s1")
        writes = [(True, memoryview(bytearray(rng.randbytes(4096))), rng.randrange(0, SIZE, 4096))
                  for _ in range(40)]
        with head.batch():
            assert head.transfers(writes) == [4096] * len(writes)
        expected = bytearray(before)
        for _, data, offset in writes:
            expected[offset : offset + 4096] = data
        whole = memoryview(bytearray(SIZE))
        assert head.transfers([(False, whole, 0)]) == [SIZE]
        assert bytes(whole) == bytes(expected)
    finally:
        head.close()
    snapshot = store.open_image("v@s1")
    try:
        pieces = [(False, memoryview(bytearray(CHUNK)), offset) for offset in range(0, SIZE, CHUNK)]
        assert snapshot.transfers(pieces) == [CHUNK] * len(pieces)
        assert b"".join(bytes(buffer) for _, buffer, _ in pieces) == before
    finally:
        snapshot.close()


def test_a_read_past_the_end_of_the_file_is_short_and_a_read_only_head_refuses_writes(store, tmp_path):
    head = store.open_image("v", read_only=True)
    try:
        os.truncate(store.image_path("v"), SIZE - 4096)  # a file shorter than its volume
        tail = memoryview(bytearray(8192))
        results = head.transfers([(False, tail, SIZE - 8192), (True, memoryview(bytearray(512)), 0)])
        assert results == [4096, -errno.EROFS]
    finally:
        head.close()


# Run in a process of its own: the limit and SIGXFSZ's disposition are per process.
FILE_SIZE_LIMIT = r"""
import errno, os, resource, signal, sys
from pfnbd.aio import AioContext
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
aio = AioContext(8)
data = memoryview(bytearray(b"z" * 8192))
print(aio.run(fd, [(True, data, 61440), (True, data, 65536), (True, data, 0)]))
"""


def test_a_write_the_kernel_fails_after_submitting_it_reports_its_own_error(tmp_path):
    """Past a file size limit a write is cut short, or fails with EFBIG once carried out:
    errors that come back as the event's result, not from io_submit."""
    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path / "file")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == str([4096, -errno.EFBIG, 8192])
