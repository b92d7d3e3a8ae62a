#!/usr/bin/env bash
# A full and an incremental backup of a pfnbd volume with stock tools, and a restore.
#
#   examples/backup/backup.sh SOCKET VOLUME S1 S2 DIR
#
# pfnbd must serve VOLUME@S1 and VOLUME@S2 on the Unix socket SOCKET.  Writes, in DIR:
#   full.qcow2         everything VOLUME@S1 holds (nbdcopy into qemu-nbd);
#   incremental.qcow2  an overlay backed by full.qcow2 with only what changed from S1
#                      to S2, read through the `qemu:dirty-bitmap:S1` meta context;
#   restored.raw       the chain flattened by qemu-img convert: VOLUME@S2, byte for byte.
set -euo pipefail
if [ $# -ne 5 ]; then
    echo "usage: $0 SOCKET VOLUME S1 S2 DIR" >&2
    exit 2
fi
socket=$1 volume=$2 s1=$3 s2=$4 dir=$5
older="nbd+unix:///$volume@$s1?socket=$socket"
newer="nbd+unix:///$volume@$s2?socket=$socket"
size=$(nbdinfo --size "$older")

# Full: the whole of S1; nbdcopy skips what S1 reports as holes.
qemu-img create -q -f qcow2 "$dir/full.qcow2" "$size"
nbdcopy "$older" -- [ qemu-nbd -f qcow2 "$dir/full.qcow2" ]

# Incremental: an overlay on the full backup that receives the dirty extents only.
qemu-img create -q -f qcow2 -b full.qcow2 -F qcow2 "$dir/incremental.qcow2"
/usr/bin/python3 "$(dirname "$0")/copy-dirty.py" "$newer" "qemu:dirty-bitmap:$s1" "$dir/incremental.qcow2"

# Restore: flatten the chain, then check it against the volume at S2.
qemu-img convert -q -f qcow2 -O raw "$dir/incremental.qcow2" "$dir/restored.raw"
qemu-img compare -q -f raw -F raw "$dir/restored.raw" "$newer"
echo "restored $volume@$s2 from $dir/full.qcow2 + $dir/incremental.qcow2: identical"
