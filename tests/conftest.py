"""Fixtures that run pfnbd as users do: the `pfnbd` CLI in a subprocess, one data
directory per test, clients talking to it over a Unix socket."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
import trio

from pfnbd import server as pfnbd_server

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-libnbd imports only here


def pfnbd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pfnbd", *args]


@attrs.frozen
class Cli:
    """Runs `pfnbd` subcommands against one data directory."""

    data_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PFNBD_DATA_DIR": str(self.data_dir)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            pfnbd_command(*args), env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"pfnbd {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return result


@attrs.define
class ServeProcess:
    """A running `pfnbd serve`; `stop()` sends SIGTERM and returns the exit code."""

    process: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"pfnbd serve ignored signal {sig}:\n{self.log()}")


@attrs.define
class Server(ServeProcess):
    """One the `start_server` fixture started, on a Unix socket."""

    socket: Path

    def uri(self, export: str = "test_v1") -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def qemu_uri(self, export: str = "test_v1") -> str:
        return f"nbd:unix:{self.socket}:exportname={export}"


def listening(path: Path) -> bool:
    """Whether a Unix socket listens at `path`: its file appears at bind, before listen,
    and a client connecting in between is refused (Flags 00010000 is __SO_ACCEPTCON)."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return any(f[3] == "00010000" and f[-1] == str(path) for f in map(str.split, lines) if len(f) == 8)


def wait_for(predicate, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def wait_for_socket(process: subprocess.Popen[str], path: Path, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while not listening(path):
        if process.poll() is not None:
            raise AssertionError(f"pfnbd serve exited {process.returncode}:\n"
                                 + log_path.read_text(errors="replace"))
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("pfnbd serve did not create its socket in 30 s")
        time.sleep(0.02)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "data")


@pytest.fixture
def start_server(cli: Cli, tmp_path: Path):
    """Factory: start `pfnbd serve` on a fresh socket for the given volumes.

    Volumes named in `volumes` are created first (name -> size as the CLI takes it)
    unless they already exist; `env` adds to the server's environment; `socket` restarts
    a server on an earlier one's socket. Every server still running at teardown is
    stopped with SIGTERM and must exit 0.
    """
    servers: list[Server] = []

    def start(volumes: dict[str, str] | None = None, *extra: str, exports: list[str] | None = None,
              env: dict[str, str] | None = None, preexec_fn=None, socket: Path | None = None) -> Server:
        volumes = {"test_v1": "64M"} if volumes is None else volumes
        existing = {v["name"] for v in json.loads(cli.run("volume", "list", "--json").stdout)}
        for name, size in volumes.items():
            if name not in existing:
                cli.run("volume", "create", name, "--size", size)
        socket = socket or tmp_path / f"nbd{len(servers)}.sock"
        log_path = tmp_path / f"server{len(servers)}.log"
        args = ["serve", "--socket", str(socket)]
        for name in exports if exports is not None else volumes:
            args += ["--volume", name]
        log = open(log_path, "w")
        process = subprocess.Popen(
            pfnbd_command(*args, *extra), env={**cli.env, **(env or {})}, stdout=log,
            stderr=subprocess.STDOUT, text=True,
            preexec_fn=preexec_fn,  # e.g. a resource limit the server is to run under
        )
        log.close()
        wait_for_socket(process, socket, log_path)
        server = Server(process=process, log_path=log_path, socket=socket)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            code = server.stop()
            assert code == 0, f"pfnbd serve exited {code} on SIGTERM:\n{server.log()}"


@pytest.fixture
def server(start_server) -> Server:
    """`pfnbd serve` exporting one 64 MiB volume `test_v1`."""
    return start_server()


def require(*programs: str) -> None:
    """Fail (not skip) when a client the suite drives is missing: `.ci/run` installs them."""
    missing = [p for p in programs if shutil.which(p) is None and not Path(p).exists()]
    if missing:
        pytest.fail(f"missing test clients {missing}: run scripts/install-deps")


def run(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    require(args[0])
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def run_libnbd(script: str, *args: str, timeout: float = 120) -> str:
    """Runs a Python script that imports `nbd` under Debian's python3 and returns stdout."""
    return run(SYSTEM_PYTHON, "-c", script, *args, timeout=timeout).stdout


@contextlib.asynccontextmanager
async def serve_in_process(client, names: list[str], describe, socket: Path):
    """What `pfnbd serve` does, in this process: open the exports, listen, serve."""
    specs = [pfnbd_server.ExportSpec(name, describe(name)) for name in names]
    async with pfnbd_server.open_exports(client, specs, read_only=False) as exports:
        listener = await pfnbd_server.open_unix_listener(socket)
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(pfnbd_server.Server(exports).run, [listener], shutdown)
            try:
                yield
            finally:
                shutdown.set()


# The real cluster's fixtures, for every file that drives one (defined after `run`,
# which they use).
from realcluster import real_cluster, serve_real  # noqa: E402,F401
