#!/usr/bin/env bash
# Boots the small VM (built and cached by tools/vm/build.sh) under qemu's
# TCG emulation, its serial console on stdin/stdout.
#
#   bash tools/vm/run.sh WORKDIR
#
# WORKDIR/root, if present, is added to the initramfs as a second cpio
# archive: put the guest's script at WORKDIR/root/test.sh (run by /init,
# which then prints "VM-EXIT <status>" and powers off) and any binaries it
# needs (tools/vm/add-binary.sh copies one with its libraries). The guest
# has user-mode networking: it is 10.0.2.15 and reaches the host's
# 127.0.0.1 as 10.0.2.2 (guest scripts address nothing else).
# The last step execs qemu, so the caller's child PID is qemu's.
# Extra qemu arguments may follow WORKDIR (e.g. a virtual disk:
# -drive file=IMG,format=raw,if=virtio; the guest sees /dev/vda).
# REPLBLK_VM_NETDEV adds options to the user-mode netdev, e.g.
# "hostfwd=tcp:127.0.0.1:HOSTPORT-:GUESTPORT" (host loopback only).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORKDIR=$1
shift
VM=$(bash "$HERE/build.sh")
INITRD=$WORKDIR/initrd.cpio
cp "$VM/initramfs.cpio" "$INITRD"
if [[ -d $WORKDIR/root ]]; then
    python3 "$HERE/cpio.py" "$WORKDIR/root" "$WORKDIR/extra.cpio"
    cat "$WORKDIR/extra.cpio" >> "$INITRD"
fi
ACCEL=tcg
# no_timer_check: on a loaded host the emulated timer can look broken to
# the kernel's boot-time check ("IO-APIC + timer doesn't work"), a panic.
exec qemu-system-x86_64 -accel "$ACCEL" -cpu max -machine q35 -smp 1 -m "${REPLBLK_VM_MEM:-512}" \
    -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "$VM/vmlinux" -initrd "$INITRD" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4 no_timer_check rdinit=/init" \
    -netdev "user,id=n0${REPLBLK_VM_NETDEV:+,$REPLBLK_VM_NETDEV}" -device virtio-net-pci,netdev=n0,romfile= \
    "$@"
