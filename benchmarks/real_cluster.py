"""pfnbd over NBD next to PureFlash's client library driven directly, on one real cluster.

    python benchmarks/real_cluster.py [--runtime 10] [--rounds 3] [--workdir /var/tmp] [--baseline DIR]

Starts a single-node cluster with scripts/pureflash-cluster (build cached) under a fresh
directory in --workdir (the tray gets 11 GB written: a real disk, not a tmpfs), creates a
1 GiB volume, and per round runs each workload once per column: `pf_loadgen` (benchmarks/
pf_loadgen.c, compiled here) on the library, and fio's nbd engine against `pfnbd serve
--backend pureflash` and against nbdkit with benchmarks/nbdkit_pureflash.c (a C NBD
server on the same library, compiled here), all at the same block size and queue depth,
each round in an order one place on from the last. Prints the medians, each server /
direct, and pfnbd / nbdkit: how far NBD itself (fio's engine, the socket, a server) is
from the library driven directly, and how far pfnbd is from a C server. With --baseline
DIR, the pfnbd of another checkout (say, main before a change) runs too, on the same
cluster and volume in the same rounds, so that a change is compared within one run on a
noisy machine. Stops the cluster and removes its tray at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from run import REPO_ROOT, ClientFailed, last_line, machine_lines, run_client

CLUSTER = REPO_ROOT / "scripts" / "pureflash-cluster"
VOLUME = "bench"
VOLUME_SIZE = 1 << 30
MIB = 1 << 20
NBDKIT_HEADER = Path("/usr/include/nbdkit-plugin.h")


@attrs.frozen
class Workload:
    label: str
    mode: str  # pf_loadgen's MODE, fio's --rw
    block_size: int
    queue_depth: int

    @property
    def unit(self) -> str:
        return "IOPS" if self.block_size == 4096 else "MiB/s"

    def value(self, iops: float) -> float:
        return iops if self.unit == "IOPS" else iops * self.block_size / MIB


WORKLOADS = [
    Workload("4 KiB random read, QD32", "randread", 4096, 32),
    Workload("4 KiB random write, QD32", "randwrite", 4096, 32),
    Workload("128 KiB sequential read, QD8", "read", 128 << 10, 8),
    Workload("128 KiB sequential write, QD8", "write", 128 << 10, 8),
]


def cluster(*args: str, timeout: float = 1200) -> str:
    result = subprocess.run([str(CLUSTER), *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        sys.exit(f"real_cluster.py: {last_line(result.stderr)}")
    return result.stdout


def direct_iops(loadgen: Path, library: str, conf: Path, workload: Workload, runtime: int) -> float:
    result = subprocess.run(
        [str(loadgen), library, str(conf), VOLUME, workload.mode, str(workload.block_size),
         str(workload.queue_depth), str(runtime)],
        capture_output=True, text=True, timeout=runtime + 60)
    if result.returncode:
        raise ClientFailed(f"pf_loadgen: {last_line(result.stderr)}")
    return json.loads(result.stdout)["iops"]


def nbd_iops(uri: str, output: Path, workload: Workload, runtime: int) -> float:
    output.unlink(missing_ok=True)
    run_client(["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={workload.mode}",
                f"--bs={workload.block_size}", f"--iodepth={workload.queue_depth}", "--time_based",
                f"--runtime={runtime}", "--output-format=json", f"--output={output}"],
               timeout=runtime + 60)
    job = json.loads(output.read_text())["jobs"][0]
    if job["error"]:
        raise ClientFailed(f"fio reported error {job['error']}")
    return job["read" if "read" in workload.mode else "write"]["iops"]


def start_pfnbd(directory: Path, library: str, repo: Path, label: str) -> tuple[subprocess.Popen, str]:
    """`pfnbd serve` from the checkout `repo`, on a socket and log named by `label`."""
    socket = directory / f"{label}.sock"
    env = {**os.environ, "PFNBD_PUREFLASH_LIB": library}
    log = open(directory / f"{label}.log", "w")
    # Run in `repo`: `python -m` imports from the working directory first, ahead of
    # PYTHONPATH, so that is what picks the checkout (a PYTHONPATH naming `repo` did not,
    # started from this checkout's root).
    server = subprocess.Popen([sys.executable, "-m", "pfnbd", "serve", "--backend", "pureflash",
                               "--conf", str(directory / "pf.conf"), "--volume", VOLUME,
                               "--socket", str(socket)], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return serving(server, socket, directory / f"{label}.log", "pfnbd serve")


def start_nbdkit(directory: Path, library: str, plugin: Path) -> tuple[subprocess.Popen, str]:
    """nbdkit serving the volume through the plugin, with a thread for each of fio's
    32 requests in flight (its default is 16)."""
    socket, log = directory / "nbdkit.sock", directory / "nbdkit.log"
    with open(log, "w") as output:
        server = subprocess.Popen(["nbdkit", "--foreground", "--unix", str(socket), "--exportname", VOLUME,
                                   "--threads", "32", str(plugin), f"library={library}",
                                   f"conf={directory / 'pf.conf'}", f"volume={VOLUME}"],
                                  stdout=output, stderr=subprocess.STDOUT)
    return serving(server, socket, log, "nbdkit")


def serving(server: subprocess.Popen, socket: Path, log: Path, what: str) -> tuple[subprocess.Popen, str]:
    """`server` and its export's URI once its socket is there; the run ends if it never comes."""
    deadline = time.monotonic() + 60
    while not socket.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            sys.exit(f"real_cluster.py: {what} did not start: {last_line(log.read_text())}")
        time.sleep(0.05)
    return server, f"nbd+unix:///{VOLUME}?socket={socket}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=10, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--baseline", type=Path, help="another pfnbd checkout to measure beside this one")
    options = parser.parse_args()
    for tool in ("gcc", "fio", "nbdkit"):
        if shutil.which(tool) is None:
            sys.exit(f"real_cluster.py: missing tool: {tool}")
    if not NBDKIT_HEADER.exists():
        sys.exit(f"real_cluster.py: missing {NBDKIT_HEADER} (apt-get install nbdkit-plugin-dev)")

    build = Path(cluster("build").strip().splitlines()[-1])
    library = str(build / "lib" / "libs5common.so")
    directory = Path(tempfile.mkdtemp(prefix="pfnbd-real-bench-", dir=options.workdir))
    loadgen = directory / "pf_loadgen"
    plugin = directory / "nbdkit-pureflash-plugin.so"
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(loadgen), str(Path(__file__).with_name("pf_loadgen.c")),
                    "-ldl"], check=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-shared", "-fPIC", "-o", str(plugin),
                    str(Path(__file__).with_name("nbdkit_pureflash.c")), "-ldl"], check=True)
    results: dict[tuple[str, str], list[float]] = {}
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        cluster("start", str(directory), timeout=600)
        subprocess.run(["curl", "-sf", f"http://127.0.0.1:49180/s5c/?op=create_volume&volume_name={VOLUME}"
                        f"&size={VOLUME_SIZE}"], check=True, capture_output=True)
        servers["pfnbd"] = start_pfnbd(directory, library, REPO_ROOT, "pfnbd")
        if options.baseline:
            servers["baseline"] = start_pfnbd(directory, library, options.baseline.resolve(), "baseline")
        servers["nbdkit"] = start_nbdkit(directory, library, plugin)
        # Written once end to end first, so reads do not meet never-written space.
        direct_iops(loadgen, library, directory / "pf.conf", WORKLOADS[3], max(10, options.runtime))
        columns = ["direct", *servers]

        def measure(name: str, workload: Workload) -> float:
            if name == "direct":
                return direct_iops(loadgen, library, directory / "pf.conf", workload, options.runtime)
            return nbd_iops(servers[name][1], directory / "fio.json", workload, options.runtime)

        for round_number in range(options.rounds):
            # Each round starts one column further on, so that each takes every place
            # in turn: whatever a run leaves the cluster with (its pollers spinning, its
            # disk's queue) falls on every column alike, not always on the same one.
            shift = round_number % len(columns)
            for workload in WORKLOADS:
                for name in columns[shift:] + columns[:shift]:
                    results.setdefault((workload.label, name), []).append(workload.value(measure(name, workload)))
                # Each round's figures too: on a busy machine they spread as far as the
                # ratios between the columns, which the medians alone would hide.
                print(f"round {round_number + 1}: {workload.label}: " + ", ".join(
                    f"{name} {results[(workload.label, name)][-1]:.1f}" for name in columns),
                    file=sys.stderr)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(timeout=30)
        if (directory / "run").exists():  # also after a start that failed half-way
            cluster("stop", str(directory), timeout=120)
        shutil.rmtree(directory, ignore_errors=True)

    print("\n".join(machine_lines()))
    print(f"{'workload':32} {'unit':6} " + " ".join(f"{name:>10}" for name in columns)
          + " " + " ".join(f"{name + '/direct':>15}" for name in servers) + f" {'pfnbd/nbdkit':>13}")
    for workload in WORKLOADS:
        medians = {name: statistics.median(results[(workload.label, name)]) for name in columns}
        print(f"{workload.label:32} {workload.unit:6} " + " ".join(f"{medians[name]:10.1f}" for name in columns)
              + " " + " ".join(f"{medians[name] / medians['direct']:15.2f}" for name in servers)
              + f" {medians['pfnbd'] / medians['nbdkit']:13.2f}")
    print(f"medians of {options.rounds} rounds of {options.runtime} s each", file=sys.stderr)


if __name__ == "__main__":
    main()
