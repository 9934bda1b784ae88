//! Opening a version-7 pool without reading its maps (DESIGN.md §12, items 3b and 3c): the
//! open reads the superblock, the checkpoint's records before its maps, its map index and the
//! log (after loading the ranges the log's entries touch), and serves at once. A block path
//! loads the ranges it touches in every layer of the chain first (`Store::load_for`); every
//! other method waits at the store's gate (`Store::read`, `Store::write`) until a background
//! thread has loaded the rest and completed the load (`Store::complete_load`: the allocator
//! rebuilt from the whole maps, `loading.rs`). Changes wait for that too for now: the
//! allocator's loading mode (item 3d) would let them go on once the write paths load the
//! ranges they touch as the read paths do.

use super::invariants;
use super::journal::{Journal, Replayed};
use super::loading::LoadGate;
use super::store::{extent_and_floor, load_generation, load_with, Inner, Store};
use crate::error::{Error, Result};
use crate::fault::{Fault, What, Where};
use crate::format::record::{Record, RecordReader};
use crate::format::superblock::Superblock;
use crate::format::{first_data_block, LayerId, PBlock};
use crate::layer::lazy::{Applied, Unloaded};
use crate::layer::{Catalog, Layer};
use crate::pool::meta::{self, MetaStreams};
use crate::pool::{Allocator, Pool, Storage};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the background load holds the write lock at a time: block paths wait at most
/// about this long behind it.
const HOLD: Duration = Duration::from_millis(2);
/// How long it then lets go of it, so readers waiting for the lock get it.
const PAUSE: Duration = Duration::from_micros(200);

/// Load generation `sb` without its maps: the checkpoint's records before them, its index,
/// then the log, after the ranges its map entries touch. A checkpoint without an index (no
/// maps) loads whole.
fn load_generation_lazy(storage: &dyn Storage, sb: &Superblock) -> Result<Inner> {
    let mut rec = meta::load(storage, sb)?;
    if rec.index.is_empty() {
        return load_generation(storage, sb, true);
    }
    let mut catalog = Catalog::new();
    let sums = rec.sums.clone();
    let capacity = sums.capacity();
    let mut resolve = |at: u64, n: usize| sums.crcs(storage, at, n);
    rec.replay_head(|r| catalog.apply_checkpoint(r, capacity, &mut resolve))?;
    let ppb = sb.block_size as u64 / crate::format::PAGE_SIZE as u64;
    let index = std::mem::take(&mut rec.index);
    let mut lazy = Unloaded::new(sb.checkpoint, index, ppb);
    // A layer without a range has its whole map (none) from the checkpoint already.
    for layer in catalog.uncompared() {
        if !lazy.has_unloaded(layer) {
            catalog.compare_stored(layer, (0, 0));
        }
    }
    // The log is short (the checkpoint threshold bounds it): the ranges it changes load first,
    // so it applies to whole chunks, as on an eager open.
    let mut log = Vec::new();
    let mut r = RecordReader::new(&rec.log, "log");
    let mut want = Vec::new();
    while let Some(record) = r.next_record()? {
        touched(&lazy, &record, &mut want);
        log.push(record);
    }
    want.sort_unstable();
    want.dedup();
    // Claimed below, once the log is replayed over them.
    lazy.load(&mut catalog, storage, &sums, &want, &mut |_, _| {})?;
    let mut it = log.into_iter();
    catalog.replay_log(|| Ok(it.next()))?;
    let meta = MetaStreams::from_recovered(&rec);
    lazy.blocks = meta.ckpt_blocks.clone();
    let bs = sb.block_size;
    // The allocator's loading mode (`loading.rs`) hands out nothing below the floor until the
    // completion: the checkpoint's blocks known so far (its head's) are enough for it, since
    // the file's extent bounds the rest.
    let (file_blocks, floor) = extent_and_floor(storage, bs, &meta.ckpt_blocks, &meta.log_blocks)?;
    let mut alloc = Allocator::loading(first_data_block(bs), sb.max_blocks, floor);
    let mut faults = std::mem::take(&mut catalog.faults);
    // The maps are audited and their blocks claimed as they load, what is loaded now (the
    // ranges the log touched, and the log) first: the completion then only merges (§5.3).
    alloc.claim_as_loaded();
    let claims = alloc.load_claims().expect("a loading allocator");
    faults.extend(invariants::claim_loaded(&catalog, bs, file_blocks, claims));
    lazy.file_blocks = file_blocks;
    let mut inner = load_generation_shell(meta, alloc, catalog, bs, sb.generation, &rec)?;
    inner.load_faults = faults;
    inner.lazy = Some(lazy);
    Ok(inner)
}

/// The ranges a log record's map entries touch.
fn touched(lazy: &Unloaded, record: &Record, out: &mut Vec<usize>) {
    let mut add = |layer: LayerId, v0: u64, v1: u64| out.extend(lazy.touching(layer, v0, v1));
    match record {
        Record::Map { layer, entries } => {
            for e in entries {
                add(*layer, e.vblock.0, e.vblock.0);
            }
        }
        Record::MapRun { layer, run } => {
            let n = run.crcs.len() as u64;
            add(*layer, run.vblock.0, run.vblock.0 + n.max(1) - 1);
        }
        _ => {}
    }
}

/// An `Inner` around a loaded catalogue whose allocator is not built yet.
fn load_generation_shell(
    meta: MetaStreams,
    alloc: Allocator,
    catalog: Catalog,
    bs: u32,
    generation: u64,
    rec: &meta::Recovered,
) -> Result<Inner> {
    let mut inner = Inner::empty(Pool::new(meta, alloc, bs), catalog, bs);
    inner.newest_seen = generation;
    if let Some(commit) = rec.dropped_commit {
        let what = crate::fault::What::CutOffCommit { commit };
        inner
            .load_notes
            .push(crate::fault::Fault::new(what, Default::default()));
    }
    Ok(inner)
}

impl Inner {
    /// Data blocks layer `l`'s map holds, its ranges not loaded yet included.
    pub(crate) fn data_blocks(&self, l: &Layer) -> u64 {
        let left = self.lazy.as_ref().map_or(0, |lazy| {
            lazy.data_not_loaded(l.id, self.catalog.stored_counters(l.id))
        });
        l.map.data_blocks() + left
    }

    /// Blocks of the metadata streams. While ranges are left to load, the checkpoint's are
    /// counted from its pages: only the head's and the loaded ranges' blocks are known.
    pub(crate) fn metadata_blocks(&self) -> u64 {
        let m = &self.pool.meta;
        if self.lazy.is_none() {
            return m.metadata_blocks();
        }
        let ppb = (self.block_size as u64 / crate::format::PAGE_SIZE as u64).max(1);
        m.checkpoint_pages().div_ceil(ppb) + m.log_blocks.len() as u64
    }

    /// The ranges of every layer of `id`'s chain holding blocks of `offset..offset + len`
    /// that are not loaded.
    fn ranges_for(&self, id: LayerId, offset: u64, len: u64) -> Vec<usize> {
        let Some(lazy) = &self.lazy else {
            return Vec::new();
        };
        if len == 0 {
            return Vec::new();
        }
        let bs = self.block_size as u64;
        let (v0, v1) = (offset / bs, (offset.saturating_add(len) - 1) / bs);
        let mut out = Vec::new();
        for l in self.catalog.chain(id) {
            out.extend(lazy.touching(l.id, v0, v1));
        }
        out
    }

    /// Load `ranges` (under the write lock), each audited and its blocks claimed as it is
    /// applied (`invariants::claim_range`): what the audit finds is a fault found late.
    fn load_ranges(&mut self, storage: &dyn Storage, ranges: &[usize]) -> Result<()> {
        let sums = self.pool.meta.sums().clone();
        let bs = self.block_size;
        let mut faults = Vec::new();
        let Inner {
            catalog,
            lazy,
            pool,
            ..
        } = self;
        let Some(lazy) = lazy else {
            return Ok(());
        };
        let file_blocks = lazy.file_blocks;
        let mut claim = |catalog: &Catalog, range: Applied| {
            let (Some(l), Some(claims)) = (catalog.get(range.layer), pool.alloc.load_claims())
            else {
                return;
            };
            faults.extend(invariants::claim_range(l, range, bs, file_blocks, claims));
        };
        let loaded = lazy.load(catalog, storage, &sums, ranges, &mut claim);
        for f in faults {
            self.late_fault(f);
        }
        loaded
    }

    /// Load ranges in order for about `HOLD`, or only until a block path waits for the lock
    /// (`awaited`); true when none is left to load.
    fn load_some(&mut self, storage: &dyn Storage, awaited: &dyn Fn() -> bool) -> Result<bool> {
        let start = Instant::now();
        loop {
            let next = self.lazy.as_mut().and_then(|l| l.next_to_load());
            let Some(i) = next else {
                return Ok(true);
            };
            self.load_ranges(storage, &[i])?;
            if start.elapsed() >= HOLD || awaited() {
                return Ok(false);
            }
        }
    }

    /// Every range is loaded: the maps are whole, and the checkpoint's blocks all known
    /// (`blocks`: from the pages the ranges were read from, sorted, each once), which the
    /// completion's rebuild claims and the next checkpoint frees.
    fn maps_whole(&mut self, blocks: Vec<PBlock>) {
        if self.lazy.take().is_some() {
            self.pool.meta.ckpt_blocks = blocks;
        }
    }
}

impl Store {
    /// Open the pool at `path` for a server, taking its lock, without reading its maps
    /// (version 7 and a checkpoint with maps; any other loads whole), and load them in the
    /// background (`complete_in_background`). `journal`: the keeper's crash journal, kept
    /// for this store's changes; one holding transactions the pool lacks (a killed server's)
    /// is replayed by an eager open instead (`open_in_lazy_with`).
    pub fn open_lazy(
        path: &Path,
        purpose: &str,
        journal: Option<Journal>,
    ) -> Result<(Arc<Store>, Replayed)> {
        let (s, r) = Self::open_path(path, purpose, |st| {
            Self::open_in_lazy_with(st, true, journal)
        })?;
        let s = Arc::new(s);
        if !s.is_loaded() {
            s.complete_in_background()
                .map_err(|e| Error::io("starting the background load of the maps", e))?;
        }
        Ok((s, r))
    }

    /// `open_in`, leaving the maps on disk (see the module's comment); nothing loads them
    /// in the background until `complete_in_background` (tests drive it themselves).
    pub fn open_in_lazy(storage: Arc<dyn Storage>, writable: bool) -> Result<Store> {
        Ok(Self::open_in_lazy_with(storage, writable, None)?.0)
    }

    /// `open_in_lazy` with a crash journal to keep (writable opens only). A journal with
    /// nothing to replay (a first start's, a graceful restart's: `Inner::attach_journal`) is
    /// attached to the lazily opened store. One with transactions the pool lacks (the
    /// keeper's after a crash) makes the open eager, as `open_in_with`: the replay claims the
    /// blocks its writes went to (`Allocator::claim_fresh`), which only an allocator rebuilt
    /// from the whole maps knows to be free, and changes maps anywhere. A later step could
    /// load the ranges its records touch first and let the loading allocator count those
    /// blocks (they lie below its floor) until the completion; not built.
    pub fn open_in_lazy_with(
        storage: Arc<dyn Storage>,
        writable: bool,
        journal: Option<Journal>,
    ) -> Result<(Store, Replayed)> {
        let mut inner = load_with(&*storage, &load_generation_lazy)?;
        if inner.lazy.is_none() {
            drop(inner);
            return Self::open_in_with(storage, writable, journal);
        }
        if writable && !inner.load_faults.is_empty() {
            return Err(Error::Corrupt(format!(
                "{} fault(s) in the metadata, first: {}; run `thinlayer check` (opened read-only it can still be exported)",
                inner.load_faults.len(),
                inner.load_faults[0]
            )));
        }
        if let Some(j) = journal {
            debug_assert!(writable);
            if let Err(j) = inner.attach_journal(j) {
                drop(inner);
                return Self::open_in_with(storage, writable, Some(j));
            }
        }
        let s = Self::around(storage, inner, writable, LoadGate::loading());
        if writable {
            // As `open_in_mode` does for a deferred load: what it punches the loading
            // allocator keeps safe; half-imported layers go at the completion.
            s.inner
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .recover(&*s.storage)?;
        }
        Ok((s, Replayed::default()))
    }

    /// Whether the maps are whole (a lazily opened pool's background load is done).
    pub fn maps_loaded(&self) -> bool {
        self.is_loaded()
    }

    /// Before a block path takes the read lock: the ranges of every layer of `id`'s chain
    /// holding blocks of `offset..offset + len` are loaded (under the write lock, briefly).
    /// An error names the damaged page of a range that cannot be loaded.
    pub(crate) fn load_for(&self, id: LayerId, offset: u64, len: u64) -> Result<()> {
        if self.is_loaded() {
            return Ok(());
        }
        if self.read_now().ranges_for(id, offset, len).is_empty() {
            return Ok(());
        }
        let mut g = {
            let _waiting = self.loaded.waiting();
            self.inner.write().unwrap_or_else(|p| p.into_inner())
        };
        let want = g.ranges_for(id, offset, len);
        g.load_ranges(&*self.storage, &want)
    }

    /// Load the ranges left, a few at a time, then rebuild the allocator, run a writable
    /// open's housekeeping and open the gate (`Store::complete_load`). Holds only a weak
    /// reference: a store dropped meanwhile stops it. A range that cannot be loaded stops the
    /// load (`late_fault`, `load_stopped`): what waits gets the refusal naming it instead of
    /// waiting for ever, changes are refused, and reads of that range fail naming its page.
    pub fn complete_in_background(
        self: &Arc<Self>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("maps-load".into())
            .spawn(move || {
                let t = Instant::now();
                loop {
                    let Some(s) = weak.upgrade() else {
                        return;
                    };
                    let step = {
                        let mut g = s.inner.write().unwrap_or_else(|p| p.into_inner());
                        g.load_some(&*s.storage, &|| s.loaded.is_awaited())
                    };
                    match step {
                        // Let the block paths in: re-taking the write lock at once starved
                        // the readers waiting for it (a first read after the open waited for
                        // the whole load, docs/BENCHMARKS.md "lazy open").
                        Ok(false) => {
                            drop(s);
                            std::thread::sleep(PAUSE)
                        }
                        Ok(true) => break,
                        Err(e) => {
                            s.stop_load(e);
                            return;
                        }
                    }
                }
                let Some(s) = weak.upgrade() else {
                    return;
                };
                // The checkpoint's blocks, sorted without the lock (every range is loaded:
                // nothing adds to them any more); then one short hold completes the load.
                let mut blocks = {
                    let mut g = s.inner.write().unwrap_or_else(|p| p.into_inner());
                    g.lazy
                        .as_mut()
                        .map(|l| std::mem::take(&mut l.blocks))
                        .unwrap_or_default()
                };
                blocks.sort_unstable();
                blocks.dedup();
                let held = s.complete_load_after(|g| g.maps_whole(blocks));
                crate::log::process(
                    crate::log::Level::Info,
                    format_args!(
                        "thinlayer: maps loaded in the background in {} ms (the completion held the store's lock {} µs)",
                        t.elapsed().as_millis(),
                        held.as_micros()
                    ),
                );
            })
    }

    fn stop_load(&self, e: Error) {
        crate::log::process(
            crate::log::Level::Warn,
            format_args!("thinlayer: the maps could not all be loaded: {e}"),
        );
        let what = What::Unloadable {
            reason: format!("a range of the maps: {e}"),
        };
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .late_fault(Fault::new(what, Where::default()));
        self.load_stopped();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::VBlock;
    use crate::pool::MemStorage;
    use crate::volume::CreateOptions;
    use proptest::prelude::*;

    const BS: u64 = 4096;

    fn block(seed: u64) -> Vec<u8> {
        (0..BS)
            .map(|i| (seed.wrapping_mul(31).wrapping_add(i / 512) % 251) as u8 + 1)
            .collect()
    }

    /// A pool of several ranges: "base" (committed) with scattered singles and a run, "app"
    /// over it with a few blocks and whiteouts, "img" (committed) of runs, all
    /// checkpointed; then writes in the log (so the open loads their ranges first) and a
    /// layer removed in the log (its ranges are never loaded).
    fn pool() -> Arc<MemStorage> {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        s.create_layer("base", None, Some(1 << 30)).unwrap();
        let base = s.layer_head("base").unwrap().id;
        for i in 0..6000u64 {
            s.write_layer(base, (i * 37 % 200_000) * BS, &block(i))
                .unwrap();
        }
        let run: Vec<u8> = (0..300).flat_map(block).collect();
        s.write_layer(base, 250_000 * BS, &run).unwrap();
        s.commit_layer("base").unwrap();
        s.create_layer("app", Some("base"), None).unwrap();
        let app = s.layer_head("app").unwrap().id;
        for i in 0..40u64 {
            s.write_layer(app, i * 4999 * BS, &block(i + 7000)).unwrap();
        }
        s.zero_layer(app, 37 * BS, 3 * BS, false).unwrap();
        s.create_layer("img", None, Some(1 << 28)).unwrap();
        let img = s.layer_head("img").unwrap().id;
        s.write_layer(img, 0, &run).unwrap();
        s.commit_layer("img").unwrap();
        s.create_layer("gone", None, Some(1 << 24)).unwrap();
        let gone = s.layer_head("gone").unwrap().id;
        for i in 0..500u64 {
            s.write_layer(gone, i * 3 * BS, &block(i)).unwrap();
        }
        s.checkpoint().unwrap();
        // In the log: changes to app's ranges, and a removal.
        s.write_layer(app, 4999 * 3 * BS, &block(99_999)).unwrap();
        s.write_layer(app, 150_000 * BS, &block(88_888)).unwrap();
        s.remove_layer("gone").unwrap();
        s.flush().unwrap();
        drop(s);
        mem
    }

    fn copy(mem: &MemStorage) -> Arc<MemStorage> {
        Arc::new(MemStorage::from_bytes(mem.snapshot()))
    }

    /// Right after a lazy open, before anything loads in the background: reads of the last
    /// layer's last chunk, and of every layer, answer what an eager open's do; nothing else
    /// was loaded for them but the ranges they touch.
    #[test]
    fn reads_right_after_a_lazy_open_answer_as_an_eager_open() {
        let mem = pool();
        let eager = Store::open_in(copy(&mem), false).unwrap();
        let lazy = Store::open_in_lazy(mem.clone(), true).unwrap();
        assert!(!lazy.maps_loaded());
        let left = lazy.read_now().lazy.as_ref().unwrap().left();
        assert!(left >= 4, "{left} ranges left");
        let (mut a, mut b) = (vec![0u8; BS as usize], vec![0u8; BS as usize]);
        let img = lazy.layer_head("img").unwrap();
        let last = img.disk_size - BS;
        lazy.read_layer(img.id, last, &mut a).unwrap();
        eager.read_layer(img.id, last, &mut b).unwrap();
        assert_eq!(a, b);
        let app = lazy.layer_head("app").unwrap().id;
        for vb in [0, 37, 38, 4999 * 3, 150_000, 250_010, 199_999] {
            lazy.read_layer(app, vb * BS, &mut a).unwrap();
            eager.read_layer(app, vb * BS, &mut b).unwrap();
            assert!(a == b, "block {vb}");
        }
        assert!(!lazy.maps_loaded());
        let now = lazy.read_now().lazy.as_ref().unwrap().left();
        assert!(now < left && now > 0, "{now} of {left} ranges left");
    }

    #[derive(Clone, Debug)]
    enum Op {
        Read { layer: usize, vb: u64, n: u64 },
        Extents { layer: usize, vb: u64, n: u64 },
        Write { vb: u64, n: u64, seed: u64 },
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        let vb = prop_oneof![0u64..300, 0u64..260_000, 149_990u64..150_010];
        prop_oneof![
            6 => (0usize..3, vb.clone(), 1u64..40).prop_map(|(layer, vb, n)| Op::Read { layer, vb, n }),
            2 => (0usize..3, vb.clone(), 1u64..2000).prop_map(|(layer, vb, n)| Op::Extents { layer, vb, n }),
            2 => (vb, 1u64..4, any::<u64>()).prop_map(|(vb, n, seed)| Op::Write { vb, n, seed }),
            1 => Just(Op::Flush),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// A lazily opened pool, its maps loading in the background meanwhile, answers every
        /// read, block status and write as an eagerly opened copy does; afterwards both are
        /// consistent and the lazy one reopens to the same contents.
        #[test]
        fn a_lazy_open_answers_as_an_eager_one_while_the_maps_load(
            ops in proptest::collection::vec(op(), 1..40)
        ) {
            let mem = pool();
            let eager = Store::open_in(copy(&mem), true).unwrap();
            let lazy = Arc::new(Store::open_in_lazy(mem.clone(), true).unwrap());
            let bg = lazy.complete_in_background().unwrap();
            let names = ["base", "app", "img"];
            let app = lazy.layer_head("app").unwrap().id;
            for op in &ops {
                match *op {
                    Op::Read { layer, vb, n } => {
                        let id = lazy.layer_head(names[layer]).unwrap().id;
                        let (mut a, mut b) = (vec![0u8; (n * BS) as usize], vec![0u8; (n * BS) as usize]);
                        let ra = lazy.read_layer(id, vb * BS, &mut a).map_err(|e| e.to_string());
                        let rb = eager.read_layer(id, vb * BS, &mut b).map_err(|e| e.to_string());
                        prop_assert_eq!(ra.is_ok(), rb.is_ok());
                        prop_assert!(a == b, "{:?}", op);
                    }
                    Op::Extents { layer, vb, n } => {
                        let id = lazy.layer_head(names[layer]).unwrap().id;
                        let a = lazy.extents_layer(id, vb * BS, n * BS).map_err(|e| e.to_string());
                        let b = eager.extents_layer(id, vb * BS, n * BS).map_err(|e| e.to_string());
                        prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
                    }
                    Op::Write { vb, n, seed } => {
                        let data: Vec<u8> = (0..n).flat_map(|i| block(seed ^ i)).collect();
                        lazy.write_layer(app, vb * BS, &data).unwrap();
                        eager.write_layer(app, vb * BS, &data).unwrap();
                    }
                    Op::Flush => {
                        lazy.flush().unwrap();
                        eager.flush().unwrap();
                    }
                }
            }
            bg.join().unwrap();
            prop_assert!(lazy.maps_loaded());
            lazy.verify_consistency().unwrap();
            eager.verify_consistency().unwrap();
            prop_assert_eq!(lazy.used_blocks() > 0, true);
            lazy.flush().unwrap();
            drop(lazy);
            let again = Store::open_in(mem.clone(), false).unwrap();
            again.verify_consistency().unwrap();
            for name in names {
                let id = again.layer_head(name).unwrap().id;
                for vb in [0u64, 37, 150_000, 250_000, 14_997] {
                    let (mut a, mut b) = (vec![0u8; BS as usize], vec![0u8; BS as usize]);
                    let ra = again.read_layer(id, vb * BS, &mut a).is_ok();
                    let rb = eager.read_layer(id, vb * BS, &mut b).is_ok();
                    prop_assert!(ra == rb && a == b, "{} block {}", name, vb);
                }
            }
        }
    }

    fn read_at(s: &Store, id: LayerId, vb: u64) -> Vec<u8> {
        let mut b = vec![0u8; BS as usize];
        s.read_layer(id, vb * BS, &mut b).unwrap();
        b
    }

    /// A server killed: the pool file as it stands (its page cache outlives the process)
    /// and the crash journal the keeper holds.
    fn kill(mem: &MemStorage, s: &Store) -> (Arc<MemStorage>, Journal) {
        (copy(mem), Journal::adopt(s.journal_fd().unwrap()).unwrap())
    }

    /// The default `serve` (with its keeper) opens lazily: a new journal has nothing to
    /// replay, so it is kept by the lazily opened store. Writes acknowledged after the load
    /// completed, one flushed and two not, outlive a kill through it: the next open finds
    /// transactions to replay and opens eagerly; without the journal the unflushed writes
    /// are lost (so the test can fail).
    #[test]
    fn a_lazy_open_keeps_the_crash_journal_and_a_kill_replays_it() {
        let mem = pool();
        let (s, r) =
            Store::open_in_lazy_with(mem.clone(), true, Some(Journal::create().unwrap())).unwrap();
        assert_eq!(r, Replayed::default());
        assert!(!s.maps_loaded(), "a new journal leaves the open lazy");
        let s = Arc::new(s);
        s.complete_in_background().unwrap().join().unwrap();
        let app = s.layer_head("app").unwrap().id;
        s.write_layer(app, 10 * BS, &block(1)).unwrap();
        s.flush().unwrap();
        s.write_layer(app, 4999 * 3 * BS, &block(2)).unwrap();
        s.write_layer(app, 11 * BS, &block(3)).unwrap();
        let (image, j) = kill(&mem, &s);
        let without = Store::open_in(copy(&image), false).unwrap();
        assert_ne!(
            read_at(&without, app, 11),
            block(3),
            "lost without the journal"
        );
        let (n, r) = Store::open_in_lazy_with(image.clone(), true, Some(j)).unwrap();
        assert_eq!(r.transactions, 1);
        assert!(
            n.maps_loaded(),
            "a crash's journal is replayed by an eager open"
        );
        let expect = |n: &Store| {
            n.verify_consistency().unwrap();
            assert_eq!(read_at(n, app, 10), block(1));
            assert_eq!(read_at(n, app, 4999 * 3), block(2));
            assert_eq!(read_at(n, app, 11), block(3));
            assert_eq!(read_at(n, app, 150_000), block(88_888));
        };
        expect(&n);
        n.flush().unwrap();
        drop(n);
        expect(&Store::open_in(image, true).unwrap());
    }

    /// A journal whose transactions the pool has all (a commit staged, its log page in the
    /// page cache, when the kill came: what a graceful restart's journal holds at most)
    /// leaves the open lazy; that server killed before its load completed leaves a journal
    /// the third opens lazily too, and every write is there.
    #[test]
    fn a_journal_with_nothing_to_replay_leaves_the_open_lazy_and_survives_a_kill_mid_load() {
        let mem = pool();
        let (s, _) =
            Store::open_in_with(mem.clone(), true, Some(Journal::create().unwrap())).unwrap();
        let app = s.layer_head("app").unwrap().id;
        s.write_layer(app, 12 * BS, &block(4)).unwrap();
        let staged = s.write().unwrap().stage(&*mem).unwrap().unwrap();
        let (image, j) = kill(&mem, &s);
        assert_eq!(j.read().len(), 1, "one transaction, staged");
        let (n, r) = Store::open_in_lazy_with(image.clone(), true, Some(j)).unwrap();
        assert_eq!(r, Replayed::default());
        assert!(!n.maps_loaded(), "nothing to replay: the open stays lazy");
        assert_eq!(read_at(&n, app, 12), block(4));
        // Killed before its load completed.
        let (image2, j) = kill(&image, &n);
        let (m, r) = Store::open_in_lazy_with(image2.clone(), true, Some(j)).unwrap();
        assert_eq!(r, Replayed::default());
        assert!(!m.maps_loaded());
        let m = Arc::new(m);
        m.complete_in_background().unwrap().join().unwrap();
        m.verify_consistency().unwrap();
        let eager = Store::open_in(copy(&image2), false).unwrap();
        for vb in [12, 0, 37, 4999 * 3, 150_000, 250_010] {
            assert_eq!(read_at(&m, app, vb), read_at(&eager, app, vb), "block {vb}");
        }
        assert_eq!(read_at(&m, app, 12), block(4));
        drop(staged);
    }

    /// A lazily opened pool whose maps loaded has the allocator an eager open builds: the
    /// same blocks used, and the checkpoint's blocks all known (the next checkpoint frees
    /// them), `check`'s rules all kept.
    #[test]
    fn the_completed_load_builds_the_eager_allocator() {
        let mem = pool();
        let eager = Store::open_in(copy(&mem), false).unwrap();
        let lazy = Arc::new(Store::open_in_lazy(mem.clone(), true).unwrap());
        lazy.complete_in_background().unwrap().join().unwrap();
        assert!(lazy.maps_loaded());
        assert_eq!(lazy.used_blocks(), eager.used_blocks());
        assert_eq!(used(&lazy), used(&eager));
        assert_eq!(lazy.read().pool.meta.ckpt_blocks, {
            let mut b = eager.read().pool.meta.ckpt_blocks.clone();
            b.sort_unstable();
            b
        });
        lazy.verify_consistency().unwrap();
        lazy.checkpoint().unwrap();
        lazy.verify_consistency().unwrap();
    }

    /// A change made while the maps load, as the write paths make it once they load what
    /// they touch (`load_for`) instead of waiting for the completion (DESIGN §12 item 3c):
    /// under the write lock, past `Store::write`'s wait.
    fn change_while_loading(s: &Store, id: LayerId, vb: u64, f: impl FnOnce(&mut Inner)) {
        s.load_for(id, vb * BS, BS).unwrap();
        f(&mut s.inner.write().unwrap());
    }

    /// A commit made while the maps load: staged, made durable, installed.
    fn commit_while_loading(s: &Store) {
        let c = s.inner.write().unwrap().stage(&*s.storage).unwrap();
        let c = c.expect("changes to commit");
        let durable = c.make_durable(&*s.storage);
        let punch = s.inner.write().unwrap().finish(&*s.storage, c, durable);
        if let Some(p) = punch.unwrap() {
            p.run(&*s.storage);
            s.inner.write().unwrap().pool.punched(p);
        }
    }

    fn used(s: &Store) -> Vec<crate::format::PBlock> {
        s.read().pool.alloc.used_blocks().collect()
    }

    /// The ranges' blocks are claimed as they load, so the completion claims only the
    /// streams; a block a range's map held and a change released while the maps loaded
    /// (rewritten, trimmed; in a commit made durable since, or still pending) is un-claimed
    /// at the completion. The allocator after it is an eager open's of the same state: the
    /// same blocks used, once the pending frees are committed too.
    #[test]
    fn releases_made_while_the_maps_load_leave_the_eager_allocator() {
        let mem = pool();
        let lazy = Arc::new(Store::open_in_lazy(mem.clone(), true).unwrap());
        let app = lazy.layer_head("app").unwrap().id;
        let floor = lazy.read_now().pool.alloc.loading_floor().unwrap();
        let mapped = |vb: u64| {
            let g = lazy.read_now();
            let m = g.catalog.get(app).unwrap().map.get(VBlock(vb));
            m.and_then(|m| m.pblock()).unwrap()
        };
        let mut released = Vec::new();
        for (vb, seed) in [(4999 * 5, 1), (4999 * 7, 2)] {
            change_while_loading(&lazy, app, vb, |g| {
                released.push(mapped_in(g, app, vb));
                g.write(&*mem_storage(&lazy), app, vb * BS, &block(seed))
                    .unwrap();
            });
        }
        change_while_loading(&lazy, app, 4999 * 9, |g| {
            released.push(mapped_in(g, app, 4999 * 9));
            g.zero(&*mem_storage(&lazy), app, 4999 * 9 * BS, BS, true)
                .unwrap();
        });
        commit_while_loading(&lazy);
        // Pending at the completion: a committed block rewritten, and a fresh one rewritten.
        change_while_loading(&lazy, app, 4999 * 11, |g| {
            released.push(mapped_in(g, app, 4999 * 11));
            g.write(&*mem_storage(&lazy), app, 4999 * 11 * BS, &block(3))
                .unwrap();
        });
        change_while_loading(&lazy, app, 4999 * 5, |g| {
            g.write(&*mem_storage(&lazy), app, 4999 * 5 * BS, &block(4))
                .unwrap();
        });
        assert!(!lazy.maps_loaded());
        for p in &released {
            assert!(
                p.0 < floor,
                "{p}: a block of the checkpoint, below the floor"
            );
        }
        assert!(mapped(4999 * 11).0 >= floor);
        lazy.complete_in_background().unwrap().join().unwrap();
        assert!(lazy.maps_loaded());
        lazy.verify_consistency().unwrap();
        assert!(lazy.read().load_faults.is_empty());
        // Released and committed: free; released and pending: used until the commit.
        for &p in &released[..3] {
            assert!(!lazy.read().pool.alloc.is_used(p), "{p} still used");
        }
        assert!(lazy.read().pool.alloc.is_used(released[3]));
        lazy.flush().unwrap();
        lazy.verify_consistency().unwrap();
        let eager = Store::open_in(copy(&mem), false).unwrap();
        assert_eq!(used(&lazy), used(&eager));
        let mut buf = vec![0u8; BS as usize];
        eager.read_layer(app, 4999 * 5 * BS, &mut buf).unwrap();
        assert_eq!(buf, block(4));
    }

    fn mapped_in(g: &Inner, id: LayerId, vb: u64) -> crate::format::PBlock {
        let m = g.catalog.get(id).unwrap().map.get(VBlock(vb));
        m.and_then(|m| m.pblock()).expect("a mapped block")
    }

    fn mem_storage(s: &Store) -> Arc<dyn Storage> {
        s.storage.clone()
    }

    /// A pool block two layers' checkpointed maps name is found when the second range
    /// holding it loads (the ranges are audited and claimed as they load), before the
    /// load completes: a fault found late, changes refused from then on, `check` reports it.
    #[test]
    fn a_block_mapped_twice_is_found_when_its_second_range_loads() {
        let mem = pool();
        let s = Store::open_in(mem.clone(), true).unwrap();
        let base = s.layer_head("base").unwrap().id;
        let app = s.layer_head("app").unwrap().id;
        {
            // Damage: app's block 4999 * 20 names base's block 0's pool block.
            let mut g = s.write().unwrap();
            let p = g.catalog.get(base).unwrap().map.get(VBlock(0)).unwrap();
            let Inner {
                catalog, pending, ..
            } = &mut *g;
            let to = Some(crate::layer::Mapping::data(p.pblock().unwrap(), 0));
            let c = crate::layer::Change::Map {
                layer: app,
                vblock: VBlock(4999 * 20),
                to,
            };
            catalog.change(pending, c, |_| {}).unwrap();
        }
        s.flush().unwrap();
        s.checkpoint().unwrap();
        drop(s);
        let lazy = Store::open_in_lazy(mem.clone(), true).unwrap();
        assert!(lazy.read_now().load_faults.is_empty());
        // As reads do (the damaged block's would fail its checksum).
        lazy.load_for(base, 0, BS).unwrap();
        lazy.load_for(app, 4999 * 20 * BS, BS).unwrap();
        assert!(!lazy.maps_loaded());
        let faults = lazy.read_now().load_faults.clone();
        assert!(
            faults
                .iter()
                .any(|f| matches!(f.what, What::UsedTwice { .. })
                    && f.at.layer.as_ref().map(|l| l.id) == Some(app)
                    && f.at.vblock == Some(VBlock(4999 * 20))),
            "{faults:?}"
        );
        assert!(lazy.read_now().faulty().is_some());
        drop(lazy);
        let r = crate::check::check(mem, false, &mut |_, _| {}).unwrap();
        assert!(r
            .faults
            .iter()
            .any(|f| matches!(f.what, What::UsedTwice { .. })));
    }

    /// `df` while the maps load (`Store::usage`) answers without waiting for them, says it
    /// is loading, and counts what an eager open of the same pool counts: every block below
    /// the file's extent at open is used in the loading allocator, but not in its figures
    /// (data from the maps, the ranges not loaded yet by the counters the checkpoint stored;
    /// the streams; the frees waiting for a commit), so free space is not under-reported.
    /// Checked with the rebuild deferred (maps whole), then lazily opened (ranges left).
    #[test]
    fn usage_while_the_maps_load_counts_what_an_eager_open_counts() {
        let first = first_data_block(BS as u32);
        let opts = CreateOptions {
            max_size: Some((first + 40_000) * BS),
            ..Default::default()
        };
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &opts).unwrap();
        let big = s.create_layer("big", None, Some(1 << 30)).unwrap().id;
        s.write_layer(big, 0, &vec![7u8; 3000 * BS as usize])
            .unwrap();
        s.flush().unwrap();
        let a = s.create_layer("a", None, Some(1 << 32)).unwrap().id;
        for i in 0..6000u64 {
            s.write_layer(a, (i * 61 % 900_000) * BS, &block(i))
                .unwrap();
        }
        s.remove_layer("big").unwrap();
        s.checkpoint().unwrap();
        s.write_layer(a, 5 * BS, &block(5)).unwrap();
        s.flush().unwrap();
        drop(s);
        let eager = Store::open_in(copy(&mem), false).unwrap().usage().unwrap();
        assert!(!eager.loading);
        let comparable = |u: &crate::volume::PoolUsage| {
            let sizes = (
                u.allocated,
                u.data_bytes,
                u.metadata_bytes,
                u.free_under_cap,
            );
            (u.layers, sizes, u.virtual_total, u.sharing_saves)
        };
        let deferred = Store::open_in_deferred(copy(&mem), true).unwrap();
        let u = deferred.usage().unwrap();
        assert!(u.loading && !deferred.is_loaded());
        assert_eq!(comparable(&u), comparable(&eager));
        let lazy = Arc::new(Store::open_in_lazy(mem.clone(), true).unwrap());
        assert!(lazy.read_now().lazy.as_ref().unwrap().left() > 0);
        let u = lazy.usage().unwrap();
        assert!(u.loading && !lazy.maps_loaded());
        assert_eq!(comparable(&u), comparable(&eager));
        // A write while the maps load: its frees wait for a commit, its block is new.
        change_while_loading(&lazy, a, 5, |g| {
            g.write(&*mem_storage(&lazy), a, 5 * BS, &block(6)).unwrap();
        });
        let u = lazy.usage().unwrap();
        assert_eq!(u.allocated, eager.allocated + BS);
        lazy.complete_in_background().unwrap().join().unwrap();
        let done = lazy.usage().unwrap();
        assert!(!done.loading);
        assert_eq!(comparable(&done), comparable(&u));
    }

    /// The background load holds the write lock for up to `HOLD`, one range after another;
    /// when a block path waits for the lock (`Store::read_now`, `load_for` count it), it lets
    /// go after the range it is on: a read waits for one range, not for the whole hold.
    #[test]
    fn the_background_load_lets_go_after_one_range_when_a_reader_waits() {
        let mem = pool();
        let lazy = Store::open_in_lazy(mem.clone(), true).unwrap();
        let left = lazy.read_now().lazy.as_ref().unwrap().left();
        assert!(left >= 3, "{left} ranges");
        let done = {
            let _reader = lazy.loaded.waiting();
            let mut g = lazy.inner.write().unwrap();
            g.load_some(&*lazy.storage, &|| lazy.loaded.is_awaited())
                .unwrap()
        };
        assert!(!done);
        assert_eq!(lazy.read_now().lazy.as_ref().unwrap().left(), left - 1);
        // Nobody waiting: a whole hold (the test pool's ranges all fit in one).
        let mut g = lazy.inner.write().unwrap();
        let awaited = || lazy.loaded.is_awaited();
        assert!(!awaited());
        while !g.load_some(&*lazy.storage, &awaited).unwrap() {}
        assert!(g.lazy.as_ref().unwrap().is_complete());
    }
}
