//! Every checksum in the pool is computed here. Metadata checksums are salted with the kind of
//! structure, so a page written as one kind never verifies as another (a stale log page read where
//! a checkpoint page is expected fails its check instead of being misread).

/// What a checksummed structure is; the value is the salt mixed into its crc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    Superblock = 0x5355_5052,
    CheckpointPage = 0x434b_5054,
    LogPage = 0x4c4f_4750,
}

/// crc32 of `bytes`, salted with `kind`.
pub fn metadata(kind: Kind, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&(kind as u32).to_le_bytes());
    h.update(bytes);
    h.finalize()
}

/// crc32 of a whole data block, stored in the block map entry that points at it.
pub fn data(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_do_not_collide() {
        let b = [7u8; 64];
        assert_ne!(
            metadata(Kind::LogPage, &b),
            metadata(Kind::CheckpointPage, &b)
        );
        assert_ne!(metadata(Kind::Superblock, &b), data(&b));
    }
}
