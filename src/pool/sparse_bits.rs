//! A set of block numbers that costs by what it holds, for the allocator's sets that are
//! usually nearly empty but may hold millions now and then (issue 22's memory goal: an imported
//! image's free blocks are all holes and none is fresh between commits, while one big import
//! makes millions fresh in a single transaction, in runs).
//!
//! The blocks are cut into chunks of `CHUNK_BITS`; a chunk holding a member is a boxed bitmap,
//! one holding none costs its null pointer in the directory (8 bytes per 4096 blocks, up to the
//! highest member's chunk: 0.002 B a block). Lookups and changes are O(1); the next member
//! from a block skips absent chunks a pointer at a time (64 times fewer steps than a dense
//! bitmap's word scan). At worst (a member in every chunk) it costs about what a dense bitmap
//! would (1 bit a block and 3% more: the directory's pointer and the count); at best nothing.
//!
//! Not a crate (`roaring` was the other candidate): a roaring bitmap's array containers cost
//! less for lone members (2 B each), but it is not in this machine's registry cache, holds
//! u32s (its 64-bit form is a map of them), and finds the next member by rank and select; this
//! needs four operations, each a few lines.

/// Blocks per chunk: a chunk is 512 bytes of bits.
const CHUNK_BITS: u64 = 4096;
const WORDS: usize = (CHUNK_BITS / 64) as usize;

#[derive(Clone)]
struct Chunk {
    /// Members in `words`: the chunk is dropped when it reaches 0.
    ones: u32,
    words: [u64; WORDS],
}

impl Chunk {
    /// The first member at or after bit `from` of this chunk.
    fn first_from(&self, from: u64) -> Option<u64> {
        let mut w = (from / 64) as usize;
        let mut word = self.words[w] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                return Some(w as u64 * 64 + word.trailing_zeros() as u64);
            }
            w += 1;
            if w == WORDS {
                return None;
            }
            word = self.words[w];
        }
    }
}

/// A set of block numbers (see the module's comment).
#[derive(Clone, Default)]
pub struct SparseBits {
    /// Chunk `c` holds blocks `c * CHUNK_BITS ..`; None holds none.
    chunks: Vec<Option<Box<Chunk>>>,
    len: u64,
}

/// Chunk index, word index in the chunk, bit mask in the word.
fn split(i: u64) -> (usize, usize, u64) {
    let c = (i / CHUNK_BITS) as usize;
    let w = ((i % CHUNK_BITS) / 64) as usize;
    (c, w, 1u64 << (i % 64))
}

impl SparseBits {
    /// How many blocks are members.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, i: u64) -> bool {
        let (c, w, bit) = split(i);
        self.chunks
            .get(c)
            .and_then(|ch| ch.as_deref())
            .is_some_and(|ch| ch.words[w] & bit != 0)
    }

    /// Add `i`; false if it was a member already.
    pub fn insert(&mut self, i: u64) -> bool {
        let (c, w, bit) = split(i);
        if c >= self.chunks.len() {
            self.chunks.resize_with(c + 1, || None);
        }
        let ch = self.chunks[c].get_or_insert_with(|| {
            Box::new(Chunk {
                ones: 0,
                words: [0; WORDS],
            })
        });
        if ch.words[w] & bit != 0 {
            return false;
        }
        ch.words[w] |= bit;
        ch.ones += 1;
        self.len += 1;
        true
    }

    /// Take `i` out; false if it was not a member. A chunk left empty is freed.
    pub fn remove(&mut self, i: u64) -> bool {
        let (c, w, bit) = split(i);
        let Some(slot) = self.chunks.get_mut(c) else {
            return false;
        };
        let Some(ch) = slot.as_deref_mut() else {
            return false;
        };
        if ch.words[w] & bit == 0 {
            return false;
        }
        ch.words[w] &= !bit;
        ch.ones -= 1;
        self.len -= 1;
        if ch.ones == 0 {
            *slot = None;
        }
        true
    }

    /// Remove every member (the directory keeps its capacity for the next ones).
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }

    /// The lowest member in `from..to`.
    pub fn first_in(&self, from: u64, to: u64) -> Option<u64> {
        if from >= to || self.len == 0 {
            return None;
        }
        let last = ((to - 1) / CHUNK_BITS) as usize;
        let mut c = (from / CHUNK_BITS) as usize;
        let mut bit = from % CHUNK_BITS;
        while c <= last && c < self.chunks.len() {
            if let Some(b) = self.chunks[c].as_deref().and_then(|ch| ch.first_from(bit)) {
                let i = c as u64 * CHUNK_BITS + b;
                return (i < to).then_some(i);
            }
            c += 1;
            bit = 0;
        }
        None
    }

    /// Every member, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(c, ch)| ch.as_deref().map(|ch| (c as u64 * CHUNK_BITS, ch)))
            .flat_map(|(base, ch)| {
                ch.words
                    .iter()
                    .enumerate()
                    .flat_map(move |(w, &word)| Ones(word).map(move |b| base + w as u64 * 64 + b))
            })
    }

    /// Bytes of heap held: the directory's capacity and the chunks present.
    pub fn heap_bytes(&self) -> u64 {
        let present = self.chunks.iter().filter(|ch| ch.is_some()).count();
        (self.chunks.capacity() * size_of::<Option<Box<Chunk>>>() + present * size_of::<Chunk>())
            as u64
    }
}

/// The set bits of a word, lowest first.
struct Ones(u64);

impl Iterator for Ones {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros() as u64;
        self.0 &= self.0 - 1;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Random inserts, removes and clears against a `BTreeSet`, over a span of a few chunks
    /// and runs as `alloc_run` makes them: membership, the count, the next member in a range
    /// and the order of iteration agree at every step.
    #[test]
    fn sparse_bits_follow_a_model() {
        for seed in 0..20 {
            let mut rng = crate::pool::sim::SplitMix::new(seed);
            let mut s = SparseBits::default();
            let mut model = BTreeSet::new();
            let span = 5 * CHUNK_BITS;
            for step in 0..3000 {
                match rng.below(20) {
                    0..=7 => {
                        let i = rng.below(span);
                        assert_eq!(s.insert(i), model.insert(i), "seed {seed} step {step}");
                    }
                    8..=9 => {
                        let (i, n) = (rng.below(span), 1 + rng.below(300));
                        for b in i..i + n {
                            assert_eq!(s.insert(b), model.insert(b));
                        }
                    }
                    10..=17 => {
                        // Mostly members, so chunks empty out and are dropped.
                        let i = match model.iter().nth(rng.below(model.len() as u64 + 1) as usize) {
                            Some(&m) if rng.below(4) > 0 => m,
                            _ => rng.below(span),
                        };
                        assert_eq!(s.remove(i), model.remove(&i), "seed {seed} step {step}");
                    }
                    18 => {
                        let (from, to) = (rng.below(span + 100), rng.below(span + 100));
                        let want = model.range(from..to.max(from)).next().copied();
                        assert_eq!(s.first_in(from, to), want, "seed {seed} step {step}");
                    }
                    _ if rng.below(10) == 0 => {
                        s.clear();
                        model.clear();
                    }
                    _ => {}
                }
                assert_eq!(s.len(), model.len() as u64, "seed {seed} step {step}");
                let probe = rng.below(span);
                assert_eq!(s.contains(probe), model.contains(&probe));
                let from = rng.below(span);
                let want = model.range(from..).next().copied();
                assert_eq!(s.first_in(from, u64::MAX), want, "seed {seed} step {step}");
            }
            assert!(s.iter().eq(model.iter().copied()), "seed {seed}");
            let present = s.chunks.iter().filter(|c| c.is_some()).count();
            let wanted: BTreeSet<u64> = model.iter().map(|b| b / CHUNK_BITS).collect();
            assert_eq!(present, wanted.len(), "seed {seed}: an empty chunk kept");
        }
    }

    /// The cost follows the members: none costs nothing, one costs a chunk, a member in every
    /// chunk about what a dense bitmap of the span costs.
    #[test]
    fn sparse_bits_cost_by_what_they_hold() {
        let mut s = SparseBits::default();
        assert_eq!(s.heap_bytes(), 0);
        let n = 1000 * CHUNK_BITS;
        s.insert(n - 1);
        s.remove(n - 1);
        s.clear();
        s.insert(7);
        assert!(s.heap_bytes() <= 8 * 1000 + size_of::<Chunk>() as u64);
        for c in 0..1000 {
            s.insert(c * CHUNK_BITS + 5);
        }
        let dense = n / 8;
        assert!(s.heap_bytes() <= dense + dense / 25, "{}", s.heap_bytes());
    }
}
