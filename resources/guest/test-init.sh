#!/usr/bin/env bash
# Host-side test of the guest /init's command-line parsing (no VM, no kernel build):
# runs resources/guest/init with busybox sh in its parse-only test mode against fake
# /proc/cmdline files and compares what it extracts.
# Usage: resources/guest/test-init.sh   (needs busybox, e.g. from busybox-static)
set -euo pipefail
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
init=$here/init
bb=$(command -v busybox || true)
[[ -n $bb ]] || { echo "test-init: busybox not found" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0 n=0

# check CMDLINE HAVE_CMD CMD EXIT
check() {
	local cmdline=$1 want
	n=$((n + 1))
	printf '%s\n' "$cmdline" >"$tmp/cmdline"
	want=$(printf 'have_cmd=%s\ncmd=%s\nexit=%s' "$2" "$3" "$4")
	got=$(EMBER_CMDLINE_FILE=$tmp/cmdline EMBER_INIT_PARSE_ONLY=1 "$bb" sh "$init")
	if [[ $got != "$want" ]]; then
		fails=$((fails + 1))
		printf 'FAIL: cmdline: %s\n--- want\n%s\n--- got\n%s\n' "$cmdline" "$want" "$got" >&2
	fi
}

base='console=ttyS0 reboot=k panic=-1 noxsave 8250.nr_uarts=1 rdinit=/init quiet'
check "$base" '' '' reboot
check "$base ember.cmd=\"echo hello; uname -r; false\"" 1 'echo hello; uname -r; false' reboot
check "$base ember.cmd=\"echo 'a b' | tr a-z A-Z\" ember.exit=poweroff" 1 "echo 'a b' | tr a-z A-Z" poweroff
check "ember.cmd=\"ls  -l   /\" $base" 1 'ls  -l   /' reboot
check "$base ember.cmd=uname" 1 uname reboot
check "$base GLIBC_TUNABLES=glibc.cpu.hwcaps=-OSXSAVE ember.cmd=uname" 1 uname reboot
check "$base ember.cmd=uname ember.exit=reboot" 1 uname reboot
check "$base ember.cmd=\"\"" 1 '' reboot
check "$base ember.cmd=" 1 '' reboot
check "$base ember.exit=poweroff ember.cmd=\"echo ember.exit=reboot; x=\$((1+2)) && echo \\\$x \\\\n\"" 1 'echo ember.exit=reboot; x=$((1+2)) && echo \$x \\n' poweroff
check "$base ember.cmd=\"echo ember.exit=poweroff\"" 1 'echo ember.exit=poweroff' reboot
check "$base ember.exit=bogus" '' '' reboot
check "$base ember.exit=\"poweroff\"" '' '' poweroff
check "$base xember.cmd=nope foo.ember.cmd=nope" '' '' reboot
check "$base ember.cmd=\"unterminated quote here" 1 'unterminated quote here' reboot
check "$base ember.cmd=\"for i in 1 2 3; do echo \$i; done > /tmp/x && cat /tmp/x\" quiet" 1 'for i in 1 2 3; do echo $i; done > /tmp/x && cat /tmp/x' reboot

if [[ $fails -ne 0 ]]; then
	echo "test-init: $fails of $n cases failed" >&2
	exit 1
fi
echo "test-init: all $n cases passed"
