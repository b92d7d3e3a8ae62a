"""Runs the test guest under QEMU through examples/vm/boot-vm.sh and reads the markers
that its init (init.sh) prints on the serial console."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from vm.initramfs import EXAMPLES, guest_boot
from vm.kernel import Kernel

BOOT_SCRIPT = EXAMPLES / "boot-vm.sh"
MARKER = "PFNBD-VM "
# quiet: kernel messages would interleave with the markers; a failing step prints dmesg
KERNEL_ARGS = "console=ttyS0 panic=-1 quiet"


@attrs.define
class Guest:
    """One QEMU process. Its console is a file; its second serial port (the guest's
    ttyS1) is a Unix socket the test writes to when a step waits for the host."""

    name: str
    process: subprocess.Popen[bytes]
    console_path: Path
    qemu_log_path: Path
    control_path: Path
    steps: list[str]
    started: float = attrs.field(factory=time.monotonic)
    control: socket.socket | None = None

    def console(self) -> str:
        return self.console_path.read_text(errors="replace") if self.console_path.exists() else ""

    def markers(self) -> list[str]:
        return [line.split(MARKER, 1)[1].strip()
                for line in self.console().splitlines() if MARKER in line]

    def report(self) -> str:
        """The console and QEMU's own output, for failure messages."""
        console = self.console()
        return (f"--- console of guest {self.name} ({self.console_path}) ---\n{console}\n"
                f"--- qemu output ---\n{self.qemu_log_path.read_text(errors='replace')}")

    def fail(self, why: str) -> AssertionError:
        self.kill()
        return AssertionError(f"guest {self.name}: {why}\n{self.report()}")

    def wait_for_marker(self, marker: str, timeout: float) -> float:
        """Returns the seconds from QEMU's start until the guest printed `marker`."""
        deadline = time.monotonic() + timeout
        while marker not in self.markers():
            if self.process.poll() is not None:
                raise self.fail(f"exited {self.process.returncode} before {marker!r}")
            if time.monotonic() > deadline:
                raise self.fail(f"no {marker!r} in {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - self.started

    def resume(self, tag: str) -> None:
        """Answers the guest's `host-sync:TAG` step."""
        if self.control is None:
            # kept open until the guest ends: QEMU may drop what a closed peer sent
            self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.control.settimeout(10)
            self.control.connect(str(self.control_path))
        self.control.sendall(f"resume {tag}\n".encode())

    def finish(self, timeout: float) -> float:
        """Waits for the guest to power off, checks that every step passed, and returns
        the seconds it ran."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.fail(f"still running after {timeout} s")
        finally:
            if self.control is not None:
                self.control.close()
        markers = self.markers()
        passed = [marker.split(" ", 1)[1] for marker in markers if marker.startswith("ok ")]
        if passed != self.steps or markers[-1:] != ["passed"]:
            raise self.fail(f"steps {self.steps} did not all pass; markers: {markers}")
        if self.process.returncode != 0:
            raise self.fail(f"qemu exited {self.process.returncode}")
        return time.monotonic() - self.started

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@attrs.define
class GuestFactory:
    """Boots guests of one test, each from the shared initramfs plus its own plan and
    data, and kills any still running at teardown."""

    directory: Path
    kernel: Kernel
    base_initramfs: bytes
    accel: str
    guests: list[Guest] = attrs.Factory(list)

    def boot(self, name: str, steps: list[str], plan: dict[str, str],
             data: dict[str, bytes], disks: Sequence[str] = (), qemu_args: Sequence[str] = (),
             cpus: int = 1, deadline: int = 120) -> Guest:
        """Starts the guest; `plan` sets the shell variables the steps read."""
        initramfs = self.directory / f"{name}.initramfs"
        initramfs.write_bytes(guest_boot(
            self.base_initramfs, {**plan, "STEPS": " ".join(steps), "DEADLINE": str(deadline)},
            data))
        console = self.directory / f"{name}.console.log"
        control = self.directory / f"{name}.control.sock"
        qemu_log = self.directory / f"{name}.qemu.log"
        command = [str(BOOT_SCRIPT), "--accel", self.accel, "--memory", "512M", "--cpus", str(cpus),
                   "--kernel", str(self.kernel.image), "--initrd", str(initramfs),
                   "--append", KERNEL_ARGS, "--console", str(console)]
        for disk in disks:
            command += ["--disk", disk]
        command += ["--", "-no-reboot",  # a kernel panic ends QEMU instead of rebooting
                    "-chardev", f"socket,id=control,path={control},server=on,wait=off",
                    "-serial", "chardev:control", *qemu_args]
        with open(qemu_log, "wb") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT)
        guest = Guest(name, process, console, qemu_log, control, steps)
        self.guests.append(guest)
        return guest

    def run(self, name: str, steps: list[str], plan: dict[str, str], data: dict[str, bytes],
            disks: Sequence[str] = (), deadline: int = 120) -> str:
        """Boots a guest that needs nothing from the host while it runs, waits for it,
        and says how long it took."""
        guest = self.boot(name, steps, plan, data, disks, deadline=deadline)
        booted = guest.wait_for_marker("booted", timeout=deadline)
        return (f"guest {name} under {self.accel}: init started {booted:.1f} s after QEMU,"
                f" powered off after {guest.finish(deadline + 30):.1f} s")

    def kill_all(self) -> None:
        for guest in self.guests:
            guest.kill()


def probe_accel(kvm_factory: GuestFactory) -> tuple[str, str]:
    """("kvm", "") when a guest boots under KVM within seconds, else ("tcg", why not).
    A usable-looking /dev/kvm is not enough: under some hypervisors (nested ones) QEMU
    aborts on the host CPU model or the guest hangs."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is not usable"
    probe = kvm_factory.boot("kvm-probe", [], {}, {})
    try:
        probe.finish(timeout=20)
        return "kvm", ""
    except AssertionError:
        return "tcg", probe.qemu_log_path.read_text(errors="replace").strip() or "no boot in 20 s"
