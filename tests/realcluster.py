"""The session's real single-node PureFlash cluster, for every test file that uses it.

`scripts/pureflash-cluster` builds (cached by source hash) and starts ZooKeeper, MariaDB,
the conductor and one pfs in a session temporary directory on the real disk: pfs
zero-fills a 10 GiB metadata area on its first start, too much for a tmpfs.  The
fixture skips, with the script's one-line reason, when the PureFlash sources are absent
($PUREFLASH_SRC, else ../shared/third_party); .ci/run has them.  Tests that start it run
under `flock /work/cluster.lock` on shared machines: the cluster's ports are fixed.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import attrs
import pytest

from conftest import run
from pfnbd.pureflash import LIBRARY_ENV, PureFlashClient

CLUSTER_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pureflash-cluster"
CONDUCTOR = "http://127.0.0.1:49180/s5c/"
STEP_TIMEOUT = 60  # seconds any one wait may take
TRAY_DISK_NEEDED = 16 << 30  # the 15 GiB sparse tray gets 11 GB written at first start
# The first test pays for the session's cold build (3.5 min on two idle cores, more in a
# busy CI) and the cluster's start, past the suite's 300 s default: mark tests with it.
CLUSTER_TIMEOUT = pytest.mark.timeout(1200)


@attrs.frozen
class RealCluster:
    """A started cluster: its directory (pf.conf, env, logs) and the client library."""

    dir: Path
    library: Path
    _names = itertools.count(1)

    @property
    def conf(self) -> Path:
        return self.dir / "pf.conf"

    def rest(self, op: str, **params: object) -> dict:
        """One conductor REST call; a non-zero ret_code fails the test with its reason."""
        query = urllib.parse.urlencode({"op": op, **params})
        with urllib.request.urlopen(f"{CONDUCTOR}?{query}", timeout=STEP_TIMEOUT) as reply:
            answer = json.load(reply)
        assert answer.get("ret_code") == 0, answer
        return answer

    def volume_name(self, prefix: str = "v") -> str:
        """A name no other test of the session uses."""
        return f"{prefix}{next(self._names)}_{os.getpid()}"

    def create_volume(self, size: int, prefix: str = "v") -> str:
        """A fresh volume of `size` bytes with a name no other test uses."""
        name = self.volume_name(prefix)
        self.rest("create_volume", volume_name=name, size=size)
        return name

    def client(self, io_depth: int | None = None) -> PureFlashClient:
        conf = self.conf
        if io_depth is not None:
            conf = self.dir / f"pf-io_depth-{io_depth}.conf"
            conf.write_text(self.conf.read_text() + f"io_depth={io_depth}\n")  # [client] is last
        return PureFlashClient(conf, self.library)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.dir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def file_system(path: Path) -> str:
    return run("stat", "-f", "-c", "%T", str(path)).stdout.strip()


def cluster_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLUSTER_SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory) -> RealCluster:
    # A cold build takes 4-8 minutes on two busy cores; a cached one, a second.
    build = cluster_script("build", timeout=1200)
    if build.returncode and "no PureFlash sources" in build.stderr:
        pytest.skip(build.stderr.strip())
    assert build.returncode == 0, build.stderr
    base = tmp_path_factory.mktemp("pureflash")
    own_base = file_system(base) == "tmpfs"
    if own_base:  # pytest's temporary directory is in memory: the tray goes to the disk
        base = Path(tempfile.mkdtemp(prefix="pfnbd-cluster-", dir="/var/tmp"))
    if file_system(base) == "tmpfs" or shutil.disk_usage(base).free < TRAY_DISK_NEEDED:
        pytest.skip(f"the PureFlash tray needs 16 GiB free on a real disk; {base} is "
                    f"{file_system(base)} with {shutil.disk_usage(base).free >> 30} GiB free")
    start = cluster_script("start", str(base), timeout=600)
    cluster = RealCluster(base, Path(build.stdout.strip().splitlines()[-1]) / "lib" / "libs5common.so")
    try:
        assert start.returncode == 0, f"{start.stderr}\n{cluster.log_tail('pfs')}"
        assert (base / "env").read_text() == f"{LIBRARY_ENV}={cluster.library}\n"
        yield cluster
    finally:
        if (base / "run").exists():  # not when start refused before starting anything
            stop = cluster_script("stop", str(base), timeout=120)
            assert stop.returncode == 0, stop.stderr
        assert not (base / "tray.img").exists()
        if own_base:
            shutil.rmtree(base)


@pytest.fixture
def serve_real(real_cluster, start_server, monkeypatch):
    """Factory: `pfnbd serve --backend pureflash --conf DIR/pf.conf` for the given exports."""
    monkeypatch.setenv(LIBRARY_ENV, str(real_cluster.library))

    def serve(*exports: str, extra: tuple[str, ...] = ()):
        return start_server({}, "--backend", "pureflash", "--conf", str(real_cluster.conf), *extra,
                            exports=list(exports))

    return serve
