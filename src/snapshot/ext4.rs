//! The few ext4 and jbd2 fields the snapshotter reads, to find a formatted base's journal and
//! to tell whether a journal is empty. After a clean unmount the journal's log holds nothing
//! the filesystem needs (jbd2 replays only from `s_start`, and a clean journal has
//! `s_start = 0`), yet every block a mount's transactions went through is a block of the layer:
//! at Commit those dead blocks are trimmed, so an image layer keeps only the journal's
//! superblock of it. Numbers are little-endian in ext4, big-endian in jbd2.

/// Where a journal lives in its filesystem, in bytes: its superblock is at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Journal {
    pub offset: u64,
    pub len: u64,
    /// The filesystem's block size: the journal's superblock is one such block.
    pub block: u64,
}

impl Journal {
    /// As the base layer's attribute: `OFFSET+LEN/BLOCK`.
    pub fn to_attr(self) -> String {
        format!("{}+{}/{}", self.offset, self.len, self.block)
    }

    pub fn from_attr(s: &str) -> Option<Journal> {
        let (offset, rest) = s.split_once('+')?;
        let (len, block) = rest.split_once('/')?;
        Some(Journal {
            offset: offset.parse().ok()?,
            len: len.parse().ok()?,
            block: block.parse().ok()?,
        })
    }

    /// The log after the journal's superblock: what is dead once the journal is empty.
    pub fn log(self) -> (u64, u64) {
        (self.offset + self.block, self.len - self.block)
    }
}

fn le16(b: &[u8], at: usize) -> u64 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u64
}

fn le32(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64
}

fn be32(b: &[u8], at: usize) -> u64 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as u64
}

/// The ext4 superblock's offset in the filesystem, and its length.
pub const SUPERBLOCK: (u64, usize) = (1024, 1024);

/// The journal of the filesystem whose superblock is `sb` (1024 bytes from offset 1024), when
/// it is an internal journal in one extent, as mkfs.ext4 makes it. The superblock keeps a copy
/// of the journal inode's block map (`s_jnl_blocks`, "journal backup"), so the inode table is
/// not needed. `None` for anything else (no ext4, no journal, an external or fragmented one).
pub fn journal(sb: &[u8]) -> Option<Journal> {
    const EXT4_MAGIC: u64 = 0xEF53;
    const HAS_JOURNAL: u64 = 0x4;
    const EXTENT_MAGIC: u64 = 0xF30A;
    if sb.len() < 1024 || le16(sb, 0x38) != EXT4_MAGIC || le32(sb, 0x5C) & HAS_JOURNAL == 0 {
        return None;
    }
    let block = 1024u64.checked_shl(le32(sb, 0x18) as u32)?;
    // s_journal_inum 8 (an inode of this filesystem, not a device) and the backup marked as
    // a copy of i_block (s_jnl_backup_type EXT3_JNL_BACKUP_BLOCKS = 1).
    if le32(sb, 0xE0) != 8 || sb[0xFD] != 1 {
        return None;
    }
    let map = &sb[0x10C..0x10C + 60];
    // An extent header of depth 0 with one extent starting at logical block 0.
    if le16(map, 0) != EXTENT_MAGIC || le16(map, 2) != 1 || le16(map, 6) != 0 {
        return None;
    }
    let (logical, len) = (le32(map, 12), le16(map, 16));
    let start = (le16(map, 18) << 32) | le32(map, 20);
    // A length above 32768 marks an unwritten extent.
    if logical != 0 || len == 0 || len > 32768 {
        return None;
    }
    Some(Journal {
        offset: start * block,
        len: len * block,
        block,
    })
}

/// Whether the jbd2 superblock `jsb` (the journal's first block) says the journal is empty:
/// nothing to replay, so its log is dead.
pub fn journal_is_empty(jsb: &[u8]) -> bool {
    const JBD2_MAGIC: u64 = 0xC03B_3998;
    // h_blocktype 3 or 4: a v1 or v2 journal superblock.
    jsb.len() >= 32
        && be32(jsb, 0) == JBD2_MAGIC
        && matches!(be32(jsb, 4), 3 | 4)
        && be32(jsb, 28) == 0
}

/// Whether the clean journal superblock `mine` may be set back to `theirs` (its parent's):
/// both empty, and they differ only in where the next mount continues — the next sequence
/// number (`s_sequence`, at 0x18), the log's head (`s_head`, at 0x58, recorded at a clean
/// unmount since Linux 6.3) — and in the block's checksum (`s_checksum`, at 0xFC). Anything
/// else (an error recorded in `s_errno`, features, users) keeps the block.
pub fn rewinds_to(mine: &[u8], theirs: &[u8]) -> bool {
    const MAY_DIFFER: [(usize, usize); 3] = [(0x18, 0x1C), (0x58, 0x5C), (0xFC, 0x100)];
    mine.len() == theirs.len()
        && mine.len() >= 1024
        && journal_is_empty(mine)
        && journal_is_empty(theirs)
        && mine
            .iter()
            .zip(theirs)
            .enumerate()
            .all(|(i, (a, b))| a == b || MAY_DIFFER.iter().any(|&(s, e)| (s..e).contains(&i)))
}

/// Whether the superblock `mine` (1024 bytes) of a cleanly unmounted ext4 may be set back to
/// `theirs` (its parent's): both ext4 and clean (`s_state` valid, no error), and they differ
/// only in what every mount and unmount writes — the free block and inode counts (a hint: the
/// kernel counts from the group descriptors at mount, and e2fsck only notes a stale one),
/// the mount and write times, the mount count, where it was last mounted, the kilobytes
/// written — and the checksum. An error recorded, an orphan list, a feature flag (a journal
/// to recover), anything else keeps it.
pub fn superblock_rewinds_to(mine: &[u8], theirs: &[u8]) -> bool {
    const EXT4_MAGIC: u64 = 0xEF53;
    const VALID: u64 = 0x1;
    const ERRORS: u64 = 0x2;
    const MAY_DIFFER: [(usize, usize); 10] = [
        (0x0C, 0x10),   // s_free_blocks_count_lo
        (0x10, 0x14),   // s_free_inodes_count
        (0x2C, 0x30),   // s_mtime
        (0x30, 0x34),   // s_wtime
        (0x34, 0x36),   // s_mnt_count
        (0x88, 0xC8),   // s_last_mounted
        (0x158, 0x15C), // s_free_blocks_count_hi
        (0x178, 0x180), // s_kbytes_written
        (0x274, 0x276), // s_wtime_hi, s_mtime_hi
        (0x3FC, 0x400), // s_checksum
    ];
    let clean =
        |sb: &[u8]| le16(sb, 0x38) == EXT4_MAGIC && le16(sb, 0x3A) & (VALID | ERRORS) == VALID;
    mine.len() == 1024
        && theirs.len() == 1024
        && clean(mine)
        && clean(theirs)
        && mine
            .iter()
            .zip(theirs)
            .enumerate()
            .all(|(i, (a, b))| a == b || MAY_DIFFER.iter().any(|&(s, e)| (s..e).contains(&i)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn have_mkfs() -> bool {
        Command::new("mkfs.ext4").arg("-V").output().is_ok()
    }

    #[test]
    fn the_journal_of_a_fresh_filesystem_is_found_and_is_empty() {
        if !have_mkfs() {
            eprintln!("skipping: mkfs.ext4 absent");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        let o = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(o.status.success());
        let bytes = std::fs::read(&img).unwrap();
        let sb = &bytes[1024..2048];
        let j = journal(sb).expect("an internal journal in one extent");
        assert_eq!(j.block, 4096);
        assert!(j.len >= 1 << 20 && j.offset.is_multiple_of(4096), "{j:?}");
        // What debugfs says about inode 8 agrees.
        let out = Command::new("debugfs")
            .args(["-R", "bmap <8> 0"])
            .arg(&img)
            .output()
            .unwrap();
        let first: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(j.offset, first * 4096);
        let jsb = &bytes[j.offset as usize..(j.offset + 4096) as usize];
        assert!(journal_is_empty(jsb));
        assert_eq!(Journal::from_attr(&j.to_attr()), Some(j));

        // A journal with something to replay (s_start set), or no jbd2 block, is not empty.
        let mut busy = jsb.to_vec();
        busy[28..32].copy_from_slice(&1u32.to_be_bytes());
        assert!(!journal_is_empty(&busy));
        assert!(!journal_is_empty(&[0u8; 4096]));
        // Set back to its parent's only across what a clean mount and unmount change.
        let mut later = jsb.to_vec();
        later[0x18..0x1C].copy_from_slice(&77u32.to_be_bytes());
        later[0x58..0x5C].copy_from_slice(&300u32.to_be_bytes());
        later[0xFC] ^= 0xFF;
        assert!(rewinds_to(&later, jsb));
        let mut errored = later.clone();
        errored[0x20] = 1; // s_errno
        assert!(!rewinds_to(&errored, jsb));
        assert!(
            !rewinds_to(&busy, jsb),
            "a journal to replay is never set back"
        );
        assert!(!rewinds_to(&later[..512], &jsb[..512]));
        // The filesystem's superblock: set back across a mount's counters and times only.
        let mut mounted = sb.to_vec();
        mounted[0x10..0x14].copy_from_slice(&9u32.to_le_bytes()); // free inodes
        mounted[0x2C..0x30].copy_from_slice(&1_800_000_000u32.to_le_bytes()); // mtime
        mounted[0x34] += 1; // mount count
        mounted[0x88..0x8E].copy_from_slice(b"/mnt/x"); // last mounted
        mounted[0x178..0x180].copy_from_slice(&4242u64.to_le_bytes()); // kbytes written
        mounted[0x3FC] ^= 0xFF; // checksum
        assert!(superblock_rewinds_to(&mounted, sb));
        for (at, what) in [
            (0x3A, "s_state: errors"),
            (0x60, "s_feature_incompat: a journal to recover"),
            (0xE8, "s_last_orphan"),
            (0x198, "s_error_count"),
        ] {
            let mut other = mounted.clone();
            other[at] ^= 0x04;
            assert!(!superblock_rewinds_to(&other, sb), "{what}");
        }
        assert!(!superblock_rewinds_to(&mounted[..512], &sb[..512]));
        assert!(
            !superblock_rewinds_to(&[0u8; 1024], &[0u8; 1024]),
            "no ext4"
        );

        // No journal: nothing found.
        let mut plain = sb.to_vec();
        plain[0x5C] &= !0x4;
        assert_eq!(journal(&plain), None);
        assert_eq!(journal(&[0u8; 1024]), None);
    }
}
