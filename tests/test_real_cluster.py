"""What only the real PureFlash cluster has: the query, its configuration limits,
nbdcopy/qemu-img round trips, the conductor behind `pfnbd volume`, and pfs killed under
a writer.  What both backends promise is in tests/test_contract.py; the cluster itself
is tests/realcluster.py's session fixture (skipped, with the reason, without sources).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import SYSTEM_PYTHON, run
from realcluster import CLUSTER_TIMEOUT, STEP_TIMEOUT, cluster_script
from test_contract import read_through
from test_pureflash import pattern
from test_cpus import TWO_CPUS, cpu_set, threads
from test_workers import served_by
from pfnbd.cpus import PROCESS_CPUS
from pfnbd.pureflash import LIBRARY_ENV, PfClientVolumeInfo
from pfnbd.volume import VolumeOpenError

KiB = 1 << 10
MiB = 1 << 20

pytestmark = CLUSTER_TIMEOUT


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


# --- real clients through `pfnbd serve --backend pureflash` --------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_qemu_img_nbdinfo_and_nbdcopy_round_trip(real_cluster, serve_real, tmp_path, workers):
    size = 16 * MiB
    name = real_cluster.create_volume(size, prefix="copy")
    server = serve_real(name, extra=("--workers", workers))
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
    if workers == "2":  # each with its own library instance, one volume between them
        assert served_by(server) == {"0", "1"}, server.log()
    assert read_through(real_cluster.client().open_volume(name)) == second.read_bytes()


@TWO_CPUS
def test_the_librarys_threads_stay_off_the_trio_threads_cpu(real_cluster, serve_real):
    """Its spin locks, which the trio thread takes to submit, convoy otherwise (pfnbd/cpus.py)."""
    name = real_cluster.create_volume(4 * MiB, prefix="cpus")
    server = serve_real(name)
    run("nbdcopy", "--no-extents", server.uri(name), "null:", timeout=STEP_TIMEOUT)
    placed = threads(server.process.pid)
    trio_cpus = cpu_set(placed[server.process.pid][1])
    assert len(trio_cpus) == 1, placed
    library = [cpu_set(allowed) for thread_name, allowed in placed.values() if thread_name in ("pf_client", "vol_proc")]
    assert library, f"no thread of the library's among {placed}"
    assert all(allowed == PROCESS_CPUS - trio_cpus for allowed in library), placed


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
    # The library logs among its other lines why it cannot open a volume: the command
    # says it in one line of its own.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LIBRARY_ENV, str(real_cluster.library))
        assert refused("export", name, str(tmp_path / "gone.raw")).startswith(
            f"pfnbd: error: cannot open PureFlash volume {name} (configuration {real_cluster.conf}): ")
        served = cli.run("serve", "--backend", "pureflash", "--conf", str(real_cluster.conf), "--volume", name,
                         "--socket", str(tmp_path / "never.sock"), check=False)
        assert served.returncode == 1 and served.stderr.splitlines() == [
            f"pfnbd: error: no PureFlash volume {name}"], served

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
    # The library's reopen may have reached the conductor as it restarted, after
    # restart-pfs repaired the replicas, and had them marked ERROR again: the volume's data
    # is good but no client would get an address for it.
    repair = cluster_script("repair", str(real_cluster.dir), timeout=60)
    assert repair.returncode == 0, repair.stderr
    print(repair.stderr.strip())
    data = read_through(real_cluster.client().open_volume(name))
    lost = [i for i, outcome in outcomes.items()
            if outcome == "ok" and data[i * 64 * KiB : (i + 1) * 64 * KiB] != bytes([i % 251 + 1]) * 64 * KiB]
    assert lost == []
    failed = sum(outcome != "ok" for outcome in outcomes.values())
    reconnected = len(outcomes) == writes and outcomes[writes - 1] == "ok"
    print(restart.stderr.strip().splitlines()[-1])
    print(f"pfs restart: the library {'reconnected' if reconnected else 'never reconnected'}, "
          f"{failed} writes failed with EIO, the slowest took {slowest:.1f} s")
