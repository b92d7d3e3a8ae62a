"""Durability you can prove: the data directory sits on cutfs (tests/powercut), a
file system that keeps everything not yet fsynced in memory and loses it when the
power is cut; the server dies at the same moment.  `kill -9` alone keeps the page
cache and cannot tell a FLUSH from none; a cut can.

Each test writes, cuts, mounts the backing directory again (a reboot) and starts
a new server on what survived.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import Cli, run, wait_for_socket
from fuzz.nbdwire import Cmd, CmdFlag, NbdClient, pattern
from powercut.harness import PowerCut

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4 * KiB


@pytest.fixture
def power(tmp_path):
    harness = PowerCut(tmp_path / "backing", tmp_path / "mnt", tmp_path / "cutfs.log")
    harness.mount()
    yield harness
    harness.unmount()


@pytest.fixture
def cli(power) -> Cli:
    """The suite's `cli` (and so `start_server`), with its data directory on cutfs."""
    return Cli(power.mountpoint / "data")


def connect(server) -> NbdClient:
    client = NbdClient.unix(server.socket)
    client.handshake()
    client.go("test_v1")
    return client


def flush(client: NbdClient) -> None:
    assert client.request(Cmd.FLUSH).error == 0


def reboot(power: PowerCut, *writers: subprocess.Popen) -> None:
    power.cut(*writers)
    power.mount()


def test_the_harness_loses_what_was_not_synced(power):
    """The harness bites: unsynced contents and sizes vanish, synced ones stay."""
    synced, unsynced = power.mountpoint / "synced", power.mountpoint / "unsynced"
    with open(synced, "wb", buffering=0) as f:
        f.write(b"kept")
        os.fsync(f.fileno())
        f.write(b" lost")
    unsynced.write_bytes(b"lost")
    assert synced.read_bytes() == b"kept lost"
    reboot(power)
    assert synced.read_bytes() == b"kept"
    assert unsynced.read_bytes() == b""  # the name was committed, its contents were not


def test_flushed_data_survives_and_unflushed_pages_are_old_or_new(power, start_server):
    server = start_server()
    flushed, unflushed = pattern(1, 1 * MiB), pattern(2, 256 * KiB)
    with connect(server) as client:
        client.write(0, flushed)
        flush(client)
        client.write(4 * MiB, unflushed)
        reboot(power, server.process)
    with connect(start_server()) as client:
        assert client.read(0, len(flushed)) == flushed
        survivor = client.read(4 * MiB, len(unflushed))
    for start in range(0, len(unflushed), PAGE):
        page = survivor[start : start + PAGE]
        assert page in (unflushed[start : start + PAGE], bytes(PAGE)), f"torn page at {start}"


def test_fua_write_survives_without_a_flush(power, start_server):
    server = start_server()
    data = pattern(3, 128 * KiB)
    with connect(server) as client:
        client.write(1 * MiB + 512, data, flags=CmdFlag.FUA)
        reboot(power, server.process)
    with connect(start_server()) as client:
        assert client.read(1 * MiB + 512, len(data)) == data


def test_every_acknowledged_flush_is_whole_after_a_cut_mid_stream(power, start_server):
    """Writes keep coming after each FLUSH; the cut lands among them."""
    server = start_server()
    rounds = [pattern(10 + n, 64 * KiB) for n in range(6)]
    with connect(server) as client:
        for n, data in enumerate(rounds):
            client.write(n * MiB, data)
            flush(client)
            client.write(n * MiB, pattern(100 + n, 32 * KiB))  # unflushed overwrite of its head
        for n in range(8):
            client.send_request(Cmd.WRITE, 32 * MiB + n * MiB, 64 * KiB, payload=pattern(200 + n, 64 * KiB))
        reboot(power, server.process)
    with connect(start_server()) as client:
        for n, data in enumerate(rounds):
            survivor = client.read(n * MiB, len(data))
            assert survivor[32 * KiB :] == data[32 * KiB :], f"flushed round {n} lost"
            overwritten = pattern(100 + n, 32 * KiB)
            for start in range(0, 32 * KiB, PAGE):
                assert survivor[start : start + PAGE] in (data[start : start + PAGE],
                                                          overwritten[start : start + PAGE])


def test_volume_metadata_survives_once_the_command_returned(power, cli):
    cli.run("volume", "create", "kept", "--size", "16M")
    cli.run("volume", "create", "other", "--size", "1G")
    cli.run("volume", "snapshot", "kept", "first")
    cli.run("volume", "delete", "other")
    reboot(power)
    volumes = {v["name"]: v for v in json.loads(cli.run("volume", "list", "--json").stdout)}
    assert set(volumes) == {"kept"}
    assert volumes["kept"]["size"] == 16 * MiB
    assert "first" in cli.run("volume", "info", "kept").stdout


@pytest.mark.parametrize("cache, survives", [("writeback", True), ("unsafe", False)])
def test_qemu_nbd_through_the_harness(power, tmp_path, cache, survives):
    """A peer checks the harness: qemu-nbd's flushes keep data; with cache=unsafe
    it ignores them, and the cut takes the data."""
    image, sock = power.mountpoint / "disk.raw", tmp_path / "qemu-nbd.sock"
    run("qemu-img", "create", "-f", "raw", str(image), "64M")
    log = tmp_path / "qemu-nbd.log"
    with open(log, "w") as out:
        qemu_nbd = subprocess.Popen(["qemu-nbd", "-f", "raw", f"--cache={cache}", "-k", str(sock),
                                     "-x", "test_v1", "-t", str(image)], stdout=out, stderr=subprocess.STDOUT)
    wait_for_socket(qemu_nbd, sock, log)
    data = pattern(4, 1 * MiB)
    client = NbdClient.unix(sock)
    client.handshake()
    client.go("test_v1")
    client.write(2 * MiB, data)
    flush(client)
    reboot(power, qemu_nbd)
    client.close()
    with open(image, "rb") as f:
        f.seek(2 * MiB)
        survivor = f.read(len(data))
    assert (survivor == data) is survives
