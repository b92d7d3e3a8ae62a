"""Mounts cutfs over a backing directory and cuts its power.

A cut SIGKILLs the programs that write to the mount and the file system process
together, then detaches the dead mount: what is left in the backing directory
is what was synced.  `mount()` again serves that directory, as after a reboot.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs

CUTFS = Path(__file__).with_name("cutfs.py")


def _unmount(path: Path) -> None:
    command = ["fusermount", "-u", "-z"] if shutil.which("fusermount") else ["umount", "-l"]
    subprocess.run([*command, str(path)], check=True, capture_output=True)


@attrs.define
class PowerCut:
    backing: Path
    mountpoint: Path
    log_path: Path
    process: subprocess.Popen | None = None

    def mount(self) -> None:
        if not Path("/dev/fuse").exists():
            raise AssertionError("/dev/fuse is missing: the power-cut tests need FUSE")
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen([sys.executable, str(CUTFS), str(self.backing),
                                             str(self.mountpoint)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"cutfs did not mount:\n{self.log_path.read_text()}")
            time.sleep(0.02)

    def cut(self, *writers: subprocess.Popen) -> None:
        """The power goes: writers and the file system's memory die at one moment."""
        for process in (*writers, self.process):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
        for process in (*writers, self.process):
            process.wait()
        _unmount(self.mountpoint)
        self.process = None

    def unmount(self) -> None:
        """A clean shutdown: unmount, and the file system exits by itself."""
        if self.process is not None:
            _unmount(self.mountpoint)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
