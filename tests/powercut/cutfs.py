"""A FUSE file system that loses, on a power cut, everything not yet synced.

`python3 cutfs.py BACKING MOUNTPOINT` serves BACKING at MOUNTPOINT in the
foreground.  Names (create, mkdir, rename, link, unlink) reach BACKING at once,
as a journaling file system commits them; a file's *contents and size* reach it
only when someone calls fsync or fdatasync on that file.  Until then the written
pages and the new size live in this process's memory, per inode, and reads see
them.  Killing this process with SIGKILL is the power cut: the memory is gone,
BACKING holds exactly what was synced.

Not modelled: a directory that needs its own fsync for a rename to last (renames
last at once here), fallocate (fusepy has no such operation: the kernel answers
EOPNOTSUPP), and SEEK_DATA/SEEK_HOLE (the kernel reports the whole file as data).
"""

from __future__ import annotations

import errno
import os
import sys
import threading

import attrs
from fuse import FUSE, FuseOSError, Operations

PAGE = 4096


@attrs.define
class Unsynced:
    """What one inode holds in memory: whole dirty pages and the size as written."""

    size: int
    backing_limit: int  # backing bytes at or past this offset were truncated away
    pages: dict[int, bytearray] = attrs.field(factory=dict)


class CutFS(Operations):
    def __init__(self, backing: str) -> None:
        self.backing = os.path.realpath(backing)
        self.guard = threading.Lock()  # one lock over every inode's Unsynced
        self.unsynced: dict[int, Unsynced] = {}

    def _path(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _state(self, fd: int) -> Unsynced:
        stat = os.fstat(fd)
        return self.unsynced.setdefault(stat.st_ino, Unsynced(stat.st_size, stat.st_size))

    def _backing_page(self, fd: int, state: Unsynced, index: int) -> bytearray:
        start = index * PAGE
        page = bytearray(os.pread(fd, PAGE, start)) if start < state.backing_limit else bytearray()
        del page[max(0, state.backing_limit - start):]
        return page + bytes(PAGE - len(page))

    def _page(self, fd: int, state: Unsynced, index: int) -> bytes:
        return state.pages.get(index) or self._backing_page(fd, state, index)

    def _forget(self, path: str) -> None:
        """An unlinked or replaced file's last name is gone: so is its unsynced state."""
        try:
            stat = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.st_nlink <= 1:
            self.unsynced.pop(stat.st_ino, None)

    # -- names: straight through ------------------------------------------

    def getattr(self, path, fh=None):
        stat = os.fstat(fh) if fh is not None else os.lstat(self._path(path))
        fields = {key: getattr(stat, key) for key in (
            "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime", "st_ctime",
            "st_blocks", "st_ino")}
        with self.guard:
            state = self.unsynced.get(stat.st_ino)
            if state is not None:
                fields["st_size"] = state.size
        return fields

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._path(path))]

    def access(self, path, amode):
        if not os.access(self._path(path), amode):
            raise FuseOSError(errno.EACCES)

    def mkdir(self, path, mode):
        os.mkdir(self._path(path), mode)

    def rmdir(self, path):
        os.rmdir(self._path(path))

    def unlink(self, path):
        with self.guard:
            self._forget(self._path(path))
            os.unlink(self._path(path))

    def rename(self, old, new):
        with self.guard:
            self._forget(self._path(new))
            os.rename(self._path(old), self._path(new))

    def link(self, target, source):
        os.link(self._path(source), self._path(target))

    def symlink(self, target, source):
        os.symlink(source, self._path(target))

    def readlink(self, path):
        return os.readlink(self._path(path))

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._path(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._path(path), times)

    def statfs(self, path):
        stat = os.statvfs(self._path(path))
        return {key: getattr(stat, key) for key in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
            "f_frsize", "f_namemax")}

    # -- contents: in memory until synced ---------------------------------

    def open(self, path, flags):
        fd = os.open(self._path(path), flags & ~(os.O_TRUNC | os.O_APPEND | os.O_DIRECT))
        if flags & os.O_TRUNC:
            self.truncate(path, 0, fd)
        return fd

    def create(self, path, mode, fi=None):
        return os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)

    def release(self, path, fh):
        os.close(fh)

    def flush(self, path, fh):
        pass  # close(2) is not a sync

    def read(self, path, size, offset, fh):
        with self.guard:
            state = self.unsynced.get(os.fstat(fh).st_ino)
            if state is None:
                return os.pread(fh, size, offset)
            end = min(offset + size, state.size)
            if end <= offset:
                return b""
            pages = b"".join(self._page(fh, state, i) for i in range(offset // PAGE, -(-end // PAGE)))
            start = offset - offset // PAGE * PAGE
            return pages[start : start + end - offset]

    def write(self, path, data, offset, fh):
        with self.guard:
            state = self._state(fh)
            end = offset + len(data)
            for index in range(offset // PAGE, -(-end // PAGE)):
                page = state.pages.get(index) or self._backing_page(fh, state, index)
                start = index * PAGE
                low, high = max(offset, start), min(end, start + PAGE)
                page[low - start : high - start] = data[low - offset : high - offset]
                state.pages[index] = page
            state.size = max(state.size, end)
            return len(data)

    def truncate(self, path, length, fh=None):
        fd = fh if fh is not None else os.open(self._path(path), os.O_RDONLY)
        try:
            with self.guard:
                state = self._state(fd)
                for index in [i for i in state.pages if i * PAGE >= length]:
                    del state.pages[index]
                if length % PAGE and length < state.size:
                    page = self._page(fd, state, length // PAGE)
                    page[length % PAGE :] = bytes(PAGE - length % PAGE)
                    state.pages[length // PAGE] = page
                state.size = length
                state.backing_limit = min(state.backing_limit, length)
        finally:
            if fh is None:
                os.close(fd)

    def fsync(self, path, datasync, fh):
        with self.guard:
            state = self.unsynced.pop(os.fstat(fh).st_ino, None)
            if state is not None:
                writable = os.open(f"/proc/self/fd/{fh}", os.O_WRONLY)
                try:
                    if state.backing_limit < os.fstat(writable).st_size:
                        os.ftruncate(writable, state.backing_limit)
                    os.ftruncate(writable, state.size)
                    for index, page in sorted(state.pages.items()):
                        start = index * PAGE
                        os.pwrite(writable, page[: max(0, min(PAGE, state.size - start))], start)
                finally:
                    os.close(writable)
            (os.fdatasync if datasync else os.fsync)(fh)
        return 0


def main() -> None:
    backing, mountpoint = sys.argv[1:]
    FUSE(CutFS(backing), mountpoint, foreground=True, nothreads=False, big_writes=True,
         max_write=1 << 20, allow_other=False)


if __name__ == "__main__":
    main()
