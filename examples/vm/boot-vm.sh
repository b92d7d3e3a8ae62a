#!/bin/bash
# Boot a QEMU virtual machine whose disks are pfnbd volumes.
#
#   boot-vm.sh [--disk URI ...] [--kernel FILE [--initrd FILE] [--append ARGS]]
#              [--memory SIZE] [--cpus N] [--accel kvm|tcg] [--console FILE] [-- QEMU_ARGS...]
#
# At least one --disk or a --kernel. URI names a volume the way QEMU does:
# nbd+unix:///VOLUME?socket=/path/to/pfnbd.sock for `pfnbd serve --socket`, and
# nbd://HOST:PORT/VOLUME for `pfnbd serve --bind HOST --port PORT`. Each --disk is a
# virtio disk (/dev/vda, /dev/vdb, ... in a Linux guest) opened with cache=none: the
# guest's flushes reach pfnbd as NBD_CMD_FLUSH. Without --kernel the machine boots from
# the first disk, so that volume must hold a bootable image, e.g. one written with
# `qemu-img convert -n -O raw IMAGE.qcow2 'nbd+unix:///VOLUME?socket=...'`.
#
# The console is the first serial port: on this terminal (Ctrl-A X quits), or written to
# FILE with --console. --accel defaults to kvm when you can use /dev/kvm, else tcg
# (emulation, slower). QEMU exits when the guest powers off. The machine has no network
# unless QEMU_ARGS adds one. Needs qemu-system-x86_64 (Debian package qemu-system-x86).
set -euo pipefail

usage() {
    sed -n '4,5s/^# //p' "$0" >&2
    exit 2
}

disks=() kernel=() memory=1G cpus=1 accel= console=(-serial mon:stdio)
while [ $# -gt 0 ]; do
    case $1 in
        --disk) disks+=("$2"); shift 2 ;;
        --kernel) kernel+=(-kernel "$2"); shift 2 ;;
        --initrd) kernel+=(-initrd "$2"); shift 2 ;;
        --append) kernel+=(-append "$2"); shift 2 ;;
        --memory) memory=$2; shift 2 ;;
        --cpus) cpus=$2; shift 2 ;;
        --accel) accel=$2; shift 2 ;;
        --console) console=(-chardev "file,id=console,path=$2" -serial chardev:console); shift 2 ;;
        --) shift; break ;;
        *) usage ;;
    esac
done
[ ${#disks[@]} -gt 0 ] || [ ${#kernel[@]} -gt 0 ] || usage

if [ -z "$accel" ]; then
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then accel=kvm; else accel=tcg; fi
fi
case $accel in
    kvm) machine=(-accel kvm -cpu host) ;;
    tcg) machine=(-accel tcg) ;;
    *) usage ;;
esac

drives=()
for disk in "${disks[@]}"; do
    # QEMU reads ",," as a comma inside an option value
    drives+=(-drive "if=virtio,format=raw,cache=none,file=${disk//,/,,}")
done

exec qemu-system-x86_64 -nodefaults -no-user-config -display none \
    "${machine[@]}" -m "$memory" -smp "$cpus" "${console[@]}" \
    "${drives[@]}" "${kernel[@]}" "$@"
