"""SIGTERM under load, as clients that reconnect need it.

doc/proto.md, "Terminating the transmission phase": a server that shuts down SHOULD
wait for the requests in flight to be serviced before it disconnects, and MAY speed this
up by answering them with errors (ESHUTDOWN).  QEMU's NBD client (reconnect-delay) and
nbd-client -persist resend, once reconnected, every request they had no reply to, but an
error reply goes to the guest as an I/O error.  So at SIGTERM pfnbd reads no new request,
answers those it has read, and disconnects; the MAY is used only for what is still
unfinished when --shutdown-timeout runs out (a stuck volume, a client stalled in the middle
of a payload), never as the first answer.
"""

import signal
import time

import pytest

from conftest import run_libnbd, wait_for
from fuzz.nbdwire import Cmd, ConnectionClosed, Err, NbdClient, Pending, pattern, request_header

KiB = 1 << 10

# Writes 16 blocks, has the server SIGTERMed while they are in flight, then writes 16
# more; prints how each batch ended and how long after SIGTERM the first one did.
CLIENT = r"""
import errno, os, signal, sys, time
import nbd

uri, pid, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)

def submit(first, count, fill):
    return [h.aio_pwrite(bytes([fill]) * 4096, i * 4096) for i in range(first, first + count)]

def outcome(cookie):
    try:
        h.aio_command_completed(cookie)
        return "ok"
    except nbd.Error as error:
        return errno.errorcode.get(error.errno, str(error.errno))

in_flight = submit(0, 16, 0xA1)
time.sleep(0.5)  # with --inject-delay these are all still being written
os.kill(pid, signal.SIGTERM)
signalled = time.monotonic()
time.sleep(wait)
after = submit(16, 16, 0xB2)
while h.aio_in_flight() > 0:
    try:
        h.poll(-1)
    except nbd.Error:
        break  # the server hung up
print("before", sorted({outcome(c) for c in in_flight}))
print("after", sorted({outcome(c) for c in after}))
print("seconds", round(time.monotonic() - signalled, 1))
"""

# Reads blocks 0-15 and 16-31: True when they hold the first batch, True when the
# second never landed.
VERIFY = r"""
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print(all(h.pread(4096, i * 4096) == bytes([0xA1]) * 4096 for i in range(16)),
      h.pread(16 * 4096, 16 * 4096) == bytes(16 * 4096))
"""


def client_outcome(server, wait: float) -> dict[str, str]:
    out = run_libnbd(CLIENT, server.uri(), str(server.process.pid), str(wait), timeout=60)
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.splitlines()}


def test_sigterm_answers_what_is_in_flight_and_reads_nothing_new(start_server):
    # Each completion takes 2 s: the first batch is still in flight at SIGTERM.
    server = start_server({"test_v1": "64M"}, "--inject-delay", "2")
    outcome = client_outcome(server, wait=0.5)

    assert outcome["before"] == "['ok']", outcome
    # Never read: the server hung up without a reply, so a reconnecting client resends
    # them. An ESHUTDOWN here would be an I/O error in a QEMU guest.
    assert outcome["after"] == "['ENOTCONN']", outcome
    assert server.stop(signal.SIGTERM) == 0, server.log()

    restarted = start_server({"test_v1": "64M"})
    assert run_libnbd(VERIFY, restarted.uri()).split() == ["True", "True"]


def test_only_what_outlives_the_shutdown_timeout_gets_eshutdown(start_server):
    # Completions take 4 s, the shutdown timeout is 1 s: the spec's MAY, bounded.
    server = start_server({"test_v1": "64M"}, "--inject-delay", "4", "--shutdown-timeout", "1")
    outcome = client_outcome(server, wait=0)

    assert outcome["before"] == "['ESHUTDOWN']", outcome
    assert 0.8 <= float(outcome["seconds"]) < 3.5, outcome
    assert server.stop(signal.SIGTERM) == 0, server.log()


@pytest.mark.parametrize("rest_sent", [True, False], ids=["rest-sent", "client-stalls"])
def test_a_write_half_received_at_sigterm(start_server, rest_sent):
    """Its header was read, so it is received whole and served, as any request read;
    a client that stalls in its payload gets ESHUTDOWN when the timeout runs out."""
    server = start_server({"test_v1": "64M"}, "--shutdown-timeout", "2")
    data = pattern(16, 64 * KiB)
    with NbdClient.unix(server.socket) as client:
        client.handshake()
        client.go("test_v1")
        client.track(7, Pending(Cmd.WRITE, 0, 0, len(data)))
        client.send(request_header(Cmd.WRITE, 0, len(data), cookie=7) + data[:1000])
        time.sleep(0.2)  # the header is read
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM" in server.log(), "the server's SIGTERM line")
        if rest_sent:
            client.send(data[1000:])
        reply = client.receive_reply()
        with pytest.raises(ConnectionClosed):
            client.receive_reply()
    assert server.process.wait(timeout=30) == 0, server.log()

    if rest_sent:
        assert reply.error == 0, Err(reply.error)
        with NbdClient.unix(start_server({"test_v1": "64M"}).socket) as check:
            check.handshake()
            check.go("test_v1")
            assert check.read(0, len(data)) == data
    else:
        assert reply.error == Err.ESHUTDOWN, Err(reply.error)
