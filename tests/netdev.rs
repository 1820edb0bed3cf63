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

/// The guest's side of [`linux_network_goes_on_after_a_restore_on_another_tap`]: the network
/// up (a ping to the host), then a loop that connects to host port 5010 once a second
/// (refused until the restored run's host listens there), then TCP both ways and a ping, and
/// last a connection to port 5012, which the host answers once it has pinged the guest.
const SNAPNET_SCRIPT: &str = r#"#!/bin/sh
fail() { echo "SNAPNET-FAIL: $*"; exit 1; }
ip addr add 172.30.0.2/24 dev eth0 || fail "ip addr"
ip link set eth0 up || fail "ip link"
ping -c 1 -W 30 172.30.0.1 >/dev/null || fail "ping before the snapshot"
echo SNAPNET-UP
i=0
until nc 172.30.0.1 5010 </dev/null >/tmp/got 2>/dev/null; do
  i=$((i+1))
  [ $i -lt 900 ] || fail "no host listener on port 5010"
  sleep 1
done
echo "SNAPNET-TRIES $i"
sha256sum </tmp/got >/tmp/got.sum
read sum _ </tmp/got.sum
echo "SNAPNET-GOT $sum"
seq 1 3000 | nc 172.30.0.1 5011 >/dev/null || fail "nc guest->host"
echo SNAPNET-SENT
ping -c 2 -W 20 172.30.0.1 >/dev/null || fail "ping after the restore"
echo SNAPNET-PING-OK
nc 172.30.0.1 5012 </dev/null >/tmp/host || fail "nc 5012"
read host </tmp/host
echo "SNAPNET-HOST $host"
echo SNAPNET-ALL-OK
"#;

/// Sends one ICMP echo request (sequence `seq`) to `to` from this thread's network namespace
/// through a raw socket (no `ping` tool needed) and waits up to `wait` for its reply.
fn icmp_echo(to: [u8; 4], seq: u16, wait: Duration) -> bool {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let id = (std::process::id() & 0xffff) as u16;
    let mut msg = vec![8u8, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(b"ember-netsnap-ping");
    let mut sum: u32 = msg
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    msg[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sendto(2) with a valid buffer and a sockaddr_in of the size given.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return false;
    }
    let until = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, 10_000) as i32;
        // SAFETY: poll(2) on one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            continue;
        }
        // SAFETY: recv(2) into a buffer of the length given.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { continue };
        // An IPv4 header, then the ICMP message: an echo reply with our id and sequence?
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if n >= ihl + 8
            && buf[12..16] == to
            && buf[ihl] == 0
            && buf[ihl + 4..ihl + 6] == id.to_be_bytes()
            && buf[ihl + 6..ihl + 8] == seq.to_be_bytes()
        {
            return true;
        }
    }
    false
}

/// What the host side of [`linux_network_goes_on_after_a_restore_on_another_tap`] saw after
/// the restore.
struct HostFigures {
    /// When the guest's retried connection was accepted, from the restore's start.
    accepted: Duration,
    /// The host's neighbour entry of the guest then.
    neigh: String,
    /// What the guest sent on port 5011.
    uploaded: Vec<u8>,
    /// When the host's first ping was answered, from the restore's start.
    pinged: Duration,
    /// Pings sent until one was answered.
    ping_tries: u16,
}

/// Bytes the restored run's host sends the guest on port 5010 (busybox nc is slow here).
const SNAPNET_PAYLOAD: usize = 16 << 10;
const SNAPNET_MAC: &str = "02:00:00:00:00:43";

/// virtio-net across a snapshot, with a real Linux guest: booted with a NIC on TAP embnetA
/// in one network namespace, it brings its network up (pings the host) and is snapshotted
/// on SIGUSR2 (`--snapshot-on sigusr2`) while it retries a TCP connection to the host; `ember
/// restore --tap embnetB` restores it onto another TAP in a second namespace whose host end
/// has the same address and another MAC (the restored NIC gives the guest a gratuitous ARP
/// for it). There the guest's retried connection gets 16 KiB whose sha256 it reports, it
/// sends `seq 1 3000` back over a second connection and pings the host, and the host pings
/// it (ICMP through a raw socket) before it lets the guest end. The host sees the guest's
/// MAC unchanged. Ignored: it boots Linux (about 20-70 s on a PVM host). Run it alone:
/// `cargo test --test netdev -- --ignored --nocapture linux_network` (one Linux boot at a
/// time). Needs root and iproute2.
#[test]
#[ignore]
fn linux_network_goes_on_after_a_restore_on_another_tap() {
    let test = "linux_network_goes_on_after_a_restore_on_another_tap";
    if !kvm_available(test) || !netns_capable(test) {
        return;
    }
    let Some((kernel, initrd)) = default_guest(test) else {
        return;
    };
    let dir = temp_dir("netsnap");
    let mut initramfs = std::fs::read(&initrd).unwrap();
    initramfs.resize(initramfs.len().next_multiple_of(4), 0);
    initramfs.extend(cpio(&[(
        "snapnet-test.sh",
        0o100755,
        SNAPNET_SCRIPT.as_bytes(),
    )]));
    let initrd = dir.join("initramfs.cpio");
    std::fs::write(&initrd, &initramfs).unwrap();
    let snap = dir.join("snap");
    let snap_arg = snap.to_str().unwrap();

    // Two namespaces, each with a TAP whose host end is HOST_IP.
    let net = |tag: &str, tap: &str| {
        let ns = Netns::new(tag).expect("cannot create a network namespace");
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["tuntap", "add", tap, "mode", "tap"]);
        ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", tap]);
        ns.ip(&["link", "set", tap, "up"]);
        ns
    };
    let (ns_a, ns_b) = (net("netsnapA", "embnetA"), net("netsnapB", "embnetB"));

    // 1. Boot on embnetA; SIGUSR2 once the guest's network is up.
    let start = Instant::now();
    let mut child = ns_a
        .ember(&[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--net",
            &format!("tap=embnetA,mac={SNAPNET_MAC}"),
            "--timeout",
            "400",
            "--append",
            "quiet rodata=off retain_initrd 8250.nr_uarts=1 random.trust_cpu=on",
            "--append",
            "ember.cmd=\"sh /snapnet-test.sh\"",
            "--snapshot-to",
            snap_arg,
            "--snapshot-on",
            "sigusr2",
        ])
        .spawn()
        .expect("cannot start ember");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let mut pipe = child.stdout.take().unwrap();
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let has_line = |s: &str, l: &str| s.lines().any(|x| x.trim_end() == l);
    while !has_line(&seen.lock().unwrap(), "SNAPNET-UP") {
        let s = seen.lock().unwrap().clone();
        if start.elapsed() > BOOT_TIMEOUT || s.contains("SNAPNET-FAIL") {
            let _ = child.kill();
            let out = wait_ember(child, Duration::from_secs(10));
            panic!("the guest's network never came up:\n{s}\n{out:?}");
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("ember ended ({st}) before the guest's network came up:\n{s}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let up_after = start.elapsed();
    // A few of the guest's refused connections before the snapshot.
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: kill(2) on our own child (ember: `ip netns exec` execs it), not yet waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGUSR2) }, 0);
    let out1 = wait_ember(child, Duration::from_secs(120));
    let first_total = start.elapsed();
    reader.join().unwrap();
    let stdout1 = seen.lock().unwrap().clone();
    assert!(!out1.timed_out, "{out1:?}");
    out1.expect_code(0);
    assert!(
        out1.stderr.contains("snapshot written to"),
        "no snapshot: {out1:?}"
    );
    assert!(
        !stdout1.contains("SNAPNET-TRIES") && !stdout1.contains("SNAPNET-FAIL"),
        "the guest was not in its connect loop at the snapshot:\n{stdout1}"
    );

    // 2. The host side in the second namespace, then the restore onto embnetB.
    let data = payload(SNAPNET_PAYLOAD, 0x5a5a);
    let (h2g_l, g2h_l, fin_l) = ns_b.enter(|| {
        let l = |port| {
            let l = TcpListener::bind((HOST_IP, port)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        };
        (l(5010), l(5011), l(5012))
    });
    assert!(
        ns_b.enter(|| icmp_echo([172, 30, 0, 1], 0, Duration::from_secs(5))),
        "icmp_echo gets no answer from the host's own address"
    );
    let restore_start = Instant::now();
    let deadline = restore_start + Duration::from_secs(300);
    let child = ns_b
        .ember(&[
            "restore",
            "--no-stdin",
            "--timeout",
            "300",
            "--tap",
            "embnetB",
            snap_arg,
        ])
        .spawn()
        .expect("cannot start ember");
    // In order, as the guest goes: its retried connection (16 KiB down), its upload, then the
    // host's pings until one is answered, then the connection that lets the guest end.
    let host = {
        let (d, ns_name) = (data.clone(), ns_b.name.clone());
        ns_b.enter_async(move || -> Result<HostFigures, String> {
            let mut s = accept_tcp(&h2g_l, deadline).ok_or("no connection on port 5010")?;
            let accepted = restore_start.elapsed();
            // The host's neighbour entry of the guest now (the TAP's entries go when the
            // restored ember ends and the TAP goes down).
            let neigh = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns_name,
                    "ip",
                    "neigh",
                    "show",
                    "172.30.0.2",
                ])
                .output()
                .map_err(|e| e.to_string())?;
            let neigh = String::from_utf8_lossy(&neigh.stdout).into_owned();
            s.write_all(&d)
                .map_err(|e| format!("sending on 5010: {e}"))?;
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            let _ = s.read(&mut [0u8; 1]);
            let mut s = accept_tcp(&g2h_l, deadline).ok_or("no connection on port 5011")?;
            // Until all that is expected (busybox nc may not shut down its write half at the
            // end of its input; closing here ends it).
            let (uploaded, _) =
                read_all(&mut s, seq_text(3000).len()).ok_or("reading port 5011")?;
            drop(s);
            let mut tries = 0;
            while !icmp_echo([172, 30, 0, 2], tries, Duration::from_secs(2)) {
                tries += 1;
                if Instant::now() > deadline {
                    return Err(format!("the guest answered none of {tries} pings"));
                }
            }
            let pinged = restore_start.elapsed();
            let mut s = accept_tcp(&fin_l, deadline).ok_or("no connection on port 5012")?;
            s.write_all(b"pinged\n").map_err(|e| e.to_string())?;
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            Ok(HostFigures {
                accepted,
                neigh,
                uploaded,
                pinged,
                ping_tries: tries + 1,
            })
        })
    };
    let out2 = wait_ember(child, Duration::from_secs(330));
    let ctx = format!(
        "\n--- first stdout ---\n{stdout1}\n--- restored stdout ---\n{}\n--- restored stderr \
         ---\n{}",
        out2.stdout, out2.stderr
    );
    let line = |prefix: &str| {
        out2.stdout
            .lines()
            .find_map(|l| l.trim_end().strip_prefix(prefix).map(str::to_string))
    };
    assert!(!out2.timed_out, "the restored guest did not finish{ctx}");
    assert!(line("SNAPNET-FAIL").is_none(), "guest check failed{ctx}");
    let host = host
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("host side after the restore: {e}{ctx}"));
    assert_eq!(
        line("SNAPNET-GOT ").as_deref(),
        Some(sha256_hex(&data).as_str()),
        "what the restored guest received differs{ctx}"
    );
    assert!(
        host.uploaded == seq_text(3000),
        "what the restored guest sent differs{ctx}"
    );
    assert!(line("SNAPNET-PING-OK").is_some(), "{ctx}");
    assert_eq!(line("SNAPNET-HOST ").as_deref(), Some("pinged"), "{ctx}");
    assert!(line("SNAPNET-ALL-OK").is_some(), "{ctx}");
    assert!(
        out2.stderr
            .contains("was on TAP embnetA at the snapshot and is on TAP embnetB now")
            && out2
                .stderr
                .contains("telling the guest that 172.30.0.1 is at"),
        "{ctx}"
    );
    // The frames the host got from the restored guest carry its MAC.
    let neigh = &host.neigh;
    assert!(
        neigh.contains(SNAPNET_MAC),
        "host neighbour entry of the guest while it was connected: {neigh:?}{ctx}"
    );
    assert!(out2.stdout.contains("ember-init: exit status 0"), "{ctx}");
    out2.expect_code(0);

    // Figures for the record (not asserted: this host's speed varies).
    eprintln!(
        "netsnap: network up {up_after:.1?} after the first ember started, {first_total:.1?} \
         run in all; restored: the guest's retried connection accepted {:.2?} after `ember \
         restore` started ({}), the host's first answered ping at {:.2?} ({} ping(s)), \
         restored run {:.1?} in all",
        host.accepted,
        line("SNAPNET-TRIES ").map_or("?".into(), |t| format!("its try {t}")),
        host.pinged,
        host.ping_tries,
        out2.elapsed
    );
    for l in out1.stderr.lines().chain(out2.stderr.lines()).filter(|l| {
        l.contains("snapshot") || l.contains("restor") || l.contains("TAP") || l.contains("vCPUs")
    }) {
        eprintln!("  {l}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
