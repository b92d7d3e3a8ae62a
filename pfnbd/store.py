"""The embedded cluster's storage: volumes as sparse files plus atomic metadata.

Layout under the data directory::

    volumes/NAME.json   metadata, replaced atomically (write, fsync, rename, fsync dir)
    volumes/NAME.img    the volume's bytes, a sparse file: never-written space is a hole

The metadata file is the commit point: a volume exists once its JSON is in place, and
is gone once it is removed.  A served volume holds a shared lock on its image so that
`delete` can refuse it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import errno
import fcntl
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

SECTOR = 512
MAX_NAME_LENGTH = 96  # PureFlash's limit on volume names
VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


SUFFIX_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


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


def check_volume_name(name: str) -> None:
    if not VOLUME_NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise StoreError(
            f"invalid volume name {name!r}: use up to {MAX_NAME_LENGTH} letters, digits, "
            "'_', '.' or '-', starting with a letter or digit"
        )


@attrs.frozen
class VolumeMeta:
    name: str
    size: int
    id: int
    replicas: int = 1
    created: str = ""

    def to_json(self) -> dict:
        return attrs.asdict(self)

    def describe(self) -> str:
        replicas = "replica" if self.replicas == 1 else "replicas"
        return f"PureFlash volume {self.name}, {human_size(self.size)}, {self.replicas} {replicas}"


@attrs.frozen
class Extent:
    offset: int
    length: int
    allocated: bool


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
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


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._volumes = self.root / "volumes"

    def _meta_path(self, name: str) -> Path:
        return self._volumes / f"{name}.json"

    def image_path(self, name: str) -> Path:
        return self._volumes / f"{name}.img"

    def _locked(self) -> "_DirectoryLock":
        self._volumes.mkdir(parents=True, exist_ok=True)
        return _DirectoryLock(self._volumes / ".lock")

    def create(self, name: str, size: int, replicas: int = 1) -> VolumeMeta:
        check_volume_name(name)
        if size <= 0 or size % SECTOR:
            raise StoreError(f"volume size must be a positive multiple of {SECTOR} bytes, not {size}")
        if not 1 <= replicas <= 3:
            raise StoreError("replica count must be 1, 2 or 3")
        with self._locked():
            if self._meta_path(name).exists():
                raise VolumeExists(f"volume {name!r} already exists")
            next_id = 1 + max((v.id for v in self.list()), default=0)
            with open(self.image_path(name), "wb") as image:
                image.truncate(size)
                os.fsync(image.fileno())
            meta = VolumeMeta(
                name, size, next_id, replicas,
                datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            )
            _write_atomically(self._meta_path(name), json.dumps(meta.to_json()).encode())
            return meta

    def get(self, name: str) -> VolumeMeta:
        try:
            return VolumeMeta(**json.loads(self._meta_path(name).read_bytes()))
        except FileNotFoundError:
            raise VolumeNotFound(f"no volume named {name!r}") from None

    def list(self) -> list[VolumeMeta]:
        if not self._volumes.is_dir():
            return []
        return sorted(
            (self.get(path.stem) for path in self._volumes.glob("*.json")), key=lambda v: v.name
        )

    def delete(self, name: str) -> None:
        with self._locked():
            self.get(name)
            fd = os.open(self.image_path(name), os.O_RDONLY)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise VolumeBusy(f"volume {name!r} is being served") from None
                self._meta_path(name).unlink()
                _fsync_directory(self._volumes)
                self.image_path(name).unlink()
            finally:
                os.close(fd)

    def open_image(self, name: str, writable: bool) -> "Image":
        meta = self.get(name)
        return Image(self.image_path(name), meta.size, writable)


class _DirectoryLock:
    """Serialises create/delete between processes sharing a data directory."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __enter__(self) -> None:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


class Image:
    """One volume's bytes.  Offsets and lengths are the caller's to bound-check."""

    def __init__(self, path: Path, size: int, writable: bool) -> None:
        self.size = size
        self.writable = writable
        self._fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        fcntl.flock(self._fd, fcntl.LOCK_SH)  # `volume delete` refuses a served volume

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
        return os.preadv(self._fd, buffers, offset)

    def writev(self, buffers: Sequence[bytes | memoryview], offset: int) -> int:
        return os.pwritev(self._fd, buffers, offset)

    def punch_hole(self, offset: int, length: int) -> None:
        if _libc.fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Allocated and unallocated runs covering [offset, offset + length)."""
        end = offset + length
        while offset < end:
            try:
                data = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno != errno.ENXIO:  # ENXIO: no data past offset
                    raise
                data = end
            if data > offset:
                yield Extent(offset, min(data, end) - offset, False)
                offset = min(data, end)
                continue
            hole = min(os.lseek(self._fd, offset, os.SEEK_HOLE), end)
            yield Extent(offset, hole - offset, True)
            offset = hole

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)
