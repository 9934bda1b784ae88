//! A chunk's **paged singles** (docs/DESIGN.md §12, "Paged singles"): the single data blocks a
//! checkpoint wrote with their crcs in its checksum pages, in 5 (or 6) bytes a block.
//!
//! The array is frozen between two re-pagings: entry `i`'s crc is at position `first + i` of
//! the checkpoint's checksum stream, so no position is stored and nothing may shift. A change
//! to a block marks its entry dead (the map keeps the new mapping in the chunk's extents).
//! One allocation of bytes: a header (the lowest pool block, the first crc's position, the word
//! width), then one word per block, sorted by key: key (10 bits, the top) | dead (1 bit) |
//! pool block − lowest (29 bits in a 5-byte word when the chunk's blocks lie that close, else
//! 37 in a 6-byte one), little-endian.

use super::map::CHUNK_BITS;

/// A word is `width` bytes: 5 when the chunk's pool blocks lie within 2^29 of the lowest
/// (2 TiB at 4 KiB), else 6 (2^37, 512 TiB).
const NARROW: usize = 5;
const WIDE: usize = 6;
fn off_bits(width: usize) -> u32 {
    width as u32 * 8 - CHUNK_BITS - 1
}
/// Pool blocks of one chunk's singles must lie within this many blocks of the lowest.
pub const MAX_SPAN: u64 = 1 << (WIDE as u32 * 8 - CHUNK_BITS - 1);
const WORD_MAX: u64 = (1 << 48) - 1;
/// The lowest pool block and the first crc's position (6 bytes each), then the word width.
const HEADER: usize = 13;

fn put(b: &mut [u8], v: u64) {
    b.copy_from_slice(&v.to_le_bytes()[..b.len()]);
}

fn get(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(x)
}

pub struct Singles(Box<[u8]>);

impl Singles {
    /// The singles `entries` (key within the chunk, pool block), sorted by key without
    /// repeats, whose crcs are at positions `first ..` in that order. None when they cannot be
    /// held so: empty, pool blocks spanning `MAX_SPAN` or more, or a position past 48 bits;
    /// the caller keeps such blocks resident.
    pub fn build(entries: &[(u16, u64)], first: u64) -> Option<Singles> {
        let low = entries.iter().map(|e| e.1).min()?;
        let high = entries.iter().map(|e| e.1).max()?;
        if high - low >= MAX_SPAN
            || high > WORD_MAX
            || first.checked_add(entries.len() as u64)? > WORD_MAX
        {
            return None;
        }
        debug_assert!(entries.windows(2).all(|w| w[0].0 < w[1].0));
        debug_assert!(entries.iter().all(|e| (e.0 as u64) < 1 << CHUNK_BITS));
        let width = if high - low < 1 << off_bits(NARROW) {
            NARROW
        } else {
            WIDE
        };
        let mut v = vec![0u8; HEADER + width * entries.len()];
        put(&mut v[0..6], low);
        put(&mut v[6..12], first);
        v[12] = width as u8;
        for (w, &(k, p)) in v[HEADER..].chunks_exact_mut(width).zip(entries) {
            put(w, (k as u64) << (off_bits(width) + 1) | (p - low));
        }
        Some(Singles(v.into_boxed_slice()))
    }

    fn low(&self) -> u64 {
        get(&self.0[0..6])
    }

    /// Position of entry 0's crc in the checksum stream.
    pub fn first(&self) -> u64 {
        get(&self.0[6..12])
    }

    fn width(&self) -> usize {
        self.0[12] as usize
    }

    fn len(&self) -> usize {
        (self.0.len() - HEADER) / self.width()
    }

    fn word(&self, i: usize) -> u64 {
        let w = self.width();
        get(&self.0[HEADER + i * w..HEADER + (i + 1) * w])
    }

    /// The key of entry `i`, from its top two bytes alone (what the binary search reads).
    fn key(&self, i: usize) -> u16 {
        let at = HEADER + (i + 1) * self.width() - 2;
        u16::from_le_bytes([self.0[at], self.0[at + 1]]) >> (16 - CHUNK_BITS)
    }

    fn dead_bit(&self) -> u64 {
        1 << off_bits(self.width())
    }

    /// The first entry whose key is at least `k`.
    fn lower_bound(&self, k: u16) -> usize {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.key(mid) < k {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    fn index(&self, k: u16) -> Option<usize> {
        let i = self.lower_bound(k);
        (i < self.len() && self.key(i) == k).then_some(i)
    }

    /// Entry `i` as (key, pool block, crc position), if live.
    fn entry(&self, i: usize) -> Option<(u16, u64, u64)> {
        let w = self.word(i);
        let dead = self.dead_bit();
        (w & dead == 0).then(|| {
            (
                self.key(i),
                self.low() + (w & (dead - 1)),
                self.first() + i as u64,
            )
        })
    }

    /// The live single at key `k`: (pool block, position of its crc).
    pub fn get(&self, k: u16) -> Option<(u64, u64)> {
        self.entry(self.index(k)?).map(|(_, p, at)| (p, at))
    }

    /// Mark the single at `k` dead; returns what it was, if live.
    pub fn kill(&mut self, k: u16) -> Option<(u64, u64)> {
        let i = self.index(k)?;
        let old = self.entry(i)?;
        let (w, dead) = (self.width(), self.dead_bit());
        let word = self.word(i) | dead;
        put(&mut self.0[HEADER + i * w..HEADER + (i + 1) * w], word);
        Some((old.1, old.2))
    }

    /// The live singles in key order: (key, pool block, crc position).
    pub fn iter(&self) -> impl Iterator<Item = (u16, u64, u64)> + '_ {
        (0..self.len()).filter_map(|i| self.entry(i))
    }

    /// Live entries in keys `k0 .. k1`, in key order.
    pub fn range(&self, k0: u16, k1: u16) -> impl Iterator<Item = (u16, u64, u64)> + '_ {
        let i0 = self.lower_bound(k0);
        let i1 = self.lower_bound(k1);
        (i0..i1.max(i0)).filter_map(|i| self.entry(i))
    }

    pub fn is_dead(&self) -> bool {
        self.iter().next().is_none()
    }

    pub fn heap_bytes(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn five_or_six_bytes_a_block_and_positions_follow_the_order() {
        let near = [(3u16, 1000u64), (7, 5), (1023, 5 + (1 << 29) - 1)];
        assert_eq!(
            Singles::build(&near, 0).unwrap().heap_bytes(),
            HEADER + 5 * 3
        );
        let edge = [(0u16, 5u64), (1, 5 + (1 << 29))];
        let s = Singles::build(&edge, 0).unwrap();
        assert_eq!(s.heap_bytes(), HEADER + 6 * 2);
        assert_eq!(s.get(1), Some((5 + (1 << 29), 1)));
        let e = [(3u16, 1000u64), (7, 5), (1023, 5 + MAX_SPAN - 1)];
        let s = Singles::build(&e, 4096).unwrap();
        assert_eq!(s.heap_bytes(), HEADER + 6 * 3);
        assert_eq!(s.get(3), Some((1000, 4096)));
        assert_eq!(s.get(7), Some((5, 4097)));
        assert_eq!(s.get(1023), Some((5 + MAX_SPAN - 1, 4098)));
        assert_eq!(s.get(4), None);
        assert_eq!(s.get(0), None);
    }

    #[test]
    fn refuses_what_it_cannot_hold() {
        assert!(Singles::build(&[], 0).is_none());
        assert!(Singles::build(&[(0, 5), (1, 5 + MAX_SPAN)], 0).is_none());
        assert!(Singles::build(&[(0, WORD_MAX + 1)], 0).is_none());
        assert!(Singles::build(&[(0, 1), (1, 2)], WORD_MAX - 1).is_none());
        assert!(Singles::build(&[(0, 1), (1, 2)], WORD_MAX - 2).is_some());
    }

    #[test]
    fn a_dead_entry_keeps_the_others_positions() {
        let e: Vec<(u16, u64)> = (0..10).map(|k| (k * 3, 100 + k as u64)).collect();
        let mut s = Singles::build(&e, 50).unwrap();
        assert_eq!(s.kill(9), Some((103, 53)));
        assert_eq!(s.kill(9), None);
        assert_eq!(s.get(9), None);
        assert_eq!(s.get(12), Some((104, 54)));
        assert_eq!(s.iter().count(), 9);
        assert_eq!(
            s.range(6, 13).collect::<Vec<_>>(),
            vec![(6, 102, 52), (12, 104, 54)]
        );
    }

    proptest! {
        /// Any sorted set of singles with any kills reads back like a model map whose entry
        /// `i`'s crc is at `first + i`.
        #[test]
        fn matches_a_model(
            keys in proptest::collection::btree_map(0u16..1024, 0u64..MAX_SPAN, 1..200),
            narrow in any::<bool>(),
            low in 0u64..(WORD_MAX - 2 * MAX_SPAN),
            wide in proptest::bool::weighted(0.1),
            first in 0u64..(1 << 47),
            kills in proptest::collection::vec(0u16..1024, 0..100),
            lo in 0u16..1024, hi in 0u16..1024,
        ) {
            // Narrow: a chunk whose pool blocks fit 5-byte words.
            let span = if narrow { 1 << 29 } else { MAX_SPAN };
            let mut e: Vec<(u16, u64)> =
                keys.iter().map(|(&k, &p)| (k, low + p % span)).collect();
            if wide {
                e.last_mut().unwrap().1 = e[0].1 + MAX_SPAN;
            }
            let low = e.iter().map(|x| x.1).min().unwrap();
            let high = e.iter().map(|x| x.1).max().unwrap();
            let built = Singles::build(&e, first);
            prop_assert_eq!(built.is_some(), high - low < MAX_SPAN);
            let Some(mut s) = built else { return Ok(()) };
            let mut model: BTreeMap<u16, (u64, u64)> =
                e.iter().enumerate().map(|(i, &(k, p))| (k, (p, first + i as u64))).collect();
            for k in kills {
                prop_assert_eq!(s.kill(k), model.remove(&k));
            }
            for k in 0..1024u16 {
                prop_assert_eq!(s.get(k), model.get(&k).copied());
            }
            let all: Vec<_> = model.iter().map(|(&k, &(p, at))| (k, p, at)).collect();
            prop_assert_eq!(s.iter().collect::<Vec<_>>(), all.clone());
            let want: Vec<_> = all.iter().copied().filter(|x| x.0 >= lo && x.0 < hi).collect();
            prop_assert_eq!(s.range(lo, hi).collect::<Vec<_>>(), want);
            prop_assert_eq!(s.is_dead(), model.is_empty());
        }
    }
}
