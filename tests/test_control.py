"""The QMP control socket (`pfnbd serve --control`), driven by QEMU's own Python QMP
client (the `qemu.qmp` package), and the `pfnbd export` commands over it: exports
added at run time and served to qemu-io, removed in safe and hard mode, errors
answered as QMP errors.  The sans-I/O pieces are tested on their own below."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, strategies as st
from qemu.qmp import EventListener, ExecuteError, QMPClient

from conftest import SYSTEM_PYTHON, run, run_libnbd
from test_cli import hold_connection
from test_libnbd_clients import LIBNBD_HELPERS
from test_qemu_clients import qemu_io
from test_snapshots import qemu_io_read_only
from test_tls import connection_lines

from pfnbd.control import MessageReader, QmpError, QmpSession

MiB = 1 << 20
EVENT_TIMEOUT = 15


def wait_for_path(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.fixture
def controlled(start_server, tmp_path):
    """Factory: `pfnbd serve --control` for the given volumes; returns (server, control path)."""

    def start(volumes: dict[str, str], *extra: str, exports: list[str] | None = None):
        control = tmp_path / f"qmp{len(list(tmp_path.glob('qmp*')))}.sock"
        server = start_server(volumes, "--control", str(control), *extra, exports=exports)
        wait_for_path(control)
        return server, control

    return start


def qmp(control: Path, session) -> object:
    """Runs `session(client)` on a connected QEMU QMP client, in asyncio."""

    async def main():
        client = QMPClient("pfnbd-test")
        await client.connect(str(control))
        try:
            return await session(client)
        finally:
            await client.disconnect()

    return asyncio.run(main())


def execute(control: Path, command: str, arguments: dict | None = None) -> object:
    return qmp(control, lambda client: client.execute(command, arguments))


def qmp_error(control: Path, command: str, arguments: dict | None = None) -> tuple[str, str]:
    """(class, desc) of a command that must fail."""

    async def session(client):
        with pytest.raises(ExecuteError) as failure:
            await client.execute(command, arguments)
        return failure.value.error_class, failure.value.error.error.desc

    return qmp(control, session)


def exports_by_id(control: Path) -> dict[str, dict]:
    return {e["id"]: e for e in execute(control, "query-block-exports")}


def assert_not_served(uri: str) -> None:
    result = run("qemu-io", "-f", "raw", "-c", "read 0 4k", uri, check=False)
    assert result.returncode != 0 and "export not available" in result.stderr, result.stderr


def add_export(node: str, export_id: str, **extra) -> dict:
    return {"type": "nbd", "id": export_id, "node-name": node, **extra}


# --- QMP with QEMU's client ------------------------------------------------------------


def test_control_socket_is_0600_and_greets_as_qemu_does(controlled):
    server, control = controlled({"test_v1": "16M"})
    assert stat.S_IMODE(control.lstat().st_mode) == 0o600

    async def session(client):
        greeting = client.greeting._asdict()
        return greeting, await client.execute("query-version")

    greeting, version = qmp(control, session)
    assert greeting["QMP"]["capabilities"] == []
    assert set(greeting["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
    assert version["package"].startswith("pfnbd ")
    # Exports from the command line have their names as ids.
    assert exports_by_id(control) == {"test_v1": {
        "type": "nbd", "id": "test_v1", "node-name": "test_v1", "shutting-down": False,
        "x-pfnbd-name": "test_v1", "x-pfnbd-writable": True, "x-pfnbd-clients": 0}}


def test_export_added_at_run_time_is_served_to_qemu_io(controlled, cli):
    cli.run("volume", "create", "disk2", "--size", "8M")
    server, control = controlled({"test_v1": "16M"})
    assert_not_served(server.uri("second"))  # not there yet

    assert execute(control, "block-export-add", add_export(
        "disk2", "disk2-export", name="second", writable=True, description="added live")) == {}
    qemu_io(server.uri("second"), "write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k")
    assert exports_by_id(control)["disk2-export"]["node-name"] == "disk2"
    # A read-only export (writable defaults to false) refuses writes.
    cli.run("volume", "snapshot", "disk2", "s1")
    execute(control, "block-export-add", add_export("disk2@s1", "snap"))
    qemu_io_read_only(server.uri("disk2@s1"), "read -P 0x5a 1M 64k")
    assert "Permission denied" in run("qemu-io", "-f", "raw", "-c", "write 0 4k", server.uri("disk2@s1"),
                                      check=False).stderr
    # The other export was never disturbed.
    qemu_io(server.uri(), "write -P 1 0 4k", "read -P 1 0 4k")


def test_safe_delete_is_refused_while_a_client_is_connected_and_hard_delete_disconnects(controlled):
    server, control = controlled({"test_v1": "16M", "other": "16M"})
    client = hold_connection(server.uri())
    bystander = hold_connection(server.uri("other"))
    try:
        error_class, desc = qmp_error(control, "block-export-del", {"id": "test_v1"})
        assert error_class == "GenericError" and "in use" in desc, desc
        assert exports_by_id(control)["test_v1"]["x-pfnbd-clients"] == 1

        async def session(client):
            listener = EventListener("BLOCK_EXPORT_DELETED")
            with client.listen(listener):
                assert await client.execute("block-export-del", {"id": "test_v1", "mode": "hard"}) == {}
                event = await asyncio.wait_for(listener.get(), EVENT_TIMEOUT)
            return event, await client.execute("query-block-exports")

        event, remaining = qmp(control, session)
        assert event["data"] == {"id": "test_v1"}
        assert {"seconds", "microseconds"} <= set(event["timestamp"])
        assert [e["id"] for e in remaining] == ["other"]
        # The server ended its client's connection (the idle client does not notice).
        (ended,) = connection_lines(server, 1)
        assert "export=test_v1" in ended, ended
        assert bystander.poll() is None  # the other export's client stays
        assert_not_served(server.uri())  # gone for new clients
    finally:
        for process in (client, bystander):
            process.kill()
            process.wait()


def test_safe_delete_of_an_idle_export_and_adding_it_again(controlled):
    server, control = controlled({"test_v1": "16M"})
    qemu_io(server.uri(), "write -P 0x33 0 64k")

    async def session(client):
        listener = EventListener("BLOCK_EXPORT_DELETED")
        with client.listen(listener):
            await client.execute("block-export-del", {"id": "test_v1"})
            await asyncio.wait_for(listener.get(), EVENT_TIMEOUT)
        await client.execute("block-export-add", add_export("test_v1", "again", writable=True))

    qmp(control, session)
    qemu_io(server.uri(), "read -P 0x33 0 64k")
    assert list(exports_by_id(control)) == ["again"]


# Issues 4 KiB writes, each its own seed, all in flight at once; says `issued`, then
# reports each write's outcome (its errno name, or "ok") once all are answered, and
# whether the connection still serves a read.
WRITES_IN_FLIGHT = r'''
h = connect(sys.argv[1])
count = int(sys.argv[2])
cookies = [h.aio_pwrite(pattern(i, 4096), i * 4096) for i in range(count)]
print("issued", flush=True)
outcomes = []
for cookie in cookies:
    while True:
        try:
            if h.aio_command_completed(cookie):
                outcomes.append("ok")
                break
        except nbd.Error as error:
            outcomes.append(errno.errorcode.get(error.errnum, str(error.errnum)))
            break
        h.poll(-1)
try:
    h.pread(4096, 0)
    still_serving = True
except nbd.Error:
    still_serving = False
print(json.dumps({"outcomes": outcomes, "still_serving": still_serving}))
'''


def test_hard_delete_answers_the_writes_in_flight_and_loses_none_acknowledged(controlled, tmp_path):
    # Every completion takes 1 s: the writes are in flight when the export is deleted.
    server, control = controlled({"test_v1": "16M"}, "--inject-delay", "1.0")
    count = 16
    writer = subprocess.Popen([SYSTEM_PYTHON, "-c", LIBNBD_HELPERS + WRITES_IN_FLIGHT, server.uri(), str(count)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "issued\n", writer.stderr.read()
        time.sleep(0.3)
        execute(control, "block-export-del", {"id": "test_v1", "mode": "hard"})
        stdout, stderr = writer.communicate(timeout=60)
    finally:
        writer.kill()
    report = json.loads(stdout.splitlines()[-1])
    outcomes = report["outcomes"]
    assert report["still_serving"] is False, report
    assert "ok" in outcomes, report  # those in flight were finished, not dropped
    assert set(outcomes) <= {"ok", "ESHUTDOWN"}, report  # the rest were refused, honestly

    execute(control, "block-export-add", add_export("test_v1", "back"))
    check = LIBNBD_HELPERS + r'''
h = connect(sys.argv[1])
outcomes = json.loads(sys.argv[2])
for i, outcome in enumerate(outcomes):
    if outcome == "ok":
        assert h.pread(4096, i * 4096) == pattern(i, 4096), f"acknowledged write {i} lost"
print("checked")
'''
    assert run_libnbd(check, server.uri(), json.dumps(outcomes)).strip() == "checked"
    assert any("end=" in line for line in connection_lines(server, 2))


def test_command_errors_are_qmp_errors(controlled):
    server, control = controlled({"test_v1": "16M"})
    cases = [
        ("block-export-add", add_export("nonexistent", "x"), "nonexistent"),
        ("block-export-add", add_export("test_v1", "test_v1"), "already in use"),
        ("block-export-add", {"type": "nbd", "id": "y"}, "Parameter 'node-name' is missing"),
        ("block-export-add", add_export("test_v1", "z", writable="yes"), "'writable', expected: boolean"),
        ("block-export-add", add_export("test_v1", "z", bitmaps=[]), "Parameter 'bitmaps' is unexpected"),
        ("block-export-add", {**add_export("test_v1", "z"), "type": "fuse"}, "nbd"),
        ("block-export-del", {"id": "nope"}, "not found"),
        ("block-export-del", {"id": "test_v1", "mode": "sometimes"}, "mode"),
        ("block_set_io_throttle", {"id": "test_v1", "bps": 1}, "Parameter 'bps_rd' is missing"),
    ]
    for command, arguments, words in cases:
        error_class, desc = qmp_error(control, command, arguments)
        assert error_class == "GenericError" and words in desc, (command, arguments, desc)
    error_class, desc = qmp_error(control, "human-monitor-command", {"command-line": "info"})
    assert error_class == "CommandNotFound", desc
    assert list(exports_by_id(control)) == ["test_v1"]  # nothing half-added


def raw_session(control: Path, data: bytes, replies: int) -> list[dict]:
    """Sends raw bytes after the greeting; returns the first `replies` messages."""
    reader = MessageReader()
    messages: list = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(control))
        sock.sendall(data)
        while len(messages) < replies + 1:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {messages}"
            messages += reader.feed(chunk)
    return messages[1:]


def test_bad_json_gets_a_qmp_error_and_the_session_goes_on(controlled):
    server, control = controlled({"test_v1": "16M"})
    replies = raw_session(control, b'{"execute": "query-version"}'  # before negotiation
                          b'{"execute": "qmp_capabilities"}\n{not json}\n[1, 2]\n'
                          b'{"execute": "query-version", "id": [7]}'
                          b'{"execute": "quit", "extra": 1}', replies=6)
    assert replies[0]["error"]["class"] == "CommandNotFound"
    assert replies[1] == {"return": {}}
    assert replies[2]["error"]["class"] == "GenericError" and "JSON parse error" in replies[2]["error"]["desc"]
    assert replies[3]["error"] == {"class": "GenericError", "desc": "QMP input must be a JSON object"}
    assert replies[4]["id"] == [7] and "package" in replies[4]["return"]
    assert "unexpected" in replies[5]["error"]["desc"]  # and so not a quit
    assert server.process.poll() is None


def test_quit_stops_the_server(controlled):
    server, control = controlled({"test_v1": "16M"})
    execute(control, "quit")
    assert server.process.wait(timeout=30) == 0
    assert not control.exists()


# --- pfnbd export: the same without JSON -------------------------------------------------


def test_export_commands_add_list_throttle_and_delete(controlled, cli):
    cli.run("volume", "create", "disk2", "--size", "8M")
    server, control = controlled({"test_v1": "16M"})
    c = ["--control", str(control)]
    cli.run("export", "add", "disk2", "--writable", "--name", "second", *c)
    qemu_io(server.uri("second"), "write -P 7 0 64k")
    cli.run("export", "throttle", "second", "bps=4M,iops_wr=100", *c)
    listed = {e["id"]: e for e in json.loads(cli.run("export", "list", "--json", *c).stdout)}
    assert listed["second"]["node-name"] == "disk2"
    assert listed["second"]["throttle"]["bps"] == 4 * MiB and listed["second"]["throttle"]["iops_wr"] == 100
    table = cli.run("export", "list", *c).stdout
    assert "second" in table and "bps=4194304" in table, table
    cli.run("export", "del", "second", *c)
    wait = time.monotonic() + 10
    while "second" in cli.run("export", "list", *c).stdout:
        assert time.monotonic() < wait
        time.sleep(0.05)


@pytest.mark.parametrize("args, words", [
    (["export", "del", "nope"], "not found"),
    (["export", "add", "missing-volume"], "missing-volume"),
    (["export", "throttle", "test_v1", "bps=fast"], "bps"),
    (["export", "throttle", "test_v1", "bps=1M,bps_rd=1M"], "same time"),
])
def test_export_command_mistakes_get_one_line(controlled, cli, args, words):
    server, control = controlled({"test_v1": "16M"})
    result = cli.run(*args, "--control", str(control), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and words in lines[0], result.stderr


def test_export_command_without_a_server_gets_one_line(cli, tmp_path):
    result = cli.run("export", "list", "--control", str(tmp_path / "none.sock"), check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr


# --- the sans-I/O pieces -----------------------------------------------------------------


messages = st.lists(st.dictionaries(
    st.text(max_size=8), st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8),
    max_size=4), max_size=6)


@given(messages, st.randoms(use_true_random=False), st.sampled_from(["", "\n", "\r\n", " "]))
def test_message_reader_splits_a_stream_in_any_chunks(values, rng, separator):
    data = "".join(json.dumps(v, ensure_ascii=False) + separator for v in values).encode()
    reader = MessageReader()
    parsed, at = [], 0
    while at < len(data):
        step = rng.randint(1, 16)
        parsed += reader.feed(data[at:at + step])
        at += step
    assert parsed == values


def test_message_reader_recovers_after_bad_json():
    reader = MessageReader()
    values = reader.feed(b'{"a": tru}{"b": 1}')
    assert isinstance(values[0], QmpError) and values[1] == {"b": 1}
    assert isinstance(reader.feed(b"]")[0], QmpError)
    assert reader.feed(b'{"c": "}"}') == [{"c": "}"}]


def test_session_serves_only_capabilities_before_negotiation():
    session = QmpSession({"echo": lambda arguments: arguments})
    first = json.loads(session.receive(b'{"execute": "echo", "id": 1}')[0])
    assert first["error"]["class"] == "CommandNotFound" and first["id"] == 1
    assert session.receive(b'{"execute": "qmp_capabilities"}') == [b'{"return": {}}\r\n']
    assert json.loads(session.receive(b'{"execute": "echo", "arguments": {"x": 2}}')[0]) == {"return": {"x": 2}}
    again = json.loads(session.receive(b'{"execute": "qmp_capabilities"}')[0])
    assert again["error"]["class"] == "CommandNotFound"


def test_negotiation_looks_exports_up_in_the_live_table():
    from pfnbd import protocol as p
    from pfnbd.negotiation import ExportInfo, Negotiation

    def info(name: str) -> ExportInfo:
        return ExportInfo(name, "", 1 << 20, p.TransmissionFlags.HAS_FLAGS)

    def reply_type(outcome) -> int:
        return p.option_reply_header.parse(outcome.replies[-1]).type

    table = {"first": info("first")}
    negotiation = Negotiation(table)
    negotiation.receive_client_flags(p.client_flags.build(dict(flags=p.ClientFlags.FIXED_NEWSTYLE)))
    table["added"] = info("added")  # after the client connected
    asking = p.info_request.build(dict(name="added", requests=[]))
    assert reply_type(negotiation.receive_option(p.Option.INFO, asking)) == p.OptionReply.ACK
    del table["first"]
    # The default export is the first one left.
    default = negotiation.receive_option(p.Option.INFO, p.info_request.build(dict(name="", requests=[])))
    assert reply_type(default) == p.OptionReply.ACK
    del table["added"]
    assert reply_type(negotiation.receive_option(p.Option.GO, asking)) == p.OptionReply.ERR_UNKNOWN
