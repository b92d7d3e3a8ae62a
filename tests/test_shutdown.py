"""SIGTERM under load: what is in flight finishes, what comes after gets ESHUTDOWN."""

import signal

from conftest import run_libnbd

CLIENT = r"""
import errno, os, signal, sys, time
import nbd

uri, pid = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)

def submit(first, count, fill):
    return [(i, h.aio_pwrite(bytes([fill]) * 4096, i * 4096)) for i in range(first, first + count)]

def outcome(cookie):
    try:
        h.aio_command_completed(cookie)
        return "ok"
    except nbd.Error as error:
        return errno.errorcode.get(error.errno, str(error.errno))

in_flight = submit(0, 16, 0xA1)
time.sleep(0.5)  # with --inject-delay 2 these are all still being written
os.kill(pid, signal.SIGTERM)
time.sleep(0.5)
after = submit(16, 16, 0xB2)
while h.aio_in_flight() > 0:
    try:
        h.poll(-1)
    except nbd.Error:
        break  # the server ended the connection once nothing was in flight
print("before", sorted({outcome(c) for _, c in in_flight}))
print("after", sorted({outcome(c) for _, c in after}))
"""

VERIFY = r"""
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print(all(h.pread(4096, i * 4096) == bytes([0xA1]) * 4096 for i in range(16)),
      h.pread(4096, 16 * 4096) == bytes(4096))
"""


def test_sigterm_finishes_in_flight_writes_and_refuses_new_ones(start_server, cli):
    # Each completion takes 2 s: the first batch is still in flight at SIGTERM.
    server = start_server({"test_v1": "64M"}, "--inject-delay", "2")
    out = run_libnbd(CLIENT, server.uri(), str(server.process.pid), timeout=60)
    assert "before ['ok']" in out, out + server.log()
    assert "after ['ESHUTDOWN']" in out, out + server.log()
    assert server.stop(signal.SIGTERM) == 0, server.log()

    restarted = start_server({"test_v1": "64M"})
    assert run_libnbd(VERIFY, restarted.uri()).split() == ["True", "True"]
