"""What one request costs pfnbd: server CPU time and thread switches per request.

    python benchmarks/request_cost.py [--requests 30000] [--rounds 2] [--variant NAME=CODE ...]

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


def measure(workdir: Path, prelude: str, requests: int) -> list[tuple[str, float, float, float, str]]:
    socket = workdir / "sock"
    env = dict(os.environ, PFNBD_DATA_DIR=str(workdir), PYTHONPATH=str(REPO_ROOT))
    server = subprocess.Popen([sys.executable, "-c", f"{prelude}\n{SERVE}", str(socket)], env=env,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"request_cost.py: pfnbd did not start (variant {prelude!r})")
            time.sleep(0.05)
        uri = f"nbd+unix:///bench?socket={socket}"
        rows = []
        for rw in ("randread", "randwrite"):
            cpu, switched, ticks = cpu_seconds(server.pid), switches(server.pid), cpu_ticks()
            iops = fio(uri, rw, requests)
            rows.append((rw, iops, 1e6 * (cpu_seconds(server.pid) - cpu) / requests,
                         (switches(server.pid) - switched) / requests, percent(stolen_share(ticks))))
        return rows
    finally:
        server.terminate()
        server.wait()
        socket.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30000, help="4 KiB requests per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=CODE",
                        help="also run the server with CODE executed first")
    args = parser.parse_args()
    variants = [("pfnbd", "")] + [tuple(v.split("=", 1)) for v in args.variant]
    if shutil.which("fio") is None:
        raise SystemExit("request_cost.py: missing tool: fio (apt-get install fio)")
    workdir = Path(tempfile.mkdtemp(prefix="pfnbd-cost-"))
    try:
        env = dict(os.environ, PFNBD_DATA_DIR=str(workdir), PYTHONPATH=str(REPO_ROOT))
        subprocess.run([sys.executable, "-m", "pfnbd", "volume", "create", "bench", "--size", "1G"],
                       env=env, check=True, capture_output=True)
        print("| variant | round | workload | IOPS | server CPU µs/request | switches/request | stolen |")
        print("|---|---|---|---|---|---|---|")
        for round_ in range(1, args.rounds + 1):
            for name, prelude in variants:
                if round_ == 1 and name == "pfnbd":
                    fill(workdir, env)
                for rw, iops, cpu, switched, stolen in measure(workdir, prelude, args.requests):
                    print(f"| {name} | {round_} | 4k {rw} QD32 | {iops:.0f} | {cpu:.1f} | {switched:.2f} | {stolen} |",
                          flush=True)
        print("\n".join(machine_lines()))
    finally:
        shutil.rmtree(workdir)


def fill(workdir: Path, env: dict) -> None:
    """Writes the whole volume once, unmeasured: reads of holes and first writes
    would cost otherwise."""
    socket = workdir / "sock"
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(socket)], env=env, stderr=subprocess.DEVNULL)
    try:
        while not socket.exists():
            time.sleep(0.05)
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri=nbd+unix:///bench?socket={socket}",
                        "--rw=write", "--bs=1m", "--iodepth=8", "--size=1G"], capture_output=True, check=True)
    finally:
        server.terminate()
        server.wait()
        socket.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
