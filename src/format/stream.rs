//! The send stream's structures (docs/STREAM.md): the header, the record header every record
//! starts with, and the end record's payload. Encoding only; what goes in a stream and in which
//! order is `crate::stream`'s.

use super::field::layout;

/// The first bytes of every stream.
pub const MAGIC: [u8; 8] = *b"TLSTREAM";
/// Bumped whenever a reader that skips unknown records would misread a stream. Version 2 adds
/// the block index and footer after the end record (docs/STREAM.md §5); version 1 streams
/// (which end at the end record) are still read, and layers received from one send it back.
pub const VERSION: u32 = 2;
/// The first version, without an index.
pub const VERSION_1: u32 = 1;

/// The footer's first field (the footer is the last `footer::LEN` bytes of a version-2 stream).
pub const FOOTER_MAGIC: [u8; 8] = *b"TLFOOTER";
/// No index entry of data crosses a multiple of this many bytes of the disk: a ranged reader
/// fetches and verifies at most this much to serve one block.
pub const INDEX_CUT: u64 = 1 << 20;
/// `blob_offset` of an index entry for a whiteout (no bytes in the blob).
pub const WHITEOUT: u64 = u64::MAX;

/// A run of data blocks: payload = offset (u64) + the bytes.
pub const TAG_DATA: u32 = 1;
/// A run of whiteouts over the parent's data: payload = offset (u64) + length (u64).
pub const TAG_ZERO: u32 = 2;
/// The last record: payload = `end`.
pub const TAG_END: u32 = 3;

/// No data record crosses a multiple of this many bytes of the disk, so equal layers are cut
/// into equal records (and a reader never holds more than this plus a record header).
pub const RUN_CUT: u64 = 4 << 20;

layout! {
    /// §1 of docs/STREAM.md.
    pub mod header {
        MAGIC: [u8; 8] = "magic",
        VERSION: u32 = "version",
        FLAGS: u32 = "flags",
        BLOCK_SIZE: u32 = "block_size",
        RESERVED: u32 = "reserved",
        DISK_SIZE: u64 = "disk_size",
        PARENT_CHAIN_ID: [u8; 32] = "parent_chain_id",
    }
}

layout! {
    /// §2: every record starts with this; `len` bytes of payload follow.
    pub mod record {
        TAG: u32 = "tag",
        PAYLOAD_LEN: u64 = "len",
    }
}

layout! {
    /// §2.1 and §2.2: the fixed start of a data record's payload, and a zero record's payload.
    pub mod run {
        OFFSET: u64 = "offset",
        LENGTH: u64 = "length",
    }
}

layout! {
    /// §2.3: the end record's payload.
    pub mod end {
        DATA_RECORDS: u64 = "data_records",
        DATA_BYTES: u64 = "data_bytes",
        ZERO_RECORDS: u64 = "zero_records",
        ZERO_BYTES: u64 = "zero_bytes",
        DIGEST: [u8; 32] = "digest",
    }
}

layout! {
    /// §5: the footer, the last bytes of a version-2 stream.
    pub mod footer {
        MAGIC: [u8; 8] = "magic",
        HEADER: [u8; 64] = "header",
        INDEX_OFFSET: u64 = "index_offset",
        INDEX_LEN: u64 = "index_len",
        ENTRIES: u64 = "entries",
        PREFIX_MIDSTATE: [u8; 32] = "prefix_midstate",
        INDEX_SHA256: [u8; 32] = "index_sha256",
    }
}

layout! {
    /// §5: one index entry.
    pub mod entry {
        OFFSET: u64 = "offset",
        LENGTH: u64 = "length",
        BLOB_OFFSET: u64 = "blob_offset",
        SHA256: [u8; 32] = "sha256",
    }
}

/// What a version-2 stream's footer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// A copy of the stream's header: what a ranged reader verifies it by (§5).
    pub header: [u8; header::LEN],
    /// Where the index starts in the blob: a multiple of 64, the length the midstate covers.
    pub index_offset: u64,
    pub index_len: u64,
    pub entries: u64,
    /// SHA-256 state after the blob's first `index_offset` bytes (format/sha256.rs).
    pub prefix_midstate: [u8; 32],
    pub index_sha256: [u8; 32],
}

impl Footer {
    pub fn pack(&self) -> [u8; footer::LEN] {
        let mut b = [0u8; footer::LEN];
        footer::MAGIC.put(&mut b, FOOTER_MAGIC);
        footer::HEADER.put(&mut b, self.header);
        footer::INDEX_OFFSET.put(&mut b, self.index_offset);
        footer::INDEX_LEN.put(&mut b, self.index_len);
        footer::ENTRIES.put(&mut b, self.entries);
        footer::PREFIX_MIDSTATE.put(&mut b, self.prefix_midstate);
        footer::INDEX_SHA256.put(&mut b, self.index_sha256);
        b
    }

    /// Decode and check what the footer alone can: magic, alignment, sizes that fit in a blob
    /// of `blob_len` bytes ending with this footer.
    pub fn unpack(b: &[u8; footer::LEN], blob_len: u64) -> Result<Footer, String> {
        if footer::MAGIC.get(b) != FOOTER_MAGIC {
            return Err("no stream footer at the blob's end (bad magic)".into());
        }
        let f = Footer {
            header: footer::HEADER.get(b),
            index_offset: footer::INDEX_OFFSET.get(b),
            index_len: footer::INDEX_LEN.get(b),
            entries: footer::ENTRIES.get(b),
            prefix_midstate: footer::PREFIX_MIDSTATE.get(b),
            index_sha256: footer::INDEX_SHA256.get(b),
        };
        let fits = f
            .index_offset
            .checked_add(f.index_len)
            .and_then(|e| e.checked_add(footer::LEN as u64))
            == Some(blob_len);
        if !f.index_offset.is_multiple_of(64)
            || !fits
            || f.entries.checked_mul(entry::LEN as u64) != Some(f.index_len)
        {
            return Err(format!(
                "the footer's index ({} entries, {} bytes at byte {}) does not fit a {blob_len}-byte blob",
                f.entries, f.index_len, f.index_offset
            ));
        }
        Ok(f)
    }
}

/// One index entry: a data extent of at most `INDEX_CUT` bytes (never crossing a multiple of
/// it) at `blob_offset` with its sha256, or a whiteout (`blob_offset` = `WHITEOUT`, sha256
/// zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub length: u64,
    pub blob_offset: u64,
    pub sha256: [u8; 32],
}

impl Entry {
    pub fn pack(&self) -> [u8; entry::LEN] {
        let mut b = [0u8; entry::LEN];
        entry::OFFSET.put(&mut b, self.offset);
        entry::LENGTH.put(&mut b, self.length);
        entry::BLOB_OFFSET.put(&mut b, self.blob_offset);
        entry::SHA256.put(&mut b, self.sha256);
        b
    }

    pub fn unpack(b: &[u8; entry::LEN]) -> Entry {
        Entry {
            offset: entry::OFFSET.get(b),
            length: entry::LENGTH.get(b),
            blob_offset: entry::BLOB_OFFSET.get(b),
            sha256: entry::SHA256.get(b),
        }
    }

    pub fn is_whiteout(&self) -> bool {
        self.blob_offset == WHITEOUT
    }
}

/// What a stream's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    pub block_size: u32,
    pub disk_size: u64,
    /// All zeros: the layer has no parent.
    pub parent_chain_id: [u8; 32],
}

impl Header {
    pub fn pack(&self) -> [u8; header::LEN] {
        let mut b = [0u8; header::LEN];
        header::MAGIC.put(&mut b, MAGIC);
        header::VERSION.put(&mut b, self.version);
        header::FLAGS.put(&mut b, self.flags);
        header::BLOCK_SIZE.put(&mut b, self.block_size);
        header::DISK_SIZE.put(&mut b, self.disk_size);
        header::PARENT_CHAIN_ID.put(&mut b, self.parent_chain_id);
        b
    }

    /// Decode and check the fixed rules (magic, version, flags, a valid block size, a size).
    pub fn unpack(b: &[u8; header::LEN]) -> Result<Header, String> {
        if header::MAGIC.get(b) != MAGIC {
            return Err("not a thinlayer send stream (bad magic)".into());
        }
        let h = Header {
            version: header::VERSION.get(b),
            flags: header::FLAGS.get(b),
            block_size: header::BLOCK_SIZE.get(b),
            disk_size: header::DISK_SIZE.get(b),
            parent_chain_id: header::PARENT_CHAIN_ID.get(b),
        };
        if h.version != VERSION && h.version != VERSION_1 {
            return Err(format!(
                "stream format version {} (this thinlayer reads versions {VERSION_1} and {VERSION})",
                h.version
            ));
        }
        if h.flags != 0 {
            return Err(format!("unknown stream flags {:#x}", h.flags));
        }
        if !super::valid_block_size(h.block_size as u64) {
            return Err(format!(
                "block size {} in the header is invalid",
                h.block_size
            ));
        }
        if h.disk_size == 0 {
            return Err("the header's disk size is 0".into());
        }
        Ok(h)
    }
}

/// A record header.
pub fn pack_record(tag: u32, len: u64) -> [u8; record::LEN] {
    let mut b = [0u8; record::LEN];
    record::TAG.put(&mut b, tag);
    record::PAYLOAD_LEN.put(&mut b, len);
    b
}

pub fn unpack_record(b: &[u8; record::LEN]) -> (u32, u64) {
    (record::TAG.get(b), record::PAYLOAD_LEN.get(b))
}

/// Offset and length (a zero record's whole payload; a data record uses only the offset).
pub fn pack_run(offset: u64, length: u64) -> [u8; run::LEN] {
    let mut b = [0u8; run::LEN];
    run::OFFSET.put(&mut b, offset);
    run::LENGTH.put(&mut b, length);
    b
}

pub fn unpack_run(b: &[u8]) -> (u64, u64) {
    (run::OFFSET.get(b), run::LENGTH.get(b))
}

/// The end record's counts and the digest of everything before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct End {
    pub data_records: u64,
    pub data_bytes: u64,
    pub zero_records: u64,
    pub zero_bytes: u64,
    pub digest: [u8; 32],
}

impl End {
    pub fn pack(&self) -> [u8; end::LEN] {
        let mut b = [0u8; end::LEN];
        end::DATA_RECORDS.put(&mut b, self.data_records);
        end::DATA_BYTES.put(&mut b, self.data_bytes);
        end::ZERO_RECORDS.put(&mut b, self.zero_records);
        end::ZERO_BYTES.put(&mut b, self.zero_bytes);
        end::DIGEST.put(&mut b, self.digest);
        b
    }

    pub fn unpack(b: &[u8; end::LEN]) -> End {
        End {
            data_records: end::DATA_RECORDS.get(b),
            data_bytes: end::DATA_BYTES.get(b),
            zero_records: end::ZERO_RECORDS.get(b),
            zero_bytes: end::ZERO_BYTES.get(b),
            digest: end::DIGEST.get(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_end_round_trip_and_bad_headers_are_named() {
        let h = Header {
            version: VERSION,
            flags: 0,
            block_size: 4096,
            disk_size: 1 << 30,
            parent_chain_id: [7; 32],
        };
        let b = h.pack();
        assert_eq!(&b[..8], b"TLSTREAM");
        assert_eq!(b[16..20], 4096u32.to_le_bytes());
        assert_eq!(Header::unpack(&b).unwrap(), h);
        let mut bad = b;
        bad[8] = 3;
        assert!(Header::unpack(&bad).unwrap_err().contains("version 3"));
        let f = Footer {
            header: [6; 64],
            index_offset: 128,
            index_len: 2 * entry::LEN as u64,
            entries: 2,
            prefix_midstate: [3; 32],
            index_sha256: [4; 32],
        };
        let fb = f.pack();
        assert_eq!(&fb[..8], b"TLFOOTER");
        let blob = 128 + 2 * entry::LEN as u64 + footer::LEN as u64;
        assert_eq!(Footer::unpack(&fb, blob).unwrap(), f);
        assert!(Footer::unpack(&fb, blob + 1)
            .unwrap_err()
            .contains("does not fit"));
        let x = Entry {
            offset: 1 << 20,
            length: 4096,
            blob_offset: 99,
            sha256: [5; 32],
        };
        assert_eq!(Entry::unpack(&x.pack()), x);
        let mut bad = b;
        bad[0] = b'X';
        assert!(Header::unpack(&bad).unwrap_err().contains("magic"));
        let e = End {
            data_records: 1,
            data_bytes: 2,
            zero_records: 3,
            zero_bytes: 4,
            digest: [9; 32],
        };
        assert_eq!(End::unpack(&e.pack()), e);
        assert_eq!(unpack_record(&pack_record(TAG_DATA, 99)), (TAG_DATA, 99));
        assert_eq!(unpack_run(&pack_run(5, 6)), (5, 6));
    }
}
