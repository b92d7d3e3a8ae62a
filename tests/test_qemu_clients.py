"""QEMU's tools (qemu-io, qemu-img) driving `pfnbd serve` on a Unix socket as a user would.

Every test reads back what it wrote and compares bytes: qemu-io's own pattern checks for
the ranges it touched, and a whole-volume dump (`qemu-img dd`, plain reads that never
consult block status) against a model of what the volume must hold. qemu-io runs with
its `nbd_send_request` trace on, so tests also check which NBD commands reached the
server: QEMU silently emulates a missing feature (zeroes written as data, FUA as a
flush), and a test that only looked at the data would not notice.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import attrs
import pytest

from conftest import Server, require, run

KiB = 1 << 10
MiB = 1 << 20
VOLUME_SIZE = 64 * MiB  # the size of the `server` fixture's volume test_v1
STEP_TIMEOUT = 60  # seconds for any one client command

NBD_CMD_FLAG_FUA = 0x1
NBD_CMD_FLAG_NO_HOLE = 0x2

# How qemu-io reports a failed command ("write failed: ...", "Pattern verification failed
# at offset ..."); versions differ in whether the exit code says so too.
QEMU_IO_FAILURE = re.compile(r"failed|error", re.IGNORECASE)
NBD_REQUEST_TRACE = re.compile(
    r"^nbd_send_request .*\.from = (?P<offset>\d+), \.len = (?P<length>\d+), "
    r".*\.flags = (?P<flags>0x[0-9a-f]+), \.type = \d+ \((?P<command>[a-z ]+)\)",
    re.MULTILINE,
)


@attrs.frozen
class NbdRequest:
    """One request QEMU's NBD client put on the wire, as its trace reports it."""

    command: str  # as QEMU names it: "read", "write", "write zeroes", "trim", "flush", ...
    offset: int
    length: int
    flags: int = 0


def qemu_io(uri: str, *commands: str) -> list[NbdRequest]:
    """Runs qemu-io commands over one connection; fails unless every one succeeded.

    `--cache=writeback` keeps plain writes, FUA writes and flushes apart on the wire
    (qemu-io's default, writethrough, sets FUA on every write). Returns what was sent.
    """
    args = ["qemu-io", "-f", "raw", "--cache=writeback", "--trace", "nbd_send_request"]
    for command in commands:
        args += ["-c", command]
    result = run(*args, uri, timeout=STEP_TIMEOUT, check=False)
    output = result.stdout + NBD_REQUEST_TRACE.sub("", result.stderr)
    if result.returncode != 0 or QEMU_IO_FAILURE.search(output):
        raise AssertionError(f"qemu-io {list(commands)} exited {result.returncode}:\n{output}")
    return requests_traced(result.stderr)


def requests_traced(output: str) -> list[NbdRequest]:
    return [
        NbdRequest(m["command"], int(m["offset"]), int(m["length"]), int(m["flags"], 16))
        for m in NBD_REQUEST_TRACE.finditer(output)
    ]


def qemu_io_refused(uri: str, command: str) -> str:
    """Runs one qemu-io command that must fail, and returns what qemu-io said."""
    result = run("qemu-io", "-f", "raw", "-c", command, uri, timeout=STEP_TIMEOUT, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "failed" in output, (
        f"qemu-io {command!r} should have failed, exited {result.returncode}:\n{output}"
    )
    return output


def write_pattern(
    expected: bytearray, byte: int, offset: int, length: int, command: str = "write"
) -> str:
    """A qemu-io command (`write`, `write -f`, `aio_write`) filling a range with `byte`,
    applied to the model as well."""
    expected[offset:offset + length] = bytes([byte]) * length
    return f"{command} -P {byte:#x} {offset} {length}"


def zero_range(expected: bytearray, offset: int, length: int, command: str) -> str:
    """A qemu-io command that zeroes a range (`write -z`, `discard`), applied to the model."""
    expected[offset:offset + length] = bytes(length)
    return f"{command} {offset} {length}"


def read_pattern(byte: int, offset: int, length: int) -> str:
    return f"read -P {byte:#x} {offset} {length}"


def assert_same_bytes(actual: bytes, expected: bytes, what: str) -> None:
    """Equality of two large buffers, reporting the first difference (pytest's own diff
    of 64 MiB values would take minutes)."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} bytes, expected {len(expected)}"
    if actual != expected:
        chunk = next(c for c in range(0, len(actual), 64 * KiB)
                     if actual[c:c + 64 * KiB] != expected[c:c + 64 * KiB])
        first = next(i for i in range(chunk, len(actual)) if actual[i] != expected[i])
        raise AssertionError(
            f"{what}: first difference at byte {first}: "
            f"{actual[first:first + 16].hex()} instead of {expected[first:first + 16].hex()}"
        )


def dump_volume(uri: str, path: Path) -> bytes:
    """The volume's bytes, read in full with plain NBD reads (`qemu-img dd` ignores
    block status, so a wrong hole/zero answer cannot mask the data)."""
    path.unlink(missing_ok=True)
    run("qemu-img", "dd", "-f", "raw", "-O", "raw", f"if={uri}", f"of={path}", "bs=4M",
        timeout=STEP_TIMEOUT)
    return path.read_bytes()


def assert_volume_holds(uri: str, expected: bytes, tmp_path: Path) -> None:
    assert_same_bytes(dump_volume(uri, tmp_path / "dump.raw"), expected, f"volume {uri}")


@attrs.frozen
class Extent:
    """One entry of `qemu-img map --output=json`."""

    start: int
    length: int
    data: bool
    zero: bool


def block_map(uri: str) -> list[Extent]:
    result = run("qemu-img", "map", "--output=json", "-f", "raw", uri, timeout=STEP_TIMEOUT)
    return [Extent(e["start"], e["length"], e["data"], e["zero"])
            for e in json.loads(result.stdout)]


def data_and_holes(size: int, data_ranges: list[tuple[int, int]]) -> list[Extent]:
    """The map of a volume whose only written ranges are `data_ranges` (sorted, apart)."""
    extents, position = [], 0
    for offset, length in data_ranges:
        if offset > position:
            extents.append(Extent(position, offset - position, data=False, zero=True))
        extents.append(Extent(offset, length, data=True, zero=False))
        position = offset + length
    if position < size:
        extents.append(Extent(position, size - position, data=False, zero=True))
    return extents


def extents_over(extents: list[Extent], offset: int, length: int) -> list[Extent]:
    return [e for e in extents if e.start < offset + length and offset < e.start + e.length]


def test_pattern_writes_read_back(server: Server, tmp_path: Path):
    require("qemu-io", "qemu-img")
    expected = bytearray(VOLUME_SIZE)
    uri = server.uri()
    writes = [
        (0xab, 0, 64 * KiB),
        (0x33, 8 * MiB, 40 * MiB),  # larger than the 32 MiB maximum: QEMU splits it
        (0xcd, 3 * MiB + 512, MiB + 512),  # sector-aligned, not 4 KiB-aligned
        (0x44, 20 * MiB + 4 * KiB, 8 * KiB),  # overwrites part of the large write
        (0xef, VOLUME_SIZE - 4 * KiB, 4 * KiB),  # the last block
    ]
    sent = qemu_io(uri, *(write_pattern(expected, *w) for w in writes))
    assert NbdRequest("write", 8 * MiB, 32 * MiB) in sent, sent

    qemu_io(
        uri,
        read_pattern(0xab, 0, 64 * KiB),
        read_pattern(0x00, 64 * KiB, 3 * MiB + 512 - 64 * KiB),
        read_pattern(0xcd, 3 * MiB + 512, MiB + 512),
        read_pattern(0x33, 8 * MiB, 12 * MiB + 4 * KiB),
        read_pattern(0x44, 20 * MiB + 4 * KiB, 8 * KiB),
        read_pattern(0x33, 20 * MiB + 12 * KiB, 28 * MiB - 12 * KiB),
        read_pattern(0x00, 48 * MiB, VOLUME_SIZE - 48 * MiB - 4 * KiB),
        read_pattern(0xef, VOLUME_SIZE - 4 * KiB, 4 * KiB),
    )
    assert_volume_holds(uri, expected, tmp_path)


def test_pattern_mismatch_fails_the_test(server: Server):
    """The read checks above are only worth something if a wrong byte makes them fail."""
    require("qemu-io")
    uri = server.uri()
    qemu_io(uri, "write -P 0xab 0 4k")
    with pytest.raises(AssertionError, match="Pattern verification failed"):
        qemu_io(uri, "read -P 0xcd 0 4k")
    with pytest.raises(AssertionError, match="Pattern verification failed"):
        qemu_io(uri, "read -P 0xab 4k 4k")  # never written: zeroes
    with pytest.raises(AssertionError, match="Pattern verification failed"):
        qemu_io(uri, "aio_read -P 0xcd 0 4k", "aio_flush")  # qemu-io exits 0 on this one
    with pytest.raises(AssertionError, match="first difference at byte 4096"):
        assert_same_bytes(bytes(8192), bytes(4096) + b"\1" + bytes(4095), "meta-check")


@pytest.mark.parametrize(
    ("options", "flags"), [("-z", NBD_CMD_FLAG_NO_HOLE), ("-z -u", 0)], ids=["zero", "zero-unmap"]
)
def test_write_zeroes(server: Server, tmp_path: Path, options: str, flags: int):
    require("qemu-io", "qemu-img")
    expected = bytearray(VOLUME_SIZE)
    uri = server.uri()
    qemu_io(uri, write_pattern(expected, 0xab, 0, 4 * MiB))
    sent = qemu_io(uri, zero_range(expected, MiB, MiB, f"write {options}"))
    assert NbdRequest("write zeroes", MiB, MiB, flags) in sent, sent

    qemu_io(
        uri,
        read_pattern(0xab, 0, MiB),
        read_pattern(0x00, MiB, MiB),
        read_pattern(0xab, 2 * MiB, 2 * MiB),
    )
    extents = block_map(uri)
    if flags & NBD_CMD_FLAG_NO_HOLE:
        # the spec: the area must stay provisioned, so no hole; the ZERO bit is optional
        assert all(e.data for e in extents_over(extents, 0, 4 * MiB)), extents
    else:
        # pfnbd keeps zeroed space sparse: a hole that reads as zeroes
        assert extents == data_and_holes(VOLUME_SIZE, [(0, MiB), (2 * MiB, 2 * MiB)])
    assert_volume_holds(uri, expected, tmp_path)


def test_discard_leaves_a_zero_hole(server: Server, tmp_path: Path):
    require("qemu-io", "qemu-img")
    expected = bytearray(VOLUME_SIZE)
    uri = server.uri()
    qemu_io(uri, write_pattern(expected, 0xab, 0, 4 * MiB))
    sent = qemu_io(uri, zero_range(expected, MiB, MiB, "discard"))
    assert NbdRequest("trim", MiB, MiB) in sent, sent

    qemu_io(
        uri,
        read_pattern(0xab, 0, MiB),
        read_pattern(0x00, MiB, MiB),
        read_pattern(0xab, 2 * MiB, 2 * MiB),
    )
    assert block_map(uri) == data_and_holes(VOLUME_SIZE, [(0, MiB), (2 * MiB, 2 * MiB)])
    assert_volume_holds(uri, expected, tmp_path)


@pytest.mark.parametrize("command", ["discard", "write -z -u"], ids=["discard", "zero-unmap"])
@pytest.mark.parametrize(
    ("size", "size_in_bytes"), [("8M", 8 * MiB), ("5243392", 5243392)], ids=["8M", "5M+512"]
)
def test_zeroing_a_whole_volume_leaves_one_hole(
    start_server, tmp_path: Path, command: str, size: str, size_in_bytes: int
):
    """What `blkdiscard` or a zeroing `qemu-img convert` does, also on a volume whose
    size is a multiple of 512 but not of 4096."""
    require("qemu-io", "qemu-img")
    uri = start_server({"whole": size}).uri("whole")
    expected = bytearray(size_in_bytes)
    qemu_io(uri, write_pattern(expected, 0xab, 0, size_in_bytes))
    qemu_io(uri, zero_range(expected, 0, size_in_bytes, command))
    assert block_map(uri) == [Extent(0, size_in_bytes, data=False, zero=True)]
    assert_volume_holds(uri, expected, tmp_path)


def test_fua_write_and_flush(server: Server, tmp_path: Path):
    require("qemu-io", "qemu-img")
    expected = bytearray(VOLUME_SIZE)
    uri = server.uri()
    sent = qemu_io(
        uri,
        write_pattern(expected, 0x66, 2 * MiB, 64 * KiB, "write -f"),
        "flush",
        write_pattern(expected, 0x67, 3 * MiB, 64 * KiB),
    )
    assert sent[:3] == [
        NbdRequest("write", 2 * MiB, 64 * KiB, NBD_CMD_FLAG_FUA),
        NbdRequest("flush", 0, 0),
        NbdRequest("write", 3 * MiB, 64 * KiB),
    ], sent
    qemu_io(uri, read_pattern(0x66, 2 * MiB, 64 * KiB), read_pattern(0x67, 3 * MiB, 64 * KiB))
    assert_volume_holds(uri, expected, tmp_path)


def test_writev_readv(server: Server, tmp_path: Path):
    require("qemu-io", "qemu-img")
    expected = bytearray(VOLUME_SIZE)
    uri = server.uri()
    # one 64 KiB request from buffers of 4 KiB, 512 B and 60 KiB - 512 B
    expected[MiB:MiB + 64 * KiB] = b"\x42" * (64 * KiB)
    sent = qemu_io(uri, f"writev -P 0x42 {MiB} 4k 512 {60 * KiB - 512}")
    assert NbdRequest("write", MiB, 64 * KiB) in sent, sent
    qemu_io(
        uri,
        f"readv -P 0x42 {MiB} 1k 31k 32k",
        f"readv -P 0 {MiB - 4 * KiB} 2k 2k",
        f"readv -P 0 {MiB + 64 * KiB} 512 3584",
    )
    assert_volume_holds(uri, expected, tmp_path)


def test_aio_writes_then_aio_flush(server: Server, tmp_path: Path):
    """Sixteen writes in flight at once (QEMU's limit), then sixteen reads."""
    require("qemu-io", "qemu-img")
    expected = bytearray(VOLUME_SIZE)
    uri = server.uri()
    ranges = [(0x10 + i, i * 3 * MiB + i * 512, MiB) for i in range(16)]
    sent = qemu_io(
        uri,
        *(write_pattern(expected, *r, "aio_write") for r in ranges),
        "aio_flush",
        *(f"aio_read -P {byte:#x} {offset} {length}" for byte, offset, length in ranges),
        "aio_flush",
    )
    assert all(NbdRequest("write", offset, length) in sent for _, offset, length in ranges), sent
    assert_volume_holds(uri, expected, tmp_path)


def test_unaligned_one_byte_writes_and_reads(server: Server, tmp_path: Path):
    """QEMU turns these into read-modify-write of 512-byte blocks (the advertised
    minimum); the neighbours of every byte written must keep their values."""
    require("qemu-io", "qemu-img")
    expected = bytearray(VOLUME_SIZE)
    uri = server.uri()
    qemu_io(uri, write_pattern(expected, 0x11, 0, 8 * KiB))
    qemu_io(uri, write_pattern(expected, 0x5a, 1, 1))
    qemu_io(uri, read_pattern(0x11, 0, 1), read_pattern(0x5a, 1, 1),
            read_pattern(0x11, 2, 8 * KiB - 2))
    qemu_io(
        uri,
        write_pattern(expected, 0x77, 511, 2),  # across a sector boundary
        write_pattern(expected, 0x78, 4095, 3),  # across a 4 KiB boundary
        write_pattern(expected, 0x79, MiB + 777, 1),  # in never-written space
        write_pattern(expected, 0x7a, VOLUME_SIZE - 1, 1),  # the very last byte
    )
    qemu_io(
        uri,
        read_pattern(0x11, 510, 1),
        read_pattern(0x77, 511, 2),
        read_pattern(0x11, 513, 1),
        read_pattern(0x11, 4094, 1),
        read_pattern(0x78, 4095, 3),
        read_pattern(0x11, 4098, 1),
        read_pattern(0x00, MiB, 777),
        read_pattern(0x79, MiB + 777, 1),
        read_pattern(0x00, MiB + 778, 4 * KiB),
        read_pattern(0x00, VOLUME_SIZE - 4 * KiB, 4 * KiB - 1),
        read_pattern(0x7a, VOLUME_SIZE - 1, 1),
    )
    assert_volume_holds(uri, expected, tmp_path)


def test_io_crossing_the_end_fails_and_the_server_keeps_serving(server: Server):
    """QEMU refuses these itself, from the size the server advertised, so this proves
    the size is exact and that the refusals leave the volume alone; the server's own
    answers to out-of-range requests need a client that sends them (libnbd tests)."""
    require("qemu-io")
    uri = server.uri()
    last_block = VOLUME_SIZE - 4 * KiB
    for command in (
        f"write -P 0xee {last_block} 8k",
        f"read {last_block} 8k",
        f"write -P 0xee {VOLUME_SIZE} 512",
        f"write -z {last_block} 8k",
        f"read {VOLUME_SIZE} 1",
    ):
        qemu_io_refused(uri, command)
    qemu_io(
        uri,
        read_pattern(0x00, last_block, 4 * KiB),  # the refused writes changed nothing
        f"write -P 0x77 {last_block} 4k",
        read_pattern(0x77, last_block, 4 * KiB),
    )


def image_info(uri: str) -> dict:
    return json.loads(run("qemu-img", "info", "--output=json", uri, timeout=STEP_TIMEOUT).stdout)


@pytest.mark.parametrize(
    ("size", "size_in_bytes"),
    [("64M", 64 * MiB), ("1536", 1536), ("5243392", 5243392), ("1G", 1 << 30)],
)
def test_qemu_img_info(start_server, size: str, size_in_bytes: int):
    require("qemu-img")
    server = start_server({"info_v": size})
    for uri in (server.uri("info_v"), server.qemu_uri("info_v")):
        info = image_info(uri)
        assert (info["format"], info["virtual-size"]) == ("raw", size_in_bytes), info


def test_empty_export_name_is_the_first_volume(start_server):
    require("qemu-io", "qemu-img")
    server = start_server({"first": "4M", "second": "8M"})
    default_uris = [f"nbd+unix://?socket={server.socket}", f"nbd:unix:{server.socket}"]
    for uri in default_uris:
        info = image_info(uri)
        assert info["virtual-size"] == 4 * MiB, info
    qemu_io(default_uris[0], "write -P 0x61 0 4k")
    qemu_io(server.uri("first"), read_pattern(0x61, 0, 4 * KiB))
    qemu_io(server.uri("second"), read_pattern(0x00, 0, 4 * KiB))


# the features the CLI contract promises, as `qemu-nbd -L` names them
ADVERTISED_FLAGS = {"flush", "fua", "trim", "zeroes", "df", "multi", "cache", "fast-zero"}


def listed_field(details: str, key: str) -> str:
    """The value of `key` in one export's section of `qemu-nbd -L` output."""
    return re.search(rf"^  {key}: +(.*)$", details, re.MULTILINE)[1]


def test_qemu_nbd_lists_every_volume(start_server):
    """`qemu-nbd -L` asks for the export list, then NBD_OPT_INFO about each export."""
    require("qemu-nbd")
    server = start_server({"first": "4M", "second": "1536"})
    listing = run("qemu-nbd", "-L", "-k", str(server.socket), timeout=STEP_TIMEOUT).stdout
    assert "exports available: 2" in listing, listing
    exports = dict(re.findall(r"^ export: '([^']*)'\n((?:  .*\n?)*)", listing, re.MULTILINE))
    assert sorted(exports) == ["first", "second"], listing
    for name, size in [("first", 4 * MiB), ("second", 1536)]:
        details = exports[name]
        field = functools.partial(listed_field, details)
        assert field("description"), listing
        assert (int(field("size")), field("min block"), field("opt block"),
                field("max block")) == (size, "512", "4096", str(32 * MiB)), listing
        flags = set(field("flags").partition("(")[2].rstrip(" )").split())
        assert flags == ADVERTISED_FLAGS, listing
        contexts = details.partition("available meta contexts:")[2].split()[1:]
        assert contexts == ["base:allocation"], listing


def test_qemu_img_map_shows_data_and_holes(server: Server, tmp_path: Path):
    require("qemu-io", "qemu-img")
    uri = server.uri()
    assert block_map(uri) == [Extent(0, VOLUME_SIZE, data=False, zero=True)]

    expected = bytearray(VOLUME_SIZE)
    qemu_io(
        uri,
        write_pattern(expected, 0x11, 0, 64 * KiB),
        write_pattern(expected, 0x22, 5 * MiB, MiB),
        write_pattern(expected, 0x33, VOLUME_SIZE - 64 * KiB, 64 * KiB),
        zero_range(expected, 5 * MiB + 256 * KiB, 256 * KiB, "discard"),
    )
    assert block_map(uri) == data_and_holes(VOLUME_SIZE, [
        (0, 64 * KiB),
        (5 * MiB, 256 * KiB),
        (5 * MiB + 512 * KiB, 512 * KiB),
        (VOLUME_SIZE - 64 * KiB, 64 * KiB),
    ])
    assert_volume_holds(uri, expected, tmp_path)


def test_qemu_img_convert_out_trusts_a_truthful_map(server: Server, tmp_path: Path):
    """`qemu-img convert` copies only what block status calls data: if the server called
    written bytes a hole or zero, the copy would lose them."""
    require("qemu-io", "qemu-img")
    uri = server.uri()
    expected = bytearray(VOLUME_SIZE)
    qemu_io(
        uri,
        write_pattern(expected, 0x21, 70000, 1),
        write_pattern(expected, 0x22, 3 * MiB - 512, 1024),
        write_pattern(expected, 0x23, 9 * MiB, 3 * MiB),
        zero_range(expected, 10 * MiB, 4 * KiB, "write -z"),
        zero_range(expected, 11 * MiB, 64 * KiB, "discard"),
    )
    copy = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(copy), timeout=STEP_TIMEOUT)
    assert_same_bytes(copy.read_bytes(), expected, "qemu-img convert of the volume")


@pytest.mark.parametrize("parallel", [[], ["-W", "-m", "16"]], ids=["in-order", "out-of-order"])
def test_qemu_img_convert_qcow2_into_volume_and_compare(
    server: Server, tmp_path: Path, parallel: list[str]
):
    require("qemu-io", "qemu-img")
    uri = server.uri()
    source = tmp_path / "source.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(source), str(VOLUME_SIZE), timeout=STEP_TIMEOUT)
    qcow2_writes = [
        "write -P 0x11 0 64k",
        "write -P 0x22 1049088 3000",  # not sector-aligned at either end
        "write -P 0x33 7M 2M",
        "write -z 7232k 64k",  # a zero cluster inside data
        f"write -P 0x44 {VOLUME_SIZE - 4 * KiB} 4k",
    ]
    run("qemu-io", "-f", "qcow2", *(arg for w in qcow2_writes for arg in ("-c", w)), str(source),
        timeout=STEP_TIMEOUT)
    # data where the source has none, so convert must really zero the target there
    qemu_io(uri, "write -P 0x99 20M 1M", "write -P 0x98 7232k 4k")

    run("qemu-img", "convert", "-n", *parallel, "-f", "qcow2", "-O", "raw", str(source), uri,
        timeout=STEP_TIMEOUT)
    result = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(source), uri,
                 timeout=STEP_TIMEOUT)
    assert "Images are identical." in result.stdout, result.stdout
    source_bytes = tmp_path / "source.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(source), str(source_bytes),
        timeout=STEP_TIMEOUT)
    assert_volume_holds(uri, source_bytes.read_bytes(), tmp_path)

    changed = 7 * MiB + 12345
    qemu_io(uri, f"write -P 0xff {changed} 1")
    result = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(source), uri,
                 timeout=STEP_TIMEOUT, check=False)
    mismatch = re.search(r"Content mismatch at offset (\d+)!", result.stdout)
    assert result.returncode == 1 and mismatch, (result.returncode, result.stdout, result.stderr)
    assert changed - 512 < int(mismatch[1]) <= changed, mismatch[0]
