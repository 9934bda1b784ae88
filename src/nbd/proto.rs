//! NBD wire format: the protocol's numbers and the few fixed-size messages, encoded and decoded in
//! one place. Everything on the wire is big-endian.

use byteorder::{BigEndian, ByteOrder};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// NBD_OPT_INFO / NBD_OPT_GO information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// base:allocation descriptor flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

pub const BASE_ALLOCATION: &str = "base:allocation";

/// NBD error numbers. They happen to equal Linux errnos, but the protocol fixes them, so they are
/// spelled out rather than borrowed from libc.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The NBD error a store errno travels as; anything the protocol has no word for is an I/O error.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL | libc::ENOENT => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;

/// One transmission-phase request header (the payload, if any, follows on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// `None` when the magic is wrong: the stream is out of step and cannot be trusted further.
    pub fn unpack(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if BigEndian::read_u32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: BigEndian::read_u16(&b[4..6]),
            command: BigEndian::read_u16(&b[6..8]),
            handle: BigEndian::read_u64(&b[8..16]),
            offset: BigEndian::read_u64(&b[16..24]),
            len: BigEndian::read_u32(&b[24..28]),
        })
    }

    pub fn pack(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        BigEndian::write_u32(&mut b[0..4], REQUEST_MAGIC);
        BigEndian::write_u16(&mut b[4..6], self.flags);
        BigEndian::write_u16(&mut b[6..8], self.command);
        BigEndian::write_u64(&mut b[8..16], self.handle);
        BigEndian::write_u64(&mut b[16..24], self.offset);
        BigEndian::write_u32(&mut b[24..28], self.len);
        b
    }
}

pub fn pack_simple_reply(out: &mut [u8], error: u32, handle: u64) {
    BigEndian::write_u32(&mut out[0..4], SIMPLE_REPLY_MAGIC);
    BigEndian::write_u32(&mut out[4..8], error);
    BigEndian::write_u64(&mut out[8..16], handle);
}

pub fn pack_chunk_header(out: &mut [u8], flags: u16, kind: u16, handle: u64, len: u32) {
    BigEndian::write_u32(&mut out[0..4], STRUCTURED_REPLY_MAGIC);
    BigEndian::write_u16(&mut out[4..6], flags);
    BigEndian::write_u16(&mut out[6..8], kind);
    BigEndian::write_u64(&mut out[8..16], handle);
    BigEndian::write_u32(&mut out[16..20], len);
}

/// Appends big-endian integers to a reply being built.
pub trait PutBe {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl PutBe for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
}

/// Reads big-endian fields from an option's data, refusing to run past its end.
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }
    pub fn remaining(&self) -> usize {
        self.data.len()
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(BigEndian::read_u16)
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(BigEndian::read_u32)
    }
    /// A u32-length-prefixed UTF-8 string of at most `max` bytes.
    pub fn string(&mut self, max: usize) -> Option<&'a str> {
        let len = self.u32()? as usize;
        if len > max {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(Request::unpack(&r.pack()), Some(r));
    }

    #[test]
    fn request_with_bad_magic_is_rejected() {
        let mut b = Request {
            flags: 0,
            command: CMD_READ,
            handle: 1,
            offset: 0,
            len: 1,
        }
        .pack();
        b[0] ^= 1;
        assert_eq!(Request::unpack(&b), None);
    }

    #[test]
    fn cursor_stops_at_the_end() {
        let mut data = Vec::new();
        data.put_u32(10);
        data.extend_from_slice(b"abc");
        assert_eq!(Cursor::new(&data).string(4096), None);
        let mut c = Cursor::new(&data);
        assert_eq!(c.u16(), Some(0));
        assert_eq!(c.remaining(), 5);
    }

    #[test]
    fn errnos_map_onto_the_protocol_set() {
        assert_eq!(nbd_errno(libc::ENOENT), EINVAL);
        assert_eq!(nbd_errno(libc::EBUSY), EIO);
        assert_eq!(nbd_errno(libc::ENOSPC), ENOSPC);
        assert_eq!(nbd_errno(libc::EPERM), EPERM);
    }
}
