"""`pfnbd serve --metrics`: a real Prometheus server (Debian's `prometheus`) scrapes
pfnbd, and its query API returns counters equal to what the clients did."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from conftest import SYSTEM_PYTHON, require, run, run_libnbd, wait_for
from test_control import WRITES_IN_FLIGHT, add_export, controlled, execute  # noqa: F401 (a fixture)
from test_libnbd_clients import LIBNBD_HELPERS
from test_cli import free_loopback_port, hold_connection
from test_qemu_clients import qemu_io
from test_workers import WORKERS, served_by, wait_for_workers, worker_pids

from pfnbd.counters import ANSWERED_COMMANDS, COMMAND_NAMES
from pfnbd.workers import MIN_LIFETIME

KiB = 1 << 10
SCRAPE_TIMEOUT = 60  # seconds for Prometheus to start and scrape what we expect


@pytest.fixture
def prometheus(tmp_path):
    """Factory: Debian's Prometheus scraping the given target every second; returns
    a function running an instant query, as {labels-as-tuple: value}."""
    require("prometheus")
    processes = []

    def start(target: str):
        config = tmp_path / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n"
                          f"scrape_configs:\n  - job_name: pfnbd\n    static_configs:\n"
                          f"      - targets: ['{target}']\n")
        port = free_loopback_port()
        log = open(tmp_path / "prometheus.log", "w")
        processes.append(subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT))
        log.close()

        def query(expression: str) -> dict[tuple, float]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    answer = json.load(response)
            except OSError:
                return {}  # not up yet
            return {tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("__name__", "instance", "job"))):
                    float(r["value"][1]) for r in answer["data"]["result"]}

        return query

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def per_command(export: str, counts: dict[str, int]) -> dict[tuple, float]:
    """What `pfnbd_requests_total` shows for an export: every command, 0 where none."""
    return {(("command", COMMAND_NAMES[slot]), ("export", export)): counts.get(COMMAND_NAMES[slot], 0)
            for slot in ANSWERED_COMMANDS}


def wait_for_values(query, expression: str, expected: dict[tuple, float]) -> None:
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    while (got := query(expression)) != expected:
        assert time.monotonic() < deadline, f"{expression}: {got}, expected {expected}"
        time.sleep(0.5)


def test_prometheus_scrapes_counters_equal_to_what_clients_did(start_server, prometheus):
    metrics_port = free_loopback_port()
    server = start_server({"test_v1": "16M", "idle": "16M"}, "--metrics", f"127.0.0.1:{metrics_port}")
    query = prometheus(f"127.0.0.1:{metrics_port}")

    sent = qemu_io(server.uri(), "write -P 1 0 64k", "write -P 2 64k 64k", "write -P 3 1M 4k",
                   "read -P 2 64k 64k", "flush")
    sent += qemu_io(server.uri(), "read 0 128k")
    written = sum(r.length for r in sent if r.command == "write")
    read = sum(r.length for r in sent if r.command == "read")
    assert (written, read) == (132 * KiB, 192 * KiB), sent

    test_v1, idle = (("export", "test_v1"),), (("export", "idle"),)
    wait_for_values(query, "pfnbd_bytes_written_total", {test_v1: written, idle: 0})
    wait_for_values(query, "pfnbd_bytes_read_total", {test_v1: read, idle: 0})
    # Every request but the disconnect, which gets no reply (qemu-io flushes at exit too).
    answered = collections.Counter(r.command.replace(" ", "_") for r in sent if r.command != "disconnect")
    assert set(answered) == {"read", "write", "flush"}, answered
    wait_for_values(query, "pfnbd_requests_total", per_command("test_v1", answered) | per_command("idle", {}))
    wait_for_values(query, "sum by (export) (pfnbd_requests_total)", {test_v1: answered.total(), idle: 0})
    wait_for_values(query, "pfnbd_request_errors_total", {})
    wait_for_values(query, "pfnbd_connections_accepted_total", {(): 2})

    client = hold_connection(server.uri("idle"))
    try:
        wait_for_values(query, "pfnbd_connections", {test_v1: 0, idle: 1})
    finally:
        client.kill()
        client.wait()


def test_prometheus_sees_the_requests_in_flight(start_server, prometheus):
    metrics_port = free_loopback_port()
    # Every completion takes 8 s: the writes stay in flight while Prometheus scrapes.
    server = start_server({"test_v1": "16M"}, "--metrics", f"127.0.0.1:{metrics_port}",
                          "--inject-delay", "8")
    query = prometheus(f"127.0.0.1:{metrics_port}")
    writer = subprocess.Popen([SYSTEM_PYTHON, "-c", LIBNBD_HELPERS + WRITES_IN_FLIGHT, server.uri(), "12"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "issued\n", writer.stderr.read()
        wait_for_values(query, "pfnbd_requests_in_flight", {(("export", "test_v1"),): 12})
        outcomes = json.loads(writer.communicate(timeout=60)[0].splitlines()[-1])["outcomes"]
    finally:
        writer.kill()
    assert outcomes == ["ok"] * 12
    wait_for_values(query, "pfnbd_requests_in_flight", {(("export", "test_v1"),): 0})


@pytest.mark.parametrize("processes", [[], WORKERS], ids=["one-process", "workers"])
def test_metrics_mistakes_get_one_line(cli, tmp_path, processes):
    cli.run("volume", "create", "test_v1", "--size", "16M")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        for value, words in [("port", "[ADDR:]PORT"), ("70000", "[ADDR:]PORT"), (busy, "cannot serve metrics")]:
            result = cli.run("serve", "--socket", str(tmp_path / "nbd.sock"), "--volume", "test_v1",
                             "--metrics", value, *processes, check=False)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 1 and len(lines) == 1 and words in lines[0], result.stderr
            assert not (tmp_path / "nbd.sock").exists()


EVERY_COMMAND = r'''
uri, read_only_uri = sys.argv[1:3]
h = connect(uri, strict=False)  # the requests past the end reach the server
size = h.get_size()
for i in range(3):
    h.pwrite(pattern(i, 4096), i * 4096)
h.pread(4096, 0)
h.pread(8192, 0)
h.flush()
h.trim(4096, 0)
h.zero(4096, 8192)
h.cache(4096, 0)
extents(h, 4096, 0)
expect_errno("EINVAL", h.pread, 4096, size)
expect_errno("ENOSPC", h.pwrite, b"x" * 4096, size)
h.shutdown()
r = connect(read_only_uri, strict=False)  # the writes reach the server
expect_errno("EPERM", r.pwrite, b"x" * 4096, 0)
expect_errno("EPERM", r.trim, 4096, 0)
r.pread(4096, 0)
r.shutdown()
'''


def test_prometheus_counts_every_command_its_errors_and_durations(controlled, prometheus, tmp_path):
    metrics_port = free_loopback_port()
    # Every completion takes 0.3 s: a request served shows in the duration buckets
    # above 0.25 s, one refused before it reaches the volume in those below.
    server, control = controlled({"test_v1": "16M", "ro": "16M"}, "--metrics", f"127.0.0.1:{metrics_port}",
                                 "--inject-delay", "0.3", exports=["test_v1"])
    execute(control, "block-export-add", add_export("ro", "ro"))  # read-only: QMP's default
    query = prometheus(f"127.0.0.1:{metrics_port}")
    run_libnbd(LIBNBD_HELPERS + EVERY_COMMAND, server.uri(), server.uri("ro"))
    # A handshake that fails (not NBD), and one that ends with NBD_OPT_ABORT (a LIST), which does not.
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(server.socket))
        raw.recv(18)  # the server's greeting
        raw.sendall(b"\0" * 4 + b"not NBD, not an option at all")
        raw.recv(1)  # the server drops it
    run("nbdinfo", "--list", f"nbd+unix://?socket={server.socket}")

    sent = {"test_v1": {"read": 3, "write": 4, "flush": 1, "trim": 1, "write_zeroes": 1, "cache": 1,
                        "block_status": 1},
            "ro": {"read": 1, "write": 1, "trim": 1}}
    wait_for_values(query, "pfnbd_requests_total", per_command("test_v1", sent["test_v1"])
                    | per_command("ro", sent["ro"]))
    wait_for_values(query, "pfnbd_request_errors_total", {
        (("command", "read"), ("error", "EINVAL"), ("export", "test_v1")): 1,
        (("command", "write"), ("error", "ENOSPC"), ("export", "test_v1")): 1,
        (("command", "write"), ("error", "EPERM"), ("export", "ro")): 1,
        (("command", "trim"), ("error", "EPERM"), ("export", "ro")): 1,
    })
    # A histogram for each command seen, counting each of its requests.
    counts = {(("command", command), ("export", export)): count
              for export, commands in sent.items() for command, count in commands.items()}
    wait_for_values(query, "pfnbd_request_duration_seconds_count", counts)
    wait_for_values(query, 'pfnbd_request_duration_seconds_bucket{le="+Inf"}',
                    {(*labels, ("le", "+Inf")): count for labels, count in counts.items()})
    # Served reads and writes took the 0.3 s; only the refused ones are faster than 0.25 s.
    wait_for_values(query, 'pfnbd_request_duration_seconds_bucket{command=~"read|write", le="0.25"}', {
        (("command", "read"), ("export", "test_v1"), ("le", "0.25")): 1,
        (("command", "write"), ("export", "test_v1"), ("le", "0.25")): 1,
        (("command", "read"), ("export", "ro"), ("le", "0.25")): 0,
        (("command", "write"), ("export", "ro"), ("le", "0.25")): 1,
    })
    sums = query('pfnbd_request_duration_seconds_sum{command="write", export="test_v1"}')
    assert 3 * 0.3 <= sum(sums.values()) < 60, sums
    wait_for_values(query, "pfnbd_connections_accepted_total", {(): 4})
    wait_for_values(query, "pfnbd_handshakes_failed_total", {(): 1})
    wait_for_values(query, "pfnbd_connections_refused_total", {(): 0})
    # One submit per request that reached the volume: each is under 128 KiB.  The
    # zeroing and the trim release space (a discard submit); the refused ones submit nothing.
    wait_for_values(query, "pfnbd_backend_submits_total", {(("export", "test_v1"),): 3 + 2 + 1 + 1 + 1,
                                                           (("export", "ro"),): 1})
    wait_for_values(query, "pfnbd_backend_eagain_resubmits_total", {(("export", "test_v1"),): 0,
                                                                    (("export", "ro"),): 0})
    wait_for_values(query, "pfnbd_backend_retries_total", {(("export", "test_v1"),): 0, (("export", "ro"),): 0})


CONCURRENT_WRITES = r'''
h = connect(sys.argv[1])
count = int(sys.argv[2])
cookies = [h.aio_pwrite(pattern(i, 4096), i * 4096) for i in range(count)]
while h.aio_in_flight():
    h.poll(-1)
for cookie in cookies:
    h.aio_command_completed(cookie)  # raises if the write failed
for i in range(count):
    assert h.pread(4096, i * 4096) == pattern(i, 4096), i
print(json.dumps({"written": count}))
'''


# 0xC3: connection lost; -11: -EAGAIN in a completion, a retry as any other, not the
# submit's refusal that the same errno is when `pf_iov_submit` returns it.
@pytest.mark.parametrize("status", ["0xC3", "-11"])
def test_prometheus_counts_the_backends_resubmits_and_retries(start_server, prometheus, status):
    metrics_port = free_loopback_port()
    # Two submits in flight at most (-EAGAIN for the rest), and a third of the
    # completions failing with a status the bridge retries.
    server = start_server({"test_v1": "16M"}, "--metrics", f"127.0.0.1:{metrics_port}", "--io-depth", "1",
                          "--inject-error-rate", "0.3", "--inject-status", status)
    query = prometheus(f"127.0.0.1:{metrics_port}")
    count = 32
    assert json.loads(run_libnbd(LIBNBD_HELPERS + CONCURRENT_WRITES, server.uri(), str(count))) == {
        "written": count}
    test_v1 = (("export", "test_v1"),)
    wait_for_values(query, "pfnbd_request_errors_total", {})
    wait_for_values(query, "sum(pfnbd_requests_total)", {(): 2 * count})
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    while not query("pfnbd_backend_retries_total > 0"):
        assert time.monotonic() < deadline, query("pfnbd_backend_retries_total")
        time.sleep(0.5)
    eagain = query("pfnbd_backend_eagain_resubmits_total")[test_v1]
    retries = query("pfnbd_backend_retries_total")[test_v1]
    submits = query("pfnbd_backend_submits_total")[test_v1]
    assert eagain > 0, "32 writes at once on io_depth 1 met no -EAGAIN"
    # Each request (4 KiB: one submit) submitted once, and once more for each -EAGAIN
    # and each retry: a retry left uncounted would show as a submit too many.
    assert submits == 2 * count + eagain + retries, (submits, eagain, retries)


# Two connections open at once, each on its own worker (a worker with more connections
# leaves the next to the other), each writing and reading its own 64 KiB.
TWO_WORKERS_TRAFFIC = """
import nbd, sys
first, second = nbd.NBD(), nbd.NBD()
first.connect_uri(sys.argv[1])
second.connect_uri(sys.argv[1])
first.pwrite(b"a" * 65536, 0)
second.pwrite(b"b" * 65536, 65536)
assert first.pread(65536, 65536) == b"b" * 65536
second.flush()
first.shutdown()
second.shutdown()
"""


def test_prometheus_scrapes_the_sum_of_the_workers_counters_and_keeps_a_dead_ones(start_server, prometheus):
    metrics_port = free_loopback_port()
    server = start_server({"test_v1": "16M"}, *WORKERS, "--metrics", f"127.0.0.1:{metrics_port}")
    wait_for_workers(server)
    query = prometheus(f"127.0.0.1:{metrics_port}")
    run_libnbd(TWO_WORKERS_TRAFFIC, server.uri())
    wait_for(lambda: len(server.log().split("connection id=")) > 2, "the connections' log lines")
    assert served_by(server) == {"0", "1"}, server.log()

    test_v1 = (("export", "test_v1"),)
    expected = [("pfnbd_bytes_written_total", {test_v1: 128 * KiB}),
                ("pfnbd_bytes_read_total", {test_v1: 64 * KiB}),
                ("pfnbd_requests_total", per_command("test_v1", {"write": 2, "read": 1, "flush": 1})),
                ("pfnbd_connections_accepted_total", {(): 2})]
    for expression, values in expected:
        wait_for_values(query, expression, values)

    # A worker killed and started again: what it counted stays in the sums.
    time.sleep(MIN_LIFETIME)  # past the supervisor's start-up grace
    killed = worker_pids(server)[0]
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: len(worker_pids(server)) == 2 and killed not in worker_pids(server), "a new worker")
    run_libnbd(TWO_WORKERS_TRAFFIC, server.uri())
    for expression, values in expected:
        wait_for_values(query, expression, {labels: 2 * value for labels, value in values.items()})
    wait_for_values(query, "pfnbd_connections", {test_v1: 0})
