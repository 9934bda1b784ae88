//! Metadata pages. A metadata stream (the checkpoint, or the log) is a byte stream cut into 4 KiB
//! pages linked by page number. Every page carries its stream id and sequence number, so a page
//! left over from an older stream, or one never written, fails verification.

use super::checksum::{self, Kind};
use super::field::layout;
use super::PAGE_SIZE;
use crate::error::{Error, Result};

layout! {
    /// The page header's fields, in the order and with the names of docs/FORMAT.md §4.
    pub mod header {
        CRC: u32 = "crc",
        KIND: u32 = "kind",
        STREAM_ID: u64 = "stream_id",
        SEQ: u32 = "seq",
        PAYLOAD_LEN: u32 = "payload_len",
        NEXT: u64 = "next",
        COMMIT: u64 = "commit",
        FLAGS: u32 = "flags",
        RESERVED: u32 = "reserved",
    }
}

/// `flags`: this page is the last of its commit. A log commit's pages are whole only up to
/// and including the page that carries it (docs/FORMAT.md §5.5).
pub const FLAG_COMMIT_END: u32 = 1;
use header as f;

pub const HEADER_LEN: usize = f::LEN;
pub const PAYLOAD_MAX: usize = PAGE_SIZE - HEADER_LEN;
const _: () = assert!(f::CRC.same_bytes(&checksum::CRC));
const _: () = assert!(Kind::CheckpointPage.sealed_len() == PAGE_SIZE);
const _: () = assert!(Kind::LogPage.sealed_len() == PAGE_SIZE);
const _: () = assert!(Kind::ChecksumPage.sealed_len() == PAGE_SIZE);

/// Data crcs in one checksum page's payload (FORMAT.md §5.6): 4 bytes each, little-endian.
pub const SUMS_PER_PAGE: usize = PAYLOAD_MAX / 4;

/// A checksum page's payload: `crcs` (at most `SUMS_PER_PAGE`) as stored.
pub fn encode_sums(crcs: &[u32]) -> Vec<u8> {
    debug_assert!(crcs.len() <= SUMS_PER_PAGE);
    crcs.iter().flat_map(|c| c.to_le_bytes()).collect()
}

/// The crcs of a verified checksum page's payload, appended to `out`; a payload that is not
/// a whole number of crcs is damage.
pub fn decode_sums(payload: &[u8], page_no: u64, out: &mut Vec<u32>) -> Result<()> {
    if !payload.len().is_multiple_of(4) {
        return Err(Error::Corrupt(format!(
            "checksum page at byte offset {}: payload of {} bytes is not whole crcs",
            page_no * PAGE_SIZE as u64,
            payload.len()
        )));
    }
    out.extend(
        payload
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap())),
    );
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHeader {
    pub kind: Kind,
    pub stream_id: u64,
    pub seq: u32,
    pub payload_len: u32,
    /// Page number of the next page of the stream (0 = none).
    pub next: u64,
    /// The number of the commit that wrote the page (§5.5).
    pub commit: u64,
    pub flags: u32,
}

/// Build a page: header, payload, zero padding, checksum written last.
pub fn encode(h: &PageHeader, payload: &[u8], out: &mut [u8; PAGE_SIZE]) {
    debug_assert!(payload.len() <= PAYLOAD_MAX && payload.len() == h.payload_len as usize);
    debug_assert!(h.kind != Kind::Superblock, "a superblock is not a page");
    out.fill(0);
    f::KIND.put(out, h.kind as u32);
    f::STREAM_ID.put(out, h.stream_id);
    f::SEQ.put(out, h.seq);
    f::PAYLOAD_LEN.put(out, h.payload_len);
    f::NEXT.put(out, h.next);
    f::COMMIT.put(out, h.commit);
    f::FLAGS.put(out, h.flags);
    out[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    checksum::seal(h.kind, out);
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
        Kind::ChecksumPage => "checksum",
        Kind::Superblock => "superblock",
    };
    let bad = |m: String| {
        Error::Corrupt(format!(
            "{what} page {seq} at byte offset {} (page {page_no}): {m}",
            page_no * PAGE_SIZE as u64
        ))
    };
    if kind == Kind::Superblock {
        // Its seal covers 128 bytes, not a page: no page verifies as one.
        return Err(bad("a superblock is not a metadata page".into()));
    }
    checksum::verify(kind, b).map_err(|m| bad(m.to_string()))?;
    let h = PageHeader {
        kind,
        stream_id: f::STREAM_ID.get(b),
        seq: f::SEQ.get(b),
        payload_len: f::PAYLOAD_LEN.get(b),
        next: f::NEXT.get(b),
        commit: f::COMMIT.get(b),
        flags: f::FLAGS.get(b),
    };
    if f::KIND.get(b) != kind as u32 {
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
    if h.flags & !FLAG_COMMIT_END != 0 || f::RESERVED.get(b) != 0 {
        return Err(bad(format!("unknown flags {:#x}", h.flags)));
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
            commit: 0x0102_0304_0506_0708,
            flags: FLAG_COMMIT_END,
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
        // Flags this version does not know make the page invalid rather than misread.
        let mut q = p;
        f::FLAGS.put(&mut q, 2);
        checksum::seal(Kind::LogPage, &mut q);
        let e = decode(&q, 12, Kind::LogPage, 9, 3).unwrap_err().to_string();
        assert!(e.contains("unknown flags 0x2"), "{e}");
        let mut q = p;
        q[100] ^= 1;
        let e = decode(&q, 12, Kind::LogPage, 9, 3).unwrap_err().to_string();
        assert!(e.contains("byte offset 49152"), "{e}");
    }

    /// Headers as the encoder with literal offsets wrote them (crc kind stream_id seq
    /// payload_len next), captured before the field table existed, and version 2's fields.
    #[test]
    fn encodes_to_the_golden_bytes() {
        let h = hello_header();
        let mut p = [0u8; PAGE_SIZE];
        encode(&h, b"hello", &mut p);
        // Version 1's header, then version 2's commit, flags and reserved, then the payload;
        // the crc (first four bytes) covers them all, so it is checked by decoding.
        let golden = crate::format::unhex(
            "00000000 50474f4c 0900000000000000 03000000 05000000 4d00000000000000
             0807060504030201 01000000 00000000 68656c6c6f",
        );
        assert_eq!(p[4..golden.len()], golden[4..]);
        assert!(
            p[golden.len()..].iter().all(|&b| b == 0),
            "padding not zero"
        );
        assert_eq!(decode(&p, 12, Kind::LogPage, 9, 3).unwrap(), h);

        let full: Vec<u8> = (0..PAYLOAD_MAX).map(|i| (i * 7 + 3) as u8).collect();
        let h = PageHeader {
            kind: Kind::CheckpointPage,
            stream_id: 0x1122_3344_5566_7788,
            seq: 0xfeed_beef,
            payload_len: PAYLOAD_MAX as u32,
            next: 0,
            commit: 6,
            flags: 0,
        };
        encode(&h, &full, &mut p);
        let golden = crate::format::unhex(
            "00000000 54504b43 8877665544332211 efbeedfe d00f0000 0000000000000000
             0600000000000000 00000000 00000000",
        );
        assert_eq!(p[4..HEADER_LEN], golden[4..]);
        assert_eq!(p[HEADER_LEN..], full[..]);
        assert_eq!(
            decode(&p, 5, Kind::CheckpointPage, h.stream_id, h.seq).unwrap(),
            h
        );
    }

    proptest::proptest! {
        #[test]
        fn any_page_round_trips(
            log: bool,
            stream_id: u64,
            seq: u32,
            next: u64,
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=PAYLOAD_MAX),
            page_no in 0u64..1 << 52,
        ) {
            let kind = if log { Kind::LogPage } else { Kind::CheckpointPage };
            let flags = if log { FLAG_COMMIT_END } else { 0 };
            let h = PageHeader { kind, stream_id, seq, payload_len: bytes.len() as u32, next, commit: next ^ stream_id, flags };
            let mut p = [0u8; PAGE_SIZE];
            encode(&h, &bytes, &mut p);
            let got = decode(&p, page_no, kind, stream_id, seq).unwrap();
            proptest::prop_assert_eq!(got, h);
            proptest::prop_assert_eq!(payload(&p, &got), &bytes[..]);
            proptest::prop_assert!(p[HEADER_LEN + bytes.len()..].iter().all(|&b| b == 0));
        }
    }
}
