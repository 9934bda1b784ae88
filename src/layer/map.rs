//! A layer's sparse block map: virtual block → pool block (with the data's crc) or zero.
//!
//! Memory is the constraint, so the map is a hash of 1024-block chunks, each a sorted vector of
//! 12-byte slots. Unmapped blocks cost nothing; a chunk costs one hash entry (~40 bytes). That
//! is 12-16 bytes per mapped block while chunks hold a few dozen entries or more (random writes
//! over disks up to ~50x the mapped data), rising towards ~100 bytes only where a chunk holds a
//! single block.

use crate::format::record::MapTarget;
use crate::format::{PBlock, VBlock};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

pub const CHUNK_BITS: u32 = 10;
pub const CHUNK_LEN: u64 = 1 << CHUNK_BITS;
/// Pool block numbers are stored in 48 bits; this value marks a zero (whiteout) entry.
const ZERO_MARK: u64 = (1 << 48) - 1;
pub const MAX_PBLOCK: u64 = ZERO_MARK - 1;

/// What a layer's own map holds for a block it maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    Data { pblock: PBlock, crc: u32 },
    Zero,
}

impl Mapping {
    /// The pool block it stores data in, if any.
    pub fn pblock(self) -> Option<PBlock> {
        match self {
            Mapping::Data { pblock, .. } => Some(pblock),
            Mapping::Zero => None,
        }
    }
}

impl From<Option<Mapping>> for MapTarget {
    fn from(m: Option<Mapping>) -> MapTarget {
        match m {
            None => MapTarget::Unmapped,
            Some(Mapping::Zero) => MapTarget::Zero,
            Some(Mapping::Data { pblock, crc }) => MapTarget::Data { pblock, crc },
        }
    }
}

/// One mapped block in 12 bytes: its key within the chunk and a 48-bit pool block (or the zero
/// mark) with the data's crc. Also the body of the merged-chunk cache's entries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    pub(crate) key: u16,
    hi: u16,
    lo: u32,
    crc: u32,
}

impl Slot {
    pub(crate) fn new(key: u16, m: Mapping) -> Slot {
        let (p, crc) = match m {
            Mapping::Data { pblock, crc } => (pblock.0, crc),
            Mapping::Zero => (ZERO_MARK, 0),
        };
        debug_assert!(p <= ZERO_MARK);
        Slot {
            key,
            hi: (p >> 32) as u16,
            lo: p as u32,
            crc,
        }
    }
    pub(crate) fn mapping(&self) -> Mapping {
        let p = ((self.hi as u64) << 32) | self.lo as u64;
        if p == ZERO_MARK {
            Mapping::Zero
        } else {
            Mapping::Data {
                pblock: PBlock(p),
                crc: self.crc,
            }
        }
    }
}

/// Chunk numbers (and layer ids) are small integers: a multiplicative hash is enough and much
/// cheaper than SipHash.
#[derive(Default)]
pub struct ChunkHasher(u64);
impl Hasher for ChunkHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }
    /// Mixes into what was hashed before, so tuple keys (the chain cache's) work; a lone u64
    /// hashes as it always did.
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n ^ (n >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}
type ChunkTable = HashMap<u64, Vec<Slot>, BuildHasherDefault<ChunkHasher>>;

#[derive(Default)]
pub struct BlockMap {
    chunks: ChunkTable,
    data_blocks: u64,
    zero_blocks: u64,
}

/// Split a virtual block number into (chunk, key within the chunk).
pub fn split(vb: VBlock) -> (u64, u16) {
    (vb.0 >> CHUNK_BITS, (vb.0 & (CHUNK_LEN - 1)) as u16)
}

impl BlockMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks mapped to pool data (the layer's own size in blocks).
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks
    }

    /// Blocks mapped as zero (whiteouts).
    pub fn zero_blocks(&self) -> u64 {
        self.zero_blocks
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn get(&self, vb: VBlock) -> Option<Mapping> {
        let (c, k) = split(vb);
        let slots = self.chunks.get(&c)?;
        slots
            .binary_search_by_key(&k, |s| s.key)
            .ok()
            .map(|i| slots[i].mapping())
    }

    fn count(&mut self, m: Option<Mapping>, delta: i64) {
        match m {
            Some(Mapping::Data { .. }) => {
                self.data_blocks = self.data_blocks.wrapping_add_signed(delta)
            }
            Some(Mapping::Zero) => self.zero_blocks = self.zero_blocks.wrapping_add_signed(delta),
            None => {}
        }
    }

    /// Map `vb`; returns what it was mapped to before.
    pub fn set(&mut self, vb: VBlock, m: Mapping) -> Option<Mapping> {
        let (c, k) = split(vb);
        let slots = self.chunks.entry(c).or_default();
        let old = match slots.binary_search_by_key(&k, |s| s.key) {
            Ok(i) => {
                let old = slots[i].mapping();
                slots[i] = Slot::new(k, m);
                Some(old)
            }
            Err(i) => {
                slots.insert(i, Slot::new(k, m));
                None
            }
        };
        self.count(old, -1);
        self.count(Some(m), 1);
        old
    }

    /// Unmap `vb`; returns what it was mapped to.
    pub fn remove(&mut self, vb: VBlock) -> Option<Mapping> {
        let (c, k) = split(vb);
        let slots = self.chunks.get_mut(&c)?;
        let i = slots.binary_search_by_key(&k, |s| s.key).ok()?;
        let old = slots.remove(i).mapping();
        if slots.is_empty() {
            self.chunks.remove(&c);
        } else if slots.capacity() > 4 * slots.len() {
            slots.shrink_to(2 * slots.len());
        }
        self.count(Some(old), -1);
        Some(old)
    }

    /// Whether any block of chunk `c` is mapped.
    pub fn has_chunk(&self, c: u64) -> bool {
        self.chunks.contains_key(&c)
    }

    /// The chunks with a mapped block among `c0..=c1`, ascending. Walks the table when it is
    /// smaller than the range, so a few chunks of a petabyte layer cost what they hold.
    pub fn chunks_in(&self, c0: u64, c1: u64) -> Vec<u64> {
        if c0 > c1 {
            return Vec::new();
        }
        if c1 - c0 < self.chunks.len() as u64 * 2 {
            (c0..=c1).filter(|c| self.chunks.contains_key(c)).collect()
        } else {
            let mut cs: Vec<u64> = self
                .chunks
                .keys()
                .copied()
                .filter(|c| (c0..=c1).contains(c))
                .collect();
            cs.sort_unstable();
            cs
        }
    }

    /// Entries of chunk `c` in block order.
    pub fn chunk_entries(&self, c: u64) -> impl Iterator<Item = (VBlock, Mapping)> + '_ {
        self.chunks.get(&c).into_iter().flat_map(move |slots| {
            slots
                .iter()
                .map(move |s| (VBlock((c << CHUNK_BITS) | s.key as u64), s.mapping()))
        })
    }

    /// Every entry, chunk by chunk in no particular chunk order, blocks in order within a chunk.
    pub fn iter(&self) -> impl Iterator<Item = (VBlock, Mapping)> + '_ {
        self.chunks.iter().flat_map(|(&c, slots)| {
            slots
                .iter()
                .map(move |s| (VBlock((c << CHUNK_BITS) | s.key as u64), s.mapping()))
        })
    }

    /// Entries with `start <= vb < end`, in block order.
    pub fn range(&self, start: u64, end: u64) -> Vec<(VBlock, Mapping)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        for c in self.chunks_in(start >> CHUNK_BITS, (end - 1) >> CHUNK_BITS) {
            for (vb, m) in self.chunk_entries(c) {
                if vb.0 >= start && vb.0 < end {
                    out.push((vb, m));
                }
            }
        }
        out
    }

    /// Approximate heap bytes held (for the memory benchmark).
    pub fn heap_bytes(&self) -> usize {
        let slots: usize = self
            .chunks
            .values()
            .map(|v| v.capacity() * std::mem::size_of::<Slot>())
            .sum();
        slots + self.chunks.capacity() * (std::mem::size_of::<(u64, Vec<Slot>)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_remove_and_counters() {
        let mut m = BlockMap::new();
        let d = |p| Mapping::Data {
            pblock: PBlock(p),
            crc: (p as u32).wrapping_mul(3),
        };
        assert_eq!(m.set(VBlock(5), d(100)), None);
        assert_eq!(m.set(VBlock(5000), Mapping::Zero), None);
        assert_eq!(m.set(VBlock(5), d(MAX_PBLOCK)), Some(d(100)));
        assert_eq!(m.get(VBlock(5)), Some(d(MAX_PBLOCK)));
        assert_eq!(m.get(VBlock(6)), None);
        assert_eq!((m.data_blocks(), m.zero_blocks()), (1, 1));
        assert_eq!(
            m.range(0, 10_000),
            vec![(VBlock(5), d(MAX_PBLOCK)), (VBlock(5000), Mapping::Zero)]
        );
        assert_eq!(m.range(6, 1u64 << 40), vec![(VBlock(5000), Mapping::Zero)]);
        assert_eq!(m.remove(VBlock(5000)), Some(Mapping::Zero));
        assert_eq!(m.remove(VBlock(5000)), None);
        assert_eq!((m.data_blocks(), m.zero_blocks()), (1, 0));
    }

    #[test]
    fn slot_is_twelve_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 12);
    }
}
