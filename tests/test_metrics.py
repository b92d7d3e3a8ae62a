"""`pfnbd serve --metrics`: a real Prometheus server (Debian's `prometheus`) scrapes
pfnbd, and its query API returns counters equal to what the clients did."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from conftest import SYSTEM_PYTHON, require
from test_control import WRITES_IN_FLIGHT
from test_libnbd_clients import LIBNBD_HELPERS
from test_cli import free_loopback_port, hold_connection
from test_qemu_clients import qemu_io

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
    # Every request but the disconnect, which gets no reply.
    answered = [r for r in sent if r.command != "disconnect"]
    wait_for_values(query, "pfnbd_requests_total", {test_v1: len(answered), idle: 0})
    wait_for_values(query, "pfnbd_request_errors_total", {test_v1: 0, idle: 0})
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


def test_metrics_mistakes_get_one_line(cli, tmp_path):
    cli.run("volume", "create", "test_v1", "--size", "16M")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        for value, words in [("port", "[ADDR:]PORT"), ("70000", "[ADDR:]PORT"), (busy, "cannot serve metrics")]:
            result = cli.run("serve", "--socket", str(tmp_path / "nbd.sock"), "--volume", "test_v1",
                             "--metrics", value, check=False)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 1 and len(lines) == 1 and words in lines[0], result.stderr
            assert not (tmp_path / "nbd.sock").exists()
