//! The superblock: one of two alternating 4 KiB slots at the start of the pool file. A commit
//! writes the slot not holding the current generation, so a torn superblock write leaves the
//! other slot, and the state it describes, intact. Layout in docs/FORMAT.md.

use super::checksum::{self, Kind};
use crate::error::{Error, Result};
use byteorder::{ByteOrder, LittleEndian as LE};

pub const MAGIC: &[u8; 8] = b"THINLAYR";
pub const VERSION: u32 = 1;
/// Bytes covered by the checksum (from offset 4); the rest of the 4 KiB slot is zero.
pub const ENCODED_LEN: usize = 128;

/// Where a metadata stream (the checkpoint, or the log since it) lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamRef {
    /// Page number (byte offset / 4096) of the first page; 0 when the stream is empty.
    pub head: u64,
    /// Pages that belong to the committed stream.
    pub pages: u64,
    /// Every page of the stream carries this id; pages of an older stream never match it.
    pub id: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub generation: u64,
    pub block_size: u32,
    /// 0 = unlimited.
    pub max_blocks: u64,
    pub checkpoint: StreamRef,
    pub log: StreamRef,
    /// The page reserved for the log's next page (already counted as metadata space).
    pub log_next: u64,
    pub pool_id: u64,
    pub created_secs: u64,
}

impl Superblock {
    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        let mut b = [0u8; ENCODED_LEN];
        b[4..12].copy_from_slice(MAGIC);
        LE::write_u32(&mut b[12..16], VERSION);
        LE::write_u64(&mut b[16..24], self.generation);
        LE::write_u32(&mut b[24..28], self.block_size);
        // 28..32 flags, reserved zero
        LE::write_u64(&mut b[32..40], self.max_blocks);
        LE::write_u64(&mut b[40..48], self.checkpoint.head);
        LE::write_u64(&mut b[48..56], self.checkpoint.pages);
        LE::write_u64(&mut b[56..64], self.checkpoint.id);
        LE::write_u64(&mut b[64..72], self.log.head);
        LE::write_u64(&mut b[72..80], self.log.pages);
        LE::write_u64(&mut b[80..88], self.log.id);
        LE::write_u64(&mut b[88..96], self.log_next);
        LE::write_u64(&mut b[96..104], self.pool_id);
        LE::write_u64(&mut b[104..112], self.created_secs);
        // Checksum last: it seals everything above.
        let crc = checksum::metadata(Kind::Superblock, &b[4..]);
        LE::write_u32(&mut b[0..4], crc);
        b
    }

    /// Decode and verify one slot. `slot` only names the slot in errors.
    pub fn decode(b: &[u8], slot: usize) -> Result<Superblock> {
        let bad = |what: &str| Error::Corrupt(format!("superblock slot {slot}: {what}"));
        if b.len() < ENCODED_LEN {
            return Err(bad("truncated"));
        }
        let b = &b[..ENCODED_LEN];
        // Checksum first: nothing else is trusted until it matches.
        let stored = LE::read_u32(&b[0..4]);
        if b.iter().all(|&x| x == 0) {
            return Err(bad("empty (all zeros)"));
        }
        if &b[4..12] != MAGIC {
            return Err(bad("bad magic (not a thinlayer pool)"));
        }
        let actual = checksum::metadata(Kind::Superblock, &b[4..]);
        if stored != actual {
            return Err(bad(&format!(
                "checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
            )));
        }
        let version = LE::read_u32(&b[12..16]);
        if version != VERSION {
            return Err(bad(&format!("unsupported format version {version}")));
        }
        let sb = Superblock {
            generation: LE::read_u64(&b[16..24]),
            block_size: LE::read_u32(&b[24..28]),
            max_blocks: LE::read_u64(&b[32..40]),
            checkpoint: StreamRef {
                head: LE::read_u64(&b[40..48]),
                pages: LE::read_u64(&b[48..56]),
                id: LE::read_u64(&b[56..64]),
            },
            log: StreamRef {
                head: LE::read_u64(&b[64..72]),
                pages: LE::read_u64(&b[72..80]),
                id: LE::read_u64(&b[80..88]),
            },
            log_next: LE::read_u64(&b[88..96]),
            pool_id: LE::read_u64(&b[96..104]),
            created_secs: LE::read_u64(&b[104..112]),
        };
        if !super::valid_block_size(sb.block_size as u64) {
            return Err(bad(&format!("invalid block size {}", sb.block_size)));
        }
        let first_page = super::RESERVED_BYTES / super::PAGE_SIZE as u64;
        if sb.log_next < first_page || (sb.log.pages > 0 && sb.log.head < first_page) {
            return Err(bad("log pointer inside the superblock area"));
        }
        if sb.checkpoint.pages > 0 && sb.checkpoint.head < first_page {
            return Err(bad("checkpoint pointer inside the superblock area"));
        }
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            generation: 42,
            block_size: 65536,
            max_blocks: 1000,
            checkpoint: StreamRef {
                head: 3,
                pages: 9,
                id: 40,
            },
            log: StreamRef {
                head: 17,
                pages: 2,
                id: 41,
            },
            log_next: 19,
            pool_id: 0xdead_beef,
            created_secs: 1_700_000_000,
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode(), 0).unwrap(), sb);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let enc = sample().encode();
        for i in 0..ENCODED_LEN {
            let mut b = enc;
            b[i] ^= 0x10;
            assert!(
                Superblock::decode(&b, 1).is_err(),
                "flip at byte {i} accepted"
            );
        }
    }

    /// The bytes this superblock encoded to before the field table existed (captured from the
    /// encoder with literal offsets): the table must not move a byte.
    #[test]
    fn encodes_to_the_golden_bytes() {
        // Rows: crc magic version, generation block_size flags, max_blocks, checkpoint, log,
        // log_next pool_id created_secs, reserved.
        let golden = crate::format::unhex(concat!(
            "07e13eb2 5448494e4c415952 01000000 ",
            "2a00000000000000 00000100 00000000 ",
            "e803000000000000 ",
            "0300000000000000 0900000000000000 2800000000000000 ",
            "1100000000000000 0200000000000000 2900000000000000 ",
            "1300000000000000 efbeadde00000000 00f1536500000000 ",
            "00000000000000000000000000000000"
        ));
        assert_eq!(sample().encode()[..], golden[..]);
        let edge = Superblock {
            generation: u64::MAX - 1,
            block_size: 4096,
            max_blocks: 0,
            checkpoint: StreamRef::default(),
            log: StreamRef {
                head: 2,
                pages: 0,
                id: 1,
            },
            log_next: 2,
            pool_id: 0x0123_4567_89ab_cdef,
            created_secs: 0,
        };
        let golden = crate::format::unhex(concat!(
            "fd11c97c 5448494e4c415952 01000000 ",
            "feffffffffffffff 00100000 00000000 ",
            "0000000000000000 ",
            "0000000000000000 0000000000000000 0000000000000000 ",
            "0200000000000000 0000000000000000 0100000000000000 ",
            "0200000000000000 efcdab8967452301 0000000000000000 ",
            "00000000000000000000000000000000"
        ));
        assert_eq!(edge.encode()[..], golden[..]);
        assert_eq!(Superblock::decode(&golden, 0).unwrap(), edge);
    }
}
