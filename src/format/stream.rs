//! The send stream's structures (docs/STREAM.md): the header, the record header every record
//! starts with, and the end record's payload. Encoding only; what goes in a stream and in which
//! order is `crate::stream`'s.

use super::field::layout;

/// The first bytes of every stream.
pub const MAGIC: [u8; 8] = *b"TLSTREAM";
/// Bumped whenever a reader that skips unknown records would misread a stream.
pub const VERSION: u32 = 1;

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
        if h.version != VERSION {
            return Err(format!(
                "stream format version {} (this thinlayer reads version {VERSION})",
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
        bad[8] = 2;
        assert!(Header::unpack(&bad).unwrap_err().contains("version 2"));
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
