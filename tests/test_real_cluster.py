"""The binding and `pfnbd serve` against a real single-node PureFlash cluster.

`scripts/pureflash-cluster` builds (cached by source hash) and starts ZooKeeper, MariaDB,
the conductor and one pfs in a session temporary directory on the real disk: pfs
zero-fills a 10 GiB metadata area on its first start, too much for a tmpfs.  Skipped, with
the reason, when the PureFlash sources are absent ($PUREFLASH_SRC, else
../shared/third_party); .ci/run has them.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import attrs
import pytest

from conftest import SYSTEM_PYTHON, require, run
from test_libnbd_clients import test_libnbd_256_pipelined_requests as libnbd_256_pipelined_requests
from test_pureflash import (
    QEMU_IO_READS, QEMU_IO_WRITES, Completions, check_qemu_io, expected_after_qemu_io, pattern, qemu_io_command,
)
from pfnbd.pureflash import LIBRARY_ENV, PfClientVolumeInfo, PureFlashClient, PureFlashVolume
from pfnbd.volume import PF_MAX_IO_SIZE, VolumeOpenError

CLUSTER_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pureflash-cluster"
CONDUCTOR = "http://127.0.0.1:49180/s5c/"
STEP_TIMEOUT = 60  # seconds any one wait may take
KiB = 1 << 10
MiB = 1 << 20
TRAY_DISK_NEEDED = 16 << 30  # the 15 GiB sparse tray gets 11 GB written at first start

# The first test pays for the session's cold build (3.5 min on two idle cores, more in a
# busy CI) and the cluster's start, past the suite's 300 s default.
pytestmark = pytest.mark.timeout(1200)


@attrs.frozen
class RealCluster:
    """A started cluster: its directory (pf.conf, env, logs) and the client library."""

    dir: Path
    library: Path
    _names = itertools.count(1)

    @property
    def conf(self) -> Path:
        return self.dir / "pf.conf"

    def rest(self, op: str, **params: object) -> dict:
        """One conductor REST call; a non-zero ret_code fails the test with its reason."""
        query = urllib.parse.urlencode({"op": op, **params})
        with urllib.request.urlopen(f"{CONDUCTOR}?{query}", timeout=STEP_TIMEOUT) as reply:
            answer = json.load(reply)
        assert answer.get("ret_code") == 0, answer
        return answer

    def create_volume(self, size: int, prefix: str = "v") -> str:
        """A fresh volume of `size` bytes with a name no other test uses."""
        name = f"{prefix}{next(self._names)}_{os.getpid()}"
        self.rest("create_volume", volume_name=name, size=size)
        return name

    def client(self, io_depth: int | None = None) -> PureFlashClient:
        conf = self.conf
        if io_depth is not None:
            conf = self.dir / f"pf-io_depth-{io_depth}.conf"
            conf.write_text(self.conf.read_text() + f"io_depth={io_depth}\n")  # [client] is last
        return PureFlashClient(conf, self.library)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.dir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def file_system(path: Path) -> str:
    return run("stat", "-f", "-c", "%T", str(path)).stdout.strip()


def cluster_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLUSTER_SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory) -> RealCluster:
    # A cold build takes 4-8 minutes on two busy cores; a cached one, a second.
    build = cluster_script("build", timeout=1200)
    if build.returncode and "no PureFlash sources" in build.stderr:
        pytest.skip(build.stderr.strip())
    assert build.returncode == 0, build.stderr
    base = tmp_path_factory.mktemp("pureflash")
    own_base = file_system(base) == "tmpfs"
    if own_base:  # pytest's temporary directory is in memory: the tray goes to the disk
        base = Path(tempfile.mkdtemp(prefix="pfnbd-cluster-", dir="/var/tmp"))
    if file_system(base) == "tmpfs" or shutil.disk_usage(base).free < TRAY_DISK_NEEDED:
        pytest.skip(f"the PureFlash tray needs 16 GiB free on a real disk; {base} is "
                    f"{file_system(base)} with {shutil.disk_usage(base).free >> 30} GiB free")
    start = cluster_script("start", str(base), timeout=600)
    cluster = RealCluster(base, Path(build.stdout.strip().splitlines()[-1]) / "lib" / "libs5common.so")
    try:
        assert start.returncode == 0, f"{start.stderr}\n{cluster.log_tail('pfs')}"
        assert (base / "env").read_text() == f"{LIBRARY_ENV}={cluster.library}\n"
        yield cluster
    finally:
        if (base / "run").exists():  # not when start refused before starting anything
            stop = cluster_script("stop", str(base), timeout=120)
            assert stop.returncode == 0, stop.stderr
        assert not (base / "tray.img").exists()
        if own_base:
            shutil.rmtree(base)


def submit(volume: PureFlashVolume, done: Completions, tag: object, buffers: list, offset: int,
           is_write: bool) -> int:
    views = [memoryview(b) for b in buffers]
    return volume.iov_submit(views, sum(len(v) for v in views), offset, done.callback, tag, is_write)


def submit_when_room(volume: PureFlashVolume, done: Completions, tag: object, buffers: list, offset: int,
                     is_write: bool) -> None:
    """Submits, waiting for a completion each time the pool is full."""
    while (status := submit(volume, done, tag, buffers, offset, is_write)) == -errno.EAGAIN:
        done.wait(len(done.statuses) + 1)
    assert status == 0


@pytest.fixture
def volume(real_cluster):
    """A fresh 64 MiB volume, opened."""
    opened = real_cluster.client().open_volume(real_cluster.create_volume(64 * MiB))
    yield opened
    opened.close()


# --- the binding on the real library -------------------------------------------------


def test_open_size_and_query(real_cluster):
    name = real_cluster.create_volume(96 * MiB)
    client = real_cluster.client()
    volume = client.open_volume(name)
    try:
        assert (volume.size, volume.read_only, volume.name) == (96 * MiB, False, name)
    finally:
        volume.close()
    info = client.query_volume_info(name)
    # list_volume, which the query asks, carries no shards: shard_count stays 0 where the
    # emulation says 1 (one per 64 GiB), and a fresh head has snap_seq 1.
    assert (info.status, info.volume_name, info.snap_name, info.size, info.shard_count, info.replicas,
            info.meta_ver, info.snap_seq) == ("OK", name, "", 96 * MiB, 0, 1, 0, 1), info
    assert info.id == real_cluster.rest("list_volume", name=name)["volumes"][0]["id"], info
    assert client.describe(name) == f"PureFlash volume {name}, 96 MiB, 1 replica"
    # Upstream drops curl_easy_escape's result (pf_client_api.cpp:291): any snapshot
    # name, even "", is -ENOMEM.  describe() therefore never passes one.
    for snap in ("s1", ""):
        with pytest.raises(VolumeOpenError, match="Cannot allocate memory"):
            client.query_volume_info(name, snap)
    assert ctypes.sizeof(PfClientVolumeInfo) == 64 + 128 + 128 + 8 + 8 + 4 * 4


def test_unknown_volume_and_bad_configurations(real_cluster):
    client = real_cluster.client()
    with pytest.raises(VolumeOpenError, match="cannot open PureFlash volume no_such_volume "):
        client.open_volume("no_such_volume")
    with pytest.raises(VolumeOpenError, match="no PureFlash volume no_such_volume"):
        client.query_volume_info("no_such_volume")
    name = real_cluster.create_volume(MiB)
    # PF_MAX_IO_DEPTH is 255 as documented: 255 opens, 256 does not.
    real_cluster.client(io_depth=255).open_volume(name).close()
    with pytest.raises(VolumeOpenError, match=f"cannot open PureFlash volume {name} "):
        real_cluster.client(io_depth=256).open_volume(name)


def test_every_size_up_to_128k_round_trips(volume):
    """Every multiple of 512 up to PF_MAX_IO_SIZE, written then read back, half of them
    scattered over two buffers; all in flight at once within the pool of 240."""
    sizes = range(512, PF_MAX_IO_SIZE + 1, 512)
    done = Completions()
    offsets, written = {}, {}
    offset = 0
    for size in sizes:
        offsets[size], written[size] = offset, pattern(size, seed=size)
        offset += size
    assert offset < volume.size
    for size in sizes:
        data = written[size]
        buffers = [bytearray(data)] if size % 1024 else [bytearray(data[:512]), bytearray(data[512:])]
        submit_when_room(volume, done, ("w", size), buffers, offsets[size], True)
    assert set(done.wait(len(sizes)).values()) == {0}

    read_back = {size: bytearray(size) for size in sizes}
    for size in sizes:
        submit_when_room(volume, done, ("r", size), [read_back[size]], offsets[size], False)
    assert set(done.wait(2 * len(sizes)).values()) == {0}
    for size in sizes:
        assert bytes(read_back[size]) == written[size], size


def test_submit_rules_and_never_written_space(volume):
    done = Completions()
    assert submit(volume, done, "odd", [bytearray(4096)], 100, False) == -errno.EINVAL
    assert submit(volume, done, "short", [bytearray(1000)], 4096, False) == -errno.EINVAL
    assert submit(volume, done, "big", [bytearray(PF_MAX_IO_SIZE + 512)], 0, False) == -errno.EINVAL
    never_written = bytearray(b"\xff" * PF_MAX_IO_SIZE)
    end = volume.size - PF_MAX_IO_SIZE  # the largest I/O, ending at the volume's end
    assert submit(volume, done, "hole", [never_written], end, False) == 0
    assert done.wait(1) == {"hole": 0}
    assert never_written == bytes(PF_MAX_IO_SIZE)


def test_callbacks_come_from_the_library_thread(volume):
    done = Completions()
    submitted = []

    def submit_from_another_thread():
        for n in range(16):
            submitted.append(submit(volume, done, n, [bytearray(4 * KiB)], n * 4 * KiB, n % 2 == 0))

    submitter = threading.Thread(target=submit_from_another_thread)
    submitter.start()
    submitter.join(STEP_TIMEOUT)
    assert submitted == [0] * 16
    assert done.wait(16) == {n: 0 for n in range(16)}
    assert len(done.threads) == 1
    assert done.threads.isdisjoint({submitter.ident, threading.main_thread().ident})


def test_pool_is_twice_io_depth_then_eagain(real_cluster):
    """The real pool holds 2 * io_depth requests; the next submit gets -EAGAIN at once."""
    volume = real_cluster.client(io_depth=4).open_volume(real_cluster.create_volume(MiB))
    done = Completions()
    try:
        statuses = [submit(volume, done, n, [bytearray(PF_MAX_IO_SIZE)], 0, False) for n in range(64)]
        accepted = statuses.count(0)
        assert set(statuses) <= {0, -errno.EAGAIN}
        # Completions free slots as the loop runs, so more than 8 may be accepted, but
        # the first 8 always are and a 128 KiB read takes longer than 8 submits.
        assert statuses[:8] == [0] * 8 and -errno.EAGAIN in statuses, statuses
        assert set(done.wait(accepted).values()) == {0}
    finally:
        volume.close()


def test_snapshot_opens_read_only_by_name(real_cluster):
    name = real_cluster.create_volume(4 * MiB)
    client = real_cluster.client()
    head = client.open_volume(name)
    done = Completions()
    try:
        assert submit(head, done, "before", [bytearray(b"\x11" * 64 * KiB)], 0, True) == 0
        assert done.wait(1) == {"before": 0}
        real_cluster.rest("create_snapshot", volume_name=name, snapshot_name="snap1")
        assert submit(head, done, "after", [bytearray(b"\x22" * 64 * KiB)], 0, True) == 0
        assert done.wait(2)["after"] == 0
        snapshot = client.open_volume(name, "snap1")
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
        with pytest.raises(VolumeOpenError, match=f"cannot open PureFlash volume {name}@nosnap "):
            client.open_volume(name, "nosnap")
    finally:
        head.close()


def test_close_waits_for_in_flight_io(real_cluster):
    volume = real_cluster.client().open_volume(real_cluster.create_volume(16 * MiB))
    done = Completions()
    count = 0
    for n in range(64):
        status = submit(volume, done, n, [bytearray(pattern(PF_MAX_IO_SIZE, n))], n * PF_MAX_IO_SIZE, True)
        assert status in (0, -errno.EAGAIN)
        count += status == 0
    volume.close()  # returns only once every accepted write has called back
    assert len(done.statuses) == count and set(done.statuses.values()) == {0}
    assert volume.iov_submit([memoryview(bytearray(512))], 512, 0, done.callback, "late", False) == -errno.EBADF


# --- real clients through `pfnbd serve --backend pureflash` --------------------------


def write_through_library(cluster: RealCluster, name: str, offset: int, data: bytes) -> None:
    volume = cluster.client().open_volume(name)
    done = Completions()
    try:
        for n, start in enumerate(range(0, len(data), PF_MAX_IO_SIZE)):
            chunk = bytearray(data[start : start + PF_MAX_IO_SIZE])
            submit_when_room(volume, done, n, [chunk], offset + start, True)
        assert set(done.wait(n + 1).values()) == {0}
    finally:
        volume.close()


def read_through_library(cluster: RealCluster, name: str) -> bytes:
    volume = cluster.client().open_volume(name)
    done = Completions()
    chunks = [bytearray(PF_MAX_IO_SIZE) for _ in range(volume.size // PF_MAX_IO_SIZE)]
    try:
        for n, chunk in enumerate(chunks):
            submit_when_room(volume, done, n, [chunk], n * PF_MAX_IO_SIZE, False)
        assert set(done.wait(len(chunks)).values()) == {0}
    finally:
        volume.close()
    return b"".join(chunks)


@pytest.fixture
def serve_real(real_cluster, start_server, monkeypatch):
    """Factory: `pfnbd serve --backend pureflash --conf DIR/pf.conf` for the given exports."""
    monkeypatch.setenv(LIBRARY_ENV, str(real_cluster.library))

    def serve(*exports: str, extra: tuple[str, ...] = ()):
        return start_server({}, "--backend", "pureflash", "--conf", str(real_cluster.conf), *extra,
                            exports=list(exports))

    return serve


def test_qemu_io_through_pfnbd(real_cluster, serve_real):
    require("qemu-io")
    name = real_cluster.create_volume(8 * MiB, prefix="qemu_io")
    write_through_library(real_cluster, name, 6 * MiB, b"\x77" * 64 * KiB)  # behind the server's back
    server = serve_real(name)
    check_qemu_io(run(*qemu_io_command(server.uri(name), *QEMU_IO_WRITES, *QEMU_IO_READS),
                      timeout=STEP_TIMEOUT, check=False))
    assert server.stop() == 0
    assert read_through_library(real_cluster, name) == expected_after_qemu_io()


def test_qemu_img_nbdinfo_and_nbdcopy_round_trip(real_cluster, serve_real, tmp_path):
    size = 16 * MiB
    name = real_cluster.create_volume(size, prefix="copy")
    server = serve_real(name)
    uri = server.uri(name)
    source = tmp_path / "source.raw"
    with open(source, "wb") as f:  # data islands between holes, one unaligned
        f.truncate(size)
        for n, offset in enumerate((0, 3 * MiB + 512, 9 * MiB, size - 1 * MiB)):
            f.seek(offset)
            f.write(pattern(700 * KiB + 3, seed=n))
    assert run("nbdinfo", "--size", uri, timeout=STEP_TIMEOUT).stdout.strip() == str(size)
    assert f"PureFlash volume {name}, 16 MiB, 1 replica" in run("nbdinfo", "--list", uri,
                                                                 timeout=STEP_TIMEOUT).stdout
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), server.qemu_uri(name),
        timeout=STEP_TIMEOUT)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), server.qemu_uri(name),
        timeout=STEP_TIMEOUT)
    out = tmp_path / "out.raw"
    run("nbdcopy", uri, str(out), timeout=STEP_TIMEOUT)
    assert out.read_bytes() == source.read_bytes()

    second = tmp_path / "second.raw"
    second.write_bytes(pattern(size, seed=99))
    run("nbdcopy", str(second), uri, timeout=STEP_TIMEOUT)
    run("nbdcopy", uri, str(out), timeout=STEP_TIMEOUT)
    assert out.read_bytes() == second.read_bytes()
    assert server.stop() == 0
    assert read_through_library(real_cluster, name) == second.read_bytes()


def test_libnbd_256_pipelined_requests_on_the_real_cluster(real_cluster, serve_real):
    real_cluster.rest("create_volume", volume_name="test_v1", size=64 * MiB)  # what the test reads
    libnbd_256_pipelined_requests(serve_real("test_v1"))


def test_snapshot_exported_read_only(real_cluster, serve_real):
    require("qemu-io", "nbdinfo")
    name = real_cluster.create_volume(4 * MiB, prefix="snap")
    write_through_library(real_cluster, name, 0, b"\x5a" * MiB)
    real_cluster.rest("create_snapshot", volume_name=name, snapshot_name="snap1")
    server = serve_real(name, f"{name}@snap1")
    head, snapshot = server.uri(name), server.uri(f"{name}@snap1")
    check_qemu_io(run(*qemu_io_command(head, "write -P 0x33 0 64k", "read -P 0x33 0 64k"),
                      timeout=STEP_TIMEOUT, check=False))
    check_qemu_io(run(*qemu_io_command(snapshot, "read -P 0x5a 0 1M", "read -P 0 1M 3M", read_only=True),
                      timeout=STEP_TIMEOUT, check=False))
    refused = run(*qemu_io_command(snapshot, "write -P 1 0 4096"), timeout=STEP_TIMEOUT, check=False)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
    assert run("nbdinfo", "--is", "read-only", snapshot, timeout=STEP_TIMEOUT, check=False).returncode == 0
    listing = run("nbdinfo", "--list", head, timeout=STEP_TIMEOUT).stdout
    assert f"snapshot snap1 of PureFlash volume {name}" in listing


# --- `pfnbd volume ... --backend pureflash`: the conductor through ZooKeeper --------


def test_volume_cli_through_the_conductor(real_cluster, cli, tmp_path):
    def pfnbd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli.run("volume", *args, "--backend", "pureflash", "--conf", str(real_cluster.conf), check=check)

    def refused(*args: str) -> str:
        result = pfnbd(*args, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result
        return lines[0]

    name = f"cli_{os.getpid()}"
    assert pfnbd("create", name, "--size", "48M").stdout.strip() == f"created volume {name}: 48 MiB"
    assert f"volume already exists: {name}" in refused("create", name, "--size", "48M")
    listed = {v["name"]: v for v in json.loads(pfnbd("list", "--json").stdout)}
    assert (listed[name]["size"], listed[name]["replicas"], listed[name]["status"]) == (48 * MiB, 1, "OK")
    assert json.loads(pfnbd("info", name, "--json").stdout) == listed[name]
    # The library sees what the CLI made.
    assert real_cluster.client().query_volume_info(name).size == 48 * MiB

    assert pfnbd("snapshot", name, "s1").stdout.strip() == f"created snapshot {name}@s1"
    real_cluster.client().open_volume(name, "s1").close()
    assert "already exists" in refused("snapshot", name, "s1")
    assert pfnbd("snapshot-delete", name, "s1").stdout.strip() == f"deleted snapshot {name}@s1"
    assert pfnbd("delete", name).stdout.strip() == f"deleted volume {name}"
    assert f"no such volume: {name}" in refused("info", name)
    assert "volume not exists" in refused("delete", name)
    assert name not in {v["name"] for v in json.loads(pfnbd("list", "--json").stdout)}

    elsewhere = tmp_path / "other-cluster.conf"
    elsewhere.write_text(real_cluster.conf.read_text().replace("name=cluster1", "name=nowhere"))
    result = cli.run("volume", "list", "--backend", "pureflash", "--conf", str(elsewhere), check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "pfnbd: error: no conductor registered in ZooKeeper under /pureflash/nowhere/conductors"


# --- faults: pfs killed under a writer (last: it restarts the session's store) -------

WRITER = r"""
import json, sys, time
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
outcomes = {}  # write number -> [outcome, seconds it took]
errors_in_a_row = 0
for i in range(int(sys.argv[2])):
    started = time.monotonic()
    try:
        h.pwrite(bytes([i % 251 + 1]) * 65536, i * 65536)
        outcome, errors_in_a_row = "ok", 0
    except nbd.Error as error:
        outcome, errors_in_a_row = str(error), errors_in_a_row + 1
    outcomes[i] = [outcome, time.monotonic() - started]
    if errors_in_a_row == 3:  # the volume is lost to the library: each write would wait as long
        break
    time.sleep(0.02)
print(json.dumps(outcomes))
"""
FAULT_RETRY_TIMEOUT = 20  # seconds: serve's --retry-timeout, and so its I/O watchdog's deadline


# Down 1 s: back before the library's first reopen (5 s after it lost the store).  Down
# 8 s: the reopen meets the dead store, which the conductor may then mark ERROR.
@pytest.mark.parametrize("down_for", [1, 8])
def test_pfs_killed_under_a_writer(real_cluster, serve_real, down_for):
    """kill -9 pfs while a client writes, start it again (and the conductor, which exits
    when the store re-registers): every write is acknowledged or a clean EIO within a
    bound, every acknowledged write is there afterwards, and the server exits in time.

    Two outcomes are allowed, because the library decides.  Mostly it reconnects by
    itself and the write in flight completes after ~10 s.  But when its one reopen of the
    volume fails (the conductor restarting, or not yet seeing the store), the library
    neither resends nor fails the I/O waiting for it, ever, and `pf_close_volume` waits
    for it: pfnbd's watchdog then fails it with EIO at --retry-timeout, and close gives
    up after its bound (pfnbd/pureflash.py)."""
    writes = 300
    name = real_cluster.create_volume(writes * 64 * KiB, prefix="fault")
    server = serve_real(name, extra=("--retry-timeout", str(FAULT_RETRY_TIMEOUT)))
    writer = subprocess.Popen([SYSTEM_PYTHON, "-c", WRITER, server.uri(name), str(writes)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # some writes done, most to come
        assert writer.poll() is None
        os.kill(int((real_cluster.dir / "run" / "pfs.pid").read_text()), signal.SIGKILL)
        time.sleep(down_for)
        restart = cluster_script("restart-pfs", str(real_cluster.dir), timeout=300)
        assert restart.returncode == 0, restart.stderr
        # A write waits at most about twice the deadline (a retried submit gets its own).
        stdout, stderr = writer.communicate(timeout=writes * 0.1 + 3 * 2 * FAULT_RETRY_TIMEOUT + 60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, stderr
    outcomes = {int(i): outcome for i, (outcome, _) in json.loads(stdout).items()}
    slowest = max(seconds for _, seconds in json.loads(stdout).values())
    errors = {outcome for outcome in outcomes.values() if outcome != "ok"}
    assert all("Input/output error" in error for error in errors), errors
    assert len(outcomes) == writes or list(outcomes.values())[-3:] != ["ok"] * 3
    assert slowest < 2 * FAULT_RETRY_TIMEOUT + 10
    stopped_at = time.monotonic()
    assert server.stop(timeout=60) == 0, server.log()
    assert time.monotonic() - stopped_at < 30
    data = read_through_library(real_cluster, name)
    lost = [i for i, outcome in outcomes.items()
            if outcome == "ok" and data[i * 64 * KiB : (i + 1) * 64 * KiB] != bytes([i % 251 + 1]) * 64 * KiB]
    assert lost == []
    failed = sum(outcome != "ok" for outcome in outcomes.values())
    reconnected = len(outcomes) == writes and outcomes[writes - 1] == "ok"
    print(restart.stderr.strip().splitlines()[-1])
    print(f"pfs restart: the library {'reconnected' if reconnected else 'never reconnected'}, "
          f"{failed} writes failed with EIO, the slowest took {slowest:.1f} s")
