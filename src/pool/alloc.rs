//! Block allocation. The map of used blocks is not stored: it is rebuilt from the block maps and
//! the metadata streams, so it can never disagree with them.
//!
//! The rebuild need not happen at open (DESIGN §5.3, issue 22 step d): an allocator made by
//! `loading` hands out only blocks at or above the pool file's extent at open (the *floor*:
//! everything the checkpoint and the log reference lies below it) and keeps every block below
//! it used, releases included, until `finish_loading` is given the claims of the whole loaded
//! state. Then the blocks below the floor become free unless a map, a stream, a pending free
//! or a sealed free holds them: the same free set a rebuild at open gives. The eager open goes
//! through the same two calls, one after the other.
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

use super::sparse_bits::SparseBits;
use crate::format::PBlock;
use bitvec::prelude::*;
use std::collections::HashSet;

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

/// An allocator whose pool's maps are not all loaded (see the module's comment).
#[derive(Clone, Debug)]
struct Loading {
    /// The pool file's extent at open in blocks, at least one past every stream block: every
    /// block the durable state references lies below it. Every block in `first..floor` is
    /// marked used until `finish_loading`.
    floor: u64,
    /// Frees below the floor sealed into a commit that is not yet durable (`seal` to
    /// `release`): the durable state still references them, and nothing else says so.
    sealed: HashSet<u64>,
    /// The maps' blocks claimed as their ranges load (a lazy open, `claim_as_loaded`), so
    /// that the completion need not audit every map under the store's write lock. None
    /// when the completion claims them all (an eager open, a deferred one).
    claims: Option<Claimed>,
    /// Every block below the floor released since the open (freed by a map that dropped it,
    /// or by a commit, §5.3): the map that was claimed holding it no longer does, so it is
    /// un-claimed at the completion (`take_load_claims`), before the streams are claimed.
    /// Kept only while `claims` is. Any other holder claimed it too, and that claim failed.
    released: Vec<u64>,
    /// Blocks below the floor that a crash journal's replay took (`claim_fresh`: claimed,
    /// fresh) and a later change freed while still fresh: nothing durable names them, but
    /// they stay claimed, so a range naming one that loads later is found (a double
    /// reference), and a later record of the replay may take one again. Un-claimed at the
    /// completion.
    replay_freed: HashSet<u64>,
}

/// Pool blocks referenced by the loaded state (maps and streams), as `invariants::audit`
/// claims them: what `Allocator::finish_loading` rebuilds from.
#[derive(Clone, Debug, Default)]
pub struct Claimed {
    bits: BitVec<u64, Lsb0>,
}

impl Claimed {
    /// Room for blocks below `blocks` without growing.
    pub fn with_capacity(blocks: u64) -> Claimed {
        Claimed {
            bits: BitVec::repeat(false, blocks as usize),
        }
    }

    /// Note a reference to `p`; false if it was referenced already (a block used twice).
    pub fn claim(&mut self, p: PBlock) -> bool {
        let i = p.0 as usize;
        if i >= self.bits.len() {
            self.bits.resize(i + 1, false);
        }
        !self.bits.replace(i, true)
    }

    /// Note a reference to each of blocks `p..p + n` at once, if none was referenced
    /// already (then false, and nothing is claimed: claim them one by one to find which).
    pub fn claim_run(&mut self, p: PBlock, n: u64) -> bool {
        // A single block (most of a scattered map) costs one bit: a bit slice's set-up is
        // most of a claim (measured: claim_run 45% of a 10M-block scattered load's CPU).
        if n == 1 {
            let i = p.0 as usize;
            if i >= self.bits.len() {
                self.bits.resize(i + 1, false);
            }
            if self.bits[i] {
                return false;
            }
            self.bits.set(i, true);
            return true;
        }
        let (i, end) = (p.0 as usize, (p.0 + n) as usize);
        if end > self.bits.len() {
            self.bits.resize(end, false);
        }
        let run = &mut self.bits[i..end];
        if run.any() {
            return false;
        }
        run.fill(true);
        true
    }

    /// Whether `p` is claimed.
    pub fn is_claimed(&self, p: PBlock) -> bool {
        self.bits.get(p.0 as usize).is_some_and(|b| *b)
    }

    /// `p` is no longer referenced by what claimed it.
    fn unclaim(&mut self, p: u64) {
        if let Some(mut b) = self.bits.get_mut(p as usize) {
            *b = false;
        }
    }
}

/// What `finish_loading` found that the claims and the allocator disagree on (faults: the
/// caller names them).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Disagreements {
    /// Claimed blocks below the floor that the open transaction or a commit in flight also
    /// frees: referenced twice.
    pub freed_but_claimed: Vec<PBlock>,
    /// Claimed blocks at or above the floor that the allocator held free (or handed out
    /// since the open, then freed): the durable state named a block past the file's end.
    pub free_but_claimed: Vec<PBlock>,
}

/// Of the three sets a block may be in, only `used` is a dense bitmap (1 bit a block of the
/// extent): the other two cost by what they hold (`SparseBits`), since for an imported image
/// both are empty between commits and together they cost more than its maps (issue 22:
/// 0.25 B a mapped block of the 0.5 B goal, measured).
#[derive(Clone)]
pub struct Allocator {
    used: BitVec<u64, Lsb0>,
    /// Free blocks below the extent whose space the file still holds (freed, not punched):
    /// written space to reuse first. Every other free block is a *hole* (punched, or never
    /// written as far as this process knows: every free block of a loaded pool). Stored this
    /// way round because written free blocks are few (step 6 of §4 punches them in batches)
    /// while a loaded pool's holes are all its free space.
    written: SparseBits,
    /// Blocks allocated in the open transaction (all used): cleared whole at `seal`.
    fresh: SparseBits,
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
    /// Set until the maps are all loaded and claimed (`finish_loading`).
    loading: Option<Loading>,
}

impl Allocator {
    /// `first`: first allocatable block; `max_blocks`: cap on the pool size in blocks (0 = none).
    pub fn new(first: u64, max_blocks: u64) -> Self {
        Allocator {
            used: BitVec::repeat(false, first as usize),
            written: SparseBits::default(),
            fresh: SparseBits::default(),
            pending_free: Vec::new(),
            to_punch: Vec::new(),
            punching: Vec::new(),
            first,
            limit: max_blocks,
            cursor: first,
            used_count: 0,
            loading: None,
        }
    }

    /// An allocator for a pool whose maps are not loaded yet: every block in `first..floor`
    /// counts as used (so nothing there is handed out, and a cap counts it) until
    /// `finish_loading`. `floor`: the pool file's extent at open in blocks, at least one past
    /// every block of its streams.
    pub fn loading(first: u64, max_blocks: u64, floor: u64) -> Self {
        let floor = floor.max(first);
        let mut a = Allocator::new(first, max_blocks);
        a.used.resize(floor as usize, true);
        a.used_count = floor - first;
        a.cursor = floor;
        a.loading = Some(Loading {
            floor,
            sealed: HashSet::new(),
            claims: None,
            released: Vec::new(),
            replay_freed: HashSet::new(),
        });
        a
    }

    /// The maps will be claimed range by range as they load (a lazy open): keep the claims
    /// here (`load_claims`), and remember the releases below the floor from now on, which
    /// un-claim what they release at the completion (`take_load_claims`).
    pub fn claim_as_loaded(&mut self) {
        if let Some(l) = &mut self.loading {
            l.claims = Some(Claimed::with_capacity(l.floor));
        }
    }

    /// The claims of the maps loaded so far (see `claim_as_loaded`), to add a range's to.
    pub fn load_claims(&mut self) -> Option<&mut Claimed> {
        self.loading.as_mut().and_then(|l| l.claims.as_mut())
    }

    /// At the completion: the claims made as the maps loaded, less every block released
    /// since (the live maps' claims, to which the streams' are added, then
    /// `finish_loading`). None if the maps were not claimed as they loaded.
    pub fn take_load_claims(&mut self) -> Option<Claimed> {
        let l = self.loading.as_mut()?;
        let mut claims = l.claims.take()?;
        let replay_freed = std::mem::take(&mut l.replay_freed);
        for p in std::mem::take(&mut l.released)
            .into_iter()
            .chain(replay_freed)
        {
            claims.unclaim(p);
        }
        Some(claims)
    }

    /// While loading, the floor below which nothing is handed out or freed.
    pub fn loading_floor(&self) -> Option<u64> {
        self.loading.as_ref().map(|l| l.floor)
    }

    /// Whether block `i` lies below the floor of a loading allocator: used, whatever happens,
    /// until `finish_loading`.
    fn held_by_loading(&self, i: u64) -> bool {
        self.loading.as_ref().is_some_and(|l| i < l.floor)
    }

    /// Where allocation may look: the first data block, or the floor while loading.
    fn lowest(&self) -> u64 {
        self.loading_floor().unwrap_or(self.first)
    }

    /// The maps are all loaded and `claimed` holds every block they and the streams reference
    /// (`invariants::rebuild`): below the floor, a block stays used if claimed, freed by the
    /// open transaction or sealed in a commit not yet durable, and becomes free otherwise (as
    /// a hole: the free blocks of a loaded pool, §5.4); at and above it the allocator already
    /// knows. Returns where the claims disagree with it. Nothing to do when not loading.
    pub fn finish_loading(&mut self, claimed: Claimed) -> Disagreements {
        let mut found = Disagreements::default();
        let Some(l) = self.loading.take() else {
            return found;
        };
        let mut claimed = claimed.bits;
        self.grow_to(claimed.len() as u64);
        let (first, floor, len) = (self.first as usize, l.floor as usize, self.used.len());
        claimed.resize(len, false);
        // Above the floor every block the durable state names must be used: it was free at
        // open only if it lay past the file, and may have been handed out since.
        for i in claimed[floor..].iter_ones().map(|i| i + floor) {
            if !self.used[i] {
                found.free_but_claimed.push(PBlock(i as u64));
                self.take(i);
            }
        }
        let pending = self.pending_free.iter().filter(|&&p| p < l.floor);
        for &p in pending.chain(l.sealed.iter()) {
            if claimed.replace(p as usize, true) {
                found.freed_but_claimed.push(PBlock(p));
            }
        }
        found.freed_but_claimed.sort_unstable();
        found.free_but_claimed.sort_unstable();
        let below = &claimed[first..floor];
        let kept = below.count_ones() as u64;
        // Unclaimed blocks become free holes: nothing below the floor was written free while
        // loading (nothing there was given back), so `written` needs no change.
        debug_assert_eq!(self.written.first_in(self.first, l.floor), None);
        self.used[first..floor].copy_from_bitslice(below);
        self.used_count = self.used_count - (l.floor - self.first) + kept;
        self.cursor = self.first;
        self.trim();
        found
    }

    /// Drop trailing free holes from the bitmap: past the extent every block is a free hole
    /// anyway, and the extent then says where the pool's used space ends, as after an open.
    /// (No fresh block lies past the last used one: fresh blocks are used.)
    fn trim(&mut self) {
        let end = self.used.last_one().map_or(self.first as usize, |i| i + 1);
        let end = end.max(self.first as usize);
        if end < self.used.len() && self.written.first_in(end as u64, u64::MAX).is_none() {
            self.used.truncate(end);
        }
    }

    /// Bytes of heap the allocator holds (issue 22's memory goal is counted per mapped block):
    /// its bitmaps' and lists' capacities; a hash set counts its slots, not its control bytes.
    pub fn heap_bytes(&self) -> u64 {
        let bits = |b: &BitVec<u64, Lsb0>| b.capacity().div_ceil(64) as u64 * 8;
        let list = |v: &Vec<u64>| v.capacity() as u64 * 8;
        let set = |s: &HashSet<u64>| s.capacity() as u64 * 8;
        let loading = self.loading.as_ref().map_or(0, |l| {
            set(&l.sealed)
                + l.claims.as_ref().map_or(0, |c| bits(&c.bits))
                + list(&l.released)
                + set(&l.replay_freed)
        });
        bits(&self.used)
            + self.written.heap_bytes()
            + self.fresh.heap_bytes()
            + list(&self.pending_free)
            + list(&self.to_punch)
            + list(&self.punching)
            + loading
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
        self.fresh.contains(p.0)
    }

    /// Free blocks whose space the file still holds (see `written`).
    pub fn written_free(&self) -> u64 {
        self.written.len()
    }

    /// Whether a free block's space is known to be out of the file (punched or never written):
    /// a free block below the extent that is not written free.
    pub fn is_hole(&self, p: PBlock) -> bool {
        p.0 >= self.first && p.0 < self.extent() && !self.is_used(p) && !self.written.contains(p.0)
    }

    /// Blocks past the extent join as holes: the file never held them as far as we know.
    /// The bitmap grows by a sixteenth at a time, not by doubling: a pool that grows past
    /// its extent on its first write would otherwise reserve a second bitmap as large.
    fn grow_to(&mut self, len: u64) {
        let have = self.used.len();
        let len = len as usize;
        if have < len {
            if self.used.capacity() < len {
                let more = (len - have).max(have / 16).max(4096);
                self.used.reserve_exact(more);
            }
            self.used.resize(len, false);
        }
    }

    /// Mark free block `i` used (no longer written free, if it was: a used block's space is
    /// the file's).
    fn take(&mut self, i: usize) {
        debug_assert!(!self.used[i]);
        self.written.remove(i as u64);
        self.used.set(i, true);
        self.used_count += 1;
    }

    /// Mark used block `i` free; `hole`: its space is no longer in the file (punched).
    fn give(&mut self, i: usize, hole: bool) {
        debug_assert!(self.used[i] && !self.written.contains(i as u64));
        self.used.set(i, false);
        self.used_count -= 1;
        if !hole {
            self.written.insert(i as u64);
        }
    }

    /// Take a block that a replayed transaction wrote (the crash journal): used and fresh, as
    /// when it was allocated. False if it is used already and not fresh (committed data or
    /// metadata: the journal disagrees with the pool). A fresh block may be named again (an
    /// overwrite in place).
    /// While loading, a block below the floor (where a killed server's writes went: it was
    /// free to that server's allocator) counts as used whatever it holds; whether the durable
    /// state names it is known only from the maps. So it is claimed among the maps' claims
    /// (`claim_as_loaded`): false if a map loaded so far holds it; a range naming it that
    /// loads later fails its own claim, a fault found late; the completion keeps it used as
    /// any claimed block.
    /// Without those claims (a deferred open) it cannot be taken.
    pub fn claim_fresh(&mut self, p: PBlock) -> bool {
        if p.0 < self.first {
            return false;
        }
        if self.held_by_loading(p.0) {
            return self.claim_fresh_below_floor(p.0);
        }
        self.grow_to(p.0 + 1);
        let i = p.0 as usize;
        if self.used[i] {
            return self.fresh.contains(p.0);
        }
        self.take(i);
        self.fresh.insert(p.0);
        true
    }

    /// `claim_fresh` of block `i` below a loading allocator's floor: it stays used (every
    /// block there is, until the completion) and becomes fresh, claimed in the load claims.
    fn claim_fresh_below_floor(&mut self, i: u64) -> bool {
        if self.fresh.contains(i) {
            return true;
        }
        let Some(l) = self.loading.as_mut() else {
            return false;
        };
        let Some(claims) = l.claims.as_mut() else {
            return false;
        };
        if !claims.claim(PBlock(i)) && !l.replay_freed.remove(&i) {
            return false;
        }
        self.fresh.insert(i);
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
            self.fresh.insert(i);
        }
        self.cursor = start + n;
        Some((PBlock(start), n))
    }

    /// Why `alloc_run` found no room, for the caller's error.
    pub fn full_message(&self) -> String {
        let loading = match self.loading_floor() {
            // Which blocks below the floor are free is known once the maps are loaded.
            Some(floor) => format!(
                " (while the maps load, blocks below {floor}, the file's extent at open, count as used)"
            ),
            None => String::new(),
        };
        format!(
            "pool full: {} of {} blocks in use{loading}",
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
        // While loading, nothing below the floor is free: the scans start there.
        let low = self.lowest();
        let cur = self.cursor.clamp(low, len);
        if !self.written.is_empty() {
            let found =
                (self.written.first_in(cur, len)).or_else(|| self.written.first_in(low, cur));
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
        if let Some(i) = self.used[low as usize..cur as usize].first_zero() {
            return low + i as u64;
        }
        len
    }

    /// Free a block. Fresh blocks are free at once; committed ones at the next commit.
    pub fn free(&mut self, p: PBlock) {
        let i = p.0 as usize;
        debug_assert!(self.used[i], "freeing free {p}");
        // While loading, a block below the floor is fresh only if a replay took it: it stays
        // used (held) until the completion, which frees it (`replay_freed`).
        if self.fresh.contains(p.0) && self.held_by_loading(p.0) {
            self.fresh.remove(p.0);
            if let Some(l) = &mut self.loading {
                l.replay_freed.insert(p.0);
            }
        } else if self.fresh.remove(p.0) {
            self.give(i, false);
            self.to_punch.push(p.0);
            if p.0 < self.cursor {
                self.cursor = p.0;
            }
        } else {
            self.pending_free.push(p.0);
            self.note_release(p.0);
        }
    }

    /// A block below the floor released while the maps load and are claimed as they do:
    /// see `Loading::released`.
    fn note_release(&mut self, i: u64) {
        if let Some(l) = &mut self.loading {
            if i < l.floor && l.claims.is_some() {
                l.released.push(i);
            }
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
        self.fresh.clear();
        if let Some(l) = &mut self.loading {
            // Until `release`, only the sealed transaction knows these are still referenced.
            let below = self.pending_free.iter().filter(|&&p| p < l.floor);
            l.sealed.extend(below);
        }
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
            if let Some(l) = &mut self.loading {
                if i < l.floor {
                    // Kept used until the load is complete: `finish_loading` frees it then if
                    // nothing claims it (nothing can have taken it meanwhile). A commit's own
                    // frees (its old streams) were never `free`d: released here.
                    if !l.sealed.remove(&i) && l.claims.is_some() {
                        l.released.push(i);
                    }
                    continue;
                }
            }
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
            debug_assert!(!self.held_by_loading(b.0), "reserving {b} below the floor");
            self.take(b.0 as usize);
        }
        self.punching.extend(blocks.iter().map(|b| b.0));
    }

    /// The reserved blocks were punched: free again, as holes (handed out only once no
    /// written free block is left).
    pub fn punched(&mut self, blocks: &[PBlock]) {
        for b in blocks {
            debug_assert!(!self.held_by_loading(b.0), "punched {b} below the floor");
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
        self.fresh.iter().map(PBlock)
    }

    /// Free runs of blocks below the extent (for punching after a crash left stale data there).
    pub fn free_runs(&self) -> Vec<(PBlock, u64)> {
        let mut runs = Vec::new();
        let mut i = self.lowest() as usize;
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

    /// The counts and the choice against a model: whatever happens, the written free blocks
    /// are those the model says the file still holds (freed fresh at once, freed committed at
    /// the commit, until reserved for a punch), every other free block below the extent is a
    /// hole, the fresh blocks are those allocated since the last commit, and a written free
    /// block is handed out while any is left.
    #[test]
    fn the_written_free_count_and_choice_follow_a_model() {
        use std::collections::BTreeSet;
        let mut rng = crate::pool::sim::SplitMix::new(7);
        let mut a = Allocator::new(3, 0);
        let mut used: Vec<u64> = Vec::new();
        let mut fresh: BTreeSet<u64> = BTreeSet::new();
        let mut pending: Vec<u64> = Vec::new();
        let mut written: BTreeSet<u64> = BTreeSet::new();
        for step in 0..20000 {
            match rng.below(10) {
                0..=4 => {
                    let span = if rng.coin() { 3 } else { 140 };
                    let want = 1 + rng.below(span);
                    let (p, n) = a.alloc_run(want, 0).unwrap();
                    used.extend(p.0..p.0 + n);
                    for b in p.0..p.0 + n {
                        written.remove(&b);
                        fresh.insert(b);
                    }
                }
                5..=7 if !used.is_empty() => {
                    let i = rng.below(used.len() as u64) as usize;
                    let b = used.swap_remove(i);
                    a.free(PBlock(b));
                    if fresh.remove(&b) {
                        written.insert(b);
                    } else {
                        pending.push(b);
                    }
                }
                8 => {
                    a.committed();
                    written.extend(pending.drain(..));
                    fresh.clear();
                }
                _ => {
                    let freed = a.committed();
                    written.extend(pending.drain(..));
                    fresh.clear();
                    assert!(freed.iter().all(|p| written.contains(&p.0)), "step {step}");
                    let take = freed.len().min(rng.below(300) as usize);
                    a.reserve_for_punch(&freed[..take]);
                    for p in &freed[..take] {
                        written.remove(&p.0);
                    }
                    a.punched(&freed[..take]);
                }
            }
            // Block by block every 64th step (the pool grows to hundreds of thousands).
            if step % 64 == 0 {
                let held: HashSet<u64> = used.iter().chain(&pending).copied().collect();
                for b in a.first..a.extent() {
                    let p = PBlock(b);
                    assert_eq!(a.is_used(p), held.contains(&b), "step {step}: {b}");
                    let hole = !held.contains(&b) && !written.contains(&b);
                    assert_eq!(a.is_hole(p), hole, "step {step}: {b}");
                }
                assert!(a.fresh_blocks().map(|p| p.0).eq(fresh.iter().copied()));
            }
            for &b in written.iter().take(8) {
                assert!(
                    !a.is_used(PBlock(b)) && !a.is_hole(PBlock(b)),
                    "step {step}: {b}"
                );
            }
            assert!(written.iter().all(|&b| b < a.extent()), "step {step}");
            assert_eq!(a.written_free(), written.len() as u64, "step {step}");
            assert_eq!(a.fresh_blocks().count(), fresh.len(), "step {step}");
            if let Some(&lowest) = written.first() {
                let c = a.clone().alloc_run(1, 0).unwrap().0;
                assert!(
                    written.contains(&c.0),
                    "step {step}: {c} handed out while {} written blocks were free (from {lowest})",
                    written.len()
                );
            }
        }
    }

    /// The loading mode against a model (issue 22 step d): random allocations, frees,
    /// commits (sealed, then released later, as a commit made durable without the store's
    /// lock, with a checkpoint's old streams among its frees) and punches while the maps
    /// load, then the completion at a random point, then more of the same. No block is handed
    /// out twice; none below the floor (where every block the durable state references lies)
    /// before the completion; and after it the used set is exactly what the live state holds
    /// (maps and streams, pending and sealed frees, punches in flight), which is what a
    /// rebuild from the maps claims, with every other block below the floor a free hole.
    /// Every other seed claims the durable state's blocks up front, as a lazy open claims each
    /// range's as it loads (`claim_as_loaded`), and the completion only takes those claims
    /// less what was released since (`take_load_claims`): the same result.
    #[test]
    fn the_loading_mode_follows_a_model() {
        use std::collections::BTreeSet;
        for seed in 0..60 {
            let mut rng = crate::pool::sim::SplitMix::new(seed);
            let first = 3;
            let floor = first + 50 + rng.below(400);
            let mut a = Allocator::loading(first, 0, floor);
            // The durable state: about half the blocks below the floor.
            let mut mapped: BTreeSet<u64> = (first..floor).filter(|_| rng.coin()).collect();
            let as_loaded = seed % 2 == 1;
            if as_loaded {
                a.claim_as_loaded();
                for &b in &mapped {
                    assert!(a.load_claims().unwrap().claim(PBlock(b)));
                }
            }
            let mut fresh: BTreeSet<u64> = BTreeSet::new();
            let mut pending: Vec<u64> = Vec::new();
            let mut sealed: Option<(Sealed, Vec<u64>)> = None;
            let mut punching: Option<Vec<PBlock>> = None;
            let mut released: Vec<PBlock> = Vec::new();
            let mut loading = true;
            let steps = 400 + rng.below(400);
            let complete_at = rng.below(steps);
            for step in 0..steps {
                let held = |b: u64,
                            mapped: &BTreeSet<u64>,
                            pending: &Vec<u64>,
                            sealed: &Option<(Sealed, Vec<u64>)>,
                            punching: &Option<Vec<PBlock>>| {
                    mapped.contains(&b)
                        || pending.contains(&b)
                        || sealed.as_ref().is_some_and(|s| s.1.contains(&b))
                        || punching.as_ref().is_some_and(|p| p.contains(&PBlock(b)))
                };
                if loading && step == complete_at {
                    let claims = if as_loaded {
                        // What the maps still hold below the floor (above it every block
                        // is the allocator's own, handed out since the open).
                        let claims = a.take_load_claims().unwrap();
                        for b in first..floor {
                            let want = mapped.contains(&b);
                            assert_eq!(claims.is_claimed(PBlock(b)), want, "seed {seed}: {b}");
                        }
                        claims
                    } else {
                        let mut claims = Claimed::default();
                        for &b in &mapped {
                            assert!(claims.claim(PBlock(b)));
                        }
                        claims
                    };
                    let d = a.finish_loading(claims);
                    assert_eq!(d, Disagreements::default(), "seed {seed}");
                    loading = false;
                    assert_eq!(a.loading_floor(), None);
                    for b in 0..a.extent().max(floor) + 1 {
                        let want = b >= first && held(b, &mapped, &pending, &sealed, &punching);
                        assert_eq!(a.is_used(PBlock(b)), want, "seed {seed}: block {b}");
                        if b >= first && b < floor && !want {
                            assert!(a.is_hole(PBlock(b)), "seed {seed}: {b} free, not a hole");
                        }
                    }
                    let n = (first..a.extent())
                        .filter(|&b| held(b, &mapped, &pending, &sealed, &punching))
                        .count() as u64;
                    assert_eq!(a.used_count(), n, "seed {seed}");
                    continue;
                }
                match rng.below(12) {
                    0..=4 => {
                        let span = if rng.coin() { 3 } else { 40 };
                        let want = 1 + rng.below(span);
                        let (p, n) = a.alloc_run(want, 0).unwrap();
                        for b in p.0..p.0 + n {
                            assert!(
                                !held(b, &mapped, &pending, &sealed, &punching),
                                "seed {seed} step {step}: {b} handed out twice"
                            );
                            assert!(
                                !loading || b >= floor,
                                "seed {seed} step {step}: {b} below the floor while loading"
                            );
                            mapped.insert(b);
                            fresh.insert(b);
                        }
                    }
                    5..=7 if !mapped.is_empty() => {
                        let k = rng.below(mapped.len() as u64) as usize;
                        let b = *mapped.iter().nth(k).unwrap();
                        mapped.remove(&b);
                        a.free(PBlock(b));
                        if !fresh.remove(&b) {
                            pending.push(b);
                        }
                    }
                    8 if sealed.is_none() => {
                        sealed = Some((a.seal(), std::mem::take(&mut pending)));
                        fresh.clear();
                    }
                    9 if sealed.is_some() => {
                        let (mut s, mut frees) = sealed.take().unwrap();
                        // A checkpoint frees the streams it replaced with its own frees.
                        if rng.coin() {
                            let old: Vec<u64> = mapped
                                .iter()
                                .filter(|b| !fresh.contains(b))
                                .take(rng.below(5) as usize)
                                .copied()
                                .collect();
                            for b in &old {
                                mapped.remove(b);
                            }
                            s.add_frees(old.iter().map(|&b| PBlock(b)));
                            frees.extend(old);
                        }
                        sealed = Some((s, frees));
                        let (s, _) = sealed.take().unwrap();
                        for p in a.release(s) {
                            assert!(!loading || p.0 >= floor, "seed {seed}: {p} released");
                            released.push(p);
                        }
                    }
                    10 if punching.is_none() => {
                        released.retain(|&p| !a.is_used(p) && !mapped.contains(&p.0));
                        released.sort_unstable();
                        released.dedup();
                        let take = released.len().min(rng.below(30) as usize);
                        let blocks: Vec<PBlock> = released.drain(..take).collect();
                        a.reserve_for_punch(&blocks);
                        punching = Some(blocks);
                    }
                    11 if punching.is_some() => {
                        a.punched(&punching.take().unwrap());
                    }
                    _ => {}
                }
                // Above the floor the allocator knows exactly; below it, all is used until the
                // completion.
                for b in first..a.extent() {
                    let want =
                        (loading && b < floor) || held(b, &mapped, &pending, &sealed, &punching);
                    assert_eq!(a.is_used(PBlock(b)), want, "seed {seed} step {step}: {b}");
                }
                let naive = (first..a.extent())
                    .filter(|&b| !a.is_used(PBlock(b)) && !a.is_hole(PBlock(b)))
                    .count() as u64;
                assert_eq!(a.written_free(), naive, "seed {seed} step {step}");
            }
        }
    }

    /// A capped pool whose free space lies below the floor is full while the maps load (the
    /// message says why), and after the completion hands out the blocks there that nothing
    /// holds.
    #[test]
    fn a_capped_pool_is_full_above_the_floor_until_the_load_completes() {
        let mut a = Allocator::loading(2, 20, 18);
        assert_eq!(a.free_under_cap(), Some(2));
        assert_eq!(a.alloc_run(5, 0), Some((PBlock(18), 2)));
        assert_eq!(a.alloc_run(1, 0), None);
        assert!(
            a.full_message().contains("while the maps load"),
            "{}",
            a.full_message()
        );
        // The open transaction dropped block 5 from its map: freed, not claimed.
        let mut claims = Claimed::default();
        for b in (2..10).chain(12..18).filter(|&b| b != 5) {
            claims.claim(PBlock(b));
        }
        a.free(PBlock(5));
        claims.claim(PBlock(18));
        assert_eq!(a.finish_loading(claims), Disagreements::default());
        // 19 was handed out and never claimed (a write in flight): still used.
        assert!(a.is_used(PBlock(19)) && a.is_used(PBlock(5)));
        assert_eq!(a.free_under_cap(), Some(2));
        assert_eq!(a.alloc_run(5, 0), Some((PBlock(10), 2)));
        assert!(!a.full_message().contains("while the maps load"));
    }

    /// The completion names what the claims and the allocator disagree on: a block freed by
    /// the open transaction that a map still claims, and one past the floor that nothing
    /// used but a map claims.
    #[test]
    fn the_completion_reports_claims_the_allocator_contradicts() {
        let mut a = Allocator::loading(2, 0, 10);
        a.free(PBlock(4));
        let mut claims = Claimed::default();
        for b in [4, 6, 12] {
            claims.claim(PBlock(b));
        }
        let d = a.finish_loading(claims);
        assert_eq!(d.freed_but_claimed, vec![PBlock(4)]);
        assert_eq!(d.free_but_claimed, vec![PBlock(12)]);
        assert!(a.is_used(PBlock(12)) && a.is_used(PBlock(4)) && !a.is_used(PBlock(5)));
    }

    /// Issue 22's imported image: a loaded pool of millions of blocks, all mapped but a few,
    /// with a few written free blocks and a transaction's worth of fresh ones, costs its
    /// allocator the `used` bitmap (1 bit a block) and little more: what the free blocks'
    /// kinds and the fresh blocks cost follows how many there are, not the pool's size.
    #[test]
    fn a_large_pool_with_few_free_or_fresh_blocks_costs_about_its_used_bitmap() {
        let (first, n) = (2u64, 4_000_000u64);
        let mut a = Allocator::loading(first, 0, n);
        let mut claims = Claimed::with_capacity(n);
        assert!(claims.claim_run(PBlock(first), n - first));
        assert_eq!(a.finish_loading(claims), Disagreements::default());
        for b in (1000..n).step_by(400_009) {
            a.free(PBlock(b));
        }
        a.committed();
        assert_eq!(a.written_free(), 10);
        a.alloc_run(1, 0).unwrap();
        for _ in 0..100 {
            a.alloc_run(256, 0).unwrap();
        }
        assert!(a.fresh_blocks().count() > 20_000);
        // A quarter more: the bitmap's room to grow (a sixteenth) and both sets.
        let used_bitmap = n / 8;
        assert!(
            a.heap_bytes() <= used_bitmap + used_bitmap / 4,
            "{} bytes for {n} blocks, the used bitmap {used_bitmap}",
            a.heap_bytes()
        );
    }

    #[test]
    fn double_load_is_reported() {
        let mut c = Claimed::default();
        assert!(c.claim(PBlock(9)));
        assert!(!c.claim(PBlock(9)));
        let mut a = Allocator::loading(2, 0, 12);
        assert_eq!(
            a.free_runs(),
            vec![],
            "nothing is free below the floor while loading"
        );
        assert_eq!(a.finish_loading(c), Disagreements::default());
        assert_eq!(a.free_runs(), vec![(PBlock(2), 7)]);
        assert_eq!((a.extent(), a.used_count()), (10, 1));
    }
}
