"""`pfnbd serve --workers N`: one server in several processes, one volume between them.

What the workers share is tested through the clients users have (libnbd, nbdinfo) and
the signals an operator sends; the store's half of the consistency argument (one chunk
preserved once by two heads) is in test_store.py."""

import gc
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import run, run_libnbd, wait_for
from test_cli import assert_fails_with_one_line, run_serve_expecting_refusal

from pfnbd.workers import _fork

WORKERS = ["--workers", "2"]
CONNECTIONS = 16


def wait_for_workers(server, count: int = 2) -> None:
    wait_for(lambda: len(re.findall(r"\]: serving worker=", server.log())) == count, "every worker's serving line")


def worker_pids(server) -> list[int]:
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text()
    return sorted(map(int, children.split()))


def connections_per_worker(server) -> Counter[str]:
    """How many finished connections each worker logged."""
    return Counter(re.findall(r"pfnbd\[worker (\d+)\]: connection id=", server.log()))


def served_by(server) -> set[str]:
    """The workers that logged a finished connection."""
    return set(connections_per_worker(server))


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return status != "Z"


def private_dirty_kib() -> int:
    rollup = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"^Private_Dirty:\s+(\d+) kB", rollup, re.MULTILINE).group(1))


def test_a_workers_full_collection_leaves_what_it_inherited_shared():
    """A worker collects as any Python process does; what it inherited from the parent
    must not be copied when it does (15 MiB of this test's process, measured, without gc.freeze)."""
    reading, writing = os.pipe()

    def run_worker(index: int) -> int:
        before = private_dirty_kib()
        gc.collect()
        os.write(writing, str(private_dirty_kib() - before).encode())
        return 0

    try:
        pid = _fork(0, run_worker)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        gc.unfreeze()  # what the fork froze in this process
        os.close(writing)
    with os.fdopen(reading) as report:
        copied_kib = int(report.read())
    assert copied_kib < 4096, f"a full collection copied {copied_kib} KiB of the parent's pages"


def test_the_workers_share_the_connections_and_each_sees_the_others_writes(start_server):
    server = start_server({"test_v1": "64M"}, *WORKERS)
    wait_for_workers(server)
    assert len(worker_pids(server)) == 2
    # Every connection writes its own 64 KiB, then each reads all of them back: each
    # worker must see what the other wrote, flushed or not.
    out = run_libnbd(f"""
import nbd, sys
handles = []
for i in range({CONNECTIONS}):
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    handles.append(h)
for i, h in enumerate(handles):
    h.pwrite(bytes([i + 1]) * 65536, i * 65536)
for h in handles:
    for i in range({CONNECTIONS}):
        assert h.pread(65536, i * 65536) == bytes([i + 1]) * 65536, i
handles[0].flush()
for h in handles:
    h.shutdown()
print("ok")
""", server.uri())
    assert out.strip() == "ok"
    wait_for(lambda: len(server.log().split("connection id=")) > CONNECTIONS, "the connections' log lines")
    assert served_by(server) == {"0", "1"}, server.log()


def test_each_new_connection_goes_to_a_worker_with_fewer(start_server):
    """Left to the kernel, a connection goes to whichever worker runs first, and one
    worker often took three of fio's four."""
    server = start_server({"test_v1": "64M"}, *WORKERS)
    wait_for_workers(server)
    out = run_libnbd(f"""
import nbd, sys
handles = []
for i in range({CONNECTIONS}):  # one after another, each open until the end
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    handles.append(h)
for h in handles:
    h.shutdown()
print("ok")
""", server.uri())
    assert out.strip() == "ok"
    wait_for(lambda: len(server.log().split("connection id=")) > CONNECTIONS, "the connections' log lines")
    assert sorted(connections_per_worker(server).values()) == [CONNECTIONS // 2] * 2, server.log()


def test_a_write_of_part_of_a_sector_is_refused_with_workers(start_server):
    """Its read-modify-write would be guarded in one worker only (VolumeBridge)."""
    server = start_server({"test_v1": "64M"}, *WORKERS)
    out = run_libnbd("""
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)  # let the unaligned requests reach the server
h.connect_uri(sys.argv[1])
h.pwrite(b"a" * 4096, 0)
for name, call in [("write", lambda: h.pwrite(b"b" * 100, 10)),
                   ("zero", lambda: h.zero(1000, 512))]:
    try:
        call()
        print(name, "accepted")
    except nbd.Error as error:
        print(name, error.errno)
h.trim(8192, 1000)  # only its whole sectors are trimmed: no merging
assert h.pread(4096, 0) == b"a" * 1024 + bytes(3072)
h.pwrite(b"c" * 512, 512)
print("aligned", h.pread(1024, 0) == b"a" * 512 + b"c" * 512)
h.shutdown()
""", server.uri())
    assert out.split("\n")[:3] == ["write EINVAL", "zero EINVAL", "aligned True"], out


def test_qemu_merges_partial_sectors_itself_and_never_meets_the_refusal(start_server):
    """QEMU's client takes the advertised minimum block size as its request alignment."""
    server = start_server({"test_v1": "64M"}, *WORKERS)
    result = run("qemu-io", "-f", "raw", server.uri(),
                 "-c", "write -P 0x11 0 4096", "-c", "write -P 0x22 10 100", "-c", "write -z 1000 3000",
                 "-c", "read -P 0x11 0 10", "-c", "read -P 0x22 10 100", "-c", "read -P 0x11 110 890",
                 "-c", "read -P 0 1000 3000", "-c", "read -P 0x11 4000 96")
    assert "failed" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert result.stdout.count("read ") == 5, result.stdout
    assert "EINVAL" not in server.log()


def test_sigterm_stops_every_worker_and_the_parent_cleans_up(start_server, tmp_path):
    pid_file = tmp_path / "pfnbd.pid"
    server = start_server({"test_v1": "64M"}, *WORKERS, "--pid-file", str(pid_file))
    wait_for(pid_file.exists, "the pid file")
    assert int(pid_file.read_text()) == server.process.pid
    wait_for_workers(server)  # a worker stopped before that has served nothing, and says nothing
    workers = worker_pids(server)
    assert len(workers) == 2
    assert server.stop() == 0, server.log()
    assert not server.socket.exists() and not pid_file.exists()
    assert not any(map(alive, workers))
    assert server.log().count("SIGTERM: finishing requests in flight") == 2, server.log()


def test_a_killed_worker_is_started_again_and_the_other_keeps_its_clients(start_server):
    server = start_server({"test_v1": "64M"}, *WORKERS)
    wait_for_workers(server)
    client = subprocess.Popen(["/usr/bin/python3", "-c", """
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"k" * 65536, 0)
print("connected", flush=True)
sys.stdin.readline()
assert h.pread(65536, 0) == b"k" * 65536
h.pwrite(b"l" * 65536, 65536)
h.flush()
h.shutdown()
print("ok", flush=True)
""", server.uri()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline() == "connected\n"
        # The worker serving the client holds one socket more than the other.
        sockets = {pid: sum(os.readlink(fd).startswith("socket:") for fd in Path(f"/proc/{pid}/fd").iterdir())
                   for pid in worker_pids(server)}
        serving, idle = sorted(sockets, key=sockets.get, reverse=True)
        assert sockets[serving] == sockets[idle] + 1, sockets
        time.sleep(2.5)  # past the supervisor's start-up grace (workers.MIN_LIFETIME)
        subprocess.run(["kill", "-KILL", str(idle)], check=True)
        wait_for(lambda: len(worker_pids(server)) == 2 and idle not in worker_pids(server), "a new worker")
        assert "exited with signal SIGKILL: starting it again" in server.log()
        out, _ = client.communicate("go\n", timeout=60)
        assert out == "ok\n" and client.returncode == 0
    finally:
        client.kill()
    result = run("nbdinfo", "--size", server.uri())  # the new worker serves too
    assert result.stdout.strip() == str(64 << 20)
    assert serving in worker_pids(server)


def test_workers_whose_parent_is_killed_stop_and_let_the_volume_go(start_server):
    server = start_server({"test_v1": "64M"}, *WORKERS)
    wait_for_workers(server)
    workers = worker_pids(server)
    assert len(workers) == 2
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    wait_for(lambda: not any(map(alive, workers)), "the workers' exit")
    again = start_server({"test_v1": "64M"})  # the writer lock went with them
    assert run("nbdinfo", "--size", again.uri()).stdout.strip() == str(64 << 20)


def test_a_snapshot_taken_while_workers_write_keeps_its_moment(start_server, cli, tmp_path):
    server = start_server({"test_v1": "8M"}, *WORKERS)
    script = """
import nbd, sys
handles = []
for i in range(8):
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    handles.append(h)
byte = sys.argv[2].encode()
# Every connection writes every 64 KiB chunk, at its own sectors: the workers race
# to preserve each chunk for the snapshot.
for chunk in range(128):
    for i, h in enumerate(handles):
        h.aio_pwrite(byte * 512, chunk * 65536 + i * 512)
for h in handles:
    while h.aio_in_flight():
        h.poll(-1)
    h.flush()
    h.shutdown()
"""
    run_libnbd(script, server.uri(), "o")
    cli.run("volume", "snapshot", "test_v1", "s1")
    run_libnbd(script, server.uri(), "n")
    assert server.stop() == 0
    image = tmp_path / "s1.img"
    cli.run("volume", "export", "test_v1@s1", str(image))
    expected = (b"o" * 4096 + bytes(65536 - 4096)) * 128
    assert image.read_bytes() == expected


@pytest.mark.parametrize("args, words", [
    (["--workers", "0"], ["invalid --workers 0"]),
    (["--workers", "2", "--control", "c.sock", "--max-connections", "4"],
     ["--workers cannot be combined with", "--max-connections", "--control"]),
])
def test_workers_with_what_each_would_keep_alone_are_refused_in_one_line(cli, tmp_path, args, words):
    result = run_serve_expecting_refusal(cli, "--socket", str(tmp_path / "s.sock"), *args)
    assert_fails_with_one_line(result, *words)
