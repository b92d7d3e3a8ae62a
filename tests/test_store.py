"""The embedded store: volumes, copy-before-write snapshots, locks between processes."""

import json
import os
import random
import threading
import tracemalloc

import pytest

from pfnbd.store import CHUNK, Store, StoreError, VolumeBusy, VolumeExists, VolumeNotFound
from test_cli import assert_fails_with_one_line, run_serve_expecting_refusal

SIZE = 16 * CHUNK + 4096  # a partial last chunk too


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path)
    store.create("v", SIZE)
    return store


def write(image, offset, data):
    image.writev([data], offset)


def read(image, offset=0, length=SIZE):
    buffer = memoryview(bytearray(length))
    image.readv([buffer], offset)
    return bytes(buffer)


def read_snapshot(store, name, length):
    """The first `length` bytes of snapshot `name` (VOLUME@SNAP), opened for this alone."""
    snap = store.open_image(name)
    try:
        return read(snap, 0, length)
    finally:
        snap.close()


def test_a_snapshot_keeps_its_moment_while_the_volume_moves_on(store):
    rng = random.Random(3)
    head = store.open_image("v")
    try:
        first = rng.randbytes(SIZE)
        write(head, 0, first)
        store.create_snapshot("v", "s1")
        write(head, 100, b"x" * 200_000)  # crosses chunks, unaligned
        head.punch_hole(CHUNK * 10, CHUNK * 2)
        now = bytearray(first)
        now[100:200_100] = b"x" * 200_000
        now[CHUNK * 10 : CHUNK * 12] = bytes(CHUNK * 2)
        assert read(head) == bytes(now)
        snap = store.open_image("v@s1")
        try:
            assert read(snap) == first
            assert read(snap, 12345, 70_000) == first[12345:82345]
        finally:
            snap.close()
    finally:
        head.close()


def test_chained_snapshots_and_deleting_the_middle_one(store):
    rng = random.Random(4)
    head = store.open_image("v")
    states = []
    try:
        for name in ("s1", "s2", "s3"):
            data = rng.randbytes(CHUNK * 3)
            offset = rng.randrange(0, SIZE - len(data))
            write(head, offset, data)
            states.append(read(head))
            store.create_snapshot("v", name)
        write(head, 0, b"\xee" * SIZE)
        store.delete_snapshot("v", "s2")  # s1 must still read its own moment
        for name, state in (("s1", states[0]), ("s3", states[2])):
            snap = store.open_image(f"v@{name}")
            try:
                assert read(snap) == state, name
            finally:
                snap.close()
        assert [s.name for s in store.get("v").snapshots] == ["s1", "s3"]
    finally:
        head.close()


def test_snapshot_creation_copies_nothing(store):
    head = store.open_image("v")
    try:
        write(head, 0, b"\1" * SIZE)
    finally:
        head.close()
    store.create_snapshot("v", "s1")
    assert os.stat(store.image_path("v", "s1")).st_blocks == 0


def test_snapshot_extents_tell_holes_from_data(store):
    head = store.open_image("v")
    try:
        write(head, 0, b"\1" * CHUNK)
        store.create_snapshot("v", "s1")
        write(head, CHUNK * 4, b"\2" * CHUNK)  # data now, a hole in the snapshot
        head.punch_hole(0, CHUNK)  # a hole now, data in the snapshot
        snap = store.open_image("v@s1")
        try:
            allocated = [(e.offset, e.length) for e in snap.extents(0, SIZE) if e.allocated]
        finally:
            snap.close()
    finally:
        head.close()
    assert allocated == [(0, CHUNK)]


def test_snapshots_are_read_only(store):
    store.create_snapshot("v", "s1")
    snap = store.open_image("v@s1")
    try:
        assert not snap.writable
        with pytest.raises(OSError):
            write(snap, 0, b"x" * 512)
    finally:
        snap.close()


def test_served_volumes_and_snapshots_cannot_be_deleted(store):
    store.create_snapshot("v", "s1")
    snap = store.open_image("v@s1")
    with pytest.raises(VolumeBusy):
        store.delete_snapshot("v", "s1")
    with pytest.raises(VolumeBusy):
        store.delete("v")
    snap.close()
    head = store.open_image("v")
    with pytest.raises(VolumeBusy, match="already served"):
        store.open_image("v")
    with pytest.raises(VolumeBusy):
        store.delete("v")
    head.close()
    store.delete("v")
    assert store.list() == []
    assert sorted(p.name for p in (store.root / "volumes").iterdir()) == [".lock"]


def test_heads_sharing_a_held_writer_preserve_each_chunk_once(store):
    """Two heads of one volume, as two workers of one server hold them: each has its own
    copy of the snapshot's map, and one preserving a chunk must not make the other copy
    the first one's new data into the snapshot."""
    old = random.Random(5).randbytes(SIZE)
    head = store.open_image("v")
    write(head, 0, old)
    head.close()
    store.create_snapshot("v", "s1")
    store.hold_writer("v")
    first, second = store.open_image("v"), store.open_image("v")
    try:
        with pytest.raises(VolumeBusy, match="already served"):
            Store(store.root).open_image("v")  # another server is still refused
        write(second, 5 * CHUNK, b"b" * 512)  # `second` has read the map: chunk 0 not preserved
        write(first, 0, b"1" * CHUNK)  # preserves chunk 0, then overwrites it
        write(second, 0, b"2" * 512)  # its map is stale: chunk 0 must not be copied again
        snap = store.open_image("v@s1")
        try:
            assert read(snap) == old
        finally:
            snap.close()
        assert read(first, 0, CHUNK) == b"2" * 512 + b"1" * (CHUNK - 512)
    finally:
        first.close()
        second.close()


def test_bad_names_and_duplicates_are_refused(store):
    with pytest.raises(VolumeExists):
        store.create("v", 512)
    with pytest.raises(StoreError):
        store.create("bad/name", 512)
    with pytest.raises(StoreError):
        store.create("x" * 97, 512)
    store.create_snapshot("v", "s1")
    with pytest.raises(VolumeExists):
        store.create_snapshot("v", "s1")
    with pytest.raises(VolumeNotFound):
        store.create_snapshot("nope", "s1")
    with pytest.raises(VolumeNotFound):
        store.open_image("v@nope")


def test_names_that_leave_the_data_directory_are_refused_at_every_entry_point(store, tmp_path):
    # A volume outside the data directory that `../` would reach.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.json").write_text(json.dumps(dict(name="victim", size=SIZE, id=9)))
    (elsewhere / "victim.img").write_bytes(b"keep")
    name = "../elsewhere/victim"
    for call in (store.get, store.delete, store.open_image, store.describe, store.get_export,
                 lambda n: store.create_snapshot(n, "s1"), lambda n: store.delete_snapshot(n, "s1"),
                 lambda n: store.open_image(n, read_only=True)):
        with pytest.raises(StoreError, match="invalid volume name"):
            call(name)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["victim.img", "victim.json"]


def test_a_snapshot_and_a_closed_head_make_acknowledged_writes_durable(store, monkeypatch):
    synced = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    head_path = str(store.image_path("v"))
    head = store.open_image("v")
    try:
        write(head, 0, b"a" * 4096)
        store.create_snapshot("v", "s1")
        assert head_path in synced, "the snapshot was taken before the head's writes were durable"
        write(head, CHUNK, b"b" * 4096)
        synced.clear()
    finally:
        head.close()
    assert head_path in synced, "a head was closed with writes not made durable"


def test_snapshot_extents_of_a_huge_range_cost_only_what_is_taken(tmp_path):
    size = 64 << 30  # a million chunks
    store = Store(tmp_path)
    store.create("big", size)
    store.create_snapshot("big", "s1")
    snap = store.open_image("big@s1")
    tracemalloc.start()
    try:
        first = next(iter(snap.extents(0, size)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        snap.close()
    assert first.offset == 0 and not first.allocated
    assert peak < 1 << 20, f"the first extent of {size} bytes took {peak} bytes of memory"


def merged(extents):
    """(start, end, allocated) runs: how a snapshot's extents split depends on which
    file holds each chunk, what they say does not."""
    runs = []
    for extent in extents:
        if runs and runs[-1][2] == extent.allocated and runs[-1][1] == extent.offset:
            runs[-1] = (runs[-1][0], extent.offset + extent.length, extent.allocated)
        else:
            runs.append((extent.offset, extent.offset + extent.length, extent.allocated))
    return runs


def test_a_snapshot_read_on_one_thread_and_mapped_on_another_while_snapshots_change(store):
    rng = random.Random(6)
    head = store.open_image("v")
    write(head, 0, rng.randbytes(SIZE))
    store.create_snapshot("v", "s1")
    snap = store.open_image("v@s1")
    expected = read(snap)
    expected_extents = merged(snap.extents(0, SIZE))
    failures = []
    stop = threading.Event()

    def keep(check):
        try:
            while not stop.is_set():
                check()
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    def check_read():
        assert read(snap) == expected

    def check_extents():
        assert merged(snap.extents(0, SIZE)) == expected_extents

    threads = [threading.Thread(target=keep, args=(check,)) for check in (check_read, check_extents)]
    for thread in threads:
        thread.start()
    try:
        for round in range(80):
            store.create_snapshot("v", "n")
            write(head, (round % 16) * CHUNK, rng.randbytes(4096))
            store.delete_snapshot("v", "n")
            if failures:
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        snap.close()
        head.close()
    assert not failures, failures[0]


@pytest.mark.parametrize("before, after", [
    (["volume", "delete"], []), (["volume", "info"], []), (["volume", "snapshot"], ["s1"]),
    (["volume", "snapshot-delete"], ["s1"]), (["volume", "export"], ["{tmp}/out.raw"]),
    (["serve", "--socket", "{tmp}/s.sock", "--volume"], []),
])
def test_the_cli_refuses_names_outside_the_data_directory_in_one_line(cli, tmp_path, before, after):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.json").write_text(json.dumps(dict(name="victim", size=SIZE, id=9)))
    (elsewhere / "victim.img").write_bytes(b"keep")
    cli.run("volume", "create", "v", "--size", "1M")  # a data directory that exists
    arguments = [a.format(tmp=tmp_path) for a in [*before, "../../elsewhere/victim", *after]]
    if arguments[0] == "serve":
        result = run_serve_expecting_refusal(cli, *arguments[1:])
    else:
        result = cli.run(*arguments, check=False)
    assert_fails_with_one_line(result, "invalid volume name")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["victim.img", "victim.json"]


def test_a_batch_whose_snapshot_refresh_fails_writes_none_of_it_unpreserved(store):
    """Every write of a batch fails while the new snapshot cannot be opened, the
    second as well as the first: none reaches the head with its chunk unpreserved."""
    head = store.open_image("v")
    try:
        old = b"\xaa" * (2 * CHUNK)
        write(head, 0, old)
        store.create_snapshot("v", "s1")  # the head learns of it at its next barrier hold
        map_path = store._map_path("v", "s1")
        aside = map_path.with_name("aside.map")
        map_path.rename(aside)
        new = memoryview(bytearray(b"\xbb" * CHUNK))
        with head.batch():
            results = head.transfers([(True, new, 0), (True, new, CHUNK)])
        assert all(result < 0 for result in results), results
        head.idle()
        aside.rename(map_path)
        assert read_snapshot(store, "v@s1", 2 * CHUNK) == old
        with head.batch():
            assert head.transfers([(True, new, 0), (True, new, CHUNK)]) == [CHUNK, CHUNK]
    finally:
        head.close()


def test_a_batch_of_writes_preserves_its_chunks_with_one_pair_of_fdatasyncs(store, monkeypatch):
    head = store.open_image("v")
    try:
        old = bytes(range(256)) * (8 * CHUNK // 256)
        write(head, 0, old)
        store.create_snapshot("v", "s1")
        synced = []
        real_fdatasync = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real_fdatasync(fd)))
        new = memoryview(bytearray(b"\xbb" * 4096))
        with head.batch():
            assert head.transfers([(True, new, chunk * CHUNK + 512) for chunk in range(8)]) == [4096] * 8
        monkeypatch.undo()
        assert len(synced) == 2, synced  # the snapshot's copies, then its map
        assert read_snapshot(store, "v@s1", 8 * CHUNK) == old
    finally:
        head.close()


def test_a_snapshot_delete_waits_for_the_writes_that_hold_the_barrier(store):
    """A head holding the barrier writes into the newest snapshot it knows of; a
    delete of that snapshot (which folds its chunks into the next older one) waits
    until the head lets go, or the chunk preserved after the fold would be lost to the
    older snapshot, which would then read the head's new bytes."""
    head = store.open_image("v")
    try:
        old = b"\xaa" * (2 * CHUNK)
        write(head, 0, old)
        store.create_snapshot("v", "kept")
        store.create_snapshot("v", "gone")
        new = memoryview(bytearray(b"\xbb" * CHUNK))
        deleting = threading.Thread(target=Store(store.root).delete_snapshot, args=("v", "gone"))
        with head.batch():
            assert head.transfers([(True, new, 0)]) == [CHUNK]  # the barrier held, "gone" known
            deleting.start()
            deleting.join(0.3)  # the delete waits for the barrier (without it: done by now)
            assert head.transfers([(True, new, CHUNK)]) == [CHUNK]
        head.idle()
        deleting.join(10)
        assert not deleting.is_alive()
        assert read_snapshot(store, "v@kept", 2 * CHUNK) == old
    finally:
        head.close()
