"""What a connection counts of the requests it answers, for logs and metrics.

The data path runs tens of thousands of requests a second, so counting is plain ints
and lists indexed by command number: no label lookups, no locks (one connection's
counters are changed only by its own tasks, in trio's thread), no metric objects.
A request's duration lands in a histogram bucket found by bisection.  Totals over
connections are summed when someone asks (a scrape, a `stats` line), never per
request.
"""

from __future__ import annotations

from bisect import bisect_left

from . import protocol as p

# Command numbers the protocol defines are their own slots; any other number shares
# the last one.  DISC has a slot but never a count: it gets no reply.
OTHER = max(p.Command) + 1
SLOTS = OTHER + 1
COMMAND_NAMES = [*(p.Command(slot).name.lower() for slot in range(OTHER)), "other"]
ANSWERED_COMMANDS = [slot for slot in range(SLOTS) if slot != p.Command.DISC]
# Upper bounds (seconds) of the duration buckets, for requests that take from tens of
# microseconds (a read served from the page cache) to seconds (a flush, a retried
# submit); a last bucket, +Inf, takes the rest.
DURATION_BOUNDS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                   100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0)


def slot(command: int) -> int:
    return command if command < OTHER else OTHER


class RequestCounters:
    """One connection's counts, or the sum of several (`add`)."""

    __slots__ = ("answered", "seconds", "durations", "errors", "bytes_read", "bytes_written")

    def __init__(self) -> None:
        self.answered = [0] * SLOTS  # replies sent or queued, by slot
        self.seconds = [0.0] * SLOTS  # their durations summed, by slot
        self.durations = [[0] * (len(DURATION_BOUNDS) + 1) for _ in range(SLOTS)]  # by slot, by bucket
        self.errors: dict[tuple[int, int], int] = {}  # (slot, NBD error) -> error replies
        self.bytes_read = 0
        self.bytes_written = 0

    def answer(self, command: int, seconds: float) -> None:
        """A reply to `command`, `seconds` after its header arrived."""
        index = command if command < OTHER else OTHER
        self.answered[index] += 1
        self.seconds[index] += seconds
        self.durations[index][bisect_left(DURATION_BOUNDS, seconds)] += 1

    def answer_all(self, command: int, durations: list[float]) -> None:
        """`answer` of each of `durations`, all replies to `command`."""
        if not durations:
            return
        index = command if command < OTHER else OTHER
        self.answered[index] += len(durations)
        self.seconds[index] += sum(durations)
        buckets = self.durations[index]
        for seconds in durations:
            buckets[bisect_left(DURATION_BOUNDS, seconds)] += 1

    def refuse(self, command: int, error: int) -> None:
        """The reply to `command` is `error` (errors are rare: a dict is cheap enough)."""
        key = (slot(command), int(error))
        self.errors[key] = self.errors.get(key, 0) + 1

    def add(self, other: RequestCounters) -> None:
        for index in range(SLOTS):
            self.answered[index] += other.answered[index]
            self.seconds[index] += other.seconds[index]
            mine = self.durations[index]
            for bucket, count in enumerate(other.durations[index]):
                mine[bucket] += count
        for key, count in other.errors.items():
            self.errors[key] = self.errors.get(key, 0) + count
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written

    def summary(self) -> dict[str, int]:
        """The totals a log line shows."""
        return dict(requests=sum(self.answered), errors=sum(self.errors.values()),
                    bytes_read=self.bytes_read, bytes_written=self.bytes_written)

