"""A live in-process server under random interleavings of valid and invalid requests on
several connections, every READ checked against a model of the disks (bytearrays).

Connections differ in how they were negotiated (simple or structured replies, with or
without base:allocation, GO or EXPORT_NAME) and in export.  Beside the well-behaved
requests, rules send unknown commands, flags a command does not take, ranges out of
bounds or overflowing 64 bits, zero lengths and pipelines mixing all of these; and
rules end connections badly: wrong magic, vanishing mid-header or mid-payload, DISC
with requests in flight.  After an error the connection must go on; after a drop the
other connections must go on; the model must match every read.
"""

from __future__ import annotations

import socket
from collections import Counter

import attrs
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from .inprocess import InProcessServer
from .nbdwire import (
    BASE_ALLOCATION,
    REQUEST_MAGIC,
    STATE_ZERO,
    Cmd,
    CmdFlag,
    Err,
    NbdClient,
    TFlag,
    pattern,
    request_header,
)
from .reporting import report

SECTOR = 512
VOLUMES = {"alpha": 1 << 20, "beta": 192 << 10}

WRITES = (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM)
RANGED = [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS]
# Flags each command takes once negotiated ("Command flags"): FUA on every command
# (SEND_FUA is advertised), DF only with structured replies.
VALID_FLAGS = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}

# 128 KiB is one PureFlash I/O: the bridge splits longer requests.
EDGE_LENGTHS = [0, 1, SECTOR - 1, SECTOR, 4096, 65536, 128 << 10, (128 << 10) + SECTOR]


def lengths(at_least: int, size: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([n for n in EDGE_LENGTHS if at_least <= n <= size]),
                     st.integers(at_least, 3 * SECTOR), st.integers(at_least, size))


fill_seeds = st.integers(0, 1 << 16)  # write data: pattern(seed) or one repeated byte
# Cookies of the full 64 bits: a server keeping only the low half mixes these up.
cookies = st.one_of(st.sampled_from([0, 1 << 32, 0xFFFFFFFF00000001, (1 << 64) - 1]),
                    st.integers(0, (1 << 64) - 1))


@attrs.define(eq=False)
class Connection:
    client: NbdClient
    export: str

    @property
    def structured(self) -> bool:
        return self.client.export.structured

    @property
    def context(self) -> int | None:
        contexts = self.client.export.contexts
        return next(iter(contexts)) if contexts else None


def fill(seed: int, length: int) -> bytes:
    return bytes([seed & 0xFF]) * length if seed < 256 else pattern(seed, length)


class DiskMachine(RuleBasedStateMachine):
    connections = Bundle("connections")

    def __init__(self, server: InProcessServer, counts: Counter) -> None:
        super().__init__()
        self.server = server
        self.counts = counts
        counts["sessions"] += 1
        self.disks = {name: bytearray(size) for name, size in VOLUMES.items()}
        self.open: list[Connection] = []

    # -- set-up and tear-down ---------------------------------------------

    @initialize()
    def zero_the_disks(self):
        """Every example starts from zeroed disks, whatever the last one left."""
        for name, size in VOLUMES.items():
            with self.server.connect() as client:
                client.handshake()
                client.go(name)
                assert client.request(Cmd.WRITE_ZEROES, 0, size).error == 0

    def teardown(self):
        for connection in self.open:
            connection.client.close()
        self.server.check()

    @invariant()
    def server_is_alive(self):  # checked after every step
        self.counts["steps"] += 1
        self.server.check()

    # -- connections ---------------------------------------------------------

    @rule(target=connections, export=st.sampled_from(sorted(VOLUMES)), structured=st.booleans(),
          contexts=st.booleans(), export_name=st.booleans())
    def connect(self, export, structured, contexts, export_name):
        client = self.server.connect()
        client.handshake()
        if export_name and not structured:
            client.export_name(export)
        else:
            client.go(export, structured, [BASE_ALLOCATION] if structured and contexts else ())
        assert client.export.size == VOLUMES[export]
        assert client.export.flags & TFlag.CAN_MULTI_CONN
        connection = Connection(client, export)
        self.open.append(connection)
        return connection

    # -- requests the spec allows ---------------------------------------------

    def _range(self, data, connection: Connection, at_least: int = 0) -> tuple[int, int]:
        size = VOLUMES[connection.export]
        length = data.draw(lengths(at_least, size), label="length")
        room = size - length
        offset = data.draw(st.one_of(
            st.integers(0, room // SECTOR).map(lambda n: n * SECTOR),  # aligned
            st.integers(0, room),  # anywhere
            st.integers(0, min(room, 3 * SECTOR)),  # in the first sectors, where requests collide
        ), label="offset")
        return offset, length

    @staticmethod
    def _valid_flags(connection: Connection, command: Cmd) -> int:
        return VALID_FLAGS[command] & ~(0 if connection.structured else CmdFlag.DF)

    def _flags(self, data, connection: Connection, command: Cmd) -> int:
        valid = self._valid_flags(connection, command)
        choices = {0, int(valid)} | {int(flag) for flag in CmdFlag if flag & valid}
        return data.draw(st.sampled_from(sorted(choices)), label="flags")

    def _check_reply(self, connection: Connection, command: Cmd, offset: int, length: int, flags: int, reply,
                     payload: bytes | None = None) -> None:
        """Checks a reply against the model, then applies the request to it."""
        disk = self.disks[connection.export]
        if command == Cmd.READ:
            assert reply.error == 0, f"READ {offset}+{length}: {reply.error} {reply.message}"
            assert reply.data == bytes(disk[offset : offset + length]), f"READ {offset}+{length}: wrong data"
        elif command == Cmd.WRITE_ZEROES and flags & CmdFlag.FAST_ZERO and reply.error == Err.ENOTSUP:
            pass  # "MUST fail quickly with NBD_ENOTSUP" unless faster; "SHOULD NOT alter the contents"
        elif command == Cmd.BLOCK_STATUS:
            assert reply.error == 0, f"BLOCK_STATUS {offset}+{length}: {reply.error} {reply.message}"
            self._check_extents(connection, offset, length, reply)
        else:
            assert reply.error == 0, f"{command.name} {offset}+{length}: {reply.error} {reply.message}"
            if command == Cmd.WRITE:
                disk[offset : offset + length] = payload
            elif command == Cmd.WRITE_ZEROES:
                disk[offset : offset + length] = bytes(length)
            elif command == Cmd.TRIM:
                # The spec leaves trimmed data unspecified; pfnbd releases the whole
                # sectors inside the range and they read back as zeros (VolumeBridge.trim).
                start, end = -(-offset // SECTOR) * SECTOR, (offset + length) // SECTOR * SECTOR
                if start < end:
                    disk[start:end] = bytes(end - start)

    def _check_extents(self, connection: Connection, offset: int, length: int, reply) -> None:
        (context,) = reply.extents
        assert context == connection.context, "BLOCK_STATUS chunk for a context never selected"
        extents = reply.extents[context]
        disk = self.disks[connection.export]
        at = offset
        for extent_length, state in extents:
            end = min(at + extent_length, offset + length)
            if state & STATE_ZERO:  # the extent reads as zeros: the model must agree
                assert not any(disk[at:end]), f"extent {at}+{extent_length} claims zeros over data"
            at += extent_length
        assert offset < at, "BLOCK_STATUS made no progress"

    @rule(connection=connections, data=st.data())
    def read(self, connection, data):
        offset, length = self._range(data, connection)
        flags = self._flags(data, connection, Cmd.READ)
        self._check_reply(connection, Cmd.READ, offset, length, flags,
                          connection.client.request(Cmd.READ, offset, length, flags))

    @rule(connection=connections, data=st.data(), seed=fill_seeds)
    def write(self, connection, data, seed):
        offset, length = self._range(data, connection)
        flags = self._flags(data, connection, Cmd.WRITE)
        payload = fill(seed, length)
        reply = connection.client.request(Cmd.WRITE, offset, length, flags, payload)
        self._check_reply(connection, Cmd.WRITE, offset, length, flags, reply, payload)

    @rule(connection=connections, data=st.data(),
          command=st.sampled_from([Cmd.WRITE_ZEROES, Cmd.TRIM, Cmd.CACHE, Cmd.FLUSH]))
    def no_payload(self, connection, data, command):
        offset, length = (0, 0) if command == Cmd.FLUSH else self._range(data, connection)
        flags = self._flags(data, connection, command)
        reply = connection.client.request(command, offset, length, flags)
        self._check_reply(connection, command, offset, length, flags, reply)

    @rule(connection=connections, data=st.data())
    def block_status(self, connection, data):
        if connection.context is None:
            return
        offset, length = self._range(data, connection, at_least=1)
        flags = self._flags(data, connection, Cmd.BLOCK_STATUS)
        reply = connection.client.request(Cmd.BLOCK_STATUS, offset, length, flags)
        self._check_reply(connection, Cmd.BLOCK_STATUS, offset, length, flags, reply)

    @rule(first=connections, second=connections, data=st.data(), size=st.integers(2, 12))
    def pipeline(self, first, second, data, size):
        """Several requests in flight at once, on one connection or spread over two
        (maybe of one export), on ranges that do not overlap a write: so the model
        does not depend on the order the server runs them in."""
        batch, taken = [], {}  # taken: export -> [(start, end, writes)]
        for _ in range(size):
            connection = data.draw(st.sampled_from([first, second]), label="connection")
            command = data.draw(st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM, Cmd.CACHE,
                                                 Cmd.FLUSH]), label="command")
            offset, length = (0, 0) if command == Cmd.FLUSH else self._range(data, connection)
            writes = command in WRITES
            spans = taken.setdefault(connection.export, [])
            if any(offset < end and start < offset + length and (writes or wrote)
                   for start, end, wrote in spans):
                continue
            spans.append((offset, offset + length, writes))
            flags = self._flags(data, connection, command)
            payload = fill(data.draw(fill_seeds, label="seed"), length) if command == Cmd.WRITE else None
            used = {c for other, c, *_ in batch if other is connection}
            cookie = connection.client.send_request(command, offset, length, flags, payload, cookie=data.draw(
                cookies.filter(lambda c: c not in used), label="cookie"))
            batch.append((connection, cookie, command, offset, length, flags, payload))
        replies = {connection: connection.client.collect() for connection in {first, second}}
        for connection, cookie, command, offset, length, flags, payload in batch:
            reply = replies[connection][cookie]
            self._check_reply(connection, command, offset, length, flags, reply, payload)

    # -- requests the spec refuses: an error, and the connection goes on -------

    @rule(connection=connections, command=st.integers(8, 0xFFFF))
    def unknown_command(self, connection, command):
        reply = connection.client.request(command, 0, SECTOR)
        assert reply.error == Err.EINVAL, reply

    @rule(connection=connections, data=st.data(), seed=fill_seeds)
    def bad_flags(self, connection, data, seed):
        """A flag the command does not take: NBD_EINVAL, and nothing changes."""
        command = data.draw(st.sampled_from(sorted(VALID_FLAGS)), label="command")
        valid = self._valid_flags(connection, command)
        refused = 0xFFFF & ~valid  # undefined bits 6-15 and PAYLOAD_LEN (no extended headers) too
        bad = data.draw(st.integers(1, 0xFFFF).map(lambda f: f & refused).filter(bool), label="bad flags")
        flags = bad | data.draw(st.sampled_from([0, int(valid)]), label="with valid flags")
        offset, length = (0, 0) if command == Cmd.FLUSH else self._range(data, connection)
        payload = fill(seed, length) if command == Cmd.WRITE else None
        reply = connection.client.request(command, offset, length, flags, payload)
        assert reply.error == Err.EINVAL, (command, flags, reply)

    @rule(connection=connections, data=st.data(),
          command=st.sampled_from(RANGED))
    def out_of_bounds(self, connection, data, command):
        size = VOLUMES[connection.export]
        offset, length = data.draw(st.one_of(
            # straddling the end
            st.integers(0, size).flatmap(
                lambda at: st.tuples(st.just(at), st.integers(size - at + 1, size - at + (1 << 17)))),
            # starting past it
            st.tuples(st.integers(size + 1, (1 << 64) - 1), st.integers(0, 1 << 16)),
            # offset + length wrapping around 2**64
            st.integers(1, 1 << 17).flatmap(
                lambda n: st.tuples(st.integers((1 << 64) - n, (1 << 64) - 1), st.just(n))),
        ), label="range")
        if command == Cmd.BLOCK_STATUS and connection.context is None:
            return  # refused for want of a context whatever the range: see no_context
        payload = bytes(length) if command == Cmd.WRITE else None
        reply = connection.client.request(command, offset, length, 0, payload)
        expected = Err.ENOSPC if command in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Err.EINVAL
        assert reply.error == expected, (command, offset, length, reply)

    @rule(connection=connections)
    def no_context(self, connection):
        if connection.context is not None:
            return
        assert connection.client.request(Cmd.BLOCK_STATUS, 0, SECTOR).error == Err.EINVAL

    @rule(connection=connections, command=st.sampled_from(RANGED), at_end=st.booleans())
    def zero_length(self, connection, command, at_end):
        """Unspecified, but "the server SHOULD NOT disconnect" and must change nothing."""
        offset = VOLUMES[connection.export] if at_end else 0
        reply = connection.client.request(command, offset, 0)
        if reply.error == 0 and command == Cmd.READ:
            assert reply.data == b""

    # -- connections that end badly ----------------------------------------------

    @rule(connection=consumes(connections),
          magic=st.integers(0, 0xFFFFFFFF).filter(lambda m: m != REQUEST_MAGIC))
    def bad_magic(self, connection, magic):
        connection.client.send(request_header(Cmd.READ, 0, SECTOR, cookie=1, magic=magic))
        connection.client.expect_disconnect()
        connection.client.close()

    @rule(connection=consumes(connections), data=st.data(), seed=fill_seeds)
    def vanish_mid_request(self, connection, data, seed):
        """The client goes away inside a header or a WRITE payload: nothing is written."""
        offset, length = self._range(data, connection, at_least=1)
        message = request_header(Cmd.WRITE, offset, length, cookie=1) + fill(seed, length)
        cut = data.draw(st.integers(1, len(message) - 1), label="cut")
        connection.client.send(message[:cut])
        connection.client.sock.shutdown(socket.SHUT_WR)
        connection.client.expect_disconnect()
        connection.client.close()

    @rule(connection=consumes(connections), count=st.integers(1, 8))
    def vanish_with_replies_pending(self, connection, count):
        for _ in range(count):
            connection.client.send_request(Cmd.READ, 0, min(VOLUMES[connection.export], 64 << 10))
        connection.client.close()

    @rule(connection=consumes(connections), data=st.data(), seed=fill_seeds)
    def disc_with_writes_in_flight(self, connection, data, seed):
        """DISC: "The server MUST handle all outstanding requests", then close."""
        offset, length = self._range(data, connection)
        payload = fill(seed, length)
        cookie = connection.client.send_request(Cmd.WRITE, offset, length, 0, payload)
        connection.client.send_request(Cmd.DISC)
        reply = connection.client.collect()[cookie]
        self._check_reply(connection, Cmd.WRITE, offset, length, 0, reply, payload)
        assert connection.client.expect_disconnect() == b""
        connection.client.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with InProcessServer(tmp_path_factory.mktemp("stateful"), VOLUMES) as running:
        yield running


def test_random_sessions_keep_every_disk_consistent(server, pytestconfig):
    counts = Counter()
    run_state_machine_as_test(lambda: DiskMachine(server, counts))  # settings: the fuzz profile
    report(pytestconfig, f"stateful: {counts['sessions']} sessions, {counts['steps']} steps")
