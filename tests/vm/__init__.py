"""Support for tests/test_vm.py: a Debian kernel (kernel.py), an initramfs for it
(initramfs.py, with init.sh as the guest's PID 1), QEMU guests (guest.py), and the relay
that joins a guest's NBD connections to pfnbd's Unix socket (unix_relay.py)."""
