//! Metadata pages. A metadata stream (the checkpoint, or the log) is a byte stream cut into 4 KiB
//! pages linked by page number. Every page carries its stream id and sequence number, so a page
//! left over from an older stream, or one never written, fails verification.

use super::checksum::{self, Kind};
use super::PAGE_SIZE;
use crate::error::{Error, Result};
use byteorder::{ByteOrder, LittleEndian as LE};

pub const HEADER_LEN: usize = 32;
pub const PAYLOAD_MAX: usize = PAGE_SIZE - HEADER_LEN;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHeader {
    pub kind: Kind,
    pub stream_id: u64,
    pub seq: u32,
    pub payload_len: u32,
    /// Page number of the next page of the stream (0 = none).
    pub next: u64,
}

/// Build a page: header, payload, zero padding, checksum written last.
pub fn encode(h: &PageHeader, payload: &[u8], out: &mut [u8; PAGE_SIZE]) {
    debug_assert!(payload.len() <= PAYLOAD_MAX && payload.len() == h.payload_len as usize);
    out.fill(0);
    LE::write_u32(&mut out[4..8], h.kind as u32);
    LE::write_u64(&mut out[8..16], h.stream_id);
    LE::write_u32(&mut out[16..20], h.seq);
    LE::write_u32(&mut out[20..24], h.payload_len);
    LE::write_u64(&mut out[24..32], h.next);
    out[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    let crc = checksum::metadata(h.kind, &out[4..]);
    LE::write_u32(&mut out[0..4], crc);
}

/// Verify a page read from `page_no` against what the stream expects there; return its header.
pub fn decode(
    b: &[u8; PAGE_SIZE],
    page_no: u64,
    kind: Kind,
    stream_id: u64,
    seq: u32,
) -> Result<PageHeader> {
    let what = match kind {
        Kind::CheckpointPage => "checkpoint",
        Kind::LogPage => "log",
        Kind::Superblock => "superblock",
    };
    let bad = |m: String| {
        Error::Corrupt(format!(
            "{what} page {seq} at byte offset {} (page {page_no}): {m}",
            page_no * PAGE_SIZE as u64
        ))
    };
    let stored = LE::read_u32(&b[0..4]);
    let actual = checksum::metadata(kind, &b[4..]);
    if stored != actual {
        return Err(bad(format!(
            "checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
        )));
    }
    let h = PageHeader {
        kind,
        stream_id: LE::read_u64(&b[8..16]),
        seq: LE::read_u32(&b[16..20]),
        payload_len: LE::read_u32(&b[20..24]),
        next: LE::read_u64(&b[24..32]),
    };
    if LE::read_u32(&b[4..8]) != kind as u32 {
        return Err(bad("wrong page kind".into()));
    }
    if h.stream_id != stream_id || h.seq != seq {
        return Err(bad(format!(
            "belongs to stream {} page {}, expected stream {stream_id}",
            h.stream_id, h.seq
        )));
    }
    if h.payload_len as usize > PAYLOAD_MAX {
        return Err(bad(format!("payload length {} too large", h.payload_len)));
    }
    Ok(h)
}

pub fn payload<'a>(b: &'a [u8; PAGE_SIZE], h: &PageHeader) -> &'a [u8] {
    &b[HEADER_LEN..HEADER_LEN + h.payload_len as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log page header with a five-byte payload ("hello").
    fn hello_header() -> PageHeader {
        PageHeader {
            kind: Kind::LogPage,
            stream_id: 9,
            seq: 3,
            payload_len: 5,
            next: 77,
        }
    }

    #[test]
    fn round_trip_and_mismatches() {
        let h = hello_header();
        let mut p = [0u8; PAGE_SIZE];
        encode(&h, b"hello", &mut p);
        let got = decode(&p, 12, Kind::LogPage, 9, 3).unwrap();
        assert_eq!(got, h);
        assert_eq!(payload(&p, &got), b"hello");
        assert!(decode(&p, 12, Kind::CheckpointPage, 9, 3).is_err());
        assert!(decode(&p, 12, Kind::LogPage, 8, 3).is_err());
        assert!(decode(&p, 12, Kind::LogPage, 9, 4).is_err());
        let mut q = p;
        q[100] ^= 1;
        let e = decode(&q, 12, Kind::LogPage, 9, 3).unwrap_err().to_string();
        assert!(e.contains("byte offset 49152"), "{e}");
    }

    /// Headers as the encoder with literal offsets wrote them (crc kind stream_id seq
    /// payload_len next), captured before the field table existed.
    #[test]
    fn encodes_to_the_golden_bytes() {
        let h = hello_header();
        let mut p = [0u8; PAGE_SIZE];
        encode(&h, b"hello", &mut p);
        let golden = crate::format::unhex(
            "9c4d372a 50474f4c 0900000000000000 03000000 05000000 4d00000000000000 68656c6c6f",
        );
        assert_eq!(p[..golden.len()], golden[..]);
        assert!(
            p[golden.len()..].iter().all(|&b| b == 0),
            "padding not zero"
        );

        let full: Vec<u8> = (0..PAYLOAD_MAX).map(|i| (i * 7 + 3) as u8).collect();
        let h = PageHeader {
            kind: Kind::CheckpointPage,
            stream_id: 0x1122_3344_5566_7788,
            seq: 0xfeed_beef,
            payload_len: PAYLOAD_MAX as u32,
            next: 0,
        };
        encode(&h, &full, &mut p);
        let golden = crate::format::unhex(
            "2c142d23 54504b43 8877665544332211 efbeedfe e00f0000 0000000000000000",
        );
        assert_eq!(p[..HEADER_LEN], golden[..]);
        assert_eq!(p[HEADER_LEN..], full[..]);
        assert_eq!(
            decode(&p, 5, Kind::CheckpointPage, h.stream_id, h.seq).unwrap(),
            h
        );
    }
}
