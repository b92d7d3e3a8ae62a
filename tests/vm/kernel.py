"""The guest kernel: a Debian kernel package, downloaded with apt and unpacked (not
installed) into a cache directory keyed by the package's name and version."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import attrs

from conftest import run

# The cloud flavour boots fastest and still builds virtio, nbd and ext4.
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pfnbd-test-vm"


@attrs.frozen
class Kernel:
    package: str  # e.g. "linux-image-6.1.0-56-cloud-amd64_6.1.192-2"
    root: Path  # the unpacked package

    @property
    def release(self) -> str:
        (modules,) = (self.root / "lib" / "modules").iterdir()
        return modules.name

    @property
    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    def module_closure(self, names: list[str]) -> dict[str, list[str]]:
        """The modules.dep lines (module path -> its dependencies) that loading `names`
        needs; a module built into the kernel needs none."""
        deps: dict[str, list[str]] = {}
        for line in (self.modules / "modules.dep").read_text().splitlines():
            path, _, needs = line.partition(":")
            deps[path] = needs.split()
        by_name = {Path(path).name.split(".ko")[0].replace("-", "_"): path for path in deps}
        builtin = {Path(path).name.split(".ko")[0].replace("-", "_")
                   for path in (self.modules / "modules.builtin").read_text().split()}
        wanted: dict[str, list[str]] = {}
        pending = []
        for name in names:
            if name in builtin:
                continue
            if name not in by_name:
                raise AssertionError(f"{self.package} has no module {name}")
            pending.append(by_name[name])
        while pending:
            path = pending.pop()
            if path not in wanted:
                wanted[path] = deps[path]
                pending += deps[path]
        return wanted


def apt_query(*args: str) -> str:
    result = run("apt-cache", *args, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        raise AssertionError(f"apt-cache {' '.join(args)} found nothing ({result.stderr.strip()}):"
                             " run apt-get update")
    return result.stdout


def candidate_kernel_package() -> tuple[str, str]:
    """The versioned kernel package that the metapackage points at, and its version."""
    depends = [line.split(":", 1)[1].strip()
               for line in apt_query("depends", KERNEL_METAPACKAGE).splitlines()
               if line.strip().startswith("Depends:")]
    package = next(name for name in depends if name.startswith("linux-image-"))
    fields = dict(line.split(": ", 1)
                  for line in apt_query("show", "--no-all-versions", package).splitlines()
                  if ": " in line and not line.startswith(" "))
    return package, fields["Version"]


def cached_kernel() -> Kernel:
    """The kernel that the package lists name, downloaded and unpacked on first use; the
    lists are refreshed once when they name none or one the mirror no longer has."""
    try:
        return unpacked_kernel()
    except AssertionError:
        run("apt-get", "update", "-qq", timeout=300)
        return unpacked_kernel()


def unpacked_kernel() -> Kernel:
    package, version = candidate_kernel_package()
    key = f"{package}_{version}"
    root = cache_root() / key
    if not root.is_dir():
        cache_root().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".download-") as scratch:
            # apt's sandbox user cannot write to root's cache: download as root
            run("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                f"{package}={version}", cwd=scratch, timeout=300)
            (deb,) = Path(scratch).glob("*.deb")
            unpacked = Path(scratch) / "root"
            run("dpkg-deb", "-x", str(deb), str(unpacked), timeout=300)
            # the package ships no modules.dep: `depmod` writes it at install time
            (release,) = (unpacked / "lib" / "modules").iterdir()
            run("busybox", "depmod", "-b", str(unpacked), release.name)
            try:
                unpacked.rename(root)
            except OSError:
                if not root.is_dir():  # not a concurrent run that got there first
                    raise
        for older in cache_root().glob("linux-image-*"):
            if older != root:
                shutil.rmtree(older, ignore_errors=True)
    return Kernel(key, root)

