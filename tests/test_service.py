"""`pfnbd serve` run as a service: its listeners (Unix socket, TCP over IPv4 and IPv6,
systemd socket activation), its policy (--max-connections, --pid-file, --read-only),
its log (a line per connection, -v tracing, SIGUSR1 statistics), and every command
line of examples/README.md and examples/systemd/, run with real clients."""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest

from conftest import Cli, ServeProcess, listening, pfnbd_command, require, run, wait_for
from test_cli import free_loopback_port, hold_connection
from test_tls import connection_lines, launch, log_lines, nbdinfo, pki  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MiB = 1 << 20


def socket_mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def stats_line(server, export: str) -> dict[str, int]:
    """The fields of the last `stats export=NAME` line."""
    lines = [line for line in log_lines(server, "stats") if f"export={export} " in line]
    assert lines, server.log()
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", lines[-1])}


@pytest.fixture
def held():
    """Factory of held libnbd connections, all killed at teardown."""
    clients: list[subprocess.Popen[str]] = []

    def hold(uri: str) -> subprocess.Popen[str]:
        clients.append(hold_connection(uri))
        return clients[-1]

    yield hold
    for client in clients:
        client.kill()
        client.wait()


def serve_fails(cli: Cli, *args: str, env: dict[str, str] | None = None) -> str:
    """Runs `pfnbd serve ARGS`, which must fail with one line on stderr; returns it."""
    result = subprocess.run(pfnbd_command("serve", *args), env={**cli.env, **(env or {})},
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    return lines[0]


# --- listeners ------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode_arguments", "mode"),
                         [(0, [], 0o600), (0o077, ["--socket-mode", "660"], 0o660)],
                         ids=["default-under-umask-0", "660-under-umask-077"])
def test_unix_socket_has_the_asked_mode_whatever_the_umask(start_server, cli, umask, mode_arguments, mode):
    cli.run("volume", "create", "test_v1", "--size", "64M")
    process_umask = os.umask(umask)  # the server inherits it
    try:
        server = start_server(None, *mode_arguments)
    finally:
        os.umask(process_umask)

    assert socket_mode(server.socket) == mode
    assert nbdinfo("--size", server.uri()).stdout.strip() == str(64 * MiB)


def test_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not(start_server, cli, tmp_path):
    cli.run("volume", "create", "test_v1", "--size", "64M")
    stale = tmp_path / "nbd0.sock"  # where start_server puts its first socket
    crashed = socket.socket(socket.AF_UNIX)
    crashed.bind(str(stale))
    crashed.close()  # the file stays, as after a crash

    server = start_server()  # returns at once: the stale file is already there
    wait_for(lambda: "pfnbd: serving" in server.log(), "the server's serving line", 30)
    in_use = serve_fails(cli, "--volume", "test_v1", "--socket", str(server.socket))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    not_a_socket = serve_fails(cli, "--volume", "test_v1", "--socket", str(a_file))

    assert nbdinfo("--size", server.uri()).stdout.strip() == str(64 * MiB)
    assert "in use by another server" in in_use
    assert "is not a socket" in not_a_socket and a_file.read_text() == "keep me"


@pytest.mark.parametrize(("bind", "host"), [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("[::1]", "::1")],
                         ids=["ipv4", "ipv6", "ipv6-brackets"])
def test_tcp_listener_on_ipv4_and_ipv6(launch, bind, host):
    server = launch("--bind", bind, "--port", "0")
    url_host = f"[{host}]" if ":" in host else host

    size = nbdinfo("--size", f"nbd://{url_host}:{server.port}/test_v1")
    qemu = run("qemu-io", "-f", "raw", f"nbd://{url_host}:{server.port}/test_v1",
               "-c", "write -P 0x11 0 64k", "-c", "read -P 0x11 0 64k", timeout=60)

    assert server.listen == [f"{url_host}:{server.port}"]
    assert size.stdout.strip() == str(64 * MiB)
    assert "read 65536/65536" in qemu.stdout
    assert f"client={url_host}:" in connection_lines(server, 2)[0]


def test_tcp_port_in_use_is_a_one_line_error(launch, cli):
    server = launch("--bind", "127.0.0.1", "--port", "0")

    line = serve_fails(cli, "--volume", "test_v1", "--bind", "127.0.0.1", "--port", str(server.port))

    assert f"127.0.0.1:{server.port}" in line


@attrs.define
class Activated:
    """`systemd-socket-activate -l ADDRESS -- COMMAND`: it listens, and execs COMMAND
    (keeping its pid) at the first connection."""

    process: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def socket_activate(tmp_path: Path):
    started: list[Activated] = []

    def start(address: str, command: list[str]) -> Activated:
        require("systemd-socket-activate")
        log_path = tmp_path / f"activated{len(started)}.log"
        with open(log_path, "w") as log:
            # cwd: `python -m pfnbd` imports the pfnbd of this tree.
            process = subprocess.Popen(["systemd-socket-activate", "-l", address, "--", *command],
                                       stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        activated = Activated(process, log_path)
        started.append(activated)
        wait_for(lambda: "Listening on" in activated.log(), "systemd-socket-activate listening", 30)
        return activated

    yield start
    for activated in started:
        if activated.process.poll() is None:
            activated.process.kill()
            activated.process.wait()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_systemd_socket_activation(socket_activate, cli, tmp_path, kind):
    cli.run("volume", "create", "test_v1", "--size", "64M")
    if kind == "unix":
        address = str(tmp_path / "activated.sock")
        uri = f"nbd+unix:///test_v1?socket={address}"
    else:
        address = f"127.0.0.1:{free_loopback_port()}"
        uri = f"nbd://{address}/test_v1"
    # systemd-socket-activate passes few variables: the data directory goes as an option.
    activated = socket_activate(address, pfnbd_command("--data-dir", str(cli.data_dir), "serve",
                                                       "--volume", "test_v1"))

    size = nbdinfo("--size", uri)  # the first connection starts pfnbd
    written = run("qemu-io", "-f", "raw", uri, "-c", "write -P 0x42 1M 1M", timeout=60)
    wait_for(lambda: len(log_lines(activated, "connection")) == 2, "two connection lines")
    activated.process.send_signal(signal.SIGTERM)
    code = activated.process.wait(timeout=30)

    assert size.stdout.strip() == str(64 * MiB) and "wrote 1048576/1048576" in written.stdout
    where = f"unix:{address}" if kind == "unix" else address
    assert f"listen={where} " in activated.log(), activated.log()
    assert code == 0, activated.log()
    assert kind == "tcp" or Path(address).exists(), "pfnbd removed the socket systemd owns"


def test_without_a_listener_or_systemd_sockets_serve_says_what_to_give(cli):
    cli.run("volume", "create", "test_v1", "--size", "1M")
    # LISTEN_PID names another process: those sockets are not ours (sd_listen_fds(3)).
    line = serve_fails(cli, "--volume", "test_v1", env={"LISTEN_FDS": "1", "LISTEN_PID": "1"})

    assert "--socket" in line and "systemd" in line


# --- policy ----------------------------------------------------------------------------------


def test_max_connections_closes_extra_clients_until_one_leaves(start_server, held):
    server = start_server(None, "--max-connections", "2")
    first = held(server.uri())
    held(server.uri())

    refused = nbdinfo("--size", server.uri(), check=False)
    first.kill()
    first.wait()
    connection_lines(server, 2)  # the refused client, then the first one leaving
    admitted = nbdinfo("--size", server.uri())
    connection_lines(server, 3)  # the admitted client's connection has ended too
    os.kill(server.process.pid, signal.SIGUSR1)
    wait_for(lambda: log_lines(server, "stats"), "a stats line")

    assert refused.returncode != 0, refused.stdout
    assert admitted.stdout.strip() == str(64 * MiB)
    refusals = [line for line in log_lines(server, "connection") if "refused" in line]
    assert len(refusals) == 1 and "2 connections already open" in refusals[0], server.log()
    assert re.search(r"pfnbd: stats accepted=3 active=1 refused=1", server.log()), server.log()


def test_pid_file_is_written_once_listening_and_removed_at_exit(start_server, tmp_path):
    pid_file = tmp_path / "run" / "pfnbd.pid"
    pid_file.parent.mkdir()

    server = start_server(None, "--pid-file", str(pid_file))
    wait_for(pid_file.exists, "the pid file")
    written = pid_file.read_text()
    code = server.stop()

    assert written == f"{server.process.pid}\n"
    assert code == 0 and not pid_file.exists()
    assert not server.socket.exists()


def test_unwritable_pid_file_stops_the_server_and_leaves_no_socket(cli, tmp_path):
    cli.run("volume", "create", "test_v1", "--size", "1M")
    socket_path = tmp_path / "nbd.sock"

    line = serve_fails(cli, "--volume", "test_v1", "--socket", str(socket_path),
                       "--pid-file", str(tmp_path / "missing" / "pfnbd.pid"))

    assert "--pid-file" in line
    assert not socket_path.exists()


def test_read_only_serves_reads_and_refuses_writes(start_server):
    server = start_server(None, "--read-only")

    read = run("qemu-io", "-r", "-f", "raw", server.uri(), "-c", "read -P 0 0 64k", timeout=60)
    write = run("qemu-io", "-f", "raw", server.uri(), "-c", "write 0 64k", timeout=60, check=False)
    info = json.loads(nbdinfo("--json", server.uri()).stdout)

    assert "read 65536/65536" in read.stdout
    assert write.returncode != 0 or "write failed" in write.stdout + write.stderr, write.stdout
    assert info["exports"][0]["is_read_only"] is True
    assert "read_only=yes" in server.log()


# --- the log -----------------------------------------------------------------------------------


def test_each_connection_ends_in_one_line_with_what_it_did(start_server):
    server = start_server()

    run("qemu-io", "-f", "raw", server.uri(), "-c", "write -P 0x7 0 1M", "-c", "read -P 0x7 0 1M",
        "-c", "read 1M 512k", timeout=60)
    nbdinfo("--list", f"nbd+unix:///?socket={server.socket}")

    qemu_line, list_line = connection_lines(server, 2)
    fields = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', qemu_line))
    assert fields["client"] == "unix" and int(fields["pid"]) > 0 and "uid" in fields, qemu_line
    assert fields["export"] == "test_v1" and fields["replies"] == "structured", qemu_line
    assert fields["contexts"] == "base:allocation" and fields["end"] == "closed", qemu_line
    assert fields["bytes_written"] == str(MiB) and fields["bytes_read"] == str(MiB + 512 * 1024), qemu_line
    assert int(fields["requests"]) >= 3 and fields["errors"] == "0", qemu_line
    assert "export=" not in list_line and 'end="closed in negotiation"' in list_line, list_line


def test_a_protocol_error_is_one_line_naming_it(start_server):
    server = start_server()

    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(server.socket))
        client.recv(18)  # greeting
        client.sendall(b"\x00\x00\x00\x03" + b"NOTMAGIC" + b"\x00" * 8)
        assert client.recv(1) == b""  # dropped

    (line,) = connection_lines(server, 1)
    assert 'end="dropped: bad option magic' in line, line


def test_verbose_traces_options_and_a_quiet_server_does_not(launch, tmp_path):
    sockets = {name: tmp_path / f"{name}.sock" for name in ("traced", "quiet")}
    traced = launch(command=pfnbd_command("-v", "serve", "--volume", "test_v1",
                                          "--socket", str(sockets["traced"])))
    quiet = launch("--socket", str(sockets["quiet"]), volumes=("quiet",))  # a volume has one server

    for path in sockets.values():
        nbdinfo("--size", f"nbd+unix:///?socket={path}")
    connection_lines(traced, 1)
    connection_lines(quiet, 1)

    assert re.search(r"pfnbd: accepted id=1 client=unix pid=\d+", traced.log()), traced.log()
    assert "pfnbd: option STRUCTURED_REPLY length=0: ACK" in traced.log(), traced.log()
    assert re.search(r"pfnbd: option GO length=\d+: INFO .*ACK", traced.log()), traced.log()
    assert "option " not in quiet.log() and "accepted" not in quiet.log(), quiet.log()


def report_stats(server, export: str, exports: int, until, timeout: float = 10) -> dict[str, int]:
    """Sends SIGUSR1 until the `stats` line of `export` satisfies `until`: a connection
    counts for its export once in transmission, a moment after its client saw the
    reply to NBD_OPT_GO."""
    deadline = time.monotonic() + timeout
    while True:
        reported = len(log_lines(server, "stats")) + 1 + exports  # the server's line, then one each
        os.kill(server.process.pid, signal.SIGUSR1)
        wait_for(lambda: len(log_lines(server, "stats")) >= reported, "stats lines")
        fields = stats_line(server, export)
        if until(fields) or time.monotonic() > deadline:
            return fields
        time.sleep(0.1)


def test_sigusr1_logs_per_export_stats_counting_live_connections(start_server, held):
    server = start_server({"test_v1": "64M", "other": "1M"})
    run("qemu-io", "-f", "raw", server.uri(), "-c", "write 0 256k", "-c", "read 0 128k", timeout=60)
    connection_lines(server, 1)  # qemu-io's connection has ended
    held(server.uri("other"))

    other = report_stats(server, "other", 2, lambda fields: fields["active"] == 1)
    ended = stats_line(server, "test_v1")
    code = server.stop()
    at_exit = stats_line(server, "test_v1"), stats_line(server, "other")

    assert other["connections"] == 1 and other["active"] == 1
    assert ended["connections"] == 1 and ended["active"] == 0
    assert ended["bytes_written"] == 256 * 1024 and ended["bytes_read"] == 128 * 1024
    assert code == 0 and at_exit[0] == ended
    assert at_exit[1]["connections"] == 1 and at_exit[1]["active"] == 0  # closed by the shutdown



def test_sigusr1_as_soon_as_the_socket_listens_is_answered_not_fatal(cli, tmp_path):
    """The socket listens before the exports are open (a socket in use fails at once);
    a SIGUSR1 sent in that window once killed the server, SIGUSR1's default action (seen
    as a restart test's lost `stats` lines). Eight exports widen the window."""
    names = [f"v{i}" for i in range(8)]
    for name in names:
        cli.run("volume", "create", name, "--size", "1M")
    path = tmp_path / "nbd.sock"
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            pfnbd_command("serve", "--socket", str(path), *(a for name in names for a in ("--volume", name))),
            env=cli.env, stdout=log, stderr=subprocess.STDOUT, text=True)
    server = ServeProcess(process=process, log_path=log_path)
    try:
        deadline = time.monotonic() + 30
        while not listening(path):  # no sleep: the window is milliseconds
            assert process.poll() is None and time.monotonic() < deadline, server.log()
        os.kill(process.pid, signal.SIGUSR1)
        wait_for(lambda: len(log_lines(server, "stats")) == 1 + len(names) or process.poll() is not None,
                 "the stats lines")
        alive = process.poll() is None
    finally:
        code = server.stop()

    assert alive and code == 0, f"exited {process.returncode}:\n{server.log()}"
    assert stats_line(server, "v7")["connections"] == 0

# --- examples/ --------------------------------------------------------------------------------

README = EXAMPLES / "README.md"
QEMU_TIMEOUT = 60  # seconds for QEMU to start or answer a QMP command


@attrs.frozen
class Places:
    """Where the placeholders of examples/README.md point in a test."""

    data_dir: Path
    run_dir: Path
    server_tls: Path
    client_tls: Path
    image: Path
    device: Path
    port: int

    def replacements(self) -> dict[str, str]:
        return {
            "/var/lib/pfnbd": str(self.data_dir), "/run/pfnbd": str(self.run_dir),
            "/etc/pfnbd/client-tls": str(self.client_tls), "/etc/pfnbd/tls": str(self.server_tls),
            "192.0.2.10": "127.0.0.1", "10809": str(self.port), "disk.qcow2": str(self.image),
            "/dev/nbd0": str(self.device),
        }

    @property
    def socket(self) -> Path:
        return self.run_dir / "pfnbd.sock"

    def uri(self) -> str:
        return f"nbd+unix:///vm1?socket={self.socket}"


@pytest.fixture
def places(cli: Cli, tmp_path: Path, pki: Path) -> Places:
    """The volume vm1 in a fresh data directory, and temporary stand-ins for the rest.
    The nbd device is a plain file: nbd-client negotiates, then stops short of the kernel."""
    cli.run("volume", "create", "vm1", "--size", "64M")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    device = tmp_path / "nbd0-stand-in"
    device.touch()
    return Places(cli.data_dir, run_dir, pki / "server", pki / "client", tmp_path / "disk.qcow2",
                  device, free_loopback_port())


def example(name: str, places: Places) -> list[str]:
    """The command of the README block `<!-- example: NAME -->`, placeholders replaced;
    `pfnbd` runs as `python -m pfnbd` (this tree's)."""
    match = re.search(rf"<!-- example: {re.escape(name)} -->\n```sh\n(.*?)```", README.read_text(), re.S)
    assert match, f"no example {name!r} in {README}"
    command = match.group(1).replace("\\\n", " ")
    for placeholder, value in places.replacements().items():
        command = command.replace(placeholder, value)
    argv = shlex.split(command)
    return pfnbd_command(*argv[1:]) if argv[0] == "pfnbd" else argv


class PausedQemu:
    """A virtual machine as an example line starts it, but paused (-S), without display
    and with QMP on stdio. QEMU opens its disks at start, so it is a connected pfnbd
    client; HMP's qemu-io then reads and writes through the machine's own disks (its
    report lands on QEMU's stdout, between the QMP messages)."""

    def __init__(self, argv: list[str], stderr_path: Path) -> None:
        require(argv[0])
        self._stderr_path = stderr_path
        self._buffer = b""
        self._printed: list[str] = []  # stdout lines that are not QMP
        with open(stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [*argv, "-S", "-nodefaults", "-display", "none", "-qmp", "stdio"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
            )
        self._receive()  # the greeting
        self.execute("qmp_capabilities")

    def __enter__(self) -> PausedQemu:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(b'{"execute": "quit"}\n')
            self.process.stdin.flush()
        try:
            self.process.wait(timeout=QEMU_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _receive(self) -> dict:
        deadline = time.monotonic() + QEMU_TIMEOUT
        while True:
            while b"\n" not in self._buffer:
                ready, _, _ = select.select([self.process.stdout], [], [],
                                            max(0.0, deadline - time.monotonic()))
                chunk = os.read(self.process.stdout.fileno(), 65536) if ready else b""
                if not chunk:
                    self.process.kill()
                    raise AssertionError(f"QEMU said nothing (exit {self.process.wait()}):\n"
                                         + self._stderr_path.read_text(errors="replace"))
                self._buffer += chunk
            line, _, self._buffer = self._buffer.partition(b"\n")
            if line.startswith(b"{"):
                return json.loads(line)
            self._printed.append(line.decode(errors="replace"))

    def execute(self, command: str, **arguments) -> object:
        self.process.stdin.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.process.stdin.flush()
        while True:
            message = self._receive()  # events come in between: skip them
            if "error" in message:
                raise AssertionError(f"QMP {command}: {message['error']}")
            if "return" in message:
                return message["return"]

    def qemu_io(self, disk: str, command: str) -> str:
        """Runs a qemu-io command on `disk`: a drive name, or `-d DEVICE` for the virtio
        device itself (a node name would open a second, conflicting writer)."""
        self._printed.clear()
        returned = self.execute("human-monitor-command", **{"command-line": f'qemu-io {disk} "{command}"'})
        output = returned + "\n".join(self._printed)
        assert re.search(r"^(wrote|read) \d+/\d+ bytes", output, re.M) and "failed" not in output, output
        return output


def test_example_serve_unix_and_the_qemu_lines_on_it(launch, places, tmp_path):
    server = launch(command=example("serve-unix", places), volumes=())
    pid = (places.run_dir / "pfnbd.pid").read_text()

    with PausedQemu(example("qemu-drive", places), tmp_path / "qemu-drive.err") as vm:
        vm.qemu_io("virtio0", "write -P 0x51 0 1M")
        vm.qemu_io("virtio0", "read -P 0x51 0 1M")
    with PausedQemu(example("qemu-blockdev", places), tmp_path / "qemu-blockdev.err") as vm:
        vm.qemu_io("-d vm1/virtio-backend", "read -P 0x51 0 1M")
        vm.qemu_io("-d vm1/virtio-backend", "write -P 0x52 1M 1M")
    check = run("qemu-io", "-r", "-f", "raw", places.uri(), "-c", "read -P 0x52 1M 1M", timeout=60)

    assert pid == f"{server.process.pid}\n" and socket_mode(places.socket) == 0o600
    assert "read 1048576/1048576" in check.stdout
    lines = connection_lines(server, 3)
    assert all("export=vm1" in line and "end=closed" in line for line in lines), lines


def test_example_qemu_img_convert_into_a_volume(launch, places):
    run("qemu-img", "create", "-q", "-f", "qcow2", str(places.image), "32M", timeout=60)
    run("qemu-io", "-f", "qcow2", str(places.image), "-c", "write -P 0x61 0 3M",
        "-c", "write -P 0x62 20M 1M", timeout=60)
    launch(command=example("serve-unix", places), volumes=())

    run(*example("qemu-img-convert", places), timeout=120)
    # The volume is larger than the image: compare the image's 32 MiB of it.
    volume = {"driver": "raw", "size": 32 * MiB, "file": {
        "driver": "nbd", "server": {"type": "unix", "path": str(places.socket)}, "export": "vm1"}}
    compared = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(places.image),
                   f"json:{json.dumps(volume)}", timeout=120, check=False)

    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_example_nbd_client_lines_negotiate_up_to_the_kernel(launch, places):
    server = launch(command=example("serve-unix", places), volumes=())

    listed = run(*example("nbd-client-list", places), timeout=60)
    attach = run(*example("nbd-client-unix", places), timeout=60, check=False)

    assert "vm1" in listed.stdout, listed.stdout
    # This host has no nbd module (and the device is a stand-in): it stops there.
    assert attach.returncode != 0 and "Invalid nbd device target" in attach.stderr, attach.stderr
    lines = connection_lines(server, 5)  # the list, then four connections of -C 4
    assert sum("export=vm1" in line for line in lines) == 4, lines


def test_example_tls_server_and_its_clients(launch, places, tmp_path):
    server = launch(command=example("serve-tls", places), volumes=())
    run("qemu-img", "create", "-q", "-f", "qcow2", str(places.image), "8M", timeout=60)
    run("qemu-io", "-f", "qcow2", str(places.image), "-c", "write -P 0x71 0 2M", timeout=60)

    info = run(*example("nbdinfo-tls", places), timeout=60)
    run(*example("qemu-img-convert-tls", places), timeout=120)
    with PausedQemu(example("qemu-drive-tls", places), tmp_path / "qemu-drive-tls.err") as vm:
        vm.qemu_io("virtio0", "read -P 0x71 0 2M")
        vm.qemu_io("virtio0", "write -P 0x72 4M 64k")
    attach = run(*example("nbd-client-tls", places), timeout=60, check=False)

    assert server.listen == [f"127.0.0.1:{places.port}"] and "max_connections=16" in server.log()
    assert "export=\"vm1\"" in info.stdout and "TLS" in info.stdout, info.stdout
    assert attach.returncode != 0 and "Invalid nbd device target" in attach.stderr, attach.stderr
    lines = connection_lines(server, 7)  # nbdinfo, qemu-img, QEMU, four of nbd-client
    assert all("tls=TLSv1" in line and "export=vm1" in line for line in lines), lines


def test_example_qemu_blockdev_with_tls_on_a_unix_socket(launch, places, tmp_path):
    server = launch("--socket", str(places.socket), "--tls", "require",
                    "--tls-certificates", str(places.server_tls), volumes=("vm1",))

    with PausedQemu(example("qemu-blockdev-tls", places), tmp_path / "qemu-blockdev-tls.err") as vm:
        vm.qemu_io("-d vm1/virtio-backend", "write -P 0x81 0 64k")
        vm.qemu_io("-d vm1/virtio-backend", "read -P 0x81 0 64k")

    (line,) = connection_lines(server, 1)
    assert "tls=TLSv1" in line and "bytes_written=65536" in line, line


def unit_settings(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def test_example_systemd_units_verify_and_serve_under_socket_activation(socket_activate, cli, tmp_path):
    cli.run("volume", "create", "vm1", "--size", "64M")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    replacements = {"/usr/local/bin/pfnbd": f"{sys.executable} -m pfnbd",
                    "/var/lib/pfnbd": str(cli.data_dir), "/run/pfnbd": str(run_dir)}
    units = {}
    for name in ("pfnbd.socket", "pfnbd.service"):
        text = (EXAMPLES / "systemd" / name).read_text()
        for placeholder, value in replacements.items():
            text = text.replace(placeholder, value)
        units[name] = tmp_path / name
        units[name].write_text(text)

    verified = run("systemd-analyze", "verify", *map(str, units.values()), timeout=60, check=False)
    (listen,) = unit_settings(units["pfnbd.socket"].read_text(), "ListenStream")
    (exec_start,) = unit_settings(units["pfnbd.service"].read_text(), "ExecStart")
    activated = socket_activate(listen, shlex.split(exec_start))
    uri = f"nbd+unix:///vm1?socket={listen}"
    size = nbdinfo("--size", uri)
    run("qemu-io", "-f", "raw", uri, "-c", "write -P 0x91 0 1M", timeout=60)
    wait_for(lambda: len(log_lines(activated, "connection")) == 2, "two connection lines")
    activated.process.send_signal(signal.SIGUSR1)
    wait_for(lambda: log_lines(activated, "stats"), "a stats line")
    activated.process.send_signal(signal.SIGTERM)
    code = activated.process.wait(timeout=30)

    assert verified.returncode == 0 and verified.stdout + verified.stderr == "", verified.stderr
    assert size.stdout.strip() == str(64 * MiB)
    assert "max_connections=64" in activated.log()
    assert stats_line(activated, "vm1")["bytes_written"] == MiB
    assert code == 0, activated.log()
