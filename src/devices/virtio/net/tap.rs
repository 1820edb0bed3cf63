// SPDX-License-Identifier: Apache-2.0
//! A TAP network interface opened through `/dev/net/tun` with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`: every frame read or written carries the 12-byte virtio-net header, so the
//! guest's checksum and segmentation offloads pass straight through.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::header::NET_HDR_SIZE;
use super::{MacAddr, NetError};

/// `TUNSETVNETHDRSZ` (`_IOW('T', 216, int)`), missing from the libc crate.
const TUNSETVNETHDRSZ: libc::Ioctl = 0x4004_54d8;

/// `struct ifreq` with the part ember uses (name + flags), padded to the kernel's 40 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

impl IfReq {
    fn new(name: &str) -> Self {
        let mut r = Self {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // validate_tap_name() limits names to IFNAMSIZ - 1 bytes, leaving the NUL.
        for (d, s) in r.name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
            *d = s;
        }
        r
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// `struct ifreq` with an address (`ifr_addr`, `ifr_hwaddr`: a `struct sockaddr`), padded to
/// the kernel's 40 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct IfReqAddr {
    name: [u8; libc::IFNAMSIZ],
    family: libc::sa_family_t,
    data: [u8; 14],
    _pad: [u8; 8],
}

const _: () = assert!(std::mem::size_of::<IfReqAddr>() == 40);

impl IfReqAddr {
    fn new(name: &str) -> Self {
        Self {
            name: IfReq::new(name).name,
            family: 0,
            data: [0; 14],
            _pad: [0; 8],
        }
    }
}

/// Checks a network interface name: 1 to 15 bytes, no `/`, whitespace or `:`.
pub fn validate_tap_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the TAP name is empty".into());
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(format!(
            "TAP name {name:?} is longer than {} bytes",
            libc::IFNAMSIZ - 1
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(())
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the TAP `name` (creating it when it does not exist and ember has
    /// CAP_NET_ADMIN), non-blocking, with 12-byte virtio-net headers on every frame.
    pub fn open(name: &str) -> Result<Self, NetError> {
        validate_tap_name(name).map_err(NetError::BadName)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(NetError::OpenTun)?;
        let mut req = IfReq::new(name);
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and writes back) a struct ifreq; `req` is a live, 40-byte
        // ifreq and the fd is an open /dev/net/tun.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(tunsetiff_error(name, io::Error::last_os_error()));
        }
        let tap = Self {
            file,
            name: req.name(),
        };
        let size: libc::c_int = NET_HDR_SIZE as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer; `size` is a live int.
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) };
        if rc < 0 {
            return Err(NetError::Ioctl {
                tap: tap.name.clone(),
                what: "TUNSETVNETHDRSZ",
                source: io::Error::last_os_error(),
            });
        }
        Ok(tap)
    }

    /// A stand-in TAP on any file (a socket, in device tests and the `fuzz/` targets),
    /// called `name`. Not for real NICs: it skips the TAP set-up of [`Tap::open`].
    #[doc(hidden)]
    pub fn from_file(file: File, name: &str) -> Self {
        Self {
            file,
            name: name.to_string(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the TAP which offloads (`TUN_F_*`) the reader (the guest) accepts: it will only
    /// hand over frames that use those.
    pub fn set_offload(&self, flags: u32) -> Result<(), NetError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is an open TAP.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(NetError::Ioctl {
                tap: self.name.clone(),
                what: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Sets the interface up (as `ip link set NAME up`) if it is down. Needs CAP_NET_ADMIN;
    /// returns Ok(false) when it was already up.
    pub fn bring_up(&self) -> io::Result<bool> {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| {
            // No IPv4 in this namespace? Any datagram socket serves for SIOC*IFFLAGS.
            std::net::UdpSocket::bind("[::]:0")
        })?;
        let mut req = IfReq::new(&self.name);
        // SAFETY: SIOCGIFFLAGS fills the flags of a live ifreq; the fd is a socket.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if req.flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(false);
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads a live ifreq; the fd is a socket.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }

    /// The MAC address of the TAP's host end (`SIOCGIFHWADDR` on the TAP's own fd), which
    /// the guest's neighbour entries for the host's addresses name.
    pub fn host_mac(&self) -> io::Result<MacAddr> {
        let mut req = IfReqAddr::new(&self.name);
        // SAFETY: SIOCGIFHWADDR fills the sockaddr of a live, 40-byte ifreq; the fd is ours.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&req.data[..6]);
        Ok(MacAddr(mac))
    }

    /// The primary IPv4 address of the TAP's host end (`SIOCGIFADDR`), `None` when it has
    /// none (a TAP in a bridge, say).
    pub fn host_ipv4(&self) -> io::Result<Option<std::net::Ipv4Addr>> {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let mut req = IfReqAddr::new(&self.name);
        // SAFETY: SIOCGIFADDR fills the sockaddr of a live, 40-byte ifreq; the fd is a
        // socket.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFADDR, &mut req) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EADDRNOTAVAIL) => Ok(None),
                _ => Err(e),
            };
        }
        if i32::from(req.family) != libc::AF_INET {
            return Ok(None);
        }
        // A sockaddr_in: port (2 bytes), then the address.
        let [_, _, a, b, c, d, ..] = req.data;
        Ok(Some(std::net::Ipv4Addr::new(a, b, c, d)))
    }

    /// Reads one packet (virtio-net header + frame) into `buf`. A buffer shorter than the
    /// packet gets it truncated (the caller passes [`super::header::MAX_PACKET_SIZE`]).
    pub fn read_packet(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &self.file, buf)
    }

    /// Writes one packet (virtio-net header + frame).
    pub fn write_packet(&self, packet: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut &self.file, packet)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Turns a TUNSETIFF failure into an error that says what to do.
fn tunsetiff_error(name: &str, e: io::Error) -> NetError {
    let exists = Path::new("/sys/class/net").join(name).exists();
    match e.raw_os_error() {
        Some(libc::EPERM) if !exists => NetError::TapMissing(name.to_string()),
        Some(libc::EPERM) => NetError::TapPermission(name.to_string()),
        Some(libc::EBUSY) => NetError::TapBusy(name.to_string()),
        Some(libc::EINVAL) if exists => NetError::NotATap(name.to_string()),
        _ => NetError::Ioctl {
            tap: name.to_string(),
            what: "TUNSETIFF",
            source: e,
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::header::{tun_f, NetHeader};
    use super::*;
    use vm_memory::ByteValued;

    #[test]
    fn names() {
        assert!(validate_tap_name("tap0").is_ok());
        assert!(validate_tap_name("a-very-long-n15").is_ok());
        assert!(validate_tap_name("a-very-long-n16x")
            .unwrap_err()
            .contains("longer"));
        assert!(validate_tap_name("").is_err());
        assert!(validate_tap_name("a/b").is_err());
        assert!(validate_tap_name("a b").is_err());
        assert!(validate_tap_name("..").is_err());
        assert_eq!(IfReq::new("tap0").name(), "tap0");
    }

    /// Runs `f` on a thread in a fresh network namespace (only that thread moves), or
    /// returns false when this process may not create one.
    pub(crate) fn in_new_netns(f: impl FnOnce() + Send + 'static) -> bool {
        std::thread::spawn(move || {
            // SAFETY: unshare(2) with a flag only affects this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "skipped: cannot create a network namespace ({}); needs root",
                    io::Error::last_os_error()
                );
                return false;
            }
            f();
            true
        })
        .join()
        .unwrap()
    }

    #[test]
    fn open_configure_and_carry_frames_with_headers() {
        in_new_netns(|| {
            let tap = Tap::open("embertap0").unwrap();
            assert_eq!(tap.name(), "embertap0");
            assert!(tap.bring_up().unwrap(), "was down after creation");
            assert!(!tap.bring_up().unwrap());
            // The kernel accepts every combination ember asks for...
            for flags in [
                0,
                tun_f::CSUM,
                tun_f::CSUM | tun_f::TSO4 | tun_f::TSO6 | tun_f::TSO_ECN,
            ] {
                tap.set_offload(flags).unwrap();
            }
            // ...and refuses segmentation without checksum offload (why tun_offload_flags
            // never asks for it).
            assert!(tap.set_offload(tun_f::TSO4).is_err());
            // A second open of the same (single-queue, attached) TAP is refused clearly.
            let e = Tap::open("embertap0").unwrap_err();
            assert!(matches!(e, NetError::TapBusy(_)), "{e}");
            // Host traffic out of the TAP arrives as header + frame: make the host ARP for a
            // neighbour behind it.
            assert_eq!(tap.host_ipv4().unwrap(), None, "no address yet");
            let status = std::process::Command::new("ip")
                .args(["addr", "add", "10.11.12.1/24", "dev", "embertap0"])
                .status();
            if !status.is_ok_and(|s| s.success()) {
                eprintln!("skipped frame check: `ip` not usable");
                return;
            }
            assert_eq!(
                tap.host_ipv4().unwrap(),
                Some(std::net::Ipv4Addr::new(10, 11, 12, 1))
            );
            let sock = std::net::UdpSocket::bind("10.11.12.1:0").unwrap();
            let _ = sock.send_to(b"x", "10.11.12.2:9");
            let mut buf = vec![0u8; 65562];
            let mut n = 0;
            for _ in 0..500 {
                match tap.read_packet(&mut buf) {
                    Ok(len) => {
                        n = len;
                        // Skip IPv6 noise, if any; wait for the ARP request.
                        if buf[NET_HDR_SIZE + 12..NET_HDR_SIZE + 14] == [0x08, 0x06] {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            assert!(n >= NET_HDR_SIZE + 42, "an ARP request arrived ({n} bytes)");
            let hdr = NetHeader::from_slice(&buf[..NET_HDR_SIZE])
                .copied()
                .unwrap();
            assert_eq!({ hdr.gso_type }, 0);
            assert_eq!(
                &buf[NET_HDR_SIZE..NET_HDR_SIZE + 6],
                &[0xff; 6],
                "broadcast"
            );
            // Sent by the TAP's host end, whose MAC host_mac() reads.
            assert_eq!(
                &buf[NET_HDR_SIZE + 6..NET_HDR_SIZE + 12],
                &tap.host_mac().unwrap().0
            );
            // Writing a frame with a header works; a header with a bogus GSO type is refused
            // by the kernel (the device counts it as a TX error, nothing more).
            let mut pkt = vec![0u8; NET_HDR_SIZE + 60];
            pkt[NET_HDR_SIZE..NET_HDR_SIZE + 6].copy_from_slice(&[0xff; 6]);
            pkt[NET_HDR_SIZE + 6..NET_HDR_SIZE + 12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            pkt[NET_HDR_SIZE + 12..NET_HDR_SIZE + 14].copy_from_slice(&[0x88, 0xb5]);
            assert_eq!(tap.write_packet(&pkt).unwrap(), pkt.len());
            pkt[1] = 0x55; // gso_type
            assert!(tap.write_packet(&pkt).is_err());
        });
    }

    #[test]
    fn missing_tap_without_permission_says_how_to_create_it() {
        let e = tunsetiff_error("no-such-tap9", io::Error::from_raw_os_error(libc::EPERM));
        let msg = e.to_string();
        assert!(
            msg.contains("does not exist") && msg.contains("ip tuntap add"),
            "{msg}"
        );
        let e = tunsetiff_error("lo", io::Error::from_raw_os_error(libc::EPERM));
        assert!(e.to_string().contains("permission"), "{e}");
        let e = tunsetiff_error("lo", io::Error::from_raw_os_error(libc::EINVAL));
        assert!(e.to_string().contains("not a TAP"), "{e}");
    }
}
