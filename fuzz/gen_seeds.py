#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/ (small, valid
inputs that reach each target's deep paths: well-formed requests, packets, images and
command lines; the fuzzer mutates from there). Deterministic: run it again after changing
an input layout, and commit the result.

    python3 fuzz/gen_seeds.py
"""

import os
import shutil
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

W = 2  # VRING_DESC_F_WRITE
N = 1  # VRING_DESC_F_NEXT
IND = 4  # VRING_DESC_F_INDIRECT


def seeds(target, items):
    d = os.path.join(ROOT, target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for name, data in items:
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


class Mem:
    """A guest memory image with split virtqueues: queue i at i * 0x400 (descriptors),
    + 0x100 (available ring), + 0x200 (used ring), 16 entries."""

    def __init__(self, queues):
        self.b = bytearray(0x1000 + 0x1000)
        self.queues = queues
        self.next = [0] * queues
        self.avail = [0] * queues

    def put(self, addr, data):
        if addr + len(data) > len(self.b):
            self.b.extend(bytes(addr + len(data) - len(self.b)))
        self.b[addr:addr + len(data)] = data

    def desc(self, table, i, addr, length, flags, nxt):
        self.put(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, q, bufs):
        """bufs: (addr, len, flags) with W set for device-writable; returns the head."""
        head = self.next[q]
        for k, (addr, length, flags) in enumerate(bufs):
            i = self.next[q]
            self.next[q] += 1
            last = k + 1 == len(bufs)
            self.desc(q * 0x400, i, addr, length, flags | (0 if last else N), i + 1)
        self.offer(q, head)
        return head

    def offer(self, q, head):
        base = q * 0x400 + 0x100
        self.put(base + 4 + 2 * (self.avail[q] % 16), struct.pack("<H", head))
        self.avail[q] += 1
        self.put(base + 2, struct.pack("<H", self.avail[q]))

    def input(self, turns, flags=4):
        """flags bits 0-2: size log2 (4: 16 entries); bit 3 EVENT_IDX; bits 4-7 variant."""
        out = bytes([flags])
        for q in range(self.queues):
            out += struct.pack("<HHH", q * 0x400, q * 0x400 + 0x100, q * 0x400 + 0x200)
        out += bytes([len(turns)]) + bytes(turns)
        # Guest memory past the input is zero: trailing zeros need not be in it.
        return out + bytes(self.b).rstrip(b"\0")


def blk():
    out = []

    def req(kind, sector, data_len, data_flags, status_at=0x1800):
        m = Mem(1)
        m.put(0x1000, struct.pack("<IIQ", kind, 0, sector))
        bufs = [(0x1000, 16, 0)]
        if data_len:
            m.put(0x1100, bytes(range(256)) * (data_len // 256 + 1))
            bufs.append((0x1100, data_len, data_flags))
        bufs.append((status_at, 1, W))
        m.chain(0, bufs)
        return m

    out.append(("in", req(0, 1, 512, W).input([0])))
    out.append(("out", req(1, 2, 1024, 0).input([0])))
    out.append(("flush", req(4, 0, 0, 0).input([0])))
    out.append(("get_id", req(8, 0, 20, W).input([0])))
    out.append(("out_ro", req(1, 0, 512, 0).input([0], flags=4 | 0x10)))
    out.append(("in_direct", req(0, 3, 4096, W).input([0], flags=4 | 0x20)))
    out.append(("out_direct", req(1, 3, 512, 0).input([0], flags=4 | 0x20 | 8)))
    # Two requests, a driver reset between turns; the data split over two descriptors.
    m = Mem(1)
    m.put(0x1000, struct.pack("<IIQ", 0, 0, 5))
    m.chain(0, [(0x1000, 16, 0), (0x1100, 256, W), (0x1300, 256, W), (0x1800, 1, W)])
    m.put(0x1010, struct.pack("<IIQ", 1, 0, 63))
    m.chain(0, [(0x1010, 16, 0), (0x1400, 512, 0), (0x1801, 1, W)])
    out.append(("two_reset", m.input([0, 1, 0])))
    # Indirect: one descriptor pointing at a table of three at 0x1c00.
    m = Mem(1)
    m.put(0x1000, struct.pack("<IIQ", 0, 0, 7))
    for i, (a, ln, fl) in enumerate([(0x1000, 16, N), (0x1100, 512, W | N), (0x1800, 1, W)]):
        m.desc(0x1c00, i, a, ln, fl, i + 1)
    m.desc(0, 0, 0x1c00, 48, IND, 0)
    m.offer(0, 0)
    out.append(("indirect", m.input([0])))
    # Data in the second region, across its start.
    m = Mem(1)
    m.put(0x1000, struct.pack("<IIQ", 0, 0, 0))
    m.chain(0, [(0x1000, 16, 0), (0x20000, 1024, W), (0x1800, 1, W)])
    out.append(("second_region", m.input([0])))
    seeds("virtio_blk", out)


def rng():
    out = []
    m = Mem(1)
    m.chain(0, [(0x1000, 64, W)])
    out.append(("one", m.input([0])))
    m = Mem(1)
    for i in range(8):
        m.chain(0, [(0x1000 + 0x100 * i, 0x100, W)])
    out.append(("eight_limited", m.input([0, 0], flags=4 | 0x10)))
    m = Mem(1)
    m.chain(0, [(0x1000, 32, W), (0x1100, 32, W)])
    m.chain(0, [(0x1200, 16, 0)])
    out.append(("chain_and_readonly", m.input([0, 1, 0], flags=4 | 8)))
    seeds("virtio_rng", out)


def net():
    out = []
    frame = bytes(12) + bytes([0xff] * 6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x08\x00" + bytes(46)
    m = Mem(2)
    m.put(0x1000, frame)
    m.chain(1, [(0x1000, len(frame), 0)])
    m.chain(1, [(0x1000, 12, 0), (0x100c, len(frame) - 12, 0)])
    out.append(("tx", m.input([0])))
    m = Mem(2)
    for i in range(4):
        m.chain(0, [(0x1000 + 0x400 * i, 0x400, W)])
    out.append(("rx", m.input([(8 << 2) | 2, 1])))
    m = Mem(2)
    for i in range(8):
        m.chain(0, [(0x1000 + 0x100 * i, 0x100, W)])
    out.append(("rx_mergeable", m.input([(10 << 2) | 2, (3 << 2) | 2], flags=4 | 0x10)))
    m = Mem(2)
    m.chain(0, [(0x1000, 0x800, W)])
    m.put(0x1800, frame)
    m.chain(1, [(0x1800, len(frame), 0)])
    out.append(("both_reset", m.input([0, (5 << 2) | 2, 3, 1], flags=4 | 8 | 0x10)))
    seeds("virtio_net", out)


def vsock_hdr(op, src_port, dst_port, length=0, flags=0, buf_alloc=65536, fwd_cnt=0):
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, flags,
                       buf_alloc, fwd_cnt)


def vsock():
    out = []

    def rx_buffers(m, n=4):
        for i in range(n):
            m.chain(0, [(0x1000 + 0x100 * i, 0x100, W)])

    m = Mem(3)
    rx_buffers(m)
    m.put(0x1800, vsock_hdr(1, 5000, 1024))
    m.chain(1, [(0x1800, 44, 0)])
    out.append(("request_listener", m.input([0, 1])))
    m = Mem(3)
    rx_buffers(m)
    m.put(0x1800, vsock_hdr(1, 5001, 1024))
    m.put(0x1840, vsock_hdr(5, 5001, 1024, length=5) + b"hello")
    m.put(0x1880, vsock_hdr(4, 5001, 1024, flags=3))
    m.put(0x18c0, vsock_hdr(3, 5001, 1024))
    m.chain(1, [(0x1800, 44, 0)])
    m.chain(1, [(0x1840, 44, 0), (0x1840 + 44, 5, 0)])
    m.chain(1, [(0x1880, 44, 0)])
    m.chain(1, [(0x18c0, 44, 0)])
    out.append(("request_data_shutdown_rst", m.input([0, (4 << 2) | 2, 1, 0])))
    m = Mem(3)
    rx_buffers(m)
    m.put(0x1800, vsock_hdr(1, 5002, 1234))
    m.put(0x1840, vsock_hdr(7, 5002, 1234))
    m.put(0x1880, vsock_hdr(6, 5002, 1024, buf_alloc=4096, fwd_cnt=10))
    for a in (0x1800, 0x1840, 0x1880):
        m.chain(1, [(a, 44, 0)])
    out.append(("refused_credit", m.input([0, 1])))
    m = Mem(3)
    rx_buffers(m, 8)
    m.chain(2, [(0x1c00, 8, W)])
    out.append(("host_connect", m.input([(52 << 2) | 2, 1, 3, 1], flags=4 | 8)))
    seeds("virtio_vsock", out)


def mmio():
    out = []
    # A virtio-rng request at 0x3000 in the queue the set-up macro places.
    img = bytearray(0x3100)
    img[0:16] = struct.pack("<QIHH", 0x3000, 64, W, 0)
    img[0x1000:0x1006] = struct.pack("<HHH", 0, 1, 0)
    setup = 0x03 | (4 << 5)  # the driver set-up, 16 entries
    out.append(("rng_setup_process", bytes([0, 2, setup, 0x02]) + bytes(img).rstrip(b"\0")))
    blkimg = bytearray(0x3100)
    blkimg[0:48] = (struct.pack("<QIHH", 0x3000, 16, N, 1)
                    + struct.pack("<QIHH", 0x3010, 512, W | N, 2)
                    + struct.pack("<QIHH", 0x3300, 1, W, 0))
    blkimg[0x1000:0x1006] = struct.pack("<HHH", 0, 1, 0)
    blkimg[0x3000:0x3010] = struct.pack("<IIQ", 0, 0, 1)
    out.append(("blk_setup_process", bytes([1, 2, setup, 0x02]) + bytes(blkimg).rstrip(b"\0")))
    # Every 32-bit register read, then config-space reads of every width.
    ops = b""
    n = 0
    for off in range(0, 0x100, 4):
        ops += bytes([0 | (2 << 2)]) + struct.pack("<H", off)
        n += 1
    for w in range(4):
        ops += bytes([0 | (w << 2)]) + struct.pack("<H", 0x100 + w)
        n += 1
    out.append(("read_all", bytes([1, n]) + ops))
    # A driver's steps by hand: status, features, queue registers, DRIVER_OK, notify, reset.
    def wr(off, val, width=2):
        return bytes([1 | (width << 2)]) + struct.pack("<HQ", off, val)
    ops = (wr(0x70, 1) + wr(0x70, 3) + wr(0x14, 1) + wr(0x24, 1) + wr(0x20, 1)
           + wr(0x70, 0xb) + wr(0x30, 0) + wr(0x38, 8) + wr(0x80, 0) + wr(0x90, 0x1000)
           + wr(0xa0, 0x2000) + wr(0x44, 1) + wr(0x70, 0xf) + wr(0x50, 0) + bytes([2])
           + wr(0x64, 1) + wr(0x70, 0))
    out.append(("by_hand", bytes([0, 17]) + ops + bytes(img).rstrip(b"\0")))
    seeds("virtio_mmio", out)


def legacy():
    out = []
    panic = b"Kernel panic - not syncing: VFS: Unable to mount root fs\n"
    out.append(("console_panic", bytes([3, len(panic)]) + panic))
    oops = b"BUG: kernel NULL pointer dereference, address: 0\nWARNING: CPU: 0 PID: 1\n"
    out.append(("console_oops", bytes([3, len(oops)]) + oops))

    def rd(dev, off, width=0):
        return bytes([0 | (dev << 2) | (width << 5), off])

    def wr(dev, off, val, width=0):
        return bytes([1 | (dev << 2) | (width << 5), off]) + struct.pack("<Q", val)

    uart = (wr(0, 3, 0x80) + wr(0, 0, 1) + wr(0, 1, 0) + wr(0, 3, 3) + wr(0, 1, 0xf)
            + wr(0, 4, 0x1b) + rd(0, 5) + rd(0, 2) + rd(0, 6) + wr(0, 7, 0x55) + rd(0, 7)
            + bytes([2, 4]) + b"ls\r\n" + rd(0, 5) + rd(0, 0) + rd(0, 0) + rd(0, 2))
    out.append(("uart", uart))
    out.append(("i8042_reset", rd(1, 4) + wr(1, 4, 0xfe)))
    acpi = (wr(2, 0, 0x20 | (3 << 2)) + rd(2, 1) + wr(2, 1, 0x80) + rd(2, 4, 2)
            + wr(2, 2, 1) + wr(2, 0, 0x20 | (5 << 2)))
    out.append(("acpi", acpi))
    out.append(("timer_exit", wr(3, 0, 0x7b) + wr(4, 0, 42, 2) + wr(4, 4, 1, 2)))
    seeds("legacy_devices", out)


def elf(pvh):
    phnum = 2 if pvh else 1
    ehdr = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
            + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x1000000, 64, 0, 0, 64, 56, phnum,
                          64, 0, 0))
    payload_off = 64 + 56 * phnum
    payload = bytes([0xf4]) * 32
    note = b""
    if pvh:
        # Xen ELF note 18 (PHYS32_ENTRY): name "Xen", a 4-byte entry point.
        note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000000)
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, payload_off, 0x1000000, 0x1000000, len(payload),
                        0x2000, 0x200000)
    if pvh:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, payload_off + len(payload), 0, 0, len(note),
                             len(note), 4)
    return ehdr + phdrs + payload + note


def bzimage(version=0x020F, xloadflags=1, init_size=0x200000, cmdline_size=2048):
    b = bytearray(1024 + 512)
    b[0x1F1] = 1  # setup_sects
    b[0x1FE:0x200] = struct.pack("<H", 0xAA55)
    b[0x202:0x206] = b"HdrS"
    b[0x206:0x208] = struct.pack("<H", version)
    b[0x211] = 1  # loadflags: LOADED_HIGH
    b[0x214:0x218] = struct.pack("<I", 0x100000)  # code32_start
    b[0x22C:0x230] = struct.pack("<I", 0x37FFFFFF)  # initrd_addr_max
    b[0x230:0x234] = struct.pack("<I", 0x200000)  # kernel_alignment
    b[0x236:0x238] = struct.pack("<H", xloadflags)
    b[0x238:0x23C] = struct.pack("<I", cmdline_size)
    b[0x260:0x264] = struct.pack("<I", init_size)
    b[1024:] = bytes([0x90]) * 512
    return bytes(b)


def kernel():
    seeds("kernel_image", [
        ("elf", elf(False)),
        ("elf_pvh", elf(True)),
        ("bzimage", bzimage()),
        ("bzimage_old", bzimage(version=0x020A, xloadflags=0)),
        ("bzimage_huge_init", bzimage(init_size=0xFFFFFFFF, cmdline_size=0xFFFFFFFF)),
    ])


def initrd():
    def one(kernel_end, addr_max, flags, extra, contents):
        return (struct.pack("<IIB", kernel_end >> 12, addr_max, flags) + bytes([len(extra)])
                + extra + contents)

    seeds("initrd", [
        ("plain", one(0x1000000, 0x37FFFFFF, 0, b"", b"070701" + bytes(200))),
        ("extra", one(0x1000000, 0x37FFFFFF, 1, b"0707010000", b"abc")),
        ("grown", one(0x200000, 0x37FFFFFF, 32 << 1, b"", b"x" * 100)),
        ("too_large", one(0x3F00000, 0x37FFFFFF, 127 << 1, b"", b"y")),
        ("low_limit", one(0x100000, 0x200000, 1, b"zz", b"w" * 300)),
    ])


def cpio():
    def op(kind, path, mode, mtime, data=None):
        out = bytes([kind, len(path)]) + path + struct.pack("<HI", mode, mtime)
        if data is not None:
            out += bytes([len(data)]) + data
        return out

    seeds("cpio_writer", [
        ("tree", op(0, b"/etc", 0o755, 0) + op(1, b"/etc/hosts", 0o644, 7, b"127.0.0.1 x\n")
         + op(2, b"/bin/sh", 0, 0, b"busybox") + op(1, b"/a/b/c/d", 0o600, 1, b"deep")),
        ("duplicates", op(1, b"/x", 0o644, 0, b"1") + op(1, b"/x", 0o644, 0, b"2")
         + op(0, b"/x", 0o755, 0) + op(1, b"/x/y", 0o644, 0, b"3")),
        ("bad_paths", op(1, b"rel", 0, 0, b"") + op(1, b"/a/../b", 0, 0, b"")
         + op(0, b"/", 0o700, 0) + op(0, b"/d/", 0o700, 0) + op(1, b"/d//e", 0, 0, b"")),
    ])


def cli():
    def argv(*a):
        return b"\0".join(x.encode() for x in a)

    seeds("cli_args", [
        ("run", argv("run", "--kernel", "/vmlinux", "--initrd", "/initrd", "--mem", "256",
                     "--vcpus", "2", "--cmdline", "console=ttyS0", "--append", "quiet")),
        ("run_devices", argv("run", "--disk", "/tmp/d.img,ro,id=x,cache=none", "--root",
                             "/dev/vda", "--net", "tap=tap0,mac=02:00:00:00:00:01",
                             "--vsock", "cid=3,uds=/tmp/v.sock", "--rng",
                             "rate=1M,burst=64K", "--share", "/tmp,tag=t", "--timeout",
                             "2.5", "--shutdown-timeout", "3", "--no-acpi")),
        ("run_root_share", argv("run", "--root-share", "/tmp,ro", "--snapshot-to", "/tmp/s",
                                "--snapshot-on", "ready", "--snapshot-then", "continue")),
        ("run_hidden", argv("run", "--stop-after-ms", "100", "--snapshot-restore-after",
                            "1.5", "--snapshot-restore-opts",
                            "no-clock,tsc-khz,delay-ms=5,skip-msr=0x10")),
        ("exec", argv("--log-level", "debug", "exec", "--timeout", "30", "--env", "A=1",
                      "--workdir", "/root", "--mem", "128", "--", "sh", "-c", "echo hi")),
        ("exec_file", argv("exec", "--file", "a.sh:/opt/a.sh", "--share", "/tmp", "true")),
        ("restore", argv("restore", "--tap", "tap9", "--vsock-uds", "/tmp/w.sock",
                         "--console", "stdout", "--no-stdin", "/tmp/snap")),
        ("bench", argv("bench", "--runs", "3", "--parallel", "2", "--compare", "qemu",
                       "--timeout", "60", "--marker", "x")),
        ("bench_exec", argv("bench", "--exec", "--exec-command", "true", "--snapshot",
                            "--snapshot-watch", "0.5")),
    ])


def config():
    items = [
        (0, "/tmp/disk.img,ro,id=serial1,cache=none"),
        (1, "tap=tap0,mac=02:00:00:00:00:01"),
        (2, "cid=3,uds=/tmp/v.sock"),
        (3, "rate=1M,burst=64K"),
        (4, "/tmp,tag=data,ro,cache=never"),
        (5, "/tmp,ro"),
        (6, "02:00:00:aa:bb:cc"),
        (7, "dir:/opt/"),
        (8, "NAME=value with spaces"),
        (9, "a=1,b=2"),
        (10, "tap0"),
        (11, "console=ttyS0 root=/dev/vda rw\nroot"),
    ]
    seeds("config_options", [(f"p{k}", bytes([k]) + s.encode()) for k, s in items])


if __name__ == "__main__":
    blk()
    rng()
    net()
    vsock()
    mmio()
    legacy()
    kernel()
    initrd()
    cpio()
    cli()
    config()
