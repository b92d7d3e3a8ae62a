"""Incremental backup: what changed since a snapshot, as QEMU's `qemu:dirty-bitmap:`
meta contexts over NBD (read by nbdinfo, libnbd and QEMU's own client), and as
`pfnbd volume diff`.

Dirty means "may differ between the snapshot and this export": every 64 KiB chunk
written, zeroed or trimmed since, holes that were written included; a clean chunk
must read the same on both sides, which the tests check byte for byte."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import run
from pfnbd.store import Store
from test_extended_headers import (
    CMD_BLOCK_STATUS,
    OPT_EXTENDED_HEADERS,
    REP_ACK,
    REPLY_BLOCK_STATUS_EXT,
    RawClient,
    qemu10,
)
from test_libnbd_clients import libnbd, nbdinfo
from test_qemu_clients import STEP_TIMEOUT, qemu_io

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 64 * KiB
SIZE = 4 * MiB
# What the volume gets after snapshot s1: a write inside one chunk, a write over
# two chunks that were holes, a zeroing, a trim.  Chunks 2, 8-9, 20, 40-41 change.
AFTER_S1 = ["write -P 0x11 130k 4k", "write -P 0x22 512k 128k", "write -z 1280k 64k",
            "discard 2560k 128k"]
CHANGED_BY_S1 = [2, 8, 9, 20, 40, 41]
# After s2: one more write, in a chunk s1 already saw change, and one in a new chunk.
AFTER_S2 = ["write -P 0x33 128k 4k", "write -P 0x44 3M 4k"]
CHANGED_BY_S2 = [2, 48]


def dirty_chunks(uri: str, bitmap: str) -> list[int]:
    """Chunks nbdinfo maps as dirty in `qemu:dirty-bitmap:BITMAP`."""
    extents = json.loads(nbdinfo("--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri).stdout)
    dirty = []
    for extent in extents:
        assert extent["type"] in (0, 1), extent  # one flag only: bit 0, dirty
        if extent["type"] == 1:
            assert extent["offset"] % CHUNK == 0 and extent["length"] % CHUNK == 0, extent
            dirty += range(extent["offset"] // CHUNK, (extent["offset"] + extent["length"]) // CHUNK)
    assert sum(extent["length"] for extent in extents) == SIZE
    return dirty


@pytest.fixture
def history(cli, start_server):
    """Volume v: a base pattern, snapshot s1, AFTER_S1, snapshot s2, AFTER_S2; served
    as its head, v@s1 and v@s2 by one server."""
    cli.run("volume", "create", "v", "--size", str(SIZE))
    base = start_server({"v": str(SIZE)})
    qemu_io(base.uri("v"), "write -P 0xa0 0 1M", "write -P 0xa1 2560k 512k", "flush")
    cli.run("volume", "snapshot", "v", "s1")
    qemu_io(base.uri("v"), *AFTER_S1, "flush")
    cli.run("volume", "snapshot", "v", "s2")
    qemu_io(base.uri("v"), *AFTER_S2, "flush")
    assert base.stop() == 0
    return start_server({"v": str(SIZE)}, exports=["v", "v@s1", "v@s2"])


def read_all(uri: str) -> bytes:
    return bytes(libnbd("h = connect(sys.argv[1]); print(json.dumps(list(h.pread(h.get_size(), 0))))", uri))


def test_head_bitmaps_mark_every_changed_chunk_and_clean_ones_read_the_same(history):
    head, s1, s2 = read_all(history.uri("v")), read_all(history.uri("v@s1")), read_all(history.uri("v@s2"))
    for older, data, bitmap, expected in ((s1, head, "s1", sorted({*CHANGED_BY_S1, *CHANGED_BY_S2})),
                                           (s2, head, "s2", CHANGED_BY_S2),
                                           (s1, s2, "s1", CHANGED_BY_S1)):
        uri = history.uri("v@s2" if data is s2 else "v")
        dirty = dirty_chunks(uri, bitmap)
        assert dirty == expected, (uri, bitmap)
        for chunk in range(SIZE // CHUNK):
            if chunk not in dirty:
                span = slice(chunk * CHUNK, (chunk + 1) * CHUNK)
                assert older[span] == data[span], f"clean chunk {chunk} of {uri} differs from {bitmap}"


def test_a_snapshot_export_offers_only_older_snapshots_and_list_finds_them_by_namespace(history):
    script = r'''
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
found = {}
for export in ("v", "v@s1", "v@s2"):
    h.set_export_name(export)
    for query in ("qemu:", "qemu:dirty-bitmap:", "base:"):
        h.clear_meta_contexts()
        h.add_meta_context(query)
        names = []
        h.opt_list_meta_context(lambda name: names.append(name) or 0)
        found[f"{export} {query}"] = sorted(names)
h.opt_abort()
print(json.dumps(found))
'''
    found = libnbd(script, history.uri(""))
    assert found == {
        "v qemu:": ["qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"],
        "v qemu:dirty-bitmap:": ["qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"],
        "v base:": ["base:allocation"],
        "v@s1 qemu:": ["qemu:allocation-depth"], "v@s1 qemu:dirty-bitmap:": [],
        "v@s1 base:": ["base:allocation"],
        "v@s2 qemu:": ["qemu:allocation-depth", "qemu:dirty-bitmap:s1"],
        "v@s2 qemu:dirty-bitmap:": ["qemu:dirty-bitmap:s1"],
        "v@s2 base:": ["base:allocation"],
    }


def depth_per_chunk(uri: str) -> list[int]:
    extents = json.loads(nbdinfo("--json", "--map=qemu:allocation-depth", uri).stdout)
    return [extent["type"] for extent in extents
            for _ in range(extent["offset"] // CHUNK, (extent["offset"] + extent["length"]) // CHUNK)]


def test_allocation_depth_says_which_layer_of_a_snapshot_each_chunk_comes_from(history):
    """v@s1 reads what s1 preserved (depth 1), then what s2 preserved (2), then the
    head (3); 0 where the head it reads through is a hole."""
    head_data = {*range(0, 16), 20, *range(42, 48)}  # written in the head, trimmed ones not
    expected_s1 = [1 if c in CHANGED_BY_S1 else 2 if c in CHANGED_BY_S2 else 3 if c in head_data else 0
                   for c in range(SIZE // CHUNK)]
    expected_s2 = [1 if c in CHANGED_BY_S2 else 2 if c in head_data else 0 for c in range(SIZE // CHUNK)]
    assert depth_per_chunk(history.uri("v@s1")) == expected_s1
    assert depth_per_chunk(history.uri("v@s2")) == expected_s2
    listed = nbdinfo("--list", history.uri("")).stdout
    assert listed.count("qemu:allocation-depth") == 2, listed  # snapshot exports only


def test_one_block_status_answers_every_selected_context(history):
    script = r'''
h = nbd.NBD()
for context in ("base:allocation", "qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"):
    h.add_meta_context(context)
h.connect_uri(sys.argv[1])
answers = {}
def on_extents(context, offset, entries, error):
    answers.setdefault(context, []).extend(entries)
    return 0
h.block_status(1 << 20, 0, on_extents)
print(json.dumps(answers))
'''
    answers = libnbd(script, history.uri("v"))
    assert answers["qemu:dirty-bitmap:s1"] == [128 * KiB, 0, 64 * KiB, 1, 320 * KiB, 0, 128 * KiB, 1,
                                               384 * KiB, 0]
    assert answers["qemu:dirty-bitmap:s2"] == [128 * KiB, 0, 64 * KiB, 1, 832 * KiB, 0]
    assert answers["base:allocation"] == [1 * MiB, 0]  # the base pattern covers it all


def test_block_status_ext_sends_a_chunk_per_context_and_only_the_last_is_done(history):
    raw = RawClient(history.socket)
    assert raw.option(OPT_EXTENDED_HEADERS) == [(REP_ACK, b"")]
    ids = raw.go(b"v", (b"base:allocation", b"qemu:dirty-bitmap:s2"))
    raw.sock.sendall(struct.pack(">IHHQQQ", 0x21E41C71, 0, CMD_BLOCK_STATUS, 0xFFFFFFFF00000007, 0, SIZE))
    chunks = [raw.reply(), raw.reply()]
    assert [flags & 1 for flags, *_ in chunks] == [0, 1]  # DONE on the last only
    by_context = {}
    for flags, kind, cookie, offset, _, payload in chunks:
        assert (kind, cookie, offset) == (REPLY_BLOCK_STATUS_EXT, 0xFFFFFFFF00000007, 0)
        context_id, count = struct.unpack(">II", payload[:8])
        by_context[context_id] = [struct.unpack(">QQ", payload[8 + 16 * i: 24 + 16 * i]) for i in range(count)]
    assert by_context[ids[b"qemu:dirty-bitmap:s2"]] == [
        (128 * KiB, 0), (64 * KiB, 1), (2880 * KiB, 0), (64 * KiB, 1), (SIZE - 3136 * KiB, 0)]
    assert sum(length for length, _ in by_context[ids[b"base:allocation"]]) == SIZE
    raw.sock.close()


@pytest.mark.parametrize("qemu_img", ["qemu-img", "qemu10"])
def test_qemu_reads_the_bitmap_of_a_frozen_point_through_x_dirty_bitmap(history, cli, qemu_img):
    """QEMU's client maps a dirty bitmap through `x-dirty-bitmap` (and reports dirty
    as `"data": false`, its documented inversion).  V@s2 is a frozen point: writes
    to the head after it move the head's bitmap, never s2's."""
    program = qemu10("qemu-img") if qemu_img == "qemu10" else "qemu-img"
    qemu_io(history.uri("v"), "write -P 0x55 3584k 4k")  # chunk 56, after s2
    options = (f"driver=nbd,server.type=unix,server.path={history.socket},export=v@s2,"
               "x-dirty-bitmap=qemu:dirty-bitmap:s1")
    mapped = json.loads(run(program, "map", "--output=json", "--image-opts", options,
                            timeout=STEP_TIMEOUT).stdout)
    dirty = [chunk for extent in mapped if not extent["data"]
             for chunk in range(extent["start"] // CHUNK, (extent["start"] + extent["length"]) // CHUNK)]
    assert dirty == CHANGED_BY_S1
    assert 56 in dirty_chunks(history.uri("v"), "s2")


def test_volume_diff_lists_changed_extents_and_which_read_as_zero(history, cli):
    changed = json.loads(cli.run("volume", "diff", "v", "--from", "s1", "--to", "s2", "--json").stdout)
    assert changed == [
        {"offset": 128 * KiB, "length": 64 * KiB, "type": "data"},  # chunk 2: base data + the write
        {"offset": 512 * KiB, "length": 128 * KiB, "type": "data"},
        {"offset": 1280 * KiB, "length": 64 * KiB, "type": "data"},  # zeroed by writing zeros
        {"offset": 2560 * KiB, "length": 128 * KiB, "type": "zero"},  # trimmed: nothing to read
    ]
    text = cli.run("volume", "diff", "v", "--from", "s2").stdout.splitlines()
    assert text[0].split() == ["Offset", "Length", "Type"]
    assert [line.split() for line in text[1:]] == [
        [str(128 * KiB), str(64 * KiB), "data"], [str(3 * MiB), "4096", "data"],
        [str(3 * MiB + 4096), str(60 * KiB), "zero"]]


@pytest.mark.parametrize("arguments, words", [
    (["--from", "s2", "--to", "s1"], "is not older than"),
    (["--from", "nope"], "has no snapshot 'nope'"),
    (["--from", "s1", "--to", "s1"], "is not older than"),
])
def test_volume_diff_refuses_bad_snapshots_in_one_line(history, cli, arguments, words):
    result = cli.run("volume", "diff", "v", *arguments, check=False)
    assert result.returncode != 0 and words in result.stderr and len(result.stderr.splitlines()) == 1, result


def test_the_bitmap_of_a_1_tib_volume_with_1_gib_changed_maps_in_seconds(cli, start_server):
    """Backup tools' complaint: maps that take minutes on big disks.  A 1 TiB volume
    with 1 GiB changed in 16 places, the whole bitmap through nbdinfo: only the
    snapshot's map is read, never data."""
    cli.run("volume", "create", "big", "--size", "1T")
    cli.run("volume", "snapshot", "big", "s1")
    server = start_server({"big": "1T"})
    places = [n * (1 << 36) + (n + 1) * CHUNK for n in range(16)]  # one in every 64 GiB
    qemu_io(server.uri("big"), *(f"write -P {n + 1} {offset} 64M" for n, offset in enumerate(places)))
    started = time.monotonic()
    extents = json.loads(nbdinfo("--json", "--map=qemu:dirty-bitmap:s1", server.uri("big")).stdout)
    seconds = time.monotonic() - started
    assert [(e["offset"], e["length"]) for e in extents if e["type"] == 1] == [(o, 64 * MiB) for o in places]
    assert sum(e["length"] for e in extents) == 1 << 40
    print(f"nbdinfo --map=qemu:dirty-bitmap:s1 of 1 TiB with 1 GiB changed: {seconds:.2f} s")
    assert seconds < 30, f"mapping 1 TiB took {seconds:.1f} s"


BACKUP_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "backup" / "backup.sh"


def test_the_backup_example_restores_s2_from_a_full_and_an_incremental(history, tmp_path):
    output = run(str(BACKUP_EXAMPLE), str(history.socket), "v", "s1", "s2", str(tmp_path), timeout=120).stdout
    assert "identical" in output, output
    assert (tmp_path / "restored.raw").read_bytes() == read_all(history.uri("v@s2"))
    run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(tmp_path / "full.qcow2"), history.uri("v@s1"))
    # The overlay holds the dirty chunks and nothing else.
    layers = json.loads(run("qemu-img", "map", "--output=json", str(tmp_path / "incremental.qcow2")).stdout)
    own = [chunk for extent in layers if extent["depth"] == 0 and extent["present"]
           for chunk in range(extent["start"] // CHUNK, (extent["start"] + extent["length"]) // CHUNK)]
    assert own == CHANGED_BY_S1


# --- the dirty set, both ways, under random histories ---------------------------------

STATE_SIZE = 16 * CHUNK + 4096  # a short last chunk too


class DirtyModel(RuleBasedStateMachine):
    """Writes, zeroes, trims, snapshots and snapshot deletions at random on one head;
    after each step, for every snapshot S: the chunks `changes` calls dirty since S
    are exactly those touched since S was taken (none missed, none over-reported at
    chunk granularity), against the head and against every newer snapshot, and
    every clean chunk reads the same on both sides."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="pfnbd-dirty-"))
        self.store = Store(self.directory)
        self.store.create("v", STATE_SIZE)
        self.head = self.store.open_image("v")
        self.data = bytearray(STATE_SIZE)
        self.touched: list[set[int]] = []  # the chunks each write or trim reached, in order
        self.snapshots: dict[str, tuple[bytes, int]] = {}  # name -> (data then, writes before it)
        self.taken = 0

    def touch(self, offset: int, length: int) -> None:
        self.touched.append(set(range(offset // CHUNK, -(-(offset + length) // CHUNK))))

    def touched_between(self, since: str, until: str | None) -> set[int]:
        end = len(self.touched) if until is None else self.snapshots[until][1]
        return set().union(*self.touched[self.snapshots[since][1]:end])

    @rule(offset=st.integers(0, STATE_SIZE - 1), length=st.integers(1, 3 * CHUNK), byte=st.integers(0, 255))
    def write(self, offset, length, byte):
        length = min(length, STATE_SIZE - offset)
        self.head.writev([bytes([byte]) * length], offset)
        self.data[offset:offset + length] = bytes([byte]) * length
        self.touch(offset, length)

    @rule(sector=st.integers(0, STATE_SIZE // 512 - 1), sectors=st.integers(1, 300))
    def trim(self, sector, sectors):
        offset, length = sector * 512, min(sectors * 512, STATE_SIZE - sector * 512)
        self.head.punch_hole(offset, length)
        self.data[offset:offset + length] = bytes(length)
        self.touch(offset, length)

    @precondition(lambda self: len(self.snapshots) < 4)
    @rule()
    def snapshot(self):
        self.taken += 1
        name = f"s{self.taken}"
        self.store.create_snapshot("v", name)
        self.snapshots[name] = (bytes(self.data), len(self.touched))

    @precondition(lambda self: self.snapshots)
    @rule(pick=st.integers(0, 3))
    def delete_snapshot(self, pick):
        names = list(self.snapshots)
        name = names[pick % len(names)]
        self.store.delete_snapshot("v", name)
        del self.snapshots[name]

    def dirty(self, since: str, until: str | None) -> set[int]:
        return {chunk for extent in self.store.changes("v", since, until, 0, STATE_SIZE) if extent.allocated
                for chunk in range(extent.offset // CHUNK, -(-(extent.offset + extent.length) // CHUNK))}

    @invariant()
    def dirty_sets_are_exact(self):
        names = list(self.snapshots)
        for index, since in enumerate(names):
            then = self.snapshots[since][0]
            for until in [*names[index + 1:], None]:
                expected = self.touched_between(since, until)
                assert self.dirty(since, until) == expected, (since, until)
                self.assert_clean_chunks_equal(then, self.data if until is None else self.snapshots[until][0],
                                               expected)

    @staticmethod
    def assert_clean_chunks_equal(older: bytes, newer: bytes, dirty: set[int]) -> None:
        for chunk in set(range(-(-STATE_SIZE // CHUNK))) - dirty:
            span = slice(chunk * CHUNK, (chunk + 1) * CHUNK)
            assert older[span] == newer[span], f"clean chunk {chunk} differs"

    def teardown(self):
        self.head.close()
        shutil.rmtree(self.directory)


TestDirtyModel = DirtyModel.TestCase
TestDirtyModel.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
