# shellcheck shell=bash
# Sourced by build.sh: runs the noisy steps of the kernel build with their output in a log
# file and shows one progress line instead of thousands of make lines. Not a cache-key
# input: it changes what the build prints, never what it builds, so editing it does not
# rebuild the kernel. Tested by tests/guest_build.rs (progress_*).
#
#   run_logged LOG LABEL CMD...
#       Runs CMD (stdin /dev/null) with its stdout and stderr appended to LOG. Meanwhile
#       stderr shows LABEL, the number of Kbuild steps so far (its "  CC      file.o" lines:
#       one per file built), a percentage when progress_total holds an estimate of the
#       step count (0: unknown), the elapsed time and the current step. On a tty that is
#       one line rewritten in place (at most once a second); otherwise (CI logs) a line
#       every progress_interval seconds (default 30). A last line gives the totals.
#       Returns CMD's status.
#   log_tail LOG [N]
#       Prints the last N (default 40) lines of LOG on stderr, between two marker lines.

progress_total=${progress_total:-0}
progress_interval=${progress_interval:-30}

# _progress_line LABEL STEPS ELAPSED [CURRENT]: sets _progress_text to one progress line
# (no subshell: this runs once a second).
_progress_line() {
	_progress_text="==> $1: $2 files"
	if [[ $progress_total -gt 0 ]]; then
		local pct=$(($2 * 100 / progress_total))
		[[ $pct -le 99 ]] || pct=99 # an estimate: never 100% before the end
		_progress_text+=" (~$pct%)"
	fi
	local t
	printf -v t '%dm%02ds' $(($3 / 60)) $(($3 % 60))
	_progress_text+=", $t"
	[[ -z ${4-} ]] || _progress_text+=", $4"
}

# _progress_seen LINE: one line of output (_progress's locals: fd, steps, current).
_progress_seen() {
	printf '%s\n' "$1" >&"$fd"
	case $1 in
	'  '[A-Z]*)
		steps=$((steps + 1))
		current=${1#  } ;;
	esac
}

# _progress LOG LABEL: reads the command's output on stdin, see run_logged.
_progress() {
	local log=$1 label=$2 tty=0 start=$SECONDS shown=$SECONDS steps=0 current= chunk
	local pending= fd rc
	[[ -t 2 ]] && tty=1
	exec {fd}>>"$log"
	while :; do
		# read -t 1 wakes up once a second even while make is silent (a long link), so the
		# elapsed time stays current. A timed-out read keeps its partial line in chunk.
		if IFS= read -r -t 1 chunk; then
			_progress_seen "$pending$chunk"
			pending=
		else
			rc=$?
			if [[ $rc -le 128 ]]; then # end of input; chunk holds a last unended line
				[[ -z $pending$chunk ]] || _progress_seen "$pending$chunk"
				break
			fi
			pending+=$chunk
		fi
		if [[ $tty -eq 1 ]]; then
			if [[ $SECONDS -ne $shown ]]; then
				shown=$SECONDS
				_progress_line "$label" "$steps" $((SECONDS - start)) "$current"
				# \r and "clear to end of line"; cut to 79 columns so that it never wraps.
				printf '\r\033[K%s' "${_progress_text:0:79}" >&2
			fi
		elif [[ $((SECONDS - shown)) -ge $progress_interval ]]; then
			shown=$SECONDS
			_progress_line "$label" "$steps" $((SECONDS - start)) "$current"
			printf '%s\n' "$_progress_text" >&2
		fi
	done
	exec {fd}>&-
	[[ $tty -eq 0 ]] || printf '\r\033[K' >&2
	local t=$((SECONDS - start))
	printf '==> %s: done, %d files in %dm%02ds\n' "$label" "$steps" $((t / 60)) $((t % 60)) >&2
}

run_logged() {
	local log=$1 label=$2
	shift 2
	"$@" </dev/null 2>&1 | _progress "$log" "$label"
	return "${PIPESTATUS[0]}"
}

log_tail() {
	local log=$1 n=${2:-40}
	printf -- '---- last %d lines of %s ----\n' "$n" "$log" >&2
	tail -n "$n" -- "$log" >&2
	printf -- '---- end of %s ----\n' "$log" >&2
}
