//! Metadata streams: reading and writing the superblocks, the checkpoint and the log.
//!
//! The durable state is: the newest valid superblock slot → a checkpoint stream (the whole
//! catalogue) plus a log stream (the transactions since). The steps that move it from one
//! generation to the next are `commit.rs`'s; this file writes and reads what they name.

use super::alloc::Allocator;
use super::records::{StreamPages, StreamRecords};
use super::storage::Storage;
use super::sums::{SumPages, DEFAULT_BUDGET};
use crate::error::{Error, Result};
use crate::format::checksum::Kind;
use crate::format::page::{self, PageHeader, PAYLOAD_MAX};
use crate::format::record::{IndexEntry, Record, RecordWriter, TAG_CHECKSUM_PAGES, TAG_MAP_INDEX};
use crate::format::superblock::{StreamRef, Superblock};
use crate::format::{first_data_block, PBlock, PAGE_SIZE, SUPERBLOCK_OFFSETS};

/// The committed metadata streams and the blocks they occupy.
pub struct MetaStreams {
    /// The committed state: as the newest superblock on disk names it, plus the log commits
    /// made since (whose pages follow `log_next` of that superblock, §5.5). `generation` is
    /// the on-disk superblock's.
    pub sb: Superblock,
    /// Blocks of the checkpoint, its checksum pages' included.
    pub ckpt_blocks: Vec<PBlock>,
    /// Blocks of the log, including the one holding the reserved next page.
    pub log_blocks: Vec<PBlock>,
    /// The checkpoint's checksum stream (FORMAT.md §5.6), read on demand through its cache.
    sums: std::sync::Arc<SumPages>,
    pages_per_block: u64,
    /// Log pages the on-disk superblock names; the rest of `sb.log.pages` are its tail.
    named_log_pages: u64,
    /// The number the next commit's pages carry.
    next_commit: u64,
}

/// What a superblock's streams hold, read and verified.
pub struct Recovered<'a> {
    /// The superblock with the log tail's commits counted in (`log.pages`, `log_next`,
    /// `log_commit`).
    pub sb: Superblock,
    /// The checkpoint's records past its checksum pages records, read and verified page by
    /// page as they are replayed (`replay_checkpoint`).
    pub checkpoint: StreamRecords<'a>,
    /// The page numbers of the checkpoint's checksum stream: its map runs' crcs (FORMAT.md
    /// §5.6), read on demand (`SumPages`), each page verified before use.
    pub sums_pages: Vec<u64>,
    /// The checkpoint's map index (FORMAT.md §6.3.4), checked for order and bounds: where
    /// each range of each layer's map records starts. Empty for a checkpoint without maps
    /// (or of version 6, which `migrate` loads).
    pub index: Vec<IndexEntry>,
    /// Those pages, read through their cache (the replay of the checkpoint reads the crcs
    /// of runs the maps cannot keep as positions).
    pub sums: std::sync::Arc<SumPages>,
    pub log: Vec<u8>,
    /// The checkpoint's blocks, its checksum pages' included (its own pages' once
    /// `replay_checkpoint` has read them).
    pub ckpt_blocks: Vec<PBlock>,
    pub log_blocks: Vec<PBlock>,
    /// Log pages the superblock itself names.
    pub named_log_pages: u64,
    /// The last tail commit, left out because a data block it maps does not hold what its
    /// map entry's crc says: its data never all reached the disk (§5.5).
    pub dropped_commit: Option<u64>,
}

impl Recovered<'_> {
    /// Hands each of the checkpoint's records (past its checksum pages and index records) to
    /// `apply`, with where it starts in the stream, reading and verifying its pages as it goes;
    /// then its pages' blocks join `ckpt_blocks`. Damage is `Error::Corrupt` naming the page or
    /// the record's position in the stream.
    pub fn replay_checkpoint(
        &mut self,
        mut apply: impl FnMut(u64, Record) -> Result<()>,
    ) -> Result<()> {
        loop {
            let at = self.checkpoint.position();
            let Some(record) = self.checkpoint.next_record()? else {
                break;
            };
            apply(at, record)?;
        }
        let mut blocks = self.checkpoint.take_blocks();
        blocks.append(&mut self.ckpt_blocks);
        self.ckpt_blocks = blocks;
        Ok(())
    }
}

impl Recovered<'_> {
    /// Hands the checkpoint's records before its maps (past its checksum pages and index
    /// records) to `apply`, and leaves the maps, the ranges of its index, on disk: a lazy
    /// open (DESIGN.md §12 item 3b). A map record there is damage.
    pub fn replay_head(&mut self, mut apply: impl FnMut(Record) -> Result<()>) -> Result<()> {
        let end = self.index.first().map_or(u64::MAX, |e| e.position());
        self.checkpoint.set_end(end);
        loop {
            let at = self.checkpoint.position();
            let Some(record) = self.checkpoint.next_record()? else {
                break;
            };
            if record.map_span().is_some() {
                return Err(Error::Corrupt(format!(
                    "checkpoint, byte {at}: a map record before the map index's first range"
                )));
            }
            apply(record)?;
        }
        let mut blocks = self.checkpoint.take_blocks();
        blocks.append(&mut self.ckpt_blocks);
        self.ckpt_blocks = blocks;
        Ok(())
    }
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(what, e)
}

/// A superblock slot that did not decode: its number and why.
pub type BadSlot = (usize, Error);

/// Both superblock slots, valid ones newest first, plus the invalid ones.
pub fn read_superblocks(storage: &dyn Storage) -> Result<(Vec<Superblock>, Vec<BadSlot>)> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (slot, b) in read_slots(storage)?.iter().enumerate() {
        match Superblock::decode(b, slot) {
            Ok(sb) => good.push(sb),
            Err(e) => bad.push((slot, e)),
        }
    }
    good.sort_by_key(|sb| std::cmp::Reverse(sb.generation));
    Ok((good, bad))
}

/// The valid slots of every version `thinlayer migrate` converts, newest first, with their
/// versions (FORMAT.md §11).
pub fn read_superblocks_any(storage: &dyn Storage) -> Result<Vec<(u32, Superblock)>> {
    let slots = read_slots(storage)?;
    let mut good: Vec<(u32, Superblock)> = (0..slots.len())
        .filter_map(|slot| Superblock::decode_any(&slots[slot], slot).ok())
        .collect();
    good.sort_by_key(|(_, sb)| std::cmp::Reverse(sb.generation));
    Ok(good)
}

fn read_slots(storage: &dyn Storage) -> Result<[[u8; PAGE_SIZE]; 2]> {
    let mut slots = [[0u8; PAGE_SIZE]; 2];
    for (b, &off) in slots.iter_mut().zip(SUPERBLOCK_OFFSETS.iter()) {
        storage
            .read_at(b, off)
            .map_err(io_err("reading superblock"))?;
    }
    Ok(slots)
}

/// Read and verify one stream; returns its bytes, its blocks, and the last page's `next`.
fn read_stream(
    storage: &dyn Storage,
    kind: Kind,
    r: &StreamRef,
    pages_per_block: u64,
) -> Result<(Vec<u8>, Vec<PBlock>, u64)> {
    // Sized once, but never past what the file can hold: the count comes from disk.
    let file_pages = storage.len().map_err(io_err("sizing pool"))? / PAGE_SIZE as u64;
    let mut bytes = Vec::with_capacity(r.pages.min(file_pages) as usize * PAYLOAD_MAX);
    let mut pages = StreamPages::new(storage, kind, r, pages_per_block);
    while let Some(p) = pages.next_payload()? {
        bytes.extend_from_slice(p);
    }
    let next = if r.pages > 0 { pages.next_page() } else { 0 };
    Ok((bytes, pages.take_blocks(), next))
}

/// The checkpoint stream's bytes whole, every page verified: for tools and tests that look
/// at its records (an open replays them through `Recovered::replay_checkpoint` instead).
pub fn checkpoint_bytes(storage: &dyn Storage, sb: &Superblock) -> Result<Vec<u8>> {
    let ppb = sb.block_size as u64 / PAGE_SIZE as u64;
    Ok(read_stream(storage, Kind::CheckpointPage, &sb.checkpoint, ppb)?.0)
}

/// The checksum pages the checkpoint's leading checksum pages records name (FORMAT.md §5.6),
/// read off the front of its records. The pages are not read here: a run's crcs are read when
/// its blocks are (`SumPages`, which verifies each page first), and `check` reads them all.
/// Their blocks join `blocks`.
fn sums_pages(
    sb: &Superblock,
    checkpoint: &mut StreamRecords,
    ppb: u64,
    blocks: &mut Vec<PBlock>,
) -> Result<Vec<u64>> {
    let mut pages = Vec::new();
    while checkpoint.peek_tag()? == Some(TAG_CHECKSUM_PAGES) {
        if let Some(Record::ChecksumPages(p)) = checkpoint.next_record()? {
            pages.extend(p);
        }
    }
    let first_page = crate::format::RESERVED_BYTES / PAGE_SIZE as u64;
    for (seq, &page_no) in pages.iter().enumerate() {
        if page_no < first_page || page_no >= (1u64 << 52) {
            return Err(Error::Corrupt(format!(
                "checkpoint {}: checksum page {seq} at impossible page number {page_no}",
                sb.checkpoint.id
            )));
        }
        let block = PBlock(page_no / ppb);
        if blocks.last() != Some(&block) {
            blocks.push(block);
        }
    }
    Ok(pages)
}

/// The map index records that follow the checksum pages records (FORMAT.md §6.3.4), read off
/// the front of the checkpoint's records and checked as one list: sorted by layer and block,
/// positions rising, each past the index itself, in a page the checkpoint has, at a page number
/// that can be one. That a range's records are there and of its layer is checked as they are
/// applied (`pool::index::Walk`).
fn map_index(sb: &Superblock, checkpoint: &mut StreamRecords) -> Result<Vec<IndexEntry>> {
    let mut index: Vec<IndexEntry> = Vec::new();
    while checkpoint.peek_tag()? == Some(TAG_MAP_INDEX) {
        if let Some(Record::MapIndex(part)) = checkpoint.next_record()? {
            if let (Some(a), Some(b)) = (index.last(), part.first()) {
                if (a.layer, a.vblock) >= (b.layer, b.vblock) || a.position() >= b.position() {
                    return Err(Error::Corrupt(format!(
                        "checkpoint {}: map index entries out of order at {b:?}",
                        sb.checkpoint.id
                    )));
                }
            }
            index.extend(part);
        }
    }
    let after = checkpoint.position();
    let first_page = crate::format::RESERVED_BYTES / PAGE_SIZE as u64;
    if let Some(bad) = index.iter().find(|e| {
        e.position() < after
            || e.seq as u64 >= sb.checkpoint.pages
            || e.page < first_page
            || e.page >= 1 << 52
    }) {
        return Err(Error::Corrupt(format!(
            "checkpoint {}: map index entry {bad:?} names no place among its {} pages past the index (byte {after})",
            sb.checkpoint.id, sb.checkpoint.pages
        )));
    }
    Ok(index)
}

/// The records of range `i` of the checkpoint's map index `index` (FORMAT.md §6.3.4), read
/// from the page its entry names up to where the next range starts, each page verified as the
/// whole checkpoint's are: what loading part of the maps on demand reads.
pub fn range_records<'a>(
    storage: &'a dyn Storage,
    checkpoint: &StreamRef,
    ppb: u64,
    index: &[IndexEntry],
    i: usize,
) -> Result<StreamRecords<'a>> {
    let e = index[i];
    let (end, pages) = match index.get(i + 1) {
        Some(n) => (n.position(), (n.position() - 1) / PAYLOAD_MAX as u64 + 1),
        None => (u64::MAX, checkpoint.pages),
    };
    let at = (e.page, e.seq as u64, pages);
    let pages = StreamPages::from_page(storage, Kind::CheckpointPage, checkpoint, ppb, at);
    StreamRecords::range(pages, e.offset as usize, end)
}

/// Read the streams a superblock points to: the log and its tail whole, the checkpoint up to
/// its checksum pages and map index records (its other records are read as they are
/// replayed: `Recovered::replay_checkpoint`).
pub fn load<'a>(storage: &'a dyn Storage, sb: &Superblock) -> Result<Recovered<'a>> {
    let ppb = sb.block_size as u64 / PAGE_SIZE as u64;
    let pages = StreamPages::new(storage, Kind::CheckpointPage, &sb.checkpoint, ppb);
    let mut checkpoint = StreamRecords::new(pages);
    let mut ckpt_blocks = Vec::new();
    let sums_pages = sums_pages(sb, &mut checkpoint, ppb, &mut ckpt_blocks)?;
    let index = map_index(sb, &mut checkpoint)?;
    let (log, mut log_blocks, last_next) = read_stream(storage, Kind::LogPage, &sb.log, ppb)?;
    let expect_next = if sb.log.pages > 0 {
        last_next
    } else {
        sb.log.head
    };
    if expect_next != sb.log_next {
        return Err(Error::Corrupt(format!(
            "superblock generation {}: log ends at page {expect_next} but the superblock reserves page {}",
            sb.generation, sb.log_next
        )));
    }
    let mut tail = read_tail(storage, sb)?;
    let mut dropped_commit = None;
    if let Some(last) = tail.last() {
        if !last.data_durable(storage, sb.block_size)? {
            dropped_commit = Some(last.number);
            tail.pop();
        }
    }
    let mut full = sb.clone();
    let mut log = log;
    for c in &tail {
        log.extend_from_slice(&c.bytes);
        for &p in &c.pages {
            let block = PBlock(p / ppb);
            if log_blocks.last() != Some(&block) {
                log_blocks.push(block);
            }
        }
        full.log.pages += c.pages.len() as u64;
        full.log_next = c.next;
        full.log_commit = c.number;
    }
    let next_block = PBlock(full.log_next / ppb);
    if !log_blocks.contains(&next_block) {
        log_blocks.push(next_block);
    }
    let sums = SumPages::new(sb.checkpoint.id, sums_pages.clone(), ppb, DEFAULT_BUDGET);
    Ok(Recovered {
        sb: full,
        checkpoint,
        sums: std::sync::Arc::new(sums),
        sums_pages,
        index,
        log,
        ckpt_blocks,
        log_blocks,
        named_log_pages: sb.log.pages,
        dropped_commit,
    })
}

/// One commit found in the log's tail: its record bytes, its pages, the page reserved after
/// it, and its number.
struct TailCommit {
    bytes: Vec<u8>,
    pages: Vec<u64>,
    next: u64,
    number: u64,
}

/// Read the log forward from the page the superblock reserves, as far as whole commits go
/// (§5.5): each page must verify as the log's next page (`log.id`, `seq`), belong to the
/// commit being read or start a commit numbered above the last one, and a commit counts only
/// once its page flagged as the commit's end is read. The first page that fails ends the log.
fn read_tail(storage: &dyn Storage, sb: &Superblock) -> Result<Vec<TailCommit>> {
    let first_page = crate::format::RESERVED_BYTES / PAGE_SIZE as u64;
    let file_pages = storage.len().map_err(io_err("sizing pool"))? / PAGE_SIZE as u64;
    let mut commits = Vec::new();
    let mut page_no = sb.log_next;
    let mut seq = sb.log.pages;
    let mut last = sb.log_commit;
    let mut open: Option<TailCommit> = None;
    let mut buf = [0u8; PAGE_SIZE];
    while page_no >= first_page && page_no < file_pages && seq < u32::MAX as u64 {
        storage
            .read_at(&mut buf, page_no * PAGE_SIZE as u64)
            .map_err(io_err("reading metadata page"))?;
        let Ok(h) = page::decode(&buf, page_no, Kind::LogPage, sb.log.id, seq as u32) else {
            break;
        };
        let c = match open.take() {
            Some(c) if c.number == h.commit => c,
            Some(_) => break,
            None if h.commit > last => TailCommit {
                bytes: Vec::new(),
                pages: Vec::new(),
                next: 0,
                number: h.commit,
            },
            None => break,
        };
        let mut c = c;
        c.bytes.extend_from_slice(page::payload(&buf, &h));
        c.pages.push(page_no);
        c.next = h.next;
        seq += 1;
        page_no = h.next;
        if h.flags & page::FLAG_COMMIT_END != 0 {
            last = c.number;
            commits.push(c);
        } else {
            open = Some(c);
        }
    }
    Ok(commits)
}

impl TailCommit {
    /// Whether every data block the commit maps holds what its map entry's crc says. The
    /// pages and the data of a one-sync commit share one sync, so after a power loss its
    /// pages can be on disk without all its data; a later commit's pages are written only
    /// after that sync returned, so only the last commit of the tail needs this.
    fn data_durable(&self, storage: &dyn Storage, block_size: u32) -> Result<bool> {
        use crate::format::record::{MapTarget, Record, RecordReader};
        use std::collections::BTreeMap;
        // Only what the commit leaves mapped: a block it wrote and then changed again (in
        // place, while fresh) or freed and reused holds its last content, not its first.
        let mut last = BTreeMap::new();
        let mut r = RecordReader::new(&self.bytes, "log");
        loop {
            match r.next_record() {
                Ok(Some(Record::Map { layer, entries })) => {
                    for e in entries {
                        last.insert((layer, e.vblock), e.target);
                    }
                }
                Ok(Some(Record::MapRun { layer, run })) => {
                    for e in run.entries() {
                        last.insert((layer, e.vblock), e.target);
                    }
                }
                Ok(Some(Record::LayerRemove(id))) => last.retain(|&(l, _), _| l != id),
                Ok(Some(_)) => {}
                Ok(None) => break,
                // Pages that verify but records that do not decode: not a state to build on.
                Err(_) => return Ok(false),
            }
        }
        let bs = block_size as u64;
        let len = storage.len().map_err(io_err("sizing pool"))?;
        let mut block = vec![0u8; block_size as usize];
        for target in last.into_values() {
            let MapTarget::Data { pblock, crc } = target else {
                continue;
            };
            let at = pblock.0.saturating_mul(bs);
            if at.saturating_add(bs) > len {
                return Ok(false);
            }
            storage
                .read_at(&mut block, at)
                .map_err(io_err("reading a data block of the log's last commit"))?;
            if crate::format::checksum::data(&block) != crc {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl MetaStreams {
    /// Write the superblocks of a new, empty pool.
    pub fn init(
        storage: &dyn Storage,
        alloc: &mut Allocator,
        block_size: u32,
        max_blocks: u64,
        pool_id: u64,
        created_secs: u64,
    ) -> Result<MetaStreams> {
        let ppb = block_size as u64 / PAGE_SIZE as u64;
        let (log_block, _) = alloc
            .alloc_run(1, 0)
            .ok_or_else(|| Error::NoSpace(alloc.full_message()))?;
        debug_assert_eq!(log_block.0, first_data_block(block_size));
        let head = log_block.0 * ppb;
        let sb = Superblock {
            generation: 1,
            block_size,
            max_blocks,
            checkpoint: StreamRef::default(),
            log: StreamRef {
                head,
                pages: 0,
                id: 1,
            },
            log_next: head,
            pool_id,
            created_secs,
            log_commit: 0,
        };
        let mut old = sb.clone();
        old.generation = 0;
        write_superblock(storage, &old)?;
        write_superblock(storage, &sb)?;
        storage.sync().map_err(io_err("syncing new pool"))?;
        alloc.committed();
        Ok(MetaStreams {
            sb,
            ckpt_blocks: Vec::new(),
            log_blocks: vec![log_block],
            sums: std::sync::Arc::new(SumPages::new(0, Vec::new(), ppb, DEFAULT_BUDGET)),
            pages_per_block: ppb,
            named_log_pages: 0,
            next_commit: 1,
        })
    }

    pub fn from_recovered(r: &Recovered) -> MetaStreams {
        let ppb = r.sb.block_size as u64 / PAGE_SIZE as u64;
        MetaStreams {
            sb: r.sb.clone(),
            ckpt_blocks: r.ckpt_blocks.clone(),
            log_blocks: r.log_blocks.clone(),
            sums: r.sums.clone(),
            pages_per_block: ppb,
            named_log_pages: r.named_log_pages,
            // Not + 1: a commit cut off by the crash may have used that number, and its pages
            // may lie where the next commit's pages go (§5.5).
            next_commit: r.sb.log_commit + 2,
        }
    }

    /// Whether the log has commits the on-disk superblock does not name.
    pub fn has_tail(&self) -> bool {
        self.sb.log.pages > self.named_log_pages
    }

    /// Writable-open step of §5.5. A page left on the reserved page by a commit the crash
    /// cut off (one that verifies as the log's next page) is overwritten with zeros, so it can
    /// never be read as the log's continuation should the next commit's first page not reach
    /// the disk. And a tail is synced, so the state just loaded (read back from the page cache
    /// after a killed process, perhaps) is on disk before anything builds on it.
    pub fn settle_tail(&self, storage: &dyn Storage) -> Result<()> {
        let at = self.sb.log_next * PAGE_SIZE as u64;
        let mut buf = [0u8; PAGE_SIZE];
        storage
            .read_at(&mut buf, at)
            .map_err(io_err("reading the log's reserved page"))?;
        let (id, seq) = (self.sb.log.id, self.sb.log.pages as u32);
        let stale = page::decode(&buf, self.sb.log_next, Kind::LogPage, id, seq).is_ok();
        if stale {
            storage
                .write_at(&[0u8; PAGE_SIZE], at)
                .map_err(io_err("clearing the log's reserved page"))?;
        }
        if stale || self.has_tail() {
            storage
                .sync()
                .map_err(io_err("syncing the recovered log"))?;
        }
        Ok(())
    }

    /// Write a superblock naming the whole committed state, tail included (on close, so the
    /// next open reads no tail).
    pub fn name_tail(&mut self, storage: &dyn Storage) -> Result<()> {
        if !self.has_tail() {
            return Ok(());
        }
        let mut sb = self.sb.clone();
        sb.generation += 1;
        self.flip(storage, sb)
    }

    pub fn metadata_blocks(&self) -> u64 {
        (self.ckpt_blocks.len() + self.log_blocks.len()) as u64
    }

    pub fn log_pages(&self) -> u64 {
        self.sb.log.pages
    }

    /// Pages of the checkpoint, its checksum pages included: what writing it again costs.
    pub fn checkpoint_pages(&self) -> u64 {
        self.sb.checkpoint.pages + self.sums.pages().len() as u64
    }

    /// The checkpoint's checksum stream, which paged map runs' crcs are read from.
    pub fn sums(&self) -> &std::sync::Arc<SumPages> {
        &self.sums
    }

    /// Step 1 of a log commit: write `records` as log pages after the committed ones, the
    /// last flagged as the commit's end, and return the state that names them. With
    /// `superblock` the commit is made durable the two-sync way, a superblock naming the pages
    /// (§5.5: big commits, whose data would take long to verify after a crash); otherwise the
    /// pages are found by reading the log forward. Nothing durable changes: the pages lie past
    /// the committed end of the log, and the page they start on was cleared or is unreadable
    /// as this commit's (a lower number). `None`: no room for the pages. On error or `None`
    /// the blocks taken for pages are given back. `announce` hears the commit's position
    /// (`Commit::position`) before the first page is written: see `Pool::stage`.
    pub fn stage_log(
        &mut self,
        storage: &dyn Storage,
        alloc: &mut Allocator,
        records: &[u8],
        superblock: bool,
        announce: &mut dyn FnMut((u64, u64)),
    ) -> Result<Option<Staged>> {
        debug_assert!(!records.is_empty());
        let chunks: Vec<&[u8]> = records.chunks(PAYLOAD_MAX).collect();
        let mut new_blocks = Vec::new();
        // Each page's successor is reserved before the page is written, so the chain is known.
        let mut pages = Vec::with_capacity(chunks.len() + 1);
        pages.push(self.sb.log_next);
        for _ in 0..chunks.len() {
            let last = *pages.last().unwrap();
            match self.page_after(last, alloc) {
                Some((p, Some(b))) => {
                    new_blocks.push(b);
                    pages.push(p);
                }
                Some((p, None)) => pages.push(p),
                None => {
                    for b in new_blocks {
                        alloc.free(b);
                    }
                    return Ok(None);
                }
            }
        }
        announce((self.sb.log.id, self.next_commit));
        let mut buf = [0u8; PAGE_SIZE];
        let written = (|| {
            for (i, chunk) in chunks.iter().enumerate() {
                let end = i + 1 == chunks.len();
                let h = PageHeader {
                    kind: Kind::LogPage,
                    stream_id: self.sb.log.id,
                    seq: (self.sb.log.pages + i as u64) as u32,
                    payload_len: chunk.len() as u32,
                    next: pages[i + 1],
                    commit: self.next_commit,
                    flags: if end { page::FLAG_COMMIT_END } else { 0 },
                };
                page::encode(&h, chunk, &mut buf);
                storage
                    .write_at(&buf, pages[i] * PAGE_SIZE as u64)
                    .map_err(io_err("writing log page"))?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            for b in new_blocks {
                alloc.free(b);
            }
            return Err(e);
        }
        let mut sb = self.sb.clone();
        if superblock {
            sb.generation += 1;
        }
        sb.log.pages += chunks.len() as u64;
        sb.log_next = *pages.last().unwrap();
        sb.log_commit = self.next_commit;
        Ok(Some(Staged {
            sb,
            new_log_blocks: new_blocks,
            new_checkpoint: None,
            superblock,
        }))
    }

    /// Step 1 of a checkpoint commit: write the checkpoint `w` holds into new blocks, with a
    /// new empty log after it, and return the superblock that will name them. The crcs its
    /// map runs and singles name by position (`w.sums()`, `RecordWriter::for_checkpoint`) go
    /// into checksum pages in blocks of their own, which checksum pages records at the
    /// checkpoint's start name (FORMAT.md §5.6); after them, the map index (§6.3.4) says where
    /// each range of the maps `w.ranges()` marked starts, by page, seq and offset, which are
    /// known once the pages are chosen (the records before the maps have a known length). All
    /// of it is written before the sync and the superblock that name it (commit steps 2-4),
    /// like any checkpoint page. `None`: no room. `announce` as for `stage_log`.
    pub fn stage_checkpoint(
        &mut self,
        storage: &dyn Storage,
        alloc: &mut Allocator,
        w: &RecordWriter,
        announce: &mut dyn FnMut((u64, u64)),
    ) -> Result<Option<Staged>> {
        let (checkpoint, sums) = (&w.buf[..], w.sums());
        let ppb = self.pages_per_block;
        // A checksum page's payload is exactly `SUMS_PER_PAGE` crcs.
        let sum_bytes: Vec<u8> = sums.iter().flat_map(|c| c.to_le_bytes()).collect();
        let sum_chunks: Vec<&[u8]> = sum_bytes.chunks(PAYLOAD_MAX).collect();
        let sum_blocks = (sum_chunks.len() as u64).div_ceil(ppb) as usize;
        let head_len = RecordWriter::checksum_pages_len(sum_chunks.len())
            + RecordWriter::map_index_len(w.ranges().len());
        let ckpt_pages = (head_len + checkpoint.len()).div_ceil(PAYLOAD_MAX).max(1);
        let want_blocks = sum_blocks as u64 + (ckpt_pages as u64).div_ceil(ppb) + 1;
        let mut blocks: Vec<PBlock> = Vec::new();
        while (blocks.len() as u64) < want_blocks {
            match alloc.alloc_run(want_blocks - blocks.len() as u64, 0) {
                Some((p, n)) => blocks.extend((p.0..p.0 + n).map(PBlock)),
                None => {
                    for &b in &blocks {
                        alloc.free(b);
                    }
                    return Ok(None);
                }
            }
        }
        let log_block = blocks.pop().unwrap();
        let pages_of = |bs: &[PBlock], n: usize| -> Vec<u64> {
            bs.iter()
                .flat_map(|&b| b.0 * ppb..(b.0 + 1) * ppb)
                .take(n)
                .collect()
        };
        let sum_pages = pages_of(&blocks[..sum_blocks], sum_chunks.len());
        let pages = pages_of(&blocks[sum_blocks..], ckpt_pages);
        // The checksum pages records first, so a reader has the crcs before any run, then
        // the index, so a reader knows where the maps are before it meets them.
        let index: Vec<IndexEntry> = w
            .ranges()
            .iter()
            .map(|&(layer, vblock, at)| {
                let pos = head_len + at;
                let seq = pos / PAYLOAD_MAX;
                IndexEntry {
                    layer,
                    vblock,
                    page: pages[seq],
                    seq: seq as u32,
                    offset: (pos % PAYLOAD_MAX) as u32,
                }
            })
            .collect();
        let joined;
        let bytes: &[u8] = if head_len == 0 {
            checkpoint
        } else {
            let mut h = RecordWriter::new();
            h.checksum_pages(&sum_pages);
            h.map_index(&index);
            debug_assert_eq!(h.buf.len(), head_len);
            h.buf.extend_from_slice(checkpoint);
            joined = h.buf;
            &joined
        };
        let chunks: Vec<&[u8]> = if bytes.is_empty() {
            vec![&[][..]]
        } else {
            bytes.chunks(PAYLOAD_MAX).collect()
        };
        debug_assert_eq!(chunks.len(), pages.len());
        let id = self.sb.generation + 1;
        announce((id, self.next_commit));
        let commit = self.next_commit;
        let written = write_pages(
            storage,
            Kind::ChecksumPage,
            id,
            commit,
            &sum_pages,
            &sum_chunks,
        )
        .and_then(|()| write_pages(storage, Kind::CheckpointPage, id, commit, &pages, &chunks));
        if let Err(e) = written {
            for &b in blocks.iter().chain(std::iter::once(&log_block)) {
                alloc.free(b);
            }
            return Err(e);
        }
        let mut sb = self.sb.clone();
        sb.generation += 1;
        sb.checkpoint = StreamRef {
            head: pages[0],
            pages: chunks.len() as u64,
            id,
        };
        sb.log = StreamRef {
            head: log_block.0 * ppb,
            pages: 0,
            id,
        };
        sb.log_next = log_block.0 * ppb;
        sb.log_commit = self.next_commit;
        Ok(Some(Staged {
            sb,
            new_log_blocks: vec![log_block],
            new_checkpoint: Some((blocks, sum_pages)),
            superblock: true,
        }))
    }

    /// Adopt a durable staged state (commit step 5). Returns the blocks of the streams it
    /// replaced (a checkpoint replaces both old streams; a log commit nothing), which nothing
    /// durable names any more.
    pub fn install(&mut self, staged: Staged) -> Vec<PBlock> {
        self.sb = staged.sb;
        self.next_commit = self.sb.log_commit + 1;
        if staged.superblock {
            self.named_log_pages = self.sb.log.pages;
        }
        match staged.new_checkpoint {
            None => {
                self.log_blocks.extend(staged.new_log_blocks);
                Vec::new()
            }
            Some((ckpt, sums_pages)) => {
                let budget = self.sums.budget();
                let (id, ppb) = (self.sb.checkpoint.id, self.pages_per_block);
                self.sums = std::sync::Arc::new(SumPages::new(id, sums_pages, ppb, budget));
                let mut old = std::mem::replace(&mut self.ckpt_blocks, ckpt);
                old.append(&mut self.log_blocks);
                self.log_blocks = staged.new_log_blocks;
                old
            }
        }
    }

    /// Rewrite the superblock slot that is damaged, stale-and-ahead, or torn, with the loaded
    /// state under a generation newer than any seen, so both slots are valid again and the
    /// generation keeps going up. The slot holding the loaded state is not touched.
    pub fn heal(&mut self, storage: &dyn Storage, newest_seen: u64) -> Result<()> {
        let mut gen = newest_seen.max(self.sb.generation) + 1;
        if gen % 2 == self.sb.generation % 2 {
            gen += 1;
        }
        let mut sb = self.sb.clone();
        sb.generation = gen;
        self.flip(storage, sb)
    }

    /// The page after `p` in the log: the next page of the same block, or a new block.
    fn page_after(&self, p: u64, alloc: &mut Allocator) -> Option<(u64, Option<PBlock>)> {
        if !(p + 1).is_multiple_of(self.pages_per_block) {
            return Some((p + 1, None));
        }
        let (b, _) = alloc.alloc_run(1, 0)?;
        Some((b.0 * self.pages_per_block, Some(b)))
    }

    /// Write `sb`, which names the whole committed state, and make it durable.
    fn flip(&mut self, storage: &dyn Storage, sb: Superblock) -> Result<()> {
        make_durable(storage, &sb)?;
        self.named_log_pages = sb.log.pages;
        self.sb = sb;
        Ok(())
    }
}

/// Write the pages of one stream of a checkpoint: page `i` holds `chunks[i]` at page number
/// `pages[i]` and chains to `pages[i + 1]` (0 after the last). Contiguous pages go out in one
/// write.
pub(super) fn write_pages(
    storage: &dyn Storage,
    kind: Kind,
    id: u64,
    commit: u64,
    pages: &[u64],
    chunks: &[&[u8]],
) -> Result<()> {
    let what = match kind {
        Kind::ChecksumPage => "writing checksum pages",
        _ => "writing checkpoint",
    };
    let mut run: Vec<u8> = Vec::new();
    let Some(&first) = pages.first() else {
        return Ok(());
    };
    let mut run_start = first;
    let mut buf = [0u8; PAGE_SIZE];
    for (i, chunk) in chunks.iter().enumerate() {
        let h = PageHeader {
            kind,
            stream_id: id,
            seq: i as u32,
            payload_len: chunk.len() as u32,
            next: pages.get(i + 1).copied().unwrap_or(0),
            commit,
            flags: 0,
        };
        page::encode(&h, chunk, &mut buf);
        if pages[i] != run_start + (run.len() / PAGE_SIZE) as u64 || run.len() >= 8 << 20 {
            storage
                .write_at(&run, run_start * PAGE_SIZE as u64)
                .map_err(io_err(what))?;
            run.clear();
            run_start = pages[i];
        }
        run.extend_from_slice(&buf);
    }
    storage
        .write_at(&run, run_start * PAGE_SIZE as u64)
        .map_err(io_err(what))
}

/// A commit written but not yet sealed: the superblock that will name it and its new blocks.
pub struct Staged {
    pub sb: Superblock,
    new_log_blocks: Vec<PBlock>,
    /// For a checkpoint commit, the checkpoint's blocks (its checksum pages' included) and
    /// its checksum pages.
    new_checkpoint: Option<(Vec<PBlock>, Vec<u64>)>,
    /// Whether a superblock names the commit (steps 3-4), or only its pages (§5.5).
    superblock: bool,
}

impl Staged {
    /// Steps 2 to 4: see `make_durable`; a commit whose pages alone make it findable is one
    /// sync: its pages and its data go to disk together, and recovery checks the data of the
    /// last such commit against its map entries' crcs (§5.5).
    pub fn make_durable(&self, storage: &dyn Storage) -> Result<()> {
        if self.superblock {
            make_durable(storage, &self.sb)
        } else {
            // Power loss during this sync: any subset of the pages and data may be on disk;
            // recovery keeps the commit only if all its pages verify up to the end flag and
            // all its data matches its crcs.
            storage.sync().map_err(io_err("syncing log and data"))
        }
    }
}

/// Steps 2 to 4 of a superblock commit: sync what was written, then seal it with the next
/// superblock, then sync that. Needs only the storage, so callers can run it without holding
/// their locks.
pub fn make_durable(storage: &dyn Storage, sb: &Superblock) -> Result<()> {
    // Power loss before this sync: the old superblock still names the old streams, whose
    // pages this commit never touched.
    storage.sync().map_err(io_err("syncing metadata"))?;
    write_superblock(storage, sb)?;
    // Power loss before this sync: either slot may win on reopen; both describe complete
    // states, because everything the new one names is already durable.
    storage.sync().map_err(io_err("syncing superblock"))
}

fn write_superblock(storage: &dyn Storage, sb: &Superblock) -> Result<()> {
    let mut b = [0u8; PAGE_SIZE];
    b[..crate::format::superblock::ENCODED_LEN].copy_from_slice(&sb.encode());
    let off = SUPERBLOCK_OFFSETS[(sb.generation % 2) as usize];
    storage
        .write_at(&b, off)
        .map_err(io_err("writing superblock"))
}

#[cfg(test)]
mod tests {
    //! The rules that find the end of the log (FORMAT.md §5.5), page by page. Whole-store
    //! crash cases (torn, lost and reordered writes in a sync window) are tests/power_loss.rs.
    use super::*;
    use crate::format::record::{MapEntry, MapTarget, RecordWriter};
    use crate::format::{LayerId, VBlock};
    use crate::pool::MemStorage;

    const LOG_ID: u64 = 3;
    const FIRST: u64 = 10;

    /// A superblock whose named log is empty and ends at page FIRST, last commit 5.
    fn sb() -> Superblock {
        Superblock {
            generation: 4,
            block_size: 4096,
            max_blocks: 0,
            checkpoint: StreamRef::default(),
            log: StreamRef {
                head: FIRST,
                pages: 0,
                id: LOG_ID,
            },
            log_next: FIRST,
            pool_id: 1,
            created_secs: 0,
            log_commit: 5,
        }
    }

    /// Write log page `seq` (at page FIRST + seq, next = the page after) of commit `commit`.
    fn put(mem: &MemStorage, seq: u64, commit: u64, end: bool, payload: &[u8]) {
        let h = PageHeader {
            kind: Kind::LogPage,
            stream_id: LOG_ID,
            seq: seq as u32,
            payload_len: payload.len() as u32,
            next: FIRST + seq + 1,
            commit,
            flags: if end { page::FLAG_COMMIT_END } else { 0 },
        };
        let mut b = [0u8; PAGE_SIZE];
        page::encode(&h, payload, &mut b);
        mem.write_at(&b, (FIRST + seq) * PAGE_SIZE as u64).unwrap();
    }

    fn numbers(mem: &MemStorage) -> Vec<(u64, usize)> {
        mem.write_at(&[0u8; PAGE_SIZE], 63 * PAGE_SIZE as u64)
            .unwrap();
        read_tail(mem, &sb())
            .unwrap()
            .iter()
            .map(|c| (c.number, c.pages.len()))
            .collect()
    }

    #[test]
    fn whole_commits_are_read_up_to_the_first_page_that_does_not_continue_the_log() {
        let mem = MemStorage::new();
        put(&mem, 0, 6, false, b"a");
        put(&mem, 1, 6, true, b"b");
        put(&mem, 2, 8, true, b"c");
        // Left by an older commit: a lower number than the last one read ends the log.
        put(&mem, 3, 7, true, b"d");
        assert_eq!(numbers(&mem), [(6, 2), (8, 1)]);
    }

    #[test]
    fn a_commit_without_its_end_page_is_not_read() {
        let mem = MemStorage::new();
        put(&mem, 0, 6, true, b"a");
        put(&mem, 1, 7, false, b"b");
        // Page 2 never reached the disk.
        assert_eq!(numbers(&mem), [(6, 1)]);
        // Torn: written, but its crc fails.
        put(&mem, 2, 7, true, b"c");
        let mut b = [0u8; PAGE_SIZE];
        mem.read_at(&mut b, (FIRST + 2) * PAGE_SIZE as u64).unwrap();
        b[600] ^= 1;
        mem.write_at(&b, (FIRST + 2) * PAGE_SIZE as u64).unwrap();
        assert_eq!(numbers(&mem), [(6, 1)]);
    }

    /// Why a reopened pool numbers its next commit two past the last one read: a commit cut
    /// off by the crash (6, pages 1-2 on disk, page 0 lost) keeps its pages where the next
    /// commit's go. The next commit loses its second page in another crash: the stale end page
    /// of 6 must not complete it, so it must not be numbered 6.
    #[test]
    fn pages_of_a_lost_commit_never_complete_a_later_one() {
        let mem = MemStorage::new();
        put(&mem, 1, 6, false, b"x");
        put(&mem, 2, 6, true, b"y");
        assert_eq!(numbers(&mem), []);
        let next = MetaStreams::from_recovered(&load(&mem, &sb()).unwrap()).next_commit;
        assert_eq!(next, 7);
        put(&mem, 0, next, false, b"a");
        assert_eq!(numbers(&mem), []);
        // Numbered 6 instead, it would have been completed by the lost commit's end page.
        put(&mem, 0, 6, false, b"a");
        assert_eq!(numbers(&mem), [(6, 3)]);
    }

    /// The last commit's data is checked against what it leaves mapped, not every entry it
    /// wrote on the way (a fresh block rewritten in place has a newer crc).
    #[test]
    fn data_check_uses_the_last_mapping_of_each_block() {
        let mem = MemStorage::new();
        let data = vec![7u8; 4096];
        mem.write_at(&data, 20 * 4096).unwrap();
        let mut w = RecordWriter::new();
        let entry = |crc| MapEntry {
            vblock: VBlock(1),
            target: MapTarget::Data {
                pblock: PBlock(20),
                crc,
            },
        };
        w.map(LayerId(1), entry(0xdead));
        w.map(LayerId(1), entry(crate::format::checksum::data(&data)));
        let c = TailCommit {
            bytes: w.buf.clone(),
            pages: vec![FIRST],
            next: FIRST + 1,
            number: 6,
        };
        assert!(c.data_durable(&mem, 4096).unwrap());
        // The block not on disk (a hole): the commit's data is not all there.
        mem.punch_hole(20 * 4096, 4096).unwrap();
        assert!(!c.data_durable(&mem, 4096).unwrap());
    }
}
