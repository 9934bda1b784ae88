//! The superblock: one of two alternating 4 KiB slots at the start of the pool file. A commit
//! writes the slot not holding the current generation, so a torn superblock write leaves the
//! other slot, and the state it describes, intact. Layout in docs/FORMAT.md.

use super::checksum::{self, Kind};
use super::field::layout;
use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"THINLAYR";
/// 6: a checkpoint's single data blocks keep their crcs in checksum pages too (map singles,
/// FORMAT.md §6.3.3). 5: a checkpoint's map runs keep their crcs in checksum pages (FORMAT.md §5.6), named by a
/// record at the checkpoint's start. 4: map runs (FORMAT.md §6.3.1), one record for a run of blocks contiguous in the layer and
/// in the pool. 3: a layer record's mode may be 3, remote (FORMAT.md §6.1). 2: log pages carry their
/// commit's number and an end-of-commit flag, and the log runs past what the superblock names
/// (one-sync commits). Version 1 pools are refused by name; versions from `MIGRATES_FROM` up
/// are refused by name too and converted by `thinlayer migrate` (FORMAT.md §11).
pub const VERSION: u32 = 7;
/// The oldest version `thinlayer migrate` converts to `VERSION`.
pub const MIGRATES_FROM: u32 = 2;

layout! {
    /// The superblock's fields, in the order and with the names of docs/FORMAT.md §3.
    pub mod fields {
        CRC: u32 = "crc",
        MAGIC: [u8; 8] = "magic",
        VERSION: u32 = "version",
        GENERATION: u64 = "generation",
        BLOCK_SIZE: u32 = "block_size",
        FLAGS: u32 = "flags",
        MAX_BLOCKS: u64 = "max_blocks",
        CHECKPOINT_HEAD: u64 = "checkpoint.head",
        CHECKPOINT_PAGES: u64 = "checkpoint.pages",
        CHECKPOINT_ID: u64 = "checkpoint.id",
        LOG_HEAD: u64 = "log.head",
        LOG_PAGES: u64 = "log.pages",
        LOG_ID: u64 = "log.id",
        LOG_NEXT: u64 = "log_next",
        POOL_ID: u64 = "pool_id",
        CREATED_SECS: u64 = "created_secs",
        LOG_COMMIT: u64 = "log.commit",
        RESERVED: [u8; 8] = "reserved",
    }
}
use fields as f;

/// Bytes covered by the checksum (from offset 4); the rest of the 4 KiB slot is zero.
pub const ENCODED_LEN: usize = f::LEN;
const _: () = assert!(ENCODED_LEN == Kind::Superblock.sealed_len());
const _: () = assert!(f::CRC.same_bytes(&checksum::CRC));

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
    /// The number of the commit that wrote the last log page this superblock names (the
    /// checkpoint's commit when the log is empty); later commits' pages follow it (§5.5).
    pub log_commit: u64,
}

impl Superblock {
    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        self.encode_as(VERSION)
    }

    /// The slot as `version` wrote it (same fields): for tests that make an older pool.
    pub fn encode_as(&self, version: u32) -> [u8; ENCODED_LEN] {
        let mut b = [0u8; ENCODED_LEN];
        f::MAGIC.put(&mut b, *MAGIC);
        f::VERSION.put(&mut b, version);
        f::GENERATION.put(&mut b, self.generation);
        f::BLOCK_SIZE.put(&mut b, self.block_size);
        // FLAGS and RESERVED stay zero.
        f::MAX_BLOCKS.put(&mut b, self.max_blocks);
        f::CHECKPOINT_HEAD.put(&mut b, self.checkpoint.head);
        f::CHECKPOINT_PAGES.put(&mut b, self.checkpoint.pages);
        f::CHECKPOINT_ID.put(&mut b, self.checkpoint.id);
        f::LOG_HEAD.put(&mut b, self.log.head);
        f::LOG_PAGES.put(&mut b, self.log.pages);
        f::LOG_ID.put(&mut b, self.log.id);
        f::LOG_NEXT.put(&mut b, self.log_next);
        f::POOL_ID.put(&mut b, self.pool_id);
        f::CREATED_SECS.put(&mut b, self.created_secs);
        f::LOG_COMMIT.put(&mut b, self.log_commit);
        // Checksum last: it seals everything above.
        checksum::seal(Kind::Superblock, &mut b);
        b
    }

    /// Decode and verify one slot of the current version; older ones are refused by name.
    /// `slot` only names the slot in errors.
    pub fn decode(b: &[u8], slot: usize) -> Result<Superblock> {
        let (version, sb) = Self::decode_any(b, slot)?;
        if version != VERSION {
            return Err(Error::Corrupt(format!(
                "superblock slot {slot}: format version {version}, made by an older thinlayer: convert the pool with `thinlayer migrate POOL`"
            )));
        }
        Ok(sb)
    }

    /// Decode and verify one slot of any version `thinlayer migrate` converts (from
    /// `MIGRATES_FROM` to `VERSION`; their superblocks have the same fields), with its version.
    pub fn decode_any(b: &[u8], slot: usize) -> Result<(u32, Superblock)> {
        let bad = |what: &str| Error::Corrupt(format!("superblock slot {slot}: {what}"));
        if b.len() < ENCODED_LEN {
            return Err(bad("truncated"));
        }
        let b = &b[..ENCODED_LEN];
        // Checksum first: nothing else is trusted until it matches. An empty slot and a foreign
        // file are told apart from damage first, as they mean something else.
        if b.iter().all(|&x| x == 0) {
            return Err(bad("empty (all zeros)"));
        }
        if f::MAGIC.get(b) != *MAGIC {
            return Err(bad("bad magic (not a thinlayer pool)"));
        }
        checksum::verify(Kind::Superblock, b).map_err(|m| bad(&m.to_string()))?;
        let version = f::VERSION.get(b);
        if version == 1 {
            return Err(bad(
                "format version 1, made by an older thinlayer (before one-sync commits): export its layers with that version and import them here",
            ));
        }
        if !(MIGRATES_FROM..=VERSION).contains(&version) {
            return Err(bad(&format!(
                "unsupported format version {version} (this thinlayer reads {VERSION})"
            )));
        }
        let sb = Superblock {
            generation: f::GENERATION.get(b),
            block_size: f::BLOCK_SIZE.get(b),
            max_blocks: f::MAX_BLOCKS.get(b),
            checkpoint: StreamRef {
                head: f::CHECKPOINT_HEAD.get(b),
                pages: f::CHECKPOINT_PAGES.get(b),
                id: f::CHECKPOINT_ID.get(b),
            },
            log: StreamRef {
                head: f::LOG_HEAD.get(b),
                pages: f::LOG_PAGES.get(b),
                id: f::LOG_ID.get(b),
            },
            log_next: f::LOG_NEXT.get(b),
            pool_id: f::POOL_ID.get(b),
            created_secs: f::CREATED_SECS.get(b),
            log_commit: f::LOG_COMMIT.get(b),
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
        Ok((version, sb))
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
            log_commit: 0x77,
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
    /// encoder with literal offsets), with version 2's `log.commit` in what was reserved and
    /// version 7's number: the table must not move a byte.
    #[test]
    fn encodes_to_the_golden_bytes() {
        // Rows: crc magic version, generation block_size flags, max_blocks, checkpoint, log,
        // log_next pool_id created_secs, reserved.
        let golden = crate::format::unhex(concat!(
            "00000000 5448494e4c415952 07000000 ",
            "2a00000000000000 00000100 00000000 ",
            "e803000000000000 ",
            "0300000000000000 0900000000000000 2800000000000000 ",
            "1100000000000000 0200000000000000 2900000000000000 ",
            "1300000000000000 efbeadde00000000 00f1536500000000 ",
            "7700000000000000 0000000000000000"
        ));
        assert_eq!(sample().encode()[4..], golden[4..]);
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
            log_commit: 0,
        };
        let golden = crate::format::unhex(concat!(
            "00000000 5448494e4c415952 07000000 ",
            "feffffffffffffff 00100000 00000000 ",
            "0000000000000000 ",
            "0000000000000000 0000000000000000 0000000000000000 ",
            "0200000000000000 0000000000000000 0100000000000000 ",
            "0200000000000000 efcdab8967452301 0000000000000000 ",
            "0000000000000000 0000000000000000"
        ));
        assert_eq!(edge.encode()[4..], golden[4..]);
        assert_eq!(Superblock::decode(&edge.encode(), 0).unwrap(), edge);
        // A version 1 slot is refused by name, not as damage.
        let mut v1 = edge.encode();
        f::VERSION.put(&mut v1, 1);
        checksum::seal(Kind::Superblock, &mut v1);
        let e = Superblock::decode(&v1, 0).unwrap_err().to_string();
        assert!(
            e.contains("format version 1, made by an older thinlayer"),
            "{e}"
        );
    }

    #[test]
    fn an_older_version_is_refused_by_name_and_read_for_migrate() {
        let sb = sample();
        for old in MIGRATES_FROM..VERSION {
            let b = sb.encode_as(old);
            let e = Superblock::decode(&b, 0).unwrap_err().to_string();
            assert!(
                e.contains(&format!("format version {old}")) && e.contains("thinlayer migrate"),
                "{e}"
            );
            assert_eq!(Superblock::decode_any(&b, 0).unwrap(), (old, sb.clone()));
        }
        // A newer version than ours is not something migrate can read.
        let e = Superblock::decode_any(&sb.encode_as(VERSION + 1), 0).unwrap_err();
        assert!(e.to_string().contains("unsupported format version"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn any_valid_superblock_round_trips(
            generation: u64,
            shift in 12u32..=20,
            max_blocks: u64,
            streams in proptest::array::uniform7(2u64..),
            pool_id: u64,
            created_secs: u64,
            log_commit: u64,
        ) {
            let [ch, cp, ci, lh, lp, li, next] = streams;
            let sb = Superblock {
                generation,
                block_size: 1 << shift,
                max_blocks,
                checkpoint: StreamRef { head: ch, pages: cp, id: ci },
                log: StreamRef { head: lh, pages: lp, id: li },
                log_next: next,
                pool_id,
                created_secs,
                log_commit,
            };
            let enc = sb.encode();
            proptest::prop_assert_eq!(Superblock::decode(&enc, 0).unwrap(), sb);
            // Each value sits in its own field of the one table.
            proptest::prop_assert_eq!(f::GENERATION.get(&enc), generation);
            proptest::prop_assert_eq!(f::LOG_NEXT.get(&enc), next);
            proptest::prop_assert!(f::RESERVED.get(&enc) == [0; 8] && f::FLAGS.get(&enc) == 0);
        }
    }
}
