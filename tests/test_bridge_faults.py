"""A host that fails under the bridge: a failed sync, a failed block status, a bug
in the library's thread, a submit refused midway.  Each gets an error to its own
request, never a false OK, and the server, its other exports and the thread every
submitter waits on keep working.

The host faults are real system calls failing: `tests/hostfaults/hostfaults.c`,
preloaded into `pfnbd serve`, fails fdatasync, SEEK_DATA/SEEK_HOLE or reads (pread, or
through native AIO) with EIO
while a file of that name exists in the fault directory.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
import trio

from conftest import SYSTEM_PYTHON, run
from pfnbd.store import Store
from pfnbd.volume import (
    PF_MAX_IO_SIZE,
    PF_STATUS_NO_RESOURCE,
    EmulatedClient,
    VolumeBridge,
    VolumeIOError,
)
from test_qemu_clients import STEP_TIMEOUT, qemu_io

HOST_FAULTS_SOURCE = Path(__file__).parent / "hostfaults" / "hostfaults.c"
KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture(scope="session")
def host_faults_library(tmp_path_factory) -> Path:
    library = tmp_path_factory.mktemp("hostfaults") / "hostfaults.so"
    run("gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
        "-o", str(library), str(HOST_FAULTS_SOURCE), "-ldl", timeout=120)
    return library


class HostFaults:
    """Arms and clears the preloaded faults of one server."""

    def __init__(self, library: Path, directory: Path) -> None:
        directory.mkdir()
        self.directory = directory
        self.env = {"LD_PRELOAD": str(library), "PFNBD_HOST_FAULTS": str(directory)}

    def arm(self, fault: str) -> None:
        (self.directory / fault).touch()

    def clear(self, fault: str) -> None:
        (self.directory / fault).unlink()


def qemu_io_fails(uri: str, command: str) -> str:
    """Runs one qemu-io command that must fail (qemu-io's flush fails silently, but
    for its exit code) and returns what it said."""
    result = run("qemu-io", "-f", "raw", "--cache=writeback", "-c", command, uri,
                 timeout=STEP_TIMEOUT, check=False)
    assert result.returncode != 0, f"qemu-io {command!r} succeeded:\n{result.stdout}"
    return result.stdout + result.stderr


@pytest.fixture
def host_faults(host_faults_library, tmp_path) -> HostFaults:
    return HostFaults(host_faults_library, tmp_path / "faults")


IDLE_CLIENT = r"""
import sys, time
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
time.sleep(60)
"""


def test_a_failed_flush_fails_the_export_until_it_is_opened_again(start_server, host_faults):
    server = start_server({"test_v1": "4M", "other": "4M"}, env=host_faults.env)
    qemu_io(server.uri(), "write -P 0xaa 0 64k", "flush")

    host_faults.arm("fdatasync")
    qemu_io_fails(server.uri(), "flush")
    host_faults.clear("fdatasync")
    # The disk works again, but what that flush covered may be gone: a later flush
    # that succeeded would be a false OK for those writes.
    qemu_io_fails(server.uri(), "flush")
    assert "Input/output error" in qemu_io_fails(server.uri(), "write -P 0xbb 64k 4k")
    assert "Input/output error" in qemu_io_fails(server.uri(), "write -z 64k 4k")
    qemu_io(server.uri(), "read -P 0xaa 0 64k")  # reads go on
    qemu_io(server.uri("other"), "write -P 0xcc 0 64k", "flush", "read -P 0xcc 0 64k")
    assert "flush of test_v1 failed" in server.log()
    # A client still connected at SIGTERM: the flush shutdown makes for it fails too,
    # which is logged, not raised.
    idle = subprocess.Popen([SYSTEM_PYTHON, "-c", IDLE_CLIENT, server.uri()], stdout=subprocess.PIPE, text=True)
    assert idle.stdout.readline() == "connected\n"
    assert server.stop() == 0
    idle.kill()
    idle.wait()
    assert "flush at shutdown failed" in server.log()

    reopened = start_server({"test_v1": "4M"})
    qemu_io(reopened.uri(), "write -P 0xdd 64k 4k", "flush", "read -P 0xdd 64k 4k", "read -P 0xaa 0 64k")


def test_a_failed_block_status_fails_that_request_only(start_server, host_faults):
    server = start_server({"test_v1": "4M"}, env=host_faults.env)
    qemu_io(server.uri(), "write -P 0xaa 1M 64k")
    host_faults.arm("seek")
    refused = run("nbdinfo", "--map", server.uri(), timeout=STEP_TIMEOUT, check=False)
    assert refused.returncode != 0 and "Input/output error" in refused.stderr, refused
    host_faults.clear("seek")
    mapped = run("nbdinfo", "--map", server.uri(), timeout=STEP_TIMEOUT).stdout
    assert "data" in mapped and "hole" in mapped, mapped
    qemu_io(server.uri(), "read -P 0xaa 1M 64k", "write -P 0xbb 0 4k", "flush")


def test_a_failed_read_fails_that_read_and_the_connection_goes_on(start_server, host_faults):
    server = start_server({"test_v1": "4M"}, env=host_faults.env)
    qemu_io(server.uri(), "write -P 0xaa 0 64k", "flush")
    host_faults.arm("read")
    assert "Input/output error" in qemu_io_fails(server.uri(), "read 0 64k")
    host_faults.clear("read")
    qemu_io(server.uri(), "read -P 0xaa 0 64k")


# --- the bridge over a misbehaving library ------------------------------------------


class Wrapped:
    """Everything of `inner`, but for what a test replaces."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)


def open_volume(tmp_path: Path, size: int = 4 * MiB):
    store = Store(tmp_path / "data")
    store.create("test_v1", size)
    return EmulatedClient(store).open_volume("test_v1")


def run_bridge(backend, body, timeout: float = STEP_TIMEOUT):
    async def main():
        bridge = VolumeBridge(backend)
        with trio.fail_after(timeout):
            return await body(bridge)

    try:
        return trio.run(main)
    finally:
        backend.close()


@pytest.mark.parametrize("failing", ["transfers", "batch"])
def test_a_bug_on_the_library_thread_fails_those_ios_and_the_thread_goes_on(tmp_path, failing):
    """Any exception an I/O raises on `vol_proc` (not only OSError) completes it with
    EIO; the thread serves the next I/O, and closing the volume still returns."""
    volume = open_volume(tmp_path)
    image = volume._image
    volume._image = broken = Wrapped(image)
    setattr(broken, failing, lambda *args: (_ for _ in ()).throw(RuntimeError("a bug")))

    async def body(bridge: VolumeBridge):
        with pytest.raises(VolumeIOError) as failed:
            await bridge.write(0, memoryview(b"\xaa" * 4096))
        volume._image = image
        await bridge.write(0, memoryview(b"\xbb" * 4096))
        return failed.value.errno, bytes(await bridge.read(0, 4096))

    assert run_bridge(volume, body) == (errno.EIO, b"\xbb" * 4096)


def test_a_submit_refused_midway_resubmits_every_piece_after_it(tmp_path):
    """A request of four submits whose second is refused with a transient status:
    the third and fourth, never made, are made on the retry too, before the write
    is acknowledged."""
    volume = open_volume(tmp_path)
    refusing = Wrapped(volume)
    calls = []

    def iov_submit(*args):
        calls.append(args[2])
        if len(calls) == 2:
            return PF_STATUS_NO_RESOURCE
        return volume.iov_submit(*args)

    refusing.iov_submit = iov_submit
    data = bytes(range(256)) * (4 * PF_MAX_IO_SIZE // 256)

    async def body(bridge: VolumeBridge):
        await bridge.write(0, memoryview(data))
        return bytes(await bridge.read(0, len(data)))

    assert run_bridge(refusing, body) == data
    assert sorted(set(calls)) == [0, 128 * KiB, 256 * KiB, 384 * KiB]
