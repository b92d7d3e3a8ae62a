"""What one request costs pfnbd: server CPU time and thread switches per request.

    python benchmarks/request_cost.py [--requests 30000] [--rounds 2] [--variant NAME=CODE ...]
    python benchmarks/request_cost.py --instructions [--requests 3000] [--variant NAME=CODE ...]

IOPS on a shared two-core machine move with whatever else runs; the CPU time the server
spends per request, and how often its threads are switched out per request (each switch
is a meeting of the trio thread and the library's thread, or a wait for the GIL), move
much less.  This starts `pfnbd serve` on a fresh 1 GiB volume, fills it, and runs a fixed
number of 4 KiB random reads and writes at QD32 through fio's nbd engine, reading the
server's CPU time and every thread's context switches from /proc before and after.

`--variant NAME=CODE` runs the server with CODE executed first, in the same rounds as the
unchanged server: the way to try a change to the data path (a monkeypatch, an affinity)
against today's code before writing it properly.  The figures in benchmarks/README.md's
"Where the time goes" came from it.

`--instructions` runs the server under valgrind's callgrind instead and counts the
instructions it executes per request, all threads, over the measured requests only.
Unlike time, the count hardly moves with the machine's load or its CPU model (two runs
agree within about 1%), so it tells a change of the per-request path from noise where
IOPS cannot.  Under valgrind the server is some fifty times slower and its batches are
fuller than they would be, so the count is for comparing variants, not a native figure.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from run import REPO_ROOT, cpu_ticks, machine_lines, percent, stolen_share

SERVE = ("from pfnbd.cli import main; import sys; "
         "sys.argv = ['pfnbd', 'serve', '--volume', 'bench', '--socket', sys.argv[1]]; main()")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of `pid`."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            text = Path(status).read_text()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        for line in text.splitlines():
            if "ctxt_switches:" in line:  # voluntary_ and nonvoluntary_
                total += int(line.split()[1])
    return total


def fio(uri: str, rw: str, requests: int) -> float:
    out = subprocess.run(
        ["fio", "--name=cost", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
         "--iodepth=32", f"--number_ios={requests}", "--size=1G", "--output-format=json"],
        capture_output=True, text=True, check=True, timeout=600).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["read" if rw == "randread" else "write"]["iops"]


@contextmanager
def serving(workdir: Path, prelude: str, start_timeout: float = 30,
            wrapper: Sequence[str] = ()) -> Iterator[tuple[subprocess.Popen, str]]:
    """`pfnbd serve` of the volume in `workdir`, CODE `prelude` executed first and the
    command prefixed by `wrapper` (valgrind): the process and its export's URI, until
    the block ends."""
    socket = workdir / "sock"
    server = subprocess.Popen([*wrapper, sys.executable, "-c", f"{prelude}\n{SERVE}", str(socket)],
                              env=server_env(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + start_timeout
        while not socket.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"request_cost.py: pfnbd did not start (variant {prelude!r})")
            time.sleep(0.05)
        yield server, f"nbd+unix:///bench?socket={socket}"
    finally:
        server.terminate()
        server.wait()
        socket.unlink(missing_ok=True)


def server_env(workdir: Path) -> dict[str, str]:
    return dict(os.environ, PFNBD_DATA_DIR=str(workdir), PYTHONPATH=str(REPO_ROOT))


def measure(workdir: Path, prelude: str, requests: int) -> list[tuple[str, float, float, float, str]]:
    with serving(workdir, prelude) as (server, uri):
        rows = []
        for rw in ("randread", "randwrite"):
            cpu, switched, ticks = cpu_seconds(server.pid), switches(server.pid), cpu_ticks()
            iops = fio(uri, rw, requests)
            rows.append((rw, iops, 1e6 * (cpu_seconds(server.pid) - cpu) / requests,
                         (switches(server.pid) - switched) / requests, percent(stolen_share(ticks))))
        return rows


def count_instructions(workdir: Path, prelude: str, requests: int) -> list[tuple[str, float]]:
    """Instructions per request of the server under callgrind, for reads then writes."""
    profile = workdir / "callgrind.out"
    callgrind = ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={profile}")
    with serving(workdir, prelude, start_timeout=300, wrapper=callgrind) as (server, uri):
        rows = []
        for rw in ("randread", "randwrite"):
            for dump in glob.glob(f"{profile}*"):
                os.unlink(dump)
            callgrind_control("--instr=on", server.pid)
            fio(uri, rw, requests)
            callgrind_control("--instr=off", server.pid)
            callgrind_control("--dump", server.pid)
            rows.append((rw, sum(map(dumped_instructions, glob.glob(f"{profile}*"))) / requests))
        return rows


def callgrind_control(option: str, pid: int) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True, timeout=120)


def dumped_instructions(path: str) -> int:
    """The instruction count of one callgrind dump (its `totals:` line: what ran since
    the dump before, all threads)."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"request_cost.py: no totals in {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30000, help="4 KiB requests per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=CODE",
                        help="also run the server with CODE executed first")
    parser.add_argument("--instructions", action="store_true",
                        help="count the server's instructions per request under callgrind instead")
    args = parser.parse_args()
    variants = [("pfnbd", "")] + [tuple(v.split("=", 1)) for v in args.variant]
    tools = ("fio", "valgrind", "callgrind_control") if args.instructions else ("fio",)
    for tool in tools:
        if shutil.which(tool) is None:
            package = "valgrind" if "grind" in tool else tool
            raise SystemExit(f"request_cost.py: missing tool: {tool} (apt-get install {package})")
    workdir = Path(tempfile.mkdtemp(prefix="pfnbd-cost-"))
    try:
        subprocess.run([sys.executable, "-m", "pfnbd", "volume", "create", "bench", "--size", "1G"],
                       env=server_env(workdir), check=True, capture_output=True)
        fill(workdir)
        if args.instructions:
            print("| variant | round | workload | instructions/request |")
            print("|---|---|---|---|")
        else:
            print("| variant | round | workload | IOPS | server CPU µs/request | switches/request | stolen |")
            print("|---|---|---|---|---|---|---|")
        for round_ in range(1, args.rounds + 1):
            for name, prelude in variants:
                if args.instructions:
                    for rw, instructions in count_instructions(workdir, prelude, args.requests):
                        print(f"| {name} | {round_} | 4k {rw} QD32 | {instructions:.0f} |", flush=True)
                    continue
                for rw, iops, cpu, switched, stolen in measure(workdir, prelude, args.requests):
                    print(f"| {name} | {round_} | 4k {rw} QD32 | {iops:.0f} | {cpu:.1f} | {switched:.2f} | {stolen} |",
                          flush=True)
        print("\n".join(machine_lines()))
    finally:
        shutil.rmtree(workdir)


def fill(workdir: Path) -> None:
    """Writes the whole volume once, unmeasured: reads of holes and first writes
    would cost otherwise."""
    with serving(workdir, "") as (_, uri):
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}",
                        "--rw=write", "--bs=1m", "--iodepth=8", "--size=1G"], capture_output=True, check=True)


if __name__ == "__main__":
    main()
