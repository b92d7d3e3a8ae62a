"""Faults injected into the emulated PureFlash client (`serve --inject-*`, `--io-depth`,
and `pfnbd.volume.Faults` in the Python API), seen by real NBD clients.

What must hold: an injected failure reaches the client as an NBD error (EIO), a
retryable PureFlash status is retried until the I/O succeeds, delays and -EAGAIN storms
change nothing but the timing, the server keeps serving through all of it, and a write
is acknowledged only if its data landed: after every run with faults, a fault-free
server reads back what the client was told was written.
"""

from __future__ import annotations

import errno
import json
import random
import subprocess
from pathlib import Path

import pytest
import trio

from conftest import SYSTEM_PYTHON, pfnbd_command, run, serve_in_process
from pfnbd.store import Store
from pfnbd.volume import EmulatedClient, Faults
from test_cli import assert_fails_with_one_line
from test_libnbd_clients import LIBNBD_HELPERS, libnbd, nbdinfo
from test_qemu_clients import STEP_TIMEOUT, assert_volume_holds

KiB = 1 << 10
MiB = 1 << 20
VOLUME_SIZE = 16 * MiB

# `outcomes` retires pipelined commands and says how each ended: "ok" or an errno name.
FAULT_HELPERS = r'''
def outcomes(h, cookies):
    while h.aio_in_flight():
        h.poll(-1)
    found = []
    for cookie in cookies:
        try:
            assert h.aio_command_completed(cookie), cookie
            found.append("ok")
        except nbd.Error as error:
            found.append(errno.errorcode[error.errnum])
    return found

def write_all(h, regions):
    """Pipelines one write of pattern(seed, length) per (offset, length, seed)."""
    return outcomes(h, [h.aio_pwrite(nbd.Buffer.from_bytearray(pattern(seed, length)), offset)
                        for offset, length, seed in regions])

def read_all(h, regions):
    """Pipelines one read per region: (outcome, bytes read) each."""
    buffers = [nbd.Buffer(length) for _, length, _ in regions]
    done = outcomes(h, [h.aio_pread(buffer, offset) for buffer, (offset, _, _) in zip(buffers, regions)])
    return [(outcome, bytes(buffer.to_bytearray())) for outcome, buffer in zip(done, buffers)]
'''


def fault_script(body: str, *args: str, timeout: float = 120):
    return libnbd(FAULT_HELPERS + body, *args, timeout=timeout)


def pattern(seed: int, length: int) -> bytes:
    """The bytes LIBNBD_HELPERS' `pattern` writes (same generator, same seed)."""
    return random.Random(seed).randbytes(length)


def model_of(size: int, regions: list[tuple[int, int, int]]) -> bytes:
    model = bytearray(size)
    for offset, length, seed in regions:
        model[offset:offset + length] = pattern(seed, length)
    return bytes(model)


def test_injected_eio_fails_each_request_and_the_server_keeps_serving(start_server, tmp_path):
    server = start_server({"test_v1": "16M"}, "--inject-error-rate", "1", "--inject-status", "-5")

    result = fault_script(r'''
h = connect(sys.argv[1])
expect_errno("EIO", h.pwrite, pattern(1, 65536), 0)
expect_errno("EIO", h.pwrite, pattern(2, 65536), 65536, nbd.CMD_FLAG_FUA)
expect_errno("EIO", h.pread, 65536, 0)
expect_errno("EIO", h.zero, 65536, 0)
expect_errno("EIO", h.trim, 65536, 0)
pipelined = write_all(h, [(i * 65536, 65536, i) for i in range(32)])
pipelined += [outcome for outcome, _ in read_all(h, [(i * 65536, 65536, i) for i in range(32)])]
h.flush()  # the connection still gets answers
print(json.dumps({"pipelined": sorted(set(pipelined)), "count": len(pipelined)}))
''', server.uri())

    assert result == {"pipelined": ["EIO"], "count": 64}
    qemu = run("qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 64k", server.uri(),
               timeout=STEP_TIMEOUT, check=False)
    assert "Input/output error" in qemu.stdout + qemu.stderr, qemu
    # New connections are still served; nothing any client was refused landed.
    assert nbdinfo("--size", server.uri()).stdout.strip() == str(VOLUME_SIZE)
    assert server.stop() == 0
    assert_volume_holds(start_server({"test_v1": "16M"}).uri(), bytes(VOLUME_SIZE), tmp_path)


def test_persistently_retryable_status_ends_in_eio(start_server):
    # Transient statuses are resubmitted until --retry-timeout, then answered EIO.
    server = start_server({"test_v1": "16M"}, "--inject-error-rate", "1", "--inject-status", "0xC3",
                          "--retry-timeout", "0.5")

    assert fault_script(r'''
h = connect(sys.argv[1])
expect_errno("EIO", h.pwrite, pattern(1, 4096), 0)
expect_errno("EIO", h.pread, 4096, 0)
print(json.dumps(write_all(h, [(i * 4096, 4096, i) for i in range(8)])))
''', server.uri(), timeout=STEP_TIMEOUT) == ["EIO"] * 8
    assert nbdinfo("--size", server.uri()).stdout.strip() == str(VOLUME_SIZE)


def test_retryable_status_is_retried_until_every_request_succeeds(start_server, tmp_path):
    source = tmp_path / "source.raw"
    with open(source, "wb") as f:
        for seed in range(256):
            f.write(pattern(seed, MiB))
    server = start_server({"test_v1": "256M"}, "--inject-error-rate", "0.3", "--inject-status", "0xC3")

    run("nbdcopy", "--flush", str(source), server.uri(), timeout=300)
    compared = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), server.uri(),
                   timeout=300, check=False)

    assert compared.returncode == 0 and "Images are identical." in compared.stdout, compared
    assert server.stop() == 0
    assert_volume_holds(start_server({"test_v1": "256M"}).uri(), source.read_bytes(), tmp_path)


def test_failed_writes_are_never_acknowledged(start_server, tmp_path):
    """A third of all completions fail with EIO and do nothing. Every write the client
    was told succeeded must be on the volume, every one-submit write that failed must
    not be (so the client saw an error for each write that did not land), and every
    successful read returns what is there."""
    server = start_server({"test_v1": "16M"}, "--inject-error-rate", "0.3", "--inject-status", "-5")
    single = [(i * 64 * KiB, 64 * KiB, i) for i in range(128)]  # one 128 KiB-or-less submit each
    multiple = [(8 * MiB + i * 512 * KiB, 384 * KiB, 1000 + i) for i in range(16)]  # three submits
    regions = single + multiple
    script = r'''
h = connect(sys.argv[1])
regions = json.loads(sys.argv[2])
written = write_all(h, regions) if sys.argv[3] == "write" else []
print(json.dumps({"written": written, "read": [[o, data.hex()] for o, data in read_all(h, regions)]}))
'''

    during = fault_script(script, server.uri(), json.dumps(regions), "write")
    assert server.stop() == 0
    after = fault_script(script, start_server({"test_v1": "16M"}).uri(), json.dumps(regions), "read")

    written = during["written"]
    assert set(written) == {"ok", "EIO"}, f"expected some writes to succeed and some to fail: {written}"
    assert {o for o, _ in after["read"]} == {"ok"}
    landed = [bytes.fromhex(data) for _, data in after["read"]]
    for (offset, length, seed), outcome, data in zip(regions, written, landed):
        if outcome == "ok":
            assert data == pattern(seed, length), f"write at {offset} acknowledged but not on the volume"
        elif length <= 128 * KiB:
            assert data == bytes(length), f"failed write at {offset} reported as failed yet landed"
    for (offset, _, _), (outcome, data), now in zip(regions, during["read"], landed):
        assert outcome in ("ok", "EIO"), outcome
        if outcome == "ok":
            assert bytes.fromhex(data) == now, f"successful read at {offset} returned other data"


def test_injected_delay_slows_completions_and_changes_nothing_else(start_server, tmp_path):
    server = start_server({"test_v1": "4M"}, "--inject-delay", "0.05")  # every 128 KiB costs 50 ms
    regions = [(i * 256 * KiB + 512, 4 * KiB * (1 + i % 4), 100 + i) for i in range(16)]

    result = fault_script(r'''
import time
h = connect(sys.argv[1])
regions = json.loads(sys.argv[2])
started = time.monotonic()
h.pread(4096, 0)
one_read = time.monotonic() - started
written = write_all(h, regions)
read = read_all(h, regions)
print(json.dumps({"one_read": one_read, "written": written,
                  "read": [o == "ok" and data == pattern(seed, length)
                           for (o, data), (_, length, seed) in zip(read, regions)]}))
''', server.uri(), json.dumps(regions))

    assert result["one_read"] >= 0.05, result
    assert result["written"] == ["ok"] * len(regions)
    assert result["read"] == [True] * len(regions)
    assert_volume_holds(server.uri(), model_of(4 * MiB, regions), tmp_path)


def test_eagain_storm_with_io_depth_one_keeps_pipelined_requests_correct(start_server, tmp_path):
    """io_depth 1: two submits in flight at most, so nearly every submit of a 256-deep
    pipeline of requests up to 1 MiB (eight submits each) first gets -EAGAIN."""
    server = start_server({"test_v1": "64M"}, "--io-depth", "1")
    regions = []
    offset = 0
    for i in range(256):
        length = 1 * MiB if i % 16 == 0 else 4 * KiB * (1 + (i * 37) % 64)  # 4 KiB to 1 MiB
        regions.append((offset, length, i))
        offset += length + (512 if i % 3 else 0)  # some requests start off a 4 KiB boundary
    assert offset <= 64 * MiB

    result = fault_script(r'''
h = connect(sys.argv[1])
regions = json.loads(sys.argv[2])
written = write_all(h, regions)
read = read_all(h, regions)
print(json.dumps({"written": sorted(set(written)),
                  "wrong": [offset for (o, data), (offset, length, seed) in zip(read, regions)
                            if o != "ok" or data != pattern(seed, length)]}))
''', server.uri(), json.dumps(regions), timeout=300)

    assert result == {"written": ["ok"], "wrong": []}
    assert_volume_holds(server.uri(), model_of(64 * MiB, regions), tmp_path)


@pytest.mark.parametrize(
    "option, value",
    [("--inject-error-rate", "1.5"), ("--inject-error-rate", "-0.1"), ("--inject-status", "0"),
     ("--inject-status", "lots"), ("--inject-delay", "-1"), ("--io-depth", "0"), ("--io-depth", "256")],
)
def test_fault_options_refuse_bad_values(cli, tmp_path, option, value):
    cli.run("volume", "create", "test_v1", "--size", "1M")
    socket = tmp_path / "refused.sock"

    result = subprocess.run(
        pfnbd_command("serve", "--volume", "test_v1", "--socket", str(socket), option, value),
        env=cli.env, capture_output=True, text=True, timeout=30,
    )

    assert_fails_with_one_line(result)
    assert not socket.exists()


# --- the Python API ---------------------------------------------------------------


def test_python_api_faults_with_a_seed_fail_the_same_writes_each_run(tmp_path):
    """`EmulatedClient(store, io_depth, Faults(...))`: with a seed, the same completions
    fail every run, so a client sending the same writes one at a time sees the same
    errors, and only the acknowledged ones land."""
    regions = [(i * 64 * KiB, 64 * KiB, i) for i in range(48)]
    script = LIBNBD_HELPERS + FAULT_HELPERS + r'''
h = connect(sys.argv[1])
print(json.dumps([write_all(h, [region])[0] for region in json.loads(sys.argv[2])]))
'''

    def one_run(directory: Path) -> tuple[list[str], bytes]:
        store = Store(directory)
        store.create("test_v1", VOLUME_SIZE)
        client = EmulatedClient(store, io_depth=4, faults=Faults(error_rate=0.5, status=-errno.EIO, seed=42))
        socket = directory / "nbd.sock"

        async def session() -> str:
            async with serve_in_process(client, ["test_v1"], client.store.describe, socket):
                with trio.fail_after(STEP_TIMEOUT):
                    done = await trio.run_process(
                        [SYSTEM_PYTHON, "-c", script, f"nbd+unix:///test_v1?socket={socket}",
                         json.dumps(regions)], capture_stdout=True, capture_stderr=True, check=False)
                assert done.returncode == 0, done.stderr.decode()
                return done.stdout.decode()

        outcomes = json.loads(trio.run(session))
        return outcomes, store.image_path("test_v1").read_bytes()

    first, first_bytes = one_run(tmp_path / "first")
    second, second_bytes = one_run(tmp_path / "second")

    assert set(first) == {"ok", "EIO"}, first
    assert second == first
    acknowledged = [region for region, outcome in zip(regions, first) if outcome == "ok"]
    assert first_bytes == second_bytes == model_of(VOLUME_SIZE, acknowledged)
