//! Block allocation. The map of used blocks is not stored: it is rebuilt at open from the block
//! maps and the metadata streams, so it can never disagree with them.
//!
//! The rule that makes commits crash-safe lives here: a block freed in the open transaction is
//! still referenced by the last committed metadata, so it is not handed out again until that
//! transaction commits. Blocks allocated *in* the open transaction are referenced by nothing
//! durable and may be freed, overwritten and reused at once.
//!
//! Which free block to hand out is a matter of what the next `fdatasync` costs the host
//! filesystem: a free block whose space the file still holds (freed, not punched) is
//! overwritten in place, while a hole (punched, or never written) or the file's growing end
//! needs a new extent, whose inode and extent blocks that sync writes too (DESIGN §3, "Where
//! new blocks go"). So written free blocks are handed out first.

use crate::format::PBlock;
use bitvec::prelude::*;

/// A transaction's frees, held back while its commit is being made durable.
#[derive(Debug, Default)]
pub struct Sealed {
    frees: Vec<u64>,
    punch: Vec<u64>,
}

impl Sealed {
    /// Blocks that the durable commit no longer references (old metadata streams).
    pub fn add_frees(&mut self, blocks: impl IntoIterator<Item = PBlock>) {
        self.frees.extend(blocks.into_iter().map(|p| p.0));
    }
}

#[derive(Clone)]
pub struct Allocator {
    used: BitVec<u64, Lsb0>,
    /// Free blocks whose space the file does not hold (punched, or never written as far as
    /// this process knows: every free block of a loaded pool). Never set on a used block.
    hole: BitVec<u64, Lsb0>,
    /// Free blocks below the extent that are not holes: written space to reuse first.
    written_free: u64,
    fresh: BitVec<u64, Lsb0>,
    fresh_list: Vec<u64>,
    pending_free: Vec<u64>,
    /// Freed fresh blocks whose stale content should be punched out at the next commit.
    to_punch: Vec<u64>,
    /// Free blocks held back while being punched (see `reserve_for_punch`).
    punching: Vec<u64>,
    first: u64,
    /// Allocation never reaches this block (0 = unlimited).
    limit: u64,
    cursor: u64,
    used_count: u64,
}

impl Allocator {
    /// `first`: first allocatable block; `max_blocks`: cap on the pool size in blocks (0 = none).
    pub fn new(first: u64, max_blocks: u64) -> Self {
        Allocator {
            used: BitVec::repeat(false, first as usize),
            hole: BitVec::repeat(false, first as usize),
            written_free: 0,
            fresh: BitVec::repeat(false, first as usize),
            fresh_list: Vec::new(),
            pending_free: Vec::new(),
            to_punch: Vec::new(),
            punching: Vec::new(),
            first,
            limit: max_blocks,
            cursor: first,
            used_count: 0,
        }
    }

    /// Blocks in use (data and metadata), including those freed but not yet committed.
    pub fn used_count(&self) -> u64 {
        self.used_count
    }

    /// The number of blocks the pool file spans (its high-water mark).
    pub fn extent(&self) -> u64 {
        self.used.len() as u64
    }

    /// Blocks still allocatable under the cap, or None without a cap.
    pub fn free_under_cap(&self) -> Option<u64> {
        (self.limit > 0).then(|| self.limit.saturating_sub(self.first + self.used_count))
    }

    pub fn is_used(&self, p: PBlock) -> bool {
        self.used.get(p.0 as usize).is_some_and(|b| *b)
    }

    pub fn is_fresh(&self, p: PBlock) -> bool {
        self.fresh.get(p.0 as usize).is_some_and(|b| *b)
    }

    /// Free blocks whose space the file still holds (see `hole`).
    pub fn written_free(&self) -> u64 {
        self.written_free
    }

    /// Whether a free block's space is known to be out of the file (punched or never written).
    pub fn is_hole(&self, p: PBlock) -> bool {
        self.hole.get(p.0 as usize).is_some_and(|b| *b)
    }

    /// Blocks past the extent join as holes: the file never held them as far as we know.
    fn grow_to(&mut self, len: u64) {
        if (self.used.len() as u64) < len {
            self.used.resize(len as usize, false);
            self.hole.resize(len as usize, true);
            self.fresh.resize(len as usize, false);
        }
    }

    /// Mark free block `i` used (it keeps no hole bit: a used block's space is the file's).
    fn take(&mut self, i: usize) {
        debug_assert!(!self.used[i]);
        if self.hole[i] {
            self.hole.set(i, false);
        } else {
            self.written_free -= 1;
        }
        self.used.set(i, true);
        self.used_count += 1;
    }

    /// Mark used block `i` free; `hole`: its space is no longer in the file (punched).
    fn give(&mut self, i: usize, hole: bool) {
        debug_assert!(self.used[i] && !self.hole[i]);
        self.used.set(i, false);
        self.used_count -= 1;
        if hole {
            self.hole.set(i, true);
        } else {
            self.written_free += 1;
        }
    }

    /// Mark a block used while loading a pool. Returns false when it already was (a block
    /// referenced twice: corruption that the caller reports).
    pub fn mark_loaded(&mut self, p: PBlock) -> bool {
        self.grow_to(p.0 + 1);
        if self.used[p.0 as usize] {
            return false;
        }
        self.take(p.0 as usize);
        true
    }

    /// Take a block that a replayed transaction wrote (the crash journal): used and fresh, as
    /// when it was allocated. False if it is used already and not fresh (committed data or
    /// metadata: the journal disagrees with the pool). A fresh block may be named again (an
    /// overwrite in place).
    pub fn claim_fresh(&mut self, p: PBlock) -> bool {
        if p.0 < self.first {
            return false;
        }
        self.grow_to(p.0 + 1);
        let i = p.0 as usize;
        if self.used[i] {
            return self.fresh[i];
        }
        self.take(i);
        self.fresh.set(i, true);
        self.fresh_list.push(p.0);
        true
    }

    /// Allocate up to `want` contiguous blocks (at least one), keeping `reserve` blocks of the
    /// cap back for metadata. Returns the first block and how many were given, or `None` when
    /// the pool is full (the caller says what it was doing; `full_message` says how full).
    pub fn alloc_run(&mut self, want: u64, reserve: u64) -> Option<(PBlock, u64)> {
        debug_assert!(want > 0);
        if self.limit > 0 && self.first + self.used_count + reserve >= self.limit {
            return None;
        }
        let start = self.find_free();
        let mut n = 1;
        while n < want {
            let i = start + n;
            if (i as usize) < self.used.len() && self.used[i as usize] {
                break;
            }
            if self.limit > 0
                && (i >= self.limit || self.first + self.used_count + n + reserve >= self.limit)
            {
                break;
            }
            n += 1;
        }
        self.grow_to(start + n);
        for i in start..start + n {
            self.take(i as usize);
            self.fresh.set(i as usize, true);
            self.fresh_list.push(i);
        }
        self.cursor = start + n;
        Some((PBlock(start), n))
    }

    /// Why `alloc_run` found no room, for the caller's error.
    pub fn full_message(&self) -> String {
        format!(
            "pool full: {} of {} blocks in use",
            self.first + self.used_count,
            self.limit
        )
    }

    /// Next-fit over the written free blocks first (from the cursor to the end, then from the
    /// start), then the same over every free block (holes), else past the end.
    fn find_free(&self) -> u64 {
        let len = self.used.len() as u64;
        // Every block below the extent is used (a pool that only grows): don't scan the whole
        // bitmap for nothing on each allocation (it made 5M-block pools O(n) per write).
        if self.first + self.used_count >= len {
            return len;
        }
        let cur = self.cursor.clamp(self.first, len);
        if self.written_free > 0 {
            let found = first_written_free(&self.used, &self.hole, cur, len)
                .or_else(|| first_written_free(&self.used, &self.hole, self.first, cur));
            debug_assert!(
                found.is_some(),
                "written_free counts a block that is not there"
            );
            if let Some(i) = found {
                return i;
            }
        }
        if let Some(i) = self.used[cur as usize..].first_zero() {
            return cur + i as u64;
        }
        if let Some(i) = self.used[self.first as usize..cur as usize].first_zero() {
            return self.first + i as u64;
        }
        len
    }

    /// Free a block. Fresh blocks are free at once; committed ones at the next commit.
    pub fn free(&mut self, p: PBlock) {
        let i = p.0 as usize;
        debug_assert!(self.used[i], "freeing free {p}");
        if self.fresh[i] {
            self.fresh.set(i, false);
            self.give(i, false);
            self.to_punch.push(p.0);
            if p.0 < self.cursor {
                self.cursor = p.0;
            }
        } else {
            self.pending_free.push(p.0);
        }
    }

    /// The open transaction committed: its frees take effect. Returns the blocks whose space
    /// can be punched out of the file, sorted.
    pub fn committed(&mut self) -> Vec<PBlock> {
        let sealed = self.seal();
        self.release(sealed)
    }

    /// Close the open transaction while its commit is made durable. Its blocks stop being
    /// fresh at once, so later writes redirect instead of overwriting what the commit names;
    /// its frees stay in use until `release`, after the commit is durable.
    pub fn seal(&mut self) -> Sealed {
        for &i in &self.fresh_list {
            self.fresh.set(i as usize, false);
        }
        self.fresh_list.clear();
        Sealed {
            frees: std::mem::take(&mut self.pending_free),
            punch: std::mem::take(&mut self.to_punch),
        }
    }

    /// The sealed transaction is durable: its frees take effect. Returns the blocks whose
    /// space can be punched out of the file, sorted.
    pub fn release(&mut self, sealed: Sealed) -> Vec<PBlock> {
        let Sealed {
            mut frees,
            mut punch,
        } = sealed;
        for &i in &frees {
            self.give(i as usize, false);
        }
        frees.append(&mut punch);
        // A punched fresh block may have been reused since; never punch a used one.
        frees.retain(|&i| !self.used[i as usize]);
        frees.sort_unstable();
        frees.dedup();
        if let Some(&lowest) = frees.first() {
            self.cursor = self.cursor.min(lowest);
        }
        frees.into_iter().map(PBlock).collect()
    }

    /// Hold free blocks back from allocation while their space is punched out of the file
    /// without the store's lock (a punch must never hit a block that was reused meanwhile).
    /// They count as used until `punched`.
    pub fn reserve_for_punch(&mut self, blocks: &[PBlock]) {
        for b in blocks {
            debug_assert!(!self.used[b.0 as usize], "reserving used {b}");
            self.take(b.0 as usize);
        }
        self.punching.extend(blocks.iter().map(|b| b.0));
    }

    /// The reserved blocks were punched: free again, as holes (handed out only once no
    /// written free block is left).
    pub fn punched(&mut self, blocks: &[PBlock]) {
        for b in blocks {
            self.give(b.0 as usize, true);
            self.cursor = self.cursor.min(b.0);
        }
        let done: std::collections::HashSet<u64> = blocks.iter().map(|b| b.0).collect();
        self.punching.retain(|b| !done.contains(b));
    }

    /// Blocks held back while being punched (for consistency checks).
    pub fn punching(&self) -> impl Iterator<Item = PBlock> + '_ {
        self.punching.iter().map(|&b| PBlock(b))
    }

    /// Blocks freed in the open transaction that stay used until it commits.
    pub fn pending_frees(&self) -> impl Iterator<Item = PBlock> + '_ {
        self.pending_free.iter().map(|&b| PBlock(b))
    }

    /// Every block marked used, in order (for consistency checks).
    pub fn used_blocks(&self) -> impl Iterator<Item = PBlock> + '_ {
        self.used.iter_ones().map(|i| PBlock(i as u64))
    }

    /// Every block allocated in the open transaction, in order.
    pub fn fresh_blocks(&self) -> impl Iterator<Item = PBlock> + '_ {
        self.fresh.iter_ones().map(|i| PBlock(i as u64))
    }

    /// Free runs of blocks below the extent (for punching after a crash left stale data there).
    pub fn free_runs(&self) -> Vec<(PBlock, u64)> {
        let mut runs = Vec::new();
        let mut i = self.first as usize;
        let len = self.used.len();
        while i < len {
            match self.used[i..].first_zero() {
                None => break,
                Some(z) => {
                    let s = i + z;
                    let e = self.used[s..].first_one().map_or(len, |o| s + o);
                    runs.push((PBlock(s as u64), (e - s) as u64));
                    i = e;
                }
            }
        }
        runs
    }
}

/// The first block in `from..to` that is neither used nor a hole, a word at a time.
fn first_written_free(
    used: &BitVec<u64, Lsb0>,
    hole: &BitVec<u64, Lsb0>,
    from: u64,
    to: u64,
) -> Option<u64> {
    let (u, h) = (used.as_raw_slice(), hole.as_raw_slice());
    let mut i = from as usize;
    let to = to as usize;
    while i < to {
        let w = i / 64;
        // Bits of word w below i (and at or past `to`) count as taken.
        let mut taken = u[w] | h[w] | ((1u64 << (i % 64)) - 1);
        let end = (w + 1) * 64;
        if to < end {
            taken |= !((1u64 << (to % 64)) - 1);
        }
        if taken != u64::MAX {
            return Some((w * 64) as u64 + taken.trailing_ones() as u64);
        }
        i = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_frees_are_not_reused_before_commit() {
        let mut a = Allocator::new(2, 0);
        let (p, n) = a.alloc_run(4, 0).unwrap();
        assert_eq!((p, n), (PBlock(2), 4));
        a.committed();
        a.free(PBlock(3));
        let (q, _) = a.alloc_run(1, 0).unwrap();
        assert_ne!(q, PBlock(3), "reused a block freed in the open transaction");
        let punched = a.committed();
        assert_eq!(punched, vec![PBlock(3)]);
        let (r, _) = a.alloc_run(1, 0).unwrap();
        assert_eq!(r, PBlock(3), "freed block reused after commit");
    }

    #[test]
    fn fresh_blocks_are_reusable_at_once_and_cap_is_enforced() {
        let mut a = Allocator::new(1, 5);
        let (p, n) = a.alloc_run(10, 0).unwrap();
        assert_eq!((p.0, n), (1, 4));
        assert_eq!(a.alloc_run(1, 0), None, "full pool");
        a.free(PBlock(2));
        assert_eq!(a.alloc_run(1, 0).unwrap().0, PBlock(2));
        assert_eq!(a.free_under_cap(), Some(0));
    }

    /// A punched block is a hole in the file: writing it again allocates host space, and the
    /// commit's sync then writes the file's inode and extent blocks too. A freed block the file
    /// still holds goes first, even above the cursor's hole.
    #[test]
    fn a_written_free_block_is_handed_out_before_a_punched_one() {
        let mut a = Allocator::new(2, 0);
        a.alloc_run(600, 0).unwrap();
        a.committed();
        for b in 10..310 {
            a.free(PBlock(b));
        }
        let holes: Vec<PBlock> = a.committed().into_iter().collect();
        a.reserve_for_punch(&holes);
        a.punched(&holes);
        assert!(a.is_hole(PBlock(10)) && a.written_free() == 0);
        a.free(PBlock(500));
        a.committed();
        assert_eq!(a.written_free(), 1);
        assert_eq!(a.alloc_run(1, 0).unwrap(), (PBlock(500), 1));
        // None written is left: the holes, lowest first, then the file's end.
        assert_eq!(a.alloc_run(1, 0).unwrap(), (PBlock(10), 1));
        assert_eq!(a.written_free(), 0);
    }

    /// The counts and the choice against a model: whatever happens, `written_free` is the
    /// number of free, non-hole blocks below the extent, and one of them is handed out while
    /// any is left.
    #[test]
    fn the_written_free_count_and_choice_follow_a_model() {
        let mut rng = crate::pool::sim::SplitMix::new(7);
        let mut a = Allocator::new(3, 0);
        let mut used: Vec<u64> = Vec::new();
        for step in 0..20000 {
            match rng.below(10) {
                0..=4 => {
                    let span = if rng.coin() { 3 } else { 140 };
                    let want = 1 + rng.below(span);
                    let (p, n) = a.alloc_run(want, 0).unwrap();
                    used.extend(p.0..p.0 + n);
                }
                5..=7 if !used.is_empty() => {
                    let i = rng.below(used.len() as u64) as usize;
                    a.free(PBlock(used.swap_remove(i)));
                }
                8 => {
                    a.committed();
                }
                _ => {
                    let freed = a.committed();
                    let take = freed.len().min(rng.below(300) as usize);
                    a.reserve_for_punch(&freed[..take]);
                    a.punched(&freed[..take]);
                }
            }
            let naive = (a.first..a.extent())
                .filter(|&b| !a.is_used(PBlock(b)) && !a.is_hole(PBlock(b)))
                .count() as u64;
            assert_eq!(a.written_free(), naive, "step {step}");
            if naive > 0 {
                let c = a.clone().alloc_run(1, 0).unwrap().0;
                assert!(
                    !a.is_used(c) && !a.is_hole(c) && c.0 < a.extent(),
                    "step {step}: {c} handed out while {naive} written blocks were free"
                );
            }
        }
    }

    #[test]
    fn double_load_is_reported() {
        let mut a = Allocator::new(2, 0);
        assert!(a.mark_loaded(PBlock(9)));
        assert!(!a.mark_loaded(PBlock(9)));
        assert_eq!(a.free_runs(), vec![(PBlock(2), 7)]);
    }
}
