"""The guest's root filesystem: an initramfs in the kernel's cpio "newc" format, made
of the host's busybox, e2fsprogs and nbd-client (with their libraries), the kernel
modules the tests load, and the guest's init script."""

from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path

import attrs

from conftest import run
from vm.kernel import Kernel

HERE = Path(__file__).parent
EXAMPLES = HERE.parent.parent / "examples" / "vm"

# virtio_pci finds the disk and the NIC, nbd is the kernel client; ext4 is built in
GUEST_MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "nbd"]
# Debian's own programs, copied from the host with the shared libraries they link
GUEST_PROGRAMS = ["/sbin/mke2fs", "/usr/sbin/nbd-client"]
NBD_MOUNT_SCRIPT = EXAMPLES / "nbd-host-mount.sh"


@attrs.frozen
class Entry:
    mode: int
    content: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@attrs.define
class Initramfs:
    """Files by absolute path in the guest; `pack()` writes the archive. Archives
    concatenate: the kernel unpacks them in order, later entries replacing earlier."""

    entries: dict[str, Entry] = attrs.Factory(dict)

    def _add(self, path: str, entry: Entry) -> None:
        parent = str(Path(path).parent)
        if parent != "/" and parent not in self.entries:
            self.add_directory(parent)
        self.entries[path] = entry

    def add_directory(self, path: str) -> None:
        self._add(path, Entry(stat.S_IFDIR | 0o755))

    def add_file(self, path: str, content: bytes, executable: bool = False) -> None:
        self._add(path, Entry(stat.S_IFREG | (0o755 if executable else 0o644), content))

    def add_char_device(self, path: str, major: int, minor: int) -> None:
        self._add(path, Entry(stat.S_IFCHR | 0o600, rdev=(major, minor)))

    def add_host_file(self, host_path: Path, path: str | None = None) -> None:
        self.add_file(path or str(host_path), host_path.read_bytes(),
                      executable=bool(host_path.stat().st_mode & 0o111))

    def add_program(self, host_path: str, path: str | None = None) -> None:
        """A host program, with the shared libraries `ldd` resolves for it."""
        self.add_host_file(Path(host_path), path)
        listing = run("ldd", host_path, check=False).stdout  # fails on static programs
        for library in re.findall(r"(/\S+) \(0x", listing):
            self.add_host_file(Path(library))

    def pack(self) -> bytes:
        archive = bytearray()
        for number, (path, entry) in enumerate([*self.entries.items(), ("TRAILER!!!", Entry(0))]):
            name = path.lstrip("/").encode() + b"\0"
            fields = [number + 1, entry.mode, 0, 0, 1, 0, len(entry.content), 0, 0,
                      *entry.rdev, len(name), 0]
            archive += b"070701" + b"".join(b"%08x" % field for field in fields) + name
            archive += b"\0" * (-len(archive) % 4) + entry.content
            archive += b"\0" * (-len(archive) % 4)
        return bytes(archive)


def guest_base(kernel: Kernel) -> bytes:
    """Everything every guest boot shares; a boot appends its own plan and data."""
    image = Initramfs()
    for directory in ("/proc", "/sys", "/dev", "/mnt", "/tmp", "/test/data"):
        image.add_directory(directory)
    image.add_char_device("/dev/console", 5, 1)  # init's stdio before devtmpfs is mounted
    # init.sh links busybox's applets into /bin
    image.add_program(shutil.which("busybox"), "/bin/busybox")
    image.add_host_file(HERE / "init.sh", "/init")
    for program in GUEST_PROGRAMS:
        image.add_program(program)
    image.add_host_file(Path("/etc/mke2fs.conf"))
    image.add_host_file(NBD_MOUNT_SCRIPT, "/usr/sbin/nbd-host-mount.sh")
    modules_dep = []
    for module, needs in kernel.module_closure(GUEST_MODULES).items():
        image.add_host_file(kernel.modules / module, f"/lib/modules/{kernel.release}/{module}")
        modules_dep.append(f"{module}: {' '.join(needs)}\n")
    image.add_file(f"/lib/modules/{kernel.release}/modules.dep", "".join(modules_dep).encode())
    return image.pack()


def guest_boot(base: bytes, plan: dict[str, str], data: dict[str, bytes]) -> bytes:
    """`base` followed by this boot's plan (shell variables that init.sh reads) and the
    data files its steps write and compare, under /test/data."""
    overlay = Initramfs()
    overlay.add_file("/test/plan", "".join(f"{key}='{value}'\n" for key, value in plan.items())
                     .encode())
    for name, content in data.items():
        overlay.add_file(f"/test/data/{name}", content)
    return base + overlay.pack()
