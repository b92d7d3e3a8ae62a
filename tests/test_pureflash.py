"""The ctypes binding to PureFlash's client library (`pfnbd/pureflash.py`).

Against a stand-in `libs5common` that each test run compiles with gcc from
`tests/pflib/fake_pf_client.c`: the documented ABI over files, with the real submit
rules and callbacks from its own pthread, and hooks a real cluster does not give
(pausing completions, counting -EAGAIN).  The binding is driven three ways: directly,
through the NBD layer's `VolumeBridge` from trio, and end to end with `qemu-io` against
a server.  `tests/test_contract.py` runs what the binding promises on the real library
of a real single-node cluster, beside the emulation; `tests/test_real_cluster.py` the
rest of what only a real cluster has.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import attrs
import pytest
import trio

from conftest import Cli, require, run, serve_in_process
from pfnbd.pureflash import COMPLETIONS_NAME, LIBRARY_ENV, PfClientVolumeInfo, PureFlashClient, VolumeInfo
from pfnbd.store import Extent
from pfnbd.volume import PF_MAX_IO_SIZE, S5_LIB_VER, VolumeBridge, VolumeOpenError

FAKE_LIBRARY_SOURCE = Path(__file__).parent / "pflib" / "fake_pf_client.c"
COMPLETIONS_SOURCE = Path(__file__).parent.parent / "scripts" / "pureflash" / "pfnbd_completions.c"
STEP_TIMEOUT = 30  # seconds any one wait may take
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="session")
def fake_library(tmp_path_factory) -> Path:
    """The fake libs5common, compiled once per test session."""
    library = tmp_path_factory.mktemp("pflib") / "libfake_pf_client.so"
    run("gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread",
        "-o", str(library), str(FAKE_LIBRARY_SOURCE), timeout=120)
    # pfnbd's completion ring, where the binding looks for it: beside the library.
    run("gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread",
        "-o", str(library.with_name(COMPLETIONS_NAME)), str(COMPLETIONS_SOURCE), timeout=120)
    return library


class FakeHooks:
    """The fake's test-only functions, from the same loaded library as the binding's."""

    def __init__(self, library: Path) -> None:
        self._c = ctypes.CDLL(str(library))
        self._c.fake_pf_set_paused.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self._c.fake_pf_vol_proc_thread.argtypes = [ctypes.c_void_p]
        self._c.fake_pf_vol_proc_thread.restype = ctypes.c_ulong
        self._c.fake_pf_eagain_count.argtypes = [ctypes.c_void_p]
        self._c.fake_pf_eagain_count.restype = ctypes.c_ulong
        self._c.fake_pf_info_layout.argtypes = [ctypes.POINTER(ctypes.c_size_t)]

    def set_paused(self, volume, paused: bool) -> None:
        self._c.fake_pf_set_paused(volume.handle, int(paused))

    def vol_proc_thread(self, volume) -> int:
        return self._c.fake_pf_vol_proc_thread(volume.handle)

    def eagain_count(self, volume) -> int:
        return self._c.fake_pf_eagain_count(volume.handle)

    def info_layout(self) -> list[int]:
        layout = (ctypes.c_size_t * 10)()
        self._c.fake_pf_info_layout(layout)
        return list(layout)


@pytest.fixture
def hooks(fake_library) -> FakeHooks:
    return FakeHooks(fake_library)


@attrs.frozen
class FakeCluster:
    """The fake's cluster: a pf.conf and the directory of volume files it names."""

    volume_dir: Path
    library: Path

    def create(self, name: str, size: int) -> Path:
        path = self.volume_dir / name
        with open(path, "wb") as image:
            image.truncate(size)
        return path

    def conf(self, io_depth: int = 120, **fake: int) -> Path:
        """Writes a pf.conf; `fake` sets the [fake] keys the query reports."""
        path = self.volume_dir.parent / f"pf-{io_depth}.conf"
        lines = ["[zookeeper]", "ip=127.0.0.1:2181", "[cluster]", "name=cluster1",
                 "[client]", "conn_type=tcp", f"io_depth={io_depth}",
                 "[fake]", f"volume_dir={self.volume_dir}"]
        lines += [f"{key}={value}" for key, value in fake.items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def client(self, io_depth: int = 120) -> PureFlashClient:
        return PureFlashClient(self.conf(io_depth), self.library)


@pytest.fixture
def cluster(tmp_path, fake_library) -> FakeCluster:
    volume_dir = tmp_path / "cluster"
    volume_dir.mkdir()
    return FakeCluster(volume_dir, fake_library)


class Completions:
    """Records callbacks, which arrive on the library's thread, for the test's thread."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.statuses: dict[object, int] = {}
        self.threads: set[int] = set()

    def callback(self, tag: object, status: int) -> None:
        with self._changed:
            self.statuses[tag] = status
            self.threads.add(threading.get_ident())
            self._changed.notify_all()

    def wait(self, count: int) -> dict[object, int]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.statuses) >= count, STEP_TIMEOUT):
                pytest.fail(f"{count - len(self.statuses)} of {count} callbacks never came")
            return dict(self.statuses)


def pattern(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


# --- the binding, directly -----------------------------------------------------------


def test_volume_info_struct_matches_the_c_layout(hooks):
    fields = [getattr(PfClientVolumeInfo, name).offset for name, _ in PfClientVolumeInfo._fields_]
    assert fields + [ctypes.sizeof(PfClientVolumeInfo)] == hooks.info_layout()


def test_query_volume_info_reads_every_field(cluster):
    image = cluster.create("big", 200 * GiB)  # sparse; spans four 64 GiB shards
    client = PureFlashClient(cluster.conf(rep_count=2, meta_ver=11, snap_seq=7), cluster.library)

    info = client.query_volume_info("big")

    assert info == VolumeInfo("OK", "big", "", 200 * GiB, image.stat().st_ino, 4, 2, 11, 7)
    assert client.describe("big") == "PureFlash volume big, 200 GiB, 2 replicas"
    assert client.describe("big@monday") == (
        "snapshot monday of PureFlash volume big, 200 GiB, 2 replicas, read-only"
    )
    with pytest.raises(VolumeOpenError, match="no PureFlash volume missing"):
        client.query_volume_info("missing")


def test_open_reports_size_and_read_only(cluster):
    cluster.create("test_v1", 3 * MiB)
    cluster.create("test_v1@snap1", 2 * MiB)
    client = cluster.client()

    head = client.open_volume("test_v1")
    snapshot = client.open_volume("test_v1", "snap1")
    try:
        assert (head.size, head.read_only, head.name) == (3 * MiB, False, "test_v1")
        assert (snapshot.size, snapshot.read_only, snapshot.name) == (2 * MiB, True, "test_v1@snap1")
    finally:
        head.close()
        snapshot.close()


def test_open_failures_are_clear_errors(cluster, tmp_path, monkeypatch):
    cluster.create("test_v1", MiB)
    client = cluster.client()
    with pytest.raises(VolumeOpenError, match="cannot open PureFlash volume nope "):
        client.open_volume("nope")
    with pytest.raises(VolumeOpenError, match="cannot open PureFlash volume test_v1@snap9 "):
        client.open_volume("test_v1", "snap9")
    with pytest.raises(VolumeOpenError, match="cannot open PureFlash volume test_v1 "):
        client.open_volume("test_v1", lib_ver=S5_LIB_VER + 1)
    with pytest.raises(VolumeOpenError, match="cannot open PureFlash volume test_v1 "):
        cluster.client(io_depth=256).open_volume("test_v1")  # past PF_MAX_IO_DEPTH

    with pytest.raises(VolumeOpenError, match="cannot read the PureFlash configuration"):
        PureFlashClient(tmp_path / "absent.conf", cluster.library)
    with pytest.raises(VolumeOpenError, match="cannot load the PureFlash client library"):
        PureFlashClient(cluster.conf(), tmp_path / "absent.so")
    not_pureflash = tmp_path / "libother.so"
    run("gcc", "-shared", "-fPIC", "-o", str(not_pureflash), "-x", "c", "/dev/null", timeout=60)
    with pytest.raises(VolumeOpenError, match="not a PureFlash client library: it has no pf_open_volume"):
        PureFlashClient(cluster.conf(), not_pureflash)

    monkeypatch.delenv(LIBRARY_ENV, raising=False)
    with pytest.raises(VolumeOpenError, match=LIBRARY_ENV):
        PureFlashClient(cluster.conf())
    monkeypatch.setenv(LIBRARY_ENV, str(cluster.library))
    PureFlashClient(cluster.conf()).open_volume("test_v1").close()


def test_writes_and_reads_through_the_library(cluster):
    image = cluster.create("test_v1", MiB)
    volume = cluster.client().open_volume("test_v1")
    done = Completions()
    data = pattern(64 * KiB, seed=1)
    zeros = memoryview(bytes(4 * KiB))  # read-only, like the bridge's shared zeros
    try:
        # Scattered over several buffers, as the bridge's chunks are.
        parts = [memoryview(bytearray(data[:1000])), memoryview(bytearray(data[1000:]))]
        assert volume.iov_submit(parts, len(data), 8 * KiB, done.callback, "write", True) == 0
        assert volume.iov_submit([zeros[:512], zeros], 4608, 12 * KiB, done.callback, "zeros", True) == 0
        assert done.wait(2) == {"write": 0, "zeros": 0}

        into = [memoryview(bytearray(4 * KiB)), memoryview(bytearray(60 * KiB))]
        assert volume.iov_submit(into, len(data), 8 * KiB, done.callback, "read", False) == 0
        assert done.wait(3)["read"] == 0
    finally:
        volume.close()

    expected = data[: 4 * KiB] + bytes(4608) + data[4 * KiB + 4608 :]
    assert b"".join(into) == expected
    assert image.read_bytes()[8 * KiB : 8 * KiB + len(data)] == expected


def test_callbacks_come_from_the_completion_thread(cluster, hooks):
    """The library's thread queues completions in pfnbd's C ring and runs no Python: the
    callbacks come from the volume's one completion thread, neither the library's nor a
    submitter's."""
    cluster.create("test_v1", MiB)
    volume = cluster.client().open_volume("test_v1")
    done = Completions()
    submitted: list[int] = []

    def submit_from_another_thread():
        for n in range(8):  # alternately writes and reads
            buffer = memoryview(bytearray(4 * KiB))
            submitted.append(volume.iov_submit([buffer], 4 * KiB, n * 4 * KiB, done.callback, n, n % 2 == 0))

    submitter = threading.Thread(target=submit_from_another_thread)
    submitter.start()
    submitter.join(STEP_TIMEOUT)
    try:
        assert submitted == [0] * 8
        assert done.wait(8) == {n: 0 for n in range(8)}
        vol_proc = hooks.vol_proc_thread(volume)
    finally:
        volume.close()

    assert len(done.threads) == 1
    assert done.threads.isdisjoint({vol_proc, submitter.ident, threading.main_thread().ident})


def test_submit_rules(cluster):
    cluster.create("test_v1", MiB)
    cluster.create("test_v1@snap1", MiB)
    client = cluster.client()
    volume = client.open_volume("test_v1")
    snapshot = client.open_volume("test_v1", "snap1")
    done = Completions()

    def submit(target, length, offset, is_write=False):
        return target.iov_submit([memoryview(bytearray(length))], length, offset, done.callback,
                                 (length, offset), is_write)

    try:
        assert submit(volume, 4096, 100) == -errno.EINVAL  # unaligned offset
        assert submit(volume, 1000, 4096) == -errno.EINVAL  # unaligned length
        assert submit(volume, PF_MAX_IO_SIZE + 512, 0) == -errno.EINVAL  # over 128 KiB
        assert submit(volume, 4096, MiB - 2048) == -errno.EINVAL  # past the end
        assert submit(snapshot, 4096, 0, is_write=True) == -errno.EROFS
        assert volume.discard_submit(0, 4096, done.callback, "discard") == -errno.EOPNOTSUPP
        assert submit(volume, PF_MAX_IO_SIZE, MiB - PF_MAX_IO_SIZE) == 0  # the largest, at the end
        # The fake completes in submit order: had a refused submit been queued, its
        # callback would be here too.
        assert done.wait(1) == {(PF_MAX_IO_SIZE, MiB - PF_MAX_IO_SIZE): 0}
    finally:
        volume.close()
        snapshot.close()


def test_eagain_past_twice_io_depth(cluster, hooks):
    cluster.create("test_v1", MiB)
    volume = cluster.client(io_depth=2).open_volume("test_v1")
    done = Completions()

    def read(n):
        return volume.iov_submit([memoryview(bytearray(512))], 512, n * 512, done.callback, n, False)

    try:
        hooks.set_paused(volume, True)  # nothing completes: the pool of 4 fills up
        assert [read(n) for n in range(4)] == [0, 0, 0, 0]
        assert read(4) == -errno.EAGAIN
        assert hooks.eagain_count(volume) == 1
        hooks.set_paused(volume, False)
        assert done.wait(4) == {n: 0 for n in range(4)}
        assert read(4) == 0  # the pool has room again
        assert done.wait(5)[4] == 0
    finally:
        volume.close()


def test_close_waits_for_in_flight_io(cluster, hooks):
    image = cluster.create("test_v1", MiB)
    data = pattern(3 * 4 * KiB, seed=2)
    image.write_bytes(data)
    volume = cluster.client().open_volume("test_v1")
    done = Completions()
    buffers = [memoryview(bytearray(4 * KiB)) for _ in range(3)]

    hooks.set_paused(volume, True)
    for n, buffer in enumerate(buffers):
        assert volume.iov_submit([buffer], 4 * KiB, n * 4 * KiB, done.callback, n, False) == 0
    unpaused_at: list[float] = []

    def unpause_later():
        time.sleep(0.3)
        unpaused_at.append(time.monotonic())
        hooks.set_paused(volume, False)

    unpauser = threading.Thread(target=unpause_later)
    unpauser.start()
    assert done.statuses == {}
    volume.close()  # blocks until the three reads have called back
    closed_at = time.monotonic()
    unpauser.join(STEP_TIMEOUT)

    assert done.statuses == {0: 0, 1: 0, 2: 0}
    assert closed_at >= unpaused_at[0]
    assert b"".join(buffers) == data
    assert volume.iov_submit(buffers[:1], 4 * KiB, 0, done.callback, "late", False) == -errno.EBADF
    volume.close()  # twice is harmless


def test_what_the_library_cannot_do(cluster):
    cluster.create("test_v1", 5 * MiB)
    volume = cluster.client().open_volume("test_v1")
    try:
        assert volume.can_discard is False
        assert list(volume.allocation(MiB, 2 * MiB)) == [Extent(MiB, 2 * MiB, True)]
        assert volume.flush() is None
    finally:
        volume.close()


# --- through the bridge, from trio ---------------------------------------------------


def test_bridge_retries_eagain_over_the_binding(cluster, hooks):
    """With completions held, the pool of two fills and the third submit of a nine-chunk
    write must get -EAGAIN: the bridge retries until completions resume.  (Every other
    bridge operation over the binding is in test_contract.py, on the real library.)"""
    image = cluster.create("test_v1", 4 * MiB)
    volume = cluster.client(io_depth=1).open_volume("test_v1")
    big = pattern(MiB + 4 * KiB, seed=3)

    async def exercise():
        with trio.fail_after(STEP_TIMEOUT):
            bridge = VolumeBridge(volume)
            hooks.set_paused(volume, True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bridge.write, 64 * KiB, memoryview(bytearray(big)))
                while hooks.eagain_count(volume) == 0:
                    await trio.sleep(0.01)
                hooks.set_paused(volume, False)
            assert bytes(await bridge.read(64 * KiB, len(big))) == big

    try:
        trio.run(exercise)
    finally:
        volume.close()
    assert image.read_bytes()[64 * KiB : 64 * KiB + len(big)] == big


# --- end to end: qemu-io against a server --------------------------------------------


def qemu_io_command(uri: str, *commands: str, read_only: bool = False) -> list[str]:
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else []), uri]
    for command in commands:
        args += ["-c", command]
    return args


def check_qemu_io(result: subprocess.CompletedProcess) -> str:
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0 and "failed" not in output.lower(), output
    return output


# What qemu-io does to a fresh 8 MiB volume, and what the volume must then hold.
QEMU_IO_WRITES = [
    "write -P 0xa5 0 1M",  # eight chunks
    "write -P 0x3c 5000 3000",  # unaligned: a read-modify-write in the bridge
    "write -z 65536 4096",  # WRITE_ZEROES with NO_HOLE
    "write -z -u 98304 8192",  # WRITE_ZEROES that may trim: zeros written all the same
    "discard 131072 65536",  # TRIM: zeros written all the same
    "aio_write -P 0x11 2M 256k",
    "aio_write -P 0x22 3M 256k",
    "aio_flush",
    "flush",
]
QEMU_IO_READS = [
    "read -P 0xa5 0 5000",
    "read -P 0x3c 5000 3000",
    "read -P 0xa5 8000 57536",
    "read -P 0 65536 4096",
    "read -P 0xa5 69632 28672",
    "read -P 0 98304 8192",
    "read -P 0 131072 65536",
    "read -P 0x11 2M 256k",
    "read -P 0x22 3M 256k",
    "read -P 0x77 6M 64k",  # written into the volume file behind the server's back
]


def prepare_qemu_io_volume(cluster: FakeCluster) -> Path:
    image = cluster.create("test_v1", 8 * MiB)
    with open(image, "r+b") as f:
        f.seek(6 * MiB)
        f.write(b"\x77" * 64 * KiB)
    (cluster.volume_dir / "test_v1@snap1").write_bytes(b"\x5a" * MiB)
    return image


def expected_after_qemu_io() -> bytes:
    model = bytearray(8 * MiB)
    model[0 : MiB] = b"\xa5" * MiB
    model[5000:8000] = b"\x3c" * 3000
    model[65536 : 65536 + 4096] = bytes(4096)
    model[98304 : 98304 + 8192] = bytes(8192)
    model[131072 : 131072 + 65536] = bytes(65536)
    model[2 * MiB : 2 * MiB + 256 * KiB] = b"\x11" * 256 * KiB
    model[3 * MiB : 3 * MiB + 256 * KiB] = b"\x22" * 256 * KiB
    model[6 * MiB : 6 * MiB + 64 * KiB] = b"\x77" * 64 * KiB
    return bytes(model)


def test_qemu_io_through_an_in_process_server(cluster, hooks, tmp_path):
    require("qemu-io", "nbdinfo")
    image = prepare_qemu_io_volume(cluster)
    client = cluster.client(io_depth=2)
    socket = tmp_path / "nbd.sock"
    head, snapshot = (f"nbd+unix:///{name}?socket={socket}" for name in ("test_v1", "test_v1@snap1"))

    async def session():
        async with serve_in_process(client, ["test_v1", "test_v1@snap1"], client.describe, socket):
            async def tool(*args: str) -> subprocess.CompletedProcess[str]:
                with trio.fail_after(STEP_TIMEOUT):
                    done = await trio.run_process(args, capture_stdout=True, capture_stderr=True,
                                                  check=False)
                return subprocess.CompletedProcess(args, done.returncode, done.stdout.decode(),
                                                   done.stderr.decode())

            check_qemu_io(await tool(*qemu_io_command(head, *QEMU_IO_WRITES, *QEMU_IO_READS)))
            check_qemu_io(await tool(*qemu_io_command(snapshot, "read -P 0x5a 0 1M", read_only=True)))
            refused = await tool(*qemu_io_command(snapshot, "write -P 1 0 4096"))
            # Opened for writing, a read-only export is refused.
            assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
            assert (await tool("nbdinfo", "--is", "read-only", snapshot)).returncode == 0
            listing = (await tool("nbdinfo", "--list", head)).stdout
            assert "PureFlash volume test_v1, 8 MiB, 1 replica" in listing
            assert "snapshot snap1 of PureFlash volume test_v1" in listing

    trio.run(session)
    assert image.read_bytes() == expected_after_qemu_io()
    assert (cluster.volume_dir / "test_v1@snap1").read_bytes() == b"\x5a" * MiB


def test_serve_backend_pureflash_with_qemu_io(cluster, start_server, monkeypatch):
    """`pfnbd serve --backend pureflash`: the library from $PFNBD_PUREFLASH_LIB, the
    cluster from --conf, the volumes only in the (fake) cluster."""
    require("qemu-io", "nbdinfo")
    image = prepare_qemu_io_volume(cluster)
    monkeypatch.setenv(LIBRARY_ENV, str(cluster.library))
    server = start_server({}, "--backend", "pureflash", "--conf", str(cluster.conf(io_depth=2)),
                          exports=["test_v1", "test_v1@snap1"])

    check_qemu_io(run(*qemu_io_command(server.uri(), *QEMU_IO_WRITES, *QEMU_IO_READS),
                      timeout=STEP_TIMEOUT, check=False))
    check_qemu_io(run(*qemu_io_command(server.uri("test_v1@snap1"), "read -P 0x5a 0 1M", read_only=True),
                      timeout=STEP_TIMEOUT, check=False))
    assert run("nbdinfo", "--is", "read-only", server.uri("test_v1@snap1"), timeout=STEP_TIMEOUT,
               check=False).returncode == 0
    assert run("nbdinfo", "--size", server.uri(), timeout=STEP_TIMEOUT).stdout.strip() == str(8 * MiB)
    # The library cannot say what changed since a snapshot, nor where a snapshot's
    # data lies: only base:allocation is offered, never a guess.
    listing = json.loads(run("nbdinfo", "--list", "--json", server.uri(""), timeout=STEP_TIMEOUT).stdout)
    assert [export["contexts"] for export in listing["exports"]] == [["base:allocation"]] * 2

    assert server.stop() == 0
    assert image.read_bytes() == expected_after_qemu_io()
    # The library's lines of the queries made before serving (the head's, for each
    # export), held while they ran, are passed on once they succeeded.
    queries = [line for line in server.log().splitlines()
               if "]Opening volume test_v1@HEAD(" in line and line.endswith(":pf_query_volume_info) ")]
    assert len(queries) == 2, server.log()


def test_serve_backend_pureflash_refuses_bad_setups(cluster, cli: Cli, tmp_path, monkeypatch):
    """One line on stderr, no traceback, for each thing a user can get wrong."""
    cluster.create("test_v1", MiB)
    conf = str(cluster.conf())
    socket = str(tmp_path / "never.sock")

    def serve(*args: str) -> str:
        result = cli.run("serve", "--backend", "pureflash", "--socket", socket, *args, check=False)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result
        return lines[0]

    monkeypatch.delenv(LIBRARY_ENV, raising=False)
    assert LIBRARY_ENV in serve("--conf", conf, "--volume", "test_v1")
    monkeypatch.setenv(LIBRARY_ENV, str(cluster.library))
    assert "no PureFlash volume missing" in serve("--conf", conf, "--volume", "missing")
    assert "cannot read the PureFlash configuration" in serve("--conf", str(tmp_path / "absent.conf"),
                                                              "--volume", "test_v1")
    assert not os.path.exists(socket)


def test_a_volume_the_library_cannot_open_is_one_line_with_its_reason(cluster, cli: Cli, tmp_path, monkeypatch):
    """The library logs why it failed among its other lines; the command says it in
    one line, and `-v` shows the library's lines as they came."""
    monkeypatch.setenv(LIBRARY_ENV, str(cluster.library))
    conf = str(cluster.conf())
    exported = cli.run("volume", "export", "--backend", "pureflash", "--conf", conf, "missing",
                       str(tmp_path / "missing.raw"), check=False)
    assert exported.returncode == 1 and exported.stderr.splitlines() == [
        f"pfnbd: error: cannot open PureFlash volume missing (configuration {conf}): "
        "volume missing not found: No such file or directory"], exported
    verbose = cli.run("-v", "serve", "--backend", "pureflash", "--conf", conf, "--volume", "missing",
                      "--socket", str(tmp_path / "never.sock"), check=False)
    lines = verbose.stderr.splitlines()
    assert verbose.returncode == 1 and lines[-1] == "pfnbd: error: no PureFlash volume missing", verbose
    assert any("]Volume:missing not exists or can't be open(" in line for line in lines[:-1]), verbose
