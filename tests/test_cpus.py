"""pfnbd/cpus.py: the trio thread and the completion threads share one CPU, which moves
away from a CPU other programs crowd."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from conftest import require, run, wait_for
from pfnbd import cpus
from pfnbd.cpus import CROWDED, PROCESS_CPUS, Placement, started_away

TWO_CPUS = pytest.mark.skipif(len(PROCESS_CPUS) < 2, reason="needs two CPUs to choose from")


def decide(on: int, ours: int, ticks: dict[int, tuple[int, int]]) -> int | None:
    """Placement's choice after a period of 100 ticks per CPU, in which each CPU was
    busy for the ticks given (the rest idle) and we used `ours` of them."""
    before = {cpu: (0, 0) for cpu in ticks}, 0
    now = {cpu: (busy, 100 - busy) for cpu, (busy, _) in ticks.items()}, ours
    return Placement()._better_cpu(on, before, now)


@TWO_CPUS
def test_moves_when_others_take_most_of_our_cpu_and_another_is_mostly_free():
    a, b = sorted(PROCESS_CPUS)[:2]
    assert decide(a, ours=10, ticks={a: (90, 0), b: (20, 0)}) == b


@TWO_CPUS
def test_stays_when_the_cpu_is_busy_with_our_own_work():
    a, b = sorted(PROCESS_CPUS)[:2]
    assert decide(a, ours=95, ticks={a: (100, 0), b: (5, 0)}) is None


@TWO_CPUS
def test_stays_when_no_other_cpu_has_room():
    a, b = sorted(PROCESS_CPUS)[:2]
    crowded = int(100 * CROWDED) + 10
    assert decide(a, ours=0, ticks={a: (100, 0), b: (crowded, 0)}) is None


def threads_cpus(pid: int) -> dict[int, str]:
    """Each thread of `pid`, with the CPUs it may run on (as /proc lists them)."""
    return {thread: allowed for thread, (_, allowed) in threads(pid).items()}


def threads(pid: int) -> dict[int, tuple[str, str]]:
    """Each thread of `pid`: its name, and the CPUs it may run on."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        found[int(task.name)] = (status["Name"].strip(), status["Cpus_allowed_list"].strip())
    return found


def cpu_set(listed: str) -> set[int]:
    """The CPUs of a list as /proc writes it: "0-2,5"."""
    cpus = set()
    for part in listed.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def in_a_thread(function) -> None:
    """`function()` on a thread of its own: what it pins is not the test's thread."""
    thread = threading.Thread(target=function)
    thread.start()
    thread.join()


@TWO_CPUS
def test_threads_started_away_stay_off_the_trio_threads_cpu_as_it_moves():
    a, b = sorted(PROCESS_CPUS)[:2]
    stop = threading.Event()
    try:
        in_a_thread(lambda: Placement()._move(a))
        with started_away():
            library = threading.Thread(target=stop.wait)  # stands in for the library's C thread
            library.start()
        assert os.sched_getaffinity(library.native_id) == set(PROCESS_CPUS) - {a}
        in_a_thread(lambda: Placement()._move(b))
        assert os.sched_getaffinity(library.native_id) == set(PROCESS_CPUS) - {b}
    finally:
        stop.set()
        library.join()
        cpus._kept_on = -1
        cpus._away.clear()


def read_all(server) -> None:
    run("nbdcopy", "--no-extents", server.uri(), "null:")  # a new volume is all hole: read anyway


@TWO_CPUS
def test_server_threads_share_one_cpu_after_io(server):
    require("nbdcopy")
    read_all(server)
    pid = server.process.pid
    placed = threads_cpus(pid)
    assert len(placed) >= 2, placed  # the trio thread and the volume's vol_proc at least
    main = placed[pid]
    assert main.isdigit(), f"the trio thread may run on {main}"
    assert set(placed.values()) == {main}, placed


def test_the_volume_thread_does_not_preempt_the_trio_thread(server):
    """After I/O the volume's completion thread is SCHED_BATCH, and it alone: woken by a
    submit, it waits for the trio thread to wait instead of taking its CPU."""
    require("nbdcopy")
    read_all(server)
    pid = server.process.pid
    policies = {thread: os.sched_getscheduler(thread) for thread in threads(pid)}
    assert policies.pop(pid) == os.SCHED_OTHER
    assert list(policies.values()).count(os.SCHED_BATCH) == 1, policies


@TWO_CPUS
def test_server_leaves_a_cpu_a_busy_program_takes(server):
    require("nbdcopy", "taskset")
    read_all(server)
    pid = server.process.pid
    crowded = threads_cpus(pid)[pid]
    hog = subprocess.Popen(["taskset", "-c", crowded, sys.executable, "-c", "while True: pass"])
    try:
        wait_for(lambda: threads_cpus(pid)[pid] != crowded, f"the trio thread to leave CPU {crowded}",
                 timeout=15)
        moved = threads_cpus(pid)[pid]
        read_all(server)  # the volume's thread follows at its next batch
        assert set(threads_cpus(pid).values()) == {moved}, threads_cpus(pid)
    finally:
        hog.kill()
        hog.wait()
    assert "moving to CPU" in server.log()


def test_a_server_confined_to_one_cpu_stays_there(start_server):
    require("nbdcopy", "taskset")
    cpu = str(min(PROCESS_CPUS))
    server = start_server(preexec_fn=lambda: os.sched_setaffinity(0, {int(cpu)}))
    read_all(server)
    assert set(threads_cpus(server.process.pid).values()) == {cpu}


@TWO_CPUS
def test_placement_goes_on_when_proc_cannot_be_read(monkeypatch):
    """With every descriptor taken (a hostile client), reading /proc/stat fails: the
    server must go on serving, not end with an OSError."""
    def exhausted() -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(cpus, "_cpu_ticks", exhausted)
    errors = []

    async def main() -> None:
        with trio.move_on_after(5 * cpus.PERIOD):
            await Placement()._keep()

    def run_it() -> None:
        try:
            trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        except BaseException as error:  # noqa: BLE001 (reported to the test's thread)
            errors.append(error)

    try:
        in_a_thread(run_it)
    finally:
        cpus._kept_on = -1
    assert errors == []
