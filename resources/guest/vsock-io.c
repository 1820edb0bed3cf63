// SPDX-License-Identifier: Apache-2.0
// vsock-io: a tiny AF_VSOCK tool for ember's default guest (busybox nc has no vsock).
// Freestanding x86_64 Linux (no libc), so the static binary is a few KiB and costs the
// initramfs almost nothing:
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
// The pattern: 64 KiB blocks whose byte i is (i * 7 + 1) mod 256.
// Exit status 0 on success, 1 on any error (with a message on stderr).

typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;
typedef unsigned short u16;

#define SYS_read 0
#define SYS_write 1
#define SYS_close 3
#define SYS_poll 7
#define SYS_socket 41
#define SYS_connect 42
#define SYS_accept 43
#define SYS_shutdown 48
#define SYS_bind 49
#define SYS_listen 50
#define SYS_exit_group 231

#define AF_INET 2
#define AF_VSOCK 40
#define SOCK_STREAM 1
#define SHUT_WR 1
#define POLLIN 1
#define POLLHUP 0x10
#define EINTR 4
#define VMADDR_CID_ANY 0xffffffffu

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

static void die(const char *what, i64 err)
{
	static const char prefix[] = "vsock-io: ";
	char num[24];
	int i = sizeof(num);
	u64 e = (u64)(err < 0 ? -err : err);
	num[--i] = '\n';
	do {
		num[--i] = (char)('0' + e % 10);
		e /= 10;
	} while (e);
	sys3(SYS_write, 2, prefix, sizeof(prefix) - 1);
	sys3(SYS_write, 2, what, slen(what));
	sys3(SYS_write, 2, ": error ", 8);
	sys3(SYS_write, 2, num + i, sizeof(num) - i);
	sys3(SYS_exit_group, 1, 0, 0);
	for (;;)
		;
}

static u32 num(const char *s)
{
	u64 v = 0;
	if (!*s)
		die("bad number", 22);
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			die("bad number", 22);
		v = v * 10 + (u64)(*s - '0');
		if (v > 0xffffffffu)
			die("number too large", 34);
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

static void usage(void)
{
	static const char u[] = "usage: vsock-io connect CID PORT | listen PORT | echo PORT [N] | "
				"send CID PORT MIB | tcp A.B.C.D PORT | tcp-send A.B.C.D PORT MIB\n";
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
