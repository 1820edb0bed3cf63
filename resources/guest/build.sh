#!/usr/bin/env bash
# Builds ember's default guest (see README.md next to this script):
#   target/guest/vmlinux         ELF kernel with the PVH note and a symbol table
#   target/guest/initramfs.cpio  uncompressed newc cpio: busybox-static + /init + /bin/vsock-io
#   target/guest/rootfs.ext4     small ext4 image with the same userland (/init, /sbin/init)
# plus target/guest/kernel.config and target/guest/build-info.txt.
#
# The kernel build's own output (thousands of make lines) goes to a log, kept as build.log in
# the kernel's cache entry (on failure: kernel-<hash>.failed.log beside it, its tail
# printed); the terminal shows one progress line (progress.sh).
#
# Results are cached outside the clone, keyed by a hash of all inputs:
#   ${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}/guest/<hash>/
# A cache hit only copies files (seconds). A miss builds in a temporary directory next to
# the cache entry and renames it into place at the end, so an interrupted build never
# leaves a partial entry.
#
# Usage: build.sh [--check-deps | --force | --help]
set -euo pipefail

usage() {
	cat <<'EOF'
usage: resources/guest/build.sh [--check-deps | --force | --help]

Builds target/guest/{vmlinux,initramfs.cpio,rootfs.ext4} from Debian's linux-source-6.1,
busybox-static and vsock-io.c, installing the build dependencies with apt-get when they are
missing.

  --check-deps  only check (and install when missing) the build dependencies
  --force       rebuild even when the cache has an entry for these inputs
  --help        this text

Environment:
  EMBER_CACHE_DIR        cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/ember)
  EMBER_GUEST_KEEP_BUILD=1  keep the kernel build tree of a fresh build (for debugging)
  EMBER_GUEST_JOBS       make -j value (default: nproc)
EOF
}

log() { printf '==> %s\n' "$*" >&2; }
die() {
	printf 'build.sh: error: %s\n' "$*" >&2
	exit 1
}

check_only=0 force=0
for arg in "$@"; do
	case $arg in
	--check-deps) check_only=1 ;;
	--force) force=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		usage >&2
		exit 2
		;;
	esac
done

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=progress.sh
source "$script_dir/progress.sh"
repo_root=$(cd -- "$script_dir/../.." && pwd -P)
out_dir=$repo_root/target/guest

kernel_pkg=linux-source-6.1
kernel_tarball=/usr/src/linux-source-6.1.tar.xz
busybox_pkg=busybox-static
deps=(build-essential flex bison bc libelf-dev cpio e2fsprogs xz-utils patch
	"$kernel_pkg" "$busybox_pkg")

pkg_version() {
	dpkg-query -W -f='${db:Status-Abbrev}${Version}' "$1" 2>/dev/null |
		sed -n 's/^ii *//p'
}

ensure_deps() {
	local missing=() p
	for p in "${deps[@]}"; do
		[[ -n $(pkg_version "$p") ]] || missing+=("$p")
	done
	if [[ ${#missing[@]} -eq 0 ]]; then
		log "build dependencies present"
		return
	fi
	log "installing missing packages: ${missing[*]}"
	local sudo=()
	if [[ $(id -u) -ne 0 ]]; then
		command -v sudo >/dev/null || die "need root or sudo to install: ${missing[*]}"
		sudo=(sudo -n)
	fi
	local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q
		-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
	# Only refresh the package lists when the install cannot find something.
	if ! "${apt[@]}" install --no-install-recommends "${missing[@]}" </dev/null; then
		log "apt-get install failed; running apt-get update and retrying"
		"${apt[@]}" update </dev/null
		"${apt[@]}" install --no-install-recommends "${missing[@]}" </dev/null
	fi
	for p in "${missing[@]}"; do
		[[ -n $(pkg_version "$p") ]] || die "package $p is still not installed"
	done
}

ensure_deps
[[ $check_only -eq 0 ]] || exit 0

[[ -r $kernel_tarball ]] || die "$kernel_tarball not found (package $kernel_pkg)"
busybox_bin=$(dpkg -L "$busybox_pkg" | grep -m1 -E '/bin/busybox$' || true)
[[ -x $busybox_bin ]] || die "busybox binary of $busybox_pkg not found"

# ---- cache keys ------------------------------------------------------------------------
# The inputs are copied once, then hashed and used from that copy ($in_dir), so that editing
# them while a build runs cannot put one version's output under another version's key.
# The kernel has its own key (everything but the userland files), so that changing only the
# init or fstab rebuilds the images in seconds; the full key covers all inputs. progress.sh
# is no input: it only changes what the build prints.
in_dir=$(mktemp -d "${TMPDIR:-/tmp}/ember-guest-inputs.XXXXXX")
trap 'rm -rf "$in_dir"' EXIT
mkdir "$in_dir/patches"
cp -p "$script_dir/build.sh" "$script_dir/verify-config.sh" "$script_dir/config.fragment" \
	"$script_dir/init" "$script_dir/fstab" "$script_dir/vsock-io.c" "$in_dir/"
shopt -s nullglob
patches=("$script_dir"/patches/*.patch)
shopt -u nullglob
[[ ${#patches[@]} -gt 0 ]] || die "no patches in $script_dir/patches"
cp -p "${patches[@]}" "$in_dir/patches/"
patches=("$in_dir"/patches/*.patch)
kernel_inputs=("$in_dir/build.sh" "$in_dir/verify-config.sh"
	"$in_dir/config.fragment" "${patches[@]}")
user_inputs=("$in_dir/init" "$in_dir/fstab" "$in_dir/vsock-io.c")
kernel_version=$(pkg_version "$kernel_pkg")
busybox_version=$(pkg_version "$busybox_pkg")

hash_inputs() { # hash_inputs LABEL... -- FILE...
	{
		while [[ $1 != -- ]]; do
			printf '%s\n' "$1"
			shift
		done
		shift
		local f
		for f in "$@"; do
			printf 'file %s %s\n' "${f#"$in_dir"/}" "$(sha256sum <"$f" | cut -d' ' -f1)"
		done
	} | sha256sum | cut -c1-16
}
khash=$(hash_inputs "kernel $kernel_version" -- "${kernel_inputs[@]}")
hash=$(hash_inputs "kernel-key $khash" "busybox $busybox_version" -- "${user_inputs[@]}")

cache_root=${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}
cache_dir=$cache_root/guest
entry=$cache_dir/$hash
kentry=$cache_dir/kernel-$khash
artifacts=(vmlinux initramfs.cpio rootfs.ext4 kernel.config build-info.txt)
kernel_artifacts=(vmlinux kernel.config gen_init_cpio)

complete() { # complete DIR FILE...
	local d=$1 a
	shift
	[[ -f $d/.complete ]] || return 1
	for a in "$@"; do [[ -s $d/$a ]] || return 1; done
}

# publish STAGE_DIR FINAL_DIR FILE...: atomic rename; if a concurrent build published the
# same key first, keep theirs.
publish() {
	local stage=$1 final=$2
	shift 2
	touch "$stage/.complete"
	if [[ -e $final ]] && ! complete "$final" "$@"; then
		rm -rf "$final" # damaged by hand; entries are only ever created complete
	fi
	if ! mv -T "$stage" "$final" 2>/dev/null; then
		complete "$final" "$@" || die "could not move $stage to $final"
		log "another build published $final first; using it"
		rm -rf "$stage"
	fi
}

install_entry() {
	mkdir -p "$out_dir"
	local a
	for a in "${artifacts[@]}"; do
		# Copies, not hard links: ember may boot rootfs.ext4 read-write, which must not
		# modify the cache. Copy to a temporary name, then rename.
		cp --sparse=always --reflink=auto "$entry/$a" "$out_dir/.$a.tmp"
		mv -f "$out_dir/.$a.tmp" "$out_dir/$a"
	done
}

if [[ $force -eq 0 ]] && complete "$entry" "${artifacts[@]}"; then
	log "using cached guest build $entry"
	install_entry
	log "done: $out_dir/{vmlinux,initramfs.cpio,rootfs.ext4} (cached)"
	exit 0
fi

# ---- fresh build -------------------------------------------------------------------------
mkdir -p "$cache_dir"
work=$(mktemp -d "$cache_dir/.build-$hash.XXXXXX")
cleanup() {
	rm -rf "$in_dir"
	if [[ ${EMBER_GUEST_KEEP_BUILD:-0} == 1 ]]; then
		log "keeping build tree $work"
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT
start=$SECONDS
jobs=${EMBER_GUEST_JOBS:-$(nproc)}

# The kernel build's log; on failure it is moved next to the cache entry (the build tree is
# removed) and its tail printed.
klog=$work/kernel-build.log
kernel_failed() { # kernel_failed WHAT
	local kept=$cache_dir/kernel-$khash.failed.log
	mv -f "$klog" "$kept" 2>/dev/null || kept=$klog
	log_tail "$kept"
	die "$1 failed (full log: $kept)"
}

build_kernel() { # build_kernel STAGE_DIR
	local stage=$1 ksrc=$work/linux-source-6.1 p prev
	: >"$klog"
	log "building kernel $khash ($kernel_pkg $kernel_version) in $work"
	log "unpacking $kernel_tarball"
	tar -C "$work" -xf "$kernel_tarball"
	[[ -d $ksrc ]] || die "unexpected tarball layout: no linux-source-6.1/ in $kernel_tarball"
	for p in "${patches[@]}"; do
		log "applying patch ${p##*/}"
		patch -p1 -s -N -d "$ksrc" <"$p" || die "patch ${p##*/} does not apply"
	done

	log "configuring: tinyconfig + config.fragment + olddefconfig"
	make -C "$ksrc" -s tinyconfig </dev/null >>"$klog" 2>&1 || kernel_failed "make tinyconfig"
	(cd "$ksrc" && scripts/kconfig/merge_config.sh -m .config "$in_dir/config.fragment") \
		</dev/null >>"$klog" 2>&1 || kernel_failed "merge_config.sh"
	make -C "$ksrc" -s olddefconfig </dev/null >>"$klog" 2>&1 || kernel_failed "make olddefconfig"
	log "verifying the fragment against the final .config"
	"$in_dir/verify-config.sh" "$in_dir/config.fragment" "$ksrc/.config" ||
		die "the final kernel .config does not match config.fragment (see above)"

	# Kbuild's lines (CC ..., LD ...) go to the log; the percentage is estimated from the
	# number of those lines in the newest earlier kernel build's log, when there is one.
	progress_total=0
	prev=$(find "$cache_dir" -mindepth 2 -maxdepth 2 -path '*/kernel-*/build.log' \
		-printf '%T@ %p\n' 2>/dev/null | sort -rn | sed -n '1s/^[^ ]* //p')
	if [[ -n $prev ]]; then
		progress_total=$(grep -c '^  [A-Z]' "$prev" || true)
	fi
	log "compiling vmlinux with make -j$jobs (a few minutes; log: $klog)"
	# -mstringop-strategy=rep_8byte: GCC expands memset/memcpy inline in code it optimizes
	# for size (all __init code is __cold) as `rep stosb`/`rep movsb`, which the PVM host's
	# instruction emulator runs one byte per iteration; `rep stosq`/`rep movsq` move 8 bytes
	# per iteration (docs/profile.md, change 4).
	run_logged "$klog" "compiling vmlinux" make -C "$ksrc" -j"$jobs" \
		KCFLAGS=-mstringop-strategy=rep_8byte vmlinux ||
		kernel_failed "make vmlinux"
	if [[ ! -x $ksrc/usr/gen_init_cpio ]]; then
		make -C "$ksrc" -s usr/gen_init_cpio </dev/null >>"$klog" 2>&1 ||
			kernel_failed "make usr/gen_init_cpio"
	fi
	readelf -n "$ksrc/vmlinux" | grep -q 'Xen.*0x00000012' ||
		die "vmlinux has no Xen PVH note (0x12)"
	readelf -S "$ksrc/vmlinux" | grep -q '\.symtab' || die "vmlinux has no .symtab"
	mkdir -p "$stage"
	cp "$ksrc/vmlinux" "$stage/vmlinux"
	cp "$ksrc/.config" "$stage/kernel.config"
	cp "$ksrc/usr/gen_init_cpio" "$stage/gen_init_cpio"
	cp "$klog" "$stage/build.log"
	rm -f "$cache_dir/kernel-$khash.failed.log"
	log "vmlinux built in $((SECONDS - start)) s"
}

if [[ $force -eq 0 ]] && complete "$kentry" "${kernel_artifacts[@]}"; then
	log "using cached kernel $kentry"
else
	build_kernel "$work/kernel"
	[[ $force -eq 0 ]] || rm -rf "$kentry"
	publish "$work/kernel" "$kentry" "${kernel_artifacts[@]}"
	log "kernel cached as $kentry (build log: $kentry/build.log)"
	[[ ${EMBER_GUEST_KEEP_BUILD:-0} == 1 ]] || rm -rf "$work/linux-source-6.1"
fi

# ---- userland -------------------------------------------------------------------------
stage=$work/out
mkdir -p "$stage"
cp "$kentry/vmlinux" "$kentry/kernel.config" "$stage/"

# vsock-io: the guest's vsock tool and init's warm-exec helper (freestanding, no libc; the
# command line is the one in its header).
log "compiling vsock-io.c"
vsock_io=$work/vsock-io
cc -static -nostdlib -ffreestanding -Os -s -fno-stack-protector \
	-fno-asynchronous-unwind-tables -Wl,--build-id=none -o "$vsock_io" "$in_dir/vsock-io.c" ||
	die "compiling vsock-io.c failed"

# Applet paths as busybox itself lays them out (bin/sh, sbin/reboot, usr/bin/tr, ...), all
# symlinked to /bin/busybox. init itself needs mount devmem stty sh sync reboot poweroff
# sleep setsid cttyhack (and mkfifo on a root without init's FIFOs); the rest is for the
# commands users run.
mapfile -t applets < <("$busybox_bin" --list-full | grep -v '^bin/busybox$' | sort -u)
[[ ${#applets[@]} -gt 50 ]] || die "busybox --list-full returned too few applets"
dirs=(bin sbin usr usr/bin usr/sbin proc sys dev tmp etc root mnt run)

# The initramfs carries only three of those links when busybox runs its applets without
# links: its shell (FEATURE_SH_STANDALONE) and its exec-calling applets (env, xargs, ...:
# FEATURE_PREFER_APPLETS) find an applet by name first and run it through /proc/self/exe.
# Kept: /bin/sh and /usr/bin/env (#! lines), and /bin/mount, which init runs before /proc is
# mounted (the shell then falls back to PATH). The kernel unpacks each cpio entry with
# emulated code on a PVM host: the 268 links of Debian's busybox cost ~1.7 s of a ~12 s boot
# (docs/profile.md, change 6). rootfs.ext4 keeps every link (it is not unpacked).
if env -i PATH=/nonexistent "$busybox_bin" sh -c 'ls / >/dev/null && env true' 2>/dev/null; then
	initramfs_links=(bin/sh bin/mount usr/bin/env)
else
	log "$busybox_bin does not run applets without links: the initramfs gets all of them"
	initramfs_links=("${applets[@]}")
fi

# The initramfs's fstab mounts no tmpfs over /tmp: its root is a writable tmpfs already, and
# a tmpfs there would hide what `ember exec --file X:/tmp/...` put into /tmp (the kernel
# unpacks the exec archive before init runs). rootfs.ext4 keeps the whole fstab.
initramfs_fstab=$work/fstab.initramfs
grep -Ev '^[[:space:]]*[^#[:space:]]+[[:space:]]+/tmp[[:space:]]' "$in_dir/fstab" \
	>"$initramfs_fstab" || true
grep -Eq '^[[:space:]]*[^#[:space:]]+[[:space:]]+/proc[[:space:]]' "$initramfs_fstab" ||
	die "fstab: no /proc line left for the initramfs"

log "writing initramfs.cpio (uncompressed newc, busybox + ${#initramfs_links[@]} applet links)"
list=$work/initramfs.list
{
	for d in "${dirs[@]}"; do
		if [[ $d == tmp ]]; then
			echo "dir /tmp 1777 0 0"
		else
			echo "dir /$d 0755 0 0"
		fi
	done
	echo "nod /dev/console 0600 0 0 c 5 1"
	# init's power-button watcher blocks opening the first, says "ready" through the
	# second (see init, 3b).
	echo "pipe /run/ember-power 0600 0 0"
	echo "pipe /run/ember-ready 0600 0 0"
	# Warm exec (init, 4b): vsock-io says "archive unpacked" through the first, init hands
	# it the command's status through the second.
	echo "pipe /run/ember-job-ok 0600 0 0"
	echo "pipe /run/ember-job-status 0600 0 0"
	echo "file /bin/busybox $busybox_bin 0755 0 0"
	echo "file /bin/vsock-io $vsock_io 0755 0 0"
	for a in "${initramfs_links[@]}"; do echo "slink /$a /bin/busybox 0777 0 0"; done
	echo "file /init $in_dir/init 0755 0 0"
	echo "file /etc/fstab $initramfs_fstab 0644 0 0"
} >"$list"
"$kentry/gen_init_cpio" "$list" >"$stage/initramfs.cpio"

log "writing rootfs.ext4"
rootdir=$work/rootfs
mkdir -p "$rootdir"
for d in "${dirs[@]}"; do mkdir -p "$rootdir/$d"; done
install -m 0755 "$busybox_bin" "$rootdir/bin/busybox"
install -m 0755 "$vsock_io" "$rootdir/bin/vsock-io"
for a in "${applets[@]}"; do ln -s /bin/busybox "$rootdir/$a"; done
install -m 0755 "$in_dir/init" "$rootdir/init"
install -m 0755 "$in_dir/init" "$rootdir/sbin/init"
install -m 0644 "$in_dir/fstab" "$rootdir/etc/fstab"
mkfifo -m 0600 "$rootdir/run/ember-power" "$rootdir/run/ember-ready" \
	"$rootdir/run/ember-job-ok" "$rootdir/run/ember-job-status"
chmod 1777 "$rootdir/tmp"
chmod 0700 "$rootdir/root"
# -d copies the tree without mounting or root rights. 32 MiB leaves room for tests that
# write files.
mkfs.ext4 -q -F -L ember-root -E root_owner=0:0 -d "$rootdir" "$stage/rootfs.ext4" 32M
# mkfs -d keeps each file's owner: when not run as root, make everything root-owned.
if [[ $(id -u) -ne 0 ]]; then
	(cd "$rootdir" && find . -mindepth 1 | sed 's|^\.||') |
		while IFS= read -r path; do
			printf 'sif "%s" uid 0\nsif "%s" gid 0\n' "$path" "$path"
		done >"$work/chown.debugfs"
	debugfs -w -f "$work/chown.debugfs" "$stage/rootfs.ext4" >/dev/null 2>&1 ||
		die "debugfs could not make rootfs.ext4 root-owned"
fi
e2fsck -fn "$stage/rootfs.ext4" >/dev/null 2>&1 || die "rootfs.ext4 fails e2fsck"

{
	echo "hash=$hash"
	echo "kernel_hash=$khash"
	echo "kernel_package=$kernel_pkg $kernel_version"
	echo "busybox_package=$busybox_pkg $busybox_version"
	echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	(cd "$stage" && sha256sum vmlinux initramfs.cpio rootfs.ext4)
} >"$stage/build-info.txt"

[[ $force -eq 0 ]] || rm -rf "$entry"
publish "$stage" "$entry" "${artifacts[@]}"
log "cached as $entry"
install_entry
log "done in $((SECONDS - start)) s: $out_dir/{vmlinux,initramfs.cpio,rootfs.ext4}"
