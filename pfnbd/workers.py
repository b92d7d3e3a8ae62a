"""One server in several processes (`pfnbd serve --workers N`): their supervisor.

CPython runs one thread of Python at a time, so a server process is bound to one
CPU however many connections its clients bring.  With workers, the parent opens the
listening sockets and takes each head's writer lock (`Store.hold_writer`), then forks
N workers, each a whole server (its trio thread, its volumes and their `vol_proc`
threads) on the inherited sockets; the kernel hands each new connection to one of
them.  What keeps one volume consistent when several processes write it is argued in
benchmarks/README.md ("Part 3") and enforced below this layer: the kernel's page cache
and writeback errors are per file, a chunk is preserved under a lock on the map
(`pfnbd/store.py`), and a write of part of a sector is refused (`VolumeBridge`).

The parent serves no client (its `/metrics` sums the workers': `pfnbd/worker_stats.py`).
It forwards SIGTERM, SIGINT (as SIGTERM) and SIGUSR1 to every worker, starts a worker
again when one dies, and returns once every worker has exited after a stop signal.
Owner: the parent's main thread runs `supervise` (the metrics server's threads touch
only `WorkerStats`); a worker never returns into it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

import attrs

log = logging.getLogger(__name__)

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
WAITED_SIGNALS = STOP_SIGNALS | {signal.SIGUSR1, signal.SIGCHLD}
# A worker that dies sooner than this after its start is failing at start: starting it
# again would only repeat that, so the server stops.
MIN_LIFETIME = 2.0
_PR_SET_PDEATHSIG = 1


@attrs.define
class _Worker:
    index: int
    started: float


@contextlib.contextmanager
def waited_signals() -> Iterator[None]:
    """Holds the signals `supervise` waits for, from before the parent starts any thread
    (trio may, to resolve a name): a thread that had them unblocked would take a
    SIGTERM and die of it, instead of leaving it for `supervise`."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WAITED_SIGNALS)
    try:
        yield
    finally:
        # The parent is on its way out: a signal still pending must not kill it now.
        for signum in WAITED_SIGNALS - {signal.SIGCHLD}:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def supervise(count: int, run_worker: Callable[[int], int], on_started: Callable[[], None],
              on_stopping: Callable[[], None],
              forking: Callable[[int], contextlib.AbstractContextManager] = lambda index: contextlib.nullcontext(),
              ) -> int:
    """Runs `run_worker(index)` in `count` forked processes until a stop signal; 0 once
    all exited cleanly, 1 if one failed then or could not start.  Called within
    `waited_signals`.  In the parent, `on_started` runs once the first workers are
    forked, `on_stopping` when they are told to stop (no worker is started after it).
    Each fork of worker `index` happens within `forking(index)`, which its child
    never leaves."""
    workers: dict[int, _Worker] = {}
    stopping, failed = False, False

    def start(index: int) -> None:
        with forking(index):
            pid = _fork(index, run_worker)
        workers[pid] = _Worker(index, time.monotonic())
        log.debug("worker %d started, pid %d", index, pid)

    def stop(reason: str) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            log.info("%s: stopping %d workers", reason, len(workers))
            _signal_all(workers, signal.SIGTERM)
            on_stopping()

    try:
        for index in range(count):
            start(index)
        on_started()
        while workers:
            signum = signal.sigwaitinfo(WAITED_SIGNALS).si_signo
            if signum in STOP_SIGNALS:
                stop(signal.Signals(signum).name)
            elif signum == signal.SIGUSR1:
                _signal_all(workers, signal.SIGUSR1)
            for pid, status in _reap():
                worker = workers.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                if stopping:
                    # Killed by the SIGTERM itself: it came before the worker's own
                    # handler, so the worker had not served yet.
                    if code not in (0, -signal.SIGTERM):
                        log.error("worker %d (pid %d) exited with %s while stopping", worker.index, pid, _how(code))
                        failed = True
                elif time.monotonic() - worker.started < MIN_LIFETIME:
                    log.error("worker %d (pid %d) exited with %s at its start", worker.index, pid, _how(code))
                    failed = True
                    stop("a worker cannot start")
                else:
                    log.error("worker %d (pid %d) exited with %s: starting it again", worker.index, pid, _how(code))
                    start(worker.index)
    finally:
        if workers:  # the parent itself failed: its workers must not outlive it
            _signal_all(workers, signal.SIGTERM)
    return 1 if failed else 0


def _fork(index: int, run_worker: Callable[[int], int]) -> int:
    parent = os.getpid()
    # Out of the collector's reach, what the worker inherits stays shared with the
    # parent: a full collection writes the header of every object it visits, and a
    # child's first one copied 11 MiB of them (benchmarks/README.md, "Part 3").
    gc.freeze()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        # Until the worker's trio run catches them: a SIGTERM ends it before it has
        # served anything, SIGINT (the terminal's, which the parent turns into SIGTERM)
        # and SIGUSR1 are dropped.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WAITED_SIGNALS)
        # A worker whose parent is gone (killed) stops as at SIGTERM: nobody would
        # forward signals to it, and the writer lock must not outlive the server.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            code = 0
        else:
            code = run_worker(index)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never into the parent's stack: its cleanup is the parent's


def _reap() -> list[tuple[int, int]]:
    """Every exited worker's (pid, wait status)."""
    exited = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return exited
        if not pid:
            return exited
        exited.append((pid, status))


def _signal_all(workers: dict[int, _Worker], signum: int) -> None:
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:  # exited, not reaped yet
            pass


def _how(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
