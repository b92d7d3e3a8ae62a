#!/bin/sh
# Attach a pfnbd volume to this Linux machine as a kernel block device with the
# kernel's NBD client, and mount it.
#
#   nbd-host-mount.sh attach SERVER EXPORT DEVICE [CONNECTIONS]
#   nbd-host-mount.sh detach DEVICE
#   nbd-host-mount.sh up     SERVER EXPORT DEVICE MOUNTPOINT [CONNECTIONS]  # attach, mount
#   nbd-host-mount.sh down   DEVICE MOUNTPOINT                              # unmount, detach
#
# SERVER is HOST:PORT for `pfnbd serve --bind HOST --port PORT`, or the socket path of
# `pfnbd serve --socket PATH`. EXPORT is the volume name. DEVICE is a free /dev/nbdN.
# CONNECTIONS above 1 opens that many connections to the server: the kernel spreads
# requests over them (pfnbd advertises CAN_MULTI_CONN, which the kernel requires).
#
# Needs root, nbd-client (Debian package nbd-client) and the kernel's nbd module. The
# device carries whatever the volume holds: make a filesystem on it after `attach`
# (mkfs.ext4 DEVICE) before the first `up`.
set -eu

usage() {
    sed -n '4,7s/^# //p' "$0" >&2
    exit 2
}

attach() {
    [ $# -ge 3 ] || usage
    server=$1 volume=$2 device=$3 connections=${4:-1}
    [ -d /sys/module/nbd ] || modprobe nbd
    case $server in
        /*) nbd-client -N "$volume" -u "$server" "$device" -C "$connections" ;;
        *:*) nbd-client -N "$volume" "${server%:*}" "${server##*:}" "$device" -C "$connections" ;;
        *) usage ;;
    esac
    # The device has its size once the kernel holds the connections.
    size=/sys/block/${device#/dev/}/size
    tries=100
    until [ "$(cat "$size")" != 0 ]; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || { echo "$device did not come up" >&2; exit 1; }
        sleep 0.1
    done
}

detach() {
    [ $# -eq 1 ] || usage
    nbd-client -d "$1"
}

command=${1:-}
[ $# -gt 0 ] && shift
case $command in
    attach) attach "$@" ;;
    detach) detach "$@" ;;
    up)
        [ $# -ge 4 ] || usage
        attach "$1" "$2" "$3" "${5:-1}"
        mount "$3" "$4"
        ;;
    down)
        [ $# -eq 2 ] || usage
        umount "$2"
        detach "$1"
        ;;
    *) usage ;;
esac
