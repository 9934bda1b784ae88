//! The on-disk format: the only code that turns bytes into structs and back.
//! Byte diagrams of every structure are in docs/FORMAT.md; each file here holds one structure
//! with its encode/decode and a round-trip test.

pub mod checksum;
pub mod field;
pub mod ids;
pub mod journal;
pub mod page;
pub mod record;
pub mod sha256;
pub mod sha256_x2;
pub mod stream;
pub mod superblock;

#[cfg(test)]
mod spec;

pub use ids::{LayerId, PBlock, VBlock};

/// Metadata is written in pages of this size, whatever the pool's block size.
pub const PAGE_SIZE: usize = 4096;
/// The two superblock slots sit at these byte offsets; the first 8 KiB hold nothing else.
pub const SUPERBLOCK_OFFSETS: [u64; 2] = [0, 4096];
pub const RESERVED_BYTES: u64 = 8192;
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Layer names are at most this many bytes (Docker image references are at most 255).
pub const MAX_NAME_LEN: usize = 255;

/// The first block number that may hold data or metadata pages.
pub fn first_data_block(block_size: u32) -> u64 {
    RESERVED_BYTES.div_ceil(block_size as u64)
}

pub fn valid_block_size(bs: u64) -> bool {
    bs.is_power_of_two() && (MIN_BLOCK_SIZE as u64..=MAX_BLOCK_SIZE as u64).contains(&bs)
}

/// Bytes from hex digits, white space ignored: golden test vectors written field by field.
#[cfg(test)]
pub(crate) fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|d| u8::from_str_radix(std::str::from_utf8(d).unwrap(), 16).unwrap())
        .collect()
}
