#!/usr/bin/env bash
# Host-side test of the guest /init's command-line parsing (no VM, no kernel build):
# runs resources/guest/init with busybox sh in its parse-only test mode against fake
# /proc/cmdline files and compares what it extracts; and, with python3 (for a pty), its
# tty drain.
# Usage: resources/guest/test-init.sh   (needs busybox, e.g. from busybox-static)
set -euo pipefail
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
init=$here/init
bb=$(command -v busybox || true)
[[ -n $bb ]] || { echo "test-init: busybox not found" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0 n=0

# check CMDLINE HAVE_CMD CMD EXIT [HAVE_WARM WARM]
check() {
	local cmdline=$1 want
	n=$((n + 1))
	printf '%s\n' "$cmdline" >"$tmp/cmdline"
	want=$(printf 'have_cmd=%s\ncmd=%s\nexit=%s\nhave_warm=%s\nwarm=%s' "$2" "$3" "$4" \
		"${5-}" "${6-}")
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
# Warm exec: ember.warm=PORT (validated where init uses it, not here).
check "$base ember.warm=52" '' '' reboot 1 52
check "ember.warm=52 $base ember.exit=poweroff" '' '' poweroff 1 52
check "$base ember.warm=\"1024\" ember.exit=reboot" '' '' reboot 1 1024
check "$base ember.warm=" '' '' reboot 1 ''
check "$base ember.warm=abc" '' '' reboot 1 abc
check "$base xember.warm=52 foo.ember.warm=53" '' '' reboot
check "$base ember.cmd=\"echo ember.warm=52\"" 1 'echo ember.warm=52' reboot
check "$base ember.cmd=uname ember.warm=7" 1 uname reboot 1 7
check "$base ember.warm=4294967295 ember.cmd=\"echo ember.warm=1 ember.exit=poweroff\"" 1 \
	'echo ember.warm=1 ember.exit=poweroff' reboot 1 4294967295

# The drain (stty with TCSADRAIN) must be accepted by busybox stty on a real tty: a setting
# stty refuses (it once was "line 0") makes it exit 1 without draining anything.
if command -v python3 >/dev/null; then
	n=$((n + 1))
	if ! python3 - "$bb" "$init" <<'EOF'
import os, pty, subprocess, sys
_, s = pty.openpty()
env = dict(os.environ, EMBER_INIT_DRAIN_ONLY=os.ttyname(s))
sys.exit(subprocess.call([sys.argv[1], "sh", sys.argv[2]], env=env))
EOF
	then
		fails=$((fails + 1))
		echo "FAIL: init's _ei_drain (stty -F TTY ...) failed on a pty" >&2
	fi
else
	echo "test-init: python3 not found: the tty drain case is skipped" >&2
fi

if [[ $fails -ne 0 ]]; then
	echo "test-init: $fails of $n cases failed" >&2
	exit 1
fi
echo "test-init: all $n cases passed"
