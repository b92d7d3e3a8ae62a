"""The C clients of PureFlash's library that benchmarks/real_cluster.py measures pfnbd
against: `pf_loadgen` (the library driven directly) and the nbdkit plugin (a C NBD server
on the library).  Run here on the stand-in library of tests/test_pureflash.py, whose
volumes are plain files, so that what they store can be read back: a benchmark column
that stored nothing, or the wrong bytes, would be a figure of nothing.  No speed is
asserted."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import require, run, wait_for_socket
from test_pureflash import cluster, fake_library  # noqa: F401  (fixtures)

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-pthread")
MiB = 1 << 20


def pf_loadgen(tmp_path: Path) -> Path:
    binary = tmp_path / "pf_loadgen"
    run("gcc", *CFLAGS, "-o", str(binary), str(BENCHMARKS / "pf_loadgen.c"), "-ldl", timeout=120)
    return binary


def nbdkit_plugin(tmp_path: Path) -> Path:
    require("nbdkit", "/usr/include/nbdkit-plugin.h")  # Debian's nbdkit-plugin-dev
    plugin = tmp_path / "nbdkit-pureflash-plugin.so"
    run("gcc", *CFLAGS, "-shared", "-fPIC", "-o", str(plugin), str(BENCHMARKS / "nbdkit_pureflash.c"), "-ldl",
        timeout=120)
    return plugin


def test_pf_loadgen_writes_every_block_and_reads_them(cluster, tmp_path):
    image = cluster.create("bench", 4 * MiB)
    loadgen = pf_loadgen(tmp_path)
    conf = cluster.conf()
    written = json.loads(run(str(loadgen), str(cluster.library), str(conf), "bench", "write", str(128 << 10),
                             "8", "1", timeout=60).stdout)
    # Sequential writes wrap at the end: a second's worth covers the volume many times.
    assert written["ios"] > 4 * MiB // (128 << 10)
    assert image.read_bytes() == b"\x5a" * (4 * MiB)
    read = json.loads(run(str(loadgen), str(cluster.library), str(conf), "bench", "randread", "4096", "32", "0.5",
                          timeout=60).stdout)
    assert read["ios"] > 0 and read["iops"] > 0


def test_pf_loadgen_refuses_a_volume_it_cannot_open(cluster, tmp_path):
    result = run(str(pf_loadgen(tmp_path)), str(cluster.library), str(cluster.conf()), "nosuch", "randread",
                 "4096", "32", "0.5", check=False, timeout=60)
    assert result.returncode == 1
    assert "cannot open volume nosuch" in result.stderr


def test_nbdkit_plugin_serves_the_volume_through_the_library(cluster, tmp_path):
    """Writes through the plugin land in the volume, requests over 128 KiB included
    (nbdcopy's are 256 KiB: two submits each), and read back the same."""
    plugin = nbdkit_plugin(tmp_path)
    size = 3 * MiB + 64 * 1024
    image = cluster.create("bench", size)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(size))
    socket = tmp_path / "nbdkit.sock"
    log = tmp_path / "nbdkit.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            ["nbdkit", "--foreground", "--unix", str(socket), "--exportname", "bench", "--threads", "32",
             str(plugin), f"library={cluster.library}", f"conf={cluster.conf()}", "volume=bench"],
            stdout=output, stderr=subprocess.STDOUT, text=True)
    uri = f"nbd+unix:///bench?socket={socket}"
    try:
        wait_for_socket(server, socket, log)
        assert run("nbdinfo", "--size", uri).stdout.strip() == str(size)
        run("nbdcopy", "--no-extents", str(source), uri, timeout=120)
        assert image.read_bytes() == source.read_bytes()
        copied = tmp_path / "copied"
        run("nbdcopy", "--no-extents", uri, str(copied), timeout=120)
        assert copied.read_bytes() == source.read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_nbdkit_plugin_refuses_a_volume_it_cannot_open(cluster, tmp_path):
    result = run("nbdkit", "--foreground", "--unix", str(tmp_path / "s.sock"), str(nbdkit_plugin(tmp_path)),
                 f"library={cluster.library}", f"conf={cluster.conf()}", "volume=nosuch", check=False, timeout=60)
    assert result.returncode != 0
    assert "cannot open volume nosuch" in result.stderr
