"""Per-export I/O limits in QEMU's terms (block_set_io_throttle), as token buckets.

One `Throttle` belongs to one export and is shared by all of its connections: each
connection's reader waits in `admit` before a request is submitted, and a FIFO lock
makes the connections take turns, so one of them cannot starve the others.  Other
exports have throttles of their own and never wait on this one.

QEMU's semantics, simplified to one bucket per limit: a limit of `avg` units per
second refills its bucket at that rate; the bucket holds `max * max_length` units
when a burst `max` is given, else `avg / 10` (QEMU's default burst).  A request is
admitted once every bucket it draws on is not in debt, and then takes its whole
cost, so a request bigger than the bucket runs the bucket into debt that later
requests wait out: the average holds whatever the request sizes.
"""

from __future__ import annotations

import attrs
import trio

# QEMU's names: the limit on read + write, on reads, on writes; bytes and requests.
LIMITS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")
BURSTS = tuple(f"{name}_max" for name in LIMITS)
BURST_LENGTHS = tuple(f"{name}_max_length" for name in LIMITS)
DEFAULT_BURST_DIVISOR = 10  # QEMU's throttle_fix_bucket: no max means avg / 10
# Waits shorter than this are none: a deadline of now plus a rounding error is now,
# and a bucket refilled over no time would stay in debt forever.
NEGLIGIBLE_WAIT = 1e-6


class ThrottleError(ValueError):
    """Limits that contradict each other, in QEMU's words where QEMU has them."""


@attrs.frozen
class Limits:
    """What `block_set_io_throttle` sets: 0 means no limit."""

    values: dict[str, int] = attrs.field(factory=dict)  # LIMITS, BURSTS and BURST_LENGTHS

    def __attrs_post_init__(self) -> None:
        for key, value in self.values.items():
            if key not in LIMITS + BURSTS + BURST_LENGTHS:
                raise ThrottleError(f"unknown limit {key!r}")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ThrottleError(f"{key} must be a non-negative integer")
        for kind in ("bps", "iops"):
            if self[kind] and (self[f"{kind}_rd"] or self[f"{kind}_wr"]):
                raise ThrottleError(f"{kind}({kind}_rd/{kind}_wr) and {kind} cannot be used at the same time")
        for name in LIMITS:
            if self[f"{name}_max"] and not self[name]:
                raise ThrottleError(f"{name}_max requires a corresponding {name} value")
            if self[f"{name}_max"] and self[f"{name}_max"] < self[name]:
                raise ThrottleError(f"{name}_max cannot be lower than {name}")

    def __getitem__(self, key: str) -> int:
        return self.values.get(key, 0)

    @property
    def limited(self) -> bool:
        return any(self[name] for name in LIMITS)

    def as_arguments(self) -> dict[str, int]:
        """Every limit and burst, as query commands show them."""
        return {key: self[key] for key in LIMITS + BURSTS}


class _Bucket:
    def __init__(self, rate: float, capacity: float, counts_bytes: bool, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.counts_bytes = counts_bytes
        self.tokens = capacity  # a new limit starts with a full bucket
        self.updated = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + self.rate * (now - self.updated))
        self.updated = now

    def wait(self) -> float:
        """Seconds until the bucket is out of debt."""
        return max(0.0, -self.tokens / self.rate)


def _bucket(limits: Limits, name: str, now: float) -> _Bucket | None:
    rate = limits[name]
    if not rate:
        return None
    burst = limits[f"{name}_max"]
    capacity = burst * (limits[f"{name}_max_length"] or 1) if burst else rate / DEFAULT_BURST_DIVISOR
    return _Bucket(rate, capacity, name.startswith("bps"), now)


class Throttle:
    """The limits of one export, shared by its connections."""

    def __init__(self) -> None:
        self._turns = trio.Lock()  # FIFO: connections wait their turn in order
        self._changed = trio.Event()
        self._reading: list[_Bucket] = []
        self._writing: list[_Bucket] = []
        self.limits = Limits()
        self.limited = False  # read on every request: when false, `admit` is not called

    def set(self, limits: Limits) -> None:
        """Takes effect at once, for requests waiting too: buckets start over full."""
        now = trio.current_time()
        buckets = {name: _bucket(limits, name, now) for name in LIMITS}
        self._reading = [b for n in ("bps", "bps_rd", "iops", "iops_rd") if (b := buckets[n])]
        self._writing = [b for n in ("bps", "bps_wr", "iops", "iops_wr") if (b := buckets[n])]
        self.limits = limits
        self.limited = limits.limited
        self._changed.set()  # a waiter re-reads the new buckets
        self._changed = trio.Event()

    async def admit(self, is_write: bool, length: int) -> None:
        """Waits until a request of `length` bytes may be submitted, and takes its cost."""
        async with self._turns:
            while True:
                buckets = self._writing if is_write else self._reading
                now = trio.current_time()
                for bucket in buckets:
                    bucket.refill(now)
                wait = max((bucket.wait() for bucket in buckets), default=0.0)
                if wait < NEGLIGIBLE_WAIT:
                    for bucket in buckets:
                        bucket.tokens -= length if bucket.counts_bytes else 1
                    return
                with trio.move_on_after(wait):
                    await self._changed.wait()
