"""A bounded soak: several libnbd connections pipeline reads, writes, zeroes and
trims of mixed sizes, 1 byte to 32 MiB, aligned and not, each connection in its own
region of one volume, every read checked against a model of the disk.  Any dropped
connection, failed request or wrong byte fails it.  Request sizes that vary from one
request to the next are what made the buffer pool's bookkeeping disagree with itself
(issue 18): this is the client behaviour that found it, made deliberate."""

from __future__ import annotations

from test_libnbd_clients import libnbd

MiB = 1 << 20
CONNECTIONS = 3
REGION = 40 * MiB  # each connection's: room for a 32 MiB request and others beside it
SOAK_SECONDS = 20

SOAK = r'''
import threading, time

uri, connections, region, seconds, seed = sys.argv[1], *map(int, sys.argv[2:6])
# Small sizes recur, as a guest's do, between large ones of many sizes: each new
# large one needs room that kept buffers of other sizes hold.
SIZES = [4096] * 6 + [65536] * 3 + [1, 511, 131072] + [n << 20 for n in (1, 2, 4, 6, 8, 12, 16, 32)]
KINDS = ["read", "read", "write", "write", "zero", "trim"]
WINDOW = 16  # requests each connection keeps in flight

counts = {"read": 0, "write": 0, "zero": 0, "trim": 0, "bytes": 0}
failures = []

def soak(index):
    # One connection: a window of requests on spans no other request in flight
    # overlaps, so the model says what each read must find when it completes.
    rng = random.Random(seed * 1000 + index)
    h = connect(uri, strict=False)  # unaligned requests too
    base, model = index * region, bytearray(region)
    in_flight = []  # (cookie, kind, offset, length, buffer)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or in_flight:
        while time.monotonic() < deadline and len(in_flight) < WINDOW:
            length = min(rng.choice(SIZES), region)
            offset = rng.randrange(0, region - length + 1)
            if rng.random() < 0.7:
                offset -= offset % 512
            if any(offset < o + n and o < offset + length for _, _, o, n, _ in in_flight):
                break  # wait for room rather than spin
            kind = rng.choice(KINDS)
            counts[kind] += 1
            counts["bytes"] += length
            buffer = None
            if kind == "read":
                buffer = nbd.Buffer(length)
                cookie = h.aio_pread(buffer, base + offset)
            elif kind == "write":
                data = rng.randbytes(length)
                model[offset:offset + length] = data
                cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), base + offset)
            elif kind == "zero":
                model[offset:offset + length] = bytes(length)
                cookie = h.aio_zero(length, base + offset)
            else:
                # TRIM releases the whole sectors inside its range, which pfnbd
                # promises read back as zeros; the model follows that promise.
                start, end = -(-offset // 512) * 512, (offset + length) // 512 * 512
                if start < end:
                    model[start:end] = bytes(end - start)
                cookie = h.aio_trim(length, base + offset)
            in_flight.append((cookie, kind, offset, length, buffer))
        h.poll(-1)
        still = []
        for request in in_flight:
            cookie, kind, offset, length, buffer = request
            if not h.aio_command_completed(cookie):  # raises if the request failed
                still.append(request)
            elif kind == "read" and bytes(buffer.to_bytearray()) != model[offset:offset + length]:
                raise AssertionError(f"connection {index}: read at {offset}+{length} differs")
        in_flight = still
    for start in range(0, region, 32 << 20):
        length = min(32 << 20, region - start)
        if h.pread(length, base + start) != model[start:start + length]:
            raise AssertionError(f"connection {index}: final read at {start} differs")
    h.shutdown()

def run(index):
    try:
        soak(index)
    except BaseException as error:
        failures.append(f"{type(error).__name__}: {error}")

threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
assert not failures, failures
print(json.dumps(counts))
'''


def test_mixed_sizes_on_several_connections_match_a_model_of_the_disk(start_server):
    # Completions 2 ms late, as over a network: requests pile up in flight, so their
    # buffers are taken and returned in every order.
    server = start_server({"test_v1": f"{CONNECTIONS * REGION // MiB}M"}, "--inject-delay", "0.002")
    counts = libnbd(SOAK, server.uri(), str(CONNECTIONS), str(REGION), str(SOAK_SECONDS), "18",
                    timeout=SOAK_SECONDS + 240)
    assert min(counts[kind] for kind in ("read", "write", "zero", "trim")) > 0, counts
    assert "Traceback" not in server.log() and "failed" not in server.log(), server.log()
