"""benchmarks/run.py works end to end: a tiny `--quick` run against pfnbd and qemu-nbd
prints a median and a ratio for every workload issue 5 names, plus pfnbd's peak RSS, and
leaves no process or file behind. These tests check the harness, never anyone's speed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require

HARNESS = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
WORKLOAD_LABELS = [
    "nbdcopy file→NBD",
    "nbdcopy NBD→null (no extents)",
    "fio 4k randread QD32 ×1 conn",
    "fio 4k randwrite QD32 ×1 conn",
    "fio 4k randread QD32 ×4 conns",
    "fio 4k randwrite QD32 ×4 conns",
]


def run_harness(*args: str, timeout: float, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    """Runs the harness; past `timeout` it gets SIGTERM, so it still stops its servers."""
    process = subprocess.Popen([sys.executable, str(HARNESS), *args], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"benchmarks/run.py {' '.join(args)} ran over {timeout} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def table(stdout: str) -> list[dict[str, str]]:
    """The markdown table the harness prints, as one dict per row keyed by column title."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header, separator, *rows = [[cell.strip() for cell in line.strip("|").split("|")]
                                for line in lines]
    assert set("".join(separator)) == {"-"}, f"no table separator in:\n{stdout}"
    return [dict(zip(header, row, strict=True)) for row in rows]


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended while we looked
        if text in argv:
            found.append(argv)
    return found


def test_quick_run_prints_a_ratio_for_every_workload(tmp_path: Path) -> None:
    require("qemu-nbd", "nbdcopy", "nbdinfo", "fio")
    result = run_harness("--quick", "--size", "8M", "--servers", "pfnbd,pfnbd-workers,qemu-nbd",
                         "--workdir", str(tmp_path), timeout=300)
    assert result.returncode == 0, (f"harness exited {result.returncode}:\n"
                                    f"{result.stdout}\n{result.stderr}")

    rows = table(result.stdout)
    assert [row["workload"] for row in rows] == WORKLOAD_LABELS
    for row in rows:
        assert row["unit"] in ("MiB/s", "IOPS"), row
        for server in ("pfnbd", "pfnbd-workers", "qemu-nbd"):
            assert re.fullmatch(r"\d+(\.\d+k)?", row[server]), row
        assert float(row["pfnbd/qemu-nbd"]) > 0 and float(row["pfnbd-workers/qemu-nbd"]) > 0, row
    memory = {}
    for line, name in (("peak RSS (VmHWM)", "rss"), ("largest PSS read after a run", "pss")):
        found = re.search(rf"^{re.escape(line)}: pfnbd (\d+\.\d) MiB, pfnbd-workers (\d+\.\d) MiB, "
                          r"qemu-nbd (\d+\.\d) MiB$", result.stdout, re.MULTILINE)
        assert found, result.stdout
        memory[name] = [float(size) for size in found.groups()]
    # PSS counts once what the workers share with their parent; VmHWM sums it per process.
    assert all(0 < pss <= rss for pss, rss in zip(memory["pss"], memory["rss"])), memory
    assert memory["pss"][1] < memory["rss"][1], memory
    # The machine it came from, first: a table holds only for it.
    assert re.search(r"^machine: .+, \d+ CPUs, load average [\d.]+ at the end, [\d.]+% of the CPUs' time stolen", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^kernel: Linux .+; Python: CPython 3\..+, a 10-step loop in [1-9][0-9]* ns$",
                     result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^host: a socket's default send buffer \(net.core.wmem_default\) [1-9][0-9]* bytes; "
                     r"guest halt polling (\d+ ns|none .*)$", result.stdout, re.MULTILINE), result.stdout

    assert list(tmp_path.iterdir()) == [], "the harness left files in its --workdir"
    assert processes_mentioning(str(tmp_path)) == [], "the harness left servers running"


def test_a_missing_tool_is_named_in_one_line(tmp_path: Path) -> None:
    empty_path = {**os.environ, "PATH": str(tmp_path)}  # no nbdcopy, fio or qemu-nbd on it
    result = run_harness("--quick", "--servers", "qemu-nbd", env=empty_path, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "run.py: missing tool: nbdcopy (apt-get install libnbd-bin)\n"


def harness_module():
    """benchmarks/run.py imported, for its parts that need no server."""
    sys.path.insert(0, str(HARNESS.parent))
    try:
        import run
    finally:
        sys.path.remove(str(HARNESS.parent))
    return run


class FakeServer:
    name = "pfnbd"

    def check_alive(self) -> None:
        pass


def measured_with_steal(monkeypatch, shares: list[float]) -> tuple[object, object, object]:
    """`measure` of one run whose successive tries see the host take `shares` of the
    CPUs' time; the n-th try measures n.  Returns the harness module, the results and
    the bench."""
    run = harness_module()
    ticks = []
    for share in shares:  # each try reads the ticks before and after
        ticks += [(0, 0), (1000, int(1000 * share))]
    monkeypatch.setattr(run, "cpu_ticks", iter(ticks).__next__)
    tries = iter(range(1, 10))
    workload = run.Workload("randread-1", "fio 4k randread QD32 ×1 conn", "IOPS", lambda bench, server: next(tries))
    bench = run.Bench(1 << 20, Path("/nonexistent"), Path("/nonexistent"), 1, max_steal=0.05)
    results = run.Results()
    run.measure(bench, FakeServer(), workload, results, "[round 1/1]")
    return run, results, bench


def test_a_run_the_host_stole_from_is_measured_again(monkeypatch):
    _, results, _ = measured_with_steal(monkeypatch, [0.30, 0.02])
    assert results.samples["pfnbd", "randread-1"] == [2]  # the second try's
    assert results.stolen == []


def test_a_run_stolen_from_in_every_try_is_kept_and_reported(monkeypatch):
    run, results, bench = measured_with_steal(monkeypatch, [0.30, 0.20, 0.10])
    assert results.samples["pfnbd", "randread-1"] == [3]  # the last try's, whatever its steal
    assert results.stolen == [("pfnbd", "randread-1", 0.10)]
    monkeypatch.setattr(run, "cpu_ticks", lambda: (0, 0))  # for the machine line
    lines = run.report(results, ["pfnbd"], [run.WORKLOADS_BY_KEY["randread-1"]], bench, 1)
    assert ("STOLEN pfnbd fio 4k randread QD32 ×1 conn: the host took 10.0% of the CPUs' time in "
            "the run kept (over --max-steal 5% in all 3 tries)") in lines


def test_instruction_counts_see_work_added_to_each_request() -> None:
    """`request_cost.py --instructions` counts what a request executes: a variant that
    does a fixed extra loop as it starts every request comes out dearer by about the
    loop's cost, and the unchanged server's reads and writes both get a count."""
    require("fio", "valgrind", "callgrind_control")
    script = HARNESS.parent / "request_cost.py"
    extra = ("import pfnbd.transmission as t\n"
             "_started = t.Transmission._started\n"
             "def dearer(self, request, taken):\n"
             "    for _ in range(300): pass\n"
             "    return _started(self, request, taken)\n"
             "t.Transmission._started = dearer")
    result = subprocess.run(
        [sys.executable, str(script), "--instructions", "--requests", "300", "--rounds", "1",
         "--variant", f"dearer={extra}"],
        check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    counts = {(row["variant"], row["workload"]): int(row["instructions/request"])
              for row in table(result.stdout)}
    assert set(counts) == {(variant, f"4k {rw} QD32") for variant in ("pfnbd", "dearer")
                           for rw in ("randread", "randwrite")}
    for rw in ("randread", "randwrite"):
        plain, dearer = counts["pfnbd", f"4k {rw} QD32"], counts["dearer", f"4k {rw} QD32"]
        assert plain > 10_000, counts  # a request is tens of thousands of instructions
        # 300 empty iterations came out 23,000-37,000 instructions dearer here; two runs
        # of one server differ by about 1% (1,500).
        assert dearer - plain > 5_000, counts
