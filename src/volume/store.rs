//! The store: one open pool. It ties the pool file (allocation, commits) to the catalogue and
//! serialises access: reads share a lock, changes take it exclusively. Each change to the
//! catalogue or a map is applied in memory and appended as a record to the open transaction;
//! `flush` commits that transaction.

use super::invariants;
use super::journal::{Journal, Journaled, Replayed};
use super::loading::LoadGate;
use crate::error::{Error, Result};
use crate::fault::{Fault, What, Where};
use crate::format::record::{RecordReader, RecordWriter};
use crate::format::{first_data_block, valid_block_size};
use crate::layer::map::CrcRef;
use crate::layer::Catalog;
use crate::pool::lock::PoolLock;
use crate::pool::meta::{self, MetaStreams};
use crate::pool::{Allocator, FileStorage, Pool, Storage};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub struct Store {
    pub(crate) storage: Arc<dyn Storage>,
    path: Option<PathBuf>,
    pub(crate) inner: RwLock<Inner>,
    /// Serialises commits, whose slow part runs outside `inner`'s lock.
    commit_lock: std::sync::Mutex<()>,
    /// Group commit: commits sealed so far, and commits made durable so far (in order). A
    /// flush is satisfied by any commit sealed after it arrived.
    sealed: AtomicU64,
    durable: AtomicU64,
    writable: bool,
    /// Half-imported layers removed at open (see `discard_incomplete`).
    discarded: std::sync::Mutex<Vec<String>>,
    /// The first layer ID this process hands out: a layer below it that is still being
    /// imported was left so by a crash (or a dead server whose journal was replayed), one at
    /// or above it is an import under way here (begun while a lazily opened pool's maps load).
    opened_at: crate::format::LayerId,
    lock: std::sync::Mutex<Option<PoolLock>>,
    /// Handed to another process (`release`): no change may be made until `take_back`.
    released: AtomicBool,
    /// Whether every map is loaded and the allocator rebuilt from them (`loading.rs`).
    pub(crate) loaded: LoadGate,
    /// Test hook: the background loader of the maps panics (`lazy_open.rs`).
    #[cfg(test)]
    pub(crate) loader_panics: AtomicBool,
}

pub(crate) struct Inner {
    /// The pool file's streams and allocator, and the commit protocol that moves them.
    pub pool: Pool,
    pub catalog: Catalog,
    /// The open transaction: every change since the last commit, as records.
    pub pending: RecordWriter,
    pub block_size: u32,
    /// Rules the loaded state breaks (blocks referenced twice...): `check` reports them and a
    /// writable open refuses them.
    pub load_faults: Vec<Fault>,
    /// Superblock slots that did not verify, and a fallback to an older generation.
    pub load_notes: Vec<Fault>,
    /// The highest generation of any valid slot, and whether a slot was invalid or skipped.
    pub newest_seen: u64,
    pub slot_damaged: bool,
    /// The crash journal (a live server's): a copy of `pending` that outlives the process.
    pub journal: Option<Journaled>,
    /// A lazily opened pool's map ranges still on disk (`layer::lazy`); None once whole.
    pub lazy: Option<crate::layer::lazy::Unloaded>,
    /// Where each remote layer's missing blocks come from (`remote.rs`), as a frontend
    /// attached them; a remote layer without one reads none of its unmapped blocks.
    pub remotes: super::remote::Remotes,
}

/// The store's write lock. Dropping it copies the changes made under it into the crash
/// journal (if the store keeps one) before any of them is acknowledged: every change passes
/// here, so no call site can forget it.
pub(crate) struct WriteGuard<'a>(RwLockWriteGuard<'a, Inner>);

impl std::ops::Deref for WriteGuard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl std::ops::DerefMut for WriteGuard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.0
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.0.mirror();
    }
}

/// How to create a pool.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub block_size: u32,
    /// Cap on the pool file's size in bytes (None = unlimited).
    pub max_size: Option<u64>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            block_size: crate::format::DEFAULT_BLOCK_SIZE,
            max_size: None,
        }
    }
}

fn now() -> (u64, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now().0 ^ ((std::process::id() as u64) << 32) ^ now().1 as u64);
    h.finish()
}

impl Store {
    /// Create a new pool file at `path` (refusing to overwrite anything) and open it.
    pub fn create(path: &Path, opts: &CreateOptions, purpose: &str) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating directory {}", dir.display()), e))?;
        }
        let lock = PoolLock::acquire(path, purpose)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::AlreadyExists(format!(
                        "{} already exists; remove it first or choose another --pool",
                        path.display()
                    ))
                } else {
                    Error::io(format!("creating pool {}", path.display()), e)
                }
            })?;
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
        let mut store = match Self::create_in(storage, opts) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e.context(format!("creating pool {}", path.display())));
            }
        };
        // The new file's name must survive power loss too.
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        store.path = Some(path.to_path_buf());
        store.lock = std::sync::Mutex::new(Some(lock));
        Ok(store)
    }

    /// Create a pool on any storage (tests use memory).
    pub fn create_in(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<Store> {
        let bs = opts.block_size;
        if !valid_block_size(bs as u64) {
            return Err(Error::InvalidInput(format!(
                "block size {bs} is not a power of two from 4 KiB to 1 MiB"
            )));
        }
        let first = first_data_block(bs);
        let max_blocks = match opts.max_size {
            None => 0,
            Some(m) => {
                let b = m / bs as u64;
                if b < first + 16 {
                    return Err(Error::InvalidInput(format!(
                        "--max-size {m} is too small: a pool needs at least {} bytes with {bs}-byte blocks",
                        (first + 16) * bs as u64
                    )));
                }
                b
            }
        };
        let mut alloc = Allocator::new(first, max_blocks);
        let meta = MetaStreams::init(&*storage, &mut alloc, bs, max_blocks, random_id(), now().0)?;
        let inner = Inner {
            pool: Pool::new(meta, alloc, bs),
            catalog: Catalog::new(),
            pending: RecordWriter::new(),
            block_size: bs,
            load_faults: Vec::new(),
            load_notes: Vec::new(),
            newest_seen: 1,
            slot_damaged: false,
            journal: None,
            lazy: None,
            remotes: Default::default(),
        };
        Ok(Store::around(storage, inner, true, LoadGate::complete()))
    }

    /// Open an existing pool for changes, taking its lock.
    pub fn open(path: &Path, purpose: &str) -> Result<Store> {
        Ok(Self::open_with_journal(path, purpose, None)?.0)
    }

    /// Open a pool to look at it, without the lock: works while another process serves it.
    /// What it sees is the last state that process committed.
    pub fn open_read_only(path: &Path) -> Result<Store> {
        let file = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|e| open_error(path, e))?;
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
        // A writer may checkpoint (and reuse the old pages) while we read: retry on a mismatch.
        let mut last = None;
        for _ in 0..5 {
            match Self::open_in(storage.clone(), false) {
                Ok(mut s) => {
                    s.path = Some(path.to_path_buf());
                    return Ok(s);
                }
                Err(e @ Error::Corrupt(_)) => {
                    last = Some(e);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e.context(format!("pool {}", path.display()))),
            }
        }
        Err(last.unwrap().context(format!("pool {}", path.display())))
    }

    /// Open a pool for a live server that keeps a crash journal: the records a killed
    /// predecessor left in `journal` (acknowledged writes not yet committed) are replayed into
    /// the open transaction before anything else happens, and the journal goes on with this
    /// store's changes. A new journal has nothing to replay.
    pub fn open_with_journal(
        path: &Path,
        purpose: &str,
        journal: Option<Journal>,
    ) -> Result<(Store, Replayed)> {
        Self::open_path(path, purpose, |st| Self::open_in_with(st, true, journal))
    }

    /// Take the lock of the pool file at `path`, open it for changes and run `open` on it
    /// (an eager or a lazy open); the store gets the path and the lock.
    pub(super) fn open_path<T>(
        path: &Path,
        purpose: &str,
        open: impl FnOnce(Arc<dyn Storage>) -> Result<(Store, T)>,
    ) -> Result<(Store, T)> {
        let lock = PoolLock::acquire(path, purpose)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| open_error(path, e))?;
        let (mut s, r) = open(Arc::new(FileStorage::new(file)))
            .map_err(|e| e.context(format!("pool {}", path.display())))?;
        s.set_path_and_lock(path, lock);
        Ok((s, r))
    }

    /// Open a pool held by any storage.
    pub fn open_in(storage: Arc<dyn Storage>, writable: bool) -> Result<Store> {
        Ok(Self::open_in_with(storage, writable, None)?.0)
    }

    /// `open_in`, with a crash journal to replay and keep (writable opens only).
    pub fn open_in_with(
        storage: Arc<dyn Storage>,
        writable: bool,
        journal: Option<Journal>,
    ) -> Result<(Store, Replayed)> {
        Self::open_in_mode(storage, writable, journal, false)
    }

    /// `open_in_with`; `deferred`: the allocator is left in its loading mode (nothing below
    /// the file's extent at open is handed out or freed) until `complete_load`, and the
    /// audit's faults are found then (`loading.rs`). A deferred open takes no journal: it
    /// claims nothing as it loads, so a replay could not claim the blocks below the extent
    /// its writes went to (a lazy open does, `open_in_lazy_with`).
    pub(crate) fn open_in_mode(
        storage: Arc<dyn Storage>,
        writable: bool,
        journal: Option<Journal>,
        deferred: bool,
    ) -> Result<(Store, Replayed)> {
        if deferred && journal.is_some() {
            return Err(Error::Internal(
                "a crash journal is replayed by an eager or a lazy open, not a deferred one".into(),
            ));
        }
        let mut inner = load(&*storage, deferred)?;
        if writable {
            inner.refuse_load_faults()?;
        }
        let mut replayed = Replayed::default();
        if let Some(j) = journal {
            debug_assert!(writable);
            // Before `recover`: the blocks the journal's writes went to are free in the
            // durable state, and recovery punches free space.
            replayed = inner.replay(&*storage, j)?;
        }
        let gate = if deferred {
            LoadGate::loading()
        } else {
            LoadGate::complete()
        };
        let store = Store::around(storage, inner, writable, gate);
        if writable {
            store.inner.write().unwrap().recover(&*store.storage)?;
            // Its commit may need room a capped pool has only below the extent, which a
            // deferred load frees at its completion: `load_done` discards them then.
            if !deferred {
                store.discard_incomplete()?;
            }
        }
        Ok((store, replayed))
    }

    /// A store around loaded state (a create, an open, a lazy open's `lazy_open`): no path or
    /// pool lock yet (the callers that have them set them), nothing committed this process.
    pub(super) fn around(
        storage: Arc<dyn Storage>,
        inner: Inner,
        writable: bool,
        loaded: LoadGate,
    ) -> Store {
        let opened_at = inner.catalog.next_id();
        Store {
            storage,
            path: None,
            inner: RwLock::new(inner),
            commit_lock: std::sync::Mutex::new(()),
            sealed: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            writable,
            discarded: Default::default(),
            opened_at,
            lock: std::sync::Mutex::new(None),
            released: AtomicBool::new(false),
            loaded,
            #[cfg(test)]
            loader_panics: AtomicBool::new(false),
        }
    }

    /// The pool file's path and lock, for a store opened on it.
    pub(super) fn set_path_and_lock(&mut self, path: &Path, lock: PoolLock) {
        self.path = Some(path.to_path_buf());
        self.lock = std::sync::Mutex::new(Some(lock));
    }

    /// The self-check, for tests: verify the live state (volume/invariants.rs); `Error::Corrupt`
    /// lists every fault. `check` (the fsck) looks at what is durable; this also catches
    /// blocks leaked or mapped twice by the open transaction.
    pub fn verify_consistency(&self) -> Result<()> {
        let g = self.read();
        let mut faults: Vec<Fault> = g.load_faults.clone();
        let (c, p) = (&g.catalog, &g.pool);
        faults.extend(invariants::live(c, &p.meta, &p.alloc, g.block_size));
        if faults.is_empty() {
            return Ok(());
        }
        // The first few name the damage; thousands would bury it.
        const SHOWN: usize = 20;
        let mut all: Vec<String> = faults.iter().take(SHOWN).map(|f| f.to_string()).collect();
        if faults.len() > SHOWN {
            all.push(format!("and {} more", faults.len() - SHOWN));
        }
        Err(Error::Corrupt(format!(
            "{} consistency fault(s): {}",
            faults.len(),
            all.join("; ")
        )))
    }

    /// A second descriptor of the crash journal, for whoever must outlive this process (the
    /// keeper, the next server of a restart). None without a journal.
    pub fn journal_fd(&self) -> Option<std::os::fd::OwnedFd> {
        // No map is looked at: a lazily opened pool's serve must not wait for them here.
        let g = self.read_now();
        g.journal
            .as_ref()
            .and_then(|j| j.journal.fd().try_clone_to_owned().ok())
    }

    /// Blocks the allocator counts as used (data, metadata, and frees awaiting commit).
    pub fn used_blocks(&self) -> u64 {
        self.read().pool.alloc.used_count()
    }

    /// Remove layers a crash left half-imported (committed by the open transaction's
    /// commits, never finished), in one commit. Their names are kept for `discarded`. An
    /// import this process began (while a lazy open's maps loaded) is not one of them.
    pub(crate) fn discard_incomplete(&self) -> Result<()> {
        let names: Vec<String> = self
            .read()
            .catalog
            .layers()
            .filter(|l| l.incomplete && l.id < self.opened_at)
            .map(|l| l.name.clone())
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        for n in &names {
            self.remove_layer(n)?;
        }
        self.flush()?;
        self.read_discarded().extend(names);
        Ok(())
    }

    /// Layers this open removed because a crash had left them half-imported.
    pub fn discarded(&self) -> Vec<String> {
        self.read_discarded().clone()
    }

    fn read_discarded(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.discarded.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn block_size(&self) -> u32 {
        self.read_now().block_size
    }

    /// The read lock, once a lazily opened pool's maps are whole (`lazy_open`): everything
    /// that may look at a whole map is correct without knowing of the lazy load. A load
    /// stopped by a fault opens the way too (reads of its damaged range fail naming it).
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Inner> {
        if !self.is_loaded() && self.read_now().lazy.is_some() {
            let _ = self.wait_loaded();
        }
        self.read_now()
    }

    /// The read lock without waiting for the maps: for the block paths, which load the
    /// ranges they touch first (`load_for`), and what needs no map.
    pub(crate) fn read_now(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The write lock, for a change: refused on a read-only or poisoned store. A lazily
    /// opened pool's changes wait here until its maps are whole (everything that may look
    /// at a whole map, a layer's removal or accounting, is correct unchanged), except the
    /// block paths' and commits', which take `write_now`.
    pub(crate) fn write(&self) -> Result<WriteGuard<'_>> {
        self.write_with(true)
    }

    /// The write lock without waiting for a lazily opened pool's maps (`lazy_open.rs`): for
    /// a change to blocks of a layer whose ranges are loaded in every layer of its chain
    /// (`load_for` first, as the reads do), and for a commit, which writes the log only
    /// until the maps are whole (`Inner::stage` defers a checkpoint). The allocator's loading
    /// mode (§5.3) keeps what they allocate and free apart from the blocks the unloaded
    /// ranges name.
    pub(crate) fn write_now(&self) -> Result<WriteGuard<'_>> {
        self.write_with(false)
    }

    fn write_with(&self, whole: bool) -> Result<WriteGuard<'_>> {
        if !self.writable {
            return Err(Error::ReadOnly(
                "the pool is opened read-only (another process may hold it)".into(),
            ));
        }
        if self.released.load(Ordering::SeqCst) {
            return Err(Error::Busy(
                "the pool was handed to the next server process (thinlayer restart)".into(),
            ));
        }
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if whole && g.lazy.is_some() {
            drop(g);
            self.wait_loaded()?;
            g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        }
        g.pool.usable()?;
        // A fault found after the open (loading.rs) refuses changes as a writable open
        // refuses a pool with faults.
        if let Some(e) = g.faulty() {
            return Err(e);
        }
        Ok(WriteGuard(g))
    }

    /// Hand the pool to another process (`thinlayer restart`): commit, then let go of the
    /// lock, and refuse every change from now on. The caller has stopped all I/O first.
    /// Nothing is closed: if the other process cannot take over, `take_back` resumes.
    pub fn release(&self) -> Result<()> {
        self.flush()
            .map_err(|e| e.context("commit before the hand-over"))?;
        let _one = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.released.store(true, Ordering::SeqCst);
        self.sums().stop_prefetch();
        *self.lock.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// Take the pool back after a failed hand-over: the lock again, and the state again from
    /// the file, since a process that opened it (and failed after) may have written its
    /// housekeeping (a superblock naming the log's tail). Everything was committed at
    /// `release` and nothing could change since, so the layers read back the same.
    pub fn take_back(&self, purpose: &str) -> Result<()> {
        let path = self.path.clone().ok_or_else(|| {
            Error::Internal("take_back: a store without a pool file cannot be handed over".into())
        })?;
        let lock = PoolLock::acquire(&path, purpose)?;
        let _one = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh = load(&*self.storage, false)
            .map_err(|e| e.context("reloading after a failed hand-over"))?;
        fresh.recover(&*self.storage)?;
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        // Everything was committed at `release`: the journal starts over, empty.
        fresh.journal = g.journal.take();
        if let Some(j) = &mut fresh.journal {
            j.journal.resync();
        }
        *g = fresh;
        g.journal_durable();
        drop(g);
        *self.lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock);
        self.released.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Start writing the blocks written so far back to the pool's disk, not waiting for them:
    /// a bulk writer (an import) calls this as it goes, so the commit that ends it finds
    /// little left to sync and the disk works while the writer computes. Only a hint: what
    /// is durable is still what `flush` made so, and an I/O error shows at that flush.
    pub fn start_writeback(&self) {
        let _ = self.storage.start_writeback();
    }

    /// Commit the open transaction: every change made before this call survives a crash.
    /// The protocol is `Pool`'s (pool/commit.rs); the store only holds its lock around the
    /// steps that change memory, and lets go of it for the syncs.
    pub fn flush(&self) -> Result<()> {
        // A capped pool full above the file's extent while the maps load: wait for the rest.
        self.with_room(|| self.flush_once())
    }

    fn flush_once(&self) -> Result<()> {
        // Group commit. Everything acknowledged before this call is in the open transaction
        // or in a commit sealed since `sealed` was read here, so the next commit to be sealed
        // covers it: if another caller's commit sealed after we arrived and completed while
        // we waited for the lock, we are done. A flush thus waits for at most one commit that
        // started after it, however many callers flush at once.
        let need = self.sealed.load(Ordering::SeqCst) + 1;
        // One commit at a time; reads and writes go on while it syncs.
        let _one = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.durable.load(Ordering::SeqCst) >= need {
            return Ok(());
        }
        let commit = {
            // Not waiting for a lazily opened pool's maps: a container's fsync must not stall
            // for the whole load. Until they are whole the commit goes to the log.
            let mut g = self.write_now()?;
            g.mirror();
            let c = g.stage(&*self.storage)?;
            // Counted under the store lock: no write can be acknowledged between sealing and
            // counting, so a caller that read the old count is covered by this commit.
            let n = self.sealed.fetch_add(1, Ordering::SeqCst) + 1;
            match c {
                // Nothing pending: the state is as durable as the last commit.
                None => {
                    self.durable.store(n, Ordering::SeqCst);
                    return Ok(());
                }
                Some(c) => (c, n),
            }
        };
        let (commit, n) = commit;
        // What the commit names was written before step 1 and is never overwritten until the
        // commit is installed, so writes may go on meanwhile.
        let durable = commit.make_durable(&*self.storage);
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let punch = g.finish(&*self.storage, commit, durable)?;
        g.mirror();
        g.journal_durable();
        drop(g);
        self.durable.store(n, Ordering::SeqCst);
        // Step 6 without the store lock: punching can take long enough to stall every
        // connection (measured: it made fio's p99 5x worse under frequent commits).
        if let Some(p) = punch {
            p.run(&*self.storage);
            self.inner
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .pool
                .punched(p);
        }
        Ok(())
    }

    /// Run `f` on the pool's storage with commits held off: nothing the durable state names
    /// is freed or reused meanwhile (writes go on, into fresh blocks), so `f` may read the
    /// durable state through a second, read-only load (a live `check`).
    pub fn with_commits_paused<T>(&self, f: impl FnOnce(&Arc<dyn Storage>) -> T) -> T {
        let _one = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        f(&self.storage)
    }

    /// Keep up to `bytes` of checksum pages in memory (`serve --map-cache`), now and after
    /// every checkpoint.
    pub fn set_map_cache(&self, bytes: u64) {
        self.sums().set_budget(bytes);
    }

    /// Start reading the checkpoint's checksum pages into the cache in the background, up to
    /// its budget (`pool::sums::prefetch`), so a served pool's first reads after an open do
    /// not each wait for a page from the disk. At a low CPU and I/O priority, holding no
    /// lock of the store; stopped by `release`, by dropping the store and by the next
    /// checkpoint (which replaces the stream). Tests join the handle; a server lets it go.
    /// The log says (info) how many pages it read and how long it took.
    pub fn prefetch_map_cache(&self) -> std::io::Result<std::thread::JoinHandle<()>> {
        let (sums, storage) = (Arc::downgrade(&self.sums()), Arc::downgrade(&self.storage));
        std::thread::Builder::new()
            .name("sums-prefetch".into())
            .spawn(move || {
                low_priority();
                let t = std::time::Instant::now();
                let (n, of) = crate::pool::sums::prefetch(sums, storage);
                if n > 0 {
                    crate::log::process(
                        crate::log::Level::Info,
                        format_args!(
                            "thinlayer: {n} of {} checksum page(s) read into the map cache in \
                             {} ms",
                            of,
                            t.elapsed().as_millis()
                        ),
                    );
                }
            })
    }

    /// The checksum page cache's figures (`status`).
    pub fn map_cache_stats(&self) -> crate::pool::sums::CacheStats {
        self.sums().stats()
    }

    pub(crate) fn sums(&self) -> Arc<crate::pool::SumPages> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.pool.meta.sums().clone()
    }

    /// Write a checkpoint at the next commit once the log holds more than `pages` pages
    /// (normally 1024). Tests set it low so small workloads go through checkpoints too.
    #[doc(hidden)]
    pub fn set_checkpoint_threshold(&self, pages: u64) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .pool
            .set_checkpoint_threshold(pages);
    }

    /// Keep at most `bytes` of freed space unpunched while open (normally PUNCH_KEEP_BYTES,
    /// 64 MiB; DESIGN §5.4). Tests set 0 so small workloads go through step 6's punching too.
    #[doc(hidden)]
    pub fn set_punch_keep(&self, bytes: u64) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .pool
            .set_punch_keep(bytes);
    }

    /// Commit now as a checkpoint, even with nothing pending: the whole catalogue rewritten
    /// with this version's records (`thinlayer migrate` uses it so a converted pool's maps are
    /// map runs at once). The ordinary checkpoint commit, with its crash story (DESIGN §4); a
    /// pool without room for a checkpoint keeps its log, and the next commit tries again.
    pub fn checkpoint(&self) -> Result<()> {
        self.write()?.pool.checkpoint_next();
        self.flush()
    }

    /// Whether there are changes not yet committed. (No map looked at: the committer asks
    /// while a lazily opened pool's maps load.)
    pub fn has_pending(&self) -> bool {
        !self.read_now().pending.is_empty()
    }

    /// Bytes of records waiting in the open transaction (servers commit when it grows large).
    pub fn pending_bytes(&self) -> usize {
        self.read_now().pending.buf.len()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.sums().stop_prefetch();
        // Whatever free space is still held goes back to the filesystem on the way out.
        if self.writable && !self.released.load(Ordering::SeqCst) {
            let g = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
            g.pool.close(&*self.storage);
        }
    }
}

/// This thread at a low CPU priority and the lowest best-effort I/O priority (both per thread
/// on Linux): the prefetch must not slow the reads it is there to speed up, nor wait forever
/// on a busy machine (nice 19 or the idle I/O class can starve it for seconds). Best effort.
fn low_priority() {
    // SAFETY: plain syscalls on the calling thread (who = 0), no memory passed.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
        // IOPRIO_WHO_PROCESS = 1; IOPRIO_CLASS_BE (2) << IOPRIO_CLASS_SHIFT (13) | level 7.
        libc::syscall(libc::SYS_ioprio_set, 1, 0, (2 << 13) | 7);
    }
}

fn open_error(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::NotFound(format!(
            "pool {} does not exist; create it with `thinlayer --pool {} init`",
            path.display(),
            path.display()
        ))
    } else {
        Error::io(format!("opening pool {}", path.display()), e)
    }
}

/// Rebuild the in-memory state from the newest superblock whose streams verify; `deferred`:
/// leave the allocator loading (see `open_in_mode`).
fn load(storage: &dyn Storage, deferred: bool) -> Result<Inner> {
    load_with(storage, &|s, sb| load_generation(s, sb, deferred))
}

/// `load`, each generation tried by `generation` (`load_generation`, or a lazy open's).
pub(super) fn load_with(
    storage: &dyn Storage,
    generation: &dyn Fn(&dyn Storage, &crate::format::superblock::Superblock) -> Result<Inner>,
) -> Result<Inner> {
    let (sbs, bad) = meta::read_superblocks(storage)?;
    if sbs.is_empty() {
        // Refused by name, with the way across (FORMAT.md §11), rather than as damage.
        if let Some((old, _)) = meta::read_superblocks_any(storage)?.first() {
            return Err(Error::Conflict(format!(
                "format version {old}, made by an older thinlayer (this one reads {}): convert it with `thinlayer migrate POOL` (rewrites the two superblocks; layers and data stay)",
                crate::format::superblock::VERSION
            )));
        }
        let why: Vec<String> = bad.iter().map(|(_, e)| e.to_string()).collect();
        return Err(Error::Corrupt(format!(
            "not a usable thinlayer pool: {}",
            why.join("; ")
        )));
    }
    let mut notes: Vec<Fault> = bad
        .iter()
        .map(|(slot, e)| {
            let what = What::BadSlot {
                reason: e.to_string(),
                other_slot_good: true,
            };
            let at = Where {
                slot: Some(*slot),
                ..Default::default()
            };
            Fault::new(what, at)
        })
        .collect();
    let mut errors = Vec::new();
    for sb in &sbs {
        match generation(storage, sb) {
            Ok(mut inner) => {
                if !errors.is_empty() {
                    let what = What::Fallback {
                        generation: sb.generation,
                        why: errors.join("; "),
                    };
                    let at = Where {
                        slot: Some((sb.generation % 2) as usize),
                        ..Default::default()
                    };
                    notes.push(Fault::new(what, at));
                }
                // A newer superblock of the same log says how far that log went: reading less
                // of it is damage (a crash only ever cuts off commits no superblock names).
                let read = inner.pool.meta.sb.log.pages;
                for newer in sbs.iter().take_while(|n| n.generation > sb.generation) {
                    if newer.log.id == sb.log.id && newer.log.pages > read {
                        let what = What::LogCutShort {
                            generation: newer.generation,
                            named: newer.log.pages,
                            read,
                        };
                        inner.load_faults.push(Fault::new(what, Where::default()));
                    }
                }
                inner.slot_damaged = !notes.is_empty();
                inner.newest_seen = sbs[0].generation;
                notes.append(&mut inner.load_notes);
                inner.load_notes = notes;
                return Ok(inner);
            }
            // Only damage justifies falling back (and later healing over the newer slot): an
            // I/O error says nothing about the newer state, so it must not cost its commits.
            Err(e @ Error::Corrupt(_)) => errors.push(format!("generation {}: {e}", sb.generation)),
            Err(e) => return Err(e),
        }
    }
    Err(Error::Corrupt(format!(
        "no superblock leads to readable metadata: {}",
        errors.join("; ")
    )))
}

pub(super) fn load_generation(
    storage: &dyn Storage,
    sb: &crate::format::superblock::Superblock,
    deferred: bool,
) -> Result<Inner> {
    let mut rec = meta::load(storage, sb)?;
    let mut catalog = Catalog::new();
    // The checkpoint's runs keep their positions in its checksum pages (read past already),
    // not their crcs: the pages are read when the blocks are.
    let sums = rec.sums.clone();
    let capacity = sums.capacity();
    let mut resolve = |at: u64, n: usize| sums.crcs(storage, at, n);
    let index = std::mem::take(&mut rec.index);
    let mut walk = crate::pool::index::Walk::new(&index);
    rec.replay_checkpoint(|at, record| {
        walk.record(at, &record)?;
        catalog.apply_checkpoint(record, capacity, &mut resolve)
    })?;
    walk.finish()?;
    catalog.compare_counters();
    let meta = MetaStreams::from_recovered(&rec);
    let mut r = RecordReader::new(&rec.log, "log");
    catalog.replay_log(|| r.next_record())?;
    let bs = sb.block_size;
    let first = first_data_block(bs);
    let mut faults = std::mem::take(&mut catalog.faults);
    // Block numbers come from disk: they are bounded by the file before the allocation bitmap
    // grows to cover them, so damaged metadata cannot make the load allocate without limit.
    let (file_blocks, floor) = extent_and_floor(storage, bs, &rec.ckpt_blocks, &rec.log_blocks)?;
    // A stream outside the file means this generation cannot be trusted at all: an error, so
    // the load falls back to the older one. The log's reserved next page may lie just past the
    // end (reserved, never written).
    for &b in rec.ckpt_blocks.iter().chain(&rec.log_blocks) {
        if b.0 < first || b.0 > file_blocks + 1 {
            return Err(Error::Corrupt(format!(
                "generation {}: metadata stream at pool block {}, outside the pool file ({file_blocks} blocks)",
                sb.generation, b.0
            )));
        }
    }
    let mut alloc = Allocator::loading(first, sb.max_blocks, floor);
    if !deferred {
        // The rebuild (§5.3) at once: the same code a deferred load's completion runs later.
        faults.extend(invariants::rebuild(
            &catalog,
            &meta,
            bs,
            file_blocks,
            &mut alloc,
        ));
    }
    Ok(Inner {
        pool: Pool::new(meta, alloc, bs),
        catalog,
        pending: RecordWriter::new(),
        block_size: bs,
        load_faults: faults,
        load_notes: rec
            .dropped_commit
            .map(|commit| Fault::new(What::CutOffCommit { commit }, Where::default()))
            .into_iter()
            .collect(),
        newest_seen: sb.generation,
        slot_damaged: false,
        journal: None,
        lazy: None,
        remotes: Default::default(),
    })
}

/// The pool file's extent in blocks, and the floor of an allocator made before the maps are
/// claimed (`Allocator::loading`, DESIGN §5.3): everything the checkpoint and the log
/// reference lies below it, the file's extent or one past the log's reserved next page
/// (`streams`: their blocks), whichever is higher. The eager and the lazy open both take it
/// from here.
pub(super) fn extent_and_floor(
    storage: &dyn Storage,
    block_size: u32,
    ckpt_blocks: &[crate::format::PBlock],
    log_blocks: &[crate::format::PBlock],
) -> Result<(u64, u64)> {
    let file_blocks = storage
        .len()
        .map_err(|e| Error::io("reading the pool size", e))?
        .div_ceil(block_size as u64);
    let streams_end = ckpt_blocks.iter().chain(log_blocks).map(|b| b.0 + 1);
    Ok((file_blocks, streams_end.max().unwrap_or(0).max(file_blocks)))
}

impl Inner {
    /// A writable open refuses a pool whose load found faults (an eager and a lazy open
    /// alike); read-only it can still be looked at and exported.
    pub(super) fn refuse_load_faults(&self) -> Result<()> {
        match self.load_faults.first() {
            None => Ok(()),
            Some(first) => Err(Error::Corrupt(format!(
                "{} fault(s) in the metadata, first: {first}; run `thinlayer check` (opened read-only it can still be exported)",
                self.load_faults.len()
            ))),
        }
    }

    /// The state around a loaded catalogue and pool, with nothing pending or found.
    pub(super) fn empty(pool: Pool, catalog: Catalog, block_size: u32) -> Inner {
        Inner {
            pool,
            catalog,
            pending: RecordWriter::new(),
            block_size,
            load_faults: Vec::new(),
            load_notes: Vec::new(),
            newest_seen: 0,
            slot_damaged: false,
            journal: None,
            lazy: None,
            remotes: Default::default(),
        }
    }

    /// Commit steps 1 and 1a (see `Pool::stage`): the store says what — its open transaction,
    /// and how to encode the catalogue if a checkpoint is due.
    pub(crate) fn stage(&mut self, storage: &dyn Storage) -> Result<Option<crate::pool::Commit>> {
        // A checkpoint writes every map whole (and frees the old one's pages, which a lazy
        // open learns as its ranges load): one due while the maps load waits for the commit
        // after they are whole; the log grows meanwhile.
        let whole = self.lazy.is_none();
        let Inner {
            catalog,
            pool,
            pending,
            journal,
            ..
        } = self;
        // The journal keeps the sealed transaction's records until its commit is durable, and
        // says where it went: a server replaying them skips it if the pool has it. It must say
        // so before the commit's pages are written, not after: they are in the pool from then
        // on (a log commit is found by reading forward, §5.5), and a kill in between used to
        // leave a journal that replayed a transaction the pool already held (issue 17).
        let sums = pool.meta.sums().clone();
        let c = pool.stage(
            storage,
            pending,
            whole.then_some(|w: &mut RecordWriter| {
                catalog.encode_checkpoint(w, &mut |at| sums.crc(storage, at))
            }),
            |(log_id, commit)| {
                if let Some(j) = journal.as_mut() {
                    j.journal.staged(j.txn, log_id, commit);
                }
            },
        )?;
        if let (Some(_), Some(j)) = (&c, journal) {
            j.txn += 1;
            j.mirrored = 0;
        }
        Ok(c)
    }

    /// The crc a map's ref stands for: a paged one read through the checkpoint's checksum page
    /// cache (an error naming the page if it is damaged or unreadable).
    pub(crate) fn crc(&self, storage: &dyn Storage, r: CrcRef) -> Result<u32> {
        match r {
            CrcRef::Known(c) => Ok(c),
            CrcRef::Paged(at) => self.pool.meta.sums().crc(storage, at),
        }
    }

    /// Step 5 of a commit that reached the disk (`durable`), under the write lock: a
    /// checkpoint's paged runs are adopted by the maps first (their crcs leave memory; a paged
    /// crc the checkpoint wrote inline is read from the old pages, still intact), then the pool
    /// installs the new generation and frees the old streams. A failure to read an old page
    /// fails the commit like a failed sync: the pool is poisoned until reopened.
    pub(crate) fn finish(
        &mut self,
        storage: &dyn Storage,
        commit: crate::pool::Commit,
        durable: Result<()>,
    ) -> Result<Option<crate::pool::Punch>> {
        let durable = durable.and_then(|()| {
            let Some(runs) = commit.paged_runs() else {
                return Ok(());
            };
            let sums = self.pool.meta.sums().clone();
            let mut resolve = |at: u64, n: usize| sums.crcs(storage, at, n);
            self.catalog
                .rebase(runs, commit.paged_singles(), &mut resolve)
        });
        self.pool.finish(storage, commit, durable)
    }

    /// Copy the records appended to the open transaction since the last call into the crash
    /// journal (under the write lock, before the change is acknowledged).
    pub(crate) fn mirror(&mut self) {
        let Some(j) = &mut self.journal else {
            return;
        };
        if self.pending.buf.len() > j.mirrored {
            // Later map entries must not change the count of a record already copied.
            self.pending.cut();
            j.journal.records(j.txn, &self.pending.buf[j.mirrored..]);
            j.mirrored = self.pending.buf.len();
        }
    }

    /// Every commit sealed so far is durable: the journal keeps only the open transaction.
    fn journal_durable(&mut self) {
        if let Some(j) = &mut self.journal {
            self.pending.cut();
            j.journal.rebase(j.txn, &self.pending.buf);
            j.mirrored = self.pending.buf.len();
        }
    }

    /// Writable-open housekeeping (see `Pool::recover`).
    pub(super) fn recover(&mut self, storage: &dyn Storage) -> Result<()> {
        self.pool
            .recover(storage, self.slot_damaged, self.newest_seen)?;
        self.slot_damaged = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::MemStorage;

    /// A checkpoint keeps its map runs' crcs in checksum pages (FORMAT.md §5.6), in blocks of
    /// their own that the allocator counts as used: writes after it never get one (had they,
    /// the next open would find the page damaged), and the next checkpoint frees them.
    #[test]
    fn checksum_pages_hold_a_checkpoints_crcs_and_their_blocks_are_claimed() {
        const N: u64 = 3000;
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let id = s.create_layer("img", None, Some(2 * N * 4096)).unwrap().id;
        let block = |i: u64| vec![(i % 251) as u8 + 1; 4096];
        for i in 0..N {
            s.write_layer(id, i * 4096, &block(i)).unwrap();
        }
        s.checkpoint().unwrap();
        let sb = s.read().pool.meta.sb.clone();
        let rec = meta::load(&*mem, &sb).unwrap();
        let n_pages = rec.sums_pages.len() as u64;
        assert_eq!(n_pages, N.div_ceil(1012));
        let sums = s.read().pool.meta.sums().clone();
        let crcs = sums.crcs(&*mem, 0, N as usize).unwrap();
        for (i, crc) in crcs.iter().enumerate() {
            assert_eq!(*crc, crate::format::checksum::data(&block(i as u64)));
        }
        assert!(sums.crc(&*mem, N).is_err(), "every block's crc, no more");
        // The map adopted the checkpoint: it keeps positions in the pages, not the crcs.
        let heap = s.read().catalog.get(id).unwrap().map.heap_bytes() as u64;
        assert!(heap < N / 4, "{heap} bytes of map for {N} paged blocks");
        // The runs' records no longer carry the crcs: the checkpoint is a page.
        assert_eq!(sb.checkpoint.pages, 1);
        let used = s.used_blocks();
        // 4 KiB blocks: a page a block; data, checksum pages, checkpoint, log.
        assert_eq!(used, N + n_pages + sb.checkpoint.pages + 1);
        // After a reopen (the allocator rebuilt from what the load read), new data goes
        // elsewhere than the checksum pages; the pool then reads it all back.
        drop(s);
        let s = Store::open_in(mem.clone(), true).unwrap();
        assert_eq!(s.used_blocks(), used);
        for i in N..2 * N {
            s.write_layer(id, i * 4096, &block(i)).unwrap();
        }
        s.flush().unwrap();
        drop(s);
        let s = Store::open_in(mem.clone(), true).unwrap();
        s.verify_consistency().unwrap();
        let mut buf = vec![0u8; 4096];
        for i in (0..2 * N).step_by(97) {
            s.read_layer(id, i * 4096, &mut buf).unwrap();
            assert_eq!(buf, block(i), "block {i}");
        }
        // The next checkpoint frees the old checksum pages' blocks.
        let meta_before = s.read().pool.meta.metadata_blocks();
        s.checkpoint().unwrap();
        s.checkpoint().unwrap();
        assert!(s.read().pool.meta.metadata_blocks() <= meta_before + 1);
        assert_eq!(
            s.used_blocks(),
            2 * N + s.read().pool.meta.metadata_blocks()
        );
    }

    /// A version-7 checkpoint (FORMAT.md §6.3.4): no map record comes before the map index's
    /// first range, and each range read alone from the page its entry names holds map
    /// records of its layer within its span; applied after the records before the maps, in
    /// any order, the ranges build the maps a whole replay builds, counters and all.
    #[test]
    fn each_range_of_the_map_index_loads_alone_into_the_same_maps() {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let a = s.create_layer("a", None, Some(1 << 36)).unwrap().id;
        let block = |i: u64| vec![(i % 251) as u8 + 1; 4096];
        // Scattered singles (16 bytes a block in the checkpoint: several ranges), runs, and
        // a child with a few blocks and whiteouts.
        for i in 0..14_000u64 {
            s.write_layer(a, i * 7 * 4096, &block(i)).unwrap();
        }
        s.write_layer(a, 1 << 30, &vec![9u8; 64 << 12]).unwrap();
        s.commit_layer("a").unwrap();
        let b = s.create_layer("b", Some("a"), None).unwrap().id;
        s.write_layer(b, 70 * 4096, &block(3)).unwrap();
        s.zero_layer(b, 0, 8 * 4096, true).unwrap();
        s.checkpoint().unwrap();
        let sb = s.read().pool.meta.sb.clone();
        let mut rec = meta::load(&*mem, &sb).unwrap();
        let index = std::mem::take(&mut rec.index);
        assert!(
            index.iter().filter(|e| e.layer == a).count() >= 3,
            "{index:?}"
        );
        assert!(index.iter().any(|e| e.layer == b));
        let sums = rec.sums.clone();
        let capacity = sums.capacity();
        let mut resolve = |at: u64, n: usize| sums.crcs(&*mem, at, n);
        let mut lazy = Catalog::new();
        rec.replay_checkpoint(|at, r| {
            if at < index[0].position() {
                assert!(r.map_span().is_none(), "{r:?} before the maps");
                lazy.apply_checkpoint(r, capacity, &mut resolve)?;
            }
            Ok(())
        })
        .unwrap();
        let n = index.len();
        // Out of order: the odd ranges from the last down, then the even ones.
        let order = (0..n).filter(|i| i % 2 == 1).rev().chain((0..n).step_by(2));
        for i in order {
            let mut r = meta::range_records(&*mem, &sb.checkpoint, 1, &index, i).unwrap();
            let mut records = 0;
            loop {
                let at = r.position();
                let Some(rec) = r.next_record().unwrap() else {
                    break;
                };
                crate::pool::index::in_range(&index, i, at, &rec).unwrap();
                lazy.apply_checkpoint(rec, capacity, &mut resolve).unwrap();
                records += 1;
            }
            assert!(records > 0, "range {i} is empty");
        }
        lazy.compare_counters();
        assert!(lazy.faults.is_empty(), "{:?}", lazy.faults);
        let g = s.read();
        for id in [a, b] {
            let (want, got) = (&g.catalog.get(id).unwrap().map, &lazy.get(id).unwrap().map);
            assert_eq!(
                want.range(0, u64::MAX),
                got.range(0, u64::MAX),
                "layer {id}"
            );
        }
    }

    /// After an open, the prefetch (`prefetch_map_cache`, what `serve` starts) brings every
    /// checksum page in: reads of paged singles and runs then read no page. A released store
    /// (handed over) prefetches nothing.
    #[test]
    fn after_the_prefetch_reads_of_paged_blocks_read_no_checksum_page() {
        const N: u64 = 20_000;
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let id = s.create_layer("img", None, Some(17 * N * 4096)).unwrap().id;
        let block = |i: u64| vec![(i % 251) as u8 + 1; 4096];
        // Singles (1 block in 16) and a run.
        for i in 0..N {
            s.write_layer(id, i * 16 * 4096, &block(i)).unwrap();
        }
        for i in 0..2000 {
            s.write_layer(id, (16 * N + i) * 4096, &block(i)).unwrap();
        }
        s.checkpoint().unwrap();
        drop(s);
        let s = Store::open_in(mem.clone(), true).unwrap();
        let pages = s.sums().pages().len() as u64;
        assert_eq!(pages, (N + 2000).div_ceil(1012));
        s.prefetch_map_cache().unwrap().join().unwrap();
        let st = s.map_cache_stats();
        assert_eq!(
            (st.prefetched, st.prefetch_over, st.misses),
            (pages, true, 0)
        );
        let mut buf = vec![0u8; 4096];
        for i in (0..N).step_by(37) {
            s.read_layer(id, i * 16 * 4096, &mut buf).unwrap();
            assert_eq!(buf, block(i), "single {i}");
        }
        for i in (0..2000).step_by(37) {
            s.read_layer(id, (16 * N + i) * 4096, &mut buf).unwrap();
            assert_eq!(buf, block(i), "run block {i}");
        }
        let st = s.map_cache_stats();
        assert_eq!(st.misses, 0, "{st:?}");
        assert!(st.hits > 0, "{st:?}");
        drop(s);
        let s = Store::open_in(mem.clone(), true).unwrap();
        s.release().unwrap();
        s.prefetch_map_cache().unwrap().join().unwrap();
        assert_eq!(s.map_cache_stats().prefetched, 0);
    }

    /// A checkpoint's runs keep their positions in its checksum pages, and the next checkpoint
    /// pages them anew (`Inner::finish`): runs split by writes made while it was staged keep
    /// reading their crcs from the new pages, and a piece of one block (which the checkpoint
    /// writes as an entry with its crc inline) takes its crc from the old pages before they are
    /// freed. Every block reads back, in this process and after a reopen.
    #[test]
    fn paged_runs_follow_each_checkpoint_and_writes_made_while_it_is_staged() {
        const N: u64 = 2500;
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let id = s.create_layer("img", None, Some(N * 4096)).unwrap().id;
        let block = |i: u64, tag: u8| vec![(i % 251) as u8 ^ tag; 4096];
        let mut want: Vec<u8> = (0..N).map(|i| (i % 251) as u8 ^ 1).collect();
        for i in 0..N {
            s.write_layer(id, i * 4096, &block(i, 1)).unwrap();
        }
        s.checkpoint().unwrap();
        // Single blocks cut out of the paged run, leaving one-block paged pieces between.
        for i in (100..120).step_by(2) {
            s.write_layer(id, i * 4096, &block(i, 2)).unwrap();
            want[i as usize] = (i % 251) as u8 ^ 2;
        }
        s.flush().unwrap();
        s.write().unwrap().pool.checkpoint_next();
        let commit = s.write().unwrap().stage(&*mem).unwrap().unwrap();
        assert!(commit.paged_runs().is_some(), "a checkpoint");
        // Writes while the checkpoint is made durable split its runs further.
        for i in [5u64, 1500, 2499] {
            s.write_layer(id, i * 4096, &block(i, 3)).unwrap();
            want[i as usize] = (i % 251) as u8 ^ 3;
        }
        let durable = commit.make_durable(&*mem);
        s.write().unwrap().finish(&*mem, commit, durable).unwrap();
        let heap = s.read().catalog.get(id).unwrap().map.heap_bytes() as u64;
        assert!(heap < N, "{heap} bytes of map: the runs are paged again");
        let check = |s: &Store| {
            let mut buf = vec![0u8; 4096];
            for i in 0..N {
                s.read_layer(id, i * 4096, &mut buf).unwrap();
                assert!(buf.iter().all(|&b| b == want[i as usize]), "block {i}");
            }
        };
        check(&s);
        s.flush().unwrap();
        s.checkpoint().unwrap();
        check(&s);
        drop(s);
        let s = Store::open_in(mem.clone(), true).unwrap();
        s.verify_consistency().unwrap();
        check(&s);
    }

    /// Scattered single blocks leave their crcs in a checkpoint's checksum pages (map
    /// singles, FORMAT.md §6.3.3): the checkpoint re-pages them in the live maps, writes made
    /// while the next one is staged (which overwrite paged singles) read right after it, and
    /// a reopen loads them paged. Paged, a single costs about 7 bytes of map, resident 13.
    #[test]
    fn paged_singles_follow_each_checkpoint_and_the_load() {
        const N: u64 = 16384;
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let id = s.create_layer("w", None, Some(N * 4096)).unwrap().id;
        let block = |i: u64, tag: u8| vec![(i % 251) as u8 ^ tag; 4096];
        let mut want: Vec<u8> = vec![0; N as usize];
        let mut put = |s: &Store, i: u64, tag: u8| {
            s.write_layer(id, i * 4096, &block(i, tag)).unwrap();
            want[i as usize] = (i % 251) as u8 ^ tag;
        };
        // One block in 4, in an order that is not the pool's.
        for i in (0..N / 4).rev().map(|k| k * 4) {
            put(&s, i, 1);
        }
        let singles = N / 4;
        let heap = |s: &Store| s.read().catalog.get(id).unwrap().map.heap_bytes() as u64;
        let resident = heap(&s);
        assert!(resident > 11 * singles, "{resident} bytes resident");
        s.checkpoint().unwrap();
        let paged = heap(&s);
        assert!(paged < 8 * singles, "{paged} bytes after a checkpoint");
        // Changes to paged singles, new singles, then a checkpoint with writes while it is
        // made durable (they change blocks it pages).
        for i in (0..N).step_by(64) {
            put(&s, i, 2);
            put(&s, i + 1, 2);
        }
        s.flush().unwrap();
        s.write().unwrap().pool.checkpoint_next();
        let commit = s.write().unwrap().stage(&*mem).unwrap().unwrap();
        assert!(
            !commit.paged_singles().is_empty(),
            "a checkpoint of singles"
        );
        for i in (8..N).step_by(256) {
            put(&s, i, 3);
        }
        let durable = commit.make_durable(&*mem);
        s.write().unwrap().finish(&*mem, commit, durable).unwrap();
        let want = want;
        let check = |s: &Store| {
            let mut buf = vec![0u8; 4096];
            for i in 0..N {
                s.read_layer(id, i * 4096, &mut buf).unwrap();
                assert!(buf.iter().all(|&b| b == want[i as usize]), "block {i}");
            }
        };
        check(&s);
        s.flush().unwrap();
        drop(s);
        let s = Store::open_in(mem.clone(), true).unwrap();
        s.verify_consistency().unwrap();
        check(&s);
        let loaded = heap(&s);
        // The log's changes since the checkpoint stay resident until the next one.
        assert!(
            loaded < 8 * singles + 16 * (N / 256),
            "{loaded} bytes after the load"
        );
        s.checkpoint().unwrap();
        assert!(heap(&s) < 8 * singles, "{} bytes", heap(&s));
        check(&s);
    }

    /// A write that lands while a commit is being made durable must not overwrite a block that
    /// commit names: if it did, a crash right after would leave that block's bytes newer than
    /// the checksum the commit recorded, and a read would fail (or return the wrong data).
    #[test]
    fn writes_during_a_commit_do_not_touch_the_blocks_it_names() {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let id = s.create_layer("a", None, Some(1 << 20)).unwrap().id;
        s.write_layer(id, 0, &[0xaa; 4096]).unwrap();
        s.flush().unwrap();
        // B lands in a fresh block of the open transaction ...
        s.write_layer(id, 0, &[0xbb; 4096]).unwrap();
        let commit = s.write().unwrap().stage(&*mem).unwrap().unwrap();
        // ... C comes while that transaction's commit is being made durable ...
        s.write_layer(id, 0, &[0xcc; 4096]).unwrap();
        let durable = commit.make_durable(&*mem);
        let punch = s.write().unwrap().finish(&*mem, commit, durable);
        assert!(punch.unwrap().is_none());
        // ... and power fails before C is committed: B must read back, checksum intact.
        let image = Arc::new(MemStorage::from_bytes(mem.snapshot()));
        drop(s);
        let s = Store::open_in(image, false).unwrap();
        let mut buf = vec![0u8; 4096];
        s.read_layer(id, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xbb));
    }

    /// Group commit: flushes that arrive while a commit is under way (here: while the commit
    /// lock is held) are all answered by the next commit, even though writes keep coming and
    /// each waiter would otherwise find new changes to commit on its own.
    #[test]
    fn flushes_waiting_together_share_one_commit() {
        let mem = Arc::new(MemStorage::new());
        let s = Arc::new(Store::create_in(mem, &CreateOptions::default()).unwrap());
        let id = s.create_layer("a", None, Some(64 << 20)).unwrap().id;
        s.flush().unwrap();
        let gen = |s: &Store| s.read().pool.meta.sb.generation;
        let before = gen(&s);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    s.write_layer(id, (i % 4096) * 4096, &[i as u8 | 1; 4096])
                        .unwrap();
                    i += 1;
                }
            })
        };
        let held = s.commit_lock.lock().unwrap();
        let flushers: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || s.flush().unwrap())
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(held);
        for f in flushers {
            f.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        assert_eq!(
            gen(&s),
            before + 1,
            "eight waiting flushes made more than one commit"
        );
    }

    /// A database's steady state: the same blocks rewritten and flushed, over and over. Once
    /// the log has been checkpointed a few times, every block a commit needs (the data's new
    /// place, the next log page, the next checkpoint) is one the file already holds: the file
    /// neither grows nor has space punched out and allocated again, so a commit's sync carries
    /// data and pages, not the host filesystem's extent changes.
    #[test]
    fn steady_rewrites_and_flushes_neither_grow_nor_punch_the_pool_file() {
        let st = Arc::new(MemStorage::new());
        let s = Store::create_in(st.clone(), &CreateOptions::default()).unwrap();
        let id = s.create_layer("db", None, Some(64 * 4096)).unwrap().id;
        let round = |s: &Store, i: u64| {
            for k in 0..4u64 {
                let v = (i * 7 + k * 13) % 64;
                s.write_layer(id, v * 4096, &[(i % 251) as u8 | 1; 4096])
                    .unwrap();
            }
            s.flush().unwrap();
        };
        // Past three checkpoints (one per ~1024 log pages, a page per commit).
        for i in 0..3500 {
            round(&s, i);
        }
        let (len, before) = (st.len().unwrap(), st.extent_changes());
        for i in 3500..6000 {
            round(&s, i);
        }
        let after = st.extent_changes();
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (0, 0),
            "blocks written outside the file's space, punches in 2500 steady commits"
        );
        assert_eq!(st.len().unwrap(), len, "the pool file grew");
        s.verify_consistency().unwrap();
    }

    /// Step 6 runs without the store lock, so the blocks it punches must be held back: a write
    /// that came meanwhile and got one of them would have its data punched to zeros (a
    /// checksum failure on read). Short runs are left for reuse rather than punched one by one.
    #[test]
    fn blocks_being_punched_are_not_handed_out() {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        // No freed space kept for reuse (PUNCH_KEEP_BYTES), so that 8 MiB is punched.
        s.write().unwrap().pool.set_punch_keep(0);
        let big = s.create_layer("big", None, Some(64 << 20)).unwrap().id;
        let other = s.create_layer("other", None, Some(64 << 20)).unwrap().id;
        // One lone block (a run too short to punch while open), a block that stays between it
        // and the rest, then 8 MiB in one run.
        s.write_layer(other, 40 << 20, &[0x22; 4096]).unwrap();
        s.write_layer(other, 48 << 20, &[0x44; 4096]).unwrap();
        s.write_layer(big, 0, &vec![0x11; 8 << 20]).unwrap();
        s.flush().unwrap();
        s.remove_layer("big").unwrap();
        s.zero_layer(other, 40 << 20, 4096, true).unwrap();
        let commit = s.write().unwrap().stage(&*mem).unwrap().unwrap();
        let durable = commit.make_durable(&*mem);
        let punch = s.write().unwrap().finish(&*mem, commit, durable);
        let punch = punch.unwrap().expect("8 MiB freed in one run is punched");
        let reserved: std::collections::HashSet<_> = punch.blocks().iter().copied().collect();
        assert_eq!(reserved.len(), 2048, "only the long run is punched");
        s.verify_consistency().unwrap();
        // A write while the punch runs must not land in a reserved block.
        s.write_layer(other, 0, &vec![0x33; 1 << 20]).unwrap();
        let g = s.read();
        let l = g.catalog.get(other).unwrap();
        for (_, m) in l.map.iter() {
            let p = m.pblock().unwrap();
            assert!(
                !reserved.contains(&p),
                "{p} was handed out while being punched"
            );
        }
        drop(g);
        punch.run(&*mem);
        s.write().unwrap().pool.punched(punch);
        s.verify_consistency().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        s.read_layer(other, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x33));
    }
}
