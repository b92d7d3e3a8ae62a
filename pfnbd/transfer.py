"""Volume import and export without a server, sparse-aware both ways.

Raw files are copied here, extent by extent, skipping holes and all-zero blocks so a
sparse file stays sparse.  Other formats (qcow2, vmdk, ...) go through `qemu-img
convert` when it is installed.  On a real PureFlash cluster the volume is created
through the conductor and its data goes through the client library, by the same
`VolumeBridge` `pfnbd serve` uses; the library reports every byte allocated, so on the
way out zero blocks are skipped by their content alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import ContextManager, TypeVar

import trio

from .conductor import Conductor
from .store import (
    SECTOR, Extent, Store, StoreError, VolumeExists, check_name, file_extents, split_snapshot_name,
    write_all,
)
from .volume import VolumeBackend, VolumeBridge, VolumeClient

T = TypeVar("T")

BLOCK = 1 << 20
_ZEROES = bytes(BLOCK)

Progress = Callable[[int], None]  # called with the bytes just covered
Write = Callable[[int, bytes], None]  # (offset, data)
Read = Callable[[int, int], bytes]  # (offset, length) -> data
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
                    _copy_raw_in(source, lambda offset, data: write_all(fd, [data], offset), progress)
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


def _copy_raw_in(source: Path, write: Write, progress: Progress) -> None:
    fd = os.open(source, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        covered = 0
        for offset, data in _data_blocks(file_extents(fd, 0, size), lambda o, n: os.pread(fd, n, o)):
            write(offset, data)
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


def import_cluster_volume(conductor: Conductor, client: VolumeClient, name: str, source: Path,
                          start_progress: StartProgress, replicas: int = 1) -> int:
    """Creates volume `name` on a real cluster from a disk image; returns its size.

    The conductor creates the volume, then the library writes what is not zeros (a new
    volume reads as zeros).  An import that fails once the volume exists deletes it:
    a failed import leaves no half-written volume behind."""
    fmt, size = image_format(source)
    size = -(-size // SECTOR) * SECTOR
    with _raw_image(source, fmt, size) as raw:
        conductor.create(name, size, replicas)
        try:
            volume = client.open_volume(name)
            try:
                with start_progress(source.stat().st_size) as progress:
                    def copy(call: Callable[..., object]) -> None:
                        _copy_raw_in(raw, lambda offset, data: call(VolumeBridge.write, offset, memoryview(data)),
                                     progress if raw == source else lambda _: None)
                        call(VolumeBridge.flush)

                    _with_bridge(volume, copy)
                    if raw != source:
                        progress(source.stat().st_size)
            finally:
                volume.close()
        except BaseException:
            conductor.delete(name)
            raise
    return size


@contextlib.contextmanager
def _raw_image(source: Path, fmt: str, size: int) -> Iterator[Path]:
    """`source` itself when it is raw, else a sparse raw conversion of it, deleted after."""
    if fmt == "raw":
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="pfnbd-import-") as scratch:
        raw = Path(scratch) / "image.raw"
        with open(raw, "wb") as staging:
            staging.truncate(size)
        _convert_in(source, fmt, raw)
        yield raw


def _with_bridge(volume: VolumeBackend, work: Callable[[Callable[..., object]], T]) -> T:
    """Runs `work(call)` in a worker thread of a trio run with a bridge on `volume`:
    `call(VolumeBridge.method, *args)` runs that bridge operation in trio and returns
    what it returns, so a plain loop drives the same submits, retries and callbacks as
    the server."""

    async def main() -> T:
        bridge = VolumeBridge(volume)

        def call(operation, *args):
            return trio.from_thread.run(operation, bridge, *args)

        return await trio.to_thread.run_sync(work, call)

    return trio.run(main)


def export_volume(store: Store, name: str, target: Path, start_progress: StartProgress,
                  force: bool = False) -> int:
    """Writes a volume (or `VOLUME@SNAP`) to a sparse raw file; returns its size."""
    _refuse_existing(target, force)
    image = store.open_image(name)
    try:
        def read(offset: int, length: int) -> bytes:
            buffer = memoryview(bytearray(length))
            image.readv([buffer], offset)
            return bytes(buffer)

        _write_export(target, image.size, image.extents(0, image.size), read, start_progress)
        return image.size
    finally:
        image.close()


def export_cluster_volume(client: VolumeClient, name: str, target: Path, start_progress: StartProgress,
                          force: bool = False) -> int:
    """Writes a real cluster's volume (or `VOLUME@SNAP`) to a sparse raw file."""
    _refuse_existing(target, force)
    volume = client.open_volume(*split_snapshot_name(name))
    try:
        _with_bridge(volume, lambda call: _write_export(
            target, volume.size, volume.allocation(0, volume.size),
            lambda offset, length: bytes(call(VolumeBridge.read, offset, length)), start_progress))
        return volume.size
    finally:
        volume.close()


def _refuse_existing(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise StoreError(f"{target} exists: give --force to overwrite it")


def _write_export(target: Path, size: int, extents: Iterable[Extent], read: Read,
                  start_progress: StartProgress) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with start_progress(size) as progress:
            os.ftruncate(fd, size)
            covered = 0
            for offset, data in _data_blocks(extents, read):
                write_all(fd, [data], offset)
                progress(offset + len(data) - covered)
                covered = offset + len(data)
            progress(size - covered)
            os.fsync(fd)
    finally:
        os.close(fd)
