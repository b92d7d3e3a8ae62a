"""Per-export I/O limits: set at start (`serve --throttle`) or live (QMP's
block_set_io_throttle), measured by fio and libnbd clients.  A limit holds within
±10%, is shared fairly by an export's connections, never slows another export,
and changes without the clients reconnecting.  The token buckets are also tested
on trio's mock clock."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest
import trio
import trio.testing

from conftest import SYSTEM_PYTHON, require, run_libnbd
from test_control import controlled, execute  # noqa: F401 (fixture)
from test_libnbd_clients import LIBNBD_HELPERS

from pfnbd.throttle import Limits, Throttle, ThrottleError

MiB = 1 << 20
SECONDS = 4  # per fio measurement: long enough that the initial burst (a tenth) is small


def fio(uri: str, *options: str, jobs: int = 1) -> list[dict]:
    """Runs fio's nbd engine for SECONDS; returns each job's JSON result."""
    require("fio")
    result = subprocess.run(
        ["fio", "--name=throttled", "--ioengine=nbd", f"--uri={uri}", "--size=16M", "--time_based",
         f"--runtime={SECONDS}", f"--numjobs={jobs}", "--output-format=json", *options],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    return json.loads(output[output.index("{"):])["jobs"]  # after its "connected" lines


def within(measured: float, limit: float, tolerance: float = 0.10) -> bool:
    return abs(measured - limit) <= tolerance * limit


def throttle_arguments(export_id: str, **limits: int) -> dict:
    return {"id": export_id, "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            **limits}


def test_read_limit_holds_is_fair_and_leaves_other_exports_alone(controlled):
    limit = 8 * MiB
    server, control = controlled({"slow": "16M", "fast": "16M"}, "--throttle", f"slow:bps={limit}")
    results: dict[str, list[dict]] = {}

    def measure(export: str) -> None:
        results[export] = fio(server.uri(export), "--rw=randread", "--bs=64k", "--iodepth=8", jobs=2)

    other = threading.Thread(target=measure, args=("fast",))
    other.start()
    measure("slow")
    other.join()
    slow = [job["read"]["bw_bytes"] for job in results["slow"]]
    fast = sum(job["read"]["bw_bytes"] for job in results["fast"])
    assert within(sum(slow), limit), f"{sum(slow) / MiB:.2f} MiB/s under a limit of {limit / MiB} MiB/s"
    # One bucket for the export, taken in turns: each connection gets about half.
    assert all(within(share, limit / 2, 0.25) for share in slow), [s / MiB for s in slow]
    assert fast > 4 * limit, f"the unthrottled export ran at {fast / MiB:.2f} MiB/s"


def test_write_iops_limit_set_live_holds(controlled):
    server, control = controlled({"test_v1": "16M"})
    execute(control, "block_set_io_throttle", throttle_arguments("test_v1", iops_wr=200))
    (job,) = fio(server.uri(), "--rw=randwrite", "--bs=4k", "--iodepth=16")
    assert within(job["write"]["iops"], 200), job["write"]["iops"]
    # Reads are not limited by a write limit.
    (reader,) = fio(server.uri(), "--rw=randread", "--bs=4k", "--iodepth=16")
    assert reader["read"]["iops"] > 4 * 200, reader["read"]["iops"]


# Reads 64 KiB at a time, 4 in flight, on one connection; for each "measure S" line on
# stdin, prints the bytes per second it read over S seconds.
MEASURE_ON_ONE_CONNECTION = r'''
import time
h = connect(sys.argv[1])
for line in sys.stdin:
    seconds = float(line.split()[1])
    done, end = 0, time.monotonic() + seconds
    started = time.monotonic()
    pending = []
    while time.monotonic() < end or pending:
        while time.monotonic() < end and len(pending) < 4:
            pending.append(h.aio_pread(nbd.Buffer(65536), (len(pending) * 65536) % (8 << 20)))
        h.poll(-1)
        finished = [c for c in pending if h.aio_command_completed(c)]
        done += 65536 * len(finished)
        pending = [c for c in pending if c not in finished]
    print(done / (time.monotonic() - started), flush=True)
'''


def test_raising_and_lifting_a_limit_takes_effect_without_reconnecting(controlled):
    server, control = controlled({"test_v1": "16M"}, "--throttle", "bps=2M")
    reader = subprocess.Popen([SYSTEM_PYTHON, "-c", LIBNBD_HELPERS + MEASURE_ON_ONE_CONNECTION, server.uri()],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def rate(seconds: float) -> float:
        reader.stdin.write(f"measure {seconds}\n")
        reader.stdin.flush()
        line = reader.stdout.readline()
        assert line, "the reader died"
        return float(line)

    try:
        low = rate(3)
        execute(control, "block_set_io_throttle", throttle_arguments("test_v1", bps=6 * MiB))
        high = rate(3)
        execute(control, "block_set_io_throttle", throttle_arguments("test_v1"))
        unlimited = rate(2)
        assert "export=test_v1" not in server.log()  # its connection has not ended: the same one throughout
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)
    assert within(low, 2 * MiB, 0.15), low / MiB
    assert within(high, 6 * MiB, 0.15), high / MiB
    assert unlimited > 4 * 6 * MiB, unlimited / MiB


def test_serve_throttle_mistakes_get_one_line(cli):
    cli.run("volume", "create", "test_v1", "--size", "16M")
    for option, words in [("nope:bps=1M", "no export named 'nope'"), ("bps=1X", "bps"),
                          ("iops_max=10", "iops_max requires")]:
        result = cli.run("serve", "--socket", "/nonexistent/x.sock", "--volume", "test_v1",
                         "--throttle", option, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and words in lines[0], result.stderr


# --- the token buckets, on trio's mock clock ---------------------------------------------


def run_with_clock(main) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("size", [4096, 65536, 4 * MiB])
def test_bucket_admits_the_rate_whatever_the_request_size(size):
    rate = 1 * MiB

    async def main():
        throttle = Throttle()
        throttle.set(Limits({"bps_rd": rate}))
        admitted = 0
        with trio.move_on_after(20):
            while True:
                await throttle.admit(False, size)
                admitted += size
        # The burst (a tenth of a second) and one request beyond the rate, at most.
        assert rate * 20 <= admitted <= rate * 20 + rate / 10 + size, admitted
        await throttle.admit(True, size)  # writes draw on no read bucket: at once

    run_with_clock(main)


def test_connections_take_turns_and_a_lifted_limit_frees_the_waiting():
    async def main():
        throttle = Throttle()
        throttle.set(Limits({"iops": 10}))
        counts = [0, 0, 0]

        async def connection(index: int) -> None:
            while True:
                await throttle.admit(index % 2 == 0, 512)
                counts[index] += 1

        async with trio.open_nursery() as nursery:
            for index in range(3):
                nursery.start_soon(connection, index)
            await trio.sleep(30)
            assert 10 * 30 - 3 <= sum(counts) <= 10 * 30 + 1 + 3, counts
            assert max(counts) - min(counts) <= 1, counts  # FIFO turns: none starves
            throttle.set(Limits({"iops": 1}))
            await trio.sleep(0.01)  # all three wait now, the next one for 0.9 s
            before, lifted_at = sum(counts), trio.current_time()
            throttle.set(Limits())
            for _ in range(1000):
                await trio.sleep(0)
                if sum(counts) > before + 100:
                    break
            # Freed at once: not a moment of the old limit's wait was spent.
            assert sum(counts) > before + 100 and trio.current_time() == lifted_at, counts
            nursery.cancel_scope.cancel()

    run_with_clock(main)


@pytest.mark.parametrize("values, words", [
    ({"bps": 1, "bps_rd": 1}, "same time"),
    ({"iops_max": 5}, "requires"),
    ({"bps": 10, "bps_max": 5}, "cannot be lower"),
    ({"bps": -1}, "non-negative"),
    ({"bps": True}, "integer"),
    ({"speed": 1}, "unknown"),
])
def test_limits_refuse_what_qemu_refuses(values, words):
    with pytest.raises(ThrottleError, match=words):
        Limits(values)


# Times `count` requests of each kind, one after another on one connection, and
# prints {kind: seconds}.
TIME_EACH_COMMAND = r'''
h = connect(sys.argv[1])
count, size = int(sys.argv[2]), int(sys.argv[3])
kinds = {
    "flush": lambda i: h.flush(),
    "trim": lambda i: h.trim(size, i * size),
    "block_status": lambda i: extents(h, size, i * size),
    "write_zeroes": lambda i: h.zero(size, i * size),
    "cache": lambda i: h.cache(size, i * size),
}
seconds = {}
for kind, request in kinds.items():
    start = time.monotonic()
    for i in range(count):
        request(i)
    seconds[kind] = time.monotonic() - start
    time.sleep(1)  # the bucket fills up again before the next kind
print(json.dumps(seconds))
'''


def admission_seconds(count: int, cost: float, rate: float) -> float:
    """How long `count` requests of `cost` each wait, one after another, for a limit
    of `rate` whose bucket starts full (QEMU's default burst, rate / 10): the first
    goes at once, the others once the bucket is out of debt."""
    return ((count - 1) * cost - rate / 10) / rate


@pytest.mark.parametrize("limit, count, size", [("iops=10", 30, 4096), ("bps=4194304", 9, MiB)])
def test_limits_count_what_qemu_counts_of_each_command(controlled, limit, count, size):
    """As QEMU's block layer (its throttle intercepts reads and writes of data only):
    a WRITE_ZEROES is a write and a CACHE a read of their whole length, for iops and
    bps limits; a FLUSH, a TRIM and a BLOCK_STATUS are not throttled at all."""
    server, control = controlled({"test_v1": "64M"}, "--throttle", f"test_v1:{limit}")
    seconds = json.loads(run_libnbd(LIBNBD_HELPERS + "import time\n" + TIME_EACH_COMMAND, server.uri(),
                                    str(count), str(size)))
    name, value = limit.split("=")
    expected = admission_seconds(count, size if name == "bps" else 1, int(value))
    for kind in ("write_zeroes", "cache"):
        assert 0.9 * expected <= seconds[kind] <= 1.25 * expected + 0.3, (kind, seconds, expected)
    for kind in ("flush", "trim", "block_status"):
        assert seconds[kind] < expected / 3, (kind, seconds, expected)
