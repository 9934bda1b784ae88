//! Metadata streams: reading and writing the superblocks, the checkpoint and the log.
//!
//! The durable state is: the newest valid superblock slot → a checkpoint stream (the whole
//! catalogue) plus a log stream (the transactions since). The steps that move it from one
//! generation to the next are `commit.rs`'s; this file writes and reads what they name.

use super::alloc::Allocator;
use super::storage::Storage;
use crate::error::{Error, Result};
use crate::format::checksum::Kind;
use crate::format::page::{self, PageHeader, PAYLOAD_MAX};
use crate::format::superblock::{StreamRef, Superblock};
use crate::format::{first_data_block, PBlock, PAGE_SIZE, SUPERBLOCK_OFFSETS};

/// The committed metadata streams and the blocks they occupy.
pub struct MetaStreams {
    pub sb: Superblock,
    pub ckpt_blocks: Vec<PBlock>,
    /// Blocks of the log, including the one holding the reserved next page.
    pub log_blocks: Vec<PBlock>,
    pages_per_block: u64,
}

/// What a superblock's streams hold, read and verified.
pub struct Recovered {
    pub sb: Superblock,
    pub checkpoint: Vec<u8>,
    pub log: Vec<u8>,
    pub ckpt_blocks: Vec<PBlock>,
    pub log_blocks: Vec<PBlock>,
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
    for (slot, &off) in SUPERBLOCK_OFFSETS.iter().enumerate() {
        let mut b = [0u8; PAGE_SIZE];
        storage
            .read_at(&mut b, off)
            .map_err(io_err("reading superblock"))?;
        match Superblock::decode(&b, slot) {
            Ok(sb) => good.push(sb),
            Err(e) => bad.push((slot, e)),
        }
    }
    good.sort_by_key(|sb| std::cmp::Reverse(sb.generation));
    Ok((good, bad))
}

/// Read and verify one stream; returns its bytes, its blocks, and the last page's `next`.
fn read_stream(
    storage: &dyn Storage,
    kind: Kind,
    r: &StreamRef,
    pages_per_block: u64,
) -> Result<(Vec<u8>, Vec<PBlock>, u64)> {
    let mut bytes = Vec::new();
    let mut blocks: Vec<PBlock> = Vec::new();
    let mut page_no = r.head;
    let mut next = 0;
    let first_page = crate::format::RESERVED_BYTES / PAGE_SIZE as u64;
    let mut buf = [0u8; PAGE_SIZE];
    for seq in 0..r.pages {
        if page_no < first_page || page_no >= (1u64 << 52) {
            return Err(Error::Corrupt(format!(
                "{} stream {}: page {seq} points at impossible page number {page_no}",
                kind_name(kind),
                r.id
            )));
        }
        storage
            .read_at(&mut buf, page_no * PAGE_SIZE as u64)
            .map_err(io_err("reading metadata page"))?;
        let h = page::decode(&buf, page_no, kind, r.id, seq as u32)?;
        bytes.extend_from_slice(page::payload(&buf, &h));
        let block = PBlock(page_no / pages_per_block);
        if blocks.last() != Some(&block) {
            blocks.push(block);
        }
        next = h.next;
        page_no = h.next;
    }
    Ok((bytes, blocks, next))
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::CheckpointPage => "checkpoint",
        Kind::LogPage => "log",
        Kind::Superblock => "superblock",
    }
}

/// Read the streams a superblock points to.
pub fn load(storage: &dyn Storage, sb: &Superblock) -> Result<Recovered> {
    let ppb = sb.block_size as u64 / PAGE_SIZE as u64;
    let (checkpoint, ckpt_blocks, _) = if sb.checkpoint.pages > 0 {
        read_stream(storage, Kind::CheckpointPage, &sb.checkpoint, ppb)?
    } else {
        (Vec::new(), Vec::new(), 0)
    };
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
    let next_block = PBlock(sb.log_next / ppb);
    if !log_blocks.contains(&next_block) {
        log_blocks.push(next_block);
    }
    Ok(Recovered {
        sb: sb.clone(),
        checkpoint,
        log,
        ckpt_blocks,
        log_blocks,
    })
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
            pages_per_block: ppb,
        })
    }

    pub fn from_recovered(r: &Recovered) -> MetaStreams {
        MetaStreams {
            sb: r.sb.clone(),
            ckpt_blocks: r.ckpt_blocks.clone(),
            log_blocks: r.log_blocks.clone(),
            pages_per_block: r.sb.block_size as u64 / PAGE_SIZE as u64,
        }
    }

    pub fn metadata_blocks(&self) -> u64 {
        (self.ckpt_blocks.len() + self.log_blocks.len()) as u64
    }

    pub fn log_pages(&self) -> u64 {
        self.sb.log.pages
    }

    pub fn checkpoint_pages(&self) -> u64 {
        self.sb.checkpoint.pages
    }

    /// Step 1 of a log commit: write `records` as log pages after the committed ones and
    /// return the superblock that will name them. Nothing durable changes: the pages lie past
    /// the committed end of the log. `None`: no room for the pages. On error or `None` the
    /// blocks taken for pages are given back.
    pub fn stage_log(
        &mut self,
        storage: &dyn Storage,
        alloc: &mut Allocator,
        records: &[u8],
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
        let mut buf = [0u8; PAGE_SIZE];
        let written = (|| {
            for (i, chunk) in chunks.iter().enumerate() {
                let h = PageHeader {
                    kind: Kind::LogPage,
                    stream_id: self.sb.log.id,
                    seq: (self.sb.log.pages + i as u64) as u32,
                    payload_len: chunk.len() as u32,
                    next: pages[i + 1],
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
        sb.generation += 1;
        sb.log.pages += chunks.len() as u64;
        sb.log_next = *pages.last().unwrap();
        Ok(Some(Staged {
            sb,
            new_log_blocks: new_blocks,
            new_checkpoint: None,
        }))
    }

    /// Step 1 of a checkpoint commit: write `checkpoint` into new blocks, with a new empty
    /// log after it, and return the superblock that will name them. `None`: no room.
    pub fn stage_checkpoint(
        &mut self,
        storage: &dyn Storage,
        alloc: &mut Allocator,
        checkpoint: &[u8],
    ) -> Result<Option<Staged>> {
        let ppb = self.pages_per_block;
        let chunks: Vec<&[u8]> = if checkpoint.is_empty() {
            vec![&[][..]]
        } else {
            checkpoint.chunks(PAYLOAD_MAX).collect()
        };
        let want_blocks = (chunks.len() as u64).div_ceil(ppb) + 1;
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
        let pages: Vec<u64> = blocks
            .iter()
            .flat_map(|&b| b.0 * ppb..(b.0 + 1) * ppb)
            .take(chunks.len())
            .collect();
        let id = self.sb.generation + 1;
        let written = (|| {
            // Contiguous pages go out in one write.
            let mut run: Vec<u8> = Vec::new();
            let mut run_start = pages[0];
            let mut buf = [0u8; PAGE_SIZE];
            for (i, chunk) in chunks.iter().enumerate() {
                let h = PageHeader {
                    kind: Kind::CheckpointPage,
                    stream_id: id,
                    seq: i as u32,
                    payload_len: chunk.len() as u32,
                    next: pages.get(i + 1).copied().unwrap_or(0),
                };
                page::encode(&h, chunk, &mut buf);
                if pages[i] != run_start + (run.len() / PAGE_SIZE) as u64 || run.len() >= 8 << 20 {
                    storage
                        .write_at(&run, run_start * PAGE_SIZE as u64)
                        .map_err(io_err("writing checkpoint"))?;
                    run.clear();
                    run_start = pages[i];
                }
                run.extend_from_slice(&buf);
            }
            storage
                .write_at(&run, run_start * PAGE_SIZE as u64)
                .map_err(io_err("writing checkpoint"))
        })();
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
        Ok(Some(Staged {
            sb,
            new_log_blocks: vec![log_block],
            new_checkpoint: Some(blocks),
        }))
    }

    /// Adopt a durable staged state (commit step 5). Returns the blocks of the streams it
    /// replaced (a checkpoint replaces both old streams; a log commit nothing), which nothing
    /// durable names any more.
    pub fn install(&mut self, staged: Staged) -> Vec<PBlock> {
        self.sb = staged.sb;
        match staged.new_checkpoint {
            None => {
                self.log_blocks.extend(staged.new_log_blocks);
                Vec::new()
            }
            Some(ckpt) => {
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

    fn flip(&mut self, storage: &dyn Storage, sb: Superblock) -> Result<()> {
        make_durable(storage, &sb)?;
        self.sb = sb;
        Ok(())
    }
}

/// A commit written but not yet sealed: the superblock that will name it and its new blocks.
pub struct Staged {
    pub sb: Superblock,
    new_log_blocks: Vec<PBlock>,
    /// For a checkpoint commit, the checkpoint's blocks.
    new_checkpoint: Option<Vec<PBlock>>,
}

/// Steps 2 to 4 of a commit: sync what was written, then seal it with the next superblock,
/// then sync that. Needs only the storage, so callers can run it without holding their locks.
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
