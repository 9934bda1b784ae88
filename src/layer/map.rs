//! A layer's sparse block map: virtual block → pool block (with the data's crc) or zero.
//!
//! Memory is the constraint, so the map is a hash of 1024-block chunks, each a sorted vector of
//! 12-byte **extents**: one block with its crc inline, or a run of blocks contiguous both in the
//! virtual space and in the pool (or a run of whiteouts). A run's crcs are either resident, in
//! the chunk's crc vector (4 bytes each: runs made since the last checkpoint), or **paged**:
//! the run names where its crcs sit in the checkpoint's checksum stream (FORMAT.md §5.6) and
//! a lookup yields that position (`CrcRef::Paged`), which the reader resolves through the
//! pool's bounded cache of checksum pages (`pool::sums`). A chunk's paged runs are laid out
//! together in the stream (the checkpoint writes a chunk's blocks in order), so the chunk keeps
//! one base position (`paged`) and each run a 16-bit offset from it: an imported image costs
//! ~0.1 byte per block. Scattered blocks are single extents with their crc inline, 12 bytes;
//! a chunk only starts a crc vector (~60 bytes of table entry and allocation) once a run of
//! `FIRST_RUN` blocks pays for it. Unmapped blocks cost nothing; a chunk costs one hash entry
//! (~40 bytes). The representation is not canonical (two adjacent extents may be contiguous);
//! lookups do not care. Nothing here is on disk: the records (map entries and map runs,
//! FORMAT.md §6.3) are replayed into it at open, so this is free to change.

use crate::format::record::MapTarget;
use crate::format::{PBlock, VBlock};
use crate::layer::singles::Singles;
pub use crate::pool::sums::PagedRun;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

pub const CHUNK_BITS: u32 = 10;
pub const CHUNK_LEN: u64 = 1 << CHUNK_BITS;
// A chunk lies within one group of the checkpoint writer's singles, so its singles' crcs are
// at consecutive positions and page as one array (`set_singles_paged`).
const _: () = assert!(CHUNK_BITS <= crate::format::record::SINGLES_GROUP_BITS);
/// Pool block numbers are stored in 48 bits; this value marks a zero (whiteout) entry.
const ZERO_MARK: u64 = (1 << 48) - 1;
pub const MAX_PBLOCK: u64 = ZERO_MARK - 1;

/// The crc of a mapped block: known, or the position of it in the current checkpoint's
/// checksum stream, which only the pool's checksum page cache can turn into the crc (and which
/// can fail: a damaged page). Two refs name the same crc only if they are equal *and* resolved
/// against the same checkpoint; compare resolved values when it matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrcRef {
    Known(u32),
    Paged(u64),
}

impl From<u32> for CrcRef {
    fn from(crc: u32) -> CrcRef {
        CrcRef::Known(crc)
    }
}

impl CrcRef {
    /// The crc, if it needs no page read.
    pub fn known(self) -> Option<u32> {
        match self {
            CrcRef::Known(c) => Some(c),
            CrcRef::Paged(_) => None,
        }
    }
}

/// What a layer's own map holds for a block it maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    Data { pblock: PBlock, crc: CrcRef },
    Zero,
}

impl Mapping {
    /// A data mapping whose crc is known.
    pub fn data(pblock: PBlock, crc: u32) -> Mapping {
        Mapping::Data {
            pblock,
            crc: CrcRef::Known(crc),
        }
    }
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

impl Mapping {
    /// The record target for it, given the crc `m`'s ref resolves to (`crc`).
    pub fn target(m: Option<Mapping>, crc: impl FnOnce(CrcRef) -> u32) -> MapTarget {
        match m {
            None => MapTarget::Unmapped,
            Some(Mapping::Zero) => MapTarget::Zero,
            Some(Mapping::Data { pblock, crc: r }) => MapTarget::Data {
                pblock,
                crc: crc(r),
            },
        }
    }
}

/// Marks a slot whose `crc` word is a paged crc's position (below 2^32) in `Slot::key`.
const SLOT_PAGED: u16 = 1 << 15;

/// One mapped block in 12 bytes: its key within the chunk and a 48-bit pool block (or the zero
/// mark) with the data's crc, or the position of its crc in the checksum stream (key bit 15).
/// The body of the merged-chunk cache's entries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    key: u16,
    hi: u16,
    lo: u32,
    crc: u32,
}

impl Slot {
    /// None: a paged crc whose position does not fit 32 bits (a checkpoint of more than 2^32
    /// blocks); the caller does without the slot.
    pub(crate) fn new(key: u16, m: Mapping) -> Option<Slot> {
        let (p, crc, flag) = match m {
            Mapping::Data {
                pblock,
                crc: CrcRef::Known(crc),
            } => (pblock.0, crc, 0),
            Mapping::Data {
                pblock,
                crc: CrcRef::Paged(at),
            } => (pblock.0, u32::try_from(at).ok()?, SLOT_PAGED),
            Mapping::Zero => (ZERO_MARK, 0, 0),
        };
        debug_assert!(p <= ZERO_MARK && key < SLOT_PAGED);
        Some(Slot {
            key: key | flag,
            hi: (p >> 32) as u16,
            lo: p as u32,
            crc,
        })
    }
    pub(crate) fn key(&self) -> u16 {
        self.key & !SLOT_PAGED
    }
    pub(crate) fn mapping(&self) -> Mapping {
        let p = ((self.hi as u64) << 32) | self.lo as u64;
        if p == ZERO_MARK {
            Mapping::Zero
        } else {
            let crc = if self.key & SLOT_PAGED != 0 {
                CrcRef::Paged(self.crc as u64)
            } else {
                CrcRef::Known(self.crc)
            };
            Mapping::Data {
                pblock: PBlock(p),
                crc,
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
/// With `RUN`: a run whose crcs are paged, `word`'s low half its offset from the chunk's base
/// position in the checksum stream.
const PAGED: u16 = 1 << 14;
/// A chunk with no crc vector yet starts one for a run of at least this many data blocks; once
/// it has one, two contiguous blocks make a run (8 bytes of crcs instead of 12 of extent).
const FIRST_RUN: usize = 16;

/// One extent of a chunk in 12 bytes. `key` is the first block's key within the chunk (bit 15:
/// a run, bit 14: a paged run); `hi:lo` the first pool block or the zero mark; `word` a single
/// block's crc, or for a run its length (high half) and where its crcs start (low half): in the
/// chunk's crc vector, or for a paged run as an offset from the chunk's base position in the
/// checksum stream; unused for a run of whiteouts.
#[derive(Clone, Copy, Debug)]
struct Ext {
    key: u16,
    hi: u16,
    lo: u32,
    word: u32,
}

impl Ext {
    /// `m`'s crc must be known: a paged crc lives in paged runs only.
    fn single(key: u16, m: Mapping) -> Ext {
        let (p, crc) = match m {
            Mapping::Data { pblock, crc } => (
                pblock.0,
                crc.known().expect("a single block's crc is known"),
            ),
            Mapping::Zero => (ZERO_MARK, 0),
        };
        debug_assert!(p <= ZERO_MARK);
        Ext {
            key,
            hi: (p >> 32) as u16,
            lo: p as u32,
            word: crc,
        }
    }
    /// A run of `len` data blocks from `base` whose crcs are paged, at offset `off` from the
    /// chunk's base position.
    fn paged(key: u16, base: u64, len: u16, off: usize) -> Ext {
        let mut e = Ext::run(key, base, len, off);
        e.key |= PAGED;
        e
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
        self.key & !(RUN | PAGED)
    }
    fn is_paged(&self) -> bool {
        self.key & PAGED != 0
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
    /// block, whiteouts or a paged run).
    fn has_crcs(&self) -> bool {
        self.is_run() && !self.is_zero() && !self.is_paged()
    }
    /// The mapping of the block `off` blocks into the extent; `crcs` is the chunk's crc vector,
    /// `base` its base position in the checksum stream.
    fn at(&self, off: u16, crcs: &[u32], base: u64) -> Mapping {
        debug_assert!(off < self.len());
        if self.is_zero() {
            Mapping::Zero
        } else if self.is_paged() {
            Mapping::Data {
                pblock: PBlock(self.base() + off as u64),
                crc: CrcRef::Paged(base + (self.crc_at() + off as usize) as u64),
            }
        } else if self.is_run() {
            Mapping::data(
                PBlock(self.base() + off as u64),
                crcs[self.crc_at() + off as usize],
            )
        } else {
            Mapping::data(PBlock(self.base()), self.word)
        }
    }
    /// Whether `m` at the block just past the extent continues it (a paged run is never
    /// continued: the block after it has no place in the checksum stream).
    fn continued_by(&self, m: Mapping) -> bool {
        match m {
            Mapping::Zero => self.is_zero(),
            Mapping::Data { pblock, .. } => {
                !self.is_zero() && !self.is_paged() && pblock.0 == self.base() + self.len() as u64
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
    /// Base position in the checksum stream of the chunks with paged runs.
    paged: ChunkTable<u64>,
    /// The chunks' paged singles (`layer::singles`), each with at least one live (an array
    /// whose last live single goes is dropped). A chunk of singles only is not in `chunks`
    /// (at 1 block in 16, its slot there would cost ~0.9 B a block); no block is live both
    /// there and in the extents.
    singles: ChunkTable<Singles>,
    data_blocks: u64,
    zero_blocks: u64,
}

/// Where a paged run's offset from its chunk's base must stay below (16 bits of `Ext::word`).
const PAGED_SPAN: u64 = 1 << 16;

/// Split a virtual block number into (chunk, key within the chunk).
pub fn split(vb: VBlock) -> (u64, u16) {
    (vb.0 >> CHUNK_BITS, (vb.0 & (CHUNK_LEN - 1)) as u16)
}

/// A single data block of the checkpoint just written whose crc sits at `sums_at` of its
/// checksum stream: what `BlockMap::rebase` pages singles by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PagedSingle {
    pub vblock: u64,
    pub pblock: u64,
    pub sums_at: u64,
}

/// A paged single's mapping.
fn single((p, at): (u64, u64)) -> Mapping {
    Mapping::Data {
        pblock: PBlock(p),
        crc: CrcRef::Paged(at),
    }
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
        self.chunks.is_empty() && self.singles.is_empty()
    }

    fn crcs_of(&self, c: u64) -> &[u32] {
        self.crcs.get(&c).map_or(&[], |x| &x.v)
    }

    fn base_of(&self, c: u64) -> u64 {
        self.paged.get(&c).copied().unwrap_or(0)
    }

    pub fn get(&self, vb: VBlock) -> Option<Mapping> {
        let (c, k) = split(vb);
        let found = self
            .chunks
            .get(&c)
            .and_then(|exts| find(exts, k).map(|i| exts[i]))
            .filter(|e| k < e.end());
        let Some(e) = found else {
            return self.singles.get(&c)?.get(k).map(single);
        };
        // Only the tables the extent needs are looked in.
        let crcs = if e.has_crcs() { self.crcs_of(c) } else { &[] };
        let base = if e.is_paged() { self.base_of(c) } else { 0 };
        Some(e.at(k - e.start(), crcs, base))
    }

    /// Mark the paged single at key `k` of chunk `c` dead; what it mapped to, if live. The
    /// array stays (its positions must not shift) until none of it is live.
    fn kill_single(&mut self, c: u64, k: u16) -> Option<Mapping> {
        let s = self.singles.get_mut(&c)?;
        let old = s.kill(k).map(single);
        if old.is_some() && s.is_dead() {
            self.singles.remove(&c);
        }
        old
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

    /// Map `vb`; returns what it was mapped to before. `m`'s crc must be known (a paged crc
    /// only comes from the checkpoint, through `set_run_paged` and `rebase`).
    pub fn set(&mut self, vb: VBlock, m: Mapping) -> Option<Mapping> {
        let (c, k) = split(vb);
        let base = self.base_of(c);
        let killed = self.kill_single(c, k);
        let exts = self.chunks.entry(c).or_default();
        let old = Chunk {
            c,
            exts,
            crcs: &mut self.crcs,
            base,
        }
        .put(k, Some(m))
        .or(killed);
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
            if len >= FIRST_RUN && !self.has_chunk(c) {
                self.chunks.insert(c, vec![Ext::run(k, p, len as u16, 0)]);
                let v = piece.to_vec();
                self.crcs.insert(c, Crcs { v, dead: 0 });
                self.data_blocks += len as u64;
            } else {
                for (i, &crc) in (0u64..).zip(piece) {
                    self.set(VBlock(v + i), Mapping::data(PBlock(p + i), crc));
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
            let base = self.base_of(c);
            let mut singles = self.singles.get_mut(&c);
            let mut chunk = Chunk {
                c,
                exts: self.chunks.entry(c).or_default(),
                crcs: &mut self.crcs,
                base,
            };
            let (mut data, mut zero) = (0i64, 0i64);
            let mut tally = |m: Option<Mapping>, d: i64| match m {
                Some(Mapping::Data { .. }) => data += d,
                Some(Mapping::Zero) => zero += d,
                None => {}
            };
            let mut next = Some((k, m));
            while let Some((k, m)) = next {
                let killed = singles.as_mut().and_then(|s| s.kill(k)).map(single);
                tally(chunk.put_last(k, m).or(killed), -1);
                tally(Some(m), 1);
                next = match it.peek() {
                    Some(&(v, Some(m))) if split(v).0 == c => {
                        it.next();
                        Some((split(v).1, m))
                    }
                    _ => None,
                };
            }
            if singles.is_some_and(|s| s.is_dead()) {
                self.singles.remove(&c);
            }
            self.data_blocks = self.data_blocks.wrapping_add_signed(data);
            self.zero_blocks = self.zero_blocks.wrapping_add_signed(zero);
        }
    }

    /// Map `count` blocks from `vb` to the pool blocks from `pblock`, block `i`'s crc being at
    /// position `sums_at + i` of the checkpoint's checksum stream (a checkpoint's map run,
    /// replayed at open): each chunk's piece becomes one paged extent when its blocks are
    /// unmapped and its position lies within the chunk's span of the stream. Any other piece
    /// (a checkpoint not laid out chunk by chunk, which this writer never makes) takes its crcs
    /// from `resolve(position, n)` and goes in resident.
    pub fn set_run_paged<E>(
        &mut self,
        vb: VBlock,
        pblock: PBlock,
        count: u64,
        sums_at: u64,
        resolve: &mut dyn FnMut(u64, usize) -> Result<Vec<u32>, E>,
    ) -> Result<(), E> {
        let mut done = 0;
        while done < count {
            let (v, p, at) = (vb.0 + done, pblock.0 + done, sums_at + done);
            let (c, k) = split(VBlock(v));
            let len = (CHUNK_LEN - k as u64).min(count - done);
            let base = self.paged.get(&c).copied().unwrap_or(at);
            let exts = self.chunks.entry(c).or_default();
            let i = find(exts, k);
            let free = i.is_none_or(|i| exts[i].end() <= k)
                && exts
                    .get(i.map_or(0, |i| i + 1))
                    .is_none_or(|e| e.start() as u64 >= k as u64 + len)
                && self
                    .singles
                    .get(&c)
                    .is_none_or(|s| s.range(k, (k as u64 + len) as u16).next().is_none());
            if free && at >= base && at - base + len < PAGED_SPAN {
                let e = Ext::paged(k, p, len as u16, (at - base) as usize);
                exts.insert(i.map_or(0, |i| i + 1), e);
                self.paged.insert(c, base);
                self.data_blocks += len;
            } else {
                if exts.is_empty() {
                    self.chunks.remove(&c);
                }
                let crcs = resolve(at, len as usize)?;
                self.set_run(VBlock(v), PBlock(p), &crcs);
            }
            done += len;
        }
        Ok(())
    }

    /// Map the single data blocks `entries` (sorted by block) whose crcs are at positions
    /// `sums_at ..` of the checkpoint's checksum stream in that order (a checkpoint's map
    /// singles, replayed at open). A chunk's share becomes its paged singles when the chunk has
    /// none yet and none of those blocks is mapped; any other share (which the checkpoint
    /// writer never makes) takes its crcs from `resolve(position, n)` and goes in resident.
    pub fn set_singles_paged<E>(
        &mut self,
        entries: &[(VBlock, PBlock)],
        sums_at: u64,
        resolve: &mut dyn FnMut(u64, usize) -> Result<Vec<u32>, E>,
    ) -> Result<(), E> {
        let mut i = 0;
        // One buffer for every chunk's keys, and the chunk looked up once, not per block: at
        // open this runs for every scattered block of the checkpoint.
        let mut keys: Vec<(u16, u64)> = Vec::new();
        while i < entries.len() {
            let c = split(entries[i].0).0;
            let n = entries[i..]
                .iter()
                .take_while(|e| split(e.0).0 == c)
                .count();
            let piece = &entries[i..i + n];
            let at = sums_at + i as u64;
            keys.clear();
            keys.extend(piece.iter().map(|e| (split(e.0).1, e.1 .0)));
            let unmapped = |k: u16, exts: &[Ext]| find(exts, k).is_none_or(|i| exts[i].end() <= k);
            let fits = keys.windows(2).all(|w| w[0].0 < w[1].0)
                && !self.singles.contains_key(&c)
                && self
                    .chunks
                    .get(&c)
                    .is_none_or(|exts| keys.iter().all(|&(k, _)| unmapped(k, exts)));
            match fits.then(|| Singles::build(&keys, at)).flatten() {
                Some(s) => {
                    self.singles.insert(c, s);
                    self.data_blocks += n as u64;
                }
                None => {
                    let crcs = resolve(at, n)?;
                    for (e, crc) in piece.iter().zip(crcs) {
                        self.set(e.0, Mapping::data(e.1, crc));
                    }
                }
            }
            i += n;
        }
        Ok(())
    }

    /// Re-page the singles after a checkpoint whose single data blocks are `singles` (sorted
    /// by block): per chunk, the checkpoint's singles (when their positions follow each other
    /// and `Singles::build` can hold them) become the chunk's new array, live where the map
    /// still maps the block to that pool block, dead elsewhere, and leave the extents; an old
    /// paged single the new array does not hold live goes resident, its crc from `resolve`
    /// (the old checksum stream). Counters do not change: no mapping does.
    fn repage_singles<E>(
        &mut self,
        singles: &[PagedSingle],
        resolve: &mut dyn FnMut(u64, usize) -> Result<Vec<u32>, E>,
    ) -> Result<(), E> {
        let mut groups: HashMap<u64, &[PagedSingle]> = HashMap::new();
        let mut i = 0;
        while i < singles.len() {
            let c = singles[i].vblock >> CHUNK_BITS;
            let n = singles[i..]
                .iter()
                .take_while(|s| s.vblock >> CHUNK_BITS == c)
                .count();
            groups.insert(c, &singles[i..i + n]);
            i += n;
        }
        let mut cs: Vec<u64> = self.singles.keys().copied().collect();
        cs.extend(
            groups
                .keys()
                .copied()
                .filter(|c| !self.singles.contains_key(c)),
        );
        for c in cs {
            let g = groups.get(&c).copied().unwrap_or(&[]);
            let consecutive = g
                .iter()
                .enumerate()
                .all(|(i, s)| s.sums_at == g[0].sums_at + i as u64);
            let keys: Vec<(u16, u64)> = g
                .iter()
                .map(|s| (split(VBlock(s.vblock)).1, s.pblock))
                .collect();
            let mut new = (consecutive && !g.is_empty())
                .then(|| Singles::build(&keys, g[0].sums_at))
                .flatten();
            // What stays live: the map still maps the block to that pool block.
            let keep: Vec<bool> = g
                .iter()
                .map(|s| matches!(self.get(VBlock(s.vblock)), Some(Mapping::Data { pblock, .. }) if pblock.0 == s.pblock))
                .collect();
            let held = |k: u16| {
                new.is_some()
                    && keys
                        .binary_search_by_key(&k, |x| x.0)
                        .is_ok_and(|i| keep[i])
            };
            let old: Vec<(u16, u64, u64)> = self
                .singles
                .get(&c)
                .map_or(Vec::new(), |s| s.iter().filter(|x| !held(x.0)).collect());
            let mut crcs = Vec::with_capacity(old.len());
            for &(_, _, at) in &old {
                crcs.push(resolve(at, 1)?[0]);
            }
            // Only now that every crc is read: a failure leaves the map as it was.
            self.singles.remove(&c);
            let base = self.base_of(c);
            let mut chunk = Chunk {
                c,
                exts: self.chunks.entry(c).or_default(),
                crcs: &mut self.crcs,
                base,
            };
            for (&(k, p, _), crc) in old.iter().zip(crcs) {
                chunk.put(k, Some(Mapping::data(PBlock(p), crc)));
            }
            if let Some(s) = &mut new {
                // The live ones leave the extents: single extents in one pass (removing them
                // one by one would be quadratic in a chunk's extents, under the write lock),
                // the rare one inside a run (extended after the encode) through `put`.
                let mut moved = [0u64; (CHUNK_LEN / 64) as usize];
                for (&(k, _), &live) in keys.iter().zip(&keep) {
                    if live {
                        moved[k as usize / 64] |= 1 << (k % 64);
                    } else {
                        s.kill(k);
                    }
                }
                let gone = |k: u16| moved[k as usize / 64] & 1 << (k % 64) != 0;
                chunk.exts.retain(|e| e.is_run() || !gone(e.start()));
                for (&(k, _), &live) in keys.iter().zip(&keep) {
                    if live && find(chunk.exts, k).is_some_and(|i| k < chunk.exts[i].end()) {
                        chunk.put(k, None);
                    }
                }
            }
            chunk.exts.shrink_to_fit();
            if chunk.exts.is_empty() {
                self.chunks.remove(&c);
                self.crcs.remove(&c);
                self.paged.remove(&c);
            }
            if let Some(s) = new.filter(|s| !s.is_dead()) {
                self.singles.insert(c, s);
            }
        }
        Ok(())
    }

    /// A checkpoint whose map runs are `runs` (sorted by block) is now the pool's: every run
    /// extent it holds whole (same blocks, same pool blocks) is paged at its new position,
    /// dropping resident crcs; a paged extent it does not hold (the checkpoint wrote it as
    /// single entries) takes its crcs from `resolve` (the old checksum stream, not freed yet)
    /// and goes resident. Extents changed since the checkpoint was encoded are still paged
    /// right: the commit sealed the transaction, so no block the checkpoint names is rewritten
    /// in place since (a change splits the run; its pieces keep their blocks and crcs), and no
    /// block it frees is reused before the checkpoint is installed.
    pub fn rebase<E>(
        &mut self,
        runs: &[PagedRun],
        singles: &[PagedSingle],
        resolve: &mut dyn FnMut(u64, usize) -> Result<Vec<u32>, E>,
    ) -> Result<(), E> {
        self.repage_singles(singles, resolve)?;
        let planned = |v: u64, p: u64, len: u64| -> Option<u64> {
            let i = runs.partition_point(|r| r.vblock <= v).checked_sub(1)?;
            let r = runs[i];
            let off = v - r.vblock;
            (off + len <= r.count as u64 && r.pblock + off == p).then_some(r.sums_at + off)
        };
        let cs: Vec<u64> = self.chunks.keys().copied().collect();
        for c in cs {
            let exts = &self.chunks[&c];
            if !exts.iter().any(|e| e.is_run() && !e.is_zero()) {
                continue;
            }
            let old_base = self.base_of(c);
            let old = self.crcs_of(c);
            let mut out = Vec::with_capacity(exts.len());
            let mut v: Vec<u32> = Vec::new();
            let mut base: Option<u64> = None;
            for &e in exts {
                if !e.is_run() || e.is_zero() {
                    out.push(e);
                    continue;
                }
                let len = e.len() as u64;
                let at = planned((c << CHUNK_BITS) | e.start() as u64, e.base(), len);
                if let Some(at) = at {
                    let b = *base.get_or_insert(at);
                    if at >= b && at - b + len < PAGED_SPAN {
                        out.push(Ext::paged(e.start(), e.base(), e.len(), (at - b) as usize));
                        continue;
                    }
                }
                let crcs = if e.is_paged() {
                    resolve(old_base + e.crc_at() as u64, len as usize)?
                } else {
                    old[e.crc_at()..e.crc_at() + len as usize].to_vec()
                };
                out.push(Ext::run(e.start(), e.base(), e.len(), v.len()));
                v.extend(crcs);
            }
            self.chunks.insert(c, out);
            match base {
                Some(b) => self.paged.insert(c, b),
                None => self.paged.remove(&c),
            };
            if v.is_empty() {
                self.crcs.remove(&c);
            } else {
                v.shrink_to_fit();
                self.crcs.insert(c, Crcs { v, dead: 0 });
            }
        }
        Ok(())
    }

    /// Unmap `vb`; returns what it was mapped to.
    pub fn remove(&mut self, vb: VBlock) -> Option<Mapping> {
        let (c, k) = split(vb);
        let base = self.base_of(c);
        // A block is live in the singles or in the extents, never both.
        let old = match self.kill_single(c, k) {
            Some(m) => Some(m),
            None => {
                let exts = self.chunks.get_mut(&c)?;
                let old = Chunk {
                    c,
                    exts,
                    crcs: &mut self.crcs,
                    base,
                }
                .put(k, None);
                if self.chunks[&c].is_empty() {
                    self.chunks.remove(&c);
                    self.crcs.remove(&c);
                    self.paged.remove(&c);
                }
                old
            }
        };
        self.count(old, -1);
        old
    }
}

/// One chunk being changed: its extents, the table of crc vectors (found once per change) and
/// its paged runs' base position.
struct Chunk<'a> {
    c: u64,
    exts: &'a mut Vec<Ext>,
    crcs: &'a mut ChunkTable<Crcs>,
    base: u64,
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
                let old = e.at(off, crcs.as_ref().map_or(&[], |x| &x.v), self.base);
                match to {
                    // The same place (a fresh block rewritten in place): only the crc changes.
                    // (A paged run is a checkpoint's, never fresh; it would split below.)
                    Some(Mapping::Data { pblock, crc })
                        if !e.is_zero() && !e.is_paged() && pblock.0 == e.base() + off as u64 =>
                    {
                        let crc = crc.known().expect("a block written has a known crc");
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
    /// on either side (a piece of one block becomes a single extent, but a paged run's pieces
    /// stay paged runs). Its crcs stay where they are; the replaced block's becomes dead.
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
            if e.is_paged() {
                let at = e.crc_at() + from as usize;
                Ext::paged(e.start() + from, e.base() + from as u64, len, at)
            } else if len == 1 {
                Ext::single(e.start() + from, e.at(from, &crcs.v, 0))
            } else {
                let at = if data { e.crc_at() + from as usize } else { 0 };
                Ext::run(e.start() + from, base, len, at)
            }
        };
        let mut pieces = Vec::with_capacity(3);
        let mut dead = 1;
        if off > 0 {
            pieces.push(piece(0, off));
            dead += (off == 1 && !pieces[0].is_run()) as usize;
        }
        if let Some(m) = to {
            pieces.push(Ext::single(e.start() + off, m));
        }
        if off + 1 < e.len() {
            let p = piece(off + 1, e.len() - off - 1);
            dead += (e.len() - off - 1 == 1 && !p.is_run()) as usize;
            pieces.push(p);
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
        let crc = crc.known().expect("a block written has a known crc");
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
                && exts[j - 1].continued_by(exts[j].at(0, &[], 0))
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
        self.chunks.contains_key(&c) || self.singles.contains_key(&c)
    }

    /// The chunks with a mapped block among `c0..=c1`, ascending. Walks the table when it is
    /// smaller than the range, so a few chunks of a petabyte layer cost what they hold.
    pub fn chunks_in(&self, c0: u64, c1: u64) -> Vec<u64> {
        if c0 > c1 {
            return Vec::new();
        }
        if c1 - c0 < (self.chunks.len() + self.singles.len()) as u64 * 2 {
            (c0..=c1).filter(|&c| self.has_chunk(c)).collect()
        } else {
            let mut cs: Vec<u64> = self
                .chunks
                .keys()
                .chain(self.singles.keys())
                .copied()
                .filter(|c| (c0..=c1).contains(c))
                .collect();
            cs.sort_unstable();
            cs.dedup();
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
        let base = self.base_of(c);
        let mut ext = exts
            .iter()
            .flat_map(move |e| {
                (0..e.len()).map(move |off| (e.start() + off, e.at(off, crcs, base)))
            })
            .peekable();
        let mut singles = self
            .singles
            .get(&c)
            .into_iter()
            .flat_map(|s| s.iter())
            .map(|(k, p, at)| (k, single((p, at))))
            .peekable();
        // Two sorted lists with no key in both: merge them.
        std::iter::from_fn(move || {
            let next = match (ext.peek(), singles.peek()) {
                (Some(a), Some(b)) if b.0 < a.0 => singles.next(),
                (Some(_), _) => ext.next(),
                (None, _) => singles.next(),
            }?;
            Some((VBlock((c << CHUNK_BITS) | next.0 as u64), next.1))
        })
    }

    /// Entries of chunk `c` in block order.
    pub fn chunk_entries(&self, c: u64) -> impl Iterator<Item = (VBlock, Mapping)> + '_ {
        self.blocks(c, self.chunks.get(&c).map_or(&[], |v| v))
    }

    /// Every entry, chunk by chunk in no particular chunk order, blocks in order within a chunk.
    pub fn iter(&self) -> impl Iterator<Item = (VBlock, Mapping)> + '_ {
        let only_singles = self
            .singles
            .keys()
            .filter(|c| !self.chunks.contains_key(c))
            .map(|&c| (c, &[][..]));
        self.chunks
            .iter()
            .map(|(&c, exts)| (c, &exts[..]))
            .chain(only_singles)
            .flat_map(|(c, exts)| self.blocks(c, exts))
    }

    /// Chunk `c`'s entries as runs, in no particular order: (first block, length, first pool
    /// block, or None for whiteouts); a data run's blocks are consecutive in the pool. What an
    /// audit claims, without making a mapping per block (an imported image is a few runs a
    /// chunk).
    pub fn chunk_runs(&self, c: u64) -> impl Iterator<Item = (VBlock, u64, Option<PBlock>)> + '_ {
        let exts = self.chunks.get(&c).map_or(&[][..], |v| &v[..]);
        let exts = exts.iter().map(|e| {
            let p = (!e.is_zero()).then(|| PBlock(e.base()));
            (e.start(), e.len() as u64, p)
        });
        let singles = self.singles.get(&c).into_iter().flat_map(|s| s.iter());
        let singles = singles.map(|(k, p, _)| (k, 1, Some(PBlock(p))));
        exts.chain(singles)
            .map(move |(k, n, p)| (VBlock((c << CHUNK_BITS) | k as u64), n, p))
    }

    /// Every entry as runs (`chunk_runs`), chunk by chunk in no particular order.
    pub fn runs(&self) -> impl Iterator<Item = (VBlock, u64, Option<PBlock>)> + '_ {
        let only_singles = self.singles.keys().filter(|c| !self.chunks.contains_key(c));
        self.chunks
            .keys()
            .chain(only_singles)
            .flat_map(|&c| self.chunk_runs(c))
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
            + self.paged.capacity() * (std::mem::size_of::<(u64, u64)>() + 1)
            + self
                .singles
                .values()
                .map(Singles::heap_bytes)
                .sum::<usize>()
            + self.singles.capacity() * (std::mem::size_of::<(u64, Singles)>() + 1)
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
        let d = |p| Mapping::data(PBlock(p), (p as u32).wrapping_mul(3));
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
        Mapping::data(PBlock(p), (p as u32).wrapping_mul(0x9E37_79B9))
    }

    /// The rules of the representation: extents sorted and apart, inside the chunk, each run's
    /// crcs inside the vector, `dead` exactly the unnamed crcs, no empty chunk, no singles
    /// array without a live single.
    fn check_shape(m: &BlockMap) {
        for (c, s) in &m.singles {
            assert!(!s.is_dead(), "chunk {c}: singles all dead");
        }
        for (c, exts) in &m.chunks {
            assert!(!exts.is_empty(), "chunk {c} empty");
            if let Some(s) = m.singles.get(c) {
                for (k, _, _) in s.iter() {
                    let i = find(exts, k);
                    assert!(i.is_none_or(|i| exts[i].end() <= k), "chunk {c}: {k} twice");
                }
            }
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
            if exts.iter().any(|e| e.is_paged()) {
                assert!(m.paged.contains_key(c), "chunk {c}: paged runs, no base");
            }
        }
        assert!(m.crcs.keys().all(|c| m.chunks.contains_key(c)));
        assert!(m.paged.keys().all(|c| m.chunks.contains_key(c)));
    }

    #[test]
    fn a_paged_image_costs_a_fraction_of_a_byte_per_block() {
        let mut m = BlockMap::new();
        let n = 1u64 << 20;
        let mut never = |_: u64, _: usize| -> Result<Vec<u32>, ()> { panic!("resolved") };
        m.set_run_paged(VBlock(0), PBlock(1000), n, 0, &mut never)
            .unwrap();
        let per_block = m.heap_bytes() as f64 / n as f64;
        assert!(per_block < 0.2, "{per_block} bytes per block");
        assert_eq!(
            m.get(VBlock(5000)),
            Some(Mapping::Data {
                pblock: PBlock(6000),
                crc: CrcRef::Paged(5000),
            })
        );
        check_shape(&m);
    }

    /// Scattered blocks (1 in 16, as tools/bench-scale writes them) as a checkpoint's paged
    /// singles against the same blocks as single extents with their crcs.
    #[test]
    fn paged_singles_cost_under_eight_bytes_per_block() {
        let n = 1u64 << 18;
        // A fixed permutation of pool blocks, so a chunk's pool blocks are far apart.
        let entries: Vec<(VBlock, PBlock)> = (0..n)
            .map(|i| (VBlock(i * 16), PBlock(1000 + (i * 0x9E37_79B9) % (n * 16))))
            .collect();
        let mut paged = BlockMap::new();
        let mut never = |_: u64, _: usize| -> Result<Vec<u32>, ()> { panic!("resolved") };
        paged.set_singles_paged(&entries, 0, &mut never).unwrap();
        let mut resident = BlockMap::new();
        resident.put_all(entries.iter().map(|&(v, p)| (v, Some(Mapping::data(p, 7)))));
        let per = |m: &BlockMap| m.heap_bytes() as f64 / n as f64;
        // 6.79 while a chunk of singles only also held a slot of `chunks`.
        assert!(per(&paged) < 6.5, "paged {} bytes per block", per(&paged));
        assert!(
            per(&resident) > 11.0,
            "resident {} bytes per block",
            per(&resident)
        );
        assert_eq!(paged.data_blocks(), n);
        assert_eq!(
            paged.get(VBlock(16 * 5)),
            Some(Mapping::Data {
                pblock: entries[5].1,
                crc: CrcRef::Paged(5),
            })
        );
        check_shape(&paged);
        eprintln!(
            "heap per block: paged singles {:.2}, resident singles {:.2}",
            per(&paged),
            per(&resident)
        );
    }

    /// A checkpoint re-pages resident scattered blocks as paged singles, and a block changed
    /// since it was encoded stays as changed.
    #[test]
    fn a_checkpoint_pages_resident_singles() {
        let n = 1u64 << 14;
        let mut m = BlockMap::new();
        for i in 0..n {
            m.set(
                VBlock(i * 16),
                Mapping::data(PBlock(1000 + (i * 7919) % n), i as u32),
            );
        }
        let before = m.heap_bytes() as f64 / n as f64;
        let (runs, singles, sums) = write_checkpoint(&m, &[]);
        assert!(runs.is_empty());
        assert_eq!(singles.len() as u64, n);
        m.set(VBlock(16 * 3), Mapping::data(PBlock(99), 5));
        m.remove(VBlock(16 * 4));
        let mut never = |_: u64, _: usize| -> Result<Vec<u32>, ()> { panic!("resolved") };
        m.rebase(&runs, &singles, &mut never).unwrap();
        check_shape(&m);
        let after = m.heap_bytes() as f64 / n as f64;
        let mut fresh = BlockMap::new();
        let e: Vec<_> = singles
            .iter()
            .map(|s| (VBlock(s.vblock), PBlock(s.pblock)))
            .collect();
        fresh.set_singles_paged(&e, 0, &mut never).unwrap();
        let fresh = fresh.heap_bytes() as f64 / n as f64;
        eprintln!("{before} -> {after} bytes per block, {fresh} loaded at open; chunks {} cap {}, singles cap {}", m.chunks.len(), m.chunks.capacity(), m.singles.capacity());
        assert!(
            after < 8.0 && before > 11.0,
            "{before} -> {after} bytes per block"
        );
        assert_eq!(m.get(VBlock(16 * 3)), Some(Mapping::data(PBlock(99), 5)));
        assert_eq!(m.get(VBlock(16 * 4)), None);
        let Some(Mapping::Data {
            crc: CrcRef::Paged(at),
            ..
        }) = m.get(VBlock(16 * 5))
        else {
            panic!("not paged");
        };
        assert_eq!(sums[at as usize], 5);
        assert_eq!(m.data_blocks(), n - 1);
    }

    /// The crc a map's ref stands for, against the checksum stream `stream`.
    fn resolved(m: Option<Mapping>, stream: &[u32]) -> Option<(Option<u64>, u32)> {
        m.map(|m| match m {
            Mapping::Zero => (None, 0),
            Mapping::Data {
                pblock,
                crc: CrcRef::Known(c),
            } => (Some(pblock.0), c),
            Mapping::Data {
                pblock,
                crc: CrcRef::Paged(at),
            } => (Some(pblock.0), stream[at as usize]),
        })
    }

    /// What a checkpoint writer does with `m`: entries in `iter` order, consecutive contiguous
    /// data blocks making runs (of two or more) whose crcs go to a new stream.
    /// Single data blocks go out as paged singles, each chunk's after its runs, consecutive.
    fn write_checkpoint(
        m: &BlockMap,
        stream: &[u32],
    ) -> (Vec<PagedRun>, Vec<PagedSingle>, Vec<u32>) {
        let mut runs: Vec<PagedRun> = Vec::new();
        let mut singles: Vec<PagedSingle> = Vec::new();
        let mut sums = Vec::new();
        let mut open: Option<(u64, u64, Vec<u32>)> = None;
        let mut chunk_singles: Vec<(u64, u64, u32)> = Vec::new();
        let close = |o: Option<(u64, u64, Vec<u32>)>,
                     runs: &mut Vec<PagedRun>,
                     sums: &mut Vec<u32>,
                     one: &mut Vec<(u64, u64, u32)>| {
            match o {
                Some((v, p, crcs)) if crcs.len() >= 2 => {
                    runs.push(PagedRun {
                        vblock: v,
                        pblock: p,
                        count: crcs.len() as u32,
                        sums_at: sums.len() as u64,
                    });
                    sums.extend(crcs);
                }
                Some((v, p, crcs)) => one.push((v, p, crcs[0])),
                None => {}
            }
        };
        let flush = |one: &mut Vec<(u64, u64, u32)>,
                     singles: &mut Vec<PagedSingle>,
                     sums: &mut Vec<u32>| {
            for (v, p, crc) in one.drain(..) {
                singles.push(PagedSingle {
                    vblock: v,
                    pblock: p,
                    sums_at: sums.len() as u64,
                });
                sums.push(crc);
            }
        };
        let mut chunk = None;
        for (vb, x) in m.iter() {
            if chunk != Some(split(vb).0) {
                close(open.take(), &mut runs, &mut sums, &mut chunk_singles);
                flush(&mut chunk_singles, &mut singles, &mut sums);
                chunk = Some(split(vb).0);
            }
            let Some((Some(p), crc)) = resolved(Some(x), stream) else {
                close(open.take(), &mut runs, &mut sums, &mut chunk_singles);
                continue;
            };
            match &mut open {
                Some((v, p0, crcs))
                    if *v + crcs.len() as u64 == vb.0 && *p0 + crcs.len() as u64 == p =>
                {
                    crcs.push(crc)
                }
                _ => {
                    close(open.take(), &mut runs, &mut sums, &mut chunk_singles);
                    open = Some((vb.0, p, vec![crc]));
                }
            }
        }
        close(open.take(), &mut runs, &mut sums, &mut chunk_singles);
        flush(&mut chunk_singles, &mut singles, &mut sums);
        runs.sort();
        singles.sort();
        (runs, singles, sums)
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
        /// `len` blocks `step` apart from `vb`, pool blocks 3 apart from `p`, through
        /// `set_singles_paged`, their crcs appended to the checksum stream.
        Singles {
            vb: u64,
            len: u64,
            step: u64,
            p: u64,
            crc: u32,
        },
        /// `Data` through `set_run_paged`, its crcs appended to the checksum stream.
        Paged {
            vb: u64,
            len: u64,
            p: u64,
            crc: u32,
        },
        /// A checkpoint written, then `changes` ops, then the checkpoint adopted (`rebase`).
        Checkpoint {
            changes: Vec<Op>,
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
            2 => (vb.clone(), len.clone(), 0u64..4, any::<u32>()).prop_map(|(vb, len, p, crc)| {
                Op::Run { vb, len, p: 100 + vb + p * 10_000, crc }
            }),
            2 => (vb.clone(), len.clone(), 0u64..4, any::<u32>()).prop_map(|(vb, len, p, crc)| {
                Op::Paged { vb, len, p: 100 + vb + p * 10_000, crc }
            }),
            2 => (vb, 1u64..300, 1u64..6, 0u64..4, any::<u32>()).prop_map(|(vb, len, step, p, crc)| {
                Op::Singles { vb, len, step, p: 100 + vb + p * 10_000, crc }
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
                (vb, Some(Mapping::data(pblock, crc)))
            }
        })
    }

    fn put_one(m: &mut BlockMap, vb: u64, to: Option<Mapping>) {
        match to {
            Some(x) => m.set(VBlock(vb), x),
            None => m.remove(VBlock(vb)),
        };
    }

    /// The representation itself: every chunk's extents, crc vector, paged base and live
    /// paged singles.
    type Shape = BTreeMap<
        u64,
        (
            Vec<(u16, u16, u32, u32)>,
            Vec<u32>,
            usize,
            Option<u64>,
            Vec<(u16, u64, u64)>,
        ),
    >;
    fn shape(m: &BlockMap) -> Shape {
        m.chunks
            .iter()
            .map(|(&c, exts)| {
                let exts = exts.iter().map(|e| (e.key, e.hi, e.lo, e.word)).collect();
                let crcs = m
                    .crcs
                    .get(&c)
                    .map_or((Vec::new(), 0), |x| (x.v.clone(), x.dead));
                let singles = m.singles.get(&c).map_or(Vec::new(), |s| s.iter().collect());
                (c, (exts, crcs.0, crcs.1, m.paged.get(&c).copied(), singles))
            })
            .collect()
    }

    fn op_or_checkpoint() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => op(),
            1 => proptest::collection::vec(op(), 0..4).prop_map(|changes| Op::Checkpoint { changes }),
        ]
    }

    type Model = BTreeMap<u64, (Option<u64>, u32)>;

    /// Apply `op` to the map and the model; `stream` is the current checkpoint's checksum
    /// stream (paged ops append to it, as if the checkpoint held them).
    fn apply(
        m: &mut BlockMap,
        model: &mut Model,
        stream: &mut Vec<u32>,
        op: Op,
    ) -> Result<(), TestCaseError> {
        let as_model = |x: Mapping| match x {
            Mapping::Zero => (None, 0),
            Mapping::Data { pblock, crc } => (Some(pblock.0), crc.known().unwrap()),
        };
        match op {
            Op::Data { vb, len, p, crc } => {
                for j in 0..len {
                    let to = Mapping::data(PBlock(p + j), crc ^ j as u32);
                    let old = resolved(m.set(VBlock(vb + j), to), stream);
                    prop_assert_eq!(old, model.insert(vb + j, as_model(to)));
                }
            }
            Op::Zero { vb, len } => {
                for j in 0..len {
                    let to = Mapping::Zero;
                    let old = resolved(m.set(VBlock(vb + j), to), stream);
                    prop_assert_eq!(old, model.insert(vb + j, as_model(to)));
                }
            }
            Op::Unmap { vb, len } => {
                for j in 0..len {
                    prop_assert_eq!(
                        resolved(m.remove(VBlock(vb + j)), stream),
                        model.remove(&(vb + j))
                    );
                }
            }
            Op::Run { vb, len, p, crc } => {
                let crcs: Vec<u32> = (0..len).map(|j| crc ^ j as u32).collect();
                m.set_run(VBlock(vb), PBlock(p), &crcs);
                for (j, &crc) in (0..).zip(&crcs) {
                    model.insert(vb + j, (Some(p + j), crc));
                }
            }
            Op::Paged { vb, len, p, crc } => {
                let at = stream.len() as u64;
                stream.extend((0..len).map(|j| crc ^ j as u32 ^ 0x5a5a));
                let s = stream.clone();
                let mut resolve = |at: u64, n: usize| -> Result<Vec<u32>, ()> {
                    Ok(s[at as usize..at as usize + n].to_vec())
                };
                m.set_run_paged(VBlock(vb), PBlock(p), len, at, &mut resolve)
                    .unwrap();
                for j in 0..len {
                    model.insert(vb + j, (Some(p + j), stream[(at + j) as usize]));
                }
            }
            Op::Singles {
                vb,
                len,
                step,
                p,
                crc,
            } => {
                let at = stream.len() as u64;
                let entries: Vec<(VBlock, PBlock)> = (0..len)
                    .map(|j| (VBlock(vb + j * step), PBlock(p + 3 * j)))
                    .collect();
                stream.extend((0..len).map(|j| crc ^ j as u32 ^ 0xa5a5));
                let s = stream.clone();
                let mut resolve = |at: u64, n: usize| -> Result<Vec<u32>, ()> {
                    Ok(s[at as usize..at as usize + n].to_vec())
                };
                m.set_singles_paged(&entries, at, &mut resolve).unwrap();
                for (j, (v, p)) in (0..).zip(entries) {
                    model.insert(v.0, (Some(p.0), stream[(at + j) as usize]));
                }
            }
            Op::Checkpoint { changes } => {
                let (runs, singles, sums) = write_checkpoint(m, stream);
                // The commit sealed the transaction: what comes before the checkpoint is
                // adopted writes to new pool blocks, never in place into one it names.
                static SEALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                let fresh = SEALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * 1_000_000;
                for c in changes {
                    let c = match c {
                        Op::Data { vb, len, p, crc } => Op::Data {
                            vb,
                            len,
                            p: p + fresh,
                            crc,
                        },
                        Op::Run { vb, len, p, crc } => Op::Run {
                            vb,
                            len,
                            p: p + fresh,
                            crc,
                        },
                        Op::Paged { vb, len, p, crc } => Op::Paged {
                            vb,
                            len,
                            p: p + fresh,
                            crc,
                        },
                        Op::Singles {
                            vb,
                            len,
                            step,
                            p,
                            crc,
                        } => Op::Singles {
                            vb,
                            len,
                            step,
                            p: p + fresh,
                            crc,
                        },
                        c => c,
                    };
                    apply(m, model, stream, c)?;
                }
                let old = stream.clone();
                let mut resolve = |at: u64, n: usize| -> Result<Vec<u32>, ()> {
                    Ok(old[at as usize..at as usize + n].to_vec())
                };
                m.rebase(&runs, &singles, &mut resolve).unwrap();
                *stream = sums;
            }
        }
        check_shape(m);
        Ok(())
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
            paged in proptest::collection::btree_set(0u64..3 * CHUNK_LEN, 0..200),
        ) {
            let (mut bulk, mut one) = (BlockMap::new(), BlockMap::new());
            // A checkpoint's paged singles first, as at open.
            let paged: Vec<(VBlock, PBlock)> =
                paged.iter().map(|&v| (VBlock(v), PBlock(50_000 + 3 * v))).collect();
            let mut never = |_: u64, _: usize| -> Result<Vec<u32>, ()> { Err(()) };
            bulk.set_singles_paged(&paged, 7, &mut never).unwrap();
            one.set_singles_paged(&paged, 7, &mut never).unwrap();
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
        fn extent_map_matches_a_model(ops in proptest::collection::vec(op_or_checkpoint(), 1..40)) {
            let mut m = BlockMap::new();
            let mut model = Model::new();
            let mut stream = Vec::new();
            for op in ops {
                apply(&mut m, &mut model, &mut stream, op)?;
            }
            for vb in 0..4 * CHUNK_LEN {
                prop_assert_eq!(resolved(m.get(VBlock(vb)), &stream), model.get(&vb).copied());
            }
            let want: Vec<(VBlock, (Option<u64>, u32))> = model.iter().map(|(&v, &x)| (VBlock(v), x)).collect();
            let got: Vec<_> = m.range(0, u64::MAX).into_iter().map(|(v, x)| (v, resolved(Some(x), &stream).unwrap())).collect();
            prop_assert_eq!(got, want.clone());
            let mut all: Vec<_> = m.iter().map(|(v, x)| (v, resolved(Some(x), &stream).unwrap())).collect();
            all.sort_by_key(|e| e.0);
            prop_assert_eq!(all, want);
            let data = model.values().filter(|x| x.0.is_some()).count() as u64;
            prop_assert_eq!((m.data_blocks(), m.zero_blocks()), (data, model.len() as u64 - data));
        }
    }
}
