"""libnbd's tools (nbdinfo, nbdcopy, nbdsh), its Python binding and nbd-client, run
against `pfnbd serve` on a Unix socket exactly as a user would run them."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
from pathlib import Path

from conftest import SYSTEM_PYTHON, run, run_libnbd

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
VOLUME_SIZE = 64 * MiB  # what the `server` fixture exports as test_v1

DATA = 0  # base:allocation flags as nbdinfo --map prints them
HOLE_ZERO = 3

WRITABLE_EXPORT_FLAGS = {
    "is_read_only": False,
    "can_flush": True,
    "can_fua": True,
    "can_trim": True,
    "can_zero": True,
    "can_fast_zero": True,
    "can_multi_conn": True,
    "can_cache": True,
    "can_df": True,
}


def nbdinfo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("nbdinfo", *args, timeout=60, check=check)


def nbdinfo_json(*args: str):
    return json.loads(nbdinfo("--json", *args).stdout)


def allocation_map(uri: str) -> list[tuple[int, int, int]]:
    """(offset, length, type) for the whole export; nbdinfo merges equal neighbours."""
    return [(e["offset"], e["length"], e["type"]) for e in nbdinfo_json("--map", uri)]


def nbdsh(uri: str, *commands: str, options: tuple[str, ...] = ()) -> str:
    """Runs `nbdsh -u URI -c CMD...`; nbdsh runs `python3 -m nbd`, which only the
    system Python can import, so /usr/bin leads PATH."""
    args = ["nbdsh", *options, "-u", uri]
    for command in commands:
        args += ["-c", command]
    env = {**os.environ, "PATH": f"{Path(SYSTEM_PYTHON).parent}:{os.environ['PATH']}"}
    return run(*args, timeout=60, env=env).stdout


# Shared by every libnbd script below: run under Debian's python3, assertions there
# fail the script, and so the test, with a traceback naming the broken check.
LIBNBD_HELPERS = r'''
import errno, json, random, sys
import nbd

def connect(uri, strict=True):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    if not strict:  # let out-of-range and unaligned requests reach the server
        h.set_strict_mode(0)
    return h

def pattern(seed, length):
    return random.Random(seed).randbytes(length)

def expect_errno(name, command, *args):
    shown = [f"<{len(a)} bytes>" if isinstance(a, bytes) else a for a in args]
    try:
        command(*args)
    except nbd.Error as error:
        assert error.errnum == getattr(errno, name), (
            f"{command.__name__}{shown}: got {error.errno} ({error.string}), expected {name}")
    else:
        raise AssertionError(f"{command.__name__}{shown} succeeded, expected {name}")

def extents(h, length, offset, flags=0):
    """[[length, flags]] from one base:allocation BLOCK_STATUS reply."""
    found = []
    def on_extents(context, start, entries, error):
        assert context == nbd.CONTEXT_BASE_ALLOCATION, context
        assert start == offset, (start, offset)
        assert entries and all(entries[0::2]), f"empty or zero-length extents: {entries}"
        found.extend([size, state] for size, state in zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(length, offset, on_extents, flags)
    return found

def allocation(h, length, offset):
    """[[length, flags]] covering exactly offset..offset+length, as nbdinfo --map does:
    asks again where a reply stopped short, cuts an extent running past the end and
    merges neighbours with equal flags."""
    merged, at, end = [], offset, offset + length
    while at < end:
        for size, state in extents(h, end - at, at):
            size = min(size, end - at)
            if merged and merged[-1][1] == state:
                merged[-1][0] += size
            else:
                merged.append([size, state])
            at += size
            if at == end:
                break
    return merged

def wait_for_all(h, cookies):
    """Polls until every cookie has completed; raises the first failure."""
    pending = set(cookies)
    while pending:
        h.poll(-1)
        pending = {c for c in pending if not h.aio_command_completed(c)}
'''


def libnbd(script: str, *args: str, timeout: float = 120):
    """Runs LIBNBD_HELPERS + script; the script prints one JSON value, returned here."""
    return json.loads(run_libnbd(LIBNBD_HELPERS + script, *args, timeout=timeout))


# --- nbdinfo -----------------------------------------------------------------------


def test_nbdinfo_list_shows_every_export_with_description(start_server):
    sizes = {"test_v1": 64 * MiB, "scratch": 1 * MiB, "archive": 8 * GiB}
    server = start_server({"test_v1": "64M", "scratch": "1M", "archive": "8G"})

    listing = nbdinfo_json("--list", server.uri(""))
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert len(listing["exports"]) == len(sizes), listing
    assert {name: e["export-size"] for name, e in exports.items()} == sizes
    for name, export in exports.items():
        assert export.get("description", "").strip(), f"export {name} has no description: {export}"

    text = nbdinfo("--list", server.uri("")).stdout
    assert sorted(line for line in text.splitlines() if line.startswith("export=")) == sorted(
        f'export="{name}":' for name in sizes
    ), text
    assert text.count("\tdescription: ") == len(sizes), text


def test_nbdinfo_json_reports_size_block_sizes_and_features(server):
    info = nbdinfo_json(server.uri())

    assert (info["protocol"], info["TLS"], info["structured"]) == ("newstyle-fixed", False, True)
    (export,) = info["exports"]
    assert export["export-name"] == "test_v1"
    assert export["export-size"] == VOLUME_SIZE
    assert export["contexts"] == ["base:allocation"]
    assert (
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"],
    ) == (512, 4096, 32 * MiB)
    assert {flag: export.get(flag) for flag in WRITABLE_EXPORT_FLAGS} == WRITABLE_EXPORT_FLAGS


def test_nbdinfo_json_on_read_only_server(start_server):
    server = start_server(None, "--read-only")

    (export,) = nbdinfo_json(server.uri())["exports"]

    assert export["is_read_only"] is True
    assert export["export-size"] == VOLUME_SIZE
    assert nbdinfo("--is", "read-only", server.uri(), check=False).returncode == 0
    assert nbdinfo("--can", "write", server.uri(), check=False).returncode == 2


def test_nbdinfo_can_and_is_answer_each_capability(server):
    # nbdinfo --can/--is exit 0 for true, 2 for false, anything else is an error.
    capabilities = ["connect", "read", "write", "structured-reply", "cache", "df", "fast-zero",
                    "flush", "fua", "multi-conn", "trim", "zero"]
    answers = {cap: nbdinfo("--can", cap, server.uri(), check=False).returncode
               for cap in capabilities}
    answers["is read-only"] = nbdinfo("--is", "read-only", server.uri(), check=False).returncode
    answers["is tls"] = nbdinfo("--is", "tls", server.uri(), check=False).returncode

    assert answers == {**{cap: 0 for cap in capabilities}, "is read-only": 2, "is tls": 2}


def test_empty_export_name_is_the_first_volume_and_unknown_names_fail(start_server):
    server = start_server({"first": "2M", "second": "1M"})

    assert nbdinfo("--size", server.uri("")).stdout.strip() == str(2 * MiB)
    assert nbdinfo("--size", server.uri("second")).stdout.strip() == str(1 * MiB)
    unknown = nbdinfo("--size", server.uri("nope"), check=False)
    assert unknown.returncode == 1, unknown
    assert "nope" in unknown.stderr, unknown.stderr
    # The refused client did not take the server down.
    assert nbdinfo("--size", server.uri("first")).stdout.strip() == str(2 * MiB)
    # Within one handshake: GO to an unknown name fails, and the same connection goes on.
    assert nbdsh(
        server.uri("nope"),
        "try:\n    h.opt_go()\nexcept nbd.Error as error:\n    print('refused', error.errno)",
        "h.set_export_name('second'); h.opt_go(); print(h.get_size())",
        options=("--opt-mode",),
    ).split() == ["refused", "ENOENT", str(1 * MiB)]


def test_nbdinfo_map_shows_data_and_holes_after_writes_trim_and_zero(server):
    uri = server.uri()
    assert allocation_map(uri) == [(0, VOLUME_SIZE, HOLE_ZERO)]

    nbdsh(
        uri,
        "h.pwrite(b'\\x11' * (256 * 1024), 1 << 20)",
        "h.pwrite(b'\\x22' * (64 * 1024), 8 << 20)",
        f"h.pwrite(b'\\x33' * 4096, {VOLUME_SIZE - 4096})",  # the export's last block
        "h.flush()",
    )
    assert allocation_map(uri) == [
        (0, 1 * MiB, HOLE_ZERO),
        (1 * MiB, 256 * KiB, DATA),
        (1 * MiB + 256 * KiB, 7 * MiB - 256 * KiB, HOLE_ZERO),
        (8 * MiB, 64 * KiB, DATA),
        (8 * MiB + 64 * KiB, VOLUME_SIZE - 8 * MiB - 64 * KiB - 4096, HOLE_ZERO),
        (VOLUME_SIZE - 4096, 4096, DATA),
    ]

    nbdsh(
        uri,
        "h.trim(64 * 1024, (1 << 20) + 64 * 1024)",  # the middle of the first data run
        "h.zero(64 * 1024, 8 << 20)",  # all of the second one
        "h.flush()",
    )
    assert allocation_map(uri) == [
        (0, 1 * MiB, HOLE_ZERO),
        (1 * MiB, 64 * KiB, DATA),
        (1 * MiB + 64 * KiB, 64 * KiB, HOLE_ZERO),
        (1 * MiB + 128 * KiB, 128 * KiB, DATA),
        (1 * MiB + 256 * KiB, VOLUME_SIZE - 1 * MiB - 256 * KiB - 4096, HOLE_ZERO),
        (VOLUME_SIZE - 4096, 4096, DATA),
    ]
    # The trimmed and zeroed ranges read back as zeros, the rest as written.
    assert nbdsh(
        uri,
        "print(h.pread(64 * 1024, (1 << 20) + 64 * 1024).count(0),"
        " h.pread(64 * 1024, 8 << 20).count(0),"
        " h.pread(128 * 1024, (1 << 20) + 128 * 1024) == b'\\x11' * (128 * 1024))",
    ).split() == [str(64 * KiB), str(64 * KiB), "True"]


def test_nbdinfo_map_on_a_huge_and_a_tiny_volume(start_server):
    """Extents of an 8 GiB volume (lengths near and past 2**32) and of a 1536-byte one
    (smaller than a filesystem block) add up to exactly the volume."""
    server = start_server({"huge": "8G", "tiny": "1536"})
    huge, tiny = server.uri("huge"), server.uri("tiny")
    assert allocation_map(huge) == [(0, 8 * GiB, HOLE_ZERO)]
    assert allocation_map(tiny) == [(0, 1536, HOLE_ZERO)]

    nbdsh(huge, f"h.pwrite(b'\\x44' * 65536, {6 * GiB})", f"h.pwrite(b'\\x45' * 4096, {8 * GiB - 4096})")
    nbdsh(tiny, "h.pwrite(b'\\x46' * 1536, 0)")

    assert allocation_map(huge) == [(0, 6 * GiB, HOLE_ZERO), (6 * GiB, 64 * KiB, DATA),
                                    (6 * GiB + 64 * KiB, 2 * GiB - 64 * KiB - 4096, HOLE_ZERO),
                                    (8 * GiB - 4096, 4096, DATA)]
    assert allocation_map(tiny) == [(0, 1536, DATA)]
    assert nbdsh(tiny, "print(h.pread(512, 1024) == b'\\x46' * 512)") == "True\n"


# --- nbdcopy and nbdsh -------------------------------------------------------------


def write_random_image(path: Path, size: int, seed: int, zero_ranges: list[tuple[int, int]]) -> None:
    """Random bytes with some all-zero ranges, which nbdcopy sends as zero requests."""
    image = bytearray(random.Random(seed).randbytes(size))
    for offset, length in zero_ranges:
        image[offset:offset + length] = bytes(length)
    path.write_bytes(image)


def assert_same_bytes(copy: Path, original: Path) -> None:
    copied, expected = copy.read_bytes(), original.read_bytes()
    if copied != expected:
        first = next((i for i, (a, b) in enumerate(zip(copied, expected)) if a != b),
                     min(len(copied), len(expected)))
        raise AssertionError(f"{copy} ({len(copied)} bytes, sha256 "
                             f"{hashlib.sha256(copied).hexdigest()[:12]}) differs from {original} "
                             f"({len(expected)} bytes) first at offset {first}")


def test_nbdcopy_in_out_and_across_exports_is_byte_identical(start_server, tmp_path):
    size = 16 * MiB
    server = start_server({"copy_a": "16M", "copy_b": "16M"})
    first = tmp_path / "first.img"
    second = tmp_path / "second.img"
    write_random_image(first, size, seed=1, zero_ranges=[])
    # Zero runs in the second image must overwrite the first image's data.
    write_random_image(second, size, seed=2, zero_ranges=[(0, 1 * MiB), (5 * MiB + 512, 3 * MiB),
                                                          (size - 2 * MiB, 2 * MiB)])

    for image, result in ((first, tmp_path / "first.out"), (second, tmp_path / "second.out")):
        run("nbdcopy", "--connections=4", "--requests=64", str(image), server.uri("copy_a"))
        run("nbdcopy", server.uri("copy_a"), str(result))
        assert_same_bytes(result, image)

    run("nbdcopy", "--flush", server.uri("copy_a"), server.uri("copy_b"))
    run("nbdcopy", server.uri("copy_b"), str(tmp_path / "across.out"))
    assert_same_bytes(tmp_path / "across.out", second)


def test_nbdsh_one_liners(server):
    uri = server.uri()

    assert nbdsh(uri, "print(h.get_size())") == f"{VOLUME_SIZE}\n"
    assert nbdsh(
        uri,
        "print(h.get_export_name(), h.is_read_only(), h.can_multi_conn(),"
        " h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),"
        " h.get_block_size(nbd.SIZE_MAXIMUM))",
    ).split() == ["test_v1", "False", "True", "512", "4096", str(32 * MiB)]

    nbdsh(uri, "h.pwrite(b'pfnbd!!!' * 1024, 12288, nbd.CMD_FLAG_FUA)")
    assert nbdsh(uri, "print(h.pread(512, 12288 + 7680)[-8:].decode())") == "pfnbd!!!\n"
    # One extent each (REQ_ONE): the written 8 KiB, then the hole after it.
    assert nbdsh(
        uri,
        "show = lambda ctx, offset, entries, err: print(ctx, offset, *entries)",
        "h.block_status(65536, 12288, show, nbd.CMD_FLAG_REQ_ONE)",
        "h.block_status(4096, 20480, show, nbd.CMD_FLAG_REQ_ONE)",
        options=("--base-allocation",),
    ).split() == ["base:allocation", "12288", "8192", "0", "base:allocation", "20480", "4096", "3"]


# --- the libnbd Python binding -----------------------------------------------------


def test_libnbd_256_pipelined_requests(server):
    result = libnbd(r'''
h = connect(sys.argv[1])
# 256 writes of 4 KiB .. 192 KiB at distinct offsets: some cross the 128 KiB submit size.
regions = []
offset = 0
for i in range(256):
    length = 4096 * (1 + i % 48)
    regions.append((offset, length, pattern(i, length)))
    offset += length + 8192
assert offset <= h.get_size(), offset

writes = [h.aio_pwrite(nbd.Buffer.from_bytearray(data), start) for start, _, data in regions]
writes_in_flight = h.aio_in_flight()
wait_for_all(h, writes)

buffers = [nbd.Buffer(length) for _, length, _ in regions]
reads = [h.aio_pread(buf, start) for buf, (start, _, _) in zip(buffers, regions)]
reads_in_flight = h.aio_in_flight()
wait_for_all(h, reads)

bad = [start for buf, (start, _, data) in zip(buffers, regions) if bytes(buf.to_bytearray()) != data]
# The gaps between regions were never written.
gap_zero = all(h.pread(8192, start + length) == bytes(8192) for start, length, _ in regions[:32])
print(json.dumps({"writes_in_flight": writes_in_flight, "reads_in_flight": reads_in_flight,
                  "bad_reads": bad, "gaps_zero": gap_zero}))
''', server.uri())

    assert result == {"writes_in_flight": 256, "reads_in_flight": 256, "bad_reads": [],
                      "gaps_zero": True}


def test_libnbd_mixed_pipeline_routes_every_reply(server):
    """Reads, writes, zeroes, trims, caches and flushes in flight together, each on its
    own region: every reply reaches its own request and leaves the right data."""
    result = libnbd(r'''
h = connect(sys.argv[1])
region = 64 * 1024
kinds = ["write", "read", "zero", "trim", "cache", "flush", "write_fua", "read_df"]
# Regions that reads, zeroes and trims act on start out full of known data.
for i in range(256):
    h.pwrite(pattern(i, region), i * region)

cookies, buffers = [], {}
for i in range(256):
    kind, offset = kinds[i % len(kinds)], i * region
    if kind in ("write", "write_fua"):
        flags = nbd.CMD_FLAG_FUA if kind == "write_fua" else 0
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(pattern(1000 + i, region)), offset, flags=flags))
    elif kind == "read":
        buffers[i] = nbd.Buffer(region)
        cookies.append(h.aio_pread(buffers[i], offset))
    elif kind == "read_df":
        buffers[i] = nbd.Buffer(region)
        cookies.append(h.aio_pread_structured(buffers[i], offset, lambda *chunk: 0, flags=nbd.CMD_FLAG_DF))
    elif kind == "zero":
        cookies.append(h.aio_zero(region, offset))
    elif kind == "trim":
        cookies.append(h.aio_trim(region, offset))
    elif kind == "cache":
        cookies.append(h.aio_cache(region, offset))
    else:
        cookies.append(h.aio_flush())
in_flight = h.aio_in_flight()
wait_for_all(h, cookies)

wrong = []
for i in range(256):
    kind, offset = kinds[i % len(kinds)], i * region
    now = h.pread(region, offset)
    if kind in ("write", "write_fua"):
        expected = pattern(1000 + i, region)
    elif kind in ("zero", "trim"):
        expected = bytes(region)
    else:
        expected = pattern(i, region)
    if i in buffers and bytes(buffers[i].to_bytearray()) != expected:
        wrong.append([i, kind, "reply"])
    if now != expected:
        wrong.append([i, kind, "data"])
print(json.dumps({"in_flight": in_flight, "wrong": wrong}))
''', server.uri())

    assert result == {"in_flight": 256, "wrong": []}


def test_libnbd_structured_read_chunks_cover_the_request(server):
    result = libnbd(r'''
h = connect(sys.argv[1])
assert h.get_structured_replies_negotiated()
data = pattern(7, 64 * 1024)
h.pwrite(data, 1 << 20)
# 1 MiB - 64 KiB .. 1 MiB + 128 KiB: a hole, the data, another hole.
start, length = (1 << 20) - 64 * 1024, 192 * 1024
chunks = []
def on_chunk(subbuf, offset, status, error):
    chunks.append((offset, len(subbuf), status, bytes(subbuf)))
    return 0
whole = h.pread_structured(length, start, on_chunk)
expected = bytes(64 * 1024) + data + bytes(64 * 1024)

covered = bytearray(length)
problems = []
for offset, size, status, content in chunks:
    if status not in (nbd.READ_DATA, nbd.READ_HOLE):
        problems.append(f"chunk status {status} at {offset}")
    if offset < start or offset + size > start + length:
        problems.append(f"chunk {offset}+{size} outside the request")
        continue
    rel = offset - start
    if any(covered[rel:rel + size]):
        problems.append(f"chunk {offset}+{size} overlaps another")
    covered[rel:rel + size] = b"\1" * size
    if content != expected[rel:rel + size]:
        problems.append(f"chunk {offset}+{size} (status {status}) has the wrong bytes")
if not all(covered):
    problems.append("chunks leave part of the request uncovered")
# DF: the same range in a single content chunk.
chunks.clear()
df_read = h.pread_structured(length, start, on_chunk, nbd.CMD_FLAG_DF)
print(json.dumps({"problems": problems, "read_matches": bytes(whole) == expected,
                  "df_read_matches": bytes(df_read) == expected, "df_chunks": len(chunks)}))
''', server.uri())

    assert result == {"problems": [], "read_matches": True, "df_read_matches": True,
                      "df_chunks": 1}


def test_libnbd_block_status_base_allocation(server):
    result = libnbd(r'''
h = connect(sys.argv[1])
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
region, where = 128 * 1024, 4 << 20

steps = {"fresh": allocation(h, region, where)}
h.pwrite(pattern(3, region), where)
steps["written"] = allocation(h, region, where)
steps["around"] = allocation(h, 3 * region, where - region)
h.trim(region // 2, where)
steps["half_trimmed"] = allocation(h, region, where)
h.zero(region // 2, where + region // 2)
steps["zeroed"] = allocation(h, region, where)
h.pwrite(pattern(4, 4096), where + 8192)
steps["req_one"] = extents(h, region, where, nbd.CMD_FLAG_REQ_ONE)
steps["req_one_data"] = extents(h, region, where + 8192, nbd.CMD_FLAG_REQ_ONE)
print(json.dumps(steps))
''', server.uri())

    region = 128 * KiB
    assert result == {
        "fresh": [[region, HOLE_ZERO]],
        "written": [[region, DATA]],
        "around": [[region, HOLE_ZERO], [region, DATA], [region, HOLE_ZERO]],
        "half_trimmed": [[region // 2, HOLE_ZERO], [region // 2, DATA]],
        "zeroed": [[region, HOLE_ZERO]],
        "req_one": [[8192, HOLE_ZERO]],
        "req_one_data": [[4096, DATA]],
    }


def test_libnbd_only_base_allocation_is_selected(server):
    result = libnbd(r'''
h = nbd.NBD()
for context in ("qemu:dirty-bitmap:bitmap0", nbd.CONTEXT_BASE_ALLOCATION, "base:nonsense"):
    h.add_meta_context(context)
h.connect_uri(sys.argv[1])
print(json.dumps({c: h.can_meta_context(c) for c in (
    "qemu:dirty-bitmap:bitmap0", nbd.CONTEXT_BASE_ALLOCATION, "base:nonsense")}))
''', server.uri())

    assert result == {"qemu:dirty-bitmap:bitmap0": False, "base:allocation": True,
                      "base:nonsense": False}


def test_libnbd_second_connection_sees_flushed_and_fua_writes(server):
    result = libnbd(r'''
writer, reader = connect(sys.argv[1]), connect(sys.argv[1])
assert writer.can_multi_conn() and reader.can_multi_conn()
before = reader.pread(65536, 0)  # the reader has looked at the range before the writes
flushed, forced = pattern(11, 65536), pattern(12, 65536)
writer.pwrite(flushed, 0)
writer.flush()
after_flush = reader.pread(65536, 0) == flushed
writer.pwrite(forced, 0, nbd.CMD_FLAG_FUA)
after_fua = reader.pread(65536, 0) == forced
# And the other way round, with the flush sent on the reading connection.
reader.pwrite(flushed, 1 << 20)
writer.flush()
other_way = writer.pread(65536, 1 << 20) == flushed
print(json.dumps({"before_zero": before == bytes(65536), "after_flush": after_flush,
                  "after_fua": after_fua, "other_way": other_way}))
''', server.uri())

    assert result == {"before_zero": True, "after_flush": True, "after_fua": True, "other_way": True}


def test_libnbd_error_replies_leave_the_connection_usable(server):
    result = libnbd(r'''
h = connect(sys.argv[1], strict=False)
size = h.get_size()
known = pattern(5, 4096)
h.pwrite(known, 0)
still_usable = []
def check(name, command, *args):
    expect_errno(name, command, *args)
    still_usable.append(h.pread(4096, 0) == known)

check("EINVAL", h.pread, 512, size)             # wholly past the end
check("EINVAL", h.pread, 1024, size - 512)      # straddling the end
check("ENOSPC", h.pwrite, bytes(512), size)
check("ENOSPC", h.pwrite, bytes(1024), size - 512)
check("ENOSPC", h.zero, 512, size)
check("EINVAL", h.trim, 512, size)
check("EINVAL", h.block_status, 512, size, lambda *a: 0)
check("EINVAL", h.pread, 1, size)               # unaligned and out of range
# Nothing past the end went in, nothing inside moved.
tail_intact = h.pread(512, size - 512) == bytes(512)
print(json.dumps({"still_usable": still_usable, "tail_intact": tail_intact}))
''', server.uri())

    assert result == {"still_usable": [True] * 8, "tail_intact": True}


def test_libnbd_largest_requests_round_trip(server):
    """32 MiB requests, the advertised maximum: each is 256 submits of 128 KiB, more
    than the emulated library takes at once, so the bridge must retry -EAGAIN."""
    result = libnbd(r'''
h = connect(sys.argv[1], strict=False)
largest = h.get_block_size(nbd.SIZE_MAXIMUM)
first, second = pattern(21, largest), pattern(22, largest)
cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(first), 0),
           h.aio_pwrite(nbd.Buffer.from_bytearray(second), largest, flags=nbd.CMD_FLAG_FUA)]
wait_for_all(h, cookies)
buffers = [nbd.Buffer(largest), nbd.Buffer(largest)]
wait_for_all(h, [h.aio_pread(buffers[0], 0), h.aio_pread(buffers[1], largest)])
# One sector over the maximum: refused, and the connection carries on.
expect_errno("EINVAL", h.pread, largest + 512, 0)
expect_errno("EINVAL", h.pwrite, bytes(largest + 512), 0)
print(json.dumps({"largest": largest,
                  "first": bytes(buffers[0].to_bytearray()) == first,
                  "second": bytes(buffers[1].to_bytearray()) == second,
                  "after_refusals": h.pread(4096, largest - 2048) == first[-2048:] + second[:2048]}))
''', server.uri())

    assert result == {"largest": 32 * MiB, "first": True, "second": True, "after_refusals": True}


def test_libnbd_zero_flags_and_cache(server):
    result = libnbd(r'''
h = connect(sys.argv[1], strict=False)
region = 64 * 1024
for i in range(4):
    h.pwrite(pattern(30 + i, region), i * region)
h.zero(region, 0, nbd.CMD_FLAG_FAST_ZERO)  # punching a hole is fast: must not fail
h.zero(region, region, nbd.CMD_FLAG_NO_HOLE)  # zeros, but stays allocated
h.zero(region, 2 * region, nbd.CMD_FLAG_FUA)
h.cache(region, 3 * region)
zeroed = [h.pread(region, i * region) == bytes(region) for i in range(3)]
print(json.dumps({
    "zeroed": zeroed,
    "cached_intact": h.pread(region, 3 * region) == pattern(33, region),
    "fast_zero_state": allocation(h, region, 0),
    "no_hole_is_not_a_hole": all(state & nbd.STATE_HOLE == 0 for _, state in allocation(h, region, region)),
}))
''', server.uri())

    assert result == {"zeroed": [True, True, True], "cached_intact": True,
                      "fast_zero_state": [[64 * KiB, HOLE_ZERO]], "no_hole_is_not_a_hole": True}


def test_libnbd_simple_replies_when_structured_replies_are_not_asked_for(server):
    """What the kernel client gets: no structured replies, so reads and errors come
    back as simple replies."""
    result = libnbd(r'''
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
h.set_strict_mode(0)
size = h.get_size()
data = pattern(40, 128 * 1024)
h.pwrite(data, 4096)
h.flush()
h.trim(4096, 4096)
h.zero(4096, 8192)
expected = bytes(8192) + data[8192:]
expect_errno("EINVAL", h.pread, 512, size)
expect_errno("ENOSPC", h.pwrite, bytes(512), size)
print(json.dumps({"structured": h.get_structured_replies_negotiated(),
                  "read_back": h.pread(128 * 1024, 4096) == expected,
                  "unaligned": h.pread(3, 4096 + 8191) == expected[8191:8194]}))
''', server.uri())

    assert result == {"structured": False, "read_back": True, "unaligned": True}


def test_libnbd_zero_length_requests_leave_the_connection_usable(server):
    # The spec leaves zero-length requests unspecified: any reply will do, a hang-up will not.
    result = libnbd(r'''
h = connect(sys.argv[1], strict=False)
h.pwrite(pattern(50, 4096), 0)
outcomes = []
for name, command, args in (("read", h.pread, (0, 0)), ("write", h.pwrite, (b"", 0)),
                            ("trim", h.trim, (0, 0)), ("zero", h.zero, (0, 0)),
                            ("cache", h.cache, (0, 0))):
    try:
        command(*args)
    except nbd.Error as error:
        if error.errnum not in (errno.EINVAL, 0) or "connection" in error.string:
            raise
    outcomes.append(h.pread(4096, 0) == pattern(50, 4096))
print(json.dumps(outcomes))
''', server.uri())

    assert result == [True] * 5


def test_clients_vanishing_mid_pipeline_or_mid_handshake_do_not_hurt_the_server(server):
    """One client queues 256 requests and dies without reading a reply, another hangs
    up after the greeting: the server serves the next client and still exits cleanly."""
    libnbd(r'''
import os
h = connect(sys.argv[1])
for i in range(128):
    h.aio_pwrite(nbd.Buffer.from_bytearray(pattern(i, 65536)), i * 65536)
    h.aio_pread(nbd.Buffer(65536), (i + 128) * 65536)
h.poll(0)
print("null", flush=True)
os._exit(0)  # no DISC, no reading: the server's replies meet a closed socket
''', server.uri())
    with socket.socket(socket.AF_UNIX) as half_way:
        half_way.settimeout(30)
        half_way.connect(str(server.socket))
        assert len(half_way.recv(18)) == 18  # the greeting; then leave mid-handshake

    result = libnbd(r'''
h = connect(sys.argv[1])
h.pwrite(pattern(60, 4096), 0)
print(json.dumps(h.pread(4096, 0) == pattern(60, 4096)))
''', server.uri())

    assert result is True
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


def test_sigterm_mid_pipeline_keeps_every_acknowledged_write(start_server):
    """SIGTERM while 256 writes are in flight: the server answers what it has taken in,
    exits 0, and every write it acknowledged is there after a restart."""
    server = start_server()
    client = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", LIBNBD_HELPERS + r'''
h = connect(sys.argv[1])
cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(pattern(i, 65536)), i * 65536)
           for i in range(256)]
h.poll(0)
print("issued", flush=True)
outcome = {}
while len(outcome) < len(cookies):
    try:
        h.poll(1000)
    except nbd.Error:
        pass  # the server hung up: libnbd fails whatever is left
    for i, cookie in enumerate(cookies):
        if i not in outcome:
            try:
                if h.aio_command_completed(cookie):
                    outcome[i] = "ok"
            except nbd.Error as error:
                outcome[i] = error.errno or error.string
print(json.dumps(outcome))
''', server.uri()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert client.stdout.readline() == "issued\n", client.stderr.read()
        code = server.stop()
        out, err = client.communicate(timeout=60)
    finally:
        client.kill()
        client.wait()
    assert code == 0, server.log()
    outcome = {int(i): status for i, status in json.loads(out).items()}
    acknowledged = sorted(i for i, status in outcome.items() if status == "ok")

    restarted = start_server()
    lost = libnbd(r'''
h = connect(sys.argv[1])
acknowledged = json.loads(sys.argv[2])
print(json.dumps([i for i in acknowledged if h.pread(65536, i * 65536) != pattern(i, 65536)]))
''', restarted.uri(), json.dumps(acknowledged))

    assert lost == [], f"acknowledged writes missing after restart: {lost}"
    assert set(outcome.values()) <= {"ok", "ENOTCONN", "ESHUTDOWN"}, outcome


def test_libnbd_read_only_server_refuses_writes_with_eperm(start_server):
    server = start_server(None, "--read-only")

    result = libnbd(r'''
h = connect(sys.argv[1], strict=False)
assert h.is_read_only()
before = h.pread(4096, 0)
still_usable = []
for command, args in ((h.pwrite, (b"x" * 4096, 0)), (h.pwrite, (b"x" * 4096, 0, nbd.CMD_FLAG_FUA)),
                      (h.zero, (4096, 0)), (h.trim, (4096, 0))):
    expect_errno("EPERM", command, *args)
    still_usable.append(h.pread(4096, 0) == before)
# What does not write is allowed.
h.flush()
h.cache(4096, 0)
print(json.dumps({"still_usable": still_usable, "unchanged": h.pread(4096, 0) == bytes(4096),
                  "allocation": allocation(h, 65536, 0)}))
''', server.uri())

    assert result == {"still_usable": [True] * 4, "unchanged": True,
                      "allocation": [[65536, HOLE_ZERO]]}


def test_libnbd_unaligned_single_byte_io(server):
    result = libnbd(r'''
h = connect(sys.argv[1], strict=False)
size = h.get_size()
model = bytearray(pattern(9, 3 * 4096))
h.pwrite(bytes(model), 0)
# Single bytes inside a block, a 3-byte write across a 512-byte boundary, one byte
# into a never-written block and the very last byte of the export.
for offset, data in ((1000, b"\xa1"), (511, b"\xb2\xb3\xb4"), (4096 + 4095, b"\xc5"), (7, b"\xd6")):
    h.pwrite(data, offset)
    model[offset:offset + len(data)] = data
h.pwrite(b"\xe7", 20000)
h.pwrite(b"\xf8", size - 1)
single_reads = [h.pread(1, offset).hex() for offset in (1000, 511, 512, 513, 8191, 7, 20000, size - 1)]
print(json.dumps({
    "single_reads": single_reads,
    "neighbours_kept": h.pread(3 * 4096, 0) == bytes(model),
    "fresh_block": h.pread(4096, 16384) == bytes(20000 - 16384) + b"\xe7" + bytes(16384 + 4096 - 20001),
    "last_block": h.pread(512, size - 512) == bytes(511) + b"\xf8",
    "odd_span": h.pread(1001, 999) == bytes(model[999:2000]),
}))
''', server.uri())

    assert result == {
        "single_reads": ["a1", "b2", "b3", "b4", "c5", "d6", "e7", "f8"],
        "neighbours_kept": True,
        "fresh_block": True,
        "last_block": True,
        "odd_span": True,
    }


def test_libnbd_concurrent_unaligned_writes_into_shared_blocks_all_land(server):
    """256 one-byte writes to distinct bytes of the same two blocks, all in flight at
    once: a read-modify-write that does not serialise per block loses some of them."""
    result = libnbd(r'''
h = connect(sys.argv[1], strict=False)
base = 1 << 20
h.pwrite(b"\xff" * 1024, base)
expected = bytearray(b"\xff" * 1024)
cookies = []
for i in range(256):
    offset = 4 * i  # two per 8 bytes across both 512-byte blocks
    cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytes([i])), base + offset))
    expected[offset] = i
in_flight = h.aio_in_flight()
wait_for_all(h, cookies)
got = h.pread(1024, base)
lost = [i for i in range(256) if got[4 * i] != i]
print(json.dumps({"in_flight": in_flight, "lost": lost, "all_bytes_right": got == bytes(expected)}))
''', server.uri())

    assert result == {"in_flight": 256, "lost": [], "all_bytes_right": True}


def test_libnbd_unaligned_writes_from_two_connections_into_shared_blocks_all_land(server):
    """The same, with the one-byte writes split between two connections: the
    read-modify-write must be serialised per block across connections too."""
    result = libnbd(r'''
first, second = connect(sys.argv[1], strict=False), connect(sys.argv[1], strict=False)
base = 2 << 20
first.pwrite(b"\xff" * 1024, base)
cookies = {first: [], second: []}
for i in range(256):
    h = first if i % 2 else second
    cookies[h].append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytes([i])), base + 4 * i))
while any(cookies.values()):
    for h, pending in cookies.items():
        if pending:
            h.poll(10)
            cookies[h] = [c for c in pending if not h.aio_command_completed(c)]
got = first.pread(1024, base)
print(json.dumps({"lost": [i for i in range(256) if got[4 * i] != i],
                  "untouched_kept": all(got[4 * i + j] == 0xff for i in range(256) for j in (1, 2, 3))}))
''', server.uri())

    assert result == {"lost": [], "untouched_kept": True}


# --- nbd-client ---------------------------------------------------------------------


def test_nbd_client_lists_every_export(start_server):
    volumes = {"test_v1": "64M", "scratch": "1M", "archive": "8G"}
    server = start_server(volumes)

    listed = run("nbd-client", "-unix", str(server.socket), "-l", timeout=60).stdout
    # nbd-client prints "Negotiation: ..", then "NAME" or "NAME: DESCRIPTION" per export.
    lines = listed.splitlines()
    assert lines[0].startswith("Negotiation:"), listed
    names = {line.partition(": ")[0]: line.partition(": ")[2] for line in lines[1:]}
    assert sorted(names) == sorted(volumes), listed
    assert all(names.values()), f"an export has no description:\n{listed}"
