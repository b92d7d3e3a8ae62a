"""A real virtual machine on a pfnbd volume (issue 7).

A Debian kernel under QEMU boots an initramfs built here (tests/vm/) whose init runs the
steps a test lists and prints a marker per step on the serial console. The guests
- use a volume as their virtio disk: raw writes with fsync read back past the page
  cache, then ext4, over three boots with a pfnbd restart before the third;
- attach a volume with the kernel's own NBD client (nbd-client -C 2, through
  examples/vm/nbd-host-mount.sh) over QEMU's user-mode network, isolated from the host.
- attach a volume with nbd-client -persist and restart pfnbd under it (issue 16): the
  kernel client cannot survive that, whatever the server does (see the test).
After each guest the test reads the volume through pfnbd and checks the same bytes and
the filesystem. Guests boot through examples/vm/boot-vm.sh.
"""

from __future__ import annotations

import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import Server, require, run
from realcluster import CLUSTER_TIMEOUT
from vm.guest import GuestFactory, probe_accel
from vm.initramfs import GUEST_PROGRAMS, guest_base
from vm.kernel import Kernel, cached_kernel

VOLUME = "test_v1"
MIB = 1 << 20
VOLUME_MIB = 64
FS_SIZE_MIB = 32  # the filesystem covers the start of the volume...
RAW_OFFSET_MIB = 40  # ...and the raw pattern lies past its end
SMALL_FILES = 64  # written with each data file, in a directory of their own
RELAY = Path(__file__).parent / "vm" / "unix_relay.py"


def volume_plan(disk: str) -> dict[str, str]:
    return {"DISK": disk, "VOLUME_BYTES": str(VOLUME_MIB * MIB),
            "RAW_OFFSET_MIB": str(RAW_OFFSET_MIB), "FS_SIZE_MIB": str(FS_SIZE_MIB),
            "SMALL_FILES": str(SMALL_FILES)}


@pytest.fixture(scope="session")
def guest_kernel() -> Kernel:
    require("qemu-system-x86_64", "busybox", "apt-get", "dpkg-deb", "ldd", *GUEST_PROGRAMS,
            "e2fsck", "debugfs", "nbdcopy")
    return cached_kernel()


@pytest.fixture(scope="session")
def guest_initramfs(guest_kernel: Kernel) -> bytes:
    return guest_base(guest_kernel)


@pytest.fixture(scope="session")
def accel(guest_kernel: Kernel, guest_initramfs: bytes, tmp_path_factory) -> str:
    kvm = GuestFactory(tmp_path_factory.mktemp("kvm-probe"), guest_kernel, guest_initramfs, "kvm")
    try:
        chosen, why_not_kvm = probe_accel(kvm)
    finally:
        kvm.kill_all()
    print(f"guests run under {chosen}" + (f": KVM failed: {why_not_kvm}" if why_not_kvm else ""))
    return chosen


@pytest.fixture
def guests(tmp_path: Path, guest_kernel: Kernel, guest_initramfs: bytes, accel: str):
    directory = tmp_path / "guests"
    directory.mkdir()
    factory = GuestFactory(directory, guest_kernel, guest_initramfs, accel)
    yield factory
    factory.kill_all()


def check_volume(server: Server, directory: Path, raw: bytes, files: dict[str, bytes],
                 volume: str = VOLUME) -> None:
    """Reads the whole volume through pfnbd and checks what the guests wrote: the raw
    pattern, a clean filesystem, and each data file with its directory of small files."""
    image = directory / "volume.img"
    image.unlink(missing_ok=True)
    run("nbdcopy", server.uri(volume), str(image))
    with open(image, "rb") as volume:
        volume.seek(RAW_OFFSET_MIB * MIB)
        assert volume.read(len(raw)) == raw, "the raw pattern differs on the host"
    run("e2fsck", "-fn", str(image))
    dumped = directory / "dumped"
    shutil.rmtree(dumped, ignore_errors=True)  # debugfs exits 0 even when a file is missing
    for name, content in files.items():
        target = dumped / name
        target.mkdir(parents=True, exist_ok=True)
        run("debugfs", "-R", f"rdump /{name} /{name}.d {target}", str(image))
        assert (target / name).read_bytes() == content, f"/{name} differs on the host"
        small = target / f"{name}.d"
        assert sorted(path.name for path in small.iterdir()) == sorted(
            str(number) for number in range(1, SMALL_FILES + 1))
        for number in range(1, SMALL_FILES + 1):
            assert (small / str(number)).read_text() == f"{name} file {number}\n"


def test_virtio_disk_survives_reboots_and_server_restart(start_server, guests: GuestFactory,
                                                         tmp_path: Path):
    data = random.Random(7)
    raw = data.randbytes(4 * MIB)
    files = {f"boot{number}": data.randbytes(MIB) for number in (1, 2, 3)}
    volumes = {VOLUME: f"{VOLUME_MIB}M"}
    server = start_server(volumes)

    def boot(name: str, steps: list[str], written: list[str]) -> None:
        print(guests.run(name, ["virtio-disk", "disk-size", *steps], volume_plan("/dev/vda"),
                         {"raw.bin": raw, **files}, disks=[server.uri(VOLUME)]))
        check_volume(server, tmp_path, raw, {file: files[file] for file in written})

    boot("boot1", ["raw-write", "raw-check", "mkfs", "mount", "write-file:boot1", "umount"],
         ["boot1"])
    boot("boot2", ["raw-check", "mount", "check-file:boot1", "write-file:boot2", "umount"],
         ["boot1", "boot2"])
    assert server.stop() == 0, server.log()
    server = start_server(volumes)
    boot("boot3", ["raw-check", "mount", "check-file:boot1", "check-file:boot2",
                   "write-file:boot3", "umount"], ["boot1", "boot2", "boot3"])


@CLUSTER_TIMEOUT
def test_virtio_disk_on_a_real_cluster(real_cluster, serve_real, guests: GuestFactory, tmp_path: Path):
    """One boot on a real PureFlash volume (`serve --backend pureflash`): raw writes read
    back past the page cache, then ext4 and a file; then a second server opens the
    volume afresh and the host reads it all back through it."""
    data = random.Random(10)
    raw = data.randbytes(4 * MIB)
    files = {"real": data.randbytes(MIB)}
    name = real_cluster.create_volume(VOLUME_MIB * MIB, prefix="vm")
    server = serve_real(name)
    print(guests.run("real", ["virtio-disk", "disk-size", "raw-write", "raw-check", "mkfs", "mount",
                              "write-file:real", "umount"],
                     volume_plan("/dev/vda"), {"raw.bin": raw, **files}, disks=[server.uri(name)]))
    assert server.stop() == 0, server.log()
    check_volume(serve_real(name), tmp_path, raw, files, volume=name)


def accepted_connections(socket_path: Path) -> int:
    """Open connections that the server accepted on its Unix socket: in /proc/net/unix
    they carry the socket's path and the state 03 (connected)."""
    rows = [line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:]]
    return sum(1 for row in rows if len(row) == 8 and row[7] == str(socket_path) and row[5] == "03")


def relayed_connections(relay_log: Path, expected: int) -> list[tuple[int, int]]:
    """(bytes from the guest, bytes to the guest) of each connection the relay carried,
    in the order the guest opened them, once `expected` relays have logged (a relay may
    still be finishing when QEMU has exited) or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        connections = sorted(tuple(int(field) for field in line.split()[1:])
                             for line in relay_log.read_text().splitlines()
                             if line.startswith("connection "))
        if len(connections) >= expected or time.monotonic() > deadline:
            return [(sent, received) for _, sent, received in connections]
        time.sleep(0.05)


def guest_network(socket_path: Path, relay_log: Path) -> list[str]:
    """QEMU's user-mode network, where guest connections to 10.0.2.100:10809 reach pfnbd.

    restrict=on: the guest reaches nothing but the forwarded address. guestfwd's
    chardev form opens one host connection when QEMU starts (pfnbd drops it when no
    handshake comes in time) and passes every guest connection through it; its cmd
    form starts the relay once for each, so each gets its own connection to pfnbd.
    """
    relay = shlex.join([sys.executable, str(RELAY), str(socket_path), str(relay_log)])
    return ["-netdev", f"user,id=net,restrict=on,ipv6=off,guestfwd=tcp:10.0.2.100:10809-cmd:{relay}",
            "-device", "virtio-net-pci,netdev=net"]


def nbd_plan() -> dict[str, str]:
    return {**volume_plan("/dev/nbd0"), "GUEST_ADDRESS": "10.0.2.15/24",
            "NBD_SERVER": "10.0.2.100:10809", "NBD_EXPORT": VOLUME}


# What the kernel client does when its server restarts (guest kernel 6.1, nbd-client 3.24),
# as this test found: either way the guest gets I/O errors, whatever the server does.
# - netlink (nbd-client's default): nbd-client configures the device and exits, so
#   -persist reconnects nothing; the kernel could wait for new sockets
#   (NBD_ATTR_DEAD_CONN_TIMEOUT, NBD_CMD_RECONFIGURE) but nbd-client sets neither, and the
#   dead connection fails every request ("Dead connection, failed to find a fallback").
# - ioctl (-nonetlink -persist): the kernel ends NBD_DO_IT when the connection drops and
#   fails the requests queued on it with EIO; nbd-client reconnects only after that.
KERNEL_CLIENT_CANNOT_RECONNECT = pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="nbd-client 3.24 cannot hand the kernel a new connection before it fails I/O")


@KERNEL_CLIENT_CANNOT_RECONNECT
@pytest.mark.parametrize("interface", ["", "-nonetlink"], ids=["netlink", "ioctl"])
def test_kernel_nbd_client_across_a_server_restart(start_server, guests: GuestFactory,
                                                   tmp_path: Path, interface: str):
    """nbd-client -persist with a dead-connection timeout (-timeout 10), ext4 mounted on
    it, and pfnbd restarted on the host between two files: what an upgrade would need."""
    data = random.Random(9)
    raw = data.randbytes(4 * MIB)
    files = {"before": data.randbytes(MIB), "after": data.randbytes(MIB)}
    volumes = {VOLUME: f"{VOLUME_MIB}M"}
    server = start_server(volumes)
    plan = {**nbd_plan(), "NBD_TIMEOUT": "10", "NBD_INTERFACE": interface}
    steps = ["net-up", "nbd-attach-persist", "raw-write", "mkfs", "mount", "write-file:before",
             "host-sync:restart", "write-file:after", "check-file:before", "umount", "raw-check"]
    guest = guests.boot("nbd-restart", steps, plan, {"raw.bin": raw, **files},
                        qemu_args=guest_network(server.socket, tmp_path / "relay.log"))
    guest.wait_for_marker("wait restart", timeout=240)
    assert server.stop() == 0, server.log()
    server = start_server(volumes, socket=server.socket)
    guest.resume("restart")
    print(f"guest nbd-client -persist under {guests.accel}: powered off after "
          f"{guest.finish(timeout=240):.1f} s")
    check_volume(server, tmp_path, raw, files)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_kernel_nbd_client_with_two_connections(start_server, guests: GuestFactory,
                                                 tmp_path: Path, workers: str):
    data = random.Random(8)
    raw = data.randbytes(4 * MIB)
    files = {"nbd": data.randbytes(MIB)}
    connections = 2  # and as many CPUs: blk-mq maps each CPU to one connection
    server = start_server({VOLUME: f"{VOLUME_MIB}M"}, "--workers", workers)
    relay_log = tmp_path / "relay.log"
    network = guest_network(server.socket, relay_log)
    plan = {**nbd_plan(), "NBD_CONNECTIONS": str(connections)}
    # three attachments (attach, up, up) of `connections` connections each
    steps = ["net-up", "nbd-attach", "host-sync:attached", "disk-size",
             "raw-write-each-cpu", "raw-check", "mkfs", "nbd-detach",
             "nbd-up", "write-file:nbd", "nbd-down", "nbd-up", "check-file:nbd", "nbd-down"]
    guest = guests.boot("nbd-client", steps, plan, {"raw.bin": raw, **files},
                        qemu_args=network, cpus=connections)
    booted = guest.wait_for_marker("booted", timeout=120)
    guest.wait_for_marker("wait attached", timeout=120)
    accepted = accepted_connections(server.socket)
    guest.resume("attached")
    print(f"guest nbd-client under {guests.accel}: init started {booted:.1f} s after QEMU,"
          f" powered off after {guest.finish(timeout=150):.1f} s")
    assert accepted == connections, (
        f"pfnbd had {accepted} connections open while nbd-client -C {connections} was attached")
    relayed = relayed_connections(relay_log, 3 * connections)
    assert len(relayed) == 3 * connections, f"relay log:\n{relay_log.read_text()}"
    # each CPU wrote its slice of the raw pattern down its own connection
    first_attachment = relayed[:connections]
    assert all(sent > len(raw) // connections for sent, _ in first_attachment), (
        f"the first attachment's connections carried {first_attachment}: not one slice each")
    check_volume(server, tmp_path, raw, files)
