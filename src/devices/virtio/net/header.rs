// SPDX-License-Identifier: Apache-2.0
//! The virtio-net packet header and offloads (virtio spec 5.1.6): which features ember
//! offers, what they mean for the TAP device (`TUNSETOFFLOAD`), and how a received frame is
//! spread over the guest's receive buffers (`VIRTIO_NET_F_MRG_RXBUF`).
//!
//! ember passes headers through untouched: the TAP device speaks the same `virtio_net_hdr`
//! (`IFF_VNET_HDR`, header size set to 12 with `TUNSETVNETHDRSZ`), so a checksum or
//! segmentation offload the guest asks for is done by the host kernel (or not needed at all
//! when the frame stays on the host), and a large TCP segment crosses as one frame.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};
use vm_memory::ByteValued;

/// Size of the header in front of every frame (`struct virtio_net_hdr_v1`, which a virtio
/// 1.x device always uses).
pub const NET_HDR_SIZE: usize = 12;

/// Largest frame (without header) a TAP with TSO can hand over: a 64 KiB IP packet plus an
/// Ethernet header with a VLAN tag.
pub const MAX_FRAME_SIZE: usize = 65535 + 18;

/// Largest header + frame ember moves in one go.
pub const MAX_PACKET_SIZE: usize = NET_HDR_SIZE + MAX_FRAME_SIZE;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The features ember's virtio-net offers (besides `VERSION_1`, which the transport adds).
pub const OFFERED_FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS);

/// `TUN_F_*` offload flags (linux/if_tun.h): what the TAP may hand us (and so the guest).
pub mod tun_f {
    /// Partial checksums are fine.
    pub const CSUM: u32 = 0x01;
    /// TCPv4 segments larger than the MTU.
    pub const TSO4: u32 = 0x02;
    /// TCPv6 segments larger than the MTU.
    pub const TSO6: u32 = 0x04;
    /// Large segments with ECN (CWR) set.
    pub const TSO_ECN: u32 = 0x08;
}

/// The `TUNSETOFFLOAD` flags for features the guest acked: the TAP may give us only what the
/// guest's receive path accepts (GUEST_*). The kernel refuses segmentation offloads without
/// the checksum offload, so those need GUEST_CSUM too.
pub fn tun_offload_flags(acked: u64) -> u32 {
    let has = |b: u32| acked & bit(b) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = tun_f::CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= tun_f::TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= tun_f::TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (tun_f::TSO4 | tun_f::TSO6) != 0 {
        flags |= tun_f::TSO_ECN;
    }
    flags
}

/// Whether the guest takes a frame in several receive buffers.
pub fn mergeable_rx(acked: u64) -> bool {
    acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
}

/// `struct virtio_net_hdr_v1` (fields little-endian).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct NetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Receive buffers this frame spans (with MRG_RXBUF; 1 otherwise).
    pub num_buffers: u16,
}

// SAFETY: NetHeader is repr(C, packed) with only integer fields: no padding, every bit
// pattern valid.
unsafe impl ByteValued for NetHeader {}

const _: () = assert!(std::mem::size_of::<NetHeader>() == NET_HDR_SIZE);

/// Sets `num_buffers` in a header at the start of `packet` (the TAP leaves those two bytes
/// alone).
pub fn set_num_buffers(packet: &mut [u8], n: u16) {
    if let Some(b) = packet.get_mut(10..12) {
        b.copy_from_slice(&n.to_le_bytes());
    }
}

/// Why a received packet cannot be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxPlan {
    /// Use the first `n` offered buffers (filled in order, the last one partly).
    Use(usize),
    /// The buffers offered so far are too small together; more may come.
    NeedMore,
    /// No set of buffers the guest can offer holds this packet: drop it.
    TooLarge,
}

/// How a packet of `len` bytes (header included) goes into receive buffers whose writable
/// sizes are `caps` (in ring order), given at most `max_buffers` can ever be offered (the
/// queue size). Without mergeable buffers the packet must fit the first buffer alone.
pub fn plan_rx(len: usize, caps: &[usize], mergeable: bool, max_buffers: usize) -> RxPlan {
    if !mergeable {
        return match caps.first() {
            None => RxPlan::NeedMore,
            Some(&c) if c >= len => RxPlan::Use(1),
            Some(_) => RxPlan::TooLarge,
        };
    }
    let mut total = 0usize;
    for (i, &c) in caps.iter().enumerate() {
        if i == 0 && c < NET_HDR_SIZE {
            // The header (with num_buffers) must sit in the first buffer.
            return RxPlan::TooLarge;
        }
        total = total.saturating_add(c);
        if total >= len {
            return RxPlan::Use(i + 1);
        }
    }
    if caps.len() >= max_buffers || caps.len() >= usize::from(u16::MAX) {
        RxPlan::TooLarge
    } else {
        RxPlan::NeedMore
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let h = NetHeader {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x0102u16.to_le(),
            gso_size: 1448u16.to_le(),
            csum_start: 34u16.to_le(),
            csum_offset: 16u16.to_le(),
            num_buffers: 3u16.to_le(),
        };
        let b = h.as_slice();
        assert_eq!(b.len(), 12);
        assert_eq!(&b[..4], &[1, 4, 2, 1]);
        assert_eq!(&b[4..6], &1448u16.to_le_bytes());
        assert_eq!(&b[10..12], &[3, 0]);
        let mut pkt = vec![0xaau8; 20];
        set_num_buffers(&mut pkt, 0x0201);
        assert_eq!(&pkt[10..12], &[1, 2]);
        assert_eq!(pkt[9], 0xaa);
        set_num_buffers(&mut [0u8; 4], 1); // too short: ignored, no panic
    }

    #[test]
    fn offloads_follow_guest_features() {
        assert_eq!(tun_offload_flags(0), 0);
        // Segmentation without checksum offload is not possible.
        assert_eq!(tun_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(tun_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM)), tun_f::CSUM);
        assert_eq!(
            tun_offload_flags(OFFERED_FEATURES),
            tun_f::CSUM | tun_f::TSO4 | tun_f::TSO6 | tun_f::TSO_ECN
        );
        let no_tso = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN);
        assert_eq!(tun_offload_flags(no_tso), tun_f::CSUM, "ECN only with TSO");
        // HOST_* features are what the guest may send: they do not change the TAP.
        assert_eq!(
            tun_offload_flags(bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_CSUM)),
            0
        );
        assert!(mergeable_rx(OFFERED_FEATURES));
        assert!(!mergeable_rx(
            OFFERED_FEATURES & !bit(VIRTIO_NET_F_MRG_RXBUF)
        ));
    }

    #[test]
    fn rx_plans() {
        use RxPlan::*;
        // One buffer big enough.
        assert_eq!(plan_rx(1500, &[1526], false, 256), Use(1));
        assert_eq!(plan_rx(1500, &[1526, 1526], true, 256), Use(1));
        // Without mergeable buffers a small first buffer means drop.
        assert_eq!(plan_rx(4000, &[1526, 65562], false, 256), TooLarge);
        assert_eq!(plan_rx(100, &[], false, 256), NeedMore);
        // Mergeable: spread over several, exact fit included.
        assert_eq!(plan_rx(3000, &[1500, 1500], true, 256), Use(2));
        assert_eq!(plan_rx(3001, &[1500, 1500, 1500], true, 256), Use(3));
        assert_eq!(plan_rx(65562, &[4096; 16], true, 256), NeedMore);
        assert_eq!(plan_rx(65562, &[4096; 17], true, 256), Use(17));
        // Not enough yet, but more can come; or the whole ring cannot hold it.
        assert_eq!(plan_rx(10_000, &[1500; 4], true, 256), NeedMore);
        assert_eq!(plan_rx(10_000, &[1500; 4], true, 4), TooLarge);
        // The header must fit the first buffer.
        assert_eq!(plan_rx(100, &[4, 200], true, 256), TooLarge);
        // Zero-sized buffers do not loop forever or overflow.
        assert_eq!(plan_rx(10, &[usize::MAX, usize::MAX], true, 256), Use(1));
        assert_eq!(plan_rx(10, &[12, 0, 0], true, 3), Use(1));
    }
}
