"""What survives the server: data a client flushed survives `kill -9`, a clean stop
(SIGTERM/SIGINT, exit 0) keeps everything, and the stale Unix socket a crash leaves
behind does not stop the next start on the same path. Clients are QEMU's tools."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Cli, Server, pfnbd_command, require
from test_qemu_clients import (
    KiB,
    MiB,
    QEMU_IO_FAILURE,
    NBD_REQUEST_TRACE,
    STEP_TIMEOUT,
    VOLUME_SIZE,
    NbdRequest,
    assert_volume_holds,
    block_map,
    data_and_holes,
    qemu_io,
    requests_traced,
    write_pattern,
    zero_range,
)

# What `scattered_writes` leaves as data, everything else being a hole. The ranges are
# 64 KiB-aligned so that a store allocating at any granularity up to that reports them
# exactly; the unaligned writes fall inside them.
SCATTERED_DATA = [(0, 256 * KiB), (320 * KiB, 704 * KiB), (10 * MiB, 128 * KiB),
                  (VOLUME_SIZE - MiB, MiB)]
CONNECTED_MARKER = "read 1536/1536 bytes at offset 0"


def scattered_writes(expected: bytearray) -> list[str]:
    """qemu-io commands writing data (plain, unaligned and FUA) and punching a hole."""
    return [
        write_pattern(expected, 0x5a, 0, MiB),
        write_pattern(expected, 0x01, 7, 1),
        zero_range(expected, 256 * KiB, 64 * KiB, "discard"),
        write_pattern(expected, 0xa5, 10 * MiB, 128 * KiB),
        write_pattern(expected, 0xa6, 10 * MiB + 512, 1000),
        write_pattern(expected, 0x3c, VOLUME_SIZE - MiB, MiB, "write -f"),
    ]


@contextlib.contextmanager
def client_left_connected(uri: str, *commands: str):
    """A qemu-io that has run `commands` and stays connected, so the server can be
    stopped under an open connection rather than after the client's closing flush.
    Yields the NBD requests those commands sent."""
    require("stdbuf", "qemu-io")
    # line-buffered stdout, so the marker shows up as soon as it is printed
    args = ["stdbuf", "-oL", "qemu-io", "-f", "raw", "--cache=writeback",
            "--trace", "nbd_send_request"]
    # the marker read tells that every command before it has completed
    for command in (*commands, "read 0 1536", "sleep 600000"):
        args += ["-c", command]
    process = subprocess.Popen([*args, uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output = read_until(process, CONNECTED_MARKER)
        if QEMU_IO_FAILURE.search(NBD_REQUEST_TRACE.sub("", output)):
            raise AssertionError(f"qemu-io {list(commands)} failed:\n{output}")
        yield requests_traced(output)
    finally:
        process.kill()
        process.wait()


def read_until(process: subprocess.Popen[bytes], marker: str) -> str:
    output = b""
    deadline = time.monotonic() + STEP_TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while marker.encode() not in output:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise AssertionError(f"qemu-io did not print {marker!r}:\n{output.decode()}")
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"qemu-io exited {process.wait()}:\n{output.decode()}")
            output += chunk
    return output.decode()


def kill_9(server: Server) -> None:
    server.process.kill()
    assert server.process.wait(timeout=STEP_TIMEOUT) == -signal.SIGKILL


def test_flushed_writes_survive_kill_9(start_server, tmp_path: Path):
    require("qemu-io", "qemu-img")
    server = start_server()
    expected = bytearray(VOLUME_SIZE)
    with client_left_connected(server.uri(), *scattered_writes(expected), "flush") as sent:
        assert sent[-2:] == [NbdRequest("flush", 0, 0), NbdRequest("read", 0, 1536)], sent
        kill_9(server)
    restarted = start_server()
    assert_volume_holds(restarted.uri(), expected, tmp_path)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_stop_keeps_data_and_holes(start_server, tmp_path: Path, stop_signal: int):
    require("qemu-io", "qemu-img")
    server = start_server()
    expected = bytearray(VOLUME_SIZE)
    qemu_io(server.uri(), *scattered_writes(expected))
    assert block_map(server.uri()) == data_and_holes(VOLUME_SIZE, SCATTERED_DATA)
    assert server.stop(stop_signal) == 0, server.log()

    restarted = start_server()
    assert block_map(restarted.uri()) == data_and_holes(VOLUME_SIZE, SCATTERED_DATA)
    assert_volume_holds(restarted.uri(), expected, tmp_path)


def test_sigterm_with_a_client_connected_exits_0(start_server, tmp_path: Path):
    """An idle client holding its connection open must not keep the server alive."""
    require("qemu-io", "qemu-img")
    server = start_server()
    expected = bytearray(VOLUME_SIZE)
    with client_left_connected(server.uri(), *scattered_writes(expected)):
        assert server.stop(signal.SIGTERM) == 0, server.log()
    restarted = start_server()
    assert_volume_holds(restarted.uri(), expected, tmp_path)


def wait_until_listening(server: Server) -> None:
    """Polls with connects (the socket file exists before the server listens when a
    stale one was left behind) until the NBD greeting comes back."""
    deadline = time.monotonic() + 30
    while True:
        if server.process.poll() is not None:
            raise AssertionError(f"pfnbd serve exited {server.process.returncode}:\n{server.log()}")
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            try:
                client.connect(str(server.socket))
                assert client.recv(8, socket.MSG_WAITALL) == b"NBDMAGIC"
                return
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"pfnbd serve is not listening after 30 s:\n{server.log()}")
        time.sleep(0.05)


@contextlib.contextmanager
def serve_on(cli: Cli, socket_path: Path, log_path: Path, volume: str):
    """`pfnbd serve` on a socket path the test chooses (the `start_server` fixture always
    picks a fresh one); stopped with SIGTERM at exit, which must give exit code 0."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            pfnbd_command("serve", "--socket", str(socket_path), "--volume", volume),
            env=cli.env, stdout=log, stderr=subprocess.STDOUT,
        )
    server = Server(process=process, log_path=log_path, socket=socket_path)
    try:
        wait_until_listening(server)
        yield server
    finally:
        code = server.stop()
    assert code == 0, f"pfnbd serve exited {code} on SIGTERM:\n{server.log()}"


def test_stale_socket_from_kill_9_does_not_block_restart(start_server, cli: Cli, tmp_path: Path):
    require("qemu-io", "qemu-img")
    server = start_server()
    expected = bytearray(VOLUME_SIZE)
    qemu_io(server.uri(), *scattered_writes(expected), "flush")
    kill_9(server)
    assert server.socket.exists(), "kill -9 should have left the socket file behind"
    with socket.socket(socket.AF_UNIX) as client, pytest.raises(ConnectionRefusedError):
        client.connect(str(server.socket))

    with serve_on(cli, server.socket, tmp_path / "restarted.log", "test_v1") as restarted:
        assert_volume_holds(restarted.uri(), expected, tmp_path)
        qemu_io(restarted.uri(), "write -P 0x77 2M 4k", "read -P 0x77 2M 4k")


def test_a_live_socket_is_not_taken_over(start_server, cli: Cli):
    """The other side of replacing a stale socket: a second server started on the path
    of a running one must refuse, not unlink it and strand the first one's clients."""
    require("qemu-io")
    server = start_server({"test_v1": "64M", "other": "4M"}, exports=["test_v1"])
    qemu_io(server.uri(), "write -P 0x42 0 4k")
    second = subprocess.run(
        pfnbd_command("serve", "--socket", str(server.socket), "--volume", "other"),
        env=cli.env, capture_output=True, text=True, timeout=STEP_TIMEOUT,
    )
    assert second.returncode != 0, f"second server exited 0:\n{second.stderr}"
    qemu_io(server.uri(), "read -P 0x42 0 4k")
