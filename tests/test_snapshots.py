"""Snapshots as a PureFlash user takes them: `pfnbd volume snapshot` from the command
line while a server keeps writing the volume, the snapshot served read-only as
`VOLUME@SNAP` and read back with qemu-io, nbdinfo and libnbd.

Every test compares whole exports against a model of what each must hold (`qemu-img
dd` dumps, plain reads), so a snapshot that silently follows its volume fails loudly.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SYSTEM_PYTHON, Cli, Server, run
from test_cli import assert_fails_with_one_line
from test_libnbd_clients import LIBNBD_HELPERS, libnbd, nbdinfo, nbdinfo_json
from test_qemu_clients import QEMU_IO_FAILURE, STEP_TIMEOUT, assert_volume_holds, qemu_io, write_pattern

KiB = 1 << 10
MiB = 1 << 20
VOLUME_SIZE = 16 * MiB
SECTOR = 512


def qemu_io_read_only(uri: str, *commands: str) -> None:
    """qemu-io on a read-only export (it refuses to open one for writing); every command must pass."""
    args = ["qemu-io", "-r", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    result = run(*args, uri, timeout=STEP_TIMEOUT, check=False)
    output = result.stdout + result.stderr
    if result.returncode != 0 or QEMU_IO_FAILURE.search(output):
        raise AssertionError(f"qemu-io -r {list(commands)} exited {result.returncode}:\n{output}")


def allocated_bytes(directory: Path) -> int:
    """Disk space the files under `directory` really use (what `du` counts)."""
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


def snapshot_names(cli: Cli, volume: str = "test_v1") -> list[str]:
    return [s["name"] for s in json.loads(cli.run("volume", "info", volume, "--json").stdout)["snapshots"]]


def serve_and_write(start_server, model: bytearray, *writes: tuple[int, int, int]) -> Server:
    """Starts a server on test_v1 and writes (byte, offset, length) patterns through it."""
    server = start_server({"test_v1": str(len(model))})
    qemu_io(server.uri(), *(write_pattern(model, *w) for w in writes))
    return server


def test_snapshot_taken_while_serving_keeps_its_moment(start_server, cli, tmp_path):
    head = bytearray(VOLUME_SIZE)
    head_server = serve_and_write(start_server, head, (0xaa, 0, 4 * MiB),
                                  (0x5a, VOLUME_SIZE - 64 * KiB, 64 * KiB))
    moment = bytes(head)

    # Another process takes the snapshot; the server keeps the volume open meanwhile.
    assert "snap1" in cli.run("volume", "snapshot", "test_v1", "snap1").stdout
    qemu_io(head_server.uri(), write_pattern(head, 0xbb, 0, 1 * MiB),
            write_pattern(head, 0xbc, VOLUME_SIZE - 4 * KiB, 4 * KiB))

    snapshot_server = start_server({}, exports=["test_v1@snap1"])
    snapshot_uri = snapshot_server.uri("test_v1@snap1")
    qemu_io_read_only(snapshot_uri, "read -P 0xaa 0 4M", f"read -P 0 4M {12 * MiB - 64 * KiB}",
                      f"read -P 0x5a {VOLUME_SIZE - 64 * KiB} 64k")
    qemu_io(head_server.uri(), "read -P 0xbb 0 1M", "read -P 0xaa 1M 3M",
            f"read -P 0xbc {VOLUME_SIZE - 4 * KiB} 4k")

    # The volume moves on while its snapshot is being served: the snapshot does not.
    qemu_io(head_server.uri(), write_pattern(head, 0xcc, 2 * MiB + 512, 1 * MiB),
            write_pattern(head, 0xcd, 8 * MiB, 2 * MiB))
    qemu_io_read_only(snapshot_uri, "read -P 0xaa 2M 2M", "read -P 0 8M 2M")
    assert_volume_holds(snapshot_uri, moment, tmp_path)
    assert_volume_holds(head_server.uri(), bytes(head), tmp_path)


def test_snapshot_copies_nothing_and_overwrites_copy_only_what_they_replace(start_server, cli):
    head = bytearray(VOLUME_SIZE)
    server = serve_and_write(start_server, head, (0xaa, 0, 8 * MiB))
    server_uri = server.uri()
    before = allocated_bytes(cli.data_dir)
    assert before >= 8 * MiB, f"8 MiB written but the data directory uses {before} bytes"

    cli.run("volume", "snapshot", "test_v1", "snap1")
    after_snapshot = allocated_bytes(cli.data_dir)
    assert after_snapshot - before < 256 * KiB, (
        f"taking a snapshot of 8 MiB of data grew the data directory by {after_snapshot - before} bytes")

    qemu_io(server_uri, write_pattern(head, 0xbb, 1 * MiB, 1 * MiB))
    after_overwrite = allocated_bytes(cli.data_dir)
    assert after_overwrite - after_snapshot < 2 * MiB, (
        f"overwriting 1 MiB grew the data directory by {after_overwrite - after_snapshot} bytes")

    # Already preserved: the same range again costs nothing more.
    qemu_io(server_uri, write_pattern(head, 0xbc, 1 * MiB, 1 * MiB))
    assert allocated_bytes(cli.data_dir) - after_overwrite < 256 * KiB


def test_writes_to_a_snapshot_export_get_eperm(start_server, cli):
    head = bytearray(VOLUME_SIZE)
    head_server = serve_and_write(start_server, head, (0xaa, 0, 1 * MiB))
    cli.run("volume", "snapshot", "test_v1", "snap1")
    snapshot_uri = start_server({}, exports=["test_v1@snap1"]).uri("test_v1@snap1")

    (export,) = nbdinfo_json(snapshot_uri)["exports"]
    assert export["is_read_only"] is True, export
    assert nbdinfo("--can", "write", snapshot_uri, check=False).returncode == 2
    # Strict mode off: libnbd sends the writes instead of refusing them itself.
    result = libnbd(r'''
h = connect(sys.argv[1], strict=False)
before = h.pread(65536, 0)
expect_errno("EPERM", h.pwrite, b"\xee" * 4096, 0)
expect_errno("EPERM", h.pwrite, b"\xee" * 4096, 4096, nbd.CMD_FLAG_FUA)
expect_errno("EPERM", h.zero, 8192, 0)
expect_errno("EPERM", h.trim, 8192, 0)
print(json.dumps({"read_only": h.is_read_only(), "unchanged": h.pread(65536, 0) == before,
                  "first_byte": before[0]}))
''', snapshot_uri)

    assert result == {"read_only": True, "unchanged": True, "first_byte": 0xaa}
    qemu_io_read_only(snapshot_uri, "read -P 0xaa 0 1M")
    qemu_io(head_server.uri(), "read -P 0xaa 0 1M")


def test_chained_snapshots_and_deleting_the_middle_one(start_server, cli, tmp_path):
    """s2 alone preserved what s1 needs of the ranges written after s2: deleting s2
    must hand that data down to s1, and leave s3 and the head as they were."""
    head = bytearray(VOLUME_SIZE)
    head_server = serve_and_write(start_server, head, (0xa1, 0, 1 * MiB))
    head_uri = head_server.uri()
    moments = {}
    later_writes = {
        "s1": [(0xb2, 0, 256 * KiB), (0xb3, 1 * MiB - 2 * KiB, 4 * KiB)],  # crosses a 1 MiB edge
        "s2": [(0xc4, 256 * KiB, 256 * KiB), (0xc5, 0, 128 * KiB), (0xc6, 5 * MiB + 512, 3 * KiB)],
        "s3": [(0xd7, 512 * KiB, 256 * KiB), (0xd8, 128 * KiB, 64 * KiB), (0xd9, 5 * MiB, 1 * MiB)],
    }
    for name, writes in later_writes.items():
        cli.run("volume", "snapshot", "test_v1", name)
        moments[name] = bytes(head)
        qemu_io(head_uri, *(write_pattern(head, *w) for w in writes))
    assert snapshot_names(cli) == ["s1", "s2", "s3"]

    every_snapshot = start_server({}, exports=[f"test_v1@{name}" for name in moments])
    for name, moment in moments.items():
        assert_volume_holds(every_snapshot.uri(f"test_v1@{name}"), moment, tmp_path)
    assert every_snapshot.stop() == 0

    cli.run("volume", "snapshot-delete", "test_v1", "s2")
    assert snapshot_names(cli) == ["s1", "s3"]
    remaining = start_server({}, exports=["test_v1@s1", "test_v1@s3"])
    assert_volume_holds(remaining.uri("test_v1@s1"), moments["s1"], tmp_path)
    assert_volume_holds(remaining.uri("test_v1@s3"), moments["s3"], tmp_path)
    assert_volume_holds(head_uri, bytes(head), tmp_path)


def test_deleting_the_newest_snapshot_while_the_volume_is_written(start_server, cli, tmp_path):
    """After the newest snapshot goes, head writes must preserve into the one before it."""
    head = bytearray(VOLUME_SIZE)
    head_server = serve_and_write(start_server, head, (0xa1, 0, 2 * MiB))
    head_uri = head_server.uri()
    cli.run("volume", "snapshot", "test_v1", "s1")
    moment = bytes(head)
    cli.run("volume", "snapshot", "test_v1", "s2")
    qemu_io(head_uri, write_pattern(head, 0xb2, 0, 512 * KiB))  # preserved in s2 only

    cli.run("volume", "snapshot-delete", "test_v1", "s2")
    qemu_io(head_uri, write_pattern(head, 0xc3, 1 * MiB, 512 * KiB),  # must be preserved in s1 now
            write_pattern(head, 0xc4, 256 * KiB, 64 * KiB))

    assert snapshot_names(cli) == ["s1"]
    snapshot_uri = start_server({}, exports=["test_v1@s1"]).uri("test_v1@s1")
    qemu_io_read_only(snapshot_uri, "read -P 0xa1 0 2M")
    assert_volume_holds(snapshot_uri, moment, tmp_path)
    assert_volume_holds(head_uri, bytes(head), tmp_path)


def test_volume_info_and_list_show_snapshots(cli):
    cli.run("volume", "create", "test_v1", "--size", "16M")
    cli.run("volume", "create", "other", "--size", "1M")
    for name in ("first", "second", "third"):
        cli.run("volume", "snapshot", "test_v1", name)
    cli.run("volume", "snapshot-delete", "test_v1", "second")

    info = json.loads(cli.run("volume", "info", "test_v1", "--json").stdout)
    assert [s["name"] for s in info["snapshots"]] == ["first", "third"]
    assert len({s["id"] for s in info["snapshots"]}) == 2, info
    assert all(s["created"] for s in info["snapshots"]), info
    listed = {v["name"]: v for v in json.loads(cli.run("volume", "list", "--json").stdout)}
    assert listed["test_v1"]["snapshots"] == info["snapshots"]
    assert listed["other"]["snapshots"] == []

    text = cli.run("volume", "info", "test_v1").stdout
    assert "first" in text and "third" in text and "second" not in text, text


def test_deleting_a_served_snapshot_or_its_volume_is_refused(start_server, cli):
    head = bytearray(VOLUME_SIZE)
    assert serve_and_write(start_server, head, (0xaa, 0, 1 * MiB)).stop() == 0
    cli.run("volume", "snapshot", "test_v1", "snap1")
    snapshot_server = start_server({}, exports=["test_v1@snap1"])

    assert_fails_with_one_line(cli.run("volume", "snapshot-delete", "test_v1", "snap1", check=False),
                               "snap1")
    # The head is not served, but deleting the volume would take the served snapshot with it.
    assert_fails_with_one_line(cli.run("volume", "delete", "test_v1", check=False), "test_v1")
    assert snapshot_names(cli) == ["snap1"]
    qemu_io_read_only(snapshot_server.uri("test_v1@snap1"), "read -P 0xaa 0 1M")

    assert snapshot_server.stop() == 0
    cli.run("volume", "snapshot-delete", "test_v1", "snap1")
    assert snapshot_names(cli) == []


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["volume", "snapshot", "nope", "snap2"], ["nope"]),
        (["volume", "snapshot", "test_v1", "snap1"], ["snap1"]),
        (["volume", "snapshot", "test_v1", "bad name"], ["bad name"]),
        (["volume", "snapshot", "test_v1@snap1", "snap2"], ["test_v1@snap1"]),
        (["volume", "snapshot-delete", "test_v1", "nope"], ["nope"]),
        (["volume", "snapshot-delete", "nope", "snap1"], ["nope"]),
        (["serve", "--volume", "test_v1@nope", "--socket", "{tmp}/refused.sock"], ["nope"]),
        (["volume", "export", "test_v1@nope", "{tmp}/refused.img"], ["nope"]),
    ],
    ids=["snapshot-missing-volume", "duplicate-snapshot", "bad-snapshot-name", "snapshot-of-snapshot",
         "delete-missing-snapshot", "delete-snapshot-of-missing-volume", "serve-missing-snapshot",
         "export-missing-snapshot"],
)
def test_bad_snapshot_input_is_refused_in_one_line(cli, tmp_path, arguments, words):
    cli.run("volume", "create", "test_v1", "--size", "1M")
    cli.run("volume", "snapshot", "test_v1", "snap1")

    result = cli.run(*(a.replace("{tmp}", str(tmp_path)) for a in arguments), check=False)

    assert_fails_with_one_line(result, *words)
    assert snapshot_names(cli) == ["snap1"]
    assert not list(tmp_path.glob("refused.*"))


class BackgroundClient:
    """A libnbd script that runs until told to stop, then prints one JSON value.

    The script sees `announce_started()` (call it after its first I/O), `stopped()`,
    and its own arguments as `args`.
    """

    PRELUDE = r"""
import os, time
stop_file, started_file, *args = sys.argv[1:]
def announce_started():
    open(started_file, "w").close()
def stopped():
    return os.path.exists(stop_file)
"""

    def __init__(self, directory: Path, script: str, *args: str) -> None:
        self._stop_file, self._started_file = directory / "stop", directory / "started"
        self._process = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", LIBNBD_HELPERS + self.PRELUDE + script,
             str(self._stop_file), str(self._started_file), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def __enter__(self) -> BackgroundClient:
        deadline = time.monotonic() + STEP_TIMEOUT
        try:
            while not self._started_file.exists():
                if self._process.poll() is not None:
                    raise AssertionError(f"client exited {self._process.returncode}: {self._process.stderr.read()}")
                assert time.monotonic() < deadline, f"the client did no I/O in {STEP_TIMEOUT} s"
                time.sleep(0.01)
        except BaseException:
            self.__exit__()
            raise
        return self

    def finish(self):
        self._stop_file.touch()
        out, err = self._process.communicate(timeout=STEP_TIMEOUT)
        assert self._process.returncode == 0, err
        return json.loads(out)

    def __exit__(self, *exc: object) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()


# Synchronous writes one after another: every 512-byte sector of write i holds the
# 8-byte number i + 1, 64 times. Prints [offset, length, started, acknowledged] each.
TAGGED_WRITER = r"""
h = connect(args[0])
region = int(args[1])
rng = random.Random(4)
log = []
while not stopped():
    sectors = rng.randrange(1, 513)  # 512 B to 256 KiB: up to two 128 KiB submits
    offset = rng.randrange(0, region // 512 - sectors + 1) * 512
    data = (len(log) + 1).to_bytes(8, "little") * (64 * sectors)
    started = time.monotonic()
    h.pwrite(data, offset)
    log.append([offset, len(data), started, time.monotonic()])
    if len(log) == 1:
        announce_started()
print(json.dumps(log))
"""

# Each sector's tag as an export holds it; -1 for a sector whose 64 tags disagree (torn).
SECTOR_TAGS = r"""
h = connect(sys.argv[1])
region = int(sys.argv[2])
data = bytes(h.pread(region, 0))
tags = []
for start in range(0, region, 512):
    words = {data[i:i + 8] for i in range(start, start + 512, 8)}
    tags.append(int.from_bytes(words.pop(), "little") if len(words) == 1 else -1)
print(json.dumps(tags))
"""


def sectors(write: list) -> range:
    offset, length, _, _ = write
    return range(offset // SECTOR, (offset + length) // SECTOR)


def states(writes: list[list], region: int, first: int, last: int) -> Iterator[tuple[int, list[int]]]:
    """(count, each sector's tag once the first `count` writes landed) for count in first..last."""
    tags = [0] * (region // SECTOR)
    for count in range(last + 1):
        if count >= first:
            yield count, tags
        if count < len(writes):
            span = sectors(writes[count])
            tags[span.start : span.stop] = [count + 1] * len(span)


def is_cut(seen: list[int], tags: list[int], in_flight: list | None, in_flight_tag: int) -> bool:
    """Whether `seen` is `tags`, except that sectors of the write in flight (if any) may
    already hold its tag."""
    if seen == tags:
        return True
    partial = set(sectors(in_flight)) if in_flight is not None else set()
    return all(s == t or (i in partial and s == in_flight_tag) for i, (s, t) in enumerate(zip(seen, tags)))


def test_snapshot_during_continuous_writes_is_a_consistent_cut(start_server, cli, tmp_path):
    """The snapshot holds exactly the writes that came before it: all those acknowledged
    before `volume snapshot` started, none begun after it returned, and no torn sector."""
    region = 4 * MiB
    head_server = start_server({"test_v1": str(VOLUME_SIZE)})
    with BackgroundClient(tmp_path, TAGGED_WRITER, head_server.uri(), str(region)) as writer:
        time.sleep(0.2)
        snapshot_started = time.monotonic()  # CLOCK_MONOTONIC: the writer's clock too
        cli.run("volume", "snapshot", "test_v1", "snap1")
        snapshot_done = time.monotonic()
        time.sleep(0.2)
        writes = writer.finish()
    acknowledged_before = sum(1 for w in writes if w[3] < snapshot_started)
    begun_after = next((i for i, w in enumerate(writes) if w[2] > snapshot_done), len(writes))
    assert 0 < acknowledged_before <= begun_after < len(writes), (
        "the writer must run before, during and after the snapshot",
        acknowledged_before, begun_after, len(writes))

    snapshot_server = start_server({}, exports=["test_v1@snap1"])
    seen = libnbd(SECTOR_TAGS, snapshot_server.uri("test_v1@snap1"), str(region))
    torn = [i * SECTOR for i, tag in enumerate(seen) if tag < 0]
    assert not torn, f"torn sectors in the snapshot at {torn[:8]}"
    # The write numbered `count` may have been in flight, unless it began after the snapshot.
    cuts = [count for count, tags in states(writes, region, acknowledged_before, begun_after)
            if is_cut(seen, tags, writes[count] if count < begun_after else None, count + 1)]
    assert cuts, (f"the snapshot is no state between write {acknowledged_before} and {begun_after} "
                  f"(of {len(writes)}); newest write seen: {max(seen)}")
    final = libnbd(SECTOR_TAGS, head_server.uri(), str(region))
    assert [final] == [tags for _, tags in states(writes, region, len(writes), len(writes))]


# Reads the region over and over, comparing it with one byte, until told to stop.
STEADY_READER = r"""
h = connect(args[0])
region, byte = int(args[1]), int(args[2])
expected = bytes([byte]) * (256 * 1024)
passes, wrong = 0, []
while not stopped():
    for offset in range(0, region, len(expected)):
        if h.pread(len(expected), offset) != expected:
            wrong.append(offset)
    passes += 1
    if passes == 1:
        announce_started()
print(json.dumps({"passes": passes, "wrong": wrong[:16]}))
"""


def test_a_served_snapshot_reads_steadily_while_others_come_and_go(start_server, cli, tmp_path):
    """s1 reads through s2 for everything written after s2: deleting s2 while a client
    reads s1, then taking s3 and writing on, must never show that client other data."""
    region = 2 * MiB
    head = bytearray(VOLUME_SIZE)
    head_uri = serve_and_write(start_server, head, (0xaa, 0, region)).uri()
    cli.run("volume", "snapshot", "test_v1", "s1")
    cli.run("volume", "snapshot", "test_v1", "s2")
    qemu_io(head_uri, write_pattern(head, 0xbb, 0, region))  # preserved in s2 alone
    snapshot_uri = start_server({}, exports=["test_v1@s1"]).uri("test_v1@s1")

    with BackgroundClient(tmp_path, STEADY_READER, snapshot_uri, str(region), str(0xaa)) as reader:
        cli.run("volume", "snapshot-delete", "test_v1", "s2")
        qemu_io(head_uri, write_pattern(head, 0xcc, 0, region // 2))  # preserved in s1 now
        cli.run("volume", "snapshot", "test_v1", "s3")
        s3_moment = bytes(head)
        qemu_io(head_uri, write_pattern(head, 0xdd, region // 4, region))  # preserved in s3
        time.sleep(0.3)
        result = reader.finish()

    assert result["wrong"] == [] and result["passes"] >= 2, result
    assert snapshot_names(cli) == ["s1", "s3"]
    qemu_io_read_only(snapshot_uri, "read -P 0xaa 0 2M", f"read -P 0 2M {VOLUME_SIZE - region}")
    assert_volume_holds(start_server({}, exports=["test_v1@s3"]).uri("test_v1@s3"), s3_moment, tmp_path)
    assert_volume_holds(head_uri, bytes(head), tmp_path)
