"""Where pfnbd's Python threads run: together on one CPU, moved when others crowd it.

The trio thread and each volume's completion thread take turns with the GIL and never
run Python at once, so a CPU each gains them nothing; but every hand-over of the GIL
from one CPU to the other waits for that CPU to be woken, and under load the GIL
changes hands several times per batch of I/O.  On a 2-CPU VM, the same server with its
threads kept on one CPU served 4 KiB requests at QD32 at about 1.5x the rate, for about
two thirds of the CPU time per request (benchmarks/README.md, "Where the time goes").
Following the trio thread is not enough: the kernel wakes it on the idle CPU while the
completion thread still runs, so the trio thread is placed too.

`Placement` keeps the trio thread on one CPU of those the process may use, and moves
it when other programs take most of that CPU while another has most of its time
free; the completion threads follow it (`follow`, called by the bridge once a batch),
and the emulated library's never preempts it there (`yield_on_wakeup`).
The real library's own threads, which run no Python, are kept off that CPU
(`started_away`, below, says why).

Owner: each Python thread sets its own affinity; the real library's threads have theirs
set by the thread that opened the volume and then by the trio thread, under `_away_lock`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import trio

log = logging.getLogger(__name__)

PERIOD = 1.0  # seconds between looks at how busy the CPUs are
CROWDED = 0.5  # share of a period others must take of our CPU, and leave free of another, to move
# The CPUs the process was started on (taskset, systemd's CPUAffinity=): read at import,
# before anything here narrows the trio thread's.
PROCESS_CPUS = frozenset(os.sched_getaffinity(0))

# The calling thread's CPU (glibc reads it without a system call), asked with the GIL
# held: letting it go and taking it back would cost more than the call.
_sched_getcpu = getattr(ctypes.PyDLL(None), "sched_getcpu", None)
_followed = threading.local()  # per thread: the CPU `follow` last moved it to


def current_cpu() -> int:
    """The calling thread's CPU, or -1 where that cannot be known."""
    return _sched_getcpu() if _sched_getcpu is not None else -1


def _pin(cpus: set[int]) -> bool:
    """Keeps the calling thread on `cpus`; False (logged) where that is refused."""
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as error:  # a cpuset without those CPUs, or a sandbox that forbids it
        log.debug("cannot keep a thread on CPUs %s: %s", sorted(cpus), error)
        return False
    return True


def follow(cpu: int) -> None:
    """Moves the calling thread to `cpu` (the trio thread's, -1 if unknown) unless it
    was moved there already; tried once per move, whatever came of it."""
    if cpu >= 0 and getattr(_followed, "cpu", None) != cpu:
        _pin({cpu})
        _followed.cpu = cpu


def yield_on_wakeup() -> None:
    """Puts the calling thread in SCHED_BATCH, whose wake-ups never preempt the thread
    running on their CPU.

    For the emulated library's thread.  A submit wakes it on the trio thread's CPU;
    preempting the trio thread there only finds the GIL taken and blocks again, two
    context switches for nothing, which the real library's threads (no Python, no GIL)
    never pay.  As SCHED_BATCH it runs once the trio thread waits, with the whole batch
    queued: a third of the switches per request, and batches half as big again.  The
    real library's completion thread (`_drain`) is woken by the library, not by a
    submit, and stays as it is: made SCHED_BATCH it slowed 128 KiB streams on a real
    cluster by up to 15% (benchmarks/README.md, "The seventh session's machine")."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError) as error:  # a sandbox that forbids it; not Linux
        log.debug("cannot schedule a thread as SCHED_BATCH: %s", error)


def _threads() -> set[int]:
    """The process's threads; empty where /proc cannot be read now (no descriptor free)."""
    try:
        return {int(task) for task in os.listdir("/proc/self/task")}
    except OSError as error:
        log.debug("cannot list the process's threads: %s", error)
        return set()


# Threads that run no Python, kept off the trio thread's CPU: the real library's.  It
# guards its queues with spin locks, which the trio thread takes too when it submits;
# a library thread spinning on the trio thread's CPU keeps the holder from running
# and so from letting go.  On the real cluster of benchmarks/README.md that convoy
# held 4 KiB writes at QD32 to 435 IOPS, and 9535 once the library's threads were
# moved to the other CPU.  Written by the thread that opens a volume and by the trio
# thread (`Placement`), under the lock.
_away: set[int] = set()
_away_lock = threading.Lock()
_kept_on = -1  # the CPU `Placement` keeps the trio thread on; -1 while it keeps none


@contextlib.contextmanager
def started_away() -> Iterator[None]:
    """The threads started in the block run no Python: they are kept off the trio
    thread's CPU from now on, wherever `Placement` moves it."""
    before = _threads()
    try:
        yield
    finally:
        if before:  # else any thread might look new: none is moved
            with _away_lock:
                _away.update(_threads() - before)
                _place_away()


def _place_away() -> None:  # with _away_lock held
    cpus = set(PROCESS_CPUS) - {_kept_on} or set(PROCESS_CPUS)
    for thread in list(_away):
        try:
            os.sched_setaffinity(thread, cpus)
        except ProcessLookupError:  # it has ended
            _away.discard(thread)
        except OSError as error:
            log.debug("cannot keep thread %d on CPUs %s: %s", thread, sorted(cpus), error)


def _cpu_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU, (busy, idle) clock ticks since boot, from /proc/stat."""
    ticks = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            # user nice system idle iowait irq softirq steal (guest time is within user)
            values = list(map(int, fields[:8]))
            idle = values[3] + values[4]
            ticks[int(name[3:])] = (sum(values) - idle, idle)
    return ticks


def _process_ticks() -> int:
    """The CPU time of the whole process, in the same clock ticks."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _look() -> tuple[dict[int, tuple[int, int]], int] | None:
    """How busy the CPUs and the process have been, or None where /proc cannot be read
    now (every descriptor taken by clients, say): that period is skipped, the server
    goes on serving where it is."""
    try:
        return _cpu_ticks(), _process_ticks()
    except OSError as error:
        log.debug("cannot read how busy the CPUs are: %s", error)
        return None


@attrs.frozen
class Placement:
    """Keeps the calling trio thread on one CPU, and moves it when it is crowded.

    It starts on `first_cpu` if that is one of the process's, else where it runs:
    each of a server's workers is given its own (`pfnbd/workers.py`)."""

    first_cpu: int = -1

    async def run(self, shutdown: trio.Event) -> None:
        """Until `shutdown` is set."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep)
            await shutdown.wait()
            nursery.cancel_scope.cancel()

    async def _keep(self) -> None:
        """Nothing to do with one CPU, or where CPUs cannot be told apart."""
        on = self.first_cpu if self.first_cpu in PROCESS_CPUS else current_cpu()
        if len(PROCESS_CPUS) < 2 or on not in PROCESS_CPUS:
            return
        self._move(on)
        before = _look()
        while True:
            await trio.sleep(PERIOD)
            now = _look()
            if before and now and (better := self._better_cpu(_kept_on, before, now)) is not None:
                log.info("moving to CPU %d: other programs took most of CPU %d", better, _kept_on)
                self._move(better)
            before = now

    def _move(self, cpu: int) -> None:
        global _kept_on
        if _pin({cpu}):
            with _away_lock:
                _kept_on = cpu
                _place_away()

    def _better_cpu(self, on: int, before: tuple[dict[int, tuple[int, int]], int],
                    now: tuple[dict[int, tuple[int, int]], int]) -> int | None:
        """Another CPU of the process's with most of the period free, if others took most
        of ours (`on`).  Our own time counts against ours alone: an estimate on the safe side,
        as the real library's threads may run elsewhere."""
        (cpus_before, ours_before), (cpus_now, ours_now) = before, now

        def busy_idle(cpu: int) -> tuple[int, int]:
            (busy0, idle0), (busy1, idle1) = cpus_before.get(cpu, (0, 0)), cpus_now.get(cpu, (0, 0))
            return busy1 - busy0, idle1 - idle0

        busy, idle = busy_idle(on)
        if busy + idle <= 0 or busy - (ours_now - ours_before) <= CROWDED * (busy + idle):
            return None
        free = {cpu: busy_idle(cpu) for cpu in PROCESS_CPUS if cpu != on}
        best = max(free, key=lambda cpu: free[cpu][1], default=None)
        if best is None or free[best][1] <= CROWDED * sum(free[best]):
            return None
        return best
