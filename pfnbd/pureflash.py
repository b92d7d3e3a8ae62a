"""The real PureFlash client library behind the `VolumeBackend` interface.

`PureFlashClient` loads a shared build of `libs5common` (PureFlash builds only a static
archive; `scripts/pureflash-cluster build` links the shared one, see the README) and opens
volumes of a real cluster with `pf_open_volume`; `PureFlashVolume` submits with `pf_iov_submit` and hands each
completion, which arrives on the library's own thread (`vol_proc`), to the bridge's
callback exactly as `EmulatedVolume` does.

Bound with ctypes rather than cffi: ctypes ships with CPython, so the binding adds no
dependency and no compile step, and an ABI of five functions and two structs is short
enough to declare by hand, which is what cffi would have saved.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

from .store import Extent, human_size, split_snapshot_name
from .volume import S5_LIB_VER, IoHandler, VolumeOpenError

log = logging.getLogger(__name__)

LIBRARY_ENV = "PFNBD_PUREFLASH_LIB"
DEFAULT_CONF = Path("/etc/pureflash/pf.conf")  # what the library reads when given no file

# typedef void (*ulp_io_handler)(void *cbk_arg, int complete_status);
UlpIoHandler = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int)


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class PfClientVolumeInfo(ctypes.Structure):
    """pf_client_api.h's struct, field for field in the header's order."""

    _fields_ = [
        ("status", ctypes.c_char * 64),
        ("volume_name", ctypes.c_char * 128),
        ("snap_name", ctypes.c_char * 128),
        ("volume_size", ctypes.c_uint64),
        ("volume_id", ctypes.c_uint64),
        ("shard_count", ctypes.c_int),
        ("rep_count", ctypes.c_int),
        ("meta_ver", ctypes.c_int),
        ("snap_seq", ctypes.c_int),
    ]


_c_volume = ctypes.c_void_p  # struct PfClientVolume *, opaque
_c_off_t = ctypes.c_int64  # off_t on 64-bit Linux, the only platform PureFlash builds for

_SIGNATURES = {
    "pf_open_volume": (_c_volume, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]),
    "pf_close_volume": (None, [_c_volume]),
    "pf_get_volume_size": (ctypes.c_uint64, [_c_volume]),
    "pf_query_volume_info": (ctypes.c_int, [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(PfClientVolumeInfo),
    ]),
    "pf_iov_submit": (ctypes.c_int, [
        _c_volume, ctypes.POINTER(Iovec), ctypes.c_uint, ctypes.c_size_t, _c_off_t,
        UlpIoHandler, ctypes.c_void_p, ctypes.c_int,
    ]),
}


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Loads `libs5common` from `path`, else from $PFNBD_PUREFLASH_LIB, and declares its ABI.

    A CDLL (not a PyDLL): calls release the GIL, so the library's thread can run
    completion callbacks while `pf_close_volume` waits for them.
    """
    path = path or os.environ.get(LIBRARY_ENV)
    if not path:
        raise VolumeOpenError(
            f"no PureFlash client library: set {LIBRARY_ENV} to a shared build of libs5common"
        )
    try:
        library = ctypes.CDLL(os.fspath(path))
    except OSError as error:
        raise VolumeOpenError(f"cannot load the PureFlash client library: {error}") from None
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            function = getattr(library, name)
        except AttributeError:
            raise VolumeOpenError(f"{path} is not a PureFlash client library: it has no {name}") from None
        function.restype, function.argtypes = restype, argtypes
    return library


def _c_string(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _status_text(status: int) -> str:
    return os.strerror(-status) if status < 0 and status != -1 else "the library's log says why"


def _label(name: str, snap: str | None) -> str:
    return f"{name}@{snap}" if snap else name


@attrs.frozen
class VolumeInfo:
    """What `pf_query_volume_info` tells about a volume, without opening it."""

    status: str
    volume_name: str
    snap_name: str
    size: int
    id: int
    shard_count: int
    replicas: int
    meta_ver: int
    snap_seq: int

    @classmethod
    def from_struct(cls, info: PfClientVolumeInfo) -> VolumeInfo:
        def text(raw: bytes) -> str:
            return raw.decode(errors="replace")

        return cls(
            text(info.status), text(info.volume_name), text(info.snap_name), info.volume_size,
            info.volume_id, info.shard_count, info.rep_count, info.meta_ver, info.snap_seq,
        )

    def describe(self) -> str:
        """Worded like `VolumeMeta.describe`."""
        replicas = "replica" if self.replicas == 1 else "replicas"
        return f"PureFlash volume {self.volume_name}, {human_size(self.size)}, {self.replicas} {replicas}"


class PureFlashClient:
    """`pf_open_volume` against a real cluster, with the shape of `EmulatedClient`."""

    def __init__(
        self, conf: str | os.PathLike | None = None, library: str | os.PathLike | None = None
    ) -> None:
        """`conf`: the client configuration (None: the library's /etc/pureflash/pf.conf).
        `library`: the shared libs5common (None: $PFNBD_PUREFLASH_LIB)."""
        self.conf = None if conf is None else Path(conf)
        conf_path = self.conf or DEFAULT_CONF
        if not os.access(conf_path, os.R_OK):
            raise VolumeOpenError(f"cannot read the PureFlash configuration {conf_path}")
        self._library = load_library(library)

    def _conf_arg(self) -> bytes | None:
        return None if self.conf is None else os.fsencode(self.conf)

    def open_volume(self, name: str, snap: str | None = None, lib_ver: int = S5_LIB_VER) -> PureFlashVolume:
        """Opens a volume's head, or read-only one of its snapshots."""
        handle = self._library.pf_open_volume(_c_string(name), self._conf_arg(), _c_string(snap), lib_ver)
        if not handle:  # NULL is all the library says; it logs the reason itself
            raise VolumeOpenError(
                f"cannot open PureFlash volume {_label(name, snap)} "
                f"(configuration {self.conf or DEFAULT_CONF}): the library's log says why"
            )
        return PureFlashVolume(self._library, handle, name, snap)

    def query_volume_info(self, name: str, snap: str | None = None, lib_ver: int = S5_LIB_VER) -> VolumeInfo:
        info = PfClientVolumeInfo()  # zeroed: some library versions leave fields unset
        status = self._library.pf_query_volume_info(
            _c_string(name), self._conf_arg(), _c_string(snap), lib_ver, ctypes.byref(info)
        )
        if status == -errno.ENOENT:
            raise VolumeOpenError(f"no PureFlash volume {_label(name, snap)}")
        if status:
            raise VolumeOpenError(
                f"cannot query PureFlash volume {_label(name, snap)}: {_status_text(status)}"
            )
        return VolumeInfo.from_struct(info)

    def describe(self, name: str) -> str:
        """What NBD_OPT_LIST and INFO say of export `name` or `name@snap`, like `Store.describe`.

        A snapshot is described from its head's information: upstream's query with a
        snapshot name fails (-ENOMEM, an unassigned escape buffer), and a snapshot has
        its head's replicas."""
        volume, snap = split_snapshot_name(name)
        head = self.query_volume_info(volume).describe()
        return head if snap is None else f"snapshot {snap} of {head}, read-only"


@attrs.frozen
class _InFlight:
    """What must outlive a submit until its callback: the iovec array and the buffers it
    points into (the library reads and fills them from its own thread)."""

    iovecs: ctypes.Array
    buffers: list[ctypes.Array]
    callback: IoHandler
    cbk_arg: object


class PureFlashVolume:
    """An open volume of a real cluster, as a `VolumeBackend`."""

    can_discard = False  # the library has no trim: the bridge writes zeros instead
    dirty_bitmaps = ()  # the client API cannot tell what changed since a snapshot,
    has_depths = False  # nor where a snapshot's data lies

    def __init__(self, library: ctypes.CDLL, handle: int, name: str, snap: str | None) -> None:
        self._library = library
        self.handle: int | None = handle  # the library's struct PfClientVolume *
        self.name = _label(name, snap)
        self.size: int = library.pf_get_volume_size(handle)
        self.read_only = snap is not None
        # Every submit passes a fresh token as cbk_arg; one C callback for the volume's
        # lifetime finds the submit's Python side by it.  Dict updates and next() are
        # atomic under the GIL, which the library's thread holds while in the callback.
        self._tokens = itertools.count(1)  # never 0: that would arrive as NULL
        self._in_flight: dict[int, _InFlight] = {}
        self._c_callback = UlpIoHandler(self._complete)

    def iov_submit(
        self, iov: Sequence[memoryview], length: int, offset: int,
        callback: IoHandler, cbk_arg: object, is_write: bool,
    ) -> int:
        if self.handle is None:
            return -errno.EBADF
        if is_write and self.read_only:
            return -errno.EROFS
        # The library indexes its shards by offset unchecked: out of range is a crash.
        if offset < 0 or offset + length > self.size:
            return -errno.EINVAL
        iovecs, buffers = _iovec_array(iov)
        token = next(self._tokens)
        # Registered first: the completion may come before pf_iov_submit returns.
        self._in_flight[token] = _InFlight(iovecs, buffers, callback, cbk_arg)
        status = self._library.pf_iov_submit(
            self.handle, iovecs, len(iovecs), length, offset, self._c_callback, token, int(is_write)
        )
        if status:
            del self._in_flight[token]
        return status

    def _complete(self, token: int, status: int) -> None:  # on the library's thread
        io = self._in_flight.pop(token)
        io.callback(io.cbk_arg, status)

    def discard_submit(self, offset: int, length: int, callback: IoHandler, cbk_arg: object) -> int:
        return -errno.EOPNOTSUPP

    def allocation(self, offset: int, length: int) -> Iterator[Extent]:
        """The library cannot tell what was never written: all of it is data."""
        yield Extent(offset, length, True)

    def changes(self, since: str, offset: int, length: int) -> Iterator[Extent]:
        raise OSError(errno.ENOTSUP, "the PureFlash client API cannot tell what changed")

    def depths(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        raise OSError(errno.ENOTSUP, "the PureFlash client API cannot tell allocation depth")

    def flush(self) -> None:
        """Nothing to do: an acknowledged write is already on every replica."""

    def close(self) -> None:
        """`pf_close_volume`: returns once every in-flight I/O has called back."""
        if self.handle is None:
            return
        self._library.pf_close_volume(self.handle)
        self.handle = None
        if self._in_flight:
            log.error("volume %s closed with %d I/Os never completed", self.name, len(self._in_flight))


def _iovec_array(buffers: Sequence[memoryview]) -> tuple[ctypes.Array, list[ctypes.Array]]:
    """A C iovec array over `buffers`, plus the ctypes objects that pin them."""
    iovecs = (Iovec * len(buffers))()
    pinned = []
    for slot, buffer in zip(iovecs, buffers):
        view = memoryview(buffer)
        array_type = ctypes.c_char * len(view)
        # from_buffer needs a writable buffer.  A read-only one (the bridge's shared
        # zeros) is only ever write data, which the library copies at submit anyway,
        # so a private copy of it is as good and never lets C touch immutable memory.
        c_buffer = array_type.from_buffer_copy(view) if view.readonly else array_type.from_buffer(view)
        slot.iov_base = ctypes.addressof(c_buffer)
        slot.iov_len = len(view)
        pinned.append(c_buffer)
    return iovecs, pinned


__all__ = ["LIBRARY_ENV", "PureFlashClient", "PureFlashVolume", "VolumeInfo", "load_library"]
