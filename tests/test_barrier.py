"""The snapshot barrier under heavy concurrent writes.

test_snapshots writes one request at a time, so the server goes idle (and drops
the barrier) between writes and every write looks for new snapshots: a head
write that skips the barrier goes unseen there.  Here a client keeps writes in
flight so the server holds the barrier across batches, and snapshots are taken
and deleted in this process (what `volume snapshot` runs).

Two checks: each snapshot taken amid the writes is a consistent cut (every block
wholly one write, none begun after the snapshot returned, none older than one
acknowledged before it started); and deleting the newest snapshot while the
writes go on leaves the next older one byte for byte as it was.  The second is
the one that catches writes skipping the barrier: without it they go on
preserving into the snapshot being folded away, and the older one then reads the
head's new bytes.  (The first cannot: without the barrier a snapshot is the head
as of the writer's next look, a few ms late, and those writes were all in flight.)
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Iterator

from fuzz.nbdwire import Cmd, NbdClient
from pfnbd.store import Store

MiB = 1 << 20
BLOCK = 64 << 10  # one copy-before-write chunk
BLOCKS = 64
DEPTH = 16  # writes in flight
SNAPSHOTS = 8
ROUNDS = 10


def tagged(seq: int) -> bytes:
    return struct.pack(">Q", seq) * (BLOCK // 8)


class Writer(threading.Thread):
    """Writes block seq % BLOCKS with `tagged(seq)`, DEPTH at a time, until stopped."""

    def __init__(self, server) -> None:
        super().__init__(daemon=True)
        self.client = NbdClient.unix(server.socket, timeout=60)
        self.client.handshake()
        self.client.go("test_v1")
        self.sent: dict[int, float] = {}
        self.last_sent = 0.0  # read by the test thread while this one runs
        self.acked: dict[int, float] = {}
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def wait_for_acks(self, count: int) -> None:
        deadline = time.monotonic() + 60
        while len(self.acked) < count and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.acked) >= count, ("the writer is not writing", self.failure)

    def run(self) -> None:
        try:
            seq = 0
            while not self.stop.is_set():
                while self.client.pending < DEPTH:
                    seq += 1
                    self.sent[seq] = self.last_sent = time.monotonic()
                    self.client.send_request(Cmd.WRITE, (seq % BLOCKS) * BLOCK, BLOCK,
                                             payload=tagged(seq), cookie=seq)
                reply = self.client.receive_reply()
                self.acked[reply.cookie] = time.monotonic()
                assert reply.error == 0, reply
            for cookie, reply in self.client.collect().items():
                self.acked[cookie] = time.monotonic()
            self.client.disconnect()
        except BaseException as error:  # reported by the test thread
            self.failure = error


def check_cut(seen: list[int], writer: Writer, started: float, returned: float) -> None:
    for block, seq in enumerate(seen):
        if seq:
            assert seq % BLOCKS == block, f"block {block} holds write {seq}, meant for another"
            assert writer.sent[seq] < returned, (
                f"block {block} holds write {seq}, sent {writer.sent[seq] - returned:.6f} s "
                "after the snapshot returned")
        done_before = [s for s in writer.acked if s % BLOCKS == block and writer.acked[s] < started]
        assert seq >= max(done_before, default=0), (
            f"block {block} holds write {seq}, older than write {max(done_before)} "
            "acknowledged before the snapshot started")


@contextlib.contextmanager
def pipelined_writes(start_server, cli) -> Iterator[tuple[Store, Writer]]:
    """The volume's store, and a Writer busy on it (stopped, and checked, at the end)."""
    server = start_server({"test_v1": str(BLOCKS * BLOCK)})
    writer = Writer(server)
    writer.start()
    try:
        writer.wait_for_acks(4 * DEPTH)
        yield Store(cli.data_dir), writer
    finally:
        writer.stop.set()
        writer.join(timeout=60)
    assert writer.failure is None, writer.failure


def test_snapshots_amid_pipelined_writes_are_consistent_cuts(start_server, cli):
    moments = []
    with pipelined_writes(start_server, cli) as (store, writer):
        for n in range(SNAPSHOTS):
            started = time.monotonic()
            store.create_snapshot("test_v1", f"s{n}")
            moments.append((started, time.monotonic()))
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        while writer.last_sent < moments[-1][1] and writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
    first_started = moments[0][0]
    assert any(t < first_started for t in writer.acked.values())
    assert writer.last_sent > moments[-1][1], "the writer stopped before the last snapshot returned"

    names = [f"test_v1@s{n}" for n in range(SNAPSHOTS)]
    reader_server = start_server({}, exports=names)
    for name, (started, returned) in zip(names, moments):
        with NbdClient.unix(reader_server.socket) as reader:
            reader.handshake()
            reader.go(name)
            seen = []
            for block in range(BLOCKS):
                data = reader.read(block * BLOCK, BLOCK)
                assert data == data[:8] * (BLOCK // 8), f"{name}: block {block} is torn"
                seen.append(struct.unpack(">Q", data[:8])[0])
        check_cut(seen, writer, started, returned)


def snapshot_bytes(store: Store, export: str) -> bytes:
    image = store.open_image(export)
    try:
        return image.read(0, BLOCKS * BLOCK)
    finally:
        image.close()


def test_deleting_the_newest_snapshot_amid_pipelined_writes_leaves_the_older_one_alone(
        start_server, cli):
    """Deleting the newest snapshot folds what it preserved into the next older one;
    a head write that skipped the barrier would still preserve into the one being
    deleted, and the older snapshot would then read the head's new bytes."""
    changed = []
    with pipelined_writes(start_server, cli) as (store, writer):
        for n in range(ROUNDS):
            store.create_snapshot("test_v1", f"kept{n}")
            before = snapshot_bytes(store, f"test_v1@kept{n}")
            store.create_snapshot("test_v1", f"gone{n}")
            time.sleep(0.02)  # the newest preserves what these writes overwrite
            store.delete_snapshot("test_v1", f"gone{n}")
            time.sleep(0.02)
            after = snapshot_bytes(store, f"test_v1@kept{n}")
            changed += [(n, b) for b in range(BLOCKS) if before[b * BLOCK : (b + 1) * BLOCK]
                        != after[b * BLOCK : (b + 1) * BLOCK]]
    assert not changed, f"(round, block) of older snapshots changed by a delete: {changed[:8]}"
