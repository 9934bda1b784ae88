//! A checkpoint's checksum stream read on demand: the crcs of its map runs (FORMAT.md §5.6),
//! 1012 a page, found by position (`position / SUMS_PER_PAGE` is the page, the rest the index
//! in it), through a bounded cache of verified pages.
//!
//! The maps keep a run's position in the stream, not its crcs (`layer::map::CrcRef`), so an
//! imported image costs a fraction of a byte per block in memory; the crcs are read when a
//! block is read, like the data. A page is verified (salted crc, kind, stream id = the
//! checkpoint's, seq, full but the last) before any crc in it is used, so a damaged or
//! unreadable page is an error naming it, never a wrong crc. The cache holds whole pages up to
//! its budget (`serve --map-cache`), and lets go of the page unused longest (second chance).

use super::storage::Storage;
use crate::error::{Error, Result};
use crate::format::checksum::Kind;
use crate::format::page::{self, SUMS_PER_PAGE};
use crate::format::record::Record;
use crate::format::{LayerId, PBlock, VBlock, PAGE_SIZE};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// The budget when none is given: 64 MiB of pages hold the crcs of 16M blocks (64 GiB of
/// 4 KiB data).
pub const DEFAULT_BUDGET: u64 = 64 << 20;

/// Bytes a cached page costs: its crcs and a little bookkeeping.
const PAGE_COST: u64 = (SUMS_PER_PAGE * 4 + 64) as u64;

/// A miss reads the aligned window of this many pages around the one asked for, in one read
/// when they lie one after another in the file (as the checkpoint writes them): random reads
/// over an image then find most pages cached after a few thousand reads, not one per page, and
/// a read costs one 64 KiB read where it would have cost 16 of 4 KiB.
const WINDOW: u64 = 16;

/// Pages one request of the prefetch (`prefetch`) reads at most: 1 MiB, while they lie one
/// after another in the file (as the checkpoint writes them).
const PREFETCH_PAGES: u64 = 256;

/// A map run of the checkpoint just written whose crcs sit at `sums_at..sums_at + count` of
/// its checksum stream (a `MapRunSums` record): what `BlockMap::rebase` pages by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PagedRun {
    pub vblock: u64,
    pub pblock: u64,
    pub count: u32,
    pub sums_at: u64,
}

impl PagedRun {
    /// The run a checkpoint's `MapRunSums` record stands for, with its layer; any other
    /// record is given back.
    pub fn of(rec: Record) -> std::result::Result<(LayerId, PagedRun), Record> {
        match rec {
            Record::MapRunSums {
                layer,
                vblock,
                pblock,
                count,
                sums_at,
            } => Ok((
                layer,
                PagedRun {
                    vblock: vblock.0,
                    pblock: pblock.0,
                    count,
                    sums_at,
                },
            )),
            rec => Err(rec),
        }
    }
}

/// A map singles record of the checkpoint just written (FORMAT.md §6.3.3): its layer, the
/// position of its first crc in the checksum stream, its entries (sorted by block, entry `i`'s
/// crc at `sums_at + i`): what `BlockMap::rebase` pages singles by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PagedSingles {
    pub layer: LayerId,
    pub sums_at: u64,
    pub entries: Vec<(VBlock, PBlock)>,
}

/// The checksum stream of the checkpoint in use.
pub struct SumPages {
    /// The checkpoint's id (its pages' stream id).
    id: u64,
    /// Page numbers, in stream order.
    pages: Vec<u64>,
    pages_per_block: u64,
    cache: Mutex<Cache>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Pages the prefetch put in the cache, and whether it is over (done, full or stopped).
    prefetched: AtomicU64,
    prefetch_over: AtomicBool,
    /// Set by `stop_prefetch` (the store's close or hand-over).
    stop: AtomicBool,
}

#[derive(Default)]
struct Cache {
    pages: HashMap<u64, (Arc<[u32]>, bool)>,
    /// Cached page seqs, oldest first (second chance: a page used since it was last looked at
    /// goes to the back once).
    order: VecDeque<u64>,
    budget: u64,
}

/// Figures for `status`: what the cache holds and how often it had the page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub bytes: u64,
    pub budget: u64,
    pub hits: u64,
    pub misses: u64,
    /// Pages the prefetch after open put in the cache, and whether it is over.
    pub prefetched: u64,
    pub prefetch_over: bool,
}

impl SumPages {
    pub fn new(id: u64, pages: Vec<u64>, pages_per_block: u64, budget: u64) -> SumPages {
        SumPages {
            id,
            pages,
            pages_per_block,
            cache: Mutex::new(Cache {
                budget,
                ..Default::default()
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            prefetch_over: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        }
    }

    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// Positions the stream can hold (every page full): a run naming more is damage.
    pub fn capacity(&self) -> u64 {
        self.pages.len() as u64 * SUMS_PER_PAGE as u64
    }

    pub fn budget(&self) -> u64 {
        self.lock().budget
    }

    pub fn set_budget(&self, budget: u64) {
        let mut c = self.lock();
        c.budget = budget;
        c.shrink(0);
    }

    pub fn stats(&self) -> CacheStats {
        let c = self.lock();
        CacheStats {
            bytes: c.pages.len() as u64 * PAGE_COST,
            budget: c.budget,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            prefetched: self.prefetched.load(Ordering::Relaxed),
            prefetch_over: self.prefetch_over.load(Ordering::Relaxed),
        }
    }

    /// Stop a prefetch at its next request (the store closes or hands the pool over).
    pub fn stop_prefetch(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// One request of the prefetch: the pages from `from` that lie one after another in the
    /// file (up to `PREFETCH_PAGES`, no more than the budget has room for), read in one go,
    /// each verified as a miss's are, and put in the cache where absent. A page that does not
    /// verify, or a request that fails, is left out: the read that needs it reads it itself
    /// and fails naming it, as without the prefetch. Never evicts. The next `from`, or None
    /// once the stream is done, the budget full or the prefetch stopped.
    fn prefetch_some(&self, storage: &dyn Storage, from: u64) -> Option<u64> {
        let len = self.pages.len() as u64;
        if self.stop.load(Ordering::SeqCst) || from >= len {
            return None;
        }
        let room = {
            let c = self.lock();
            (c.budget / PAGE_COST).saturating_sub(c.pages.len() as u64)
        };
        let first = self.pages[from as usize];
        let first_page = crate::format::RESERVED_BYTES / PAGE_SIZE as u64;
        if room == 0 {
            return None;
        }
        let n = (from..len.min(from + PREFETCH_PAGES.min(room)))
            .take_while(|&s| self.pages[s as usize] == first.wrapping_add(s - from))
            .count() as u64;
        if first < first_page || first.saturating_add(n) >= 1 << 52 {
            // Not a page of the file: the read that needs it says so.
            return Some(from + 1);
        }
        let mut buf = vec![0u8; n as usize * PAGE_SIZE];
        if storage
            .read_bulk_at(&mut buf, first * PAGE_SIZE as u64)
            .is_err()
        {
            return Some(from + n);
        }
        let verified: Vec<(u64, Arc<[u32]>)> = (0..n)
            .filter_map(|i| {
                let s = from + i;
                let b: &[u8; PAGE_SIZE] = buf[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE]
                    .try_into()
                    .expect("one page");
                Some((s, self.verify(s, b).ok()?.into()))
            })
            .collect();
        let mut c = self.lock();
        let cap = c.budget / PAGE_COST;
        for (s, page) in verified {
            if c.pages.len() as u64 >= cap {
                return None;
            }
            if let std::collections::hash_map::Entry::Vacant(v) = c.pages.entry(s) {
                v.insert((page, false));
                c.order.push_back(s);
                self.prefetched.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(from + n)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The crc at `at`.
    pub fn crc(&self, storage: &dyn Storage, at: u64) -> Result<u32> {
        let seq = at / SUMS_PER_PAGE as u64;
        let i = (at % SUMS_PER_PAGE as u64) as usize;
        // Every read of a paged block comes here: a hit copies the crc out under the lock,
        // without taking a reference to the page.
        if let Some((p, used)) = self.lock().pages.get_mut(&seq) {
            if let Some(&crc) = p.get(i) {
                *used = true;
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(crc);
            }
        }
        let page = self.page(storage, seq)?;
        page.get(i).copied().ok_or_else(|| {
            self.bad(
                seq,
                format!("crc {i} asked for, the page holds {}", page.len()),
            )
        })
    }

    /// The `n` crcs from `at`, page by page.
    pub fn crcs(&self, storage: &dyn Storage, at: u64, n: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(n);
        let mut pos = at;
        while out.len() < n {
            let seq = pos / SUMS_PER_PAGE as u64;
            let page = self.page(storage, seq)?;
            let i = (pos % SUMS_PER_PAGE as u64) as usize;
            let take = (n - out.len()).min(SUMS_PER_PAGE - i);
            let got = page.get(i..i + take).ok_or_else(|| {
                self.bad(
                    seq,
                    format!(
                        "crcs {i}..{} asked for, the page holds {}",
                        i + take,
                        page.len()
                    ),
                )
            })?;
            out.extend_from_slice(got);
            pos += take as u64;
        }
        Ok(out)
    }

    /// Read and verify every page (`check`), not through the cache.
    pub fn verify_all(&self, storage: &dyn Storage) -> Result<()> {
        (0..self.pages.len() as u64).try_for_each(|seq| self.read_page(storage, seq).map(|_| ()))
    }

    fn page(&self, storage: &dyn Storage, seq: u64) -> Result<Arc<[u32]>> {
        {
            let mut c = self.lock();
            if let Some((p, used)) = c.pages.get_mut(&seq) {
                *used = true;
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(p.clone());
            }
        }
        // Read without the lock: other readers' hits go on meanwhile.
        self.misses.fetch_add(1, Ordering::Relaxed);
        let window = self.read_window(storage, seq);
        let p: Arc<[u32]> = match window.iter().find(|w| w.0 == seq) {
            Some((_, Ok(p))) => p.clone().into(),
            // The window's read failed, or this page did not verify: read it alone, so the
            // error is this page's own.
            _ => self.read_page(storage, seq)?.into(),
        };
        let mut c = self.lock();
        let cap = (c.budget / PAGE_COST) as usize;
        // The page asked for first, then its neighbours, as many as the budget holds.
        let neighbours = window
            .into_iter()
            .filter(|w| w.0 != seq)
            .filter_map(|(s, r)| Some((s, Arc::<[u32]>::from(r.ok()?))));
        let fresh: Vec<(u64, Arc<[u32]>)> = std::iter::once((seq, p.clone()))
            .chain(neighbours)
            .filter(|w| !c.pages.contains_key(&w.0))
            .take(cap)
            .collect();
        c.shrink(fresh.len() as u64 * PAGE_COST);
        for (s, page) in fresh {
            c.pages.insert(s, (page, false));
            c.order.push_back(s);
        }
        Ok(p)
    }

    /// The pages of `seq`'s aligned window that lie right after one another in the file from
    /// the window's start, read in one go and each verified; empty if that read fails.
    fn read_window(&self, storage: &dyn Storage, seq: u64) -> Vec<(u64, Result<Vec<u32>>)> {
        let start = seq - seq % WINDOW;
        let end = (start + WINDOW).min(self.pages.len() as u64);
        let first_page = crate::format::RESERVED_BYTES / PAGE_SIZE as u64;
        let Some(&first) = self.pages.get(start as usize) else {
            return Vec::new();
        };
        if first < first_page || first.saturating_add(WINDOW) >= 1 << 52 {
            return Vec::new();
        }
        let n = (start..end)
            .take_while(|&s| self.pages[s as usize] == first + (s - start))
            .count();
        if (start + n as u64) <= seq {
            return Vec::new();
        }
        let mut buf = vec![0u8; n * PAGE_SIZE];
        if storage.read_at(&mut buf, first * PAGE_SIZE as u64).is_err() {
            return Vec::new();
        }
        (0..n)
            .map(|i| {
                let s = start + i as u64;
                let b: &[u8; PAGE_SIZE] = buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .try_into()
                    .expect("one page");
                (s, self.verify(s, b))
            })
            .collect()
    }

    /// Where page `seq` is, for messages.
    fn place(&self, seq: u64) -> String {
        let page_no = self.pages.get(seq as usize).copied().unwrap_or(0);
        format!(
            "checkpoint {}: checksum page {seq} (page {page_no}, pool block {}, byte offset {})",
            self.id,
            page_no / self.pages_per_block.max(1),
            page_no.saturating_mul(PAGE_SIZE as u64)
        )
    }

    fn bad(&self, seq: u64, m: String) -> Error {
        Error::Corrupt(format!("{}: {m}", self.place(seq)))
    }

    /// Page `seq`, read and verified as checksum page `(id, seq)` that chains to the next one
    /// named and is full unless it is the last (positions are `seq * 1012 + index`).
    fn read_page(&self, storage: &dyn Storage, seq: u64) -> Result<Vec<u32>> {
        let Some(&page_no) = self.pages.get(seq as usize) else {
            return Err(Error::Corrupt(format!(
                "checkpoint {}: a map run names checksum page {seq}, the checkpoint has {}",
                self.id,
                self.pages.len()
            )));
        };
        let first_page = crate::format::RESERVED_BYTES / PAGE_SIZE as u64;
        if page_no < first_page || page_no >= (1u64 << 52) {
            return Err(self.bad(seq, "impossible page number".into()));
        }
        let mut buf = [0u8; PAGE_SIZE];
        storage
            .read_at(&mut buf, page_no * PAGE_SIZE as u64)
            .map_err(|e| Error::io(format!("reading {}", self.place(seq)), e))?;
        self.verify(seq, &buf)
    }

    /// The crcs of page `seq` read into `buf`, once it verifies.
    fn verify(&self, seq: u64, buf: &[u8; PAGE_SIZE]) -> Result<Vec<u32>> {
        let page_no = self.pages[seq as usize];
        let h = page::decode(buf, page_no, Kind::ChecksumPage, self.id, seq as u32)
            .map_err(|e| self.bad(seq, e.to_string()))?;
        let next = self.pages.get(seq as usize + 1).copied().unwrap_or(0);
        if h.next != next {
            return Err(self.bad(
                seq,
                format!("its next is page {}, the checkpoint names {next}", h.next),
            ));
        }
        if next != 0 && h.payload_len as usize != SUMS_PER_PAGE * 4 {
            return Err(self.bad(
                seq,
                format!("{} bytes of crcs in a page not the last", h.payload_len),
            ));
        }
        let mut crcs = Vec::with_capacity(SUMS_PER_PAGE);
        page::decode_sums(page::payload(buf, &h), page_no, &mut crcs)?;
        Ok(crcs)
    }
}

/// Fill `sums`' cache with its pages in stream order (`SumPages::prefetch_some`), until every
/// page is cached, the budget is full, the prefetch is stopped, or the stream or the storage is
/// gone (a checkpoint replaced the stream, the store was dropped): a served pool's first reads
/// after an open then find their crcs in memory, as they did when the open read them all.
/// Holds no lock of the store, and the cache's only to look and to insert; each request is
/// one sequential read that bypasses the page cache where it can. The pages it put in the
/// cache and the stream's pages.
pub fn prefetch(sums: Weak<SumPages>, storage: Weak<dyn Storage>) -> (u64, u64) {
    let mut next = 0;
    while let (Some(s), Some(st)) = (sums.upgrade(), storage.upgrade()) {
        match s.prefetch_some(&*st, next) {
            Some(n) => next = n,
            None => {
                s.prefetch_over.store(true, Ordering::Relaxed);
                return (s.prefetched.load(Ordering::Relaxed), s.pages.len() as u64);
            }
        }
    }
    (0, 0)
}

impl Cache {
    /// Let go of pages until `room` more bytes fit the budget.
    fn shrink(&mut self, room: u64) {
        while (self.pages.len() as u64 * PAGE_COST).saturating_add(room) > self.budget {
            let Some(seq) = self.order.pop_front() else {
                break;
            };
            match self.pages.get_mut(&seq) {
                Some((_, used)) if *used => {
                    *used = false;
                    self.order.push_back(seq);
                }
                Some(_) => {
                    self.pages.remove(&seq);
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::MemStorage;

    const ID: u64 = 9;
    const FIRST: u64 = 100;

    /// A stream of `n` crcs (crc i = i * 7) in pages FIRST, FIRST + 1, ...
    fn stream(mem: &MemStorage, n: usize) -> Vec<u64> {
        let crcs: Vec<u8> = (0..n as u32).flat_map(|i| (i * 7).to_le_bytes()).collect();
        let chunks: Vec<&[u8]> = crcs.chunks(SUMS_PER_PAGE * 4).collect();
        let pages: Vec<u64> = (0..chunks.len() as u64).map(|i| FIRST + i).collect();
        crate::pool::records::tests::put_pages(mem, Kind::ChecksumPage, ID, &chunks, &pages);
        pages
    }

    #[test]
    fn crcs_are_read_by_position_and_cached_within_the_budget() {
        let mem = MemStorage::new();
        let pages = stream(&mem, 40_000);
        let s = SumPages::new(ID, pages, 1, 2 * PAGE_COST);
        assert_eq!(s.crc(&mem, 39_999).unwrap(), 39_999 * 7);
        let want: Vec<u32> = (1000..1030).map(|i| i * 7).collect();
        assert_eq!(s.crcs(&mem, 1000, 30).unwrap(), want);
        let st = s.stats();
        assert_eq!((st.misses, st.bytes), (2, 2 * PAGE_COST), "{st:?}");
        // Within the budget whatever is read.
        for at in (0..40_000).step_by(997) {
            assert_eq!(s.crc(&mem, at).unwrap(), at as u32 * 7);
            assert!(s.stats().bytes <= 2 * PAGE_COST);
        }
        // Past the last crc of the short last page: an error naming the page.
        let e = s.crc(&mem, 40_000).unwrap_err().to_string();
        assert!(e.contains("checksum page 39 (page 139"), "{e}");
        // No budget: nothing kept, every lookup reads.
        s.set_budget(0);
        assert_eq!(s.stats().bytes, 0);
        let before = s.stats().misses;
        s.crc(&mem, 5).unwrap();
        s.crc(&mem, 5).unwrap();
        assert_eq!(s.stats().misses, before + 2);
    }

    /// A miss reads its aligned window of pages in one go: the neighbours are hits after.
    #[test]
    fn a_miss_brings_in_its_window_of_pages() {
        let mem = MemStorage::new();
        let pages = stream(&mem, 40_000);
        let s = SumPages::new(ID, pages, 1, DEFAULT_BUDGET);
        s.crc(&mem, 3 * 1012).unwrap();
        for p in 0..WINDOW {
            assert_eq!(
                s.crc(&mem, p * 1012 + 1).unwrap(),
                (p as u32 * 1012 + 1) * 7
            );
        }
        let st = s.stats();
        assert_eq!((st.misses, st.hits), (1, WINDOW), "{st:?}");
        s.crc(&mem, WINDOW * 1012).unwrap();
        assert_eq!(s.stats().misses, 2);
    }

    #[test]
    fn a_damaged_page_is_an_error_naming_it_never_a_crc() {
        let mem = MemStorage::new();
        let pages = stream(&mem, 3000);
        let mut b = [0u8; PAGE_SIZE];
        mem.read_at(&mut b, 101 * PAGE_SIZE as u64).unwrap();
        b[200] ^= 1;
        mem.write_at(&b, 101 * PAGE_SIZE as u64).unwrap();
        let s = SumPages::new(ID, pages.clone(), 1, DEFAULT_BUDGET);
        assert_eq!(s.crc(&mem, 10).unwrap(), 70);
        let e = s.crc(&mem, 1012 + 5).unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)));
        assert!(
            e.to_string()
                .contains("checksum page 1 (page 101, pool block 101"),
            "{e}"
        );
        assert!(s.verify_all(&mem).is_err());
        // Another checkpoint's page (another id) is not this stream's.
        let other = SumPages::new(ID + 1, pages, 1, DEFAULT_BUDGET);
        assert!(other.crc(&mem, 10).is_err());
    }

    fn run_prefetch(s: &Arc<SumPages>, mem: &Arc<MemStorage>) {
        let st: Arc<dyn Storage> = mem.clone();
        prefetch(Arc::downgrade(s), Arc::downgrade(&st));
    }

    /// After the prefetch, every crc is a hit: no read of a paged block waits for a page.
    #[test]
    fn after_the_prefetch_no_lookup_reads_a_page() {
        let mem = Arc::new(MemStorage::new());
        let pages = stream(&mem, 300_000);
        let s = Arc::new(SumPages::new(ID, pages.clone(), 1, DEFAULT_BUDGET));
        run_prefetch(&s, &mem);
        let st = s.stats();
        assert_eq!(
            (st.prefetched, st.prefetch_over),
            (pages.len() as u64, true)
        );
        for at in (0..300_000).step_by(331) {
            assert_eq!(s.crc(&*mem, at).unwrap(), at as u32 * 7);
        }
        assert_eq!(s.crcs(&*mem, 299_000, 1000).unwrap().len(), 1000);
        assert_eq!(s.stats().misses, 0, "{:?}", s.stats());
    }

    /// The prefetch fills the budget and no more, and evicts nothing a read brought in.
    #[test]
    fn the_prefetch_stops_at_the_budget() {
        let mem = Arc::new(MemStorage::new());
        let pages = stream(&mem, 40_000);
        let s = Arc::new(SumPages::new(ID, pages, 1, 20 * PAGE_COST));
        // A miss brings in its window: pages 32..=39.
        s.crc(&*mem, 39_999).unwrap();
        run_prefetch(&s, &mem);
        let st = s.stats();
        assert_eq!(
            (st.bytes, st.prefetched, st.prefetch_over),
            (20 * PAGE_COST, 12, true)
        );
        let before = s.stats().misses;
        s.crc(&*mem, 39_999).unwrap();
        s.crc(&*mem, 32 * 1012).unwrap();
        s.crc(&*mem, 11 * 1012).unwrap();
        assert_eq!(
            s.stats().misses,
            before,
            "pages 32..=39 and 0..=11 are cached"
        );
        s.crc(&*mem, 12 * 1012).unwrap();
        assert_eq!(s.stats().misses, before + 1);
        // No budget, no prefetch.
        let none = Arc::new(SumPages::new(ID, stream(&mem, 4000), 1, 0));
        run_prefetch(&none, &mem);
        assert_eq!((none.stats().bytes, none.stats().prefetched), (0, 0));
    }

    /// A damaged page met by the prefetch is left out: the reads of its crcs fail naming it,
    /// every other crc is served from the cache.
    #[test]
    fn the_prefetch_leaves_a_damaged_page_to_the_reads_that_need_it() {
        let mem = Arc::new(MemStorage::new());
        let pages = stream(&mem, 30_000);
        let mut b = [0u8; PAGE_SIZE];
        mem.read_at(&mut b, 105 * PAGE_SIZE as u64).unwrap();
        b[300] ^= 1;
        mem.write_at(&b, 105 * PAGE_SIZE as u64).unwrap();
        let s = Arc::new(SumPages::new(ID, pages.clone(), 1, DEFAULT_BUDGET));
        run_prefetch(&s, &mem);
        assert_eq!(s.stats().prefetched, pages.len() as u64 - 1);
        for at in (0..30_000u64).step_by(101) {
            let got = s.crc(&*mem, at);
            if at / 1012 == 5 {
                let e = got.unwrap_err();
                assert!(matches!(e, Error::Corrupt(_)));
                assert!(e.to_string().contains("checksum page 5 (page 105"), "{e}");
            } else {
                assert_eq!(got.unwrap(), at as u32 * 7);
            }
        }
        assert!(s.crcs(&*mem, 4 * 1012, 2000).is_err());
        assert!(s.verify_all(&*mem).is_err());
    }

    /// Storage that counts its reads and calls its closure at the first.
    struct OnRead<F: Fn() + Send + Sync>(Arc<MemStorage>, F, Arc<AtomicU64>);
    impl<F: Fn() + Send + Sync> Storage for OnRead<F> {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            if self.2.fetch_add(1, Ordering::SeqCst) == 0 {
                (self.1)();
            }
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
            self.0.write_at(data, offset)
        }
        fn sync(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.0.punch_hole(offset, len)
        }
        fn len(&self) -> std::io::Result<u64> {
            self.0.len()
        }
        fn allocated(&self) -> std::io::Result<u64> {
            self.0.allocated()
        }
    }

    /// Stopped (a close, a hand-over) or its stream replaced (a checkpoint), a prefetch ends
    /// after the request under way: nobody waits for a long one.
    #[test]
    fn a_stopped_or_replaced_prefetch_ends_after_its_request() {
        let mem = Arc::new(MemStorage::new());
        let pages = stream(&mem, 1012 * 3 * PREFETCH_PAGES as usize);
        // Stopped during its first request.
        let s = Arc::new(SumPages::new(ID, pages.clone(), 1, DEFAULT_BUDGET));
        let weak = Arc::downgrade(&s);
        let reads = Arc::new(AtomicU64::new(0));
        let st: Arc<dyn Storage> = Arc::new(OnRead(
            mem.clone(),
            move || weak.upgrade().unwrap().stop_prefetch(),
            reads.clone(),
        ));
        prefetch(Arc::downgrade(&s), Arc::downgrade(&st));
        let got = s.stats();
        assert_eq!((got.prefetched, got.prefetch_over), (PREFETCH_PAGES, true));
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        // The stream let go of (a checkpoint replaced it) during the first request.
        let s = Arc::new(SumPages::new(ID, pages, 1, DEFAULT_BUDGET));
        let held = Mutex::new(Some(s.clone()));
        let reads = Arc::new(AtomicU64::new(0));
        let st: Arc<dyn Storage> = Arc::new(OnRead(
            mem.clone(),
            move || drop(held.lock().unwrap().take()),
            reads.clone(),
        ));
        let weak = Arc::downgrade(&s);
        drop(s);
        prefetch(weak.clone(), Arc::downgrade(&st));
        assert!(weak.upgrade().is_none());
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }
}
