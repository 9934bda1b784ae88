//! The commit protocol, whole and in one place (docs/DESIGN.md §4): stage → seal → make
//! durable → install → release, and what a failure on the way means (poisoning).
//!
//! The store decides only *when* to commit and *what*: the open transaction's records, and how
//! to encode the whole catalogue should a checkpoint be due. Whether it is one, where its pages
//! go, which blocks become free and when, and when their space goes back to the filesystem are
//! decided here. The steps are split where the store must let go of its lock: steps 2-4 (the
//! syncs) need only the storage, so reads and writes go on while they run.

use super::alloc::{Allocator, Sealed};
use super::meta::{MetaStreams, Staged};
use super::storage::Storage;
use super::sums::{PagedRun, PagedSingles};
use crate::error::{Error, Result};
use crate::format::page::PAYLOAD_MAX;
use crate::format::record::{Record, RecordReader, RecordWriter};
use crate::format::{first_data_block, LayerId, PBlock, PAGE_SIZE};

/// Checkpoint when the log has grown past this many pages and past the checkpoint's own size.
pub const CHECKPOINT_MIN_LOG_PAGES: u64 = 1024;
/// A transaction with more record bytes than this (about 3200 map entries, 12 MiB of data at
/// 4 KiB blocks) commits the two-sync way, under a superblock: a one-sync commit's data is
/// read back and checked after a crash, and that read should stay short.
const ONE_SYNC_MAX_RECORD_BYTES: usize = 64 << 10;
/// Freed space is given back to the filesystem once this much more has gathered. Punching every
/// freed block at once would make each small commit change the file's extent map (costly
/// journal commits) and then reallocate the same blocks moments later.
const PUNCH_BATCH_BYTES: u64 = 4 << 20;
/// Only runs of at least this many free blocks are punched while the pool is open; shorter
/// ones (what random rewrites leave) are reused by the allocator soon enough, and punching them
/// one by one cost a live server seconds of fallocate calls per batch. They are punched when
/// the pool is closed, and at the next writable open.
const PUNCH_MIN_RUN: usize = 256;
/// Freed space kept in the file for reuse while the pool is open, whatever its runs: a write
/// into a freed block that the file still holds is an overwrite, which the next `fdatasync`
/// makes durable with the data alone; a write into a punched hole allocates host space
/// again, and that sync also writes the file's inode and extent blocks. Without it a
/// database's steady rewrites punched each old checkpoint and log (runs of hundreds of
/// blocks) only to fill the holes again within a second. The bound keeps the space win: at
/// most this much more than the pool uses stays in the file (besides short runs), and all of
/// it goes at close and at the next writable open.
pub const PUNCH_KEEP_BYTES: u64 = 64 << 20;

/// The pool file's state in memory: its committed metadata streams and its allocator, which
/// only the commit protocol moves from one generation to the next.
pub struct Pool {
    pub meta: MetaStreams,
    pub alloc: Allocator,
    block_size: u32,
    /// Set when a commit failed after writing: the durable state is unknown until reopen.
    poisoned: Option<String>,
    /// Log pages past which a commit writes a checkpoint (tests lower it to exercise that path).
    checkpoint_min_log_pages: u64,
    /// The next commit writes a checkpoint even if nothing is pending (`checkpoint_next`).
    checkpoint_due: bool,
    /// Free blocks whose space the file still holds (see PUNCH_BATCH_BYTES).
    unpunched: Vec<PBlock>,
    /// How many of them were kept back from the last batch (short runs, PUNCH_MIN_RUN, and
    /// the reserve, PUNCH_KEEP_BYTES).
    kept: usize,
    /// Freed space kept for reuse rather than punched while open (tests lower it).
    punch_keep_bytes: u64,
}

/// A commit between steps 1a and 5: its pages written, the transaction sealed, the superblock
/// that will name it not yet durable.
pub struct Commit {
    staged: Staged,
    sealed: Sealed,
    /// For a checkpoint, its map runs that keep their crcs in its checksum pages: what the
    /// maps page by once it is installed (`Commit::paged_runs`).
    paged: Option<Vec<(LayerId, PagedRun)>>,
    /// For a checkpoint, its map singles records (crcs in its checksum pages), sorted by
    /// layer and position.
    paged_singles: Vec<PagedSingles>,
}

impl Commit {
    /// Steps 2-4: sync the pages and data, write the next superblock, sync it (see
    /// `meta::make_durable` for the crash story of each). Needs only the storage, so the caller
    /// runs it without its locks.
    pub fn make_durable(&self, storage: &dyn Storage) -> Result<()> {
        self.staged.make_durable(storage)
    }

    /// Where the commit sits in the pool's history: its log's id and its number there. The
    /// pair only goes up from commit to commit (log ids are superblock generations), so a
    /// loaded pool includes this commit exactly when its own pair is at least this.
    pub fn position(&self) -> (u64, u64) {
        (self.staged.sb.log.id, self.staged.sb.log_commit)
    }

    /// For a checkpoint commit, its runs whose crcs are in its checksum pages, sorted by layer
    /// and block: once it is durable, the maps keep their positions instead of the crcs
    /// (`BlockMap::rebase`), before `Pool::finish` frees the old checkpoint's pages.
    pub fn paged_runs(&self) -> Option<&[(LayerId, PagedRun)]> {
        self.paged.as_deref()
    }

    /// For a checkpoint commit, its single data blocks whose crcs are in its checksum pages,
    /// as its map singles records (sorted by layer and position): paged by the maps with its
    /// runs (`BlockMap::rebase`).
    pub fn paged_singles(&self) -> &[PagedSingles] {
        &self.paged_singles
    }
}

impl Pool {
    pub fn new(meta: MetaStreams, alloc: Allocator, block_size: u32) -> Pool {
        Pool {
            meta,
            alloc,
            block_size,
            poisoned: None,
            checkpoint_min_log_pages: CHECKPOINT_MIN_LOG_PAGES,
            checkpoint_due: false,
            unpunched: Vec::new(),
            kept: 0,
            punch_keep_bytes: PUNCH_KEEP_BYTES,
        }
    }

    /// Refuse further changes once a commit failed midway: the durable state may be either
    /// generation, and only a reopen can tell which.
    pub fn usable(&self) -> Result<()> {
        match &self.poisoned {
            None => Ok(()),
            Some(why) => Err(Error::io(
                format!("pool unusable until reopened after an earlier failure: {why}"),
                std::io::Error::from_raw_os_error(libc::EIO),
            )),
        }
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    pub fn set_checkpoint_threshold(&mut self, pages: u64) {
        self.checkpoint_min_log_pages = pages;
    }

    /// How much freed space stays in the file for reuse while open (PUNCH_KEEP_BYTES).
    pub fn set_punch_keep(&mut self, bytes: u64) {
        self.punch_keep_bytes = bytes;
    }

    /// Make the next commit a checkpoint, even one with no changes: the whole catalogue is
    /// rewritten with this version's records (after `thinlayer migrate`, map runs).
    pub fn checkpoint_next(&mut self) {
        self.checkpoint_due = true;
    }

    /// Blocks held back from data so a commit of `pending` can always find room for its
    /// metadata.
    pub fn metadata_reserve(&self, pending: &RecordWriter) -> u64 {
        let ppb = (self.block_size as usize / PAGE_SIZE) as u64;
        let pages = (pending.buf.len() / PAYLOAD_MAX) as u64 + 2;
        8 + pages.div_ceil(ppb) * 2
    }

    /// Steps 1 and 1a, under the store's write lock. Step 1: write the transaction's records as
    /// log pages past the committed end of the log, or, when the log has grown long, the whole
    /// catalogue (`checkpoint` encodes it; None: none may be written now) as a checkpoint in
    /// fresh blocks. Step 1a: seal the
    /// transaction: `pending` is cleared and its blocks stop being fresh, so writes that come
    /// while the commit is made durable go to new blocks and never change what it names.
    ///
    /// `announce` hears where the commit will sit (`Commit::position`) before its first page is
    /// written, so the crash journal can say so first (DESIGN §10.1): a log commit's pages are
    /// part of the pool the moment they are in the file (the next open reads the log forward,
    /// §5.5), with or without the syncs of steps 2-4, so a server killed right after writing
    /// them must already have told the journal that this transaction is committed there. It
    /// is called again if a checkpoint finds no room and the commit goes to the log instead;
    /// a failure after it leaves no commit at that position, which a replay reads as such.
    ///
    /// `None`: nothing to commit. A full pool fails with `NoSpace` and keeps the transaction
    /// open (nothing was written). Any other failure poisons the pool.
    pub fn stage(
        &mut self,
        storage: &dyn Storage,
        pending: &mut RecordWriter,
        checkpoint: Option<impl FnOnce(&mut RecordWriter) -> Result<()>>,
        mut announce: impl FnMut((u64, u64)),
    ) -> Result<Option<Commit>> {
        self.usable()?;
        if pending.is_empty() && !self.checkpoint_due {
            return Ok(None);
        }
        let log_pages = self.meta.log_pages() + (pending.buf.len() / PAYLOAD_MAX) as u64;
        let want_checkpoint = self.checkpoint_due
            || log_pages
                > self
                    .checkpoint_min_log_pages
                    .max(self.meta.checkpoint_pages());
        // No checkpoint can be written now (`checkpoint` None: a lazily opened pool's maps
        // are not whole): the commit goes to the log, and the checkpoint to a later one.
        let checkpoint = checkpoint.filter(|_| want_checkpoint);
        let mut staged = Ok(None);
        let mut announced = None;
        let mut tell = |at| {
            announced = Some(at);
            announce(at)
        };
        let mut paged = None;
        let mut paged_singles = Vec::new();
        if let Some(checkpoint) = checkpoint {
            let mut w = RecordWriter::for_checkpoint();
            // Nothing is written yet: a crc that cannot be read (a damaged checksum page of
            // the old checkpoint) fails the commit and leaves the pool as it was.
            checkpoint(&mut w)?;
            // Whole records only: the singles it held back are written too.
            w.cut();
            let (runs, singles) = paged_records(&w.buf)?;
            paged = Some(runs);
            paged_singles = singles;
            staged = self
                .meta
                .stage_checkpoint(storage, &mut self.alloc, &w, &mut tell);
            if matches!(staged, Ok(Some(_))) {
                self.checkpoint_due = false;
            } else {
                paged = None;
                paged_singles = Vec::new();
            }
        }
        // Without room for a whole checkpoint, appending to the log still works (and a
        // checkpoint asked for with nothing pending waits for the next commit).
        if matches!(staged, Ok(None)) && pending.is_empty() {
            return Ok(None);
        }
        if matches!(staged, Ok(None)) {
            let superblock = pending.buf.len() > ONE_SYNC_MAX_RECORD_BYTES;
            staged = self.meta.stage_log(
                storage,
                &mut self.alloc,
                &pending.buf,
                superblock,
                &mut tell,
            );
        }
        match staged {
            Ok(Some(staged)) => {
                debug_assert_eq!(
                    announced,
                    Some((staged.sb.log.id, staged.sb.log_commit)),
                    "the position announced before the pages is where they went"
                );
                pending.clear();
                let sealed = self.alloc.seal();
                Ok(Some(Commit {
                    staged,
                    sealed,
                    paged,
                    paged_singles,
                }))
            }
            Ok(None) => Err(Error::NoSpace(format!(
                "committing metadata: {}",
                self.alloc.full_message()
            ))),
            Err(e) => {
                // Pages may be half-written past the log's end: harmless on disk (nothing
                // names them), but this process's view of the streams is no longer certain.
                self.poisoned = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Step 5, under the store's write lock again, with the outcome of steps 2-4: adopt the new
    /// generation and release the sealed transaction's frees (after a checkpoint, also every
    /// block of the streams it replaced). Once enough free space has gathered, it returns the
    /// blocks for step 6, reserved so nothing reuses them: the caller punches them without its
    /// lock (`Punch::run`; punching takes the file's own locks and can take long enough to
    /// stall every reader and writer) and then gives them back (`punched`).
    pub fn finish(
        &mut self,
        storage: &dyn Storage,
        c: Commit,
        durable: Result<()>,
    ) -> Result<Option<Punch>> {
        let _ = storage;
        if let Err(e) = durable {
            // The superblock may or may not have reached the disk: only a reopen can tell.
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        let replaced = self.meta.install(c.staged);
        let mut sealed = c.sealed;
        // Allocated by earlier transactions, so never fresh: they join the sealed frees.
        sealed.add_frees(replaced);
        let freed = self.alloc.release(sealed);
        self.unpunched.extend(freed);
        let bs = self.block_size as u64;
        if (self.unpunched.len() - self.kept) as u64 * bs < PUNCH_BATCH_BYTES {
            return Ok(None);
        }
        let keep = (self.punch_keep_bytes / bs) as usize;
        let (blocks, kept) = to_punch(self.take_unpunched(), keep);
        self.kept = kept.len();
        self.unpunched = kept;
        if blocks.is_empty() {
            return Ok(None);
        }
        self.alloc.reserve_for_punch(&blocks);
        Ok(Some(Punch {
            blocks,
            block_size: bs,
        }))
    }

    /// Step 6 done: the punched blocks may be allocated again.
    pub fn punched(&mut self, p: Punch) {
        self.alloc.punched(&p.blocks);
    }

    /// The gathered free blocks not reused since, sorted, once each.
    fn take_unpunched(&mut self) -> Vec<PBlock> {
        self.kept = 0;
        let mut blocks = std::mem::take(&mut self.unpunched);
        blocks.retain(|&b| !self.alloc.is_used(b));
        blocks.sort_unstable();
        blocks.dedup();
        blocks
    }

    /// On close: name the log's tail in a superblock, so the next open reads none (and checks
    /// no data), then punch out the gathered free blocks that have not been reused since
    /// (nothing else can allocate now).
    pub fn close(&mut self, storage: &dyn Storage) {
        if self.poisoned.is_some() {
            return;
        }
        // Failure costs nothing durable: the tail is found by reading forward anyway.
        let _ = self.meta.name_tail(storage);
        let blocks = self.take_unpunched();
        punch_runs(storage, &blocks, self.block_size as u64);
    }

    /// After a load completed later than the open (§5.4, `Allocator::finish_loading`): if the
    /// file holds more than the pool uses (a crash left bytes in blocks nothing references),
    /// every free block, reserved for punching without the store's lock as in step 6. What
    /// `recover` punches at once at an eager open, which no other writer can be waiting on.
    /// Transient memory: 8 bytes a free block.
    pub fn reserve_stale(&mut self, storage: &dyn Storage) -> Option<Punch> {
        let bs = self.block_size as u64;
        let in_use = (self.alloc.used_count() + first_data_block(self.block_size)) * bs;
        if storage.allocated().unwrap_or(0) <= in_use {
            return None;
        }
        let runs = self.alloc.free_runs();
        let blocks: Vec<PBlock> = runs
            .into_iter()
            .flat_map(|(s, n)| (s.0..s.0 + n).map(PBlock))
            .collect();
        if blocks.is_empty() {
            return None;
        }
        self.alloc.reserve_for_punch(&blocks);
        Some(Punch {
            blocks,
            block_size: bs,
        })
    }

    /// Writable-open housekeeping after a load (DESIGN §5.2, §5.4): rewrite a torn or damaged
    /// superblock slot, and give back the space of blocks that a lost (or rolled back)
    /// transaction wrote.
    pub fn recover(
        &mut self,
        storage: &dyn Storage,
        slot_damaged: bool,
        newest_seen: u64,
    ) -> Result<()> {
        self.meta.settle_tail(storage)?;
        if slot_damaged {
            // Write a good copy over the bad slot, so one more failure cannot leave no valid slot.
            self.meta.heal(storage, newest_seen)?;
        }
        let bs = self.block_size as u64;
        let in_use = (self.alloc.used_count() + first_data_block(self.block_size)) * bs;
        if storage.allocated().unwrap_or(0) > in_use {
            for (start, n) in self.alloc.free_runs() {
                let _ = storage.punch_hole(start.0 * bs, n * bs);
            }
            // Blocks past the last used one, written by a transaction that never committed.
            let end = self.alloc.extent() * bs;
            let len = storage.len().unwrap_or(0);
            if len > end {
                let _ = storage.punch_hole(end, len - end);
            }
        }
        Ok(())
    }
}

/// Split sorted free blocks into those to punch and those to keep: only runs of at least
/// PUNCH_MIN_RUN are punched, the highest first, and only until `keep` blocks are left (the
/// allocator looks low first, so the low ones are what it reuses next). Both sorted.
fn to_punch(sorted: Vec<PBlock>, keep: usize) -> (Vec<PBlock>, Vec<PBlock>) {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i + 1;
        while j < sorted.len() && sorted[j].0 == sorted[j - 1].0 + 1 {
            j += 1;
        }
        runs.push(i..j);
        i = j;
    }
    let mut left = sorted.len();
    let mut punch = vec![false; runs.len()];
    for (k, r) in runs.iter().enumerate().rev() {
        if left <= keep {
            break;
        }
        if r.len() >= PUNCH_MIN_RUN {
            punch[k] = true;
            left -= r.len();
        }
    }
    let (mut out, mut kept) = (Vec::new(), Vec::new());
    for (k, r) in runs.into_iter().enumerate() {
        if punch[k] { &mut out } else { &mut kept }.extend_from_slice(&sorted[r]);
    }
    (out, kept)
}

/// Free blocks reserved for step 6: their space goes back to the filesystem.
pub struct Punch {
    blocks: Vec<PBlock>,
    block_size: u64,
}

impl Punch {
    pub fn blocks(&self) -> &[PBlock] {
        &self.blocks
    }

    /// Punch the blocks out of the file. Needs no lock: they are reserved, so nothing can be
    /// written to them meanwhile, and nothing durable names them.
    pub fn run(&self, storage: &dyn Storage) {
        punch_runs(storage, &self.blocks, self.block_size);
    }
}

/// Give freed blocks' space back to the filesystem, one call per contiguous run.
fn punch_runs(storage: &dyn Storage, sorted: &[PBlock], bs: u64) {
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i + 1;
        while j < sorted.len() && sorted[j].0 == sorted[j - 1].0 + 1 {
            j += 1;
        }
        // Failure only costs space: nothing references these blocks any more.
        let _ = storage.punch_hole(sorted[i].0 * bs, (j - i) as u64 * bs);
        i = j;
    }
}

/// The map runs and map singles of checkpoint records `records` that name their crcs in its
/// checksum stream, sorted by layer and block (runs) and by layer and position (singles).
type PagedRecords = (Vec<(LayerId, PagedRun)>, Vec<PagedSingles>);
fn paged_records(records: &[u8]) -> Result<PagedRecords> {
    let (mut runs, mut singles) = (Vec::new(), Vec::new());
    let mut r = RecordReader::new(records, "checkpoint");
    while let Some(rec) = r.next_record()? {
        match PagedRun::of(rec) {
            Ok(run) => runs.push(run),
            Err(Record::MapSinglesSums {
                layer,
                sums_at,
                entries,
            }) => singles.push(PagedSingles {
                layer,
                sums_at,
                entries,
            }),
            Err(_) => {}
        }
    }
    runs.sort_unstable();
    singles.sort_unstable_by_key(|s| (s.layer, s.sums_at));
    Ok((runs, singles))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(runs: &[(u64, u64)]) -> Vec<PBlock> {
        runs.iter()
            .flat_map(|&(s, n)| (s..s + n).map(PBlock))
            .collect()
    }

    /// Only long runs are punched, the highest first, and only down to the reserve: the rest
    /// stays written for the allocator to reuse without allocating host space again.
    #[test]
    fn punching_keeps_a_reserve_of_the_lowest_free_blocks() {
        let free = blocks(&[(10, 300), (400, 5), (1000, 256), (2000, 300)]);
        // Reserve of 400 blocks: punching the top run (300) leaves 561 > 400, so the next long
        // run (256) goes too; the lowest long run and the short one stay.
        let (punch, kept) = to_punch(free.clone(), 400);
        assert_eq!(punch, blocks(&[(1000, 256), (2000, 300)]));
        assert_eq!(kept, blocks(&[(10, 300), (400, 5)]));
        // Everything fits the reserve: nothing is punched.
        assert_eq!(to_punch(free.clone(), 861), (vec![], free.clone()));
        // No reserve: every long run goes, short runs never while open.
        let (punch, kept) = to_punch(free, 0);
        assert_eq!(punch, blocks(&[(10, 300), (1000, 256), (2000, 300)]));
        assert_eq!(kept, blocks(&[(400, 5)]));
    }
}
