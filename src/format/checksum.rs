//! Every checksum in the pool is computed here. Metadata checksums are salted with the kind of
//! structure, so a page written as one kind never verifies as another (a stale log page read where
//! a checkpoint page is expected fails its check instead of being misread).
//!
//! Where each structure's crc sits and what it covers is said once, here (`CRC`,
//! `Kind::sealed_len`); encoders `seal`, decoders `verify`, and so do the tests and fuzzers
//! that damage a structure and re-seal it.

use super::field::Field;
use super::PAGE_SIZE;
use std::fmt;
use std::ops::Range;

/// What a checksummed structure is; the value is the salt mixed into its crc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    Superblock = 0x5355_5052,
    CheckpointPage = 0x434b_5054,
    LogPage = 0x4c4f_4750,
    /// A checkpoint's checksum page: data crcs of its map runs (FORMAT.md §5.6).
    ChecksumPage = 0x4353_554d,
}

/// Every salted structure starts with its crc, which covers the rest of the structure.
pub const CRC: Field<u32> = Field::at(0);

impl Kind {
    /// Length of the structure, from its first byte: what `seal` and `verify` need of a buffer.
    pub const fn sealed_len(self) -> usize {
        match self {
            // The rest of the 4 KiB slot is zero and not covered.
            Kind::Superblock => 128,
            Kind::CheckpointPage | Kind::LogPage | Kind::ChecksumPage => PAGE_SIZE,
        }
    }

    /// The bytes the crc covers: everything after it, to the structure's end.
    pub const fn covered(self) -> Range<usize> {
        CRC.end()..self.sealed_len()
    }
}

/// crc32 of `bytes`, salted with `kind`.
pub fn metadata(kind: Kind, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&(kind as u32).to_le_bytes());
    h.update(bytes);
    h.finalize()
}

/// Write the crc of the `kind` structure at the start of `structure`. Call it last, when every
/// other byte is final. `structure` must be at least `kind.sealed_len()` long; bytes past that
/// are not touched.
pub fn seal(kind: Kind, structure: &mut [u8]) {
    let crc = metadata(kind, &structure[kind.covered()]);
    CRC.put(structure, crc);
}

/// A stored crc that does not match the bytes it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub stored: u32,
    pub computed: u32,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "checksum mismatch (stored {:#010x}, computed {:#010x})",
            self.stored, self.computed
        )
    }
}

/// Check the crc of the `kind` structure at the start of `structure` (at least
/// `kind.sealed_len()` long). Decoders call it before trusting any other field.
pub fn verify(kind: Kind, structure: &[u8]) -> Result<(), Mismatch> {
    let stored = CRC.get(structure);
    let computed = metadata(kind, &structure[kind.covered()]);
    if stored == computed {
        Ok(())
    } else {
        Err(Mismatch { stored, computed })
    }
}

/// crc32 of a whole data block, stored in the block map entry that points at it.
pub fn data(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Kind; 4] = [
        Kind::Superblock,
        Kind::CheckpointPage,
        Kind::LogPage,
        Kind::ChecksumPage,
    ];

    #[test]
    fn kinds_do_not_collide() {
        let b = [7u8; 64];
        assert_ne!(
            metadata(Kind::LogPage, &b),
            metadata(Kind::CheckpointPage, &b)
        );
        assert_ne!(
            metadata(Kind::ChecksumPage, &b),
            metadata(Kind::CheckpointPage, &b)
        );
        assert_ne!(metadata(Kind::Superblock, &b), data(&b));
    }

    #[test]
    fn seal_covers_exactly_the_structure_and_verify_checks_it() {
        for kind in ALL {
            let len = kind.sealed_len();
            let mut b: Vec<u8> = (0..len + 8).map(|i| (i * 31) as u8).collect();
            seal(kind, &mut b);
            assert_eq!(verify(kind, &b), Ok(()));
            // The salted crc of bytes 4..len, little-endian in bytes 0..4.
            let want = metadata(kind, &b[4..len]);
            assert_eq!(b[..4], want.to_le_bytes());
            // Bytes past the structure are outside the seal.
            b[len] ^= 1;
            assert_eq!(verify(kind, &b), Ok(()));
            // Any byte inside it, the crc included, breaks it.
            for i in [0, 3, 4, len / 2, len - 1] {
                let mut c = b.clone();
                c[i] ^= 0x20;
                let e = verify(kind, &c).unwrap_err();
                assert_ne!(e.stored, e.computed);
                assert!(
                    e.to_string().starts_with("checksum mismatch (stored 0x"),
                    "{e}"
                );
            }
            // Sealed as one kind, never valid as another.
            for other in ALL {
                if other != kind && other.sealed_len() <= b.len() {
                    assert!(verify(other, &b).is_err(), "{kind:?} verified as {other:?}");
                }
            }
        }
    }
}
