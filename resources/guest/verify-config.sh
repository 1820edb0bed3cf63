#!/usr/bin/env bash
# verify-config.sh FRAGMENT DOTCONFIG
#
# Checks that every option line of a Kconfig fragment holds in a final .config:
#   CONFIG_X=value          -> .config must contain exactly "CONFIG_X=value"
#   # CONFIG_X is not set   -> .config must not set CONFIG_X (a "# ... is not set" line, or the
#                              symbol absent because its dependencies are off, both pass)
# Any other line of the fragment (blank, other comments) is ignored.
# Exit 0 when all hold; otherwise print every mismatching option to stderr and exit 1.
# Exit 2 on usage errors.
set -euo pipefail

if [[ $# -ne 2 ]]; then
	echo "usage: $0 FRAGMENT DOTCONFIG" >&2
	exit 2
fi
fragment=$1 dotconfig=$2
for f in "$fragment" "$dotconfig"; do
	if [[ ! -r $f ]]; then
		echo "verify-config: cannot read $f" >&2
		exit 2
	fi
done

# One awk pass: load the .config, then walk the fragment in order.
awk '
	FNR == NR {
		if ($0 ~ /^CONFIG_[A-Za-z0-9_]+=/) {
			i = index($0, "=")
			val[substr($0, 1, i - 1)] = substr($0, i + 1)
		} else if ($0 ~ /^# CONFIG_[A-Za-z0-9_]+ is not set$/) {
			val[$2] = "n"
			isnotset[$2] = 1
		}
		next
	}
	/^CONFIG_[A-Za-z0-9_]+=/ {
		i = index($0, "=")
		name = substr($0, 1, i - 1); want = substr($0, i + 1)
		checked++
		if (!(name in val)) {
			got = "absent (dependencies not met?)"
		} else if (name in isnotset) {
			got = "is not set"
		} else if (val[name] == want) {
			next
		} else {
			got = val[name]
		}
		printf "  %s: fragment wants %s, .config has %s\n", name, want, got
		bad++
		next
	}
	/^# CONFIG_[A-Za-z0-9_]+ is not set[ \t]*$/ {
		name = $2
		checked++
		if (!(name in val) || (name in isnotset)) next
		printf "  %s: fragment wants it not set, .config has %s=%s\n", name, name, val[name]
		bad++
		next
	}
	END {
		if (bad) {
			printf "verify-config: %d of %d fragment options do not hold in the final .config\n", bad, checked
			exit 1
		}
		printf "verify-config: all %d fragment options hold\n", checked
	}
' "$dotconfig" "$fragment" >&2
