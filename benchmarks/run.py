"""Side-by-side benchmark: pfnbd against qemu-nbd (and nbdkit), same clients, same sizes.

    python benchmarks/run.py [--size 1G] [--rounds 3] [--runtime 10] [--quick]
                             [--servers pfnbd,pfnbd-workers,qemu-nbd,nbdkit] [--workloads ...] [--workdir DIR]

Every server serves one export named `bench` of the same size over a Unix socket in a
private temporary directory. Each round runs every workload against every server in turn
(the server order rotates from round to round, so no server always goes first), then the
medians over the rounds are printed as a table with the ratio of each server to qemu-nbd,
followed by each server's peak RSS and PSS. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import socket as stdlib_socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import urllib.request
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Callable

import attrs

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPORT = "bench"
MIB = 1 << 20
BASELINE = "qemu-nbd"
FULL_DEFAULTS = {"size": 1 << 30, "rounds": 3, "runtime": 10}
QUICK_DEFAULTS = {"size": 32 * MIB, "rounds": 2, "runtime": 1}
STEAL_RETRIES = 2  # extra tries of a run over --max-steal; the last one is kept whatever its steal
SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SCRAPE_INTERVAL = 1.0  # seconds between scrapes of pfnbd+metrics, as a Prometheus set to 1 s


class HarnessError(Exception):
    """A reason the harness cannot go on, printed as one line."""


class ClientFailed(Exception):
    """One client run against one server failed; the harness records it and goes on."""


# --- tools -------------------------------------------------------------------------------

@attrs.frozen
class Tool:
    program: str
    package: str  # the Debian package that provides it


NBDCOPY = Tool("nbdcopy", "libnbd-bin")
NBDINFO = Tool("nbdinfo", "libnbd-bin")
FIO = Tool("fio", "fio")
QEMU_NBD = Tool("qemu-nbd", "qemu-utils")
NBDKIT = Tool("nbdkit", "nbdkit")


def last_line(output: str) -> str:
    """The line of a program's stderr that usually says what went wrong."""
    return (output.strip().splitlines() or ["no output"])[-1]


def check_tools(tools: list[Tool]) -> None:
    for tool in tools:
        if shutil.which(tool.program) is None:
            raise HarnessError(f"missing tool: {tool.program} (apt-get install {tool.package})")
    # Debian's fio links libnbd in; a fio built without it has no `nbd` engine.
    if subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, timeout=60).returncode != 0:
        raise HarnessError("this fio has no nbd ioengine (`fio --enghelp=nbd` fails): "
                           "install Debian's fio, which is built with libnbd")


def check_pfnbd_runs() -> None:
    result = subprocess.run(pfnbd_argv("--help"), env=pfnbd_env(None), capture_output=True,
                            text=True, timeout=60)
    if result.returncode != 0:
        raise HarnessError(f"pfnbd is not runnable (`python -m pfnbd --help` exited "
                           f"{result.returncode}: {last_line(result.stderr)}); leave it out with "
                           f"--servers qemu-nbd,nbdkit")


# --- servers -----------------------------------------------------------------------------

def pfnbd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pfnbd", *args]


def pfnbd_env(server_dir: Path | None) -> dict[str, str]:
    """This checkout's pfnbd first on the path, its data directory inside `server_dir`."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    if server_dir is not None:
        env["PFNBD_DATA_DIR"] = str(server_dir / "data")
    return env


def create_pfnbd_volume(server_dir: Path, size: int) -> None:
    result = subprocess.run(pfnbd_argv("volume", "create", EXPORT, "--size", str(size)),
                            env=pfnbd_env(server_dir), capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise HarnessError(f"pfnbd volume create exited {result.returncode}: "
                           f"{last_line(result.stderr)}")


def create_raw_image(server_dir: Path, size: int) -> None:
    with open(server_dir / "bench.img", "wb") as image:
        image.truncate(size)  # sparse, like a freshly created pfnbd volume


def pfnbd_command(server_dir: Path, socket: Path) -> list[str]:
    return pfnbd_argv("serve", "--volume", EXPORT, "--socket", str(socket))


def pfnbd_workers_command(server_dir: Path, socket: Path) -> list[str]:
    """pfnbd with a worker per CPU the harness may use."""
    return [*pfnbd_command(server_dir, socket), "--workers", str(len(os.sched_getaffinity(0)))]


def pfnbd_metrics_command(server_dir: Path, socket: Path) -> list[str]:
    """pfnbd with `--metrics` on a free loopback port, which `start_server` scrapes."""
    with stdlib_socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (server_dir / "metrics-port").write_text(str(port))
    return [*pfnbd_command(server_dir, socket), "--metrics", f"127.0.0.1:{port}"]


def qemu_nbd_command(server_dir: Path, socket: Path) -> list[str]:
    # qemu-nbd's defaults (--cache=writeback, --aio=threads) spelled out; --persistent keeps
    # it serving after the first client leaves, -e 8 lets fio's 4 jobs connect at once.
    return ["qemu-nbd", "--socket", str(socket), "--format", "raw", "--export-name", EXPORT,
            "--shared", "8", "--persistent", "--cache", "writeback", "--aio", "threads",
            str(server_dir / "bench.img")]


def nbdkit_command(server_dir: Path, socket: Path) -> list[str]:
    return ["nbdkit", "--foreground", "--unix", str(socket), "--exportname", EXPORT,
            "file", f"file={server_dir / 'bench.img'}"]


@attrs.frozen
class ServerKind:
    name: str
    tools: tuple[Tool, ...]
    prepare: Callable[[Path, int], None]  # (its directory, size): creates what it serves
    command: Callable[[Path, Path], list[str]]  # (its directory, socket) -> argv
    env: Callable[[Path], dict[str, str] | None]
    # pfnbd promises exit 0 on SIGTERM; the peers may simply die of the signal.
    clean_exit_codes: frozenset[int]
    scraped: bool = False  # its /metrics is fetched every SCRAPE_INTERVAL while it serves


SERVER_KINDS = {
    kind.name: kind for kind in [
        ServerKind("pfnbd", (), create_pfnbd_volume, pfnbd_command, pfnbd_env, frozenset({0})),
        ServerKind("pfnbd-workers", (), create_pfnbd_volume, pfnbd_workers_command, pfnbd_env, frozenset({0})),
        # What serving metrics costs: the same pfnbd, scraped as Prometheus would scrape it.
        ServerKind("pfnbd+metrics", (), create_pfnbd_volume, pfnbd_metrics_command, pfnbd_env,
                   frozenset({0}), scraped=True),
        ServerKind("qemu-nbd", (QEMU_NBD,), create_raw_image, qemu_nbd_command,
                   lambda server_dir: None, frozenset({0, -signal.SIGTERM})),
        ServerKind("nbdkit", (NBDKIT,), create_raw_image, nbdkit_command,
                   lambda server_dir: None, frozenset({0, -signal.SIGTERM})),
    ]
}


DEFAULT_SERVERS = ["pfnbd", "pfnbd-workers", "qemu-nbd", "nbdkit"]


def die_with_parent() -> None:
    """Runs in the server's child process: if the harness is killed outright (SIGKILL,
    a test's timeout), the kernel sends the server SIGTERM instead of leaving it behind."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class Scraper:
    """Fetches a URL every SCRAPE_INTERVAL in a thread of its own until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.scrapes = 0
        self.failures = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(SCRAPE_INTERVAL):
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                self.failures += 1

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


@attrs.define
class RunningServer:
    kind: ServerKind
    process: subprocess.Popen
    socket: Path
    log_path: Path
    scraper: Scraper | None = None

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{EXPORT}?socket={self.socket}"

    def log_tail(self, lines: int = 3) -> str:
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(tail) if tail else "empty log"

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ClientFailed(f"{self.name} exited {self.process.returncode}: {self.log_tail()}")

    def _processes(self) -> list[int]:
        """The server's process and its children (`pfnbd serve --workers`' workers)."""
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        return [pid, *map(int, children)]

    def peak_rss_mib(self) -> float | None:
        """VmHWM, the most resident memory a process has had since it started, summed
        over the server's processes: for forked workers, which share their parent's
        pages until they write them, more than they ever held at once."""
        return self._summed_mib("status", "VmHWM")

    def pss_mib(self) -> float | None:
        """PSS now, summed over the server's processes: a page that n processes map counts
        1/n in each, so what forked workers share with their parent counts once."""
        return self._summed_mib("smaps_rollup", "Pss")

    def _summed_mib(self, proc_file: str, field: str) -> float | None:
        """A `FIELD:  N kB` line of /proc/PID/PROC_FILE, summed over the server's
        processes still running; None when none was read."""
        sizes = []
        for pid in self._processes():
            try:
                text = Path(f"/proc/{pid}/{proc_file}").read_text()
            except OSError:
                continue
            if match := re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE):
                sizes.append(int(match.group(1)) / 1024)
        return sum(sizes) if sizes else None

    def cpu_seconds(self) -> float | None:
        """CPU time of the server's processes still running."""
        ticks = []
        for pid in self._processes():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
            fields = stat.rsplit(")", 1)[1].split()
            ticks.append(int(fields[11]) + int(fields[12]))
        return sum(ticks) / os.sysconf("SC_CLK_TCK") if ticks else None

    def stop(self, timeout: float = 30) -> int:
        if self.scraper is not None:
            self.scraper.stop()
            progress(f"{self.name}: {self.scraper.scrapes} scrapes of {self.scraper.url}, "
                     f"{self.scraper.failures} failed")
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -signal.SIGKILL


def start_server(kind: ServerKind, workdir: Path, size: int) -> RunningServer:
    server_dir = workdir / kind.name
    server_dir.mkdir()
    kind.prepare(server_dir, size)
    socket = server_dir / "nbd.sock"
    log_path = server_dir / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(kind.command(server_dir, socket), env=kind.env(server_dir),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=die_with_parent)
    server = RunningServer(kind, process, socket, log_path)
    try:
        wait_until_serving(server, size)
        if kind.scraped:
            port = (server_dir / "metrics-port").read_text()
            server.scraper = Scraper(f"http://127.0.0.1:{port}/metrics")
    except BaseException:
        server.stop()
        raise
    return server


def wait_until_serving(server: RunningServer, size: int, timeout: float = 30) -> None:
    """Waits until `nbdinfo` reads the export's size through the socket, then checks it."""
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise HarnessError(f"{server.name} exited {server.process.returncode} at start: "
                               f"{server.log_tail()}")
        if server.socket.exists():
            result = subprocess.run(["nbdinfo", "--size", server.uri], capture_output=True,
                                    text=True, timeout=timeout)
            if result.returncode == 0:
                break
        if time.monotonic() > deadline:
            raise HarnessError(f"{server.name} was not serving after {timeout:.0f} s: "
                               f"{server.log_tail()}")
        time.sleep(0.05)
    if result.stdout.strip() != str(size):
        raise HarnessError(f"{server.name} serves {result.stdout.strip()} bytes, not {size}")


# --- workloads ---------------------------------------------------------------------------

@attrs.frozen
class Bench:
    size: int
    source: Path  # random data, copied into each server by "nbdcopy file→NBD"
    workdir: Path
    fio_runtime: int
    max_steal: float = 1.0  # a run in which the host took a bigger share is measured again

    @property
    def copy_timeout(self) -> float:
        return 60 + self.size / (10 * MIB)  # 10 MiB/s would be pathological


def run_client(argv: list[str], timeout: float) -> float:
    """Runs one client to completion and returns its wall-clock time in seconds."""
    started = time.monotonic()
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ClientFailed(f"{argv[0]} still running after {timeout:.0f} s") from None
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise ClientFailed(f"{argv[0]} exited {result.returncode}: {last_line(result.stderr)}")
    return elapsed


def copy_throughput(bench: Bench, source: str, destination: str) -> float:
    """MiB/s of one `nbdcopy --no-extents` of the whole export."""
    elapsed = run_client(["nbdcopy", "--no-extents", source, destination], bench.copy_timeout)
    return bench.size / MIB / elapsed


def measure_copy_in(bench: Bench, server: RunningServer) -> float:
    return copy_throughput(bench, str(bench.source), server.uri)


def measure_copy_out(bench: Bench, server: RunningServer) -> float:
    return copy_throughput(bench, server.uri, "null:")


def measure_fio(direction: str, jobs: int, bench: Bench, server: RunningServer) -> float:
    """IOPS of 4 KiB random `direction` ("read"/"write") at queue depth 32 per connection,
    summed over `jobs` connections (fio opens one NBD connection per job)."""
    output = bench.workdir / "fio.json"
    output.unlink(missing_ok=True)
    run_client(["fio", "--name=bench", "--ioengine=nbd", f"--uri={server.uri}",
                f"--rw=rand{direction}", "--bs=4k", "--iodepth=32", f"--numjobs={jobs}",
                "--group_reporting", "--time_based", f"--runtime={bench.fio_runtime}",
                "--output-format=json", f"--output={output}"],
               timeout=bench.fio_runtime + 60)
    job = json.loads(output.read_text())["jobs"][0]
    if job["error"]:
        raise ClientFailed(f"fio reported error {job['error']}")
    iops = job[direction]["iops"]
    if iops <= 0:
        raise ClientFailed("fio completed no I/O")
    return iops


@attrs.frozen
class Workload:
    key: str  # for --workloads
    label: str  # for the table
    unit: str
    measure: Callable[[Bench, RunningServer], float]


def fio_workload(direction: str, connections: int) -> Workload:
    plural = "s" if connections > 1 else ""
    return Workload(f"rand{direction}-{connections}",
                    f"fio 4k rand{direction} QD32 ×{connections} conn{plural}", "IOPS",
                    partial(measure_fio, direction, connections))


WORKLOADS = [
    Workload("copy-in", "nbdcopy file→NBD", "MiB/s", measure_copy_in),
    Workload("copy-out", "nbdcopy NBD→null (no extents)", "MiB/s", measure_copy_out),
    fio_workload("read", 1),
    fio_workload("write", 1),
    fio_workload("read", 4),
    fio_workload("write", 4),
]
WORKLOADS_BY_KEY = {workload.key: workload for workload in WORKLOADS}


# --- the run -----------------------------------------------------------------------------

@attrs.define
class Results:
    samples: dict[tuple[str, str], list[float]] = attrs.Factory(lambda: defaultdict(list))
    failures: dict[tuple[str, str], str] = attrs.Factory(dict)
    peak_rss_mib: dict[str, float] = attrs.Factory(dict)
    largest_pss_mib: dict[str, float] = attrs.Factory(dict)  # of those read after each run
    cpu_seconds: dict[str, float] = attrs.Factory(dict)
    exit_codes: dict[str, int] = attrs.Factory(dict)
    # Runs kept although the host took more than --max-steal of the CPUs' time in each try.
    stolen: list[tuple[str, str, float]] = attrs.Factory(list)  # (server, workload key, share)

    def record_usage(self, server: RunningServer) -> None:
        """Reads the server's peak RSS, PSS and CPU time while it runs; a server that has
        died keeps the last values read."""
        for usage, value in ((self.peak_rss_mib, server.peak_rss_mib()),
                             (self.cpu_seconds, server.cpu_seconds())):
            if value is not None:
                usage[server.name] = value
        if (pss := server.pss_mib()) is not None:
            self.largest_pss_mib[server.name] = max(pss, self.largest_pss_mib.get(server.name, 0))

    def median(self, server: str, workload: Workload) -> float | None:
        if (server, workload.key) in self.failures:
            return None
        return statistics.median(self.samples[server, workload.key])


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_random_source(path: Path, size: int) -> None:
    with open(path, "wb") as source:
        for _ in range(size // MIB):
            source.write(os.urandom(MIB))


def measure(bench: Bench, server: RunningServer, workload: Workload, results: Results,
            tag: str) -> None:
    """One run of one workload against one server; a failure marks that cell failed."""
    key = (server.name, workload.key)
    if key in results.failures:
        return
    for attempt in range(1 + STEAL_RETRIES):
        before = cpu_ticks()
        try:
            server.check_alive()
            value = workload.measure(bench, server)
        except ClientFailed as failure:
            try:
                server.check_alive()
            except ClientFailed as death:
                failure = death  # the server's own exit explains the client's failure best
            results.failures[key] = str(failure)
            progress(f"{tag} {workload.label:32} {server.name:9} FAILED: {failure}")
            return
        stolen = stolen_share(before)
        line = (f"{tag} {workload.label:32} {server.name:9} {format_value(workload.unit, value)} "
                f"{workload.unit} ({percent(stolen)} stolen)")
        if stolen <= bench.max_steal:
            break
        if attempt < STEAL_RETRIES:
            progress(f"{line}: over --max-steal, measured again")
    else:
        results.stolen.append((server.name, workload.key, stolen))
    results.samples[key].append(value)
    progress(line)


def rotated(items: list, by: int) -> list:
    by %= len(items)
    return items[by:] + items[:by]


def run_benchmark(bench: Bench, kinds: list[ServerKind], workloads: list[Workload],
                  rounds: int) -> Results:
    results = Results()
    servers: list[RunningServer] = []
    try:
        for kind in kinds:
            servers.append(start_server(kind, bench.workdir, bench.size))
        # Writes into a sparse file that allocate blocks are much slower than overwrites:
        # fill every export once, unmeasured, so each round finds the same state everywhere.
        for server in servers:
            progress(f"priming {server.name}: nbdcopy {bench.size // MIB} MiB into it")
            try:
                server.check_alive()
                measure_copy_in(bench, server)
            except ClientFailed as failure:
                for workload in workloads:
                    results.failures[server.name, workload.key] = f"priming failed: {failure}"
                progress(f"priming {server.name} FAILED: {failure}")
        for round_index in range(rounds):
            tag = f"[round {round_index + 1}/{rounds}]"
            for workload in workloads:
                for server in rotated(servers, round_index):
                    measure(bench, server, workload, results, tag)
                    results.record_usage(server)
    finally:
        for server in servers:
            results.exit_codes[server.name] = server.stop()
    return results


# --- the report --------------------------------------------------------------------------

def format_value(unit: str, value: float | None) -> str:
    if value is None:
        return "failed"
    if unit == "IOPS":
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}"


def format_ratio(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None:
        return "n/a"
    return f"{value / baseline:.2f}"


def cpu_ticks() -> tuple[int, int]:
    """(all, steal): the clock ticks of every CPU since boot, and those the hypervisor
    gave to other guests (/proc/stat; (0, 0) where there is none)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return 0, 0
    # user nice system idle iowait irq softirq steal (guest time is within user)
    ticks = list(map(int, fields))
    return sum(ticks), ticks[7] if len(ticks) > 7 else 0


TICKS_AT_START = cpu_ticks()


def stolen_share(before: tuple[int, int]) -> float:
    """The share of the CPUs' time the host took since `before` (`cpu_ticks`)."""
    (all_now, steal_now), (all_then, steal_then) = cpu_ticks(), before
    return (steal_now - steal_then) / (all_now - all_then) if all_now > all_then else 0.0


def percent(share: float) -> str:
    """A share as "4.2%"."""
    return f"{100 * share:.1f}%"


def machine_lines() -> list[str]:
    """What machine a table comes from: a figure holds only for the machine it was
    measured on, and only while its host lets it run.  On a VM whose host is busy the
    same server's rounds differ by a factor of three: the steal time says when."""
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown")
    return [
        f"machine: {model}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end, "
        f"{percent(stolen_share(TICKS_AT_START))} of the CPUs' time stolen by the host while it ran",
        f"kernel: {platform.system()} {platform.release()}; "
        f"Python: {platform.python_implementation()} {platform.python_version()} ({sys.executable}), "
        f"a 10-step loop in {interpreter_speed():.0f} ns",
        host_settings_line(),
    ]


# The host's settings that moved rows here by more than a round's spread
# (benchmarks/README.md, "The twenty-first session"): the send buffer a client's Unix
# socket gets (what it can queue before pfnbd drains it), and how long an idle guest
# CPU polls before it halts (waking a halted one costs the hypervisor a round trip).
SEND_BUFFER = Path("/proc/sys/net/core/wmem_default")
HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def host_settings_line() -> str:
    def read(path: Path) -> str | None:
        try:
            return path.read_text().strip()
        except OSError:
            return None

    halt_poll = read(HALT_POLL)
    return (f"host: a socket's default send buffer (net.core.wmem_default) {read(SEND_BUFFER) or 'unknown'} "
            f"bytes; guest halt polling {'none (no cpuidle-haltpoll)' if halt_poll is None else halt_poll + ' ns'}")


def interpreter_speed() -> float:
    """Nanoseconds this interpreter takes for `for i in range(10): x += i` here, best of
    five.  pfnbd (run with this interpreter) spends its requests in interpreted steps
    and the C servers do not, so a table's ratios to them move with this figure from one
    machine or Python build to another (benchmarks/README.md, "The twelfth session's
    machine")."""
    loops = 100_000
    return 1e9 * min(timeit.repeat("for i in range(10): x += i", "x = 0", number=loops, repeat=5)) / loops


def report(results: Results, servers: list[str], workloads: list[Workload], bench: Bench,
           rounds: int) -> list[str]:
    compared = [server for server in servers if server != BASELINE]
    ratio_columns = [f"{server}/{BASELINE}" for server in compared] if BASELINE in servers else []
    lines = [
        f"NBD server benchmark: {bench.size // MIB} MiB export over a Unix socket, "
        f"medians of {rounds} round(s), fio runtime {bench.fio_runtime} s",
        *machine_lines(),
        "",
        "| workload | unit | " + " | ".join(servers + ratio_columns) + " |",
        "|---" * (2 + len(servers) + len(ratio_columns)) + "|",
    ]
    for workload in workloads:
        medians = {server: results.median(server, workload) for server in servers}
        cells = [format_value(workload.unit, medians[server]) for server in servers]
        if ratio_columns:
            cells += [format_ratio(medians[server], medians[BASELINE]) for server in compared]
        lines.append(f"| {workload.label} | {workload.unit} | " + " | ".join(cells) + " |")
    lines.append("")
    if BASELINE not in servers:
        lines.append(f"no ratios: {BASELINE} is not among --servers")
    lines.append("peak RSS (VmHWM): " + ", ".join(
        f"{server} {format_usage(results.peak_rss_mib.get(server), 'MiB')}" for server in servers))
    lines.append("largest PSS read after a run: " + ", ".join(
        f"{server} {format_usage(results.largest_pss_mib.get(server), 'MiB')}" for server in servers))
    lines.append("server CPU time: " + ", ".join(
        f"{server} {format_usage(results.cpu_seconds.get(server), 's')}" for server in servers))
    for server, workload_key, stolen in results.stolen:
        lines.append(f"STOLEN {server} {WORKLOADS_BY_KEY[workload_key].label}: the host took "
                     f"{percent(stolen)} of the CPUs' time in the run kept (over --max-steal "
                     f"{100 * bench.max_steal:g}% in all {1 + STEAL_RETRIES} tries)")
    for (server, workload_key), failure in results.failures.items():
        lines.append(f"FAILED {server} {WORKLOADS_BY_KEY[workload_key].label}: {failure}")
    for server, code in results.exit_codes.items():
        if code not in SERVER_KINDS[server].clean_exit_codes:
            lines.append(f"FAILED {server} exited {code} on SIGTERM")
    return lines


def format_usage(value: float | None, unit: str) -> str:
    return "unknown" if value is None else f"{value:.1f} {unit}"


def clean(results: Results) -> bool:
    return not results.failures and all(code in SERVER_KINDS[server].clean_exit_codes
                                        for server, code in results.exit_codes.items())


# --- command line ------------------------------------------------------------------------

def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 64M)")
    size = int(match.group(1)) * SIZE_SUFFIXES[match.group(2).upper()]
    if size <= 0 or size % MIB:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 1 MiB: {text!r}")
    return size


def parse_choices(choices: list[str], text: str) -> list[str]:
    picked = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in picked if item not in choices]
    if unknown or not picked:
        raise argparse.ArgumentTypeError(f"pick from {','.join(choices)} (got {text!r})")
    return picked


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def percentage(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be 0 to 100: {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Benchmark pfnbd against qemu-nbd (and nbdkit) with nbdcopy and fio.")
    parser.add_argument("--size", type=parse_size,
                        help="export size, e.g. 1G (default 1G; 32M with --quick)")
    parser.add_argument("--rounds", type=positive_int,
                        help="rounds of every workload on every server (default 3; 2 with --quick)")
    parser.add_argument("--runtime", type=positive_int,
                        help="seconds per fio run (default 10; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="small and short: checks the harness works, numbers mean little")
    parser.add_argument("--servers", type=partial(parse_choices, list(SERVER_KINDS)),
                        default=DEFAULT_SERVERS,
                        help=f"comma-separated subset of {','.join(SERVER_KINDS)}, in table order "
                             f"(default: {','.join(DEFAULT_SERVERS)})")
    parser.add_argument("--workloads", type=partial(parse_choices, list(WORKLOADS_BY_KEY)),
                        default=list(WORKLOADS_BY_KEY),
                        help=f"comma-separated subset of {','.join(WORKLOADS_BY_KEY)} "
                             "(default: all)")
    parser.add_argument("--max-steal", type=percentage, default=5.0,
                        help="measure a run again (twice at most) when the host took more than "
                             "this percentage of the CPUs' time during it (default 5; 100: never)")
    parser.add_argument("--workdir", type=Path,
                        help="where the temporary images and sockets go (default: the system "
                             "temporary directory); needs (servers + 1) × size of disk")
    args = parser.parse_args(argv)
    for name, value in (QUICK_DEFAULTS if args.quick else FULL_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def raise_system_exit(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` that stops the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_system_exit)
    kinds = [SERVER_KINDS[name] for name in args.servers]
    workloads = [WORKLOADS_BY_KEY[key] for key in args.workloads]
    try:
        check_tools([NBDCOPY, NBDINFO, FIO, *(tool for kind in kinds for tool in kind.tools)])
        if any(kind.env is pfnbd_env for kind in kinds):
            check_pfnbd_runs()
        with tempfile.TemporaryDirectory(prefix="pfnbd-bench-", dir=args.workdir) as workdir:
            needed = (len(kinds) + 1) * args.size
            free = shutil.disk_usage(workdir).free
            if free < needed:
                raise HarnessError(f"{workdir} has {free // MIB} MiB free, the run needs "
                                   f"{needed // MIB} MiB (pick another --workdir)")
            bench = Bench(args.size, Path(workdir) / "source.img", Path(workdir), args.runtime,
                          args.max_steal / 100)
            write_random_source(bench.source, bench.size)
            results = run_benchmark(bench, kinds, workloads, args.rounds)
    except HarnessError as error:
        print(f"run.py: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("run.py: interrupted", file=sys.stderr)
        return 130
    print("\n".join(report(results, args.servers, workloads, bench, args.rounds)), flush=True)
    return 0 if clean(results) else 1


if __name__ == "__main__":
    sys.exit(main())
