// SPDX-License-Identifier: Apache-2.0
//! virtio-net, virtio-vsock and virtio-rng with a real Linux guest, in ONE boot (boots cost
//! tens of seconds here), inside a network namespace this test creates:
//!
//! - net: a TAP in the namespace; the guest sets its address, pings the host end, and moves
//!   data over TCP both ways, with busybox nc (64 KiB down, `seq` output up) and in bulk with
//!   vsock-io's TCP mode (2 MiB each way, 64 KiB per system call): what the guest receives is
//!   checked by its sha256 against the host's, what it sends byte for byte by the host; the
//!   guest's MAC is the one asked for;
//! - vsock: the host connects through the Unix socket (`CONNECT 5000`) to an echo server in
//!   the guest and gets its 256 KiB back; the guest connects to host port 6000 (`PATH_6000`),
//!   where the host echoes, and checks the sha256 of what came back (vsock-io,
//!   resources/guest/vsock-io.c, built here and appended to the initramfs);
//! - rng: the guest reads /dev/hwrng (backed by virtio_rng).
//!
//! Guest kernel code is emulated on PVM hosts, so every guest system call and packet is
//! expensive: busybox nc, which moves 1 KiB per system call, manages only a few KiB/s there,
//! so its transfers are kept small and the MiBs go through vsock-io (64 KiB per call). The
//! link uses a 64 KiB MTU (fewer packets; frames then span many receive buffers, which
//! exercises MRG_RXBUF).
//!
//! A second test checks that bad --net/--vsock/--rng values stop ember before a VM exists.
//! Needs root (network namespaces, TAP), /dev/kvm, the default guest and a C compiler;
//! skips with a message otherwise.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Host -> guest TCP bytes in bulk (vsock-io tcp).
const PAYLOAD: usize = 2 << 20;
/// Host -> guest TCP bytes through busybox nc.
const NC_PAYLOAD: usize = 64 << 10;
/// The guest sends `seq 1 SEQ_N` to the host with busybox nc (109 KiB).
const SEQ_N: u32 = 20_000;
/// MiB the guest sends with `vsock-io tcp-send` (64 KiB writes).
const BULK_MIB: usize = 2;
/// MTU of both ends of the link.
const MTU: &str = "65000";
/// Bytes the host sends through vsock to the guest's echo server.
const VSOCK_PAYLOAD: usize = 256 << 10;
const HOST_IP: &str = "172.30.0.1";
const GUEST_MAC: &str = "02:00:00:00:00:42";
const GUEST_CID: u32 = 42;

/// The guest's side of the test (run by init through ember.cmd). Data goes through files in
/// /tmp and values are read with the shell's `read`, so each step can be checked on its own.
const GUEST_SCRIPT: &str = r#"#!/bin/sh
fail() { echo "NETDEV-FAIL: $*"; exit 1; }
ip addr add 172.30.0.2/24 dev eth0 || fail "ip addr"
ip link set eth0 mtu 65000 up || fail "ip link"
read mac </sys/class/net/eth0/address
echo "NETDEV-MAC $mac"
ping -c 2 -W 20 172.30.0.1 >/dev/null || fail ping
echo NETDEV-PING-OK
read rng </sys/class/misc/hw_random/rng_current
head -c 64 /dev/hwrng >/tmp/rng || fail "read /dev/hwrng"
wc -c </tmp/rng >/tmp/rng.n
read n </tmp/rng.n
echo "NETDEV-RNG $rng $n"
vsock-io echo 5000 1 &
echo_pid=$!
nc 172.30.0.1 5004 </dev/null >/tmp/nc.bin || fail "nc host->guest"
sha256sum </tmp/nc.bin >/tmp/nc.sum
read sum _ </tmp/nc.sum
echo "NETDEV-H2G-NC $sum"
rm /tmp/nc.bin
vsock-io tcp 172.30.0.1 5002 </dev/null >/tmp/h2g || fail "tcp host->guest"
sha256sum </tmp/h2g >/tmp/h2g.sum
read sum _ </tmp/h2g.sum
echo "NETDEV-H2G $sum"
rm /tmp/h2g
seq 1 20000 >/tmp/seq
nc 172.30.0.1 5001 </tmp/seq >/dev/null
vsock-io tcp-send 172.30.0.1 5003 2 || fail "tcp-send"
echo NETDEV-G2H-SENT
seq 1 50000 >/tmp/v.out
vsock-io connect 2 6000 </tmp/v.out >/tmp/v.back || fail "vsock connect"
cmp /tmp/v.out /tmp/v.back >/dev/null || fail "vsock echo from the host differs"
echo NETDEV-VSOCK-GUEST-OK
wait $echo_pid || fail "vsock echo server"
echo NETDEV-VSOCK-HOST-OK
echo NETDEV-ALL-OK
"#;

/// Deterministic test data (xorshift64*).
fn payload(len: usize, seed: u64) -> Vec<u8> {
    // (The guest's `seq` output is the other data set: see seq_text.)
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// What `seq 1 n` prints.
fn seq_text(n: u32) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

/// Whether this test may create network namespaces and TAPs; prints why not.
fn netns_capable(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root (network namespace and TAP)");
        return false;
    }
    if !Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIP {test}: the `ip` tool (iproute2) is not installed");
        return false;
    }
    true
}

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Option<Self> {
        let name = format!("ember-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self { name })
    }

    /// Runs `ip ARGS` inside the namespace; panics on failure.
    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "ip"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `f` on a thread that entered the namespace (sockets it creates live there).
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns(2) on an open namespace fd; it only moves this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A minimal newc cpio archive writer.
fn cpio(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let mut out = Vec::new();
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(&mut out, 1000 + i as u32, name, *mode, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

/// sha256 of `data` with coreutils' sha256sum (as the guest's busybox computes it).
fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Accepts one connection on `l` before `deadline` (the listener is non-blocking).
fn accept_tcp(l: &TcpListener, deadline: Instant) -> Option<TcpStream> {
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
                return Some(s);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return None,
        }
    }
}

fn accept_unix(l: &UnixListener, deadline: Instant) -> Option<UnixStream> {
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                return Some(s);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return None,
        }
    }
}

/// Echoes one stream back to itself until EOF; returns the byte count.
fn echo<S: Read + Write>(s: &mut S, shut: impl FnOnce(&S)) -> usize {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n;
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    shut(s);
    total
}

/// The host side of the vsock checks: connects to the guest's echo server through the
/// Unix socket (retrying until it listens), sends `data`, and returns what came back.
fn vsock_host_to_guest(uds: PathBuf, data: Vec<u8>, deadline: Instant) -> Result<Vec<u8>, String> {
    loop {
        if Instant::now() > deadline {
            return Err("the guest's vsock echo server never answered".into());
        }
        let Ok(mut s) = UnixStream::connect(&uds) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(b"CONNECT 5000\n").map_err(|e| e.to_string())?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        if !line.starts_with("OK ") {
            // Not listening yet: ember closed the stream after the guest's RST.
            std::thread::sleep(Duration::from_millis(300));
            continue;
        }
        let port: u32 = line[3..]
            .trim()
            .parse()
            .map_err(|_| format!("bad reply {line:?}"))?;
        assert!(port >= 1024, "host port {port}");
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let r = w.write_all(&data);
            let _ = w.shutdown(Shutdown::Write);
            r
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back)
            .map_err(|e| format!("reading the echo: {e}"))?;
        writer
            .join()
            .unwrap()
            .map_err(|e| format!("sending: {e}"))?;
        return Ok(back);
    }
}

/// What `vsock-io send`/`tcp-send` sends: 64 KiB blocks of (i * 7 + 1) mod 256.
fn send_pattern(mib: usize) -> Vec<u8> {
    let block: Vec<u8> = (0..1usize << 16).map(|i| (i * 7 + 1) as u8).collect();
    block.repeat(mib * 16)
}

/// Reads `s` to EOF (or `max` bytes); returns the bytes and the time from the first byte.
fn read_all(s: &mut TcpStream, max: usize) -> Option<(Vec<u8>, Duration)> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut first = None;
    while got.len() < max {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                got.extend_from_slice(&buf[..n]);
            }
            Err(_) => return None,
        }
    }
    Some((got, first.map_or(Duration::ZERO, |t| t.elapsed())))
}

/// Serves `data` to one client of `l`, then waits for it to close.
fn serve_tcp(l: &TcpListener, data: &[u8], deadline: Instant) -> Option<()> {
    let mut s = accept_tcp(l, deadline)?;
    s.write_all(data).ok()?;
    s.shutdown(Shutdown::Write).ok()?;
    let _ = s.read(&mut [0u8; 1]);
    Some(())
}

struct HostSide {
    h2g_nc: JoinHandle<Option<()>>,
    g2h: JoinHandle<Option<(Vec<u8>, Duration)>>,
    bulk: JoinHandle<Option<(Vec<u8>, Duration)>>,
    h2g: JoinHandle<Option<()>>,
    vsock_echo: JoinHandle<Option<usize>>,
    vsock_h2g: JoinHandle<Result<Vec<u8>, String>>,
}

#[test]
fn net_vsock_rng_in_one_boot() {
    let test = "net_vsock_rng_in_one_boot";
    if !kvm_available(test) || !netns_capable(test) {
        return;
    }
    let Some((kernel, initrd)) = default_guest(test) else {
        return;
    };
    assert!(
        GUEST_SCRIPT.contains(&format!("seq 1 {SEQ_N} >"))
            && GUEST_SCRIPT.contains(&format!("tcp-send 172.30.0.1 5003 {BULK_MIB} ")),
        "script and constants agree"
    );
    let dir = temp_dir("netdev");
    let Some(helper) = build_vsock_io(&dir) else {
        return;
    };
    // The default initramfs plus a second archive with the helper and the script.
    let mut initramfs = std::fs::read(&initrd).unwrap();
    initramfs.resize(initramfs.len().next_multiple_of(4), 0);
    initramfs.extend(cpio(&[
        ("bin/vsock-io", 0o100755, &helper),
        ("netdev-test.sh", 0o100755, GUEST_SCRIPT.as_bytes()),
    ]));
    let initrd = dir.join("initramfs.cpio");
    std::fs::write(&initrd, &initramfs).unwrap();

    let ns = Netns::new("net").expect("cannot create a network namespace");
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["tuntap", "add", "tap0", "mode", "tap"]);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "tap0"]);
    ns.ip(&["link", "set", "tap0", "mtu", MTU, "up"]);

    let data = payload(PAYLOAD, 0x5eed);
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let (g2h_l, h2g_l, bulk_l, nc_l) = ns.enter(|| {
        let l = |port| {
            let l = TcpListener::bind((HOST_IP, port)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        };
        (l(5001), l(5002), l(5003), l(5004))
    });
    let uds = dir.join("v.sock");
    let port_listener = UnixListener::bind(dir.join("v.sock_6000")).unwrap();
    port_listener.set_nonblocking(true).unwrap();

    let host = {
        let d = data.clone();
        let h2g = std::thread::spawn(move || serve_tcp(&h2g_l, &d, deadline));
        let nc_data = payload(NC_PAYLOAD, 0xcafe);
        let h2g_nc = std::thread::spawn(move || serve_tcp(&nc_l, &nc_data, deadline));
        let g2h = std::thread::spawn(move || {
            let mut s = accept_tcp(&g2h_l, deadline)?;
            // Until EOF, or all that is expected (busybox nc may not shut down its write
            // half at the end of its input; closing here ends it).
            read_all(&mut s, seq_text(SEQ_N).len())
        });
        let bulk = std::thread::spawn(move || {
            let mut s = accept_tcp(&bulk_l, deadline)?;
            read_all(&mut s, usize::MAX)
        });
        let vsock_echo = std::thread::spawn(move || {
            let mut s = accept_unix(&port_listener, deadline)?;
            Some(echo(&mut s, |s| {
                let _ = s.shutdown(Shutdown::Write);
            }))
        });
        let (u, d) = (uds.clone(), payload(VSOCK_PAYLOAD, 0xbeef));
        let vsock_h2g = std::thread::spawn(move || vsock_host_to_guest(u, d, deadline));
        HostSide {
            h2g_nc,
            g2h,
            bulk,
            h2g,
            vsock_echo,
            vsock_h2g,
        }
    };

    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(ember_bin())
        .args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "--mem",
            "256",
            "--net",
            &format!("tap=tap0,mac={GUEST_MAC}"),
        ])
        .arg("--vsock")
        .arg(format!("cid={GUEST_CID},uds={}", uds.display()))
        .args([
            "--append",
            "quiet rodata=off retain_initrd 8250.nr_uarts=1 random.trust_cpu=on",
        ])
        .args(["--append", "ember.cmd=\"sh /netdev-test.sh\""])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_ember(child, BOOT_TIMEOUT);
    let ctx = format!(
        "\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.stdout, out.stderr
    );
    assert!(!out.timed_out, "the guest did not finish in time{ctx}");
    let line = |prefix: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.trim_end().strip_prefix(prefix).map(str::to_string))
    };
    assert!(line("NETDEV-FAIL").is_none(), "guest check failed{ctx}");

    // net: MAC, ping, TCP both ways.
    assert_eq!(line("NETDEV-MAC ").as_deref(), Some(GUEST_MAC), "{ctx}");
    assert!(line("NETDEV-PING-OK").is_some(), "{ctx}");
    let nc = line("NETDEV-H2G-NC ").unwrap_or_else(|| panic!("no nc host->guest transfer{ctx}"));
    assert_eq!(
        nc.split_whitespace().next(),
        Some(sha256_hex(&payload(NC_PAYLOAD, 0xcafe)).as_str()),
        "the sha256 of what busybox nc received differs from the host's{ctx}"
    );
    host.h2g_nc.join().unwrap().expect("host->guest TCP (nc)");
    let h2g = line("NETDEV-H2G ").unwrap_or_else(|| panic!("no host->guest transfer{ctx}"));
    assert_eq!(
        h2g.split_whitespace().next(),
        Some(sha256_hex(&data).as_str()),
        "the sha256 of what the guest received differs from the host's{ctx}"
    );
    host.h2g.join().unwrap().expect("host->guest TCP");
    let (got, g2h_time) = host.g2h.join().unwrap().expect("guest->host TCP");
    let want = seq_text(SEQ_N);
    assert_eq!(got.len(), want.len(), "{ctx}");
    assert!(
        got == want,
        "the bytes the guest sent differ from `seq 1 {SEQ_N}`{ctx}"
    );
    let (bulk, bulk_time) = host.bulk.join().unwrap().expect("guest->host bulk TCP");
    assert_eq!(bulk.len(), BULK_MIB << 20, "{ctx}");
    assert!(
        bulk == send_pattern(BULK_MIB),
        "the guest's bulk upload differs{ctx}"
    );

    // vsock: both directions.
    assert!(line("NETDEV-VSOCK-GUEST-OK").is_some(), "{ctx}");
    let seq_len = seq_text(50_000).len();
    assert_eq!(host.vsock_echo.join().unwrap(), Some(seq_len), "{ctx}");
    let echoed = host
        .vsock_h2g
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}{ctx}"));
    assert!(
        echoed == payload(VSOCK_PAYLOAD, 0xbeef),
        "host-initiated vsock echo differs{ctx}"
    );
    assert!(line("NETDEV-VSOCK-HOST-OK").is_some(), "{ctx}");

    // rng.
    assert_eq!(
        line("NETDEV-RNG ").as_deref(),
        Some("virtio_rng.0 64"),
        "{ctx}"
    );
    assert!(line("NETDEV-ALL-OK").is_some(), "{ctx}");
    assert!(out.stdout.contains("ember-init: exit status 0"), "{ctx}");
    out.expect_code(0);

    // Figures for the record (not asserted: this host's speed varies).
    let kibps = |n: usize, t: Duration| n as f64 / 1024.0 / t.as_secs_f64().max(1e-9);
    eprintln!(
        "netdev (MTU {MTU}): TCP guest->host {:.0} KiB/s with busybox nc (1 KiB writes), \
         {:.0} KiB/s with 64 KiB writes",
        kibps(want.len(), g2h_time),
        kibps(bulk.len(), bulk_time)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_device_flags_stop_before_the_vm_starts() {
    let dir = temp_dir("netdev-flags");
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"\x7fELF").unwrap();
    let k = kernel.to_str().unwrap();
    let not_socket = dir.join("file");
    std::fs::write(&not_socket, b"x").unwrap();
    let ns = not_socket.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--net".into(), "tap=tap0,mac=01:02:03:04:05:06".into()],
            "multicast",
        ),
        (vec!["--net".into(), "tap=tap0,mac=zz".into()], "not a MAC"),
        (
            vec!["--net".into(), "mac=02:00:00:00:00:01".into()],
            "tap= is required",
        ),
        (
            vec!["--net".into(), "tap=this-name-is-too-long".into()],
            "longer than 15",
        ),
        (
            vec![
                "--net".into(),
                "tap=t0".into(),
                "--net".into(),
                "tap=t0".into(),
            ],
            "given twice",
        ),
        (
            vec!["--vsock".into(), "cid=2,uds=/tmp/x.sock".into()],
            "reserved",
        ),
        (
            vec!["--vsock".into(), format!("cid=3,uds={ns}")],
            "not a socket",
        ),
        (
            vec!["--vsock".into(), "cid=3,uds=/nonexistent/dir/v.sock".into()],
            "does not exist",
        ),
        (vec!["--rng".into(), "rate=0".into()], "--no-rng"),
    ];
    for (args, expect) in cases {
        let mut all = vec!["run".to_string(), "--kernel".into(), k.into()];
        all.extend(args.iter().cloned());
        let argv: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = run_ember(&argv, None, Duration::from_secs(30));
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains(expect),
            "{args:?}: expected {expect:?} in {}",
            out.stderr
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_tap_without_cap_net_admin_is_explained() {
    let test = "missing_tap_without_cap_net_admin_is_explained";
    if !kvm_available(test) || !netns_capable(test) {
        return;
    }
    let Some((kernel, _)) = default_guest(test) else {
        return;
    };
    // Root without CAP_NET_ADMIN may open /dev/net/tun but not create a TAP.
    let out = Command::new("setpriv")
        .args(["--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"])
        .arg(ember_bin())
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--net", "tap=embernotap0"])
        .stdin(Stdio::null())
        .output();
    let Ok(out) = out else {
        eprintln!("SKIP {test}: setpriv (util-linux) is not installed");
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("TAP embernotap0 does not exist") && stderr.contains("ip tuntap add"),
        "{stderr}"
    );
}
