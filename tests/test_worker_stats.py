"""The sums the parent of `--workers` serves as `/metrics` (pfnbd/worker_stats.py);
test_metrics.py scrapes them with Prometheus, a worker killed on the way."""

import pickle
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pfnbd.counters import SLOTS, RequestCounters
from pfnbd.server import ExportStats, ServerStats
from pfnbd.volume import BackendCounters
from pfnbd.worker_stats import ANSWER_HEAD, QUERY, Link, combined, counted_only

counts = st.integers(min_value=0, max_value=1 << 40)


@st.composite
def export_stats(draw, name: str) -> ExportStats:
    counters = RequestCounters()
    counters.answered = draw(st.lists(counts, min_size=SLOTS, max_size=SLOTS))
    counters.bytes_read, counters.bytes_written = draw(counts), draw(counts)
    counters.errors = draw(st.dictionaries(st.tuples(st.integers(0, SLOTS - 1), st.integers(1, 108)), counts))
    backend = BackendCounters(draw(counts), draw(counts), draw(counts))
    return ExportStats(name, draw(counts), draw(counts), counters, backend, draw(counts))


@st.composite
def server_stats(draw) -> ServerStats:
    names = draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True))
    return ServerStats(draw(counts), draw(counts), draw(counts), draw(counts),
                       [draw(export_stats(name)) for name in names])


def exports_of(stats: list[ServerStats], name: str) -> list[ExportStats]:
    return [export for one in stats for export in one.exports if export.name == name]


@given(st.lists(server_stats(), max_size=4))
def test_the_sum_of_workers_stats_is_each_count_summed_by_export(stats):
    total = combined(stats)
    for field in ("accepted", "active", "refused", "failed_handshakes"):
        assert getattr(total, field) == sum(getattr(one, field) for one in stats)
    assert sorted(export.name for export in total.exports) == sorted(
        {export.name for one in stats for export in one.exports})
    for export in total.exports:
        parts = exports_of(stats, export.name)
        for field in ("connections", "active", "in_flight"):
            assert getattr(export, field) == sum(getattr(part, field) for part in parts)
        assert export.counters.answered == [sum(column) for column in zip(*(p.counters.answered for p in parts))]
        assert export.counters.bytes_written == sum(part.counters.bytes_written for part in parts)
        assert sum(export.counters.errors.values()) == sum(sum(p.counters.errors.values()) for p in parts)
        assert export.backend.submits == sum(part.backend.submits for part in parts)


@given(server_stats())
def test_an_exited_worker_leaves_its_counts_and_nothing_open(stats):
    left = counted_only(stats)
    assert left.active == 0
    assert all(export.active == export.in_flight == 0 for export in left.exports)
    assert [(e.name, e.connections, e.counters.answered, e.backend) for e in left.exports] == [
        (e.name, e.connections, e.counters.answered, e.backend) for e in stats.exports]
    assert (left.accepted, left.refused, left.failed_handshakes) == (
        stats.accepted, stats.refused, stats.failed_handshakes)


def test_summing_leaves_the_workers_stats_as_they_were():
    one = ServerStats(1, 1, 0, 0, [ExportStats("a", 1, 1, RequestCounters(), BackendCounters(1, 0, 0), 2)])
    combined([one, one])
    assert one.exports[0].backend.submits == 1 and one.exports[0].counters.answered == [0] * SLOTS


def answer(number: int, stats: ServerStats) -> bytes:
    pickled = pickle.dumps(stats)
    return ANSWER_HEAD.pack(number, len(pickled)) + pickled


def test_an_answer_too_late_for_its_scrape_is_not_taken_for_the_next_ones():
    ours, worker = socket.socketpair()
    with ours, worker:
        link = Link(ours)
        with pytest.raises(TimeoutError):
            link.ask(0.05)  # the worker is stalled
        late, current = ServerStats(1, 0, 0, 0, []), ServerStats(2, 0, 0, 0, [])
        # It answers the first query at last, in two pieces, and the second right after.
        first = answer(1, late)
        worker.sendall(first[:5])
        worker.sendall(first[5:] + answer(2, current))
        assert link.ask(1.0) == current
        assert worker.recv(2 * QUERY.size) == QUERY.pack(1) + QUERY.pack(2)
        worker.close()
        with pytest.raises((EOFError, BrokenPipeError)):  # gone
            link.ask(1.0)
