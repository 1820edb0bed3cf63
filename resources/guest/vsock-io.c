// SPDX-License-Identifier: Apache-2.0
// vsock-io: a tiny AF_VSOCK tool for ember's default guest (busybox nc has no vsock).
// Freestanding x86_64 Linux (no libc), so the static binary is a few KiB and costs the
// initramfs almost nothing. resources/guest/build.sh installs it as /bin/vsock-io:
//
//   cc -static -nostdlib -ffreestanding -Os -s -fno-stack-protector
//      -fno-asynchronous-unwind-tables -Wl,--build-id=none -o vsock-io vsock-io.c
//
// Usage:
//   vsock-io connect CID PORT   connect, then copy stdin -> socket and socket -> stdout
//                               (stdin EOF shuts the socket's write half; ends at socket EOF)
//   vsock-io listen PORT        accept one connection, then the same as connect
//   vsock-io echo PORT [N]      accept N connections (default 1), one after the other, and
//                               send each one back what it sends until it shuts down
//   vsock-io send CID PORT MIB  connect and send MIB MiB of a byte pattern, then read until
//                               EOF (for throughput measurements)
//   vsock-io tcp A.B.C.D PORT   `connect` over TCP/IPv4, with 64 KiB reads and writes (busybox
//                               nc moves 1 KiB per system call, which is slow in a PVM guest)
//   vsock-io tcp-send A.B.C.D PORT MIB
//                               `send` over TCP/IPv4
//   vsock-io job PORT [DIR]     ember's warm exec (resources/guest/README.md): listen on
//                               vsock PORT, tell the VMM "ready" (a 4-byte write of PORT to
//                               the exit device's register at guest-physical 0xC000_1004,
//                               through /dev/mem; only with ember.warm= on the kernel
//                               command line), accept ONE connection, read the job header
//                               (`EMBERJOB1 SECS NSECS\n`: the host's wall-clock time, set
//                               as CLOCK_REALTIME) and copy what follows it to stdout until
//                               EOF; with DIR, unpack it instead as a newc cpio archive into
//                               DIR (as `unpack`); then close it
//   vsock-io warm PORT DIR [TTY...]
//                               init's warm-exec helper: `job PORT DIR`, then "ok" on fd 3,
//                               then wait for a status line on fd 4, tcdrain() each TTY and
//                               write the status to the exit device (0xC000_1000); see
//                               warm() below and resources/guest/init (4b)
//   vsock-io boot-timer [cmdline]
//                               the boot-timer event (Firecracker's convention, ember's too):
//                               an 8-bit store of 123 to guest-physical 0xC000_0000 through
//                               /dev/mem, as init's `devmem 0xc0000000 8 123` did; only as
//                               a child of process 1. With `cmdline`, then copy
//                               /proc/cmdline to stdout: init reads it through a pipe in one
//                               go, where its `read` builtin takes a poll() and a read() per
//                               byte (~0.1 s for ember's command line in a PVM guest)
//   vsock-io start FSTAB        init's first step, only as a child of process 1: mount what
//                               FSTAB lists (as `mount -a 2>/dev/null`: noauto entries
//                               skipped, errors ignored), then the boot timer (at best
//                               effort: no /dev/mem, no timer) and /proc/cmdline to stdout
//   vsock-io opost-off TTY...   switch output post-processing off on each TTY (`stty -opost`)
//   vsock-io end STATUS|- poweroff|reboot [TTY...]
//                               init's last step, only as process 1 (init execs it): drain
//                               each TTY (tcdrain), store STATUS (unless "-") to the exit
//                               device's status register (0xC000_1000) as init's
//                               `devmem 0xc0001000 32 STATUS` did, sync, then power off or
//                               reboot; it never returns (a failed reboot(2) waits forever)
//   vsock-io unpack DIR         unpack a newc cpio archive from stdin into DIR: directories,
//                               regular files and symbolic links with their modes, owners
//                               and (files, links) mtimes; an existing file or link at a
//                               name is replaced, never written through; names must be
//                               relative without `..`; other file types are refused
// The pattern: 64 KiB blocks whose byte i is (i * 7 + 1) mod 256.
// Exit status 0 on success, 1 on any error (with a message on stderr naming the step), 2 on
// bad usage.

typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;
typedef unsigned short u16;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_poll 7
#define SYS_mmap 9
#define SYS_munmap 11
#define SYS_ioctl 16
#define SYS_socket 41
#define SYS_connect 42
#define SYS_accept 43
#define SYS_shutdown 48
#define SYS_bind 49
#define SYS_listen 50
#define SYS_chdir 80
#define SYS_mkdir 83
#define SYS_unlink 87
#define SYS_symlink 88
#define SYS_chmod 90
#define SYS_fchmod 91
#define SYS_chown 92
#define SYS_fchown 93
#define SYS_lchown 94
#define SYS_umask 95
#define SYS_rename 82
#define SYS_mount 165
#define SYS_reboot 169
#define SYS_sync 162
#define SYS_getpid 39
#define SYS_getppid 110
#define SYS_pause 34
#define SYS_clock_settime 227
#define SYS_exit_group 231
#define SYS_utimensat 280

#define AF_INET 2
#define AF_VSOCK 40
#define SOCK_STREAM 1
#define SHUT_WR 1
#define POLLIN 1
#define POLLHUP 0x10
#define EINTR 4
#define EEXIST 17
#define EFBIG 27
#define VMADDR_CID_ANY 0xffffffffu

#define MS_RDONLY 1
#define MS_NOSUID 2
#define MS_NODEV 4
#define MS_NOEXEC 8
#define MS_SYNCHRONOUS 16
#define MS_NOATIME 1024
#define MS_NODIRATIME 2048
#define MS_RELATIME (1 << 21)
#define MS_STRICTATIME (1 << 24)

#define O_RDONLY 00
#define O_WRONLY 01
#define O_RDWR 02
#define O_CREAT 0100
#define O_EXCL 0200
#define O_NOCTTY 0400
#define O_NONBLOCK 04000
#define O_NOFOLLOW 0400000
#define O_CLOEXEC 02000000
#define O_SYNC 04010000
#define PROT_READ 1
#define PROT_WRITE 2
#define MAP_SHARED 1
#define AT_FDCWD (-100)
#define AT_SYMLINK_NOFOLLOW 0x100
#define TCSBRK 0x5409
#define TCGETS 0x5401
#define TCSETSW 0x5403
#define OPOST 1
#define LINUX_REBOOT_MAGIC1 0xfee1deadu
#define LINUX_REBOOT_MAGIC2 672274793
#define LINUX_REBOOT_CMD_RESTART 0x01234567
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedc
#define IOCTL_VM_SOCKETS_GET_LOCAL_CID 0x7b9

#define S_IFMT 0170000
#define S_IFDIR 0040000
#define S_IFREG 0100000
#define S_IFLNK 0120000

// ember's exit device (src/devices/legacy/exit_device.rs): status register at offset 0,
// "ready" register at offset 4.
#define EXIT_DEVICE_PAGE 0xc0001000ul
#define EXIT_DEVICE_READY 4
// The boot-timer register (src/devices/legacy/boot_timer.rs; Firecracker's address and
// value).
#define BOOT_TIMER_PAGE 0xc0000000ul
#define BOOT_TIMER_VALUE 123

// struct termios as the kernel's TCGETS/TCSETS* use it (asm-generic/termbits.h).
struct termios {
	u32 c_iflag, c_oflag, c_cflag, c_lflag;
	unsigned char c_line;
	unsigned char c_cc[19];
};

struct sockaddr_vm {
	u16 svm_family;
	u16 svm_reserved1;
	u32 svm_port;
	u32 svm_cid;
	unsigned char svm_flags;
	unsigned char svm_zero[3];
};

struct sockaddr_in {
	u16 sin_family;
	u16 sin_port;
	u32 sin_addr;
	unsigned char sin_zero[8];
};

struct pollfd {
	int fd;
	short events;
	short revents;
};

static i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f)
{
	i64 ret;
	register i64 r10 __asm__("r10") = d;
	register i64 r8 __asm__("r8") = e;
	register i64 r9 __asm__("r9") = f;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}
#define sys3(n, a, b, c) sys6(n, (i64)(a), (i64)(b), (i64)(c), 0, 0, 0)

static u64 slen(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return n;
}

// Names of the errors this tool is likely to meet, for the message.
static const char *errname(u64 e)
{
	switch (e) {
	case 1: return "EPERM";
	case 2: return "ENOENT";
	case 5: return "EIO";
	case 9: return "EBADF";
	case 12: return "ENOMEM";
	case 13: return "EACCES";
	case 17: return "EEXIST";
	case 19: return "ENODEV";
	case 20: return "ENOTDIR";
	case 21: return "EISDIR";
	case 22: return "EINVAL";
	case 28: return "ENOSPC";
	case 30: return "EROFS";
	case 32: return "EPIPE";
	case 36: return "ENAMETOOLONG";
	case 39: return "ENOTEMPTY";
	case 40: return "ELOOP";
	case 97: return "EAFNOSUPPORT";
	case 98: return "EADDRINUSE";
	case 104: return "ECONNRESET";
	case 110: return "ETIMEDOUT";
	case 111: return "ECONNREFUSED";
	}
	return 0;
}

static void puts2(const char *s)
{
	sys3(SYS_write, 2, s, slen(s));
}

// "vsock-io: WHAT[ NAME][: error N (ENAME)]" on stderr (no error part when err is 0), then
// exit 1.
static void die_at(const char *what, const char *name, i64 err)
{
	char num[24];
	int i = sizeof(num);
	u64 e = (u64)(err < 0 ? -err : err);
	const char *en = errname(e);
	num[--i] = 0;
	do {
		num[--i] = (char)('0' + e % 10);
		e /= 10;
	} while (e);
	puts2("vsock-io: ");
	puts2(what);
	if (name) {
		puts2(" ");
		puts2(name);
	}
	if (err) {
		puts2(": error ");
		puts2(num + i);
		if (en) {
			puts2(" (");
			puts2(en);
			puts2(")");
		}
	}
	puts2("\n");
	sys3(SYS_exit_group, 1, 0, 0);
	for (;;)
		;
}

static void die(const char *what, i64 err)
{
	die_at(what, 0, err);
}

static u32 num(const char *s)
{
	const char *p = s;
	u64 v = 0;
	if (!*p)
		die_at("not a decimal number:", "(empty)", 0);
	for (; *p; p++) {
		if (*p < '0' || *p > '9')
			die_at("not a decimal number:", s, 0);
		v = v * 10 + (u64)(*p - '0');
		if (v > 0xffffffffu)
			die_at("number too large (at most 4294967295):", s, 0);
	}
	return (u32)v;
}

static void write_all(int fd, const char *p, i64 n)
{
	while (n > 0) {
		i64 w = sys3(SYS_write, fd, p, n);
		if (w == -EINTR)
			continue;
		if (w <= 0)
			die("write", w);
		p += w;
		n -= w;
	}
}

// Copies FD to stdout until its end; a failed read ends the process ("read NAME: ...").
static void copy_to_stdout(i64 fd, const char *name)
{
	char b[4096];
	for (;;) {
		i64 n = sys3(SYS_read, fd, b, sizeof(b));
		if (n == -EINTR)
			continue;
		if (n < 0)
			die_at("read", name, n);
		if (n == 0)
			break;
		write_all(1, b, n);
	}
}

// Reads all of PATH into BUF (at most CAP - 1 bytes) and ends it with a NUL. Returns its
// length, or a negative errno with *STEP naming the step that failed ("open", "read"), or
// -EFBIG when the file does not fit.
static i64 read_small_file(const char *path, char *buf, u64 cap, const char **step)
{
	i64 fd, n = 0;
	u64 len = 0;
	*step = "open";
	fd = sys3(SYS_open, path, O_RDONLY | O_CLOEXEC, 0);
	if (fd < 0)
		return fd;
	*step = "read";
	while (len < cap - 1 && (n = sys3(SYS_read, fd, buf + len, cap - 1 - len)) > 0)
		len += (u64)n;
	sys3(SYS_close, fd, 0, 0);
	if (n < 0)
		return n;
	if (len == cap - 1)
		return -EFBIG;
	buf[len] = 0;
	return (i64)len;
}

static int vsock(void)
{
	i64 s = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0)
		die("socket(AF_VSOCK)", s);
	return (int)s;
}

static int do_connect(u32 cid, u32 port)
{
	struct sockaddr_vm a = { AF_VSOCK, 0, port, cid, 0, { 0, 0, 0 } };
	int s = vsock();
	i64 r = sys3(SYS_connect, s, &a, sizeof(a));
	if (r < 0)
		die("connect", r);
	return s;
}

static int do_listen(u32 port)
{
	struct sockaddr_vm a = { AF_VSOCK, 0, port, VMADDR_CID_ANY, 0, { 0, 0, 0 } };
	int s = vsock();
	i64 r = sys3(SYS_bind, s, &a, sizeof(a));
	if (r < 0)
		die("bind", r);
	r = sys3(SYS_listen, s, 8, 0);
	if (r < 0)
		die("listen", r);
	return s;
}

static int do_accept(int l)
{
	i64 c;
	do
		c = sys3(SYS_accept, l, 0, 0);
	while (c == -EINTR);
	if (c < 0)
		die("accept", c);
	return (int)c;
}

static char buf[64 * 1024];

// stdin -> s, s -> stdout, until s reaches EOF.
static void relay(int s)
{
	struct pollfd p[2] = { { s, POLLIN, 0 }, { 0, POLLIN, 0 } };
	int nfds = 2;
	for (;;) {
		i64 r = sys3(SYS_poll, p, nfds, -1);
		if (r == -EINTR)
			continue;
		if (r < 0)
			die("poll", r);
		if (p[0].revents & (POLLIN | POLLHUP)) {
			i64 n = sys3(SYS_read, s, buf, sizeof(buf));
			if (n < 0)
				die("read socket", n);
			if (n == 0)
				return;
			write_all(1, buf, n);
		}
		if (nfds == 2 && (p[1].revents & (POLLIN | POLLHUP))) {
			i64 n = sys3(SYS_read, 0, buf, sizeof(buf));
			if (n < 0)
				die("read stdin", n);
			if (n == 0) {
				sys3(SYS_shutdown, s, SHUT_WR, 0);
				nfds = 1;
			} else {
				write_all(s, buf, n);
			}
		}
	}
}

static void echo(int c)
{
	for (;;) {
		i64 n = sys3(SYS_read, c, buf, sizeof(buf));
		if (n == -EINTR)
			continue;
		if (n < 0)
			die("read", n);
		if (n == 0)
			break;
		write_all(c, buf, n);
	}
	sys3(SYS_shutdown, c, SHUT_WR, 0);
	// Wait for the peer to close, so nothing is cut off.
	while (sys3(SYS_read, c, buf, sizeof(buf)) > 0)
		;
	sys3(SYS_close, c, 0, 0);
}

static void send_mib(int s, u32 mib)
{
	u64 i;
	for (i = 0; i < sizeof(buf); i++)
		buf[i] = (char)(i * 7 + 1);
	for (i = 0; i < (u64)mib * 16; i++)
		write_all(s, buf, sizeof(buf));
	sys3(SYS_shutdown, s, SHUT_WR, 0);
	while (sys3(SYS_read, s, buf, sizeof(buf)) > 0)
		;
}

static int tcp_connect(const char *ip, u32 port)
{
	struct sockaddr_in a = { AF_INET, 0, 0, { 0 } };
	u32 addr = 0, part = 0, dots = 0;
	const char *p;
	i64 s, r;
	for (p = ip; *p; p++) {
		if (*p == '.') {
			addr = addr << 8 | part;
			part = 0;
			dots++;
		} else if (*p >= '0' && *p <= '9') {
			part = part * 10 + (u32)(*p - '0');
		} else {
			die("bad IPv4 address", 22);
		}
		if (part > 255)
			die("bad IPv4 address", 22);
	}
	if (dots != 3)
		die("bad IPv4 address", 22);
	addr = addr << 8 | part;
	a.sin_port = (u16)((port >> 8 & 0xff) | (port & 0xff) << 8);
	a.sin_addr = (addr >> 24) | (addr >> 8 & 0xff00) | (addr << 8 & 0xff0000) | (addr << 24);
	s = sys3(SYS_socket, AF_INET, SOCK_STREAM, 0);
	if (s < 0)
		die("socket(AF_INET)", s);
	r = sys3(SYS_connect, s, &a, sizeof(a));
	if (r < 0)
		die("connect", r);
	return (int)s;
}

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

// ---- job: ember's warm exec ------------------------------------------------------------

// job and warm store to guest-physical memory through /dev/mem: on anything but an ember
// guest started for warm exec, 0xC000_1000 may be some device's registers. So they refuse
// to run unless the kernel command line has an `ember.warm=` word (ember puts it there).
static void check_ember_warm(void)
{
	static char cmdline[4096];
	static const char key[] = "ember.warm=";
	i64 fd = sys3(SYS_open, "/proc/cmdline", O_RDONLY | O_CLOEXEC, 0), n;
	u64 i, k;
	if (fd < 0)
		die("open /proc/cmdline", fd);
	n = sys3(SYS_read, fd, cmdline, sizeof(cmdline) - 1);
	if (n < 0)
		die("read /proc/cmdline", n);
	sys3(SYS_close, fd, 0, 0);
	for (i = 0; i < (u64)n; i++) {
		if (i > 0 && cmdline[i - 1] != ' ')
			continue;
		for (k = 0; key[k] && i + k < (u64)n && cmdline[i + k] == key[k]; k++)
			;
		if (!key[k])
			return;
	}
	die("not an ember warm-exec guest (no ember.warm= on the kernel command line): "
	    "refusing to write to physical address 0xc0001000 through /dev/mem",
	    0);
}

// Maps one page of guest-physical memory at ADDR through /dev/mem (CONFIG_DEVMEM without
// STRICT_DEVMEM; O_SYNC maps it uncached). Returns the address, or a negative errno with
// *step naming what failed; never exits (`end` uses it as process 1).
static i64 phys_page(u64 addr, const char **step)
{
	i64 p, fd = sys3(SYS_open, "/dev/mem", O_RDWR | O_SYNC | O_CLOEXEC, 0);
	if (fd < 0) {
		*step = "open /dev/mem for";
		return fd;
	}
	p = sys6(SYS_mmap, 0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (i64)addr);
	sys3(SYS_close, fd, 0, 0);
	if (p < 0 && p > -4096)
		*step = "mmap /dev/mem for";
	return p;
}

// phys_page(), or the process ends with a message naming WHAT was to be mapped.
static volatile unsigned char *map_phys_page(u64 addr, const char *what)
{
	const char *step = "";
	i64 p = phys_page(addr, &step);
	if (p < 0 && p > -4096)
		die_at(step, what, p);
	return (volatile unsigned char *)p;
}

// Maps the page of ember's exit device for 32-bit stores to its registers.
static volatile u32 *map_exit_device(void)
{
	check_ember_warm();
	return (volatile u32 *)map_phys_page(EXIT_DEVICE_PAGE, "the exit device (0xc0001000)");
}

// tcdrain(): waits until everything written to the tty FD has been sent.
static i64 drain(i64 fd)
{
	i64 e;
	do
		e = sys3(SYS_ioctl, fd, TCSBRK, 1);
	while (e == -EINTR);
	return e;
}

// Tells the VMM that PORT is listening: a 4-byte store of PORT to the exit device's "ready"
// register. ember snapshots the guest there: everything this process and init do
// afterwards is paid again by every restored VM, everything before it only once.
static void tell_ready(volatile u32 *exit_dev, u32 port)
{
	exit_dev[EXIT_DEVICE_READY / 4] = port;
}

// A buffered reader over a file descriptor (the archive comes in pieces of any size).
struct in {
	int fd;
	u64 pos, len;
	u64 total; // bytes consumed, for messages
};

// Refills the buffer; 0 at EOF.
static i64 fill(struct in *r)
{
	i64 n;
	do
		n = sys3(SYS_read, r->fd, buf, sizeof(buf));
	while (n == -EINTR);
	if (n < 0)
		die("read the archive", n);
	r->pos = 0;
	r->len = (u64)n;
	return n;
}

// The next up to `want` buffered bytes (at least one), or dies at EOF.
static const char *take(struct in *r, u64 want, u64 *got)
{
	const char *p;
	if (r->pos == r->len && fill(r) == 0)
		die("the archive ends early (truncated, or no TRAILER!!! entry)", 0);
	*got = r->len - r->pos < want ? r->len - r->pos : want;
	p = buf + r->pos;
	r->pos += *got;
	r->total += *got;
	return p;
}

static void get(struct in *r, char *dst, u64 n)
{
	while (n) {
		u64 got, i;
		const char *p = take(r, n, &got);
		for (i = 0; i < got; i++)
			dst[i] = p[i];
		dst += got;
		n -= got;
	}
}

// Skips the zero padding that aligns the archive to four bytes.
static void align4(struct in *r)
{
	char pad[4];
	get(r, pad, (4 - (r->total & 3)) & 3);
}

static u32 hex8(const char *h)
{
	u32 v = 0;
	int i;
	for (i = 0; i < 8; i++) {
		char c = h[i];
		u32 d;
		if (c >= '0' && c <= '9')
			d = (u32)(c - '0');
		else if (c >= 'a' && c <= 'f')
			d = (u32)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			d = (u32)(c - 'A' + 10);
		else
			die("bad newc header (a field is not hexadecimal)", 0);
		v = v << 4 | d;
	}
	return v;
}

// A name the archive may create: not empty, not absolute, no ".." component. (Links along a
// name are followed, as by the kernel's initramfs unpacker: the archive comes from the VMM.)
static int safe_name(const char *n)
{
	const char *c = n;
	if (!*n || *n == '/')
		return 0;
	for (;;) {
		const char *e = c;
		while (*e && *e != '/')
			e++;
		if (e - c == 2 && c[0] == '.' && c[1] == '.')
			return 0;
		if (!*e)
			return 1;
		c = e + 1;
	}
}

static char name[4096];
static char target[4096];

// Creates a regular file, replacing (never writing through) whatever non-directory is there.
static int create_file(const char *n, u32 mode)
{
	i64 fd = sys3(SYS_open, n, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
	if (fd == -EEXIST) {
		i64 u = sys3(SYS_unlink, n, 0, 0);
		if (u < 0)
			die_at("replace", n, u);
		fd = sys3(SYS_open, n, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
	}
	if (fd < 0)
		die_at("create", n, fd);
	return (int)fd;
}

// Unpacks a newc archive (magic 070701, or 070702 whose checksums are not checked) from r
// into the current directory, up to its TRAILER!!! entry. Like the kernel's initramfs
// unpacker: a directory that exists keeps its contents and gets the archive's mode and
// owner; a file or link replaces what is at its name. Directory mtimes are left alone (the
// kernel sets them; ember's archives carry 0 for every directory). Hard links are not
// recognised: every entry is a file of its own, with the data its header announces (ember's
// archives have no hard links).
static void unpack(struct in *r)
{
	char h[110];
	for (;;) {
		u32 mode, uid, gid, mtime, size, nsize;
		u64 left;
		i64 e = 0;
		struct {
			i64 atime_s, atime_ns, mtime_s, mtime_ns;
		} ts;
		get(r, h, sizeof(h));
		if (h[0] != '0' || h[1] != '7' || h[2] != '0' || h[3] != '7' || h[4] != '0' ||
		    (h[5] != '1' && h[5] != '2'))
			die("not a newc cpio archive (bad magic)", 0);
		mode = hex8(h + 14);
		uid = hex8(h + 22);
		gid = hex8(h + 30);
		mtime = hex8(h + 46);
		size = hex8(h + 54);
		nsize = hex8(h + 94);
		if (nsize < 2 || nsize > sizeof(name))
			die("bad newc header (name size)", 0);
		get(r, name, nsize);
		align4(r);
		if (name[nsize - 1] || slen(name) != nsize - 1)
			die("bad newc header (name not NUL-terminated)", 0);
		if (streq(name, "TRAILER!!!"))
			return;
		if (!safe_name(name))
			die_at("refusing the archive name (empty, absolute, or with a .. component):",
			       name, 0);
		ts.atime_s = ts.mtime_s = mtime;
		ts.atime_ns = ts.mtime_ns = 0;
		switch (mode & S_IFMT) {
		case S_IFDIR:
			if (size)
				die_at("bad newc header (directory with data):", name, 0);
			if (streq(name, "."))
				break;
			e = sys3(SYS_mkdir, name, mode & 07777, 0);
			if (e == -EEXIST)
				e = sys3(SYS_chmod, name, mode & 07777, 0);
			if (e < 0)
				die_at("mkdir", name, e);
			if ((uid || gid) && (e = sys3(SYS_chown, name, uid, gid)) < 0)
				die_at("chown", name, e);
			break;
		case S_IFREG: {
			int fd = create_file(name, mode & 07777);
			left = size;
			while (left) {
				u64 got;
				const char *p = take(r, left, &got);
				i64 w;
				while (got) {
					w = sys3(SYS_write, fd, p, got);
					if (w == -EINTR)
						continue;
					if (w <= 0)
						die_at("write", name, w);
					p += w;
					got -= (u64)w;
					left -= (u64)w;
				}
			}
			// chown clears set-id bits: chmod after it.
			if ((uid || gid) && (e = sys3(SYS_fchown, fd, uid, gid)) < 0)
				die_at("chown", name, e);
			if ((mode & 07000) && (e = sys3(SYS_fchmod, fd, mode & 07777, 0)) < 0)
				die_at("chmod", name, e);
			e = sys6(SYS_utimensat, fd, 0, (i64)&ts, 0, 0, 0);
			if (e < 0)
				die_at("set the mtime of", name, e);
			sys3(SYS_close, fd, 0, 0);
			break;
		}
		case S_IFLNK:
			if (size == 0 || size >= sizeof(target))
				die_at("bad newc header (symlink target size):", name, 0);
			get(r, target, size);
			target[size] = 0;
			if (slen(target) != size)
				die_at("bad symlink target (NUL byte):", name, 0);
			e = sys3(SYS_symlink, target, name, 0);
			if (e == -EEXIST) {
				e = sys3(SYS_unlink, name, 0, 0);
				if (e < 0)
					die_at("replace", name, e);
				e = sys3(SYS_symlink, target, name, 0);
			}
			if (e < 0)
				die_at("symlink", name, e);
			if ((uid || gid) && (e = sys3(SYS_lchown, name, uid, gid)) < 0)
				die_at("chown", name, e);
			e = sys6(SYS_utimensat, AT_FDCWD, (i64)name, (i64)&ts, AT_SYMLINK_NOFOLLOW,
				 0, 0);
			if (e < 0)
				die_at("set the mtime of", name, e);
			break;
		default:
			die_at("unsupported file type (only directories, regular files and "
			       "symlinks):",
			       name, 0);
		}
		align4(r);
	}
}

// Enters DIR and makes modes exact (no umask) for unpack().
static void enter(const char *dir)
{
	i64 e = sys3(SYS_chdir, dir, 0, 0);
	if (e < 0)
		die_at("chdir", dir, e);
	sys3(SYS_umask, 0, 0, 0);
}

// Without a virtio-vsock device the guest kernel still lets a socket bind and listen, and
// nothing could ever connect: say so instead of telling the VMM "ready". /dev/vsock's
// IOCTL_VM_SOCKETS_GET_LOCAL_CID gives VMADDR_CID_ANY then. (No /dev/vsock: not checked.)
static void check_vsock_device(void)
{
	u32 cid = 0;
	i64 fd = sys3(SYS_open, "/dev/vsock", O_RDONLY | O_CLOEXEC, 0), e;
	if (fd < 0)
		return;
	e = sys3(SYS_ioctl, fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid);
	sys3(SYS_close, fd, 0, 0);
	if (e == 0 && cid == VMADDR_CID_ANY)
		die("this VM has no vsock device (its local CID is unknown): nothing could connect",
		    0);
}

// Listens on vsock `port`, tells the VMM it is ready, accepts one connection and closes the
// listener (later connections are refused).
static int job_accept(volatile u32 *exit_dev, u32 port)
{
	int l, c;
	check_vsock_device();
	l = do_listen(port);
	tell_ready(exit_dev, port);
	c = do_accept(l);
	sys3(SYS_close, l, 0, 0);
	return c;
}

// Reads the job header, `EMBERJOB1 SECS NSECS\n` (ember's src/exec/warm.rs: the host's
// wall-clock time when it sent the job), and sets the guest's CLOCK_REALTIME to it: a guest
// restored from a snapshot would otherwise read the time the snapshot was taken. A clock
// that cannot be set is reported and left alone; a header that is not ember's is fatal.
static void job_header(struct in *r)
{
	static const char magic[] = "EMBERJOB1 ";
	char line[64];
	u64 n = 0, i;
	struct {
		i64 sec, nsec;
	} ts = { 0, 0 };
	i64 *field = &ts.sec, e;
	for (;;) {
		if (n == sizeof(line))
			die("bad job header (too long)", 0);
		get(r, line + n, 1);
		if (line[n++] == '\n')
			break;
	}
	for (i = 0; i < sizeof(magic) - 1; i++)
		if (i >= n || line[i] != magic[i])
			die("not an ember job (bad header): is the host ember?", 0);
	for (; i < n - 1; i++) {
		if (line[i] == ' ' && field == &ts.sec)
			field = &ts.nsec;
		else if (line[i] >= '0' && line[i] <= '9')
			*field = *field * 10 + (line[i] - '0');
		else
			die("bad job header (not SECS NSECS)", 0);
	}
	// The header's bytes are not part of the archive (its 4-byte alignment counts from
	// after them).
	r->total = 0;
	e = sys3(SYS_clock_settime, 0 /* CLOCK_REALTIME */, &ts, 0);
	if (e < 0) {
		puts2("vsock-io: cannot set the clock to the host's time (clock_settime: ");
		puts2(errname((u64)-e));
		puts2(")\n");
	}
}

// Unpacks the archive that connection c carries (after its header) into the current
// directory, reads on to the host's EOF (anything after the trailer is ignored) and closes c.
static void job_unpack(int c)
{
	struct in r = { c, 0, 0, 0 };
	job_header(&r);
	unpack(&r);
	while (fill(&r) > 0)
		;
	sys3(SYS_close, c, 0, 0);
}

// `job PORT [DIR]`.
static void job(u32 port, const char *dir)
{
	volatile u32 *exit_dev;
	int c;
	if (dir)
		enter(dir);
	exit_dev = map_exit_device();
	c = job_accept(exit_dev, port);
	sys3(SYS_munmap, exit_dev, 4096, 0);
	if (dir) {
		job_unpack(c);
		return;
	}
	{
		struct in r = { c, 0, 0, 0 };
		job_header(&r);
		write_all(1, buf + r.pos, (i64)(r.len - r.pos));
	}
	copy_to_stdout(c, "the socket");
	sys3(SYS_close, c, 0, 0);
}

// `warm PORT DIR [TTY...]`: the default guest's init side of warm exec (resources/guest/init,
// 4b). Everything a restored VM would otherwise pay for in processes after the archive's
// arrival is prepared before the "ready" store: the exit device is mapped, the ttys are
// opened, and init's process for the command is forked (init says "go\n" on fd 4 when it
// is). Then `job PORT DIR`; then "ok\n" on fd 3 (init waits for it; if this process
// dies first, init reads EOF instead), then one decimal status line from fd 4 (written by
// init when the command has ended), tcdrain() on every TTY, and the status stored to the
// exit device's status register: init needs no stty and no devmem process.
// Reads one line (at most sizeof(line) - 1 bytes, without its newline) from fd into line;
// its length (0: EOF before anything).
static u64 read_line(int fd, char *line, u64 cap, const char *what)
{
	u64 len = 0;
	for (;;) {
		i64 n = sys3(SYS_read, fd, line + len, 1);
		if (n == -EINTR)
			continue;
		if (n < 0)
			die(what, n);
		if (n == 0 || line[len] == '\n')
			break;
		if (++len == cap - 1)
			break;
	}
	line[len] = 0;
	return len;
}

// Mounts the shared directories of a warm job (ember/mounts, relative to the unpack
// directory: "ro|rw TAG PATH" lines, the path last) with mount(2), and renames the file to
// ember/mounts.done, so that the command's process does not start a `mount` process per share
// (each costs hundreds of milliseconds in an emulated guest kernel). On any failure it stops
// and leaves the file: init then mounts them itself and reports what went wrong.
static char mounts[8192];
static void mount_shares(void)
{
	const char *step;
	i64 n = read_small_file("ember/mounts", mounts, sizeof(mounts), &step);
	u64 len, i, start;
	if (n < 0)
		return;
	len = (u64)n;
	for (start = 0; start < len; start = i + 1) {
		char *line = mounts + start, *tag, *path, *p;
		u64 flags;
		for (i = start; i < len && mounts[i] != '\n'; i++)
			;
		mounts[i] = 0;
		if (!*line)
			continue;
		tag = line;
		while (*tag && *tag != ' ')
			tag++;
		if (!*tag)
			return;
		*tag++ = 0;
		path = tag;
		while (*path && *path != ' ')
			path++;
		if (!*path)
			return;
		*path++ = 0;
		if (streq(line, "ro"))
			flags = MS_RDONLY;
		else if (streq(line, "rw"))
			flags = 0;
		else
			return;
		if (path[0] != '/')
			return;
		// mkdir -p PATH
		for (p = path + 1;; p++) {
			if (*p == '/' || !*p) {
				char c = *p;
				i64 e;
				*p = 0;
				e = sys3(SYS_mkdir, path, 0755, 0);
				*p = c;
				if (e < 0 && e != -EEXIST)
					return;
				if (!c)
					break;
			}
		}
		if (sys6(SYS_mount, (i64)tag, (i64)path, (i64)"virtiofs", (i64)flags, 0, 0) < 0)
			return;
	}
	sys3(SYS_rename, (i64)"ember/mounts", (i64)"ember/mounts.done", 0);
}

static void warm(u32 port, const char *dir, int ntty, char **ttys)
{
	static int tty_fd[8];
	volatile u32 *exit_dev;
	char line[16];
	u64 len = 0;
	u32 status = 0;
	int i;
	if (ntty > 8)
		die_at("too many ttys (at most 8):", ttys[8], 0);
	enter(dir);
	for (i = 0; i < ntty; i++) {
		i64 fd = sys3(SYS_open, ttys[i], O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, 0);
		if (fd < 0)
			die_at("open", ttys[i], fd);
		tty_fd[i] = (int)fd;
	}
	exit_dev = map_exit_device();
	// init says "go" once the command's process is forked and waiting (so that the
	// snapshot, taken at the ready write, already holds it: no fork after a restore).
	read_line(4, line, sizeof(line), "read \"go\" from fd 4");
	if (!streq(line, "go"))
		die("init did not say \"go\" on fd 4", 0);
	job_unpack(job_accept(exit_dev, port));
	mount_shares();
	write_all(3, "ok\n", 3);
	sys3(SYS_close, 3, 0, 0);
	len = read_line(4, line, sizeof(line), "read the status from fd 4");
	if (len == 0)
		die("no status on fd 4 (init closed it)", 0);
	status = num(line);
	for (i = 0; i < ntty; i++) {
		i64 e = drain(tty_fd[i]);
		if (e < 0)
			die_at("drain (tcdrain)", ttys[i], e);
	}
	exit_dev[0] = status;
}

// ---- boot-timer, opost-off, end: init's steps without a busybox process each -----------
//
// Each process costs a fork, an exec and an exit of emulated kernel code in a PVM guest;
// with busybox (2 MB, libc start-up) about twice what this binary costs, and `end` replaces
// four of them (stty, stty, devmem, poweroff) at the end of every exec.

// /proc/cmdline to stdout.
static void copy_cmdline(void)
{
	i64 fd = sys3(SYS_open, "/proc/cmdline", O_RDONLY | O_CLOEXEC, 0);
	if (fd < 0)
		die_at("open", "/proc/cmdline", fd);
	copy_to_stdout(fd, "/proc/cmdline");
}

// Only for init: on any other machine 0xC000_0000 may be some device's registers, so a
// process whose parent is not process 1 is refused (init runs it directly): it ends with
// status 2 and a message naming CMD.
static void require_init_child(const char *cmd)
{
	if (sys3(SYS_getppid, 0, 0, 0) != 1) {
		puts2("vsock-io: ");
		puts2(cmd);
		puts2(": only init (process 1) may run this\n");
		sys3(SYS_exit_group, 2, 0, 0);
	}
}

// The boot-timer event: an 8-bit store to its register. When the page cannot be mapped,
// STRICT ends the process with a message; otherwise the event is skipped.
static void write_boot_timer(int strict)
{
	const char *step = "";
	i64 p = phys_page(BOOT_TIMER_PAGE, &step);
	if (p < 0 && p > -4096) {
		if (strict)
			die_at(step, "the boot timer (0xc0000000)", p);
		return;
	}
	*(volatile unsigned char *)p = BOOT_TIMER_VALUE;
}

static void boot_timer(int print_cmdline)
{
	require_init_child("boot-timer");
	write_boot_timer(1);
	if (print_cmdline)
		copy_cmdline();
}

// ---- start: init's first step ------------------------------------------------------------
//
// `mount -a` by busybox costs a fork, an exec of the 2 MB binary and an exit: ~0.35 s of a
// ~5 s boot on a PVM host. The boot-timer process, which init starts anyway, mounts the
// same entries first (the boot timer needs /dev/mem, the command line /proc).

static int is_blank(char c)
{
	return c == ' ' || c == '\t';
}

// Mounts one fstab entry. The mount flags among OPTS become flags, the other options the
// filesystem's data string; "noauto" skips the entry. Errors are left for init to notice
// (as `mount -a 2>/dev/null` left them): on a disk root the kernel has mounted devtmpfs
// already (EBUSY).
static void mount_entry(const char *spec, const char *dir, const char *type, char *opts)
{
	static const struct {
		const char *name;
		u64 flag;
	} known[] = {
		{ "defaults", 0 },	 { "rw", 0 },		     { "auto", 0 },
		{ "ro", MS_RDONLY },	 { "nosuid", MS_NOSUID },    { "nodev", MS_NODEV },
		{ "noexec", MS_NOEXEC }, { "sync", MS_SYNCHRONOUS }, { "noatime", MS_NOATIME },
		{ "nodiratime", MS_NODIRATIME }, { "relatime", MS_RELATIME },
		{ "strictatime", MS_STRICTATIME },
	};
	char data[512];
	u64 flags = 0, dl = 0, i;
	char *o = opts;
	while (*o) {
		char *e = o, save;
		int found = 0;
		while (*e && *e != ',')
			e++;
		save = *e;
		*e = 0;
		if (streq(o, "noauto"))
			return;
		for (i = 0; i < sizeof(known) / sizeof(known[0]); i++) {
			if (streq(o, known[i].name)) {
				flags |= known[i].flag;
				found = 1;
			}
		}
		if (!found && *o) {
			u64 l = slen(o);
			if (dl + l + 2 > sizeof(data)) {
				puts2("vsock-io: start: mount options too long for ");
				puts2(dir);
				puts2("\n");
				return;
			}
			if (dl)
				data[dl++] = ',';
			for (i = 0; i < l; i++)
				data[dl++] = o[i];
		}
		o = save ? e + 1 : e;
	}
	data[dl] = 0;
	sys6(SYS_mount, (i64)spec, (i64)dir, (i64)type, flags, dl ? (i64)data : 0, 0);
}

static void start(const char *fstab)
{
	char buf[8192];
	char *p, *f[4];
	const char *step;
	i64 n;
	int k;
	require_init_child("start");
	n = read_small_file(fstab, buf, sizeof(buf), &step);
	if (n == -EFBIG)
		die_at("read (larger than 8 KiB)", fstab, 0);
	if (n < 0)
		die_at(step, fstab, n);
	for (p = buf; *p;) {
		// One line: up to four blank-separated fields; '#' starts a comment line.
		for (k = 0; k < 4; k++)
			f[k] = 0;
		for (k = 0; *p && *p != '\n';) {
			while (is_blank(*p))
				p++;
			if (!*p || *p == '\n')
				break;
			if (k == 0 && *p == '#')
				k = -1;
			if (k >= 0 && k < 4)
				f[k] = p;
			if (k >= 0)
				k++;
			while (*p && *p != '\n' && !is_blank(*p))
				p++;
			if (is_blank(*p))
				*p++ = 0;
		}
		if (*p == '\n')
			*p++ = 0;
		if (k >= 3)
			mount_entry(f[0], f[1], f[2], f[3] ? f[3] : "defaults");
	}
	// The boot timer at best effort (a kernel without /dev/mem has none; init's old
	// `devmem ... 2>/dev/null` did not mind either), then the command line, which init
	// needs: without it init does every step again the busybox way.
	write_boot_timer(0);
	copy_cmdline();
}

static void opost_off(int ntty, char **ttys)
{
	int i;
	for (i = 0; i < ntty; i++) {
		struct termios t;
		i64 e, fd = sys3(SYS_open, ttys[i], O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, 0);
		if (fd < 0)
			die_at("open", ttys[i], fd);
		e = sys3(SYS_ioctl, fd, TCGETS, (i64)&t);
		if (e < 0)
			die_at("tcgetattr", ttys[i], e);
		t.c_oflag &= ~(u32)OPOST;
		do
			e = sys3(SYS_ioctl, fd, TCSETSW, (i64)&t); // tcsetattr(TCSADRAIN), as stty
		while (e == -EINTR);
		if (e < 0)
			die_at("tcsetattr", ttys[i], e);
		sys3(SYS_close, fd, 0, 0);
	}
}

// Parses a decimal u32 without dying (for `end`, which must not exit); -1 if it is not one.
static i64 parse_u32(const char *s)
{
	u64 v = 0;
	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		v = v * 10 + (u64)(*s - '0');
		if (v > 0xffffffffu)
			return -1;
	}
	return (i64)v;
}

// Never returns, and never exits: as process 1, exiting would panic the kernel. Every
// failure is reported and skipped; a failed reboot(2) leaves the process waiting, as
// init's own fallback (`while :; do sleep 3600; done`) did.
static void end(const char *status, const char *how, int ntty, char **ttys)
{
	i64 value = -1;
	int i, poweroff = streq(how, "poweroff");
	if (sys3(SYS_getpid, 0, 0, 0) != 1) {
		puts2("vsock-io: end: only init (process 1) may end the machine\n");
		sys3(SYS_exit_group, 2, 0, 0);
	}
	if (!poweroff && !streq(how, "reboot"))
		puts2("vsock-io: end: expected poweroff or reboot; rebooting\n");
	if (!streq(status, "-")) {
		value = parse_u32(status);
		if (value < 0)
			puts2("vsock-io: end: the status is not a decimal number; not reported\n");
	}
	for (i = 0; i < ntty; i++) {
		i64 fd = sys3(SYS_open, ttys[i], O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, 0);
		if (fd < 0)
			continue;
		drain(fd);
		sys3(SYS_close, fd, 0, 0);
	}
	if (value >= 0) {
		const char *step = "";
		i64 p = phys_page(EXIT_DEVICE_PAGE, &step);
		if (p < 0 && p > -4096)
			puts2("vsock-io: end: cannot map the exit device; the status is lost\n");
		else
			*(volatile u32 *)p = (u32)value;
	}
	sys3(SYS_sync, 0, 0, 0);
	sys6(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
	     poweroff ? LINUX_REBOOT_CMD_POWER_OFF : LINUX_REBOOT_CMD_RESTART, 0, 0, 0);
	puts2("vsock-io: end: reboot(2) failed; waiting\n");
	for (;;)
		sys3(SYS_pause, 0, 0, 0);
}

static void usage(void)
{
	static const char u[] = "usage: vsock-io connect CID PORT | listen PORT | echo PORT [N] | "
				"send CID PORT MIB | tcp A.B.C.D PORT | tcp-send A.B.C.D PORT MIB | "
				"job PORT [DIR] | warm PORT DIR [TTY...] | boot-timer [cmdline] | start FSTAB | "
				"opost-off TTY... | end STATUS|- poweroff|reboot [TTY...] | unpack DIR\n";
	sys3(SYS_write, 2, u, sizeof(u) - 1);
	sys3(SYS_exit_group, 2, 0, 0);
}

int main(int argc, char **argv)
{
	if (argc >= 4 && streq(argv[1], "connect")) {
		relay(do_connect(num(argv[2]), num(argv[3])));
	} else if (argc >= 3 && streq(argv[1], "listen")) {
		relay(do_accept(do_listen(num(argv[2]))));
	} else if (argc >= 3 && streq(argv[1], "echo")) {
		u32 n = argc >= 4 ? num(argv[3]) : 1;
		int l = do_listen(num(argv[2]));
		while (n--)
			echo(do_accept(l));
	} else if (argc >= 5 && streq(argv[1], "send")) {
		send_mib(do_connect(num(argv[2]), num(argv[3])), num(argv[4]));
	} else if (argc >= 4 && streq(argv[1], "tcp")) {
		relay(tcp_connect(argv[2], num(argv[3])));
	} else if (argc >= 5 && streq(argv[1], "tcp-send")) {
		send_mib(tcp_connect(argv[2], num(argv[3])), num(argv[4]));
	} else if (argc >= 3 && streq(argv[1], "job")) {
		job(num(argv[2]), argc >= 4 ? argv[3] : 0);
	} else if (argc >= 4 && streq(argv[1], "warm")) {
		warm(num(argv[2]), argv[3], argc - 4, argv + 4);
	} else if (argc == 2 && streq(argv[1], "boot-timer")) {
		boot_timer(0);
	} else if (argc == 3 && streq(argv[1], "boot-timer") && streq(argv[2], "cmdline")) {
		boot_timer(1);
	} else if (argc == 3 && streq(argv[1], "start")) {
		start(argv[2]);
	} else if (argc >= 3 && streq(argv[1], "opost-off")) {
		opost_off(argc - 2, argv + 2);
	} else if (argc >= 4 && streq(argv[1], "end")) {
		end(argv[2], argv[3], argc - 4, argv + 4);
	} else if (argc >= 3 && streq(argv[1], "unpack")) {
		struct in r = { 0, 0, 0, 0 };
		enter(argv[2]);
		unpack(&r);
	} else {
		usage();
	}
	return 0;
}

// The entry point: argc at (%rsp), argv after it.
__asm__(".text\n.global _start\n_start:\n"
	"  xor %rbp, %rbp\n"
	"  mov (%rsp), %rdi\n"
	"  lea 8(%rsp), %rsi\n"
	"  and $-16, %rsp\n"
	"  call main\n"
	"  mov %eax, %edi\n"
	"  mov $231, %eax\n"
	"  syscall\n");
