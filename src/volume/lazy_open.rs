//! Opening a version-7 pool without reading its maps (DESIGN.md §12, items 3b and 3c): the
//! open reads the superblock, the checkpoint's records before its maps, its map index and the
//! log (after loading the ranges the log's entries touch), and serves at once. A block path
//! loads the ranges it touches in every layer of the chain first (`Store::load_for`), reads
//! and writes (write, zero, trim) alike, and then goes on without waiting (`read_now`,
//! `write_now`); so does a flush, whose commit goes to the log until the maps are whole
//! (`Inner::stage` defers a checkpoint). The allocator's loading mode (item 3d, `loading.rs`)
//! keeps what writes allocate and free apart from the blocks the unloaded ranges name. Every
//! other method waits at the store's gate (`Store::read`, `Store::write`) until a background
//! thread has loaded the rest and completed the load (`Store::complete_load`: the allocator
//! rebuilt from the whole maps).

use super::invariants;
use super::journal::{Journal, Replayed};
use super::loading::LoadGate;
use super::store::{extent_and_floor, load_generation, load_with, Inner, Store};
use crate::error::{Error, Result};
use crate::fault::{Fault, What, Where};
use crate::format::record::{Record, RecordReader};
use crate::format::superblock::Superblock;
use crate::format::{first_data_block, LayerId, PBlock};
use crate::layer::lazy::{Applied, Decoded, Unloaded};
use crate::layer::{Catalog, Layer};
use crate::pool::meta::{self, MetaStreams};
use crate::pool::{Allocator, Pool, Storage};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

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

/// The ranges a crash journal's record needs loaded before it is replayed: a map entry's,
/// as a log record's (`touched`), and every range of a layer it removes (the removal frees
/// the layer's blocks into the open transaction: a range skipped because its layer is gone
/// would never claim them, and the completion would free blocks the durable state still
/// names until the removal commits).
fn touched_by_replay(lazy: &Unloaded, record: &Record, out: &mut Vec<usize>) {
    match record {
        Record::LayerRemove(layer) => out.extend(lazy.touching(*layer, 0, u64::MAX)),
        _ => touched(lazy, record, out),
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

    /// Load `ranges` (under the write lock, their pages read under it too), each audited
    /// and its blocks claimed as it is applied (`with_claims`).
    fn load_ranges(&mut self, storage: &dyn Storage, ranges: &[usize]) -> Result<()> {
        let sums = self.pool.meta.sums().clone();
        self.with_claims(|lazy, catalog, claim| lazy.load(catalog, storage, &sums, ranges, claim))
    }

    /// Before a crash journal is replayed into a lazily opened pool (`open_in_lazy_with`):
    /// the ranges its transactions that the pool lacks touch, in every layer they touch,
    /// load first, as the log's do at the open (`load_generation_lazy`), so every record
    /// applies to whole chunks and the replay's claims meet the maps it changes. What their
    /// audit finds is a fault of the open (a writable open refuses it). An error (a range or
    /// the journal unreadable) is left to the eager open, which the caller falls back to.
    fn load_for_replay(&mut self, storage: &dyn Storage, journal: &Journal) -> Result<()> {
        let Some(lazy) = &self.lazy else {
            return Ok(());
        };
        let mut want = Vec::new();
        for t in journal.read().iter().filter(|t| self.lacks(t)) {
            let mut r = RecordReader::new(&t.records, "crash journal");
            while let Some(record) = r.next_record()? {
                touched_by_replay(lazy, &record, &mut want);
            }
        }
        want.sort_unstable();
        want.dedup();
        let sums = self.pool.meta.sums().clone();
        let mut faults = Vec::new();
        self.with_claims_finding(&mut faults, |lazy, catalog, claim| {
            lazy.load(catalog, storage, &sums, &want, claim)
        })?;
        self.load_faults.extend(faults);
        Ok(())
    }

    /// Apply ranges read without the lock (`RangeReader::read`), each audited and its blocks
    /// claimed as it is applied; one loaded meanwhile is passed (`Unloaded::apply`).
    fn apply_ranges(&mut self, storage: &dyn Storage, decoded: Vec<Decoded>) -> Result<()> {
        let sums = self.pool.meta.sums().clone();
        self.with_claims(|lazy, catalog, claim| {
            decoded
                .into_iter()
                .try_for_each(|d| lazy.apply(catalog, storage, &sums, d, claim))
        })
    }

    /// Run `load` with what audits each range it applies and claims its blocks
    /// (`invariants::claim_range`): what the audit finds is a fault found late.
    fn with_claims(
        &mut self,
        load: impl FnOnce(&mut Unloaded, &mut Catalog, &mut dyn FnMut(&Catalog, Applied)) -> Result<()>,
    ) -> Result<()> {
        let mut faults = Vec::new();
        let loaded = self.with_claims_finding(&mut faults, load);
        for f in faults {
            self.late_fault(f);
        }
        loaded
    }

    /// `with_claims`, the audit's faults added to `faults`.
    fn with_claims_finding(
        &mut self,
        faults: &mut Vec<Fault>,
        load: impl FnOnce(&mut Unloaded, &mut Catalog, &mut dyn FnMut(&Catalog, Applied)) -> Result<()>,
    ) -> Result<()> {
        let bs = self.block_size;
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
        load(lazy, catalog, &mut claim)
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

/// The background load (`Store::complete_in_background`): the ranges left, a few at a time,
/// then the completion. Returns early when the store is dropped or a range fails to load.
fn load_all(weak: &std::sync::Weak<Store>) {
    let t = Instant::now();
    // Test hook, debug builds only (the crash suites' servers): hold the load open this long,
    // so their writes, flushes and kills come before the completion, not after a small pool's
    // load that takes a millisecond.
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("THINLAYER_TEST_HOLD_LOAD_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    // A range at a time: its pages read and its records decoded without the lock (block
    // paths go on meanwhile: reading from a cold disk under the write lock made a read wait
    // for that disk read, p99 14.9x an eager open's during the load, docs/BENCHMARKS.md
    // "Quiet-machine re-run at 8722aa8"), then one hold of the write lock applies, audits
    // and claims it and picks the next; then the lock is left to the block paths that came
    // meanwhile, for at most as long as the hold took (`BlockPaths::make_way`: without it a
    // read at queue depth 1 met a hold at almost every request, median 3.14x 8722aa8's at
    // 100M, docs/BENCHMARKS.md "Reads during the load: the loader makes way").
    let first = {
        let Some(s) = weak.upgrade() else {
            return;
        };
        let mut g = s.inner.write().unwrap_or_else(|p| p.into_inner());
        #[cfg(test)]
        in_hold(&s);
        g.lazy
            .as_mut()
            .and_then(|l| Some((l.next_to_load()?, l.reader())))
    };
    let Some((mut i, reader)) = first else {
        return complete(weak, t);
    };
    loop {
        let Some(s) = weak.upgrade() else {
            return;
        };
        #[cfg(test)]
        if s.loader_panics.load(std::sync::atomic::Ordering::SeqCst) {
            panic!("test hook: the loader panics");
        }
        let decoded = reader.read(&*s.storage, i);
        let before = s.block_paths.arrived();
        let (applied, held) = {
            let mut g = s.inner.write().unwrap_or_else(|p| p.into_inner());
            let held = Instant::now();
            #[cfg(test)]
            in_hold(&s);
            let applied = g
                .apply_ranges(&*s.storage, vec![decoded])
                .map(|()| g.lazy.as_mut().and_then(|l| l.next_to_load()));
            (applied, held.elapsed())
        };
        match applied {
            Err(e) => {
                s.stop_load(e);
                return;
            }
            Ok(None) => break,
            Ok(Some(next)) => i = next,
        }
        s.block_paths.make_way(before, held);
    }
    complete(weak, t)
}

/// The background load's last step, every range loaded (`load_all`): the completion.
fn complete(weak: &std::sync::Weak<Store>, t: Instant) {
    let Some(s) = weak.upgrade() else {
        return;
    };
    // The checkpoint's blocks, sorted without the lock (every range is loaded: nothing adds
    // to them any more); then one short hold completes the load.
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
}

/// Test hook: the loader holds the write lock (`Store::loader_in_hold`).
#[cfg(test)]
fn in_hold(s: &Store) {
    if let Some(hook) = s.loader_in_hold.lock().unwrap().as_mut() {
        hook();
    }
}

/// Stops the load if the loader thread ends while it is still under way: a panic in it left
/// every waiter at the gate (a capped write, `Store::read`'s callers) waiting for ever. They
/// get the refusal naming the panic instead, and changes are refused (the maps may be half
/// applied); reads of loaded ranges go on.
struct StopUnlessComplete {
    store: std::sync::Weak<Store>,
    /// The panic's message, if the loader panicked.
    panic: Option<String>,
}

impl Drop for StopUnlessComplete {
    fn drop(&mut self) {
        let Some(s) = self.store.upgrade() else {
            return;
        };
        if !s.is_loading() {
            return;
        }
        let why = match &self.panic {
            Some(m) => format!("the thread loading the maps panicked: {m}"),
            None => "the thread loading the maps ended before the load completed".into(),
        };
        s.stop_load(Error::Internal(why));
    }
}

/// What a panic said, if it said it with a string (`panic!` does).
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
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

    /// `open_in_lazy` with a crash journal to replay and keep (writable opens only), as
    /// `open_in_with` does, without loading the whole maps first (DESIGN §10.1 "Which opens
    /// replay"). A journal with nothing to replay (a first start's, a graceful restart's) is
    /// kept as it is. One with transactions the pool lacks (the keeper's after a crash) has
    /// the ranges its records touch loaded first (`load_for_replay`), then replays into the
    /// loading allocator: the blocks its writes went to lie below the floor (the file's
    /// extent at open), where the killed server's allocator may have handed out free space
    /// this one counts as used until the completion; they are claimed among the maps' claims
    /// (`Allocator::claim_fresh`), so a map naming one too is a double reference, refused
    /// now if its range is loaded, found when it loads otherwise.
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
        if let Some(j) = &journal {
            debug_assert!(writable);
            if inner.load_for_replay(&*storage, j).is_err() {
                // A range the replay needs does not load: the eager open says why (or falls
                // back to an older generation, which only a whole load can).
                drop(inner);
                return Self::open_in_with(storage, writable, journal);
            }
        }
        if writable {
            inner.refuse_load_faults()?;
        }
        let mut replayed = Replayed::default();
        if let Some(j) = journal {
            // Before `recover`, as at an eager open (though it punches nothing below the
            // floor while the maps load).
            replayed = inner.replay(&*storage, j)?;
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
        Ok((s, replayed))
    }

    /// Whether the maps are whole (a lazily opened pool's background load is done).
    pub fn maps_loaded(&self) -> bool {
        self.is_loaded()
    }

    /// Before a block path takes the read lock: the ranges of every layer of `id`'s chain
    /// holding blocks of `offset..offset + len` are loaded (under the write lock, briefly).
    /// An error names the damaged page of a range that cannot be loaded.
    pub(crate) fn load_for(&self, id: LayerId, offset: u64, len: u64) -> Result<()> {
        self.load_where(|g| g.ranges_for(id, offset, len))
    }

    /// Before a change to the whole of layer `id`'s own map (its removal frees every block
    /// it maps): every range of it that is not loaded, the other layers' left as they are.
    pub(crate) fn load_layer(&self, id: LayerId) -> Result<()> {
        self.load_where(|g| {
            g.lazy
                .as_ref()
                .map_or_else(Vec::new, |lazy| lazy.touching(id, 0, u64::MAX))
        })
    }

    /// Load the ranges `want` names (asked again under the write lock at the end: what is
    /// left then is a range that failed before, and loading it names its fault).
    fn load_where(&self, want: impl Fn(&Inner) -> Vec<usize>) -> Result<()> {
        if self.is_loaded() {
            return Ok(());
        }
        // The ranges' pages are read and decoded under no lock (the loader's applies and
        // other reads go on), then applied under the write lock, briefly.
        let (want_now, reader) = {
            let g = self.read_now();
            let want = want(&g);
            let Some(lazy) = g.lazy.as_ref().filter(|_| !want.is_empty()) else {
                return Ok(());
            };
            let want: Vec<usize> = want.into_iter().filter(|&i| !lazy.is_settled(i)).collect();
            (want, lazy.reader())
        };
        let decoded = want_now
            .iter()
            .map(|&i| reader.read(&*self.storage, i))
            .collect();
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        g.apply_ranges(&*self.storage, decoded)?;
        // What is left: a range that failed before (named by its recorded fault).
        let left = want(&g);
        g.load_ranges(&*self.storage, &left)
    }

    /// Load the ranges left, a few at a time, then rebuild the allocator, run a writable
    /// open's housekeeping and open the gate (`Store::complete_load`). Holds only a weak
    /// reference: a store dropped meanwhile stops it. A range that cannot be loaded stops the
    /// load (`late_fault`, `load_stopped`): what waits gets the refusal naming it instead of
    /// waiting for ever, changes are refused, and reads of that range fail naming its page.
    /// A panic of the thread stops the load the same way, naming the panic
    /// (`StopUnlessComplete`).
    pub fn complete_in_background(
        self: &Arc<Self>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("maps-load".into())
            .spawn(move || {
                let mut guard = StopUnlessComplete {
                    store: weak.clone(),
                    panic: None,
                };
                let body = std::panic::AssertUnwindSafe(|| load_all(&weak));
                if let Err(p) = std::panic::catch_unwind(body) {
                    guard.panic = Some(panic_message(&*p));
                }
            })
    }

    /// The load cannot go on (`e` says why): recorded as a fault found late (changes are
    /// refused naming it), and the gate's waiters get that refusal.
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
    use crate::pool::sim::Crash;
    use crate::pool::{MemStorage, SimStorage};
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

    /// A range read without the lock (as the background load reads it) that a block path
    /// loaded meanwhile is applied once: the later apply passes it, leaving the map, the
    /// ranges left and the claims as one load left them (applied twice, its blocks were
    /// claimed twice).
    #[test]
    fn a_range_read_without_the_lock_and_loaded_meanwhile_is_applied_once() {
        let mem = pool();
        let lazy = Arc::new(Store::open_in_lazy(mem.clone(), true).unwrap());
        let base = lazy.layer_head("base").unwrap().id;
        let (i, reader) = {
            let g = lazy.read_now();
            let want = g.ranges_for(base, 0, BS);
            (want[0], g.lazy.as_ref().unwrap().reader())
        };
        let decoded = reader.read(&*lazy.storage, i);
        // Meanwhile a read loads it.
        lazy.load_for(base, 0, BS).unwrap();
        let state = |s: &Store| {
            let g = s.read_now();
            let m = &g.catalog.get(base).unwrap().map;
            let left = g.lazy.as_ref().unwrap().left();
            (m.data_blocks(), m.zero_blocks(), left, g.load_faults.len())
        };
        let once = state(&lazy);
        assert!(lazy.read_now().lazy.as_ref().unwrap().is_loaded(i));
        let mut g = lazy.inner.write().unwrap();
        g.apply_ranges(&*lazy.storage, vec![decoded]).unwrap();
        drop(g);
        assert_eq!(state(&lazy), once);
        assert!(lazy.read_now().load_faults.is_empty());
        lazy.complete_in_background().unwrap().join().unwrap();
        assert!(lazy.maps_loaded());
        lazy.verify_consistency().unwrap();
        let eager = Store::open_in(copy(&mem), false).unwrap();
        assert_eq!(used(&lazy), used(&eager));
        for vb in [0, 37, 199_999, 250_010] {
            assert_eq!(
                read_at(&lazy, base, vb),
                read_at(&eager, base, vb),
                "block {vb}"
            );
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Read {
            layer: usize,
            vb: u64,
            n: u64,
        },
        Extents {
            layer: usize,
            vb: u64,
            n: u64,
        },
        /// `n` blocks' worth of bytes at `skew` bytes into block `vb` of "app".
        Write {
            vb: u64,
            n: u64,
            seed: u64,
            skew: u64,
        },
        Zero {
            vb: u64,
            n: u64,
            unmap: bool,
        },
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        let vb = prop_oneof![0u64..300, 0u64..260_000, 149_990u64..150_010];
        let skew = prop_oneof![3 => Just(0u64), 1 => 1u64..BS];
        prop_oneof![
            6 => (0usize..3, vb.clone(), 1u64..40).prop_map(|(layer, vb, n)| Op::Read { layer, vb, n }),
            2 => (0usize..3, vb.clone(), 1u64..2000).prop_map(|(layer, vb, n)| Op::Extents { layer, vb, n }),
            3 => (vb.clone(), 1u64..4, any::<u64>(), skew)
                .prop_map(|(vb, n, seed, skew)| Op::Write { vb, n, seed, skew }),
            1 => (vb, 1u64..4, any::<bool>()).prop_map(|(vb, n, unmap)| Op::Zero { vb, n, unmap }),
            2 => Just(Op::Flush),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// A lazily opened pool, its maps loading in the background meanwhile, answers every
        /// read, block status, write, zero and flush as an eagerly opened copy does (writes
        /// and flushes no longer wait for the load: they load the ranges they touch and
        /// commit to the log); afterwards both are consistent and the lazy one reopens to the
        /// same contents. A power loss taken right after the operations (the load maybe still
        /// under way) leaves a pool `check` calls clean that reads what the eager copy had at
        /// its last flush.
        #[test]
        fn a_lazy_open_answers_as_an_eager_one_while_the_maps_load(
            ops in proptest::collection::vec(op(), 1..40),
            crash_seed in any::<u64>(),
            bg_from in 0usize..40,
        ) {
            let mem = pool();
            let eager_mem = copy(&mem);
            let eager = Store::open_in(eager_mem.clone(), true).unwrap();
            let sim = Arc::new(SimStorage::from_image(mem.snapshot()));
            let lazy = Arc::new(Store::open_in_lazy(sim.clone(), true).unwrap());
            let names = ["base", "app", "img"];
            let app = lazy.layer_head("app").unwrap().id;
            let mut flushed = eager_mem.snapshot();
            let mut touched: Vec<u64> = vec![0, 37, 150_000, 250_000, 14_997];
            // The operations before `bg_from` certainly run while the maps load; the load
            // races the rest.
            let mut bg = None;
            for (i, op) in ops.iter().enumerate() {
                if i == bg_from {
                    bg = Some(lazy.complete_in_background().unwrap());
                }
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
                    Op::Write { vb, n, seed, skew } => {
                        let data: Vec<u8> = (0..n).flat_map(|i| block(seed ^ i)).collect();
                        let ra = lazy.write_layer(app, vb * BS + skew, &data).map_err(|e| e.to_string());
                        let rb = eager.write_layer(app, vb * BS + skew, &data).map_err(|e| e.to_string());
                        prop_assert_eq!(ra, rb);
                        touched.extend(vb..=vb + n);
                    }
                    Op::Zero { vb, n, unmap } => {
                        let ra = lazy.zero_layer(app, vb * BS, n * BS, unmap).map_err(|e| e.to_string());
                        let rb = eager.zero_layer(app, vb * BS, n * BS, unmap).map_err(|e| e.to_string());
                        prop_assert_eq!(ra, rb);
                        touched.extend(vb..vb + n);
                    }
                    Op::Flush => {
                        lazy.flush().unwrap();
                        eager.flush().unwrap();
                        flushed = eager_mem.snapshot();
                    }
                }
            }
            // A power loss now: the durable image and any subset of the writes since the last
            // sync, each maybe torn.
            let crashed = Arc::new(sim.crash(Crash::Subset { seed: crash_seed, sector: 512 }));
            let bg = bg.unwrap_or_else(|| lazy.complete_in_background().unwrap());
            bg.join().unwrap();
            prop_assert!(lazy.maps_loaded());
            lazy.verify_consistency().unwrap();
            eager.verify_consistency().unwrap();
            {
                let r = crate::check::check(copy(&crashed), false, &mut |_, _| {}).unwrap();
                prop_assert!(r.faults.is_empty(), "{:?}", r.faults);
                let after = Store::open_in(crashed, true).unwrap();
                after.verify_consistency().unwrap();
                let then = Store::open_in(Arc::new(MemStorage::from_bytes(flushed)), false).unwrap();
                touched.sort_unstable();
                touched.dedup();
                let d = first_difference(&after, &then, &names, &touched);
                prop_assert!(d.is_none(), "after the power loss: {:?}", d);
            }
            lazy.flush().unwrap();
            drop(lazy);
            let again = Store::open_in(sim.clone(), false).unwrap();
            again.verify_consistency().unwrap();
            let d = first_difference(&again, &eager, &names, &touched);
            prop_assert!(d.is_none(), "{:?}", d);
        }
    }

    /// The first block of `vbs` in layers `names` that reads differently (or fails in one
    /// only) in `a` and `b`.
    fn first_difference(
        a: &Store,
        b: &Store,
        names: &[&str],
        vbs: &[u64],
    ) -> Option<(String, u64)> {
        for name in names {
            let id = a.layer_head(name).unwrap().id;
            for &vb in vbs {
                let (mut x, mut y) = (vec![0u8; BS as usize], vec![0u8; BS as usize]);
                let rx = a.read_layer(id, vb * BS, &mut x).is_ok();
                let ry = b.read_layer(id, vb * BS, &mut y).is_ok();
                if rx != ry || x != y {
                    return Some((name.to_string(), vb));
                }
            }
        }
        None
    }

    /// Run `f` (a change) on another thread; true if it finished without waiting at the load
    /// gate (it would wait for ever: nothing completes the load in these tests).
    fn without_waiting(s: &Arc<Store>, f: impl FnOnce(&Store) + Send + 'static) -> bool {
        let t = {
            let s = s.clone();
            std::thread::spawn(move || f(&s))
        };
        while s.load_waiters() == 0 && !t.is_finished() {
            std::thread::yield_now();
        }
        let waited = s.load_waiters() > 0;
        if waited {
            // Let it go, so the test fails instead of hanging.
            s.complete_in_background().unwrap().join().unwrap();
        }
        t.join().unwrap();
        !waited
    }

    /// Writes, zeroes and flushes while the maps load (nothing loads them in the background
    /// here, so all of it happens before the completion) neither wait for the load nor
    /// write the checkpoint that is due (written from half-loaded maps it would lose the
    /// unloaded ranges). A power loss after them leaves
    /// what the flushes acknowledged, `check` clean, in both an eager and a lazy reopen; the
    /// rewrite of a committed block went above the extent at open.
    #[test]
    fn writes_and_flushes_while_the_maps_load_survive_a_power_loss() {
        let mem = pool();
        let sim = Arc::new(SimStorage::from_image(mem.snapshot()));
        let lazy = Arc::new(Store::open_in_lazy(sim.clone(), true).unwrap());
        // A checkpoint is due (as when the log has grown past the checkpoint's size).
        lazy.inner.write().unwrap().pool.checkpoint_next();
        let floor = sim.len().unwrap() / BS;
        let checkpoint = lazy.read_now().pool.meta.sb.checkpoint;
        let app = lazy.layer_head("app").unwrap().id;
        let went = without_waiting(&lazy, move |s| {
            s.write_layer(app, 4999 * BS, &block(1)).unwrap(); // committed: redirected
            s.write_layer(app, 70_000 * BS + 100, &block(2)).unwrap(); // unaligned
            s.zero_layer(app, 250_001 * BS, 2 * BS, true).unwrap(); // whiteouts over base
            s.flush().unwrap();
            s.write_layer(app, 150_000 * BS, &block(3)).unwrap();
            s.flush().unwrap();
            s.write_layer(app, 4999 * 2 * BS, &block(4)).unwrap(); // never flushed
        });
        assert!(went, "a change waited for the maps");
        assert!(!lazy.maps_loaded());
        assert_eq!(
            lazy.read_now().pool.meta.sb.checkpoint,
            checkpoint,
            "checkpointed while loading"
        );
        let p = lazy
            .read_now()
            .catalog
            .get(app)
            .unwrap()
            .map
            .get(VBlock(4999));
        let p = p.and_then(|m| m.pblock()).unwrap();
        assert!(
            p.0 >= floor,
            "{p} handed out below the extent at open ({floor})"
        );
        let eager = Store::open_in(copy(&mem), false).unwrap();
        let mut before = vec![0u8; 2 * BS as usize];
        eager.read_layer(app, 70_000 * BS, &mut before).unwrap();
        before[100..100 + BS as usize].copy_from_slice(&block(2));
        // What the two flushes acknowledged (and, after the last one, the write after them).
        let expect = |s: &Store, last: Vec<u8>| {
            let same = |vb: u64, want: Vec<u8>| assert!(read_at(s, app, vb) == want, "block {vb}");
            same(4999, block(1));
            let mut b = vec![0u8; 2 * BS as usize];
            s.read_layer(app, 70_000 * BS, &mut b).unwrap();
            assert!(b == before, "the unaligned write");
            same(250_001, vec![0u8; BS as usize]);
            same(250_002, vec![0u8; BS as usize]);
            same(250_003, read_at(&eager, app, 250_003));
            same(150_000, block(3));
            same(4999 * 2, last);
            same(4999 * 3, block(99_999));
        };
        for how in [
            Crash::LoseUnsynced,
            Crash::Subset {
                seed: 7,
                sector: 512,
            },
            Crash::Prefix {
                seed: 9,
                sector: 4096,
            },
        ] {
            let crashed = Arc::new(sim.crash(how));
            let r = crate::check::check(copy(&crashed), false, &mut |_, _| {}).unwrap();
            assert!(r.faults.is_empty(), "{how:?}: {:?}", r.faults);
            let s = Store::open_in(copy(&crashed), true).unwrap();
            s.verify_consistency().unwrap();
            expect(&s, read_at(&eager, app, 4999 * 2));
            let s = Arc::new(Store::open_in_lazy(crashed, true).unwrap());
            expect(&s, read_at(&eager, app, 4999 * 2));
            s.complete_in_background().unwrap().join().unwrap();
            s.verify_consistency().unwrap();
        }
        // Once the maps are whole the checkpoint that was due is written.
        lazy.complete_in_background().unwrap().join().unwrap();
        lazy.write_layer(app, 5 * BS, &block(5)).unwrap();
        lazy.flush().unwrap();
        assert_ne!(lazy.read_now().pool.meta.sb.checkpoint, checkpoint);
        lazy.verify_consistency().unwrap();
        drop(lazy);
        let s = Store::open_in(sim, true).unwrap();
        s.verify_consistency().unwrap();
        expect(&s, block(4));
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
    /// transactions to replay, replays them and opens lazily too (it opened eagerly before
    /// the replay could run into a loading allocator); without the journal the unflushed
    /// writes are lost (so the test can fail).
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
        assert!(!n.maps_loaded(), "a crash's journal made the open eager");
        let expect = |n: &Store| {
            assert_eq!(read_at(n, app, 10), block(1));
            assert_eq!(read_at(n, app, 4999 * 3), block(2));
            assert_eq!(read_at(n, app, 11), block(3));
            assert_eq!(read_at(n, app, 150_000), block(88_888));
        };
        expect(&n);
        let n = Arc::new(n);
        n.complete_in_background().unwrap().join().unwrap();
        n.verify_consistency().unwrap();
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

    /// The kill comes before the load completed, after writes acknowledged while the maps
    /// loaded (one flushed, two not, one a rewrite of a committed block of a range the open
    /// had not loaded): the journal holds the open transaction, so the next server replays
    /// it (lazily, before its own maps load) and finds every write; `check` calls the pool
    /// clean once it commits.
    #[test]
    fn writes_acknowledged_while_the_maps_load_outlive_a_kill_through_the_journal() {
        let mem = pool();
        let (s, _) =
            Store::open_in_lazy_with(mem.clone(), true, Some(Journal::create().unwrap())).unwrap();
        let s = Arc::new(s);
        let app = s.layer_head("app").unwrap().id;
        let went = without_waiting(&s, move |s| {
            s.write_layer(app, 4999 * 5 * BS, &block(1)).unwrap();
            s.flush().unwrap();
            s.write_layer(app, 4999 * 6 * BS, &block(2)).unwrap();
            s.zero_layer(app, 250_000 * BS, BS, false).unwrap();
        });
        assert!(went && !s.maps_loaded());
        let (image, j) = kill(&mem, &s);
        let (n, r) = Store::open_in_lazy_with(image.clone(), true, Some(j)).unwrap();
        assert_eq!(r.transactions, 1);
        assert!(!n.maps_loaded(), "replayed by an eager open");
        let expect = |n: &Store| {
            assert!(read_at(n, app, 4999 * 5) == block(1));
            assert!(read_at(n, app, 4999 * 6) == block(2));
            assert!(read_at(n, app, 250_000) == vec![0u8; BS as usize]);
        };
        expect(&n);
        n.flush().unwrap();
        let n = Arc::new(n);
        n.complete_in_background().unwrap().join().unwrap();
        n.verify_consistency().unwrap();
        expect(&n);
        drop(n);
        let r = crate::check::check(image.clone(), false, &mut |_, _| {}).unwrap();
        assert!(r.faults.is_empty(), "{:?}", r.faults);
        expect(&Store::open_in(image, false).unwrap());
    }

    /// A server killed: the pool file as it stands (a `SimStorage`: its unsynced writes are
    /// still in the page cache, not durable) and a copy of the crash journal the keeper holds.
    fn killed(sim: &SimStorage, s: &Store) -> (Arc<SimStorage>, Journal) {
        let j = Journal::adopt(s.journal_fd().unwrap()).unwrap();
        (Arc::new(sim.killed()), j.picture())
    }

    fn mapped_at(s: &Store, id: LayerId, vb: u64) -> Option<PBlock> {
        let g = s.read_now();
        let m = g.catalog.get(id).and_then(|l| l.map.get(VBlock(vb)));
        m.and_then(|m| m.pblock())
    }

    /// A crash restart (a journal holding transactions the pool lacks) opens lazily: the
    /// next server serves before its maps are loaded, reads answer what the dead server
    /// acknowledged, the completion's used set is an eager open's after the same replay, a
    /// power loss before or after the replay's commit loses nothing flushed and leaves a
    /// pool `check` calls clean. The dead server was killed while its own maps loaded
    /// (its writes above its floor), or after (its writes in the free space below its
    /// extent: the blocks of the layer the log removed), with a layer with ranges removed
    /// in the journal (its ranges load before the replay frees their blocks). Before this
    /// was built such an open was eager (`maps_loaded()` right after it).
    #[test]
    fn a_crash_restart_opens_lazily_and_replays_as_an_eager_open() {
        for load_first in [false, true] {
            crash_restart_case(load_first);
        }
    }

    fn crash_restart_case(load_first: bool) {
        let mem = pool();
        let sim = Arc::new(SimStorage::from_image(mem.snapshot()));
        let (s, _) =
            Store::open_in_lazy_with(sim.clone(), true, Some(Journal::create().unwrap())).unwrap();
        let s = Arc::new(s);
        if load_first {
            s.complete_in_background().unwrap().join().unwrap();
        }
        let extent = sim.len().unwrap() / BS;
        let app = s.layer_head("app").unwrap().id;
        let zero = vec![0u8; BS as usize];
        s.write_layer(app, 4999 * 5 * BS, &block(1)).unwrap();
        s.flush().unwrap();
        // Unflushed: a committed block redirected (its old one a pending free), a fresh one
        // rewritten in place, one trimmed (freed at once) and its block maybe reused, a
        // whiteout over base's run.
        s.write_layer(app, 4999 * 6 * BS, &block(2)).unwrap();
        s.write_layer(app, 10 * BS, &block(3)).unwrap();
        s.write_layer(app, 10 * BS, &block(4)).unwrap();
        s.write_layer(app, 12 * BS, &block(5)).unwrap();
        let trimmed = mapped_at(&s, app, 12).unwrap();
        s.zero_layer(app, 12 * BS, BS, true).unwrap();
        s.write_layer(app, 13 * BS, &block(6)).unwrap();
        // The replay takes that block, frees it and takes it again (`replay_freed`).
        assert_eq!(mapped_at(&s, app, 13), Some(trimmed));
        s.zero_layer(app, 250_000 * BS, BS, false).unwrap();
        if load_first {
            s.remove_layer("img").unwrap();
            let p = mapped_at(&s, app, 10).unwrap();
            assert!(p.0 < extent, "{p}: not in the free space below {extent}");
        }
        assert_eq!(s.maps_loaded(), load_first);
        let (image, j) = killed(&sim, &s);
        drop(s);
        let acknowledged = |n: &Store| {
            assert!(read_at(n, app, 4999 * 5) == block(1));
            assert!(read_at(n, app, 4999 * 6) == block(2));
            assert!(read_at(n, app, 10) == block(4));
            assert!(read_at(n, app, 13) == block(6));
            assert!(read_at(n, app, 250_000) == zero);
            assert_eq!(n.layer_head("img").is_err(), load_first);
        };
        let vbs = [
            4999 * 5,
            4999 * 6,
            10,
            12,
            13,
            250_000,
            250_001,
            0,
            37,
            4999 * 3,
            150_000,
        ];
        // The same bytes replayed by an eager open (the behaviour before), and lazily.
        let (eager, re) = Store::open_in_with(
            Arc::new(MemStorage::from_bytes(image.current_image())),
            true,
            Some(j.picture()),
        )
        .unwrap();
        acknowledged(&eager);
        let (n, r) = Store::open_in_lazy_with(image.clone(), true, Some(j.picture())).unwrap();
        assert!(r.transactions > 0 && r.blocks > 0, "{r:?}");
        assert_eq!(r, re);
        assert!(!n.maps_loaded(), "a crash restart opened eagerly");
        assert_eq!(first_difference(&n, &eager, &["app", "base"], &vbs), None);
        acknowledged(&n);
        // The completion's allocator is the eager open's after the same replay.
        let other = Arc::new(
            Store::open_in_lazy_with(Arc::new(image.killed()), true, Some(j.picture()))
                .unwrap()
                .0,
        );
        other.complete_in_background().unwrap().join().unwrap();
        assert!(
            other.read().load_faults.is_empty(),
            "{:?}",
            other.read().load_faults
        );
        other.verify_consistency().unwrap();
        assert_eq!(used(&other), used(&eager));
        assert_eq!(other.used_blocks(), eager.used_blocks());
        // A power loss (two kinds) with `seed`: `check` is clean, and the pool reopened
        // holds what `holds` asks.
        let power_loss = |seed: u64, holds: &dyn Fn(&Store)| {
            for how in [Crash::LoseUnsynced, Crash::Subset { seed, sector: 512 }] {
                let crashed = Arc::new(image.crash(how));
                let c = crate::check::check(copy(&crashed), false, &mut |_, _| {}).unwrap();
                assert!(c.faults.is_empty(), "{how:?}: {:?}", c.faults);
                let after = Store::open_in(crashed, true).unwrap();
                after.verify_consistency().unwrap();
                holds(&after);
            }
        };
        // Right after the replay: what was flushed is there.
        power_loss(5, &|after| {
            assert!(read_at(after, app, 4999 * 5) == block(1))
        });
        // The replay commits with the next flush, while the maps load; a power loss after it
        // loses nothing acknowledged.
        n.flush().unwrap();
        assert!(!n.maps_loaded());
        power_loss(9, &|after| {
            acknowledged(after);
            let d = first_difference(after, &eager, &["app", "base"], &vbs);
            assert_eq!(d, None);
        });
        let n = Arc::new(n);
        n.complete_in_background().unwrap().join().unwrap();
        assert!(
            n.read().load_faults.is_empty(),
            "{:?}",
            n.read().load_faults
        );
        n.verify_consistency().unwrap();
        n.write_layer(app, 14 * BS, &block(7)).unwrap();
        n.flush().unwrap();
        n.verify_consistency().unwrap();
        drop(n);
        let c = crate::check::check(
            copy(&image.crash(Crash::LoseUnsynced)),
            false,
            &mut |_, _| {},
        );
        assert!(c.unwrap().faults.is_empty());
        let again = Store::open_in(image, false).unwrap();
        acknowledged(&again);
        assert!(read_at(&again, app, 14) == block(7));
    }

    /// A crash journal naming a block the pool's maps hold is a double reference, as at an
    /// eager open: refused at the open if the map holding it is loaded by then (the log's
    /// ranges, the journal's own), a fault found late (changes refused, `check` reports
    /// it) when the range holding it loads after the open. A block of a stream is refused.
    #[test]
    fn a_crash_journal_naming_a_block_the_pool_holds_is_a_fault_when_opened_lazily() {
        use crate::format::record::{MapEntry, MapTarget, RecordWriter};
        let mem = pool();
        let eager = Store::open_in(copy(&mem), false).unwrap();
        let base = eager.layer_head("base").unwrap().id;
        let app = eager.layer_head("app").unwrap().id;
        let journal = |vb: u64, p: PBlock| {
            let mut w = RecordWriter::new();
            let target = MapTarget::Data { pblock: p, crc: 1 };
            w.map(
                app,
                MapEntry {
                    vblock: VBlock(vb),
                    target,
                },
            );
            let mut j = Journal::create().unwrap();
            j.records(7, &w.buf);
            Some(j)
        };
        // In a range loaded after the open: base's block 0.
        let held = mapped_at(&eager, base, 0).unwrap();
        let (n, r) = Store::open_in_lazy_with(copy(&mem), true, journal(4999 * 20, held)).unwrap();
        assert_eq!(r.transactions, 1);
        assert!(!n.maps_loaded() && n.read_now().load_faults.is_empty());
        n.load_for(base, 0, BS).unwrap();
        let faults = n.read_now().load_faults.clone();
        assert!(
            faults
                .iter()
                .any(|f| matches!(f.what, What::UsedTwice { .. }) && f.at.pblock == Some(held)),
            "{faults:?}"
        );
        assert!(n.write_layer(app, 0, &block(1)).is_err());
        // In a range loaded by the open (the log's): app's block 4999 * 3.
        let logged = mapped_at(&eager, app, 4999 * 3).unwrap();
        let e = Store::open_in_lazy_with(copy(&mem), true, journal(4999 * 20, logged));
        assert!(e.err().unwrap().to_string().contains("uses it already"));
        // A block of the log.
        let log = eager.read().pool.meta.log_blocks[0];
        let e = Store::open_in_lazy_with(copy(&mem), true, journal(4999 * 20, log));
        assert!(e.err().unwrap().to_string().contains("uses it already"));
    }

    /// A panic in the background loader stops the load instead of leaving the gate shut: the
    /// gate's waiters get the refusal naming the panic, changes are refused, reads of the
    /// ranges already loaded go on. Without the guard the load stayed "loading" for ever.
    #[test]
    fn a_panic_in_the_loader_opens_the_gate_with_a_refusal_naming_it() {
        let mem = pool();
        let s = Arc::new(Store::open_in_lazy(mem.clone(), true).unwrap());
        let app = s.layer_head("app").unwrap().id;
        let before = read_at(&s, app, 150_000);
        s.loader_panics
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_loaded())
        };
        s.complete_in_background().unwrap().join().unwrap();
        assert!(!s.is_loading(), "the load still counts as under way");
        let e = waiter.join().unwrap().unwrap_err();
        assert!(matches!(e, Error::Faulty { .. }), "{e}");
        assert!(
            e.to_string().contains("test hook: the loader panics"),
            "{e}"
        );
        let w = s.write_layer(app, 0, &block(1)).unwrap_err();
        assert!(matches!(w, Error::Faulty { .. }), "{w}");
        assert_eq!(read_at(&s, app, 150_000), before);
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

    /// The background load takes the store's write lock once a range (and once to start):
    /// each hold is a moment a block path arriving then waits for, and a read arriving
    /// while the loader waited for the lock queued behind it too (std's lock lets a waiting
    /// writer go first). It took it twice a range (once to pick the range, once to apply it).
    #[test]
    fn the_loader_takes_the_write_lock_once_a_range() {
        let mem = pool();
        let lazy = Arc::new(Store::open_in_lazy(mem, true).unwrap());
        let left = lazy.read_now().lazy.as_ref().unwrap().left();
        let holds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = holds.clone();
        *lazy.loader_in_hold.lock().unwrap() = Some(Box::new(move || {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        lazy.complete_in_background().unwrap().join().unwrap();
        assert!(lazy.maps_loaded());
        let holds = holds.load(std::sync::atomic::Ordering::SeqCst);
        assert!(holds <= left + 1, "{holds} holds for {left} ranges");
    }

    /// A reader at queue depth 1 (one read, then the next) that arrives while the loader
    /// holds the write lock is served, both reads, before the loader's next hold: the loader
    /// leaves the lock to the block paths that came during its hold. It came back for the
    /// lock after only the next range's decode, so such a reader met a hold at almost every
    /// read (docs/BENCHMARKS.md "Reads during the load: the loader makes way").
    #[test]
    fn a_reader_that_came_during_a_hold_goes_before_the_loaders_next_hold() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let mem = pool();
        let lazy = Arc::new(Store::open_in_lazy(mem, true).unwrap());
        let app = lazy.layer_head("app").unwrap().id;
        // The blocks it reads are loaded (their ranges in every layer of the chain), so the
        // reads take only the read lock.
        lazy.load_for(app, 0, 2 * BS).unwrap();
        assert!(lazy.read_now().lazy.as_ref().unwrap().left() >= 2);
        #[derive(Debug, PartialEq)]
        enum Event {
            Hold,
            Read,
        }
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let holds = Arc::new(AtomicUsize::new(0));
        let reader = Arc::new(std::sync::Mutex::new(None));
        let hook = {
            let (events, holds, reader) = (events.clone(), holds.clone(), reader.clone());
            let store = Arc::downgrade(&lazy);
            move || {
                events.lock().unwrap().push(Event::Hold);
                // The second hold (the first range's apply): a reader comes.
                if holds.fetch_add(1, SeqCst) != 1 {
                    return;
                }
                let s = store.upgrade().unwrap();
                let arrived = s.block_paths.arrived();
                let events = events.clone();
                let s2 = s.clone();
                *reader.lock().unwrap() = Some(std::thread::spawn(move || {
                    for vb in 0..2 {
                        read_at(&s2, app, vb);
                        events.lock().unwrap().push(Event::Read);
                    }
                }));
                // Until it is there (waiting for the lock this hold holds).
                while s.block_paths.arrived() == arrived {
                    std::thread::yield_now();
                }
            }
        };
        *lazy.loader_in_hold.lock().unwrap() = Some(Box::new(hook));
        lazy.complete_in_background().unwrap().join().unwrap();
        reader.lock().unwrap().take().unwrap().join().unwrap();
        assert!(lazy.maps_loaded());
        let events = events.lock().unwrap();
        let second = events.iter().position(|e| *e == Event::Hold).unwrap() + 1;
        assert_eq!(
            &events[second..second + 4],
            &[Event::Hold, Event::Read, Event::Read, Event::Hold],
            "{events:?}"
        );
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
        // Through the store's write paths, which load what they touch and go on while the
        // maps load.
        let mut released = Vec::new();
        let before = |vb: u64| {
            lazy.load_for(app, vb * BS, BS).unwrap();
            mapped(vb)
        };
        for (vb, seed) in [(4999 * 5, 1), (4999 * 7, 2)] {
            released.push(before(vb));
            lazy.write_layer(app, vb * BS, &block(seed)).unwrap();
        }
        released.push(before(4999 * 9));
        lazy.zero_layer(app, 4999 * 9 * BS, BS, true).unwrap();
        lazy.flush().unwrap();
        // Pending at the completion: a committed block rewritten, and a fresh one rewritten.
        released.push(before(4999 * 11));
        lazy.write_layer(app, 4999 * 11 * BS, &block(3)).unwrap();
        lazy.write_layer(app, 4999 * 5 * BS, &block(4)).unwrap();
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
        lazy.write_layer(a, 5 * BS, &block(6)).unwrap();
        let u = lazy.usage().unwrap();
        assert_eq!(u.allocated, eager.allocated + BS);
        lazy.complete_in_background().unwrap().join().unwrap();
        let done = lazy.usage().unwrap();
        assert!(!done.loading);
        assert_eq!(comparable(&done), comparable(&u));
    }
}
