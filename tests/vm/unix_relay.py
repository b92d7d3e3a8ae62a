"""Joins the stream socket on stdin to a new connection to a Unix socket.

QEMU's user-mode network runs `guestfwd=tcp:ADDR:PORT-cmd:COMMAND` once for each
connection the guest opens to ADDR:PORT, with that connection as stdin, stdout and
stderr, so each guest connection gets a host connection of its own:

    python3 unix_relay.py SOCKET_PATH LOG

When both directions have closed it appends to LOG the line
"connection STARTED_NS BYTES_FROM_GUEST BYTES_TO_GUEST"; errors go to LOG as well.
"""

import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def pump(source: socket.socket, sink: socket.socket) -> int:
    """Copies until `source` ends, then ends `sink`'s sending side; returns the bytes."""
    copied = 0
    while data := source.recv(1 << 20):
        sink.sendall(data)
        copied += len(data)
    sink.shutdown(socket.SHUT_WR)
    return copied


def main() -> None:
    started = time.time_ns()
    socket_path, log_path = sys.argv[1:]
    # stderr is the guest's connection too: errors go to the log instead
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    guest = socket.socket(fileno=0)
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(socket_path)
    with ThreadPoolExecutor(1) as pool:
        backward = pool.submit(pump, host, guest)
        from_guest = pump(guest, host)
        to_guest = backward.result()
    os.write(log, f"connection {started} {from_guest} {to_guest}\n".encode())


if __name__ == "__main__":
    main()
