#!/bin/busybox sh
# PID 1 of the test guest. Prints "PFNBD-VM booted", runs the steps that /test/plan
# lists in $STEPS and prints one marker line per step on the console:
# "PFNBD-VM begin STEP", then "PFNBD-VM ok STEP",
# or "PFNBD-VM fail STEP" after the kernel's last messages. After the last step it
# prints "PFNBD-VM passed"; either way it then powers the machine off. A step takes its
# argument after a colon: "write-file:boot1". $DEADLINE bounds the whole run.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/sbin:/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
. /test/plan

mark() { echo "PFNBD-VM $*"; }
finish() { mark "$@"; poweroff -f; }

# wait_for SECONDS COMMAND...: retries COMMAND every 0.1 s until it succeeds
wait_for() {
    tries=$(($1 * 10))
    shift
    until "$@"; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        sleep 0.1
    done
}

# What follows reads the device, not the page cache.
drop_caches() {
    blockdev --flushbufs "$DISK"
    echo 3 > /proc/sys/vm/drop_caches
}

step_virtio_disk() {
    modprobe -a virtio_pci virtio_blk
    wait_for 30 test -b "$DISK"
}

step_disk_size() {
    [ "$(blockdev --getsize64 "$DISK")" = "$VOLUME_BYTES" ]
}

step_raw_write() {
    dd if=/test/data/raw.bin of="$DISK" bs=1M seek="$RAW_OFFSET_MIB" conv=fsync
}

# The same pattern written by one O_DIRECT writer per CPU, each pinned to its CPU and
# writing its slice: blk-mq sends each CPU's requests down its own hardware queue, which
# for the kernel's NBD client is its own connection.
step_raw_write_each_cpu() {
    cpus=$(nproc)
    slice_mib=$(($(stat -c %s /test/data/raw.bin) / cpus >> 20))
    writers=
    for cpu in $(seq 0 $((cpus - 1))); do
        taskset -c "$cpu" dd if=/test/data/raw.bin of="$DISK" bs=1M count="$slice_mib" \
            skip=$((cpu * slice_mib)) seek=$((RAW_OFFSET_MIB + cpu * slice_mib)) \
            oflag=direct conv=fsync &
        writers="$writers $!"
    done
    for writer in $writers; do wait "$writer"; done
}

step_raw_check() {
    drop_caches
    dd if="$DISK" bs=1M skip="$RAW_OFFSET_MIB" count="$(($(stat -c %s /test/data/raw.bin) >> 20))" \
        | cmp - /test/data/raw.bin
}

# The full path: busybox's shell would run its own mke2fs applet, which makes ext2.
step_mkfs() {
    /sbin/mke2fs -q -F -t ext4 -L pfnbd-test "$DISK" ${FS_SIZE_MIB:+"${FS_SIZE_MIB}M"}
}

step_mount() {
    mount -t ext4 "$DISK" /mnt
}

step_umount() {
    umount /mnt
}

# A data file from the host, and a directory of $SMALL_FILES small files for the metadata.
step_write_file() {
    cp "/test/data/$1" "/mnt/$1"
    mkdir "/mnt/$1.d"
    for i in $(seq 1 "$SMALL_FILES"); do echo "$1 file $i" > "/mnt/$1.d/$i"; done
    sync
}

step_check_file() {
    cmp "/mnt/$1" "/test/data/$1"
    [ "$(ls "/mnt/$1.d" | wc -l)" = "$SMALL_FILES" ]
    for i in $(seq 1 "$SMALL_FILES"); do [ "$(cat "/mnt/$1.d/$i")" = "$1 file $i" ]; done
}

step_net_up() {
    modprobe -a virtio_pci virtio_net
    wait_for 30 test -e /sys/class/net/eth0
    ip link set lo up
    ip link set eth0 up
    ip addr add "$GUEST_ADDRESS" dev eth0
}

step_nbd_attach() {
    nbd-host-mount.sh attach "$NBD_SERVER" "$NBD_EXPORT" "$DISK" "$NBD_CONNECTIONS"
}

# The kernel client set up to outlive its server: -persist, a dead-connection timeout,
# and $NBD_INTERFACE: empty for netlink, -nonetlink for the ioctl interface.
step_nbd_attach_persist() {
    [ -d /sys/module/nbd ] || modprobe nbd
    nbd-client -N "$NBD_EXPORT" "${NBD_SERVER%:*}" "${NBD_SERVER##*:}" "$DISK" \
        $NBD_INTERFACE -persist -timeout "$NBD_TIMEOUT"
    wait_for 10 test "$(cat "/sys/block/${DISK#/dev/}/size")" != 0
}

step_nbd_detach() {
    nbd-host-mount.sh detach "$DISK"
}

step_nbd_up() {
    nbd-host-mount.sh up "$NBD_SERVER" "$NBD_EXPORT" "$DISK" /mnt "$NBD_CONNECTIONS"
}

step_nbd_down() {
    nbd-host-mount.sh down "$DISK" /mnt
}

# Holds here until the host, which watches the console, answers "resume TAG" on the
# second serial port.
step_host_sync() {
    exec 3< /dev/ttyS1  # open before the marker: opening the port clears its input
    stty -echo <&3
    mark wait "$1"
    read -r -t 60 reply <&3
    [ "$reply" = "resume $1" ]
}

mark booted
(sleep "$DEADLINE" && finish fail "deadline of $DEADLINE s") &
for step in $STEPS; do
    case $step in
        *:*) argument=${step#*:} ;;
        *) argument= ;;
    esac
    mark begin "$step"
    (set -e; "step_$(echo "${step%%:*}" | tr - _)" $argument)
    status=$?
    if [ "$status" -ne 0 ]; then
        dmesg | tail -n 40
        finish fail "$step (exit status $status)"
    fi
    mark ok "$step"
done
finish passed
