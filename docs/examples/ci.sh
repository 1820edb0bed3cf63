#!/usr/bin/env bash
# Example CI script for any Linux machine with KVM (a self-hosted runner, a cron job, a
# developer laptop): build ember and the default guest, then run a test script in a
# throwaway microVM. The script's exit status is the test's, with ember's own ones:
# 124 = --timeout elapsed, 125 = ember or the VM failed (see docs/exec.md).
#
#   bash docs/examples/ci.sh [TEST_SCRIPT]      (default: docs/examples/guest-test.sh)
#
# The guest build (Debian 12 packages, ~5 minutes the first time) is cached in
# ${EMBER_CACHE_DIR:-~/.cache/ember}; later runs only copy it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
test_script=${1:-docs/examples/guest-test.sh}

if ! [[ -r /dev/kvm && -w /dev/kvm ]]; then
	echo "ci.sh: /dev/kvm is missing or not accessible to $(id -un)." >&2
	echo "  Add yourself to the kvm group (sudo usermod -aG kvm \"\$USER\", then log in" >&2
	echo "  again), or open it with a udev rule:" >&2
	echo "  echo 'KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0666\"' |" \
		"sudo tee /etc/udev/rules.d/99-kvm4all.rules && sudo udevadm trigger --name-match=kvm" >&2
	exit 125
fi

cargo build --release --locked
bash resources/guest/build.sh # cached: seconds after the first time

status=0
./target/release/ember exec --timeout "${EMBER_TIMEOUT:-600}" \
	--file "$test_script" --env CI=true \
	-- sh "$(basename "$test_script")" || status=$?

case $status in
0) echo "ci.sh: tests passed" ;;
124) echo "ci.sh: the tests timed out" >&2 ;;
125) echo "ci.sh: ember or the VM failed (not the tests); see the messages above" >&2 ;;
*) echo "ci.sh: the tests failed with status $status" >&2 ;;
esac
exit "$status"
