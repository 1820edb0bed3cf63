// SPDX-License-Identifier: Apache-2.0
//! The virtio-vsock packet header (virtio spec 5.10.6, `struct virtio_vsock_hdr`): 44
//! little-endian bytes in front of every packet on the rx and tx queues, with the operation
//! codes, socket type and shutdown flags it carries.

use vm_memory::ByteValued;

/// Size of [`VsockHeader`] on the wire.
pub const HEADER_SIZE: usize = 44;

/// The host's CID (`VMADDR_CID_HOST`): guest packets for the host carry it as `dst_cid`.
pub const HOST_CID: u64 = 2;

/// Stream sockets (`VIRTIO_VSOCK_TYPE_STREAM`), the only type ember offers.
pub const TYPE_STREAM: u16 = 1;

/// `SHUTDOWN` flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `SHUTDOWN` flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations (`VIRTIO_VSOCK_OP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection refused or torn down.
    Rst = 3,
    /// No more data in one or both directions (`flags`).
    Shutdown = 4,
    /// Data (`len` payload bytes follow the header).
    Rw = 5,
    /// Unsolicited credit information.
    CreditUpdate = 6,
    /// Asks the peer for a credit update.
    CreditRequest = 7,
}

impl Op {
    /// The operation for a raw `op` field, if it is one.
    pub fn from_raw(op: u16) -> Option<Self> {
        Some(match op {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, as it lies in guest memory. Fields are stored little-endian;
/// use the accessors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct VsockHeader {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

// SAFETY: VsockHeader is repr(C, packed) with only integer fields: no padding, and every bit
// pattern is a valid value.
unsafe impl ByteValued for VsockHeader {}

const _: () = assert!(std::mem::size_of::<VsockHeader>() == HEADER_SIZE);

macro_rules! accessors {
    ($($get:ident, $set:ident: $t:ty;)*) => {
        $(
            #[doc = concat!("The `", stringify!($get), "` field.")]
            pub fn $get(&self) -> $t {
                <$t>::from_le(self.$get)
            }
            #[doc = concat!("Sets the `", stringify!($get), "` field.")]
            pub fn $set(&mut self, v: $t) -> &mut Self {
                self.$get = v.to_le();
                self
            }
        )*
    };
}

#[allow(clippy::len_without_is_empty)] // `len` is the payload length field
impl VsockHeader {
    accessors! {
        src_cid, set_src_cid: u64;
        dst_cid, set_dst_cid: u64;
        src_port, set_src_port: u32;
        dst_port, set_dst_port: u32;
        len, set_len: u32;
        op, set_op_raw: u16;
        flags, set_flags: u32;
        buf_alloc, set_buf_alloc: u32;
        fwd_cnt, set_fwd_cnt: u32;
    }

    /// The socket type field.
    pub fn type_(&self) -> u16 {
        u16::from_le(self.type_)
    }

    /// Sets the socket type field.
    pub fn set_type(&mut self, v: u16) -> &mut Self {
        self.type_ = v.to_le();
        self
    }

    /// Sets the operation.
    pub fn set_op(&mut self, op: Op) -> &mut Self {
        self.set_op_raw(op as u16)
    }

    /// The operation, when the field holds a known one.
    pub fn known_op(&self) -> Option<Op> {
        Op::from_raw(self.op())
    }

    /// A stream packet from `(src_cid, src_port)` to `(dst_cid, dst_port)` with operation
    /// `op` and no payload.
    pub fn new(src: (u64, u32), dst: (u64, u32), op: Op) -> Self {
        let mut h = Self::default();
        h.set_src_cid(src.0)
            .set_src_port(src.1)
            .set_dst_cid(dst.0)
            .set_dst_port(dst.1)
            .set_type(TYPE_STREAM)
            .set_op(op);
        h
    }

    /// Parses a header from the first [`HEADER_SIZE`] bytes of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Self::from_slice(bytes.get(..HEADER_SIZE)?).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_layout_is_little_endian_and_44_bytes() {
        let mut h = VsockHeader::new((3, 1024), (HOST_CID, 52), Op::Rw);
        h.set_len(5)
            .set_flags(SHUTDOWN_SEND)
            .set_buf_alloc(0x1122_3344)
            .set_fwd_cnt(7);
        let b = h.as_slice();
        assert_eq!(b.len(), 44);
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[8..16], &2u64.to_le_bytes());
        assert_eq!(&b[16..20], &1024u32.to_le_bytes());
        assert_eq!(&b[20..24], &52u32.to_le_bytes());
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[32..36], &2u32.to_le_bytes());
        assert_eq!(&b[36..40], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
        let back = VsockHeader::from_bytes(b).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.known_op(), Some(Op::Rw));
    }

    #[test]
    fn short_buffers_and_unknown_ops() {
        assert!(VsockHeader::from_bytes(&[0u8; 43]).is_none());
        let mut h = VsockHeader::default();
        h.set_op_raw(99);
        assert_eq!(h.known_op(), None);
        for op in 1..=7 {
            assert_eq!(Op::from_raw(op).map(|o| o as u16), Some(op));
        }
        assert_eq!(Op::from_raw(0), None);
    }
}
