"""Volume import and export without a server, sparse-aware both ways.

Raw files are copied here, extent by extent, skipping holes and all-zero blocks so a
sparse file stays sparse.  Other formats (qcow2, vmdk, ...) go through `qemu-img
convert` when it is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ContextManager

from .store import (
    SECTOR, HeadImage, SnapshotImage, Store, StoreError, VolumeExists, check_name, file_extents,
    write_all,
)

BLOCK = 1 << 20
_ZEROES = bytes(BLOCK)

Progress = Callable[[int], None]  # called with the bytes just covered
# Starts progress reporting for a total, once the work is sure to begin: a refusal
# must come alone, with no progress output before it.
StartProgress = Callable[[int], ContextManager[Progress]]


def _data_blocks(extents, read: Callable[[int, int], bytes]) -> Iterator[tuple[int, bytes]]:
    """(offset, data) for every block of allocated extents that is not all zeros."""
    for extent in extents:
        if not extent.allocated:
            continue
        for start in range(extent.offset, extent.offset + extent.length, BLOCK):
            data = read(start, min(BLOCK, extent.offset + extent.length - start))
            if data != _ZEROES[: len(data)]:
                yield start, data


def image_format(path: Path) -> tuple[str, int]:
    """(format, virtual size) of a disk image; raw when qemu-img is not there to ask."""
    if shutil.which("qemu-img") is None:
        return "raw", path.stat().st_size
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise StoreError(f"cannot read {path}: {result.stderr.strip().splitlines()[-1]}")
    info = json.loads(result.stdout)
    return info["format"], info["virtual-size"]


def import_volume(store: Store, name: str, source: Path, start_progress: StartProgress,
                  replicas: int = 1) -> int:
    """Creates volume `name` from a disk image; returns the volume size.

    The data goes to a staging file that becomes the volume's image once complete and
    on disk: an import killed midway leaves no volume, only that file, which the next
    import of the name replaces.
    """
    check_name(name)
    if any(volume.name == name for volume in store.list()):
        raise VolumeExists(f"volume {name!r} already exists")
    fmt, size = image_format(source)
    size = -(-size // SECTOR) * SECTOR  # volumes are whole sectors
    staging = store.image_path(name).with_name(f".{name}.import")
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            with start_progress(source.stat().st_size) as progress:
                if fmt == "raw":
                    _copy_raw_in(source, fd, progress)
                else:
                    _convert_in(source, fmt, staging)
                    progress(source.stat().st_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        meta = store.create(name, size, replicas, prepared=staging)
    finally:
        staging.unlink(missing_ok=True)  # gone already once it is the volume's image
    return meta.size


def _copy_raw_in(source: Path, target: int, progress: Progress) -> None:
    fd = os.open(source, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        covered = 0
        for offset, data in _data_blocks(file_extents(fd, 0, size), lambda o, n: os.pread(fd, n, o)):
            write_all(target, [data], offset)
            progress(offset + len(data) - covered)
            covered = offset + len(data)
        progress(size - covered)
    finally:
        os.close(fd)


def _convert_in(source: Path, fmt: str, target: Path) -> None:
    # The staging file is new and of the volume's size: qemu-img need not write zeros.
    result = subprocess.run(
        ["qemu-img", "convert", "-n", "--target-is-zero", "-f", fmt, "-O", "raw",
         str(source), str(target)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise StoreError(f"qemu-img convert failed: {result.stderr.strip()}")


def export_volume(store: Store, name: str, target: Path, start_progress: StartProgress,
                  force: bool = False) -> int:
    """Writes a volume (or `VOLUME@SNAP`) to a sparse raw file; returns its size."""
    if target.exists() and not force:
        raise StoreError(f"{target} exists: give --force to overwrite it")
    image = store.open_image(name)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with start_progress(image.size) as progress:
                _copy_out(image, fd, progress)
        finally:
            os.close(fd)
        return image.size
    finally:
        image.close()


def _copy_out(image: HeadImage | SnapshotImage, fd: int, progress: Progress) -> None:
    os.ftruncate(fd, image.size)
    covered = 0

    def read(offset: int, length: int) -> bytes:
        buffer = memoryview(bytearray(length))
        image.readv([buffer], offset)
        return bytes(buffer)

    for offset, data in _data_blocks(image.extents(0, image.size), read):
        write_all(fd, [data], offset)
        progress(offset + len(data) - covered)
        covered = offset + len(data)
    progress(image.size - covered)
    os.fsync(fd)
