#!/bin/sh
# An example test script for `ember exec`: it runs inside the guest (busybox sh, as root, in
# /root), prints to stdout and stderr, and its exit status becomes ember's.
#   ember exec --file docs/examples/guest-test.sh -- sh guest-test.sh
set -e

uname -r
nproc
grep MemTotal /proc/meminfo
echo "running in $PWD; CI=${CI:-unset}"

fail=0
check() {
	if "$@" >/dev/null 2>&1; then
		echo "ok   $*"
	else
		echo "FAIL $*" >&2
		fail=1
	fi
}

check test -r /proc/cpuinfo
check test -w /tmp
check sh -c 'echo hello >/tmp/x && grep -q hello /tmp/x'
check sh -c 'v="a b"; [ "$v" = "a b" ]'

exit "$fail"
