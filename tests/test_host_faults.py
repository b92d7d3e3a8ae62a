"""Faults of the host under the store, made by the operating system, seen by real clients.

A file size limit (RLIMIT_FSIZE) makes `pwritev` write less than asked, then fail with
EFBIG; a snapshot's file gone missing makes its open fail; a read-only bind mount makes
the data directory read-only even to root.  Each test asserts that the client is told
of the failure and never gets a false OK, that the server keeps serving everything
else, and that once the fault is gone every acknowledged byte reads back.
"""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest

from conftest import ServeProcess, pfnbd_command, run, wait_for_socket
from test_qemu_clients import qemu_io, qemu_io_refused
from test_tls import connection_lines

KiB = 1 << 10
MiB = 1 << 20
# Past this offset no file of the server can grow: a write across it is cut short.
FILE_SIZE_LIMIT = 8200 * KiB


def limit_file_size() -> None:
    """For the server process: files stop at FILE_SIZE_LIMIT.  (The server itself
    ignores SIGXFSZ, so crossing it fails the write with EFBIG.)"""
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def exported_bytes(cli, name: str, tmp_path: Path) -> bytes:
    target = tmp_path / f"{name}.raw"
    cli.run("volume", "export", name, str(target), "--force")
    return target.read_bytes()


def test_short_head_write_is_an_error_not_an_ack(cli, start_server, tmp_path: Path) -> None:
    server = start_server({"test_v1": "16M", "other": "16M"}, preexec_fn=limit_file_size)
    # 8188k + 16k crosses the limit: a short pwritev, then EFBIG.
    qemu_io_refused(server.uri(), "write -P 0xbb 8188k 16k")
    # The same server, same export and another export: still serving and writing.
    qemu_io(server.uri(), "write -P 0xaa 0 64k", "flush", "read -P 0xaa 0 64k")
    qemu_io(server.uri("other"), "write -P 0xcc 1M 64k", "flush")
    assert server.stop() == 0
    data = exported_bytes(cli, "test_v1", tmp_path)
    assert data[: 64 * KiB] == b"\xaa" * (64 * KiB)
    assert exported_bytes(cli, "other", tmp_path)[MiB : MiB + 64 * KiB] == b"\xcc" * (64 * KiB)


def test_short_copy_before_write_keeps_the_snapshot(cli, start_server, tmp_path: Path) -> None:
    # Before the fault: data across the limit, then a snapshot of it.
    server = start_server({"test_v1": "16M"})
    qemu_io(server.uri(), "write -P 0xaa 8128k 128k", "flush")
    assert server.stop() == 0
    cli.run("volume", "snapshot", "test_v1", "s1")

    # The copy of the chunk at 8192k into the snapshot is cut short by the limit:
    # the write that needed it must fail, and the chunk must not count as preserved.
    server = start_server({"test_v1": "16M"}, preexec_fn=limit_file_size)
    qemu_io_refused(server.uri(), "write -P 0xbb 8128k 128k")
    qemu_io(server.uri(), "write -P 0xbb 0 64k", "flush")  # still writing elsewhere
    assert server.stop() == 0

    snapshot = exported_bytes(cli, "test_v1@s1", tmp_path)
    assert snapshot[8128 * KiB : 8256 * KiB] == b"\xaa" * (128 * KiB)
    assert snapshot[: 64 * KiB] == bytes(64 * KiB)  # taken before that write
    # With the fault gone, the same write is preserved properly.
    server = start_server({"test_v1": "16M"})
    qemu_io(server.uri(), "write -P 0xbb 8128k 128k", "flush")
    assert server.stop() == 0
    snapshot = exported_bytes(cli, "test_v1@s1", tmp_path)
    assert snapshot[8128 * KiB : 8256 * KiB] == b"\xaa" * (128 * KiB)
    head = exported_bytes(cli, "test_v1", tmp_path)
    assert head[8128 * KiB : 8256 * KiB] == b"\xbb" * (128 * KiB)


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_failed_snapshot_refresh_fails_writes_until_it_can_preserve(cli, start_server, tmp_path: Path) -> None:
    server = start_server({"test_v1": "16M"})
    qemu_io(server.uri(), "write -P 0xaa 0 128k", "flush")
    cli.run("volume", "snapshot", "test_v1", "s1")
    # The server learns of s1 at its next write, and then cannot open s1's map.
    volumes = cli.data_dir / "volumes"
    map_path, aside = volumes / "test_v1@s1.map", volumes / "aside.map"
    map_path.rename(aside)
    qemu_io_refused(server.uri(), "write -P 0xbb 0 64k")
    # Counted once the server has closed each connection (its line comes after): a
    # client that has exited may still have its socket open in the server.
    connection_lines(server, 2)
    descriptors = open_descriptors(server.process.pid)
    for _ in range(3):  # never written unpreserved, and no descriptor left behind
        qemu_io_refused(server.uri(), "write -P 0xbb 0 64k")
    connection_lines(server, 5)
    assert open_descriptors(server.process.pid) <= descriptors
    aside.rename(map_path)
    qemu_io(server.uri(), "write -P 0xbb 0 64k", "flush", "read -P 0xbb 0 64k", "read -P 0xaa 64k 64k")
    assert server.stop() == 0
    assert exported_bytes(cli, "test_v1@s1", tmp_path)[: 128 * KiB] == b"\xaa" * (128 * KiB)


def read_only_io(uri: str, command: str) -> None:
    output = run("qemu-io", "-r", "-f", "raw", "-c", command, uri).stdout
    assert "failed" not in output and "Pattern verification" not in output, output


@pytest.fixture
def read_only_view(cli, tmp_path: Path):
    """The data directory again, at another path, mounted read-only (even root cannot
    write through it)."""
    cli.run("volume", "create", "test_v1", "--size", "16M")
    view = tmp_path / "read-only"
    view.mkdir()
    run("mount", "--bind", str(cli.data_dir), str(view))
    try:
        run("mount", "-o", "remount,ro,bind", str(view))
        yield view
    finally:
        run("umount", str(view))


def test_read_only_serve_of_a_read_only_directory_beside_a_writer(
        cli, start_server, read_only_view: Path, tmp_path: Path) -> None:
    writer = start_server({"test_v1": "16M"})
    qemu_io(writer.uri(), "write -P 0xaa 0 64k", "flush")
    socket, log_path = tmp_path / "reader.sock", tmp_path / "reader.log"
    with open(log_path, "w") as log:
        reader = ServeProcess(subprocess.Popen(
            pfnbd_command("serve", "--read-only", "--socket", str(socket), "--volume", "test_v1"),
            env={**cli.env, "PFNBD_DATA_DIR": str(read_only_view)},
            stdout=log, stderr=subprocess.STDOUT, text=True), log_path)
    try:
        wait_for_socket(reader.process, socket, log_path)
        uri = f"nbd+unix:///test_v1?socket={socket}"
        read_only_io(uri, "read -P 0xaa 0 64k")
        # The writer is not locked out by the reader, and the reader sees its writes.
        qemu_io(writer.uri(), "write -P 0xcc 64k 64k", "flush")
        read_only_io(uri, "read -P 0xcc 64k 64k")
    finally:
        code = reader.stop()
    assert code == 0, reader.log()
