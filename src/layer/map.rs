//! A layer's sparse block map: virtual block → pool block (with the data's crc) or zero.
//!
//! Memory is the constraint, so the map is a hash of 1024-block chunks, each a sorted vector of
//! 12-byte **extents**: one block with its crc inline, or a run of blocks contiguous both in the
//! virtual space and in the pool (or a run of whiteouts), whose crcs sit in the chunk's crc
//! vector, 4 bytes each. An imported image is one run per chunk: ~4.1 bytes per block, nearly
//! all of it the crcs. Scattered blocks are single extents, 12 bytes as before runs existed;
//! a chunk only starts a crc vector (~60 bytes of table entry and allocation) once a run of
//! `FIRST_RUN` blocks pays for it. Unmapped blocks cost nothing; a chunk costs one hash entry
//! (~40 bytes). The representation is not canonical (two adjacent extents may be contiguous);
//! lookups do not care. Nothing here is on disk: the records (map entries and map runs,
//! FORMAT.md §6.3) are replayed into it at open, so this is free to change.

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
type ChunkTable<T> = HashMap<u64, T, BuildHasherDefault<ChunkHasher>>;

/// Marks an extent that is a run (its crcs in the chunk's crc vector) in `Ext::key`.
const RUN: u16 = 1 << 15;
/// A chunk with no crc vector yet starts one for a run of at least this many data blocks; once
/// it has one, two contiguous blocks make a run (8 bytes of crcs instead of 12 of extent).
const FIRST_RUN: usize = 16;

/// One extent of a chunk in 12 bytes. `key` is the first block's key within the chunk (bit 15:
/// a run); `hi:lo` the first pool block or the zero mark; `word` a single block's crc, or for a
/// run its length (high half) and where its crcs start in the chunk's crc vector (low half;
/// unused for a run of whiteouts).
#[derive(Clone, Copy, Debug)]
struct Ext {
    key: u16,
    hi: u16,
    lo: u32,
    word: u32,
}

impl Ext {
    fn single(key: u16, m: Mapping) -> Ext {
        let s = Slot::new(key, m);
        Ext {
            key,
            hi: s.hi,
            lo: s.lo,
            word: s.crc,
        }
    }
    fn run(key: u16, base: u64, len: u16, crc_at: usize) -> Ext {
        debug_assert!(len >= 1 && key as u64 + len as u64 <= CHUNK_LEN && crc_at < 1 << 16);
        Ext {
            key: key | RUN,
            hi: (base >> 32) as u16,
            lo: base as u32,
            word: (len as u32) << 16 | crc_at as u32,
        }
    }
    fn start(&self) -> u16 {
        self.key & !RUN
    }
    fn is_run(&self) -> bool {
        self.key & RUN != 0
    }
    fn len(&self) -> u16 {
        if self.is_run() {
            (self.word >> 16) as u16
        } else {
            1
        }
    }
    fn end(&self) -> u16 {
        self.start() + self.len()
    }
    fn crc_at(&self) -> usize {
        (self.word & 0xFFFF) as usize
    }
    fn set_len(&mut self, len: u16) {
        self.word = (len as u32) << 16 | (self.word & 0xFFFF);
    }
    fn set_crc_at(&mut self, at: usize) {
        self.word = (self.word & 0xFFFF_0000) | at as u32;
    }
    /// The first pool block, or `ZERO_MARK`.
    fn base(&self) -> u64 {
        ((self.hi as u64) << 32) | self.lo as u64
    }
    fn is_zero(&self) -> bool {
        self.base() == ZERO_MARK
    }
    /// Whether data run `self` has its crcs in the vector (a run of data, as opposed to a single
    /// block or whiteouts).
    fn has_crcs(&self) -> bool {
        self.is_run() && !self.is_zero()
    }
    /// The mapping of the block `off` blocks into the extent.
    fn at(&self, off: u16, crcs: &[u32]) -> Mapping {
        debug_assert!(off < self.len());
        if self.is_zero() {
            Mapping::Zero
        } else if self.is_run() {
            Mapping::Data {
                pblock: PBlock(self.base() + off as u64),
                crc: crcs[self.crc_at() + off as usize],
            }
        } else {
            Mapping::Data {
                pblock: PBlock(self.base()),
                crc: self.word,
            }
        }
    }
    /// Whether `m` at the block just past the extent continues it.
    fn continued_by(&self, m: Mapping) -> bool {
        match m {
            Mapping::Zero => self.is_zero(),
            Mapping::Data { pblock, .. } => {
                !self.is_zero() && pblock.0 == self.base() + self.len() as u64
            }
        }
    }
}

/// A chunk's crcs of its data runs; `dead` counts entries no run names any more (left by
/// splitting a run), reclaimed when they outnumber the live ones.
#[derive(Default)]
struct Crcs {
    v: Vec<u32>,
    dead: usize,
}

impl Crcs {
    /// Append, growing to powers of two: a full chunk's 1024 crcs then fill their vector
    /// exactly (`Vec`'s own doubling from an odd start would leave up to half of it unused).
    fn push(&mut self, items: impl ExactSizeIterator<Item = u32>) {
        let want = self.v.len() + items.len();
        if want > self.v.capacity() {
            self.v
                .reserve_exact(want.next_power_of_two() - self.v.len());
        }
        self.v.extend(items);
    }
}

#[derive(Default)]
pub struct BlockMap {
    chunks: ChunkTable<Vec<Ext>>,
    crcs: ChunkTable<Crcs>,
    data_blocks: u64,
    zero_blocks: u64,
}

/// Split a virtual block number into (chunk, key within the chunk).
pub fn split(vb: VBlock) -> (u64, u16) {
    (vb.0 >> CHUNK_BITS, (vb.0 & (CHUNK_LEN - 1)) as u16)
}

/// Index of the extent that would hold key `k`: the last one starting at or before it.
fn find(exts: &[Ext], k: u16) -> Option<usize> {
    exts.partition_point(|e| e.start() <= k).checked_sub(1)
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

    fn crcs_of(&self, c: u64) -> &[u32] {
        self.crcs.get(&c).map_or(&[], |x| &x.v)
    }

    pub fn get(&self, vb: VBlock) -> Option<Mapping> {
        let (c, k) = split(vb);
        let exts = self.chunks.get(&c)?;
        let e = exts[find(exts, k)?];
        (k < e.end()).then(|| e.at(k - e.start(), self.crcs_of(c)))
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
        let exts = self.chunks.entry(c).or_default();
        let old = Chunk {
            c,
            exts,
            crcs: &mut self.crcs,
        }
        .put(k, Some(m));
        self.count(old, -1);
        self.count(Some(m), 1);
        old
    }

    /// Map `crcs.len()` blocks from `vb` to the pool blocks from `pblock`, block `i`'s data
    /// having crc `crcs[i]` (a map run, replayed at open). A piece of at least `FIRST_RUN`
    /// blocks in a chunk holding nothing yet becomes one run at once, as `set` block by block
    /// would leave it; any other piece goes through `set`.
    pub fn set_run(&mut self, vb: VBlock, pblock: PBlock, crcs: &[u32]) {
        let mut done = 0;
        while done < crcs.len() {
            let (v, p) = (vb.0 + done as u64, pblock.0 + done as u64);
            let (c, k) = split(VBlock(v));
            let len = ((CHUNK_LEN - k as u64) as usize).min(crcs.len() - done);
            let piece = &crcs[done..done + len];
            if len >= FIRST_RUN && !self.chunks.contains_key(&c) {
                self.chunks.insert(c, vec![Ext::run(k, p, len as u16, 0)]);
                let v = piece.to_vec();
                self.crcs.insert(c, Crcs { v, dead: 0 });
                self.data_blocks += len as u64;
            } else {
                for (i, &crc) in (0u64..).zip(piece) {
                    let pblock = PBlock(p + i);
                    self.set(VBlock(v + i), Mapping::Data { pblock, crc });
                }
            }
            done += len;
        }
    }

    /// Apply `entries` in order (`Some`: `set`, `None`: `remove`), ending with the same map as
    /// calling those one by one; the bulk path of replay. Consecutive entries of one chunk find
    /// it once, and an entry past the chunk's last extent that does not continue it is pushed
    /// onto the end, as `set` would insert it. A checkpoint writes the maps chunk by chunk,
    /// blocks in order, so at open nearly every entry takes that path: replaying a scattered
    /// 10M-block checkpoint through `set` spent most of the open finding the chunk again and
    /// again (docs/BENCHMARKS.md, "Open time").
    pub fn put_all(&mut self, entries: impl IntoIterator<Item = (VBlock, Option<Mapping>)>) {
        let mut it = entries.into_iter().peekable();
        while let Some((vb, to)) = it.next() {
            let Some(m) = to else {
                self.remove(vb);
                continue;
            };
            let (c, k) = split(vb);
            let mut chunk = Chunk {
                c,
                exts: self.chunks.entry(c).or_default(),
                crcs: &mut self.crcs,
            };
            let (mut data, mut zero) = (0i64, 0i64);
            let mut tally = |m: Option<Mapping>, d: i64| match m {
                Some(Mapping::Data { .. }) => data += d,
                Some(Mapping::Zero) => zero += d,
                None => {}
            };
            let mut next = Some((k, m));
            while let Some((k, m)) = next {
                tally(chunk.put_last(k, m), -1);
                tally(Some(m), 1);
                next = match it.peek() {
                    Some(&(v, Some(m))) if split(v).0 == c => {
                        it.next();
                        Some((split(v).1, m))
                    }
                    _ => None,
                };
            }
            self.data_blocks = self.data_blocks.wrapping_add_signed(data);
            self.zero_blocks = self.zero_blocks.wrapping_add_signed(zero);
        }
    }

    /// Unmap `vb`; returns what it was mapped to.
    pub fn remove(&mut self, vb: VBlock) -> Option<Mapping> {
        let (c, k) = split(vb);
        let exts = self.chunks.get_mut(&c)?;
        let mut chunk = Chunk {
            c,
            exts,
            crcs: &mut self.crcs,
        };
        let old = chunk.put(k, None);
        if chunk.exts.is_empty() {
            self.chunks.remove(&c);
            self.crcs.remove(&c);
        }
        self.count(old, -1);
        old
    }
}

/// One chunk being changed: its extents and the table of crc vectors (found once per change).
struct Chunk<'a> {
    c: u64,
    exts: &'a mut Vec<Ext>,
    crcs: &'a mut ChunkTable<Crcs>,
}

impl Chunk<'_> {
    /// `put(k, Some(m))`, pushing `m` as a single extent without a search when it lies past
    /// the last extent and does not continue it (what `add` would do there).
    fn put_last(&mut self, k: u16, m: Mapping) -> Option<Mapping> {
        match self.exts.last() {
            Some(e) if k < e.end() || (k == e.end() && e.continued_by(m)) => self.put(k, Some(m)),
            _ => {
                self.exts.push(Ext::single(k, m));
                None
            }
        }
    }

    /// Make key `k` map to `to` (None: unmapped); returns what it mapped to. The caller drops
    /// the chunk if this leaves it empty.
    fn put(&mut self, k: u16, to: Option<Mapping>) -> Option<Mapping> {
        let c = self.c;
        let exts = &mut *self.exts;
        let i = find(exts, k);
        let old = match i {
            Some(i) if k < exts[i].end() => {
                let e = exts[i];
                let off = k - e.start();
                let crcs = if e.has_crcs() {
                    self.crcs.get_mut(&c)
                } else {
                    None
                };
                let old = e.at(off, crcs.as_ref().map_or(&[], |x| &x.v));
                match to {
                    // The same place (a fresh block rewritten in place): only the crc changes.
                    Some(Mapping::Data { pblock, crc })
                        if !e.is_zero() && pblock.0 == e.base() + off as u64 =>
                    {
                        match crcs {
                            Some(x) if e.is_run() => x.v[e.crc_at() + off as usize] = crc,
                            _ => exts[i].word = crc,
                        }
                    }
                    Some(Mapping::Zero) if e.is_zero() => {}
                    _ if !e.is_run() => match to {
                        Some(m) => exts[i] = Ext::single(k, m),
                        None => {
                            exts.remove(i);
                        }
                    },
                    _ => self.split_run(i, off, to),
                }
                Some(old)
            }
            _ => {
                if let Some(m) = to {
                    self.add(i, k, m);
                }
                None
            }
        };
        let exts = &mut *self.exts;
        if exts.is_empty() {
            self.crcs.remove(&c);
        } else if exts.capacity() > 4 * exts.len() {
            exts.shrink_to(2 * exts.len());
        }
        old
    }

    /// Replace block `off` of run `exts[i]` of chunk `c` by `to`, leaving the rest of the run
    /// on either side (a piece of one block becomes a single extent). Its crcs stay where they
    /// are; the replaced block's becomes dead.
    fn split_run(&mut self, i: usize, off: u16, to: Option<Mapping>) {
        let (c, exts) = (self.c, &mut *self.exts);
        let e = exts[i];
        let data = e.has_crcs();
        let empty = Crcs::default();
        let crcs = if data { &self.crcs[&c] } else { &empty };
        let piece = |from: u16, len: u16| {
            let base = if data {
                e.base() + from as u64
            } else {
                ZERO_MARK
            };
            if len == 1 {
                Ext::single(e.start() + from, e.at(from, &crcs.v))
            } else {
                let at = if data { e.crc_at() + from as usize } else { 0 };
                Ext::run(e.start() + from, base, len, at)
            }
        };
        let mut pieces = Vec::with_capacity(3);
        let mut dead = 1;
        if off > 0 {
            pieces.push(piece(0, off));
            dead += (off == 1) as usize;
        }
        if let Some(m) = to {
            pieces.push(Ext::single(e.start() + off, m));
        }
        if off + 1 < e.len() {
            pieces.push(piece(off + 1, e.len() - off - 1));
            dead += (e.len() - off - 1 == 1) as usize;
        }
        exts.splice(i..=i, pieces);
        if data {
            self.crcs.get_mut(&c).expect("a data run has crcs").dead += dead;
            self.compact();
        }
    }

    /// Map key `k` of chunk `c`, unmapped now, to `m`: it extends the extent before it (`i`)
    /// when it continues it, else it is a single extent of its own.
    fn add(&mut self, i: Option<usize>, k: u16, m: Mapping) {
        let (c, exts) = (self.c, &mut *self.exts);
        let at = i.map_or(0, |i| i + 1);
        let Some(i) = i.filter(|&i| exts[i].end() == k && exts[i].continued_by(m)) else {
            exts.insert(at, Ext::single(k, m));
            return;
        };
        let e = exts[i];
        let Mapping::Data { crc, .. } = m else {
            // Whiteouts need no crcs: a run of them is one extent whatever its length.
            exts[i] = Ext::run(e.start(), ZERO_MARK, e.len() + 1, 0);
            return;
        };
        if e.is_run() {
            let x = self.crcs.get_mut(&c).expect("a data run has crcs");
            if e.crc_at() + e.len() as usize != x.v.len() {
                // Its crcs are not at the end of the vector: move them there.
                let from = e.crc_at();
                exts[i].set_crc_at(x.v.len());
                let moved = x.v[from..from + e.len() as usize].to_vec();
                x.push(moved.into_iter());
                x.dead += e.len() as usize;
            }
            x.push(std::iter::once(crc));
            exts[i].set_len(e.len() + 1);
            self.compact();
            return;
        }
        // A single block continued: with a crc vector already, two blocks make a run; without,
        // only a run of FIRST_RUN singles pays for starting one.
        let mut j = i;
        if !self.crcs.contains_key(&c) {
            while j > 0
                && i - j + 1 < FIRST_RUN - 1
                && !exts[j - 1].is_run()
                && exts[j - 1].end() == exts[j].start()
                && exts[j - 1].continued_by(exts[j].at(0, &[]))
            {
                j -= 1;
            }
            if i - j + 2 < FIRST_RUN {
                exts.insert(at, Ext::single(k, m));
                return;
            }
        }
        let x = self.crcs.entry(c).or_default();
        let crc_at = x.v.len();
        x.push(
            exts[j..=i]
                .iter()
                .map(|s| s.word)
                .chain([crc])
                .collect::<Vec<_>>()
                .into_iter(),
        );
        let run = Ext::run(exts[j].start(), exts[j].base(), (i - j + 2) as u16, crc_at);
        exts.splice(j..=i, [run]);
    }

    /// Drop the chunk's dead crcs once they outnumber the live ones, renumbering the runs.
    fn compact(&mut self) {
        let c = self.c;
        let x = self
            .crcs
            .get_mut(&c)
            .expect("a chunk with data runs has crcs");
        if x.dead * 2 <= x.v.len() {
            return;
        }
        let exts = &mut *self.exts;
        let mut v = Vec::with_capacity(x.v.len() - x.dead);
        for e in exts.iter_mut().filter(|e| e.has_crcs()) {
            let from = e.crc_at();
            e.set_crc_at(v.len());
            v.extend_from_slice(&x.v[from..from + e.len() as usize]);
        }
        if v.is_empty() {
            self.crcs.remove(&c);
        } else {
            *x = Crcs { v, dead: 0 };
        }
    }
}

impl BlockMap {
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

    /// The blocks of chunk `c` with extents `exts`, in block order.
    fn blocks<'a>(
        &'a self,
        c: u64,
        exts: &'a [Ext],
    ) -> impl Iterator<Item = (VBlock, Mapping)> + 'a {
        let crcs = self.crcs_of(c);
        exts.iter().flat_map(move |e| {
            (0..e.len()).map(move |off| {
                let vb = VBlock((c << CHUNK_BITS) | (e.start() + off) as u64);
                (vb, e.at(off, crcs))
            })
        })
    }

    /// Entries of chunk `c` in block order.
    pub fn chunk_entries(&self, c: u64) -> impl Iterator<Item = (VBlock, Mapping)> + '_ {
        self.chunks
            .get(&c)
            .into_iter()
            .flat_map(move |exts| self.blocks(c, exts))
    }

    /// Every entry, chunk by chunk in no particular chunk order, blocks in order within a chunk.
    pub fn iter(&self) -> impl Iterator<Item = (VBlock, Mapping)> + '_ {
        self.chunks
            .iter()
            .flat_map(|(&c, exts)| self.blocks(c, exts))
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
        let exts: usize = self
            .chunks
            .values()
            .map(|v| v.capacity() * std::mem::size_of::<Ext>())
            .sum();
        let crcs: usize = self.crcs.values().map(|x| x.v.capacity() * 4).sum();
        exts + crcs
            + self.chunks.capacity() * (std::mem::size_of::<(u64, Vec<Ext>)>() + 1)
            + self.crcs.capacity() * (std::mem::size_of::<(u64, Crcs)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

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
    fn slot_and_extent_are_twelve_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 12);
        assert_eq!(std::mem::size_of::<Ext>(), 12);
    }

    fn data(p: u64) -> Mapping {
        Mapping::Data {
            pblock: PBlock(p),
            crc: (p as u32).wrapping_mul(0x9E37_79B9),
        }
    }

    /// The rules of the representation: extents sorted and apart, inside the chunk, each run's
    /// crcs inside the vector, `dead` exactly the unnamed crcs, no empty chunk.
    fn check_shape(m: &BlockMap) {
        for (c, exts) in &m.chunks {
            assert!(!exts.is_empty(), "chunk {c} empty");
            for w in exts.windows(2) {
                assert!(w[0].end() <= w[1].start(), "chunk {c}: {w:?} overlap");
            }
            let mut live = 0;
            for e in exts {
                assert!(e.len() >= 1 && e.end() as u64 <= CHUNK_LEN, "{e:?}");
                if e.has_crcs() {
                    let x = &m.crcs[c];
                    assert!(e.crc_at() + e.len() as usize <= x.v.len(), "{e:?}");
                    live += e.len() as usize;
                }
            }
            match m.crcs.get(c) {
                Some(x) => assert_eq!(x.v.len() - x.dead, live, "chunk {c} dead count"),
                None => assert_eq!(live, 0),
            }
        }
        assert!(m.crcs.keys().all(|c| m.chunks.contains_key(c)));
    }

    #[test]
    fn an_imported_image_costs_its_crcs_and_little_more() {
        let mut m = BlockMap::new();
        for vb in 0..1 << 20 {
            m.set(VBlock(vb), data(1000 + vb));
        }
        let per_block = m.heap_bytes() as f64 / (1 << 20) as f64;
        assert!(per_block < 4.2, "{per_block} bytes per block");
        assert_eq!(m.chunks.values().map(Vec::len).sum::<usize>(), 1024);
        check_shape(&m);
    }

    #[test]
    fn scattered_blocks_cost_what_slots_did() {
        let mut m = BlockMap::new();
        // One block in each 16, pool blocks in a different order from the virtual ones.
        for i in 0..1u64 << 16 {
            let vb = (i * 7919 % (1 << 16)) * 16 + i % 16;
            m.set(VBlock(vb), data(1000 + i));
        }
        let per_block = m.heap_bytes() as f64 / (1 << 16) as f64;
        assert!(per_block <= 15.0, "{per_block} bytes per block");
        assert!(m.crcs.is_empty());
        check_shape(&m);
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Map `len` blocks from `vb` to pool blocks from `p` (contiguous: a run when it
        /// continues what is there).
        Data {
            vb: u64,
            len: u64,
            p: u64,
            crc: u32,
        },
        Zero {
            vb: u64,
            len: u64,
        },
        Unmap {
            vb: u64,
            len: u64,
        },
        /// `Data`, through `set_run`.
        Run {
            vb: u64,
            len: u64,
            p: u64,
            crc: u32,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let vb = 0u64..3 * CHUNK_LEN;
        let len = prop_oneof![Just(1u64), 1u64..40, 1u64..1100];
        prop_oneof![
            4 => (vb.clone(), len.clone(), 0u64..4, any::<u32>()).prop_map(|(vb, len, p, crc)| {
                // Pool blocks that continue the virtual ones (p 0), or are elsewhere.
                Op::Data { vb, len, p: 100 + vb + p * 10_000 + (p % 2) * vb, crc }
            }),
            1 => (vb.clone(), len.clone()).prop_map(|(vb, len)| Op::Zero { vb, len }),
            2 => (vb.clone(), len.clone()).prop_map(|(vb, len)| Op::Unmap { vb, len }),
            2 => (vb, len, 0u64..4, any::<u32>()).prop_map(|(vb, len, p, crc)| {
                Op::Run { vb, len, p: 100 + vb + p * 10_000, crc }
            }),
        ]
    }

    /// One replayed entry: unmap, whiteout, or data at a pool block that continues the virtual
    /// one (`p` 0: runs form when entries are in order) or lies elsewhere. Blocks come from a
    /// few places: dense ones so runs and crc vectors form, sparse ones over three chunks.
    fn entry() -> impl Strategy<Value = (u64, Option<Mapping>)> {
        let vb = prop_oneof![0u64..3 * CHUNK_LEN, 0u64..48, 1000u64..1100];
        (vb, 0u8..8, 0u64..3, any::<u32>()).prop_map(|(vb, kind, p, crc)| match kind {
            0 => (vb, None),
            1 => (vb, Some(Mapping::Zero)),
            _ => {
                let pblock = PBlock(100 + vb + p * 10_000);
                (vb, Some(Mapping::Data { pblock, crc }))
            }
        })
    }

    fn put_one(m: &mut BlockMap, vb: u64, to: Option<Mapping>) {
        match to {
            Some(x) => m.set(VBlock(vb), x),
            None => m.remove(VBlock(vb)),
        };
    }

    /// The representation itself: every chunk's extents and crc vector.
    type Shape = BTreeMap<u64, (Vec<(u16, u16, u32, u32)>, Vec<u32>, usize)>;
    fn shape(m: &BlockMap) -> Shape {
        m.chunks
            .iter()
            .map(|(&c, exts)| {
                let exts = exts.iter().map(|e| (e.key, e.hi, e.lo, e.word)).collect();
                let crcs = m
                    .crcs
                    .get(&c)
                    .map_or((Vec::new(), 0), |x| (x.v.clone(), x.dead));
                (c, (exts, crcs.0, crcs.1))
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// `put_all` (replay's bulk path) builds exactly the map that `set` and `remove` one
        /// by one build from the same entries: the same extents, crc vectors and counters,
        /// over maps that already hold blocks or not, with entries in block order (as a
        /// checkpoint or a sorted log batch gives them: its pushes) or in any order.
        #[test]
        fn put_all_builds_what_set_builds(
            before in proptest::collection::vec(entry(), 0..300),
            entries in proptest::collection::vec(entry(), 1..600),
            sorted in any::<bool>(),
        ) {
            let (mut bulk, mut one) = (BlockMap::new(), BlockMap::new());
            for &(vb, to) in &before {
                put_one(&mut bulk, vb, to);
                put_one(&mut one, vb, to);
            }
            let mut entries = entries;
            if sorted {
                entries.sort_by_key(|e| e.0);
            }
            bulk.put_all(entries.iter().map(|&(vb, to)| (VBlock(vb), to)));
            for &(vb, to) in &entries {
                put_one(&mut one, vb, to);
            }
            check_shape(&bulk);
            prop_assert_eq!(shape(&bulk), shape(&one));
            prop_assert_eq!(
                (bulk.data_blocks(), bulk.zero_blocks()),
                (one.data_blocks(), one.zero_blocks())
            );
            prop_assert_eq!(bulk.range(0, u64::MAX), one.range(0, u64::MAX));
        }

        /// Whatever is set, rewritten in place, split or unmapped, the map reads what a plain
        /// block-by-block model reads, its counters agree, and its shape keeps its rules.
        #[test]
        fn extent_map_matches_a_model(ops in proptest::collection::vec(op(), 1..40)) {
            let mut m = BlockMap::new();
            let mut model: BTreeMap<u64, Mapping> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Data { vb, len, p, crc } => for j in 0..len {
                        let to = Mapping::Data { pblock: PBlock(p + j), crc: crc ^ j as u32 };
                        prop_assert_eq!(m.set(VBlock(vb + j), to), model.insert(vb + j, to));
                    },
                    Op::Zero { vb, len } => for j in 0..len {
                        let to = Mapping::Zero;
                        prop_assert_eq!(m.set(VBlock(vb + j), to), model.insert(vb + j, to));
                    },
                    Op::Unmap { vb, len } => for j in 0..len {
                        prop_assert_eq!(m.remove(VBlock(vb + j)), model.remove(&(vb + j)));
                    },
                    Op::Run { vb, len, p, crc } => {
                        let crcs: Vec<u32> = (0..len).map(|j| crc ^ j as u32).collect();
                        m.set_run(VBlock(vb), PBlock(p), &crcs);
                        for (j, &crc) in (0..).zip(&crcs) {
                            model.insert(vb + j, Mapping::Data { pblock: PBlock(p + j), crc });
                        }
                    }
                }
                check_shape(&m);
            }
            for vb in 0..4 * CHUNK_LEN {
                prop_assert_eq!(m.get(VBlock(vb)), model.get(&vb).copied());
            }
            let want: Vec<(VBlock, Mapping)> = model.iter().map(|(&v, &x)| (VBlock(v), x)).collect();
            prop_assert_eq!(m.range(0, u64::MAX), want.clone());
            let mut all: Vec<_> = m.iter().collect();
            all.sort_by_key(|e| e.0);
            prop_assert_eq!(all, want);
            let data = model.values().filter(|x| matches!(x, Mapping::Data { .. })).count() as u64;
            prop_assert_eq!((m.data_blocks(), m.zero_blocks()), (data, model.len() as u64 - data));
        }
    }
}
