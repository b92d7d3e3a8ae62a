"""The embedded cluster's storage: volumes and snapshots as sparse files.

Layout under the data directory::

    volumes/NAME.json        metadata with the snapshot list, replaced atomically
    volumes/NAME.img         the volume's bytes (the head); never-written space is a hole
    volumes/NAME@SNAP.img    what SNAP preserved: chunks copied before the head overwrote them
    volumes/NAME@SNAP.map    one byte per chunk: 1 once that chunk is preserved in SNAP
    volumes/NAME.barrier     lock: head writes hold it shared, snapshot changes exclusive

The metadata file is the commit point: a volume or snapshot exists once its JSON says
so.  Snapshots are copy-before-write, so creating one copies nothing and the head's
reads stay a plain `pread`.  Reading snapshot S falls through S, then every newer
snapshot, then the head: the first one that preserved a chunk holds S's data for it.

Locks between processes sharing a data directory: a served image holds a shared
`flock` (so `delete` refuses it), the one process writing a head holds NAME.writer
exclusively, and snapshot creation/deletion takes the barrier exclusively, so every
head write lands either wholly before a snapshot or wholly copied-before after it.
Processes forked by one server (`pfnbd serve --workers`) share its NAME.writer and
write one head together; a chunk is preserved under a lock on its byte of the map.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import errno
import fcntl
import itertools
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import attrs

from .aio import AioContext, Transfer

log = logging.getLogger(__name__)

SECTOR = 512
CHUNK = 64 * 1024  # copy-before-write granularity
# How long a busy head keeps the snapshot barrier across batches of writes: one
# flock pair per batch cost more than the batch's small writes.
BARRIER_HOLD_LIMIT = 0.005
AIO_CAPACITY = 128  # transfers per io_submit; a bigger batch takes several
MAX_NAME_LENGTH = 96  # PureFlash's limit on volume names
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SUFFIX_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
_ZEROES = bytes(CHUNK)
CHANGE_WINDOW = 1 << 16  # map bytes `changes` reads per snapshot at a time: 4 GiB of volume
T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for an open file description's lock)
_FLOCK = struct.Struct("hhqqi4x")


def human_size(size: int) -> str:
    for suffix, shift in reversed(SUFFIX_SHIFT.items()):
        if shift and size % (1 << shift) == 0:
            return f"{size >> shift} {suffix}iB"
    return f"{size} bytes"


class StoreError(Exception):
    """A volume operation that cannot be done; the message is for the user."""


class VolumeNotFound(StoreError):
    pass


class VolumeExists(StoreError):
    pass


class VolumeBusy(StoreError):
    pass


def check_name(name: str, what: str = "volume") -> None:
    if not NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise StoreError(
            f"invalid {what} name {name!r}: use up to {MAX_NAME_LENGTH} letters, digits, "
            "'_', '.' or '-', starting with a letter or digit"
        )


def split_snapshot_name(name: str) -> tuple[str, str | None]:
    """`test_v1@snap1` -> (`test_v1`, `snap1`), as QEMU's pfbd driver names snapshots."""
    volume, at, snapshot = name.partition("@")
    return volume, (snapshot if at else None)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@attrs.frozen
class SnapshotMeta:
    name: str
    id: int
    created: str


@attrs.frozen
class VolumeMeta:
    name: str
    size: int
    id: int
    replicas: int = 1
    created: str = ""
    snapshots: tuple[SnapshotMeta, ...] = ()  # oldest first

    def to_json(self) -> dict:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> VolumeMeta:
        snapshots = tuple(SnapshotMeta(**s) for s in data.pop("snapshots", ()))
        return cls(**data, snapshots=snapshots)

    def describe(self) -> str:
        replicas = "replica" if self.replicas == 1 else "replicas"
        return f"PureFlash volume {self.name}, {human_size(self.size)}, {self.replicas} {replicas}"

    def snapshot_index(self, snapshot: str) -> int:
        for index, s in enumerate(self.snapshots):
            if s.name == snapshot:
                return index
        raise VolumeNotFound(f"volume {self.name!r} has no snapshot {snapshot!r}")

    @property
    def chunks(self) -> int:
        return -(-self.size // CHUNK)


@attrs.frozen
class Extent:
    offset: int
    length: int
    allocated: bool


def write_all(fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> None:
    """Writes every byte of `buffers` at `offset`, or raises OSError.

    `pwritev` may write less than asked (a file size limit, a disk filling up);
    the rest is written again, and the call that can make no progress raises the
    real reason (EFBIG, ENOSPC, EIO).  Every write of the store goes through here:
    an unchecked count is a lost write acknowledged."""
    views = [view for view in (memoryview(b).cast("B") for b in buffers) if len(view)]
    while views:
        done = os.pwritev(fd, views, offset)
        if done == 0:
            raise OSError(errno.EIO, "write made no progress")
        offset += done
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if done:
            views[0] = views[0][done:]


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, [data], 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flocked(path: Path, operation: int, busy_message: str | None = None) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            raise VolumeBusy(busy_message or f"{path.name} is locked") from None
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _range_locked(fd: int, start: int, length: int) -> Iterator[None]:
    """Bytes [start, start+length) of `fd`'s file, exclusively, against every other open
    file description: an OFD lock, which no other descriptor's close lets go."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))
    try:
        yield
    finally:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0))


def _create_sparse(path: Path, size: int) -> None:
    with open(path, "xb") as f:
        f.truncate(size)
        os.fsync(f.fileno())


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._dir = self.root / "volumes"
        self._held_writers: dict[str, int] = {}  # volume name -> its NAME.writer, locked

    # -- paths ------------------------------------------------------------

    def _meta_path(self, name: str) -> Path:
        return self._dir / f"{name}.json"

    def image_path(self, name: str, snapshot: str | None = None) -> Path:
        return self._dir / (f"{name}@{snapshot}.img" if snapshot else f"{name}.img")

    def _map_path(self, name: str, snapshot: str) -> Path:
        return self._dir / f"{name}@{snapshot}.map"

    def _barrier_path(self, name: str) -> Path:
        return self._dir / f"{name}.barrier"

    def _writer_path(self, name: str) -> Path:
        return self._dir / f"{name}.writer"

    def hold_writer(self, name: str) -> None:
        """Takes NAME.writer for this process and those it forks, until it exits: their
        heads of NAME share the one lock (one open file description), and any other
        process's head is refused.  For a server that writes a head from several processes."""
        self.get(name)
        self._held_writers[name] = self._take_writer(name)

    def _take_writer(self, name: str) -> int:
        fd = os.open(self._writer_path(name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VolumeBusy(f"volume {name!r} is already served by another process") from None
        return fd

    @contextlib.contextmanager
    def _barrier(self, name: str) -> Iterator[None]:
        """Holds off head writes of an existing volume while its snapshots change."""
        self.get(name)  # before creating a lock file for a volume that does not exist
        with _flocked(self._barrier_path(name), fcntl.LOCK_EX):
            yield

    def _locked(self):
        """Serialises volume creation and deletion between processes."""
        self._dir.mkdir(parents=True, exist_ok=True)
        return _flocked(self._dir / ".lock", fcntl.LOCK_EX)

    # -- volumes ----------------------------------------------------------

    def create(self, name: str, size: int, replicas: int = 1, prepared: Path | None = None) -> VolumeMeta:
        """A new volume; `prepared`, a complete file of `size` bytes, becomes its image
        (an import's data: the volume exists only once it is all there)."""
        check_name(name)
        if size <= 0 or size % SECTOR:
            raise StoreError(f"volume size must be a positive multiple of {SECTOR} bytes, not {size}")
        if not 1 <= replicas <= 3:
            raise StoreError("replica count must be 1, 2 or 3")
        with self._locked():
            if self._meta_path(name).exists():
                raise VolumeExists(f"volume {name!r} already exists")
            next_id = 1 + max((v.id for v in self.list()), default=0)
            image = self.image_path(name)
            image.unlink(missing_ok=True)  # debris of a create that crashed
            try:
                if prepared is None:
                    _create_sparse(image, size)
                else:
                    os.rename(prepared, image)
            except (OSError, OverflowError) as error:
                image.unlink(missing_ok=True)
                reason = getattr(error, "strerror", None) or "too large"
                raise StoreError(f"cannot create volume {name!r} of {human_size(size)}: {reason}") from None
            meta = VolumeMeta(name, size, next_id, replicas, _now())
            self._write_meta(meta)
            return meta

    def _write_meta(self, meta: VolumeMeta) -> None:
        _write_atomically(self._meta_path(meta.name), json.dumps(meta.to_json()).encode())

    def get(self, name: str) -> VolumeMeta:
        if "@" in name:
            raise StoreError(f"{name!r} names a snapshot, not a volume")
        check_name(name)  # every entry point comes here first: no name leaves the data directory
        try:
            return VolumeMeta.from_json(json.loads(self._meta_path(name).read_bytes()))
        except FileNotFoundError:
            raise VolumeNotFound(f"no volume named {name!r}") from None

    def get_export(self, name: str) -> tuple[VolumeMeta, SnapshotMeta | None]:
        """A volume, or `VOLUME@SNAP` for one of its snapshots."""
        volume, snapshot = split_snapshot_name(name)
        meta = self.get(volume)
        if snapshot is None:
            return meta, None
        return meta, meta.snapshots[meta.snapshot_index(snapshot)]

    def describe(self, name: str) -> str:
        """What NBD_OPT_LIST and INFO say of an export."""
        meta, snapshot = self.get_export(name)
        if snapshot is None:
            return meta.describe()
        return f"snapshot {snapshot.name} of {meta.describe()}, read-only"

    def list(self) -> list[VolumeMeta]:
        if not self._dir.is_dir():
            return []
        return sorted((self.get(p.stem) for p in self._dir.glob("*.json")), key=lambda v: v.name)

    def delete(self, name: str) -> None:
        """Deletes a volume with its snapshots; refused while any of them is served."""
        with self._locked():
            meta = self.get(name)
            images = [self.image_path(name)] + [self.image_path(name, s.name) for s in meta.snapshots]
            with contextlib.ExitStack() as held:
                for image in images:
                    held.enter_context(_flocked(image, fcntl.LOCK_EX | fcntl.LOCK_NB,
                                                f"volume {name!r} is being served"))
                self._meta_path(name).unlink()
                _fsync_directory(self._dir)
            for path in images + [self._map_path(name, s.name) for s in meta.snapshots]:
                path.unlink(missing_ok=True)
            self._barrier_path(name).unlink(missing_ok=True)
            self._writer_path(name).unlink(missing_ok=True)

    # -- snapshots --------------------------------------------------------

    def create_snapshot(self, name: str, snapshot: str) -> SnapshotMeta:
        check_name(snapshot, "snapshot")
        with self._locked(), self._barrier(name):
            meta = self.get(name)
            if any(s.name == snapshot for s in meta.snapshots):
                raise VolumeExists(f"volume {name!r} already has a snapshot {snapshot!r}")
            for path in (self.image_path(name, snapshot), self._map_path(name, snapshot)):
                path.unlink(missing_ok=True)  # debris of a create that crashed
            # What the head was acknowledged to hold must be durable before the
            # snapshot says it holds it: after a host crash it must still be there.
            head = os.open(self.image_path(name), os.O_RDONLY)
            try:
                os.fdatasync(head)
            finally:
                os.close(head)
            _create_sparse(self.image_path(name, snapshot), meta.size)
            _create_sparse(self._map_path(name, snapshot), meta.chunks)
            new = SnapshotMeta(snapshot, 1 + max((s.id for s in meta.snapshots), default=0), _now())
            self._write_meta(attrs.evolve(meta, snapshots=(*meta.snapshots, new)))
            return new

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        """Folds what the snapshot preserved into the next older one, then drops it."""
        with self._locked(), self._barrier(name):
            meta = self.get(name)
            index = meta.snapshot_index(snapshot)
            image = self.image_path(name, snapshot)
            with _flocked(image, fcntl.LOCK_EX | fcntl.LOCK_NB, f"snapshot {name}@{snapshot} is being served"):
                if index > 0:
                    self._fold(meta, meta.snapshots[index], meta.snapshots[index - 1])
                snapshots = meta.snapshots[:index] + meta.snapshots[index + 1 :]
                self._write_meta(attrs.evolve(meta, snapshots=snapshots))
            image.unlink()
            self._map_path(name, snapshot).unlink()

    def _fold(self, meta: VolumeMeta, newer: SnapshotMeta, older: SnapshotMeta) -> None:
        """Copies chunks `newer` preserved and `older` did not, so `older` reads the same."""
        with _SnapshotFiles(self, meta.name, newer.name) as source, \
                _SnapshotFiles(self, meta.name, older.name, writable=True) as target:
            source_map, target_map = source.read_map(0, meta.chunks), target.read_map(0, meta.chunks)
            moved = [c for c in range(meta.chunks) if source_map[c] and not target_map[c]]
            target.preserve(source.image, moved, meta.size)

    # -- what changed -----------------------------------------------------

    def changes(self, name: str, since: str, until: str | None, offset: int, length: int) -> Iterator[Extent]:
        """Where volume `name` (its head, or snapshot `until`) may differ from its
        snapshot `since`: `allocated` means changed.

        Every write, zeroing or trim that reached a chunk after `since` was taken
        marked it, by copy-before-write, in the map of the snapshot newest then (and
        deleting a snapshot folds its map into the older one): the union of the maps
        from `since` up to `until` (excluded) is the answer, holes that were written
        included.  Lazy, a window of the maps at a time, so a caller that wants only a
        prefix reads only that.  The maps are opened by the call and read only by it.
        """
        meta = self.get(name)
        first = meta.snapshot_index(since)
        last = len(meta.snapshots) if until is None else meta.snapshot_index(until)
        if last <= first:
            raise StoreError(f"snapshot {since!r} of {name!r} is not older than snapshot {until!r}")
        maps = []
        try:
            for snapshot in meta.snapshots[first:last]:
                maps.append(os.open(self._map_path(name, snapshot.name), os.O_RDONLY))
            chunks = _chunks(offset, min(length, meta.size - offset))
            end = offset + length
            for window in range(chunks.start, chunks.stop, CHANGE_WINDOW):
                count = min(CHANGE_WINDOW, chunks.stop - window)
                union = 0
                for fd in maps:  # map bytes are 0 or 1: OR them as one big integer
                    union |= int.from_bytes(os.pread(fd, count, window), "little")
                marks = union.to_bytes(count, "little")
                position = window
                for changed, run in itertools.groupby(marks):
                    run_length = sum(1 for _ in run)
                    start = max(offset, position * CHUNK)
                    stop = min(end, (position + run_length) * CHUNK)
                    yield Extent(start, stop - start, bool(changed))
                    position += run_length
        finally:
            for fd in maps:
                os.close(fd)

    def diff(self, name: str, since: str, until: str | None) -> Iterator[tuple[int, int, bool]]:
        """The changed extents of `changes` over the whole volume, as (offset,
        length, zero): `zero` where the newer side reads as zeros there (trimmed or
        never written), so a backup can skip reading it."""
        meta = self.get(name)
        target = os.open(self.image_path(name), os.O_RDONLY) if until is None else None
        image = SnapshotImage(self, meta, until) if until is not None else None
        pending: list[int | bool] | None = None
        try:
            for change in self.changes(name, since, until, 0, meta.size):
                if not change.allocated:
                    continue
                extents = (file_extents(target, change.offset, change.length) if image is None
                           else image.extents(change.offset, change.length))
                for extent in extents:
                    zero = not extent.allocated
                    if pending is not None and pending[2] == zero and pending[0] + pending[1] == extent.offset:
                        pending[1] += extent.length
                        continue
                    if pending is not None:
                        yield tuple(pending)
                    pending = [extent.offset, extent.length, zero]
            if pending is not None:
                yield tuple(pending)
        finally:
            if image is not None:
                image.close()
            if target is not None:
                os.close(target)

    # -- opening ----------------------------------------------------------

    def open_image(self, name: str, read_only: bool = False) -> HeadImage | ReadOnlyHead | SnapshotImage:
        """The image behind an export name: a volume's head, or `VOLUME@SNAP`."""
        meta, snapshot = self.get_export(name)
        if snapshot is not None:
            return SnapshotImage(self, meta, snapshot.name)
        return ReadOnlyHead(self, meta) if read_only else HeadImage(self, meta)



class _MetaWatch:
    """Tells when a volume's metadata has changed, cheaply enough to ask on every write.

    The metadata file is only ever replaced whole (written aside, renamed over it),
    so the file last read is kept open: once replaced it has no name left, which an
    `fstat` sees without resolving any path."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def refresh(self, apply: Callable[[VolumeMeta], None]) -> None:
        """Calls `apply` with the metadata if it changed since `apply` last succeeded
        (the first call: always).  The change counts as seen only once `apply`
        returns: when it raises, the next call offers the same change again."""
        while self._fd is None or not os.fstat(self._fd).st_nlink:
            with open(self._path, "rb") as file:
                try:
                    apply(VolumeMeta.from_json(json.loads(file.read())))
                except FileNotFoundError:
                    if os.fstat(file.fileno()).st_nlink:
                        raise  # the metadata names files that are not there
                    continue  # a snapshot went away while we read: look again
                fd = os.dup(file.fileno())
            self.close()
            self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _SnapshotFiles:
    """One snapshot's preserved chunks and its map."""

    def __init__(self, store: Store, name: str, snapshot: str, writable: bool = False) -> None:
        mode = os.O_RDWR if writable else os.O_RDONLY
        self.snapshot = snapshot
        self._image_path = store.image_path(name, snapshot)
        self.image = os.open(self._image_path, mode)
        try:
            self.map = os.open(store._map_path(name, snapshot), mode)
        except BaseException:
            os.close(self.image)
            raise

    def read_map(self, first_chunk: int, count: int) -> bytes:
        return os.pread(self.map, count, first_chunk)

    def replaced(self) -> bool:
        """Whether the snapshot's name now stands for other files: a snapshot
        deleted and taken again under the same name."""
        try:
            return os.stat(self._image_path).st_ino != os.fstat(self.image).st_ino
        except FileNotFoundError:
            return True

    def preserve(self, source: int, chunks: Sequence[int], size: int) -> None:
        """Copies `chunks` of `source` (a file of `size` bytes) here and marks them
        preserved, in that order: a chunk is marked only once its copy is wholly
        written and durable, so a failure anywhere leaves it unmarked, and the
        caller must not overwrite what it was copying.

        Other processes may write the same head, each with its own copy of the map:
        under a lock on the chunks' bytes of the map, the ones another process
        preserved meanwhile are skipped, since copying them again would copy its new
        data.  Afterwards every one of `chunks` is preserved."""
        if not chunks:
            return
        first, count = chunks[0], chunks[-1] + 1 - chunks[0]
        with _range_locked(self.map, first, count):
            marks = self.read_map(first, count)
            self._copy(source, [c for c in chunks if not marks[c - first]], size)

    def _copy(self, source: int, chunks: Sequence[int], size: int) -> None:
        if not chunks:
            return
        for chunk in chunks:
            start = chunk * CHUNK
            length = min(CHUNK, size - start)
            data = os.pread(source, length, start)
            if len(data) != length:
                raise OSError(errno.EIO, f"short read of chunk {chunk} to preserve")
            if data != _ZEROES[:length]:  # a zero chunk stays a hole in the snapshot
                write_all(self.image, [data], start)
        # The copies must be durable before they are marked, and the marks before
        # the source is overwritten, or a crash could leave the snapshot pointing
        # at new data.
        os.fdatasync(self.image)
        for chunk in chunks:
            write_all(self.map, [b"\1"], chunk)
        os.fdatasync(self.map)

    def close(self) -> None:
        os.close(self.image)
        os.close(self.map)

    def __enter__(self) -> _SnapshotFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(offset: int, length: int) -> range:
    return range(offset // CHUNK, -(-(offset + length) // CHUNK))


def file_extents(fd: int, offset: int, length: int) -> Iterator[Extent]:
    """Allocated and unallocated runs of a sparse file covering [offset, offset + length)."""
    end = offset + length
    while offset < end:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno != errno.ENXIO:  # ENXIO: no data past offset
                raise
            data = end
        if data > offset:
            yield Extent(offset, min(data, end) - offset, False)
            offset = min(data, end)
            continue
        hole = min(os.lseek(fd, offset, os.SEEK_HOLE), end)
        yield Extent(offset, hole - offset, True)
        offset = hole


class _Image:
    """What every image kind shares: the head file, its size, shared-lock lifetime;
    read-only unless a kind says otherwise."""

    writable = False

    def __init__(self, store: Store, meta: VolumeMeta, path: Path, mode: int) -> None:
        self._store = store
        self.name = meta.name
        self.size = meta.size
        self._head = os.open(store.image_path(meta.name), mode)
        self._own = os.open(path, os.O_RDONLY)
        fcntl.flock(self._own, fcntl.LOCK_SH)  # `delete` refuses a served image
        self._meta = _MetaWatch(store._meta_path(meta.name))
        self._aio: AioContext | None = None  # made by the first `transfers`, on its thread
        self._aio_tried = False

    def batch(self) -> contextlib.AbstractContextManager:
        """Several I/Os as one for the barrier; only a writable head needs it."""
        return contextlib.nullcontext()

    def idle(self) -> None:
        """Nothing more is queued: what a batch kept for the next one is let go."""

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
        return os.preadv(self._head, buffers, offset)

    def writev(self, buffers: Sequence[bytes | memoryview], offset: int) -> None:
        raise OSError(errno.EROFS, f"{self.name} is open read-only")

    def transfers(self, transfers: Sequence[Transfer]) -> list[int]:
        """Reads and writes of one buffer each, in order: each one's byte count (a read
        reaching past the end of the file is short, a write is whole), or -errno.

        The head's bytes are the file's, so the batch goes to the kernel in one
        system call (pfnbd/aio.py) where it has native AIO, else one call each.
        Threads: the one thread that runs a volume's batches."""
        aio = self._batcher()
        if aio is None or any(is_write for is_write, _, _ in transfers):
            return [self._transfer(*transfer) for transfer in transfers]
        return aio.run(self._head, transfers)

    def _transfer(self, is_write: bool, buffer: memoryview, offset: int) -> int:
        try:
            if is_write:
                self.writev([buffer], offset)
                return len(buffer)
            return self.readv([buffer], offset)
        except OSError as error:
            return -(error.errno or errno.EIO)

    def _batcher(self) -> AioContext | None:
        if not self._aio_tried:
            self._aio_tried = True
            try:
                self._aio = AioContext(AIO_CAPACITY)
            except OSError as error:  # seccomp, aio-max-nr reached, another CPU family
                log.warning("%s: no native AIO (%s): one system call per I/O", self.name, error)
        return self._aio

    def punch_hole(self, offset: int, length: int) -> None:
        raise OSError(errno.EROFS, f"{self.name} is open read-only")

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        return file_extents(self._head, offset, length)

    def sync(self) -> None:
        pass  # nothing to make durable: nothing is written through a read-only image

    def close(self) -> None:
        if self._aio is not None:
            self._aio.close()
        self._meta.close()
        os.close(self._head)
        os.close(self._own)


class ReadOnlyHead(_Image):
    """A volume's live bytes, for reading only.

    It takes none of the writer's locks and creates no file, so it works on a
    read-only data directory and never keeps a writer (in this process or another)
    out.  Reading a head another process writes is what reading a file under a
    writer is: each block is old or new, as with `qemu-nbd -r` on a file."""

    def __init__(self, store: Store, meta: VolumeMeta) -> None:
        super().__init__(store, meta, store.image_path(meta.name), os.O_RDONLY)


class HeadImage(_Image):
    """A volume's live bytes; writes copy what a snapshot still needs first.

    Threads: writes, and the newest snapshot's files they open and close, run on one
    thread (the volume's `vol_proc`); `extents` may run on another, but it uses only
    the head's descriptor, which lives as long as the image."""

    writable = True

    def __init__(self, store: Store, meta: VolumeMeta) -> None:
        held = store._held_writers.get(meta.name)
        self._writer = os.dup(held) if held is not None else store._take_writer(meta.name)
        super().__init__(store, meta, store.image_path(meta.name), os.O_RDWR)
        self._barrier = os.open(store._barrier_path(meta.name), os.O_RDWR | os.O_CREAT, 0o644)
        self._newest: _SnapshotFiles | None = None
        self._newest_map = bytearray()
        self._batching = False
        self._barrier_held = False
        self._barrier_taken = 0.0
        try:
            self._refresh()
        except BaseException:
            self.close()
            raise

    def _refresh(self) -> None:
        """Picks up snapshots taken or deleted since the last write (by any process).

        The new snapshot's files are opened and read before the old ones are let
        go: if that fails the write fails, and the next write tries again, so no
        write ever goes to the head without what the newest snapshot needs."""
        self._meta.refresh(self._use_snapshots)

    def _use_snapshots(self, meta: VolumeMeta) -> None:
        newest, newest_map = None, bytearray()
        if meta.snapshots:
            newest = _SnapshotFiles(self._store, self.name, meta.snapshots[-1].name, writable=True)
            try:
                newest_map = bytearray(newest.read_map(0, meta.chunks))
            except BaseException:
                newest.close()
                raise
        if self._newest is not None:
            self._newest.close()
        self._newest, self._newest_map = newest, newest_map

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Several I/Os as one for the barrier: taken at the first write, and kept for
        the next batch while the volume stays busy (until `idle`), but never longer
        than BARRIER_HOLD_LIMIT, so a snapshot waits at most about that long.

        Reads never take it, so a batch of reads costs no lock."""
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
            if time.monotonic() - self._barrier_taken > BARRIER_HOLD_LIMIT:
                self._release_barrier()

    def idle(self) -> None:
        self._release_barrier()

    def _hold_barrier(self) -> None:
        if not self._barrier_held:
            fcntl.flock(self._barrier, fcntl.LOCK_SH)
            self._barrier_held = True
            self._barrier_taken = time.monotonic()
            try:
                self._refresh()
            except BaseException:
                # Never held with snapshots not picked up: a write that found the
                # barrier held would skip preserving what a snapshot taken meanwhile needs.
                self._release_barrier()
                raise

    def _release_barrier(self) -> None:
        if self._barrier_held:
            self._barrier_held = False
            fcntl.flock(self._barrier, fcntl.LOCK_UN)

    # Every write is bracketed by these two.  (Not a generator context manager: on a
    # 4 KiB write that would cost more than the `pwritev` itself.)
    def _begin_write(self, offset: int, length: int) -> None:
        """Holds the barrier and preserves, for the newest snapshot, what is overwritten."""
        self._begin_writes([(offset, length)])

    def _begin_writes(self, spans: Iterable[tuple[int, int]]) -> None:
        """`_begin_write` for several writes, (offset, length) each: their chunks are
        preserved together, with one pair of fdatasyncs for all of them."""
        self._hold_barrier()
        try:
            self._preserve(spans)
        except BaseException:
            self._end_write()
            raise

    def _end_write(self) -> None:
        if not self._batching:
            self._release_barrier()

    def _preserve(self, spans: Iterable[tuple[int, int]]) -> None:
        """Copies, for the newest snapshot, the chunks of `spans` it still needs."""
        snapshot = self._newest
        if snapshot is None:
            return
        chunks = sorted({chunk for offset, length in spans for chunk in _chunks(offset, length)})
        needed = [c for c in chunks if not self._newest_map[c]]
        snapshot.preserve(self._head, needed, self.size)
        for chunk in needed:
            self._newest_map[chunk] = 1

    def writev(self, buffers: Sequence[bytes | memoryview], offset: int) -> None:
        self._begin_write(offset, sum(map(len, buffers)))
        try:
            write_all(self._head, buffers, offset)
        finally:
            self._end_write()

    def transfers(self, transfers: Sequence[Transfer]) -> list[int]:
        """As `_Image.transfers`, the writes' copy-before-write done first, in order:
        a write whose preserving fails fails alone, without reaching the head."""
        aio = self._batcher()
        if aio is None:
            return super().transfers(transfers)
        if not any(is_write for is_write, _, _ in transfers):  # nothing to preserve or hold
            return aio.run(self._head, transfers)
        # The writes' chunks preserved at once, one pair of fdatasyncs for the batch
        # (after a snapshot most writes have a chunk to preserve).
        try:
            self._begin_writes((offset, len(buffer)) for is_write, buffer, offset in transfers if is_write)
        except OSError:  # each write again on its own, so that a failure fails only the writes it is of
            return self._transfers_begun_each(aio, transfers)
        try:
            return self._whole_writes(transfers, aio.run(self._head, transfers))
        finally:
            self._end_write()  # once for the batch: it only lets the barrier go, and idempotently

    def _transfers_begun_each(self, aio: AioContext, transfers: Sequence[Transfer]) -> list[int]:
        """`transfers` with each write begun on its own: one that cannot be fails alone."""
        begun, results = [], [0] * len(transfers)
        for index, (is_write, buffer, offset) in enumerate(transfers):
            # Once the barrier is held and no snapshot needs preserving, `_begin_write`
            # has nothing left to do for the batch's other writes.
            if is_write and (not self._barrier_held or self._newest is not None):
                try:
                    self._begin_write(offset, len(buffer))
                except OSError as error:
                    results[index] = -(error.errno or errno.EIO)
                    continue
            begun.append(index)
        try:
            chosen = [transfers[index] for index in begun]
            for index, result in zip(begun, self._whole_writes(chosen, aio.run(self._head, chosen))):
                results[index] = result
        finally:
            self._end_write()
        return results

    def _whole_writes(self, transfers: Sequence[Transfer], results: list[int]) -> list[int]:
        """`results` of `transfers`, each short write (as `pwritev` may be, begun already)
        written to its end or failed."""
        for index, ((is_write, buffer, offset), result) in enumerate(zip(transfers, results)):
            if is_write and 0 <= result < len(buffer):
                try:
                    write_all(self._head, [buffer[result:]], offset + result)
                    results[index] = len(buffer)
                except OSError as error:
                    results[index] = -(error.errno or errno.EIO)
        return results

    def punch_hole(self, offset: int, length: int) -> None:
        self._begin_write(offset, length)
        try:
            if offset + length == self.size:
                # The file's last block reaches past the volume's end; only a punch
                # of the whole block frees it (KEEP_SIZE keeps the file's length).
                block = os.fstat(self._head).st_blksize
                length = -(-self.size // block) * block - offset
            if _libc.fallocate(self._head, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        finally:
            self._end_write()

    def sync(self) -> None:
        os.fdatasync(self._head)

    def close(self) -> None:
        """Makes every write durable (a clean stop loses nothing), then lets go."""
        try:
            self.sync()
        finally:
            if self._newest is not None:
                self._newest.close()
            os.close(self._barrier)
            super().close()
            os.close(self._writer)


class SnapshotImage(_Image):
    """A snapshot's bytes, read-only, resolved chunk by chunk.

    Its layer files are opened and closed as snapshots come and go, from whichever
    thread asks: reads run on the volume's `vol_proc`, extents on the caller's (the
    trio) thread.  `_lock` owns the layer descriptors: every open, use and close of
    one is under it, so no thread closes a descriptor another is still using (its
    number could by then be a socket or a head image)."""

    # Extents are resolved this many chunks at a time, lazily: a caller that needs
    # a prefix of a huge range (BLOCK_STATUS caps its answer) pays for the prefix.
    EXTENT_WINDOW = 1024

    def __init__(self, store: Store, meta: VolumeMeta, snapshot: str) -> None:
        super().__init__(store, meta, store.image_path(meta.name, snapshot), os.O_RDONLY)
        self.snapshot = snapshot
        self._lock = threading.Lock()
        self._files: dict[str, _SnapshotFiles] = {}
        self._layers: list[_SnapshotFiles] = []

    def transfers(self, transfers: Sequence[Transfer]) -> list[int]:
        """One at a time: each read is resolved chunk by chunk across the layers."""
        return [self._transfer(*transfer) for transfer in transfers]

    def _current_layers(self) -> list[_SnapshotFiles]:
        """This snapshot and every newer one, oldest first, as the metadata says now."""
        self._meta.refresh(self._use_layers)
        return self._layers

    def _use_layers(self, meta: VolumeMeta) -> None:
        names = [s.name for s in meta.snapshots[meta.snapshot_index(self.snapshot):]]
        for name in names:
            if name in self._files and self._files[name].replaced():
                self._files.pop(name).close()
            if name not in self._files:
                self._files[name] = _SnapshotFiles(self._store, self.name, name)
        for gone in set(self._files) - set(names):
            self._files.pop(gone).close()
        self._layers = [self._files[name] for name in names]

    def _sources(self, first_chunk: int, count: int) -> list[int | None]:
        """For each chunk, the file descriptor that holds this snapshot's data for it.

        The head is read last and its answer validated: a head write may preserve a
        chunk in a newer snapshot at any moment, but it preserves before it
        overwrites, so a second look at the maps after reading the head is enough.
        """
        sources: list[int | None] = [None] * count
        for layer in self._current_layers():
            preserved = layer.read_map(first_chunk, count)
            for i in range(count):
                if sources[i] is None and preserved[i]:
                    sources[i] = layer.image
        return sources

    def _resolved(self, offset: int, length: int, read_head: Callable[[], T]) -> tuple[list[int | None], T | None]:
        """Each chunk's source, and what `read_head` gave if any chunk comes from the head."""
        chunks = _chunks(offset, length)
        while True:
            sources = self._sources(chunks.start, len(chunks))
            if None in sources:
                result = read_head()
                if self._sources(chunks.start, len(chunks)) != sources:
                    continue  # a head write preserved a chunk meanwhile: look again
            else:
                result = None
            return sources, result

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            return self._read_locked(offset, length)

    def _read_locked(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        sources, head_data = self._resolved(offset, length, lambda: os.pread(self._head, length, offset))
        for index, chunk in enumerate(_chunks(offset, length)):
            start = max(offset, chunk * CHUNK)
            end = min(offset + length, (chunk + 1) * CHUNK)
            if sources[index] is None:
                out[start - offset : end - offset] = head_data[start - offset : end - offset]
            else:
                out[start - offset : end - offset] = os.pread(sources[index], end - start, start)
        return bytes(out)

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
        data = self.read(offset, sum(map(len, buffers)))
        position = 0
        for buffer in buffers:
            buffer[:] = data[position : position + len(buffer)]
            position += len(buffer)
        return len(data)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        for start, count in self._windows(offset, length):
            yield from self._window_extents(start, count)

    def _windows(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """A range cut at every EXTENT_WINDOW chunks: (offset, length) each."""
        end = offset + length
        while offset < end:
            window_end = min(end, (offset // CHUNK + self.EXTENT_WINDOW) * CHUNK)
            yield offset, window_end - offset
            offset = window_end

    def _window_extents(self, offset: int, length: int) -> list[Extent]:
        """The extents of a range of at most EXTENT_WINDOW chunks, each run of chunks
        with one source asked of that source once."""
        with self._lock:
            sources, head_extents = self._resolved(
                offset, length, lambda: list(file_extents(self._head, offset, length)))
            extents: list[Extent] = []
            run_start = offset
            for source, run in itertools.groupby(sources):
                run_end = min(offset + length, (run_start // CHUNK + len(list(run))) * CHUNK)
                if source is not None:
                    extents.extend(file_extents(source, run_start, run_end - run_start))
                else:
                    for extent in head_extents:
                        lo, hi = max(run_start, extent.offset), min(run_end, extent.offset + extent.length)
                        if lo < hi:
                            extents.append(Extent(lo, hi - lo, extent.allocated))
                run_start = run_end
            return extents

    def depths(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """(length, depth) runs: where each byte of this snapshot comes from, as
        QEMU's `qemu:allocation-depth` counts: 1 for what it preserved itself, 2 and
        up for each newer snapshot's preserved chunks, then the head; 0 where the head
        it reads through was never written.  A window at a time, as `extents`."""
        for start, count in self._windows(offset, length):
            yield from self._window_depths(start, count)

    def _window_depths(self, offset: int, length: int) -> list[tuple[int, int]]:
        with self._lock:
            layers = self._current_layers()
            depth_of = {layer.image: depth for depth, layer in enumerate(layers, 1)}
            head_depth = len(layers) + 1
            sources, head_extents = self._resolved(
                offset, length, lambda: list(file_extents(self._head, offset, length)))
            depths = []
            for index, chunk in enumerate(_chunks(offset, length)):
                start = max(offset, chunk * CHUNK)
                end = min(offset + length, (chunk + 1) * CHUNK)
                if sources[index] is not None:
                    depths.append((end - start, depth_of[sources[index]]))
                    continue
                for extent in head_extents:
                    lo, hi = max(start, extent.offset), min(end, extent.offset + extent.length)
                    if lo < hi:
                        depths.append((hi - lo, head_depth if extent.allocated else 0))
            return depths

    def close(self) -> None:
        with self._lock:
            for files in self._files.values():
                files.close()
            super().close()
