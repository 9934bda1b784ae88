//! Transmission replies: the simple reply header, the structured chunk header, and the chunk
//! payloads (data, hole, block status, error). A READ's data is not copied through here: the
//! server lays the header down with `begin_offset_data` and reads the device straight into the
//! space behind it.

use super::be::{fixed_message, Cursor, Put};
use super::{
    REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use std::ops::Range;

fixed_message! {
    /// A simple reply's header; a successful READ's data follows it.
    pub struct SimpleReply {
        magic u32 = SIMPLE_REPLY_MAGIC,
        pub error: u32,
        pub handle: u64,
    }
}

fixed_message! {
    /// A structured reply chunk's header; `len` payload bytes follow.
    pub struct ChunkHeader {
        magic u32 = STRUCTURED_REPLY_MAGIC,
        /// `REPLY_FLAG_*`.
        pub flags: u16,
        /// `REPLY_TYPE_*`.
        pub kind: u16,
        pub handle: u64,
        pub len: u32,
    }
}

/// Either reply header, told apart by its magic (what a client reads first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple(SimpleReply),
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    pub const MAGIC_LEN: usize = 4;

    /// The length of the whole header that begins with `magic`; `None` for neither magic.
    pub fn header_len(magic: &[u8; Self::MAGIC_LEN]) -> Option<usize> {
        match u32::from_be_bytes(*magic) {
            SIMPLE_REPLY_MAGIC => Some(SimpleReply::LEN),
            STRUCTURED_REPLY_MAGIC => Some(ChunkHeader::LEN),
            _ => None,
        }
    }

    /// `b` is a whole header, as long as `header_len` said.
    pub fn unpack(b: &[u8]) -> Option<ReplyHeader> {
        if let Ok(simple) = b.try_into() {
            return SimpleReply::unpack(simple).map(ReplyHeader::Simple);
        }
        ChunkHeader::unpack(b.try_into().ok()?).map(ReplyHeader::Chunk)
    }
}

/// One `base:allocation` (or other context) extent in a block status chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub len: u32,
    /// `STATE_*`.
    pub flags: u32,
}

/// A structured reply chunk's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    None,
    OffsetData {
        offset: u64,
        data: &'a [u8],
    },
    OffsetHole {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        context: u32,
        descriptors: Vec<Descriptor>,
    },
    /// The message is for people; the client acts on `error` alone.
    Error {
        error: u32,
        message: &'a str,
    },
    /// A type this codec does not know.
    Other {
        kind: u16,
        data: &'a [u8],
    },
}

impl<'a> Chunk<'a> {
    pub fn kind(&self) -> u16 {
        match self {
            Chunk::None => REPLY_TYPE_NONE,
            Chunk::OffsetData { .. } => REPLY_TYPE_OFFSET_DATA,
            Chunk::OffsetHole { .. } => REPLY_TYPE_OFFSET_HOLE,
            Chunk::BlockStatus { .. } => REPLY_TYPE_BLOCK_STATUS,
            Chunk::Error { .. } => REPLY_TYPE_ERROR,
            Chunk::Other { kind, .. } => *kind,
        }
    }

    /// Appends the chunk, header and payload, to `out`.
    pub fn pack_into(&self, flags: u16, handle: u64, out: &mut Vec<u8>) {
        let at = out.len();
        out.resize(at + ChunkHeader::LEN, 0);
        match self {
            Chunk::None => {}
            Chunk::OffsetData { offset, data } => {
                out.put_u64(*offset);
                out.extend_from_slice(data);
            }
            Chunk::OffsetHole { offset, len } => {
                out.put_u64(*offset);
                out.put_u32(*len);
            }
            Chunk::BlockStatus {
                context,
                descriptors,
            } => {
                out.reserve(4 + 8 * descriptors.len());
                out.put_u32(*context);
                for d in descriptors {
                    out.put_u32(d.len);
                    out.put_u32(d.flags);
                }
            }
            Chunk::Error { error, message } => {
                out.put_u32(*error);
                let message = super::be::bounded(message);
                out.put_u16(message.len() as u16);
                out.extend_from_slice(message.as_bytes());
            }
            Chunk::Other { data, .. } => out.extend_from_slice(data),
        }
        let header = ChunkHeader {
            flags,
            kind: self.kind(),
            handle,
            len: (out.len() - at - ChunkHeader::LEN) as u32,
        };
        header.pack_into(&mut out[at..]);
    }

    /// Decodes the payload of a chunk of type `kind`; `None` if it is malformed.
    pub fn unpack(kind: u16, payload: &'a [u8]) -> Option<Chunk<'a>> {
        let mut c = Cursor::new(payload);
        let chunk = match kind {
            REPLY_TYPE_NONE => Chunk::None,
            REPLY_TYPE_OFFSET_DATA => {
                let offset = c.u64()?;
                let data = c.take(c.remaining())?;
                if data.is_empty() {
                    return None; // the protocol forbids empty data chunks
                }
                Chunk::OffsetData { offset, data }
            }
            REPLY_TYPE_OFFSET_HOLE => Chunk::OffsetHole {
                offset: c.u64()?,
                len: c.u32()?,
            },
            REPLY_TYPE_BLOCK_STATUS => {
                let context = c.u32()?;
                if c.remaining() == 0 || !c.remaining().is_multiple_of(8) {
                    return None;
                }
                let mut descriptors = Vec::with_capacity(c.remaining() / 8);
                while c.remaining() > 0 {
                    descriptors.push(Descriptor {
                        len: c.u32()?,
                        flags: c.u32()?,
                    });
                }
                Chunk::BlockStatus {
                    context,
                    descriptors,
                }
            }
            REPLY_TYPE_ERROR => {
                let error = c.u32()?;
                let len = c.u16()? as usize;
                let message = std::str::from_utf8(c.take(len)?).ok()?;
                Chunk::Error { error, message }
            }
            kind => Chunk::Other {
                kind,
                data: c.take(c.remaining())?,
            },
        };
        c.end(chunk)
    }
}

/// Appends an OFFSET_DATA chunk for `len` bytes at `offset`, leaving its data zeroed, and
/// returns where in `out` the data goes: the caller reads the device straight into it.
pub fn begin_offset_data(
    out: &mut Vec<u8>,
    flags: u16,
    handle: u64,
    offset: u64,
    len: u32,
) -> Range<usize> {
    let at = out.len();
    out.resize(at + ChunkHeader::LEN, 0);
    let header = ChunkHeader {
        flags,
        kind: REPLY_TYPE_OFFSET_DATA,
        handle,
        len: 8 + len,
    };
    header.pack_into(&mut out[at..]);
    out.put_u64(offset);
    let data = out.len();
    out.resize(data + len as usize, 0);
    data..out.len()
}

#[cfg(test)]
mod tests {
    use super::super::*;

    #[test]
    fn simple_reply_round_trips_and_has_the_spec_layout() {
        let r = SimpleReply {
            error: EIO,
            handle: 0x0102_0304_0506_0708,
        };
        let b = r.pack();
        assert_eq!(b[..4], [0x67, 0x44, 0x66, 0x98]);
        assert_eq!(b[4..], [0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(SimpleReply::unpack(&b), Some(r));
        let mut bad = b;
        bad[3] ^= 1;
        assert_eq!(SimpleReply::unpack(&bad), None);
    }

    #[test]
    fn chunk_header_round_trips_and_has_the_spec_layout() {
        let h = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_ERROR,
            handle: 9,
            len: 0x0a0b_0c0d,
        };
        let b = h.pack();
        assert_eq!(b[..4], [0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(b[4..8], [0, 1, 0x80, 1]);
        assert_eq!(b[16..], [0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(ChunkHeader::unpack(&b), Some(h));
        assert_eq!(ReplyHeader::unpack(&b), Some(ReplyHeader::Chunk(h)));
    }

    #[test]
    fn reply_headers_are_told_apart_by_magic() {
        let simple = SimpleReply {
            error: 0,
            handle: 3,
        }
        .pack();
        let chunk = ChunkHeader {
            flags: 0,
            kind: REPLY_TYPE_NONE,
            handle: 3,
            len: 0,
        }
        .pack();
        let magic = |b: &[u8]| -> [u8; 4] { b[..4].try_into().unwrap() };
        assert_eq!(ReplyHeader::header_len(&magic(&simple)), Some(16));
        assert_eq!(ReplyHeader::header_len(&magic(&chunk)), Some(20));
        assert_eq!(ReplyHeader::header_len(&[0xde, 0xad, 0xbe, 0xef]), None);
        assert!(matches!(
            ReplyHeader::unpack(&simple),
            Some(ReplyHeader::Simple(_))
        ));
        assert_eq!(ReplyHeader::unpack(&chunk[..16]), None);
    }

    fn round_trip(chunk: Chunk) {
        let mut out = vec![0xee]; // chunks append
        chunk.pack_into(REPLY_FLAG_DONE, 77, &mut out);
        let header = ChunkHeader::unpack(out[1..21].try_into().unwrap()).unwrap();
        assert_eq!(
            (header.flags, header.kind, header.handle),
            (REPLY_FLAG_DONE, chunk.kind(), 77)
        );
        assert_eq!(header.len as usize, out.len() - 21);
        assert_eq!(Chunk::unpack(header.kind, &out[21..]), Some(chunk));
    }

    #[test]
    fn every_chunk_round_trips() {
        round_trip(Chunk::None);
        round_trip(Chunk::OffsetData {
            offset: 1 << 35,
            data: b"data",
        });
        round_trip(Chunk::OffsetHole {
            offset: 4096,
            len: 1 << 20,
        });
        round_trip(Chunk::BlockStatus {
            context: 1,
            descriptors: vec![
                Descriptor {
                    len: 4096,
                    flags: STATE_HOLE | STATE_ZERO,
                },
                Descriptor { len: 512, flags: 0 },
            ],
        });
        round_trip(Chunk::Error {
            error: ENOSPC,
            message: "pool full",
        });
        round_trip(Chunk::Other {
            kind: 0x8002,
            data: b"\0\0\0\x05\0\0",
        });
    }

    #[test]
    fn block_status_and_error_payloads_have_the_spec_layout() {
        let mut out = Vec::new();
        Chunk::BlockStatus {
            context: 1,
            descriptors: vec![Descriptor {
                len: 4096,
                flags: 3,
            }],
        }
        .pack_into(0, 0, &mut out);
        assert_eq!(out[20..], [0, 0, 0, 1, 0, 0, 16, 0, 0, 0, 0, 3]);
        out.clear();
        Chunk::Error {
            error: EINVAL,
            message: "no",
        }
        .pack_into(0, 0, &mut out);
        assert_eq!(out[20..], [0, 0, 0, 22, 0, 2, b'n', b'o']);
    }

    #[test]
    fn malformed_chunks_are_refused() {
        fn t(kind: u16, p: &[u8]) -> Option<Chunk<'_>> {
            Chunk::unpack(kind, p)
        }
        assert_eq!(t(REPLY_TYPE_NONE, &[0]), None);
        assert_eq!(t(REPLY_TYPE_OFFSET_DATA, &[0; 8]), None, "no data");
        assert_eq!(t(REPLY_TYPE_OFFSET_HOLE, &[0; 11]), None);
        assert_eq!(t(REPLY_TYPE_BLOCK_STATUS, &[0; 4]), None, "no extents");
        assert_eq!(t(REPLY_TYPE_BLOCK_STATUS, &[0; 16]), None, "half an extent");
        assert_eq!(t(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 3, b'a']), None);
        assert_eq!(t(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 1, 0xff]), None);
    }

    #[test]
    fn error_messages_are_bounded_to_a_protocol_string() {
        let long = "x".repeat(3 * MAX_STRING);
        let mut out = Vec::new();
        Chunk::Error {
            error: EIO,
            message: &long,
        }
        .pack_into(0, 0, &mut out);
        match Chunk::unpack(REPLY_TYPE_ERROR, &out[20..]) {
            Some(Chunk::Error { message, .. }) => assert_eq!(message.len(), MAX_STRING),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn begin_offset_data_leaves_room_for_the_data_behind_a_true_header() {
        let mut out = vec![1, 2, 3];
        let data = begin_offset_data(&mut out, 0, 5, 8192, 6);
        assert_eq!(data, 31..37);
        out[data].copy_from_slice(b"abcdef");
        let header = ChunkHeader::unpack(out[3..23].try_into().unwrap()).unwrap();
        assert_eq!(
            (header.kind, header.handle, header.len),
            (REPLY_TYPE_OFFSET_DATA, 5, 14)
        );
        assert_eq!(
            Chunk::unpack(header.kind, &out[23..]),
            Some(Chunk::OffsetData {
                offset: 8192,
                data: b"abcdef"
            })
        );
    }
}
