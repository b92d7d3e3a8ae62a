"""`/metrics` for Prometheus, through the official `prometheus_client` library.

Nothing is counted for it: the data path already keeps per-connection counters
(`transmission.Counters`) and the server their per-export totals.  A scrape reads
those, so serving metrics costs the data path nothing.  prometheus_client answers
scrapes in a thread of its own; the collector takes its snapshot in trio's thread
(through the trio token), never reading the server's tables while trio changes them.
"""

from __future__ import annotations

from collections.abc import Iterator

import trio
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .server import Server, ServerStats

SCRAPE_TIMEOUT = 10.0  # seconds a scrape waits for trio's thread


class ServerCollector:
    def __init__(self, server: Server, token: trio.lowlevel.TrioToken) -> None:
        self._server = server
        self._token = token

    def _snapshot(self) -> ServerStats | None:
        try:
            return trio.from_thread.run_sync(self._server.snapshot, trio_token=self._token)
        except trio.RunFinishedError:
            return None  # the server is gone: an empty scrape

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        if snapshot is None:
            return
        per_export = {
            "requests": CounterMetricFamily("pfnbd_requests", "Requests answered", labels=["export"]),
            "errors": CounterMetricFamily("pfnbd_request_errors", "Requests answered with an error",
                                          labels=["export"]),
            "bytes_read": CounterMetricFamily("pfnbd_bytes_read", "Bytes read by clients", labels=["export"]),
            "bytes_written": CounterMetricFamily("pfnbd_bytes_written", "Bytes written by clients",
                                                 labels=["export"]),
        }
        connections = GaugeMetricFamily("pfnbd_connections", "Connections open", labels=["export"])
        in_flight = GaugeMetricFamily("pfnbd_requests_in_flight", "Requests read and not answered yet",
                                      labels=["export"])
        for export in snapshot.exports:
            for key, family in per_export.items():
                family.add_metric([export.name], export.counters[key])
            connections.add_metric([export.name], export.active)
            in_flight.add_metric([export.name], export.in_flight)
        yield from per_export.values()
        yield connections
        yield in_flight
        yield CounterMetricFamily("pfnbd_connections_accepted", "Connections accepted", value=snapshot.accepted)
        yield CounterMetricFamily("pfnbd_connections_refused", "Connections refused by --max-connections",
                                  value=snapshot.refused)


def parse_address(text: str, default_host: str) -> tuple[str, int]:
    """`[ADDR:]PORT` -> (host, port); ValueError for anything else."""
    host, colon, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"invalid --metrics {text!r}: give [ADDR:]PORT")
    return (host.strip("[]") if colon else default_host) or default_host, int(port)


def serve_metrics(server: Server, host: str, port: int):
    """Starts the HTTP server in its own thread; returns it (`shutdown()` stops it)."""
    registry = CollectorRegistry()
    registry.register(ServerCollector(server, trio.lowlevel.current_trio_token()))
    http_server, _thread = start_http_server(port, host, registry=registry)
    return http_server
