"""The `pfnbd` command line: volume management and the server."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import re
import signal
import socket as stdlib_socket
import ssl
import sys
from collections.abc import Callable
from functools import partial
from http.server import HTTPServer
from pathlib import Path
from typing import Annotated, Optional

import attrs
import trio
import typer

from . import protocol as p
from .control import ControlError, ExportControl, call, serve_control
from .negotiation import TlsMode
from .conductor import Conductor
from .cpus import PROCESS_CPUS, Placement
from .pureflash import DEFAULT_CONF, LIBRARY_ENV, MIN_IO_DEADLINE, PureFlashClient
from .server import (
    HANDSHAKE_TIMEOUT, SHUTDOWN_TIMEOUT, ConnectionShares, ExportSpec, ListenError, Policy, Server,
    listener_name, logfmt, open_exports, open_tcp_listeners, open_unix_listener, remove_socket, SocketFile,
    socket_file, systemd_listeners,
)
from .store import SUFFIX_SHIFT, Store, StoreError, human_size, split_snapshot_name
from .throttle import BURSTS, LIMITS, Limits, ThrottleError
from .tls import TlsConfigError, server_context
from .transfer import export_cluster_volume, export_volume, import_cluster_volume, import_volume
from .volume import DEFAULT_IO_DEPTH, PF_MAX_IO_DEPTH, RETRY_TIME_LIMIT, EmulatedClient, Faults, VolumeClient, VolumeOpenError
from .worker_stats import WorkerStats, answer_queries
from .workers import supervise, waited_signals

log = logging.getLogger("pfnbd")

DEFAULT_PORT = 10809
DEFAULT_BIND = "127.0.0.1"  # serving the network is the operator's explicit choice
DEFAULT_VOLUME = "default"
DEFAULT_VOLUME_SIZE = "1G"
SIZE = re.compile(r"(\d+)([KMGT]?)", re.IGNORECASE)
LOG_FORMAT = "%(asctime)s {name}: %(message)s"

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Serve PureFlash volumes over NBD.",
)
volume_app = typer.Typer(no_args_is_help=True, help="Manage the volumes of the embedded cluster, or with --backend pureflash a real one.")
app.add_typer(volume_app, name="volume")
export_app = typer.Typer(no_args_is_help=True, help="Manage the exports of a running server (its --control socket).")
app.add_typer(export_app, name="export")


# click's UsageError, whether typer vendors click or uses the installed one.
UsageError = typer.BadParameter.__base__


class CliError(Exception):
    """A mistake of the user's: one line on stderr, exit 1."""


def default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(xdg) / "pfnbd"


def parse_size(text: str) -> int:
    """Bytes, or a number with one binary suffix K/M/G/T, as `pfcli -s` takes it."""
    match = SIZE.fullmatch(text.strip())
    if not match:
        raise CliError(f"invalid size {text!r}: give bytes or a number with K, M, G or T")
    size = int(match[1]) << SUFFIX_SHIFT[match[2].upper()]
    if size == 0 or size % p.SECTOR:
        raise CliError(f"invalid size {text!r}: must be a positive multiple of {p.SECTOR} bytes")
    return size


@app.callback()
def main_options(
    ctx: typer.Context,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", envvar="PFNBD_DATA_DIR", show_default="$XDG_DATA_HOME/pfnbd",
        help="Where the embedded cluster keeps its volumes.")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging.")] = 0,
) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format=LOG_FORMAT.format(name="pfnbd"),
    )
    ctx.obj = Store(data_dir or default_data_dir())


class Backend(str, enum.Enum):
    EMULATED = "emulated"
    PUREFLASH = "pureflash"


BackendOption = Annotated[Backend, typer.Option(
    "--backend", case_sensitive=False,
    help="emulated: the embedded cluster of the data directory; pureflash: a real cluster "
         f"(serve: through the shared libs5common named by ${LIBRARY_ENV}; volume: through "
         "its conductor).")]
ConfOption = Annotated[Optional[Path], typer.Option(
    "--conf", help="PureFlash client configuration, for --backend pureflash.",
    show_default=str(DEFAULT_CONF))]


def _volumes(ctx: typer.Context, backend: Backend, conf: Path | None) -> Store | Conductor:
    """Where `volume` subcommands act: the data directory, or a real cluster's conductor."""
    if backend is Backend.PUREFLASH:
        return Conductor(conf or DEFAULT_CONF)
    if conf is not None:
        raise CliError("--conf needs --backend pureflash")
    return ctx.obj


@volume_app.command("create")
def volume_create(
    ctx: typer.Context,
    name: str,
    size: Annotated[str, typer.Option("--size", "-s", help="Bytes, or with a K/M/G/T suffix.")],
    replicas: Annotated[int, typer.Option("--replicas", "-r", help="Replica count, 1 to 3.")] = 1,
    backend: BackendOption = Backend.EMULATED,
    conf: ConfOption = None,
) -> None:
    """Create a volume."""
    meta = _volumes(ctx, backend, conf).create(name, parse_size(size), replicas)
    typer.echo(f"created volume {meta.name}: {human_size(meta.size)}")


@volume_app.command("list")
def volume_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    backend: BackendOption = Backend.EMULATED,
    conf: ConfOption = None,
) -> None:
    """List volumes."""
    volumes = _volumes(ctx, backend, conf).list()
    if as_json:
        typer.echo(json.dumps([v.to_json() for v in volumes], indent=2))
        return
    _echo_table([("NAME", "SIZE", "REPLICAS", "ID", "SNAPSHOTS")] + [
        (v.name, human_size(v.size), str(v.replicas), str(v.id), ",".join(s.name for s in v.snapshots) or "-")
        for v in volumes])


def _echo_table(rows: list[tuple[str, ...]]) -> None:
    """Rows in columns as wide as their widest cell, the first row the heading."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@volume_app.command("info")
def volume_info(
    ctx: typer.Context,
    name: str,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    backend: BackendOption = Backend.EMULATED,
    conf: ConfOption = None,
) -> None:
    """Show one volume."""
    meta = _volumes(ctx, backend, conf).get(name)
    if as_json:
        typer.echo(json.dumps(meta.to_json(), indent=2))
        return
    for key, value in meta.to_json().items():
        if key != "snapshots":
            typer.echo(f"{key}: {value}")
    for snapshot in meta.snapshots:
        typer.echo(f"snapshot: {snapshot.name} (id {snapshot.id}, created {snapshot.created})")


@volume_app.command("snapshot")
def volume_snapshot(
    ctx: typer.Context, name: str, snapshot: str,
    backend: BackendOption = Backend.EMULATED,
    conf: ConfOption = None,
) -> None:
    """Take a snapshot: it keeps this moment's data while the volume moves on."""
    _volumes(ctx, backend, conf).create_snapshot(name, snapshot)
    typer.echo(f"created snapshot {name}@{snapshot}")


@volume_app.command("snapshot-delete")
def volume_snapshot_delete(
    ctx: typer.Context, name: str, snapshot: str,
    backend: BackendOption = Backend.EMULATED,
    conf: ConfOption = None,
) -> None:
    """Delete a snapshot."""
    _volumes(ctx, backend, conf).delete_snapshot(name, snapshot)
    typer.echo(f"deleted snapshot {name}@{snapshot}")


@volume_app.command("delete")
def volume_delete(
    ctx: typer.Context, name: str,
    backend: BackendOption = Backend.EMULATED,
    conf: ConfOption = None,
) -> None:
    """Delete a volume and its data."""
    _volumes(ctx, backend, conf).delete(name)
    typer.echo(f"deleted volume {name}")


@volume_app.command("diff")
def volume_diff(
    ctx: typer.Context,
    name: str,
    from_snapshot: Annotated[str, typer.Option("--from", help="The older snapshot.")],
    to_snapshot: Annotated[Optional[str], typer.Option(
        "--to", help="The newer snapshot (default: the volume as it is now).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show what changed since a snapshot, as `rbd diff --from-snap`: extents that may
    differ, each `data`, or `zero` where the newer side reads as zeros."""
    changed = [dict(offset=offset, length=length, type="zero" if zero else "data")
               for offset, length, zero in ctx.obj.diff(name, from_snapshot, to_snapshot)]
    if as_json:
        typer.echo(json.dumps(changed, indent=2))
        return
    _echo_table([("Offset", "Length", "Type")] + [(str(c["offset"]), str(c["length"]), c["type"]) for c in changed])


def _progress(label: str):
    """A progress bar on a terminal; elsewhere just the label (click decides)."""

    @contextlib.contextmanager
    def start(total: int):
        with typer.progressbar(length=total, label=label, file=sys.stderr) as bar:
            yield bar.update

    return start


@volume_app.command("import")
def volume_import(
    ctx: typer.Context,
    name: str,
    source: Path,
    replicas: Annotated[int, typer.Option("--replicas", "-r", help="Replica count, 1 to 3.")] = 1,
    backend: BackendOption = Backend.EMULATED,
    conf: ConfOption = None,
) -> None:
    """Create a volume from a disk image (raw; qcow2 and others through qemu-img)."""
    if not source.is_file():
        raise CliError(f"{source} is not a file")
    volumes = _volumes(ctx, backend, conf)
    progress = _progress(f"importing {source}")
    if backend is Backend.PUREFLASH:
        client = PureFlashClient(conf)
        with client.library_log_held():  # a volume it cannot open: one line
            size = import_cluster_volume(volumes, client, name, source, progress, replicas)
    else:
        size = import_volume(volumes, name, source, progress, replicas)
    typer.echo(f"imported {source} into volume {name}: {human_size(size)}")


@volume_app.command("export")
def volume_export(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="VOLUME or VOLUME@SNAPSHOT.")],
    target: Path,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite TARGET.")] = False,
    backend: BackendOption = Backend.EMULATED,
    conf: ConfOption = None,
) -> None:
    """Write a volume or snapshot to a sparse raw file."""
    progress = _progress(f"exporting {name}")
    if backend is Backend.PUREFLASH:
        client = PureFlashClient(conf)
        with client.library_log_held():  # a volume it cannot open: one line
            size = export_cluster_volume(client, name, target, progress, force)
    else:
        size = export_volume(_volumes(ctx, backend, conf), name, target, progress, force)
    typer.echo(f"exported {name} to {target}: {human_size(size)}")


FAULTS = "Fault injection (emulated cluster only)"


@app.command()
def serve(
    ctx: typer.Context,
    volumes: Annotated[Optional[list[str]], typer.Option(
        "--volume", help=f"Export this volume, or VOLUME@SNAPSHOT read-only (repeatable). Default: "
                         f"{DEFAULT_VOLUME!r}, created with {DEFAULT_VOLUME_SIZE} if missing.")] = None,
    all_volumes: Annotated[bool, typer.Option("--all", help="Export every volume of the data directory.")] = False,
    socket: Annotated[Optional[Path], typer.Option("--socket", "-k", help="Listen on this Unix socket.")] = None,
    socket_mode: Annotated[str, typer.Option(
        "--socket-mode", help="Permissions of the Unix socket, in octal (660 lets the group in).")] = "600",
    bind: Annotated[Optional[str], typer.Option(
        "--bind", help=f"TCP address to listen on, IPv4 or IPv6 (default {DEFAULT_BIND}).")] = None,
    port: Annotated[Optional[int], typer.Option(
        "--port", "-p", help=f"TCP port, 0 for any free one (default {DEFAULT_PORT}).")] = None,
    read_only: Annotated[bool, typer.Option("--read-only", "-r", help="Refuse every write.")] = False,
    tls: Annotated[TlsMode, typer.Option(
        "--tls", case_sensitive=False,
        help="off: no TLS; on: clients may start TLS; require: clients must.")] = TlsMode.OFF,
    tls_certificates: Annotated[Optional[Path], typer.Option(
        "--tls-certificates", help="Directory with ca-cert.pem, server-cert.pem and server-key.pem.")] = None,
    tls_verify_peer: Annotated[bool, typer.Option(
        "--tls-verify-peer", help="Require client certificates signed by ca-cert.pem.")] = False,
    max_connections: Annotated[Optional[int], typer.Option(
        "--max-connections", help="Close connections beyond this many at once (default: no limit).")] = None,
    pid_file: Annotated[Optional[Path], typer.Option(
        "--pid-file", help="Write the server's pid here once it listens; removed at exit.")] = None,
    handshake_limit: Annotated[float, typer.Option(
        "--handshake-limit", help="Seconds a client has to finish negotiation, TLS included.")
    ] = HANDSHAKE_TIMEOUT,
    shutdown_timeout: Annotated[float, typer.Option(
        "--shutdown-timeout", help="Seconds requests in flight get at SIGTERM before they are "
                                   "answered ESHUTDOWN and the connections closed.")] = SHUTDOWN_TIMEOUT,
    backend: BackendOption = Backend.EMULATED,
    conf: ConfOption = None,
    io_depth: Annotated[int, typer.Option(
        "--io-depth", help="The client library's [client] io_depth: 2x this many submits in flight.",
        rich_help_panel=FAULTS)] = DEFAULT_IO_DEPTH,
    error_rate: Annotated[float, typer.Option(
        "--inject-error-rate", help="Fraction of completions that fail (0 to 1).", rich_help_panel=FAULTS)] = 0.0,
    error_status: Annotated[str, typer.Option(
        "--inject-status", help="Status of a failed completion: -errno or a PureFlash status like 0xC3.",
        rich_help_panel=FAULTS)] = "-5",
    delay: Annotated[float, typer.Option(
        "--inject-delay", help="Seconds added to every completion.", rich_help_panel=FAULTS)] = 0.0,
    retry_timeout: Annotated[float, typer.Option(
        "--retry-timeout", help="Seconds to keep resubmitting I/O that PureFlash calls transient "
                                "(busy, connection lost) before answering EIO.")] = RETRY_TIME_LIMIT,
    control: Annotated[Optional[Path], typer.Option(
        "--control", help="Serve QMP on this Unix socket (mode 600): exports added, removed "
                          "and throttled at run time.")] = None,
    throttle: Annotated[Optional[list[str]], typer.Option(
        "--throttle", help="[EXPORT:]LIMITS: I/O limits of one export, or of each, as QEMU's "
                           "block_set_io_throttle names them: e.g. test_v1:bps=4M,iops_wr=100 "
                           "(repeatable).")] = None,
    metrics: Annotated[Optional[str], typer.Option(
        "--metrics", help=f"Serve Prometheus /metrics on [ADDR:]PORT (ADDR defaults to {DEFAULT_BIND}).")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="Serve from this many processes, a CPU each, sharing the listening "
                          "sockets; writes must then be whole 512-byte sectors.")] = 1,
) -> None:
    """Serve volumes over NBD until SIGTERM or SIGINT; SIGUSR1 logs statistics.

    Listens on --socket, or on TCP when --bind or --port is given, or else on the
    sockets systemd passes (socket activation).
    """
    store: Store = ctx.obj
    if socket is not None and (bind is not None or port is not None):
        raise CliError("--socket cannot be combined with --bind or --port")
    if port is not None and not 0 <= port < 65536:
        raise CliError(f"invalid port {port}")
    if max_connections is not None and max_connections < 1:
        raise CliError(f"invalid --max-connections {max_connections}: give 1 or more")
    if not handshake_limit > 0:
        raise CliError(f"invalid --handshake-limit {handshake_limit}: give a number of seconds")
    if not shutdown_timeout >= 0:
        raise CliError(f"invalid --shutdown-timeout {shutdown_timeout}: give a number of seconds")
    _check_workers(workers, max_connections=max_connections, control=control, throttle=throttle)
    policy = Policy(tls, _tls_context(tls, tls_certificates, tls_verify_peer), max_connections,
                    handshake_limit, shutdown_timeout)
    if socket is not None:
        listen: Listen = UnixListen(socket, _parse_mode(socket_mode))
    elif bind is not None or port is not None:
        listen = TcpListen((bind or DEFAULT_BIND).strip("[]"), DEFAULT_PORT if port is None else port)
    else:
        listen = SystemdListen()
    if all_volumes and volumes:
        raise CliError("--all cannot be combined with --volume")
    if backend is Backend.PUREFLASH:
        if all_volumes or not volumes:
            raise CliError("--backend pureflash needs --volume: pfnbd cannot list a cluster's volumes")
        if (io_depth, error_rate, error_status, delay) != (DEFAULT_IO_DEPTH, 0.0, "-5", 0.0):
            raise CliError("--io-depth and --inject-* apply to the emulated cluster only")
        # The library named by $PFNBD_PUREFLASH_LIB; I/O it holds past --retry-timeout fails.
        client = PureFlashClient(conf, io_deadline=max(retry_timeout, MIN_IO_DEADLINE))
        names, describe, describing = volumes, client.describe, client.library_log_held()
    else:
        if conf is not None:
            raise CliError("--conf needs --backend pureflash")
        names = _emulated_exports(store, volumes, all_volumes)
        client = EmulatedClient(store, io_depth, _faults(io_depth, error_rate, error_status, delay), read_only)
        describe, describing = store.describe, contextlib.nullcontext()
    if len(set(names)) != len(names):
        raise CliError("a volume is named twice in --volume")
    with describing:  # fails early, in one line, on a missing volume or an unreachable cluster
        specs = [ExportSpec(name, describe(name)) for name in names]
    if retry_timeout < 0:
        raise CliError("--retry-timeout must not be negative")
    limits = _export_limits(throttle or [], names)
    metrics_address = None if metrics is None else _parse_metrics_address(metrics)
    # A write past a file size limit then fails with EFBIG, an error for that one
    # request, instead of SIGXFSZ killing the server and every client with it.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if workers > 1:
        with waited_signals():
            code = _serve_in_workers(workers, None if backend is Backend.PUREFLASH else store, client, specs,
                                     listen, read_only, policy, pid_file, retry_timeout, metrics_address)
        if code:
            raise typer.Exit(code)
    else:
        trio.run(_serve, client, specs, listen, read_only, policy, pid_file, retry_timeout, control, limits,
                 metrics_address)
    # Stopped cleanly: a late SIGTERM while the interpreter exits must not turn
    # that into death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def _check_workers(workers: int, **per_process: object) -> None:
    if workers < 1:
        raise CliError(f"invalid --workers {workers}: give 1 or more")
    if workers == 1:
        return
    given = [f"--{name.replace('_', '-')}" for name, value in per_process.items() if value]
    if given:
        raise CliError(f"--workers cannot be combined with {', '.join(given)}: every worker would "
                       "keep its own")


def _serve_in_workers(
    count: int, store: Store | None, client: VolumeClient, specs: list[ExportSpec], listen: Listen, read_only: bool,
    policy: Policy, pid_file: Path | None, retry_timeout: float, metrics_address: tuple[str, int] | None,
) -> int:
    """`count` workers (`pfnbd/workers.py`) on listeners of this process and, with the
    embedded cluster's `store`, its heads' writer locks (a real cluster has none);
    called within `waited_signals`.  `/metrics`, if asked for, is the parent's: the
    sum of the workers' counters (`pfnbd/worker_stats.py`)."""
    listeners = trio.run(listen.open)
    worker_stats = metrics_server = None
    try:
        if metrics_address is not None:
            from .metrics import serve_worker_metrics  # as in `_serve`: only when asked for

            worker_stats = WorkerStats()
            # Before the fork, for a port in use to fail at once.  Its thread, blocking
            # the signals `supervise` waits for, is the parent's only one; a worker
            # closes its copy of the listening socket.
            metrics_server = _serve_metrics(partial(serve_worker_metrics, worker_stats), metrics_address)
        if store is not None:
            for spec in specs:
                volume, snapshot = split_snapshot_name(spec.name)
                if not (read_only or snapshot):
                    store.hold_writer(volume)
        cpus = sorted(PROCESS_CPUS)
        shares = ConnectionShares.shared(count)

        def run_worker(index: int) -> int:
            stats_link = None
            if metrics_server is not None:
                metrics_server.socket.close()
                stats_link = worker_stats.worker_end()
            for handler in logging.getLogger().handlers:
                handler.setFormatter(logging.Formatter(LOG_FORMAT.format(name=f"pfnbd[worker {index}]")))
            return _reported(lambda: trio.run(partial(
                _serve, client, specs, _Opened(listeners), read_only, policy, None, retry_timeout,
                placement=Placement(cpus[index % len(cpus)]), partial_sectors=False, worker=index,
                shares=shares.of_worker(index), stats_link=stats_link)))

        def started() -> None:
            log.info("%s", logfmt("serving", workers=count, listen=",".join(listen.describe(listeners)),
                                  metrics=_described(metrics_server)))
            if pid_file is not None:
                write_pid_file(pid_file)

        def stopping() -> None:
            # As one process does at SIGTERM: the socket stops listening (once the
            # workers have closed theirs), and connection attempts are refused rather
            # than queued for nobody.
            for listener in listeners:
                os.close(listener.socket.detach())  # trio's close needs a trio run

        return supervise(count, run_worker, started, stopping,
                         contextlib.nullcontext if worker_stats is None else worker_stats.forking)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        listen.remove()
        if pid_file is not None:
            remove_pid_file(pid_file)


def parse_limits(text: str) -> Limits:
    """`bps=4M,iops=100`: QEMU's limit names, byte rates with K/M/G/T suffixes."""
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not equals or key not in LIMITS + BURSTS:
            raise CliError(f"invalid --throttle item {item!r}: give NAME=VALUE with NAME one of "
                           + ", ".join(LIMITS + BURSTS))
        values[key] = _rate(key, value)
    try:
        return Limits(values)
    except ThrottleError as error:
        raise CliError(f"--throttle: {error}") from None


def _export_limits(options: list[str], names: list[str]) -> dict[str, Limits]:
    """Export name -> its limits, from `--throttle [EXPORT:]LIMITS` options."""
    limits = {}
    for option in options:
        export, colon, text = option.rpartition(":")
        if colon and export not in names:
            raise CliError(f"--throttle {option}: no export named {export!r}")
        for name in [export] if colon else names:
            limits[name] = parse_limits(text)
    return limits


def _rate(key: str, text: str) -> int:
    match = SIZE.fullmatch(text.strip())
    if not match or (match[2] and key.startswith("iops")):
        raise CliError(f"invalid {key} {text!r}: give a number" + (
            "" if key.startswith("iops") else ", with K, M, G or T for bytes"))
    return int(match[1]) << SUFFIX_SHIFT[match[2].upper()]


def _emulated_exports(store: Store, volumes: list[str] | None, all_volumes: bool) -> list[str]:
    if all_volumes:
        names = [v.name for v in store.list()]
        if not names:
            raise CliError(f"--all: no volumes in {store.root}")
        return names
    if volumes:
        return volumes
    if DEFAULT_VOLUME not in {v.name for v in store.list()}:
        store.create(DEFAULT_VOLUME, parse_size(DEFAULT_VOLUME_SIZE))
        log.info("created volume %s (%s)", DEFAULT_VOLUME, DEFAULT_VOLUME_SIZE)
    return [DEFAULT_VOLUME]


def _faults(io_depth: int, error_rate: float, error_status: str, delay: float) -> Faults:
    if not 0 < io_depth <= PF_MAX_IO_DEPTH:
        raise CliError(f"--io-depth must be 1 to {PF_MAX_IO_DEPTH}")
    try:
        return Faults(error_rate, int(error_status, 0), delay)
    except ValueError as error:
        raise CliError(f"fault injection: {error}") from None


def _tls_context(mode: TlsMode, directory: Path | None, verify_peer: bool) -> ssl.SSLContext | None:
    if mode is TlsMode.OFF:
        if directory is not None or verify_peer:
            raise CliError("--tls-certificates and --tls-verify-peer need --tls on or --tls require")
        return None
    if directory is None:
        raise CliError(f"--tls {mode.value} needs --tls-certificates DIR")
    try:
        return server_context(directory, verify_peer)
    except TlsConfigError as error:
        raise CliError(str(error)) from None


def _parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise CliError(f"invalid --socket-mode {text!r}: give octal permissions such as 600")
    return mode


class Listen:
    """Where `serve` listens: opens the listeners, names them for the log, and cleans up."""

    async def open(self) -> list[trio.SocketListener]:
        raise NotImplementedError

    def describe(self, listeners: list[trio.SocketListener]) -> list[str]:
        return [listener_name(listener) for listener in listeners]

    def remove(self) -> None:
        pass  # nothing of ours is left on disk


@attrs.define
class UnixListen(Listen):
    path: Path
    mode: int
    bound: SocketFile | None = None  # the socket file we made, once we listen

    async def open(self) -> list[trio.SocketListener]:
        listener = await open_unix_listener(self.path, self.mode)
        self.bound = socket_file(self.path)
        return [listener]

    def remove(self) -> None:
        if self.bound is not None:
            remove_socket(self.path, only=self.bound)


@attrs.frozen
class TcpListen(Listen):
    host: str
    port: int

    async def open(self) -> list[trio.SocketListener]:
        return await open_tcp_listeners(self.port, self.host)


@attrs.frozen
class SystemdListen(Listen):
    """The sockets systemd passes; they are systemd's to remove."""

    async def open(self) -> list[trio.SocketListener]:
        listeners = systemd_listeners()
        if listeners is None:
            raise CliError("give --socket PATH or --bind/--port, or start pfnbd through "
                           "systemd socket activation (LISTEN_FDS)")
        return listeners


@attrs.frozen
class _Opened(Listen):
    """A worker's listeners: its parent's, which the parent cleans up."""

    listeners: list[trio.SocketListener]

    async def open(self) -> list[trio.SocketListener]:
        return self.listeners


async def _serve(
    client: VolumeClient, specs: list[ExportSpec], listen: Listen, read_only: bool, policy: Policy,
    pid_file: Path | None, retry_timeout: float, control_path: Path | None = None,
    limits: dict[str, Limits] | None = None, metrics_address: tuple[str, int] | None = None,
    placement: Placement = Placement(), partial_sectors: bool = True, worker: int | None = None,
    shares: ConnectionShares | None = None, stats_link: stdlib_socket.socket | None = None,
) -> None:
    shutdown = trio.Event()
    # Signals are caught before the socket appears: a client that sees the socket
    # may already ask us to stop, or for statistics (SIGUSR1's default is to exit).
    _shut_down_on_signals(shutdown)
    stats = _StatsOnSignal()
    listeners = await listen.open()  # before the exports: a socket in use fails at once
    control_listener = metrics_server = None
    try:
        if control_path is not None:
            control_listener = await open_unix_listener(control_path)  # 0600 whatever the umask
        async with open_exports(client, specs, read_only, retry_timeout, partial_sectors) as exports:
            server = Server(exports, policy, shares)
            for export in exports:
                export.throttle.set((limits or {}).get(export.info.name, Limits()))
            stats.serving(server)
            if metrics_address is not None:
                # Imported only when asked for: prometheus_client and its HTTP server are
                # about 2 MiB of a server whose peak is near 54 MiB (benchmarks/README.md).
                from .metrics import serve_metrics

                metrics_server = _serve_metrics(partial(serve_metrics, server), metrics_address)
            if pid_file is not None:  # once it can take our signals
                write_pid_file(pid_file)
            async with ExportControl.open(server, exports, client, shutdown, read_only=read_only,
                                          retry_time_limit=retry_timeout) as export_control:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(placement.run, shutdown)
                    await nursery.start(server.run, listeners, shutdown)
                    if control_listener is not None:
                        await nursery.start(serve_control, control_listener, export_control, shutdown)
                    if stats_link is not None:
                        nursery.start_soon(answer_queries, server, stats_link, shutdown)
                    log.info("%s", logfmt(
                        "serving", worker=worker, exports=",".join(spec.name for spec in specs),
                        listen=",".join(listen.describe(listeners)),
                        tls=policy.tls_mode.value, read_only="yes" if read_only else "no",
                        max_connections=policy.max_connections, control=control_path,
                        metrics=_described(metrics_server)))
            _log_lines(server.stats())
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        listen.remove()
        if control_listener is not None:
            remove_socket(control_path)
        if pid_file is not None:
            remove_pid_file(pid_file)


def _serve_metrics(serve: Callable[[str, int], HTTPServer], address: tuple[str, int]) -> HTTPServer:
    try:
        return serve(*address)
    except OSError as error:
        raise ListenError(f"cannot serve metrics on {address[0]}:{address[1]}: {error.strerror or error}") from None


def _described(metrics_server: HTTPServer | None) -> str | None:
    return None if metrics_server is None else "{}:{}".format(*metrics_server.server_address)


ControlOption = Annotated[Path, typer.Option("--control", "-c", help="The server's --control socket.")]


def _control(path: Path, command: str, arguments: dict | None = None) -> object:
    try:
        return call(path, command, arguments)
    except ControlError as error:
        raise CliError(str(error)) from None


@export_app.command("add")
def export_add(
    node: Annotated[str, typer.Argument(help="VOLUME or VOLUME@SNAPSHOT.")],
    control: ControlOption,
    export_id: Annotated[Optional[str], typer.Option("--id", help="The export's id (default: its name).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="The export name clients ask for (default: NODE).")] = None,
    writable: Annotated[bool, typer.Option("--writable", "-w", help="Accept writes.")] = False,
    description: Annotated[str, typer.Option("--description", help="What NBD_OPT_LIST shows.")] = "",
) -> None:
    """Export a volume or snapshot from a running server."""
    name = name or node
    _control(control, "block-export-add", {"type": "nbd", "id": export_id or name, "node-name": node,
                                           "name": name, "writable": writable, "description": description})
    typer.echo(f"added export {export_id or name}")


@export_app.command("del")
def export_del(
    export_id: Annotated[str, typer.Argument(help="The export's id.")],
    control: ControlOption,
    hard: Annotated[bool, typer.Option("--hard", help="Disconnect its clients once their requests "
                                                      "in flight are answered (default: refuse while any is connected).")] = False,
) -> None:
    """Remove an export."""
    _control(control, "block-export-del", {"id": export_id, "mode": "hard" if hard else "safe"})
    typer.echo(f"deleting export {export_id}")


@export_app.command("list")
def export_list(
    control: ControlOption,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the exports of a running server, with their clients and limits."""
    exports = _control(control, "query-block-exports")
    throttles = {t["id"]: t for t in _control(control, "x-pfnbd-query-io-throttle")}
    if as_json:
        typer.echo(json.dumps([{**e, "throttle": throttles.get(e["id"], {})} for e in exports], indent=2))
        return
    rows = [("ID", "NODE", "NAME", "WRITABLE", "CLIENTS", "STATE", "THROTTLE")]
    for e in exports:
        limits = ",".join(f"{k}={v}" for k, v in throttles.get(e["id"], {}).items() if k != "id" and v)
        rows.append((e["id"], e["node-name"], e["x-pfnbd-name"], "yes" if e["x-pfnbd-writable"] else "no",
                     str(e["x-pfnbd-clients"]), "deleting" if e["shutting-down"] else "serving", limits or "-"))
    _echo_table(rows)


@export_app.command("throttle")
def export_throttle(
    export_id: Annotated[str, typer.Argument(help="The export's id.")],
    limits: Annotated[str, typer.Argument(help="e.g. bps=4M,iops_wr=100; empty lifts every limit.")],
    control: ControlOption,
) -> None:
    """Set an export's I/O limits, live: its clients need not reconnect."""
    values = parse_limits(limits).values
    _control(control, "block_set_io_throttle",
             {"id": export_id, **{name: values.get(name, 0) for name in LIMITS + BURSTS}})
    typer.echo(f"throttled export {export_id}: {limits or 'unlimited'}")


def _shut_down_on_signals(shutdown: trio.Event) -> None:
    """SIGTERM and SIGINT start a graceful shutdown; repeating them changes nothing.

    A signal that arrives while the server closes its volumes finds trio gone and
    is dropped: the shutdown it asks for is already under way.
    """

    def begin(signum: int) -> None:
        if not shutdown.is_set():
            log.info("%s: finishing requests in flight, then exiting", signal.Signals(signum).name)
            shutdown.set()

    _on_signals([signal.SIGTERM, signal.SIGINT], begin)


def _parse_metrics_address(text: str) -> tuple[str, int]:
    """`--metrics [ADDR:]PORT` -> (host, port)."""
    host, colon, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise CliError(f"invalid --metrics {text!r}: give [ADDR:]PORT")
    return (host.strip("[]") if colon else DEFAULT_BIND) or DEFAULT_BIND, int(port)


class _StatsOnSignal:
    """SIGUSR1 logs the server's `stats` lines; asked for while the exports are still
    opening, they are logged as soon as the server exists."""

    def __init__(self) -> None:
        self._server: Server | None = None
        self._asked = False
        _on_signals([signal.SIGUSR1], self._log)

    def serving(self, server: Server) -> None:
        self._server = server
        if self._asked:
            self._log(signal.SIGUSR1)

    def _log(self, signum: int) -> None:
        if self._server is None:
            self._asked = True
        else:
            _log_lines(self._server.stats())


def _on_signals(signums: list[int], action: Callable[[int], None]) -> None:
    """Runs `action(signum)` in trio's thread when one of `signums` arrives; once trio
    is gone, the signal is dropped."""
    token = trio.lowlevel.current_trio_token()

    def handler(signum: int, frame: object) -> None:
        try:
            token.run_sync_soon(action, signum)
        except trio.RunFinishedError:
            pass  # already stopped

    for signum in signums:
        signal.signal(signum, handler)


def _log_lines(lines: list[str]) -> None:
    for line in lines:
        log.info("%s", line)


def write_pid_file(path: Path) -> None:
    """Atomically: a reader never sees an empty or partial pid file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        partial.write_text(f"{os.getpid()}\n")
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise CliError(f"cannot write --pid-file {path}: {error.strerror}") from None


def remove_pid_file(path: Path) -> None:
    """Only our own: a newer server may have written its pid there since."""
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def main() -> None:
    """Entry point: user mistakes end in one line on stderr, never a traceback."""
    sys.exit(_reported(lambda: app(standalone_mode=False)))


def _reported(run: Callable[[], object]) -> int:
    """The exit code of `run()`: a user's mistake is one line on stderr."""
    try:
        code = run()
    except UsageError as error:
        return _failed(error.format_message(), 2)
    except typer.Abort:
        return _failed("aborted", 130)
    except (CliError, StoreError, ListenError, VolumeOpenError) as error:
        return _failed(str(error), 1)
    except OSError as error:
        return _failed(f"{error.filename + ': ' if error.filename else ''}{error.strerror or error}", 1)
    return code if isinstance(code, int) else 0


def _failed(message: str, code: int) -> int:
    print(f"pfnbd: error: {message}", file=sys.stderr)
    return code
