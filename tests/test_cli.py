"""The `pfnbd` command line as a user types it: volume management, the argument
checks of `serve`, its signals and its log."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest

from conftest import SYSTEM_PYTHON, Cli, pfnbd_command, run, wait_for_socket

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def volume_sizes(cli: Cli) -> dict[str, int]:
    """name -> size in bytes, from `volume list --json`."""
    return {v["name"]: v["size"] for v in json.loads(cli.run("volume", "list", "--json").stdout)}


def listed_names(cli: Cli) -> list[str]:
    """Every whitespace-separated word `volume list` prints (names, maybe sizes/headers)."""
    return cli.run("volume", "list").stdout.split()


def assert_fails_with_one_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Bad input: non-zero exit, a single line on stderr naming the problem, no traceback."""
    shown = f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.returncode != 0, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, shown
    for word in words:
        assert word in lines[0], shown


def run_serve_expecting_refusal(cli: Cli, *args: str) -> subprocess.CompletedProcess[str]:
    """`pfnbd serve ARGS` must give up on its own, not start serving: 30 s at most."""
    return subprocess.run(pfnbd_command("serve", *args), env=cli.env, capture_output=True,
                          text=True, timeout=30)


# --- volume management --------------------------------------------------------------


def test_volume_create_list_info_delete(cli):
    cli.run("volume", "create", "alpha", "--size", "1M")
    cli.run("volume", "create", "beta.2", "--size", "3G")
    cli.run("volume", "create", "gamma_3-x", "--size", "512")

    assert volume_sizes(cli) == {"alpha": 1 * MiB, "beta.2": 3 * GiB, "gamma_3-x": 512}
    assert {"alpha", "beta.2", "gamma_3-x"} <= set(listed_names(cli))

    info = json.loads(cli.run("volume", "info", "beta.2", "--json").stdout)
    assert (info["name"], info["size"]) == ("beta.2", 3 * GiB)
    text = cli.run("volume", "info", "beta.2").stdout
    assert "beta.2" in text and str(3 * GiB) in text, text

    cli.run("volume", "delete", "beta.2")
    assert volume_sizes(cli) == {"alpha": 1 * MiB, "gamma_3-x": 512}
    assert "beta.2" not in listed_names(cli)
    assert_fails_with_one_line(cli.run("volume", "info", "beta.2", check=False), "beta.2")
    # The name is free again, at another size.
    cli.run("volume", "create", "beta.2", "--size", "4K")
    assert volume_sizes(cli)["beta.2"] == 4 * KiB


def test_volume_list_when_empty(cli):
    assert json.loads(cli.run("volume", "list", "--json").stdout) == []
    assert cli.run("volume", "list").returncode == 0


@pytest.mark.parametrize(
    "size, expected",
    [("512", 512), ("4096", 4096), ("1K", KiB), ("64K", 64 * KiB), ("1M", MiB), ("2G", 2 * GiB),
     ("1T", TiB), ("3m", 3 * MiB)],  # PureFlash's -s takes k/m/g/t as well
)
def test_volume_sizes_in_bytes_or_binary_suffix(cli, size, expected):
    cli.run("volume", "create", "sized", "--size", size)

    assert json.loads(cli.run("volume", "info", "sized", "--json").stdout)["size"] == expected


def test_volume_is_served_at_its_size_and_starts_empty(start_server, tmp_path):
    server = start_server({"fresh": "5M"})

    size = run("nbdinfo", "--size", server.uri("fresh"), timeout=60).stdout.strip()
    run("nbdcopy", server.uri("fresh"), str(tmp_path / "fresh.img"), timeout=60)

    assert size == str(5 * MiB)
    assert (tmp_path / "fresh.img").read_bytes() == bytes(5 * MiB)


def test_data_dir_option_env_var_and_xdg_default_agree(cli, tmp_path):
    by_option = tmp_path / "by-option"
    run(*pfnbd_command("--data-dir", str(by_option), "volume", "create", "opt", "--size", "1M"))
    assert volume_sizes(Cli(by_option)) == {"opt": MiB}

    xdg_home = tmp_path / "xdg"
    env = {k: v for k, v in os.environ.items() if k != "PFNBD_DATA_DIR"}
    env["XDG_DATA_HOME"] = str(xdg_home)
    run(*pfnbd_command("volume", "create", "xdg", "--size", "2M"), env=env)
    assert volume_sizes(Cli(xdg_home / "pfnbd")) == {"xdg": 2 * MiB}


# --- bad input ------------------------------------------------------------------------


def files_under(directory: Path) -> set[Path]:
    return {path.relative_to(directory) for path in directory.rglob("*")}


def assert_create_refused(cli: Cli, name: str, size: str) -> None:
    """A refused create: one-line error, no volume, and nothing left in the data dir."""
    cli.run("volume", "create", "existing", "--size", "1M")
    before = files_under(cli.data_dir)

    assert_fails_with_one_line(cli.run("volume", "create", name, "--size", size, check=False))
    assert volume_sizes(cli) == {"existing": MiB}
    assert files_under(cli.data_dir) == before


# 2**83 bytes: more than any file can hold.
@pytest.mark.parametrize("size", ["0", "lots", "1000", "-512", "0K", "4X", "", "99999999999T"])
def test_create_refuses_bad_sizes(cli, size):
    assert_create_refused(cli, "bad", size)


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 97])
def test_create_refuses_bad_names(cli, tmp_path, name):
    assert_create_refused(cli, name, "1M")
    assert not (tmp_path / "escape").exists()


def test_create_accepts_the_longest_name(cli):
    cli.run("volume", "create", "x" * 96, "--size", "1M")
    assert volume_sizes(cli) == {"x" * 96: MiB}


def test_create_refuses_a_duplicate_name_and_keeps_the_original(cli):
    cli.run("volume", "create", "twice", "--size", "1M")

    assert_fails_with_one_line(cli.run("volume", "create", "twice", "--size", "2M", check=False),
                               "twice")
    assert volume_sizes(cli) == {"twice": MiB}


@pytest.mark.parametrize("command", [["volume", "info", "nope"], ["volume", "info", "nope", "--json"],
                                     ["volume", "delete", "nope"]])
def test_missing_volume_is_one_line_error(cli, command):
    cli.run("volume", "create", "present", "--size", "1M")

    assert_fails_with_one_line(cli.run(*command, check=False), "nope")
    assert volume_sizes(cli) == {"present": MiB}


def test_delete_refuses_a_volume_being_served(start_server, cli):
    server = start_server({"busy": "1M"})

    assert_fails_with_one_line(cli.run("volume", "delete", "busy", check=False), "busy")
    assert volume_sizes(cli) == {"busy": MiB}
    assert run("nbdinfo", "--size", server.uri("busy"), timeout=60).stdout.strip() == str(MiB)


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["--volume", "nope", "--socket", "{socket}"], ["nope"]),
        (["--volume", "present", "--volume", "nope", "--socket", "{socket}"], ["nope"]),
        (["--volume", "present", "--socket", "{socket}", "--port", "10809"], ["--socket"]),
        (["--volume", "present", "--socket", "{socket}", "--bind", "127.0.0.1"], ["--socket"]),
        (["--volume", "present", "--port", "lots"], ["--port"]),
        (["--volume", "present", "--port", "70000"], ["70000"]),
        (["--volume", "present", "--volume", "present", "--socket", "{socket}"], []),
        (["--volume", "present", "--socket", "{socket}/missing-dir.sock"], ["missing-dir"]),
    ],
    ids=["missing-volume", "one-of-two-missing", "socket-and-port", "socket-and-bind",
         "bad-port", "port-out-of-range", "volume-twice", "socket-dir-missing"],
)
def test_serve_refuses_bad_arguments(cli, tmp_path, arguments, words):
    cli.run("volume", "create", "present", "--size", "1M")
    socket_path = tmp_path / "refused.sock"
    args = [a.replace("{socket}", str(socket_path)) for a in arguments]

    result = run_serve_expecting_refusal(cli, *args)

    assert_fails_with_one_line(result, *words)
    assert not socket_path.exists()


def test_serve_without_volume_exports_a_default_volume(start_server, cli):
    """The one-command start: no --volume serves (and first creates) a default volume,
    which is also the export the empty name selects."""
    server = start_server({}, exports=[])

    (export,) = json.loads(run("nbdinfo", "--json", "--list", server.uri(""), timeout=60).stdout)["exports"]
    assert export["export-name"] in volume_sizes(cli)
    assert export["export-size"] == volume_sizes(cli)[export["export-name"]]
    assert run("nbdinfo", "--size", server.uri(""), timeout=60).stdout.strip() == str(export["export-size"])


# --- serve: signals and log -------------------------------------------------------------


def hold_connection(uri: str) -> subprocess.Popen[str]:
    """A libnbd client that connects, says so on stdout, then idles until killed."""
    client = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", "import nbd, sys, time\n"
         "h = nbd.NBD(); h.connect_uri(sys.argv[1]); print('connected', flush=True)\n"
         "time.sleep(600)", uri],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    ready, _, _ = select.select([client.stdout], [], [], 30)
    line = client.stdout.readline() if ready else "(nothing in 30 s)"
    if line != "connected\n":
        client.kill()
        raise AssertionError(f"client could not connect: {line!r} {client.stderr.read()}")
    return client


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_exits_zero_on_signal_with_idle_client_connected(start_server, sig):
    server = start_server()
    client = hold_connection(server.uri())
    try:
        started = time.monotonic()
        code = server.stop(sig, timeout=15)
        took = time.monotonic() - started
    finally:
        client.kill()
        client.wait()

    assert code == 0, server.log()
    assert took < 10, f"shutdown took {took:.1f} s"
    assert "Traceback" not in server.log(), server.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_exits_zero_on_signal_when_idle(start_server, sig):
    server = start_server()

    assert server.stop(sig, timeout=15) == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


@attrs.define
class Serving:
    """`pfnbd serve` launched by hand, its stdout and stderr kept apart."""

    process: subprocess.Popen[str]
    stdout_path: Path
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_until_serving(self, uri: str) -> None:
        deadline = time.monotonic() + 30
        while run("nbdinfo", "--can", "connect", uri, check=False, timeout=10).returncode != 0:
            assert self.process.poll() is None, f"serve exited {self.process.returncode}:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"serve did not answer on {uri} in 30 s"
            time.sleep(0.1)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@contextlib.contextmanager
def serving(cli: Cli, tmp_path: Path, *args: str):
    stdout_path, stderr_path = tmp_path / "serve.out", tmp_path / "serve.err"
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        process = subprocess.Popen(pfnbd_command("serve", *args), env=cli.env, stdout=out,
                                   stderr=err, text=True)
    try:
        yield Serving(process, stdout_path, stderr_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def settled_lines(server: Serving, quiet: float = 1.0) -> list[str]:
    """stderr's lines once nothing has been added for `quiet` seconds."""
    deadline = time.monotonic() + 15
    lines = server.stderr().splitlines()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = server.stderr().splitlines()
        if now == lines:
            return lines
        lines = now
    raise AssertionError(f"serve kept logging for 15 s:\n{server.stderr()}")


def test_serve_logs_one_line_per_connection_to_stderr(cli, tmp_path):
    cli.run("volume", "create", "logged", "--size", "1M")
    socket_path = tmp_path / "logged.sock"
    uri = f"nbd+unix:///logged?socket={socket_path}"
    connections = 3
    with serving(cli, tmp_path, "--volume", "logged", "--socket", str(socket_path)) as server:
        wait_for_socket(server.process, socket_path, server.stderr_path)
        before = settled_lines(server)  # start-up messages
        for _ in range(connections):
            assert run("nbdinfo", "--size", uri, timeout=60).stdout.strip() == str(MiB)
        logged = settled_lines(server)[len(before):]
        code = server.stop()

    assert len(logged) == connections, logged
    assert code == 0, server.stderr()
    assert server.stdout_path.read_text() == "", "serve wrote to stdout"


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_on_tcp_bind_and_port(cli, tmp_path):
    cli.run("volume", "create", "tcp_vol", "--size", "2M")
    port = free_loopback_port()
    uri = f"nbd://127.0.0.1:{port}/tcp_vol"
    with serving(cli, tmp_path, "--volume", "tcp_vol", "--bind", "127.0.0.1", "--port", str(port)) as server:
        server.wait_until_serving(uri)
        size = run("nbdinfo", "--size", uri, timeout=60).stdout
        code = server.stop()

    assert size.strip() == str(2 * MiB)
    assert code == 0, server.stderr()


def test_serve_replaces_a_stale_socket(cli, tmp_path):
    """A socket file left by a crashed server, with nobody listening, is no obstacle."""
    cli.run("volume", "create", "after_crash", "--size", "1M")
    socket_path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(str(socket_path))  # closing without unlinking leaves the file
    uri = f"nbd+unix:///after_crash?socket={socket_path}"
    with serving(cli, tmp_path, "--volume", "after_crash", "--socket", str(socket_path)) as server:
        server.wait_until_serving(uri)
        size = run("nbdinfo", "--size", uri, timeout=60).stdout
        code = server.stop()

    assert size.strip() == str(MiB)
    assert code == 0, server.stderr()


def test_serve_refuses_the_socket_of_a_live_server(start_server, cli):
    first = start_server({"first": "1M"})
    cli.run("volume", "create", "second", "--size", "2M")

    result = run_serve_expecting_refusal(cli, "--volume", "second", "--socket", str(first.socket))

    assert_fails_with_one_line(result, str(first.socket))
    assert run("nbdinfo", "--size", first.uri("first"), timeout=60).stdout.strip() == str(MiB)


def test_serve_refuses_a_socket_path_that_is_a_regular_file(cli, tmp_path):
    cli.run("volume", "create", "present", "--size", "1M")
    precious = tmp_path / "precious.txt"
    precious.write_text("not a socket")

    result = run_serve_expecting_refusal(cli, "--volume", "present", "--socket", str(precious))

    assert_fails_with_one_line(result, str(precious))
    assert precious.read_text() == "not a socket"


def test_python_module_and_console_script_agree(cli):
    """`pfnbd` (the installed script) and `python -m pfnbd` see the same volumes."""
    cli.run("volume", "create", "both", "--size", "1M")
    script = Path(sys.executable).with_name("pfnbd")

    listed = run(str(script), "volume", "list", "--json", env=cli.env).stdout

    assert {v["name"]: v["size"] for v in json.loads(listed)} == {"both": MiB}
