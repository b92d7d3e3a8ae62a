"""`/metrics` for Prometheus, through the official `prometheus_client` library.

Nothing is counted for it: the data path already keeps per-connection counters
(`counters.RequestCounters`, plain ints), the bridges theirs, and the server the
totals of ended connections.  A custom collector sums them at scrape time, so
serving metrics costs the data path nothing beyond that counting.
prometheus_client answers scrapes in a thread of its own; the collector takes its
snapshot in trio's thread (through the trio token), never reading the server's
tables while trio changes them.  The parent of `--workers` serves the sum of its
workers' snapshots (`pfnbd/worker_stats.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import accumulate

import trio
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from . import protocol as p
from .counters import ANSWERED_COMMANDS, COMMAND_NAMES, DURATION_BOUNDS
from .server import ExportStats, Server, ServerStats
from .worker_stats import WorkerStats

BUCKET_LABELS = [*map(floatToGoString, DURATION_BOUNDS), "+Inf"]


def _error_name(error: int) -> str:
    try:
        return p.Errno(error).name
    except ValueError:
        return str(error)


class ServerCollector:
    def __init__(self, snapshot: Callable[[], ServerStats | None]) -> None:
        self._snapshot = snapshot  # None: the server is gone, an empty scrape

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        if snapshot is None:
            return
        yield from _export_metrics(snapshot.exports)
        yield from _backend_metrics(snapshot.exports)
        yield CounterMetricFamily("pfnbd_connections_accepted", "Connections accepted", value=snapshot.accepted)
        yield CounterMetricFamily("pfnbd_connections_refused", "Connections refused by --max-connections",
                                  value=snapshot.refused)
        yield CounterMetricFamily("pfnbd_handshakes_failed",
                                  "Connections that ended before transmission: timed out, broken, "
                                  "or not NBD (a client's NBD_OPT_ABORT is no failure)",
                                  value=snapshot.failed_handshakes)


def _export_metrics(exports: list[ExportStats]) -> Iterator[Metric]:
    requests = CounterMetricFamily("pfnbd_requests", "Requests answered", labels=["export", "command"])
    errors = CounterMetricFamily("pfnbd_request_errors", "Requests answered with an error, by NBD error",
                                 labels=["export", "command", "error"])
    durations = HistogramMetricFamily("pfnbd_request_duration_seconds",
                                      "Time from a request's header to its reply",
                                      labels=["export", "command"])
    bytes_read = CounterMetricFamily("pfnbd_bytes_read", "Bytes read by clients", labels=["export"])
    bytes_written = CounterMetricFamily("pfnbd_bytes_written", "Bytes written by clients", labels=["export"])
    connections = GaugeMetricFamily("pfnbd_connections", "Connections open", labels=["export"])
    in_flight = GaugeMetricFamily("pfnbd_requests_in_flight", "Requests read and not answered yet",
                                  labels=["export"])
    for export in exports:
        counters = export.counters
        for slot in ANSWERED_COMMANDS:
            command = COMMAND_NAMES[slot]
            requests.add_metric([export.name, command], counters.answered[slot])
            if counters.answered[slot]:  # a command never seen has no histogram, only its 0 above
                durations.add_metric([export.name, command],
                                     list(zip(BUCKET_LABELS, accumulate(counters.durations[slot]))),
                                     counters.seconds[slot])
        for (slot, error), count in sorted(counters.errors.items()):
            errors.add_metric([export.name, COMMAND_NAMES[slot], _error_name(error)], count)
        bytes_read.add_metric([export.name], counters.bytes_read)
        bytes_written.add_metric([export.name], counters.bytes_written)
        connections.add_metric([export.name], export.active)
        in_flight.add_metric([export.name], export.in_flight)
    yield from (requests, errors, durations, bytes_read, bytes_written, connections, in_flight)


def _backend_metrics(exports: list[ExportStats]) -> Iterator[Metric]:
    families = {
        "submits": CounterMetricFamily("pfnbd_backend_submits", "Submits to the volume library, resubmits included",
                                       labels=["export"]),
        "eagain_resubmits": CounterMetricFamily("pfnbd_backend_eagain_resubmits",
                                                "Submits the library refused with -EAGAIN, made again",
                                                labels=["export"]),
        "retries": CounterMetricFamily("pfnbd_backend_retries",
                                       "Times failed submits were made again after a transient completion status",
                                       labels=["export"]),
    }
    for export in exports:
        for key, family in families.items():
            family.add_metric([export.name], getattr(export.backend, key))
    yield from families.values()


def serve_metrics(server: Server, host: str, port: int):
    """Starts the HTTP server in its own thread; returns it (`shutdown()` stops it)."""
    token = trio.lowlevel.current_trio_token()

    def snapshot() -> ServerStats | None:
        try:
            return trio.from_thread.run_sync(server.snapshot, trio_token=token)
        except trio.RunFinishedError:
            return None

    return _serve(snapshot, host, port)


def serve_worker_metrics(workers: WorkerStats, host: str, port: int):
    """As `serve_metrics`, in the parent of `--workers`: their counters summed."""
    return _serve(workers.snapshot, host, port)


def _serve(snapshot: Callable[[], ServerStats | None], host: str, port: int):
    registry = CollectorRegistry()
    registry.register(ServerCollector(snapshot))
    http_server, _thread = start_http_server(port, host, registry=registry)
    return http_server
