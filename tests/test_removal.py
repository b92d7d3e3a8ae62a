"""Removing an export under load (issue 15 part 5): while several libnbd clients of
export A pipeline writes and clients of export B do the same, A is deleted over QMP,
mode hard (its clients are disconnected) or safe (refused while they are
connected).  Nothing acknowledged is lost: A's volume, opened again, holds every
acknowledged write; B's clients see no error and never stop.

Also the race of a removal with a client entering transmission: the export goes
while its GO reply is on the wire, or between GO and the first request."""

from __future__ import annotations

import asyncio
import json
import logging
import select
import subprocess
import time

import pytest
import trio
import trio.testing
from qemu.qmp import EventListener

from conftest import SYSTEM_PYTHON, run_libnbd
from fuzz.nbdwire import (GREETING, IHAVEOPT, OPTION_HEADER, OPTION_REPLY_HEADER, HandshakeFlag, Opt, Rep,
                          info_request, request_header)
from test_control import EVENT_TIMEOUT, add_export, controlled, execute, exports_by_id, qmp, qmp_error  # noqa: F401
from test_libnbd_clients import LIBNBD_HELPERS

from pfnbd.control import ExportControl, QmpError
from pfnbd.server import ExportSpec, Server, open_exports
from pfnbd.store import Store
from pfnbd.volume import EmulatedClient

MiB = 1 << 20
BLOCK = 4096
CONNECTIONS = 3  # per export
BLOCKS = 1024  # per connection: 4 MiB each, rewritten at random
LOAD_SECONDS = 1.5  # of writing before the deletion, and again after it
RACE_TIMEOUT = 30
START_TIMEOUT = 30  # seconds for the writers to connect

# Writes 4 KiB blocks at random in each connection's own region, WINDOW in flight,
# never two on one block at once, each write with a seed of its own; until its
# connection fails (its first error ends it) or stdin is closed.  A "mark" line on
# stdin notes how many writes have completed so far.  Prints one JSON report: per
# connection its writes as [block, seed, outcome], outcome "ok", an errno name, or
# "unknown" for one never answered; and the writes completed by the mark.
WRITER = r'''
import threading

uri, connections, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
WINDOW = 16
stop = threading.Event()
logs = [[] for _ in range(connections)]
completed = [0] * connections

def outcome_of(h, cookie):
    try:
        return "ok" if h.aio_command_completed(cookie) else None
    except nbd.Error as error:
        return errno.errorcode.get(error.errnum, str(error.errnum))

def write(index):
    rng, log = random.Random(index), logs[index]
    h = connect(uri)
    in_flight = {}  # cookie -> its log entry
    busy, seed, broken = set(), index << 32, False
    while in_flight or not (broken or stop.is_set()):
        while not (broken or stop.is_set()) and len(in_flight) < WINDOW:
            block = index * blocks + rng.randrange(blocks)
            if block in busy:
                continue
            seed += 1
            entry = [block, seed, "unknown"]
            try:
                cookie = h.aio_pwrite(pattern(seed, 4096), block * 4096)
            except nbd.Error:
                broken = True  # the connection is gone: this write was never sent
                break
            log.append(entry)
            busy.add(block)
            in_flight[cookie] = entry
        if not in_flight:
            break
        if h.aio_is_dead() or h.aio_is_closed():
            broken = True  # the rest were never answered: "unknown"
            in_flight.clear()
            break
        try:
            h.poll(1000)
        except nbd.Error:
            pass  # dead now: the in-flight commands are retired below or left unknown
        for cookie, entry in list(in_flight.items()):
            outcome = outcome_of(h, cookie)
            if outcome is not None:
                entry[2] = outcome
                del in_flight[cookie]
                busy.discard(entry[0])
                completed[index] += 1
                broken = broken or outcome != "ok"

threads = [threading.Thread(target=write, args=(i,)) for i in range(connections)]
for thread in threads:
    thread.start()
print("writing", flush=True)
marked = None
for line in sys.stdin:
    if line.strip() == "mark":
        marked = sum(completed)
stop.set()
for thread in threads:
    thread.join()
print(json.dumps({"logs": logs, "marked": marked, "completed": sum(completed)}))
'''

# Reads back every block the writers wrote.  A block holds the data of its last
# acknowledged write, or of a write issued after that one (unanswered or failed: it
# may have landed); a block no write was acknowledged on may also still be zeros.
CHECK = r'''
uri, path = sys.argv[1:3]
history = {}
for log in json.load(open(path)):
    for block, seed, outcome in log:
        history.setdefault(block, []).append((seed, outcome))
h = connect(uri)
lost, acknowledged = [], 0
for block, writes in sorted(history.items()):
    acked = [i for i, (_, outcome) in enumerate(writes) if outcome == "ok"]
    acknowledged += len(acked)
    allowed = [pattern(seed, 4096) for seed, _ in writes[acked[-1] if acked else 0:]]
    if not acked:
        allowed.append(bytes(4096))
    if h.pread(4096, block * 4096) not in allowed:
        lost.append(block)
print(json.dumps({"blocks": len(history), "acknowledged": acknowledged, "lost": lost[:20]}))
'''


def start_writers(uri: str) -> subprocess.Popen[str]:
    writers = subprocess.Popen([SYSTEM_PYTHON, "-c", LIBNBD_HELPERS + WRITER, uri, str(CONNECTIONS), str(BLOCKS)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([writers.stdout], [], [], START_TIMEOUT)
    line = writers.stdout.readline() if ready else f"(nothing in {START_TIMEOUT} s)"
    if line != "writing\n":
        writers.kill()
        raise AssertionError(f"the writers did not start: {line!r} {writers.stderr.read()}")
    return writers


def report(writers: subprocess.Popen[str]) -> dict:
    """Closes the writers' stdin (they stop) and returns their report."""
    stdout, stderr = writers.communicate(timeout=120)
    assert writers.returncode == 0, stderr
    return json.loads(stdout.splitlines()[-1])


def outcomes(report: dict) -> set[str]:
    return {outcome for log in report["logs"] for _, _, outcome in log}


def check_volume(uri: str, report: dict, tmp_path, name: str) -> dict:
    path = tmp_path / f"{name}-writes.json"
    path.write_text(json.dumps(report["logs"]))
    checked = json.loads(run_libnbd(LIBNBD_HELPERS + CHECK, uri, str(path)))
    assert checked["lost"] == [], f"{name}: acknowledged writes lost on blocks {checked['lost']}"
    return checked


def delete_and_wait(control, export_id: str, mode: str) -> None:
    async def session(client):
        listener = EventListener("BLOCK_EXPORT_DELETED")
        with client.listen(listener):
            await client.execute("block-export-del", {"id": export_id, "mode": mode})
            event = await asyncio.wait_for(listener.get(), EVENT_TIMEOUT)
        assert event["data"] == {"id": export_id}

    qmp(control, session)


@pytest.mark.parametrize("mode", ["hard", "safe"])
def test_removal_under_load_loses_nothing_acknowledged_and_other_exports_never_notice(controlled, tmp_path, mode):
    size = f"{CONNECTIONS * BLOCKS * BLOCK // MiB}M"
    server, control = controlled({"a": size, "b": size})
    a_writers, b_writers = start_writers(server.uri("a")), start_writers(server.uri("b"))
    try:
        time.sleep(LOAD_SECONDS)
        if mode == "hard":
            delete_and_wait(control, "a", "hard")
        else:
            error_class, desc = qmp_error(control, "block-export-del", {"id": "a", "mode": "safe"})
            assert error_class == "GenericError" and "in use" in desc, desc
            assert exports_by_id(control)["a"]["shutting-down"] is False
        for writers in (a_writers, b_writers):
            writers.stdin.write("mark\n")
            writers.stdin.flush()
        time.sleep(LOAD_SECONDS)
        a_report = report(a_writers)
        b_report = report(b_writers)
    finally:
        for writers in (a_writers, b_writers):
            writers.kill()
            writers.wait()

    # B never noticed: every write acknowledged, and it kept writing after the deletion.
    assert outcomes(b_report) == {"ok"}, outcomes(b_report)
    assert b_report["completed"] > b_report["marked"] > 0, b_report
    if mode == "hard":
        # A's clients were cut off: some writes answered, the rest refused or never answered.
        assert "ok" in outcomes(a_report) and outcomes(a_report) <= {"ok", "ESHUTDOWN", "unknown", "ENOTCONN"}, \
            outcomes(a_report)
    else:
        # Refused, the deletion changed nothing: A's clients went on and left at their pace.
        assert outcomes(a_report) == {"ok"}, outcomes(a_report)
        assert a_report["completed"] > a_report["marked"] > 0, a_report
        delete_and_wait(control, "a", "safe")  # with no client left, a safe deletion goes through
    assert [e["id"] for e in execute(control, "query-block-exports")] == ["b"]

    # A's volume, opened again, holds every acknowledged write.
    execute(control, "block-export-add", add_export("a", "a-again", name="a"))
    a_checked = check_volume(server.uri("a"), a_report, tmp_path, "a")
    b_checked = check_volume(server.uri("b"), b_report, tmp_path, "b")
    assert a_checked["acknowledged"] > 100 and b_checked["acknowledged"] > 100, (a_checked, b_checked)
    # The check sees a lost write: one acknowledged, that B's volume does not hold.
    block, seed, _ = b_report["logs"][0][-1]
    b_report["logs"][0].append([block, seed + (1 << 31), "ok"])
    with pytest.raises(AssertionError, match=f"lost on blocks \\[{block}\\]"):
        check_volume(server.uri("b"), b_report, tmp_path, "b")


# --- the race with a client entering transmission (in process, in lockstep) ------------


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """`size` bytes, or fewer if the server closed the connection first."""
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def send_go(stream: trio.abc.Stream, name: str) -> None:
    """Fixed newstyle handshake, then NBD_OPT_GO for `name`; its reply is left unread."""
    magic, option_magic, _flags = GREETING.unpack(await receive_exactly(stream, GREETING.size))
    await stream.send_all((HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES).to_bytes(4, "big"))
    data = info_request(name)
    await stream.send_all(OPTION_HEADER.pack(IHAVEOPT, Opt.GO, len(data)) + data)


async def receive_go_replies(stream: trio.abc.ReceiveStream) -> list[int]:
    """The types of GO's replies, up to the final one."""
    types = []
    while not types or types[-1] == Rep.INFO:
        _magic, _option, reply_type, length = OPTION_REPLY_HEADER.unpack(
            await receive_exactly(stream, OPTION_REPLY_HEADER.size))
        await receive_exactly(stream, length)
        types.append(reply_type)
    return types


async def request_after_removal(stream: trio.abc.Stream) -> bytes:
    """Sends a READ on a connection whose export is gone: what comes back, b"" for a
    connection closed (the send may fail on it already)."""
    try:
        await stream.send_all(request_header(0, 0, BLOCK, cookie=7))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return await receive_exactly(stream, 16)


@pytest.mark.parametrize("window", ["while the GO reply is on the wire", "between GO and the first request"])
def test_an_export_removed_as_a_client_enters_transmission(tmp_path, caplog, window):
    """The client's request gets no data from a closed volume: its connection is
    closed, whole; the volume is closed exactly once, and nothing is left behind."""
    caplog.set_level(logging.INFO, logger="pfnbd")
    store = Store(tmp_path / "data")
    store.create("a", MiB)
    client = EmulatedClient(store)

    async def main():
        with trio.fail_after(RACE_TIMEOUT):  # a request left hanging on a closed volume fails too
            await race()

    async def race():
        async with open_exports(client, [ExportSpec("a", "")], read_only=False) as exports:
            backend = exports[0].bridge.backend
            closes = []
            close = backend.close
            backend.close = lambda: (closes.append(window), close())
            server = Server(exports)
            async with ExportControl.open(server, exports, client, trio.Event()) as control:
                client_end, server_end = trio.testing.lockstep_stream_pair()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.serve_connection, server_end)
                    await send_go(client_end, "a")
                    if window == "between GO and the first request":
                        assert await receive_go_replies(client_end) == [Rep.INFO, Rep.INFO, Rep.ACK]
                        await trio.testing.wait_all_tasks_blocked()  # the server awaits a request
                        with pytest.raises(QmpError, match="in use by 1 client"):
                            control.block_export_del({"id": "a", "mode": "safe"})
                        control.block_export_del({"id": "a", "mode": "hard"})
                    else:
                        # The server looked the export up and blocks sending GO's reply.
                        await trio.testing.wait_all_tasks_blocked()
                        control.block_export_del({"id": "a", "mode": "safe"})  # no client agreed on it yet
                        await trio.testing.wait_all_tasks_blocked()
                        assert closes  # deleted and closed before the client has GO's reply
                        assert await receive_go_replies(client_end) == [Rep.INFO, Rep.INFO, Rep.ACK]
                    assert await request_after_removal(client_end) == b""
                await trio.testing.wait_all_tasks_blocked()
                assert control.query_block_exports({}) == []
                snapshot = server.snapshot()
                assert snapshot.active == 0 and snapshot.exports[0].in_flight == 0
                assert snapshot.failed_handshakes == 0  # the server ended it, not a broken client
            assert closes == [window]  # the control closed it; ExportControl.open's exit did not again
        assert closes == [window]  # nor did open_exports'

    trio.run(main)
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connection ")]
    expected = "export removed during negotiation" if window.startswith("while") else "end=closed"
    assert len(ends) == 1 and expected in ends[0], ends
