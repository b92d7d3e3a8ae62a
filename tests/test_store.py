"""The embedded store: volumes, copy-before-write snapshots, locks between processes."""

import os
import random

import pytest

from pfnbd.store import CHUNK, Store, StoreError, VolumeBusy, VolumeExists, VolumeNotFound

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
