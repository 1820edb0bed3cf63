#!/usr/bin/env bash
# Boots target/guest/ under QEMU microvm (a reference VMM to compare ember with), as verified
# on this project's KVM-on-PVM hosts (see README.md). Guest kernel code is emulated there, so
# expect ~20 s to reach /init.
#
# usage: qemu-boot.sh [--rootfs] [--timeout S] [COMMAND]
#   COMMAND   passed as ember.cmd="COMMAND" (must not contain a double quote); without it the
#             guest starts an interactive shell on the console
#   --rootfs  boot rootfs.ext4 (a scratch copy) on virtio-blk instead of the initramfs
#   --timeout S  kill QEMU after S seconds (default 120; 0 = never)
# QEMU microvm emulates only one ISA UART, so init's COM2 (stderr) path cannot be exercised
# with it; init then falls back to the console, as designed.
# Extra cmdline words can be given in EMBER_GUEST_APPEND. Exits with QEMU's status (0 after
# the guest's reboot -f), 124 on timeout.
set -euo pipefail
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
guest=$(cd -- "$here/../.." && pwd -P)/target/guest
rootfs=0 timeout_s=120
while [[ $# -gt 0 ]]; do
	case $1 in
	--rootfs) rootfs=1 ;;
	--timeout) timeout_s=$2; shift ;;
	--) shift; break ;;
	-*) echo "unknown option $1" >&2; exit 2 ;;
	*) break ;;
	esac
	shift
done
append="console=ttyS0 reboot=k panic=-1 noxsave clearcpuid=smap,popcnt GLIBC_TUNABLES=glibc.cpu.hwcaps=-OSXSAVE random.trust_cpu=on quiet rodata=off"
args=(-M microvm,acpi=off -enable-kvm
	-cpu host,-arch-capabilities,kvm-pv-ipi=off,kvm-pv-unhalt=off,kvm-pv-sched-yield=off
	-m 64 -smp 1 -nodefaults -no-user-config -nographic -serial stdio -device i8042
	-no-reboot -kernel "$guest/vmlinux")
append+=" 8250.nr_uarts=1"
if [[ $rootfs -eq 1 ]]; then
	scratch=$(mktemp --suffix=.ext4)
	trap 'rm -f "$scratch"' EXIT
	cp --sparse=always "$guest/rootfs.ext4" "$scratch"
	args+=(-drive "file=$scratch,if=none,id=d0,format=raw" -device virtio-blk-device,drive=d0)
	append+=" root=/dev/vda rootfstype=ext4 rw"
else
	args+=(-initrd "$guest/initramfs.cpio")
	append+=" rdinit=/init"
fi
[[ $# -eq 0 ]] || append+=" ember.cmd=\"$*\""
append+=${EMBER_GUEST_APPEND:+ $EMBER_GUEST_APPEND}
rc=0
timeout "$timeout_s" qemu-system-x86_64 "${args[@]}" -append "$append" || rc=$?
exit "$rc"
