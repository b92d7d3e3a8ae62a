"""Copies the extents a dirty bitmap marks from an NBD export into a qcow2 overlay.

    python3 copy-dirty.py SOURCE-URI qemu:dirty-bitmap:SNAP OVERLAY.qcow2

The source is read through libnbd with the bitmap as its meta context; the overlay
is served by qemu-nbd, which libnbd starts (socket activation).  Only dirty extents
are read; where they read as zeros, zeros are written, so the backing file's older
data is masked.
"""

import sys

import nbd

MAX_REQUEST = 32 << 20  # pfnbd's maximum block size


def dirty_extents(source, bitmap, size):
    """(offset, length) of every dirty extent, asking again where a reply stops short."""
    found, offset = [], 0
    while offset < size:
        extents = []

        def on_extents(context, start, entries, error):
            if context == bitmap:
                extents.extend(zip(entries[0::2], entries[1::2]))
            return 0

        source.block_status(min(size - offset, 1 << 30), offset, on_extents)
        for length, flags in extents:
            length = min(length, size - offset)
            if flags & 1:
                found.append((offset, length))
            offset += length
            if offset >= size:
                break
    return found


def main(uri, bitmap, overlay):
    source = nbd.NBD()
    source.add_meta_context(bitmap)
    source.connect_uri(uri)
    if not source.can_meta_context(bitmap):
        sys.exit(f"copy-dirty: {uri} does not offer {bitmap}")
    target = nbd.NBD()
    target.connect_systemd_socket_activation(["qemu-nbd", "-f", "qcow2", overlay])
    copied = 0
    for offset, length in dirty_extents(source, bitmap, source.get_size()):
        for start in range(offset, offset + length, MAX_REQUEST):
            count = min(MAX_REQUEST, offset + length - start)
            data = source.pread(count, start)
            if data.count(0) == count:
                target.zero(count, start)
            else:
                target.pwrite(data, start)
            copied += count
    target.flush()
    target.shutdown()
    source.shutdown()
    print(f"copied {copied} bytes of dirty extents into {overlay}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: copy-dirty.py SOURCE-URI qemu:dirty-bitmap:SNAP OVERLAY.qcow2")
    main(*sys.argv[1:])
