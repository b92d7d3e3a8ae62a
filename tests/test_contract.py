"""One contract, two backends: the emulation and a real PureFlash cluster.

Every test here runs twice, against `EmulatedClient` on a data directory (id `emulated`)
and against the session's real single-node cluster through `PureFlashClient` (id
`pureflash`, skipped with the cluster fixture's reason when the sources are absent), so
the emulation cannot drift from the library it imitates.  Three layers: the
`VolumeBackend` submit rules, the `VolumeBridge` above it, and `pfnbd serve` driven by
real clients (qemu-io, libnbd, nbdinfo, fio), plus `pfnbd volume import/export`.

Where the two legitimately differ, the test reads the answer from `EXPECTED`, the one
table of differences; the README's PureFlash section says why each stays.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import subprocess
import threading
from collections.abc import Callable

import attrs
import pytest
import trio

from conftest import Cli, Server, require, run
from realcluster import CLUSTER_TIMEOUT
from test_libnbd_clients import libnbd
from test_pureflash import (
    QEMU_IO_READS, QEMU_IO_WRITES, STEP_TIMEOUT, Completions, check_qemu_io, expected_after_qemu_io, pattern,
    qemu_io_command,
)
from pfnbd.pureflash import LIBRARY_ENV
from pfnbd.store import Extent, Store
from pfnbd.volume import (
    DEFAULT_IO_DEPTH, PF_MAX_IO_SIZE, EmulatedClient, VolumeBackend, VolumeBridge, VolumeClient, VolumeOpenError,
)

KiB = 1 << 10
MiB = 1 << 20
LIBRARY_LOG_LINE = re.compile(r"\[[A-Z]{4} \d{4}-\d\d-\d\d ")  # "[INFO 2026-12-02 00:31:16.205]..."

pytestmark = CLUSTER_TIMEOUT


@attrs.frozen
class Expected:
    """A backend's answers where the real library and the emulation differ."""

    can_discard: bool  # False: the library has no discard, so trims and zeroes write zeros
    sparse: bool  # allocation reports never-written space as a hole (False: all data)
    head_contexts: tuple[str, ...]  # NBD meta contexts of a head that has snapshot snap1
    snapshot_contexts: tuple[str, ...]  # ... and of snap1
    # A callback held up holds the library's thread, so no request of its pool comes
    # back.  False for the real binding: the library's handler only queues the
    # completion in pfnbd's C ring and returns, and the library reuses the request
    # while the callback waits on pfnbd's completion thread.
    held_callback_holds_pool: bool


EXPECTED = {
    "emulated": Expected(
        can_discard=True, sparse=True,
        head_contexts=("base:allocation", "qemu:dirty-bitmap:snap1"),
        snapshot_contexts=("base:allocation", "qemu:allocation-depth"), held_callback_holds_pool=True),
    # The client API cannot tell what was written, what changed since a snapshot, nor
    # where a snapshot's data lies: all allocated, base:allocation only.
    "pureflash": Expected(can_discard=False, sparse=False, head_contexts=("base:allocation",),
                          snapshot_contexts=("base:allocation",), held_callback_holds_pool=False),
}


@attrs.frozen
class Backend:
    """One backend's volumes, clients and server, with the same calls for both."""

    id: str
    make_client: Callable[[int], VolumeClient]
    make_volume: Callable[[int], str]
    take_snapshot: Callable[[str, str], None]
    serve: Callable[..., Server]
    cli_args: tuple[str, ...]  # what `pfnbd volume ...` needs to reach these volumes

    @property
    def expected(self) -> Expected:
        return EXPECTED[self.id]

    def open(self, name: str, snap: str | None = None, io_depth: int = DEFAULT_IO_DEPTH) -> VolumeBackend:
        return self.make_client(io_depth).open_volume(name, snap)

    def write(self, name: str, offset: int, data: bytes) -> None:
        write_through(self.open(name), offset, data)

    def read(self, name: str, snap: str | None = None) -> bytes:
        return read_through(self.open(name, snap))


def write_through(volume: VolumeBackend, offset: int, data: bytes) -> None:
    """Writes through the library, 128 KiB a submit, and closes the volume."""
    done = Completions()
    try:
        for n, start in enumerate(range(0, len(data), PF_MAX_IO_SIZE)):
            chunk = bytearray(data[start : start + PF_MAX_IO_SIZE])
            submit_when_room(volume, done, n, [chunk], offset + start, True)
        assert set(done.wait(n + 1).values()) == {0}
    finally:
        volume.close()


def read_through(volume: VolumeBackend) -> bytes:
    """The whole volume, read through the library; closes it."""
    done = Completions()
    chunks = [bytearray(PF_MAX_IO_SIZE) for _ in range(volume.size // PF_MAX_IO_SIZE)]
    try:
        for n, chunk in enumerate(chunks):
            submit_when_room(volume, done, n, [chunk], n * PF_MAX_IO_SIZE, False)
        assert set(done.wait(len(chunks)).values()) == {0}
    finally:
        volume.close()
    return b"".join(chunks)


def emulated_backend(cli: Cli, start_server) -> Backend:
    store = Store(cli.data_dir)  # the one `start_server` serves
    names = itertools.count(1)

    def make_volume(size: int) -> str:
        name = f"v{next(names)}"
        store.create(name, size)
        return name

    return Backend("emulated", lambda io_depth: EmulatedClient(store, io_depth), make_volume,
                   store.create_snapshot, lambda *exports: start_server({}, exports=list(exports)), ())


@pytest.fixture(params=sorted(EXPECTED))
def backend(request, cli, start_server) -> Backend:
    if request.param == "emulated":
        return emulated_backend(cli, start_server)
    cluster = request.getfixturevalue("real_cluster")
    request.getfixturevalue("monkeypatch").setenv(LIBRARY_ENV, str(cluster.library))  # for the CLI
    serve_real = request.getfixturevalue("serve_real")
    return Backend(
        "pureflash", cluster.client, cluster.create_volume,
        lambda name, snap: cluster.rest("create_snapshot", volume_name=name, snapshot_name=snap),
        serve_real, ("--backend", "pureflash", "--conf", str(cluster.conf)))


def submit(volume: VolumeBackend, done: Completions, tag: object, buffers: list, offset: int,
           is_write: bool) -> int:
    views = [memoryview(b) for b in buffers]
    return volume.iov_submit(views, sum(len(v) for v in views), offset, done.callback, tag, is_write)


def submit_when_room(volume: VolumeBackend, done: Completions, tag: object, buffers: list, offset: int,
                     is_write: bool) -> None:
    """Submits, waiting for a completion each time the pool is full."""
    while (status := submit(volume, done, tag, buffers, offset, is_write)) == -errno.EAGAIN:
        done.wait(len(done.statuses) + 1)
    assert status == 0


# --- the VolumeBackend: what pf_iov_submit promises ---------------------------------


def test_submit_rules_and_never_written_space(backend):
    volume = backend.open(backend.make_volume(4 * MiB))
    done = Completions()
    try:
        assert submit(volume, done, "odd", [bytearray(4096)], 100, False) == -errno.EINVAL
        assert submit(volume, done, "short", [bytearray(1000)], 4096, False) == -errno.EINVAL
        assert submit(volume, done, "big", [bytearray(PF_MAX_IO_SIZE + 512)], 0, False) == -errno.EINVAL
        assert submit(volume, done, "past", [bytearray(4096)], volume.size - 2048, False) == -errno.EINVAL
        never_written = bytearray(b"\xff" * PF_MAX_IO_SIZE)
        end = volume.size - PF_MAX_IO_SIZE  # the largest I/O, ending at the volume's end
        assert submit(volume, done, "hole", [never_written], end, False) == 0
        # A refused submit never calls back: only the accepted one is here.
        assert done.wait(1) == {"hole": 0}
        assert never_written == bytes(PF_MAX_IO_SIZE)
        assert volume.can_discard is backend.expected.can_discard
        assert list(volume.allocation(end, PF_MAX_IO_SIZE)) == [
            Extent(end, PF_MAX_IO_SIZE, not backend.expected.sparse)]
    finally:
        volume.close()


def test_every_size_up_to_128k_round_trips(backend):
    """Every multiple of 512 up to PF_MAX_IO_SIZE, written then read back, half of them
    scattered over two buffers, all in flight at once as far as the pool allows."""
    sizes = range(512, PF_MAX_IO_SIZE + 1, 512)
    volume = backend.open(backend.make_volume(32 * MiB))
    done = Completions()
    offsets, written = {}, {}
    offset = 0
    for size in sizes:
        offsets[size], written[size] = offset, pattern(size, seed=size)
        offset += size
    try:
        for size in sizes:
            data = written[size]
            buffers = [bytearray(data)] if size % 1024 else [bytearray(data[:512]), bytearray(data[512:])]
            submit_when_room(volume, done, ("w", size), buffers, offsets[size], True)
        assert set(done.wait(len(sizes)).values()) == {0}
        read_back = {size: bytearray(size) for size in sizes}
        for size in sizes:
            submit_when_room(volume, done, ("r", size), [read_back[size]], offsets[size], False)
        assert set(done.wait(2 * len(sizes)).values()) == {0}
    finally:
        volume.close()
    assert [size for size in sizes if bytes(read_back[size]) != written[size]] == []


def test_pool_is_twice_io_depth_then_eagain(backend):
    """The pool of 2 * io_depth takes that many submits at once, and a full pool answers
    -EAGAIN.  Where a callback held up holds the pool (`EXPECTED`), it fills and stays
    full."""
    volume = backend.open(backend.make_volume(MiB), io_depth=4)
    done = Completions()
    release = threading.Event()

    def held(tag: object, status: int) -> None:  # the thread that calls back waits here
        release.wait(STEP_TIMEOUT)
        done.callback(tag, status)

    buffers = [memoryview(bytearray(PF_MAX_IO_SIZE)) for _ in range(64)]
    try:
        statuses = [volume.iov_submit([buffer], PF_MAX_IO_SIZE, 0, held, n, False)
                    for n, buffer in enumerate(buffers)]
    finally:
        release.set()
    try:
        accepted = statuses.count(0)
        assert statuses[:8] == [0] * 8, statuses
        assert set(statuses[8:]) <= {0, -errno.EAGAIN}, statuses
        if EXPECTED[backend.id].held_callback_holds_pool:
            # The callbacks of one batch may have freed their requests before the first
            # blocked, so up to twice the pool may go in, never more.
            assert accepted <= 16, statuses
        assert set(done.wait(accepted).values()) == {0}
    finally:
        volume.close()


def test_callbacks_come_from_a_thread_of_the_library(backend):
    volume = backend.open(backend.make_volume(MiB))
    done = Completions()
    submitted = []

    def submit_from_another_thread():
        for n in range(16):
            submitted.append(submit(volume, done, n, [bytearray(4 * KiB)], n * 4 * KiB, n % 2 == 0))

    submitter = threading.Thread(target=submit_from_another_thread)
    submitter.start()
    submitter.join(STEP_TIMEOUT)
    try:
        assert submitted == [0] * 16
        assert done.wait(16) == {n: 0 for n in range(16)}
    finally:
        volume.close()
    assert len(done.threads) == 1
    assert done.threads.isdisjoint({submitter.ident, threading.main_thread().ident})


def test_close_waits_for_in_flight_io(backend):
    name = backend.make_volume(16 * MiB)
    volume = backend.open(name)
    done = Completions()
    accepted = []
    for n in range(64):
        status = submit(volume, done, n, [bytearray(pattern(PF_MAX_IO_SIZE, n))], n * PF_MAX_IO_SIZE, True)
        assert status in (0, -errno.EAGAIN)
        if status == 0:
            accepted.append(n)
    volume.close()  # returns only once every accepted write has called back
    assert done.statuses == dict.fromkeys(accepted, 0)
    assert submit(volume, done, "late", [bytearray(512)], 0, False) == -errno.EBADF
    data = backend.read(name)
    assert [n for n in accepted
            if data[n * PF_MAX_IO_SIZE : (n + 1) * PF_MAX_IO_SIZE] != pattern(PF_MAX_IO_SIZE, n)] == []


def test_snapshot_opens_read_only_and_keeps_its_data(backend):
    name = backend.make_volume(4 * MiB)
    head = backend.open(name)
    done = Completions()
    try:
        assert submit(head, done, "before", [bytearray(b"\x11" * 64 * KiB)], 0, True) == 0
        assert done.wait(1) == {"before": 0}
        backend.take_snapshot(name, "snap1")
        assert submit(head, done, "after", [bytearray(b"\x22" * 64 * KiB)], 0, True) == 0
        assert done.wait(2)["after"] == 0
        snapshot = backend.open(name, "snap1")
        try:
            assert (snapshot.read_only, snapshot.size, snapshot.name) == (True, 4 * MiB, f"{name}@snap1")
            assert submit(snapshot, done, "refused", [bytearray(4096)], 0, True) == -errno.EROFS
            old, new = bytearray(64 * KiB), bytearray(64 * KiB)
            assert submit(snapshot, done, "old", [old], 0, False) == 0
            assert submit(head, done, "new", [new], 0, False) == 0
            statuses = done.wait(4)
            assert (statuses["old"], statuses["new"]) == (0, 0)
            assert (bytes(old), bytes(new)) == (b"\x11" * 64 * KiB, b"\x22" * 64 * KiB)
        finally:
            snapshot.close()
    finally:
        head.close()
    with pytest.raises(VolumeOpenError, match="nosnap"):
        backend.open(name, "nosnap")


# --- the VolumeBridge over each backend ----------------------------------------------


def test_bridge_operations(backend):
    """Every NBD-shaped operation, with io_depth 1: a pool of two, so the nine submits of
    a 1 MiB write and the concurrent writes keep getting -EAGAIN and are retried."""
    size = 5 * MiB  # the last MiB never written
    name = backend.make_volume(size)
    volume = backend.open(name, io_depth=1)
    model = bytearray(size)

    def write_model(offset: int, data: bytes) -> None:
        model[offset : offset + len(data)] = data

    async def exercise():
        with trio.fail_after(STEP_TIMEOUT):
            bridge = VolumeBridge(volume)
            assert bridge.can_fast_zero(may_trim=True) is backend.expected.can_discard

            big = pattern(MiB + 4 * KiB, seed=3)  # nine chunks of at most 128 KiB
            await bridge.write(64 * KiB, memoryview(bytearray(big)))
            write_model(64 * KiB, big)
            assert bytes(await bridge.read(64 * KiB, len(big))) == big

            odd = pattern(3000, seed=4)  # read-modify-write of two edge sectors
            await bridge.write(70 * KiB + 100, memoryview(bytearray(odd)), fua=True)
            write_model(70 * KiB + 100, odd)

            async with trio.open_nursery() as nursery:  # concurrent writes share the pool
                for n in range(6):
                    offset, chunk = 2 * MiB + n * 256 * KiB, pattern(200 * KiB, seed=10 + n)
                    write_model(offset, chunk)
                    nursery.start_soon(bridge.write, offset, memoryview(bytearray(chunk)))

            await bridge.write_zeroes(100 * KiB + 7, 300 * KiB, may_trim=False)
            write_model(100 * KiB + 7, bytes(300 * KiB))
            await bridge.write_zeroes(600 * KiB, 100 * KiB, may_trim=True)
            write_model(600 * KiB, bytes(100 * KiB))
            await bridge.trim(2 * MiB + 1000, 64 * KiB)  # whole sectors only
            write_model(2 * MiB + 1024, bytes(64 * KiB - 512))
            await bridge.flush()

            never_written = size - MiB
            assert list(bridge.extents(never_written, MiB)) == [
                Extent(never_written, MiB, not backend.expected.sparse)]
            assert bytes(await bridge.read(0, size)) == model
            unaligned = 70 * KiB + 99
            assert bytes(await bridge.read(unaligned, 3002)) == model[unaligned : unaligned + 3002]

    try:
        trio.run(exercise)
    finally:
        volume.close()
    assert backend.read(name) == model  # through a fresh open: what is stored


# --- pfnbd serve over each backend, driven by real clients ---------------------------


def test_qemu_io_through_pfnbd(backend):
    require("qemu-io")
    name = backend.make_volume(8 * MiB)
    backend.write(name, 6 * MiB, b"\x77" * 64 * KiB)  # behind the server's back
    server = backend.serve(name)
    check_qemu_io(run(*qemu_io_command(server.uri(name), *QEMU_IO_WRITES, *QEMU_IO_READS),
                      timeout=STEP_TIMEOUT, check=False))
    assert server.stop() == 0
    assert backend.read(name) == expected_after_qemu_io()


PIPELINED_ON_TWO_CONNECTIONS = r'''
handles = [connect(sys.argv[1]), connect(sys.argv[1])]
size = handles[0].get_size()
# 256 writes of 4 KiB .. 192 KiB at distinct offsets, alternately on each connection,
# every fourth with FUA: some cross the 128 KiB submit size.
regions, offset = [], 0
for i in range(256):
    length = 4096 * (1 + i % 48)
    regions.append((offset, length, pattern(i, length)))
    offset += length + 8192
assert offset <= size, offset
writes = [[], []]
for i, (start, _, data) in enumerate(regions):
    flags = nbd.CMD_FLAG_FUA if i % 4 == 0 else 0
    writes[i % 2].append(handles[i % 2].aio_pwrite(nbd.Buffer.from_bytearray(data), start, flags=flags))
writes_in_flight = [h.aio_in_flight() for h in handles]
for h, cookies in zip(handles, writes):
    wait_for_all(h, cookies)
for h in handles:
    h.flush()
# Each region read back on the other connection, all in flight at once.
buffers = [nbd.Buffer(length) for _, length, _ in regions]
reads = [[], []]
for i, (buf, (start, _, _)) in enumerate(zip(buffers, regions)):
    reads[(i + 1) % 2].append(handles[(i + 1) % 2].aio_pread(buf, start))
reads_in_flight = [h.aio_in_flight() for h in handles]
for h, cookies in zip(handles, reads):
    wait_for_all(h, cookies)
bad = [start for buf, (start, _, data) in zip(buffers, regions) if bytes(buf.to_bytearray()) != data]
gaps_zero = all(handles[0].pread(8192, start + length) == bytes(8192) for start, length, _ in regions[:32])
tail = size - 1024 * 1024  # never written
print(json.dumps({"writes_in_flight": writes_in_flight, "reads_in_flight": reads_in_flight,
                  "bad_reads": bad, "gaps_zero": gaps_zero,
                  "written": allocation(handles[1], 4096, regions[0][0]),
                  "never_written": allocation(handles[1], 1024 * 1024, tail)}))
'''


def test_libnbd_pipelined_on_two_connections(backend):
    name = backend.make_volume(64 * MiB)
    server = backend.serve(name)
    result = libnbd(PIPELINED_ON_TWO_CONNECTIONS, server.uri(name))
    never_written = nbd_state(hole=backend.expected.sparse)
    assert result == {"writes_in_flight": [128, 128], "reads_in_flight": [128, 128], "bad_reads": [],
                      "gaps_zero": True, "written": [[4096, 0]], "never_written": [[MiB, never_written]]}


def nbd_state(hole: bool) -> int:
    """base:allocation flags: NBD_STATE_HOLE | NBD_STATE_ZERO for a hole, 0 for data."""
    return 3 if hole else 0


def test_fio_randrw_with_crc32c_verification(backend, tmp_path):
    """fio's nbd engine, 4 KiB random reads and writes at QD32, every block it wrote
    checked against its crc32c when the job ends."""
    require("fio")
    size = 32 * MiB
    name = backend.make_volume(size)
    server = backend.serve(name)
    output = tmp_path / "fio.json"
    run("fio", "--name=contract", "--ioengine=nbd", f"--uri={server.uri(name)}", "--rw=randrw",
        "--bs=4k", "--iodepth=32", f"--size={size}", "--verify=crc32c", "--verify_fatal=1",
        "--do_verify=1", "--verify_state_save=0", "--output-format=json", f"--output={output}", timeout=300)
    job = json.loads(output.read_text())["jobs"][0]
    assert job["error"] == 0, job
    written, read = job["write"]["io_bytes"], job["read"]["io_bytes"]
    # The job moves `size` bytes, reads and writes mixed; the verify phase then reads
    # back every block written: reads are the job's own plus all the writes.
    assert size // 4 < written < size and read == (size - written) + written, (read, written)


def test_snapshot_exported_read_only(backend):
    require("qemu-io", "nbdinfo")
    name = backend.make_volume(4 * MiB)
    backend.write(name, 0, b"\x5a" * MiB)
    backend.take_snapshot(name, "snap1")
    snap = f"{name}@snap1"
    server = backend.serve(name, snap)
    head, snapshot = server.uri(name), server.uri(snap)
    check_qemu_io(run(*qemu_io_command(head, "write -P 0x33 0 64k", "read -P 0x33 0 64k"),
                      timeout=STEP_TIMEOUT, check=False))
    check_qemu_io(run(*qemu_io_command(snapshot, "read -P 0x5a 64k 960k", "read -P 0 1M 3M", read_only=True),
                      timeout=STEP_TIMEOUT, check=False))
    refused = run(*qemu_io_command(snapshot, "write -P 1 0 4096"), timeout=STEP_TIMEOUT, check=False)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
    assert run("nbdinfo", "--is", "read-only", snapshot, timeout=STEP_TIMEOUT, check=False).returncode == 0
    listing = json.loads(run("nbdinfo", "--list", "--json", server.uri(""), timeout=STEP_TIMEOUT).stdout)
    exports = {export["export-name"]: export for export in listing["exports"]}
    assert "snapshot snap1 of " in exports[snap]["description"], exports
    assert tuple(exports[name]["contexts"]) == backend.expected.head_contexts
    assert tuple(exports[snap]["contexts"]) == backend.expected.snapshot_contexts
    check_qemu_io(run(*qemu_io_command(snapshot, "read -P 0x5a 0 64k", read_only=True),
                      timeout=STEP_TIMEOUT, check=False))


# --- pfnbd volume import / export ------------------------------------------------------


def test_volume_import_and_export_round_trip(backend, cli, tmp_path):
    """A raw file with holes and a qcow2 of it go in, and come back out byte for byte,
    sparse; mistakes get one line."""
    require("qemu-img", "cmp")

    def pfnbd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli.run("volume", *args, *backend.cli_args, check=check)

    def refused(*args: str) -> str:
        """pfnbd's one line; the real library logs to stderr on its own, in its own format."""
        result = pfnbd(*args, check=False)
        lines = [line for line in result.stderr.strip().splitlines() if not LIBRARY_LOG_LINE.match(line)]
        assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result
        return lines[0]

    size = 24 * MiB
    source = tmp_path / "source.raw"
    with open(source, "wb") as f:  # data islands between holes, one unaligned
        f.truncate(size)
        for n, offset in enumerate((0, 3 * MiB + 512, 9 * MiB, size - 700 * KiB - 3)):
            f.seek(offset)
            f.write(pattern(700 * KiB + 3, seed=n))
    qcow2 = tmp_path / "source.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(source), str(qcow2))
    # Unique on a cluster the whole session shares.
    raw_name, qcow2_name = (f"imp_{kind}_{os.getpid()}_{backend.id}" for kind in ("raw", "qcow2"))

    for name, image in ((raw_name, source), (qcow2_name, qcow2)):
        assert pfnbd("import", name, str(image)).stdout.strip() == f"imported {image} into volume {name}: 24 MiB"
        out = tmp_path / f"{name}.out"
        assert pfnbd("export", name, str(out)).stdout.strip() == f"exported {name} to {out}: 24 MiB"
        run("cmp", str(source), str(out))
        assert out.stat().st_blocks * 512 < size // 2, "the export is not sparse"
    pfnbd("delete", qcow2_name)

    # A snapshot exports what it kept.
    pfnbd("snapshot", raw_name, "s1")
    backend.write(raw_name, 0, b"\x01" * MiB)
    snapshot_out = tmp_path / "snapshot.out"
    pfnbd("export", f"{raw_name}@s1", str(snapshot_out))
    run("cmp", str(source), str(snapshot_out))

    assert raw_name in refused("import", raw_name, str(source))
    assert "not a file" in refused("import", "elsewhere", str(tmp_path / "absent.raw"))
    assert "--force" in refused("export", raw_name, str(snapshot_out))
    pfnbd("export", raw_name, str(snapshot_out), "--force")
    assert snapshot_out.read_bytes()[: MiB] == b"\x01" * MiB
    missing = f"missing_{os.getpid()}"
    assert missing in refused("export", missing, str(tmp_path / "never.out"))
    assert not (tmp_path / "never.out").exists()
    pfnbd("snapshot-delete", raw_name, "s1")
    pfnbd("delete", raw_name)
