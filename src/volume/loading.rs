//! An open that has not loaded every map yet (DESIGN §5.3, §12 item 3 steps c-e): the gate
//! that says when the load is complete, the completion itself (the allocator's rebuild, whose
//! one home, `invariants::rebuild`, the eager open shares), and faults found after the open,
//! which refuse changes as a writable open refuses a pool with faults.
//!
//! While the load runs the allocator hands out only blocks at or above the pool file's extent
//! at open (`Allocator::loading`): nothing the durable state references can be overwritten,
//! whatever the maps loaded so far say. A capped pool that runs out there waits for the
//! completion (`Store::with_room`): the wait happens at the store's entry points, holding none
//! of its locks, so the loader (which takes the write lock) goes on; if the load stops on a
//! fault instead, the waiters get the refusal naming it.

use super::invariants;
use super::store::{Inner, Store};
use crate::error::{Error, Result};
use crate::fault::Fault;
use crate::pool::{Punch, Storage};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where the open's load of the maps is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Loading,
    Complete,
    /// A range could not be loaded (`Inner::late_fault`): the load will never complete.
    Stopped,
}

/// The load's state (and how many wait for its end) and a condvar to wait on.
pub(crate) struct LoadGate {
    state: Mutex<(State, usize)>,
    changed: Condvar,
}

impl LoadGate {
    pub(crate) fn complete() -> LoadGate {
        LoadGate::with(State::Complete)
    }

    pub(crate) fn loading() -> LoadGate {
        LoadGate::with(State::Loading)
    }

    fn with(s: State) -> LoadGate {
        LoadGate {
            state: Mutex::new((s, 0)),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (State, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> State {
        self.lock().0
    }

    fn set(&self, s: State) {
        self.lock().0 = s;
        self.changed.notify_all();
    }

    fn wait(&self) -> State {
        let mut g = self.lock();
        g.1 += 1;
        while g.0 == State::Loading {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.1 -= 1;
        g.0
    }
}

impl Store {
    /// Whether every map is loaded and the allocator rebuilt from them (always so after an
    /// eager open or a create).
    pub fn is_loaded(&self) -> bool {
        self.loaded.state() == State::Complete
    }

    /// Whether the load is under way: neither complete nor stopped.
    pub(crate) fn is_loading(&self) -> bool {
        self.loaded.state() == State::Loading
    }

    /// A lazily opened pool's load as `status` shows it: the map index's ranges, those not
    /// loaded yet, and whether the load stopped on a fault. All zero once the maps are whole.
    pub fn load_progress(&self) -> (u64, u64, bool) {
        let (ranges, left) = self
            .read_now()
            .lazy
            .as_ref()
            .map_or((0, 0), |l| (l.index().len() as u64, l.left() as u64));
        (ranges, left, self.loaded.state() == State::Stopped)
    }

    /// How many callers wait for the load's end (tests wait for a waiter to be there).
    #[doc(hidden)]
    pub fn load_waiters(&self) -> usize {
        self.loaded.lock().1
    }

    /// Wait until the load is complete. If it stopped on a fault instead, the refusal that
    /// names it (`Error::Faulty`). Call it holding no lock of the store.
    pub fn wait_loaded(&self) -> Result<()> {
        match self.loaded.wait() {
            State::Complete => Ok(()),
            // `read_now`: `read` waits here while a lazily opened pool's maps are not
            // whole, which a stopped load's never are (it recursed until the stack overflowed).
            _ => Err(self.read_now().faulty().unwrap_or_else(|| {
                Error::Internal("the load of the maps stopped without a fault".into())
            })),
        }
    }

    /// The load's completion, once every range of every map is loaded: under the write lock
    /// (taken here: the caller holds no lock of the store), `Inner::complete_load`; then the
    /// free space a crash may have left bytes in is punched without the lock, and whoever
    /// waits for the load is woken. Faults it finds are recorded, not returned: from then on
    /// the store refuses changes naming them (`Error::Faulty`).
    pub fn complete_load(&self) {
        self.complete_load_after(|_| {});
    }

    /// `complete_load`, with `before` run in the same hold of the write lock first (a lazy
    /// open's last step of the load). Returns how long the lock was held.
    pub(crate) fn complete_load_after(&self, before: impl FnOnce(&mut Inner)) -> Duration {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let held = Instant::now();
        before(&mut g);
        let punch = g.complete_load(&*self.storage, self.is_writable());
        drop(g);
        let held = held.elapsed();
        self.load_done();
        if let Some(p) = punch {
            p.run(&*self.storage);
            let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
            g.pool.punched(p);
        }
        held
    }

    /// The load is complete (`Inner::complete_load` ran under a lock the caller held; call
    /// this after letting go of it): wake the waiters, then remove the layers a crash left
    /// half-imported, which a deferred open leaves to now (their removal's commit may need
    /// room that only the completion frees, and nothing would complete the load while the
    /// open waited for it). A failure to remove them is logged: the next open tries again.
    pub fn load_done(&self) {
        self.loaded.set(State::Complete);
        if self.is_writable() {
            if let Err(e) = self.discard_incomplete() {
                crate::log::process(
                    crate::log::Level::Warn,
                    format_args!("thinlayer: removing half-imported layers after the load: {e}"),
                );
            }
        }
    }

    /// The load cannot complete (a range failed to load, recorded by `Inner::late_fault`):
    /// the waiters get the refusal naming the fault instead of waiting for ever.
    pub fn load_stopped(&self) {
        self.loaded.set(State::Stopped);
    }

    /// Run `f`, a change that may allocate; if it found no room while the load was not
    /// complete (a capped pool full above the file's extent at open), wait for the completion
    /// and run it once more. `f` holds the store's lock only inside, so the loader goes on
    /// while this waits; the changes `f` makes are the same when made again (a write, a zero,
    /// a flush that kept its transaction open on failure).
    pub(crate) fn with_room<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        if self.is_loaded() {
            return f();
        }
        match f() {
            Err(e) if e.is_no_space() => {
                self.wait_loaded()?;
                f()
            }
            r => r,
        }
    }

    /// Open a pool whose maps all load at once, as `open_in` does, but whose allocator stays
    /// in its loading mode until `complete_load`: what an open that loads its maps in the
    /// background does while they load, for tests of that mode.
    #[doc(hidden)]
    pub fn open_in_deferred(storage: std::sync::Arc<dyn Storage>, writable: bool) -> Result<Store> {
        Ok(Self::open_in_mode(storage, writable, None, true)?.0)
    }
}

impl Inner {
    /// Complete the load (every range of every map is loaded), under the write lock: the
    /// audit over the live state (counters, references), the allocator rebuilt from its
    /// claims and switched to normal (`invariants::rebuild`), and what it finds recorded as
    /// faults found late. Returns, for a writable store without faults whose file holds more
    /// than the pool uses (a crash left bytes in free blocks, §5.4), the free blocks reserved
    /// for punching without the lock (`Punch::run`, then `Pool::punched`). Nothing to do if
    /// the allocator is not loading.
    pub(crate) fn complete_load(&mut self, storage: &dyn Storage, writable: bool) -> Option<Punch> {
        self.pool.alloc.loading_floor()?;
        // Everything written since the open lies below the allocator's extent.
        let file_blocks = self.pool.alloc.extent();
        let faults = invariants::rebuild(
            &self.catalog,
            &self.pool.meta,
            self.block_size,
            file_blocks,
            &mut self.pool.alloc,
        );
        for f in faults {
            self.late_fault(f);
        }
        if !writable || !self.load_faults.is_empty() {
            return None;
        }
        self.pool.reserve_stale(storage)
    }

    /// A fault found after the open (a range of a map that does not load, the completion's
    /// audit): it cannot fall back to an older superblock any more, so it is logged, kept
    /// with the load's faults (`check` and the self-check report them) and from now on every
    /// change is refused naming it (`faulty`).
    pub(crate) fn late_fault(&mut self, f: Fault) {
        crate::log::process(
            crate::log::Level::Error,
            format_args!("thinlayer: fault found after the open, changes refused: {f}"),
        );
        self.load_faults.push(f);
    }

    /// The refusal of a change to a store whose loaded state breaks a rule, if it does.
    pub(crate) fn faulty(&self) -> Option<Error> {
        let first = self.load_faults.first()?;
        Some(Error::Faulty {
            message: format!(
                "{} fault(s) in the pool's metadata, first: {first}; changes are refused (run `thinlayer check`; reads of undamaged ranges and exports go on)",
                self.load_faults.len()
            ),
            faults: self.load_faults.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::error::{Error, Kind};
    use crate::fault::{Fault, What, Where};
    use crate::format::{first_data_block, LayerId, PBlock, VBlock};
    use crate::layer::{Change, Mapping};
    use crate::pool::{MemStorage, Storage};
    use crate::volume::{CreateOptions, Store};
    use std::sync::Arc;

    fn block(i: u64) -> Vec<u8> {
        vec![(i % 251) as u8 + 1; 4096]
    }

    fn pblocks(s: &Store, id: LayerId) -> Vec<PBlock> {
        let g = s.read();
        let l = g.catalog.get(id).unwrap();
        l.map.iter().filter_map(|(_, m)| m.pblock()).collect()
    }

    /// The state after a deferred load's completion is what an open of the same pool gives:
    /// a pool with free space below its extent (a layer removed), reopened with the maps'
    /// rebuild deferred; writes and commits while it "loads" go at or above the extent at
    /// open and free nothing below it; after the completion the self-check holds, the blocks
    /// below the extent that nothing holds are handed out again, and the used count is the
    /// one an eager open of the committed state finds.
    #[test]
    fn writes_while_the_maps_load_stay_above_the_extent_and_the_completion_rebuilds() {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let a = s.create_layer("a", None, Some(1024 * 4096)).unwrap().id;
        s.create_layer("b", None, Some(1024 * 4096)).unwrap();
        let b = s.layer("b").unwrap().id;
        for i in 0..64 {
            s.write_layer(a, i * 4096, &block(i)).unwrap();
            s.write_layer(b, i * 4096, &block(i + 7)).unwrap();
        }
        s.flush().unwrap();
        s.remove_layer("b").unwrap();
        s.flush().unwrap();
        drop(s);
        let floor = mem.len().unwrap() / 4096;
        let s = Store::open_in_deferred(mem.clone(), true).unwrap();
        assert!(!s.is_loaded());
        let before = pblocks(&s, a);
        // Rewrites free committed blocks below the floor; new blocks come from above it.
        for round in 0..3u64 {
            for i in (0..64).step_by(3) {
                s.write_layer(a, i * 4096, &block(i + round)).unwrap();
            }
            s.flush().unwrap();
        }
        for p in pblocks(&s, a).into_iter().filter(|p| !before.contains(p)) {
            assert!(
                p.0 >= floor,
                "{p} handed out below the extent at open ({floor})"
            );
        }
        // The self-check holds while loading too: below the floor, used is not leaked.
        s.verify_consistency().unwrap();
        s.complete_load();
        assert!(s.is_loaded());
        s.verify_consistency().unwrap();
        let eager = Store::open_in(Arc::new(MemStorage::from_bytes(mem.snapshot())), false)
            .unwrap()
            .used_blocks();
        assert_eq!(s.used_blocks(), eager);
        // The space of "b" and the rewritten blocks is handed out again.
        s.write_layer(a, 500 * 4096, &block(500)).unwrap();
        let p = s.read().catalog.get(a).unwrap().map.get(VBlock(500));
        let p = p.and_then(|m| m.pblock()).unwrap();
        assert!(
            p.0 < floor,
            "{p}: a free block below the extent, once loaded"
        );
        s.flush().unwrap();
        drop(s);
        let s = Store::open_in(mem.clone(), true).unwrap();
        s.verify_consistency().unwrap();
        let mut buf = vec![0u8; 4096];
        s.read_layer(a, 500 * 4096, &mut buf).unwrap();
        assert_eq!(buf, block(500));
    }

    /// A capped pool whose free space lies below the file's extent runs out above it while
    /// the maps load: the write waits for the completion (holding no lock, so the load can
    /// complete) and then succeeds, where it would have failed with ENOSPC.
    #[test]
    fn a_capped_pool_full_above_the_extent_waits_for_the_load() {
        let first = first_data_block(4096);
        let opts = CreateOptions {
            max_size: Some((first + 300) * 4096),
            ..Default::default()
        };
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &opts).unwrap();
        let big = s.create_layer("big", None, Some(250 * 4096)).unwrap().id;
        s.write_layer(big, 0, &vec![7u8; 250 * 4096]).unwrap();
        s.flush().unwrap();
        s.remove_layer("big").unwrap();
        s.flush().unwrap();
        let a = s.create_layer("a", None, Some(200 * 4096)).unwrap().id;
        s.flush().unwrap();
        drop(s);
        let s = Arc::new(Store::open_in_deferred(mem.clone(), true).unwrap());
        let room = s.read().pool.alloc.free_under_cap().unwrap();
        assert!(
            room < 150,
            "{room} blocks above the extent: the write must not fit"
        );
        let writer = {
            let s = s.clone();
            std::thread::spawn(move || s.write_layer(a, 0, &vec![9u8; 150 * 4096]))
        };
        while s.load_waiters() == 0 && !writer.is_finished() {
            std::thread::yield_now();
        }
        s.complete_load();
        writer.join().unwrap().unwrap();
        s.flush().unwrap();
        s.verify_consistency().unwrap();
        let mut buf = vec![0u8; 150 * 4096];
        s.read_layer(a, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 9));
    }

    /// Layers a crash left half-imported are removed when a deferred load completes, not at
    /// the open: their removal commits, and a capped pool may have room for that only below
    /// the extent, which the open would have waited for with nothing to complete the load.
    #[test]
    fn half_imported_layers_are_discarded_when_the_load_completes() {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let id = s.begin_import("half", None, 64 * 4096).unwrap().id;
        s.write_layer(id, 0, &block(1)).unwrap();
        s.flush().unwrap();
        drop(s);
        let s = Store::open_in_deferred(mem, true).unwrap();
        assert!(s.layer("half").is_ok() && s.discarded().is_empty());
        s.complete_load();
        assert!(s.layer("half").is_err());
        assert_eq!(s.discarded(), ["half"]);
        s.verify_consistency().unwrap();
    }

    /// A block mapped twice that the open could not see (its rebuild deferred, as with maps
    /// loaded after the open) is found at the completion: from then on changes, flushes
    /// included, are refused with `Error::Faulty` naming it (kind Corrupt), reads go on,
    /// and `check` reports it.
    #[test]
    fn a_fault_found_at_the_completion_refuses_changes_and_check_reports_it() {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let a = s.create_layer("a", None, Some(64 * 4096)).unwrap().id;
        let b = s.create_layer("b", None, Some(64 * 4096)).unwrap().id;
        s.write_layer(a, 0, &block(1)).unwrap();
        s.flush().unwrap();
        {
            // Damage: b's block 3 names a's pool block.
            let mut g = s.write().unwrap();
            let p = g.catalog.get(a).unwrap().map.get(VBlock(0)).unwrap();
            let crate::volume::store::Inner {
                catalog, pending, ..
            } = &mut *g;
            let to = Some(Mapping::data(p.pblock().unwrap(), 0));
            let c = Change::Map {
                layer: b,
                vblock: VBlock(3),
                to,
            };
            catalog.change(pending, c, |_| {}).unwrap();
        }
        s.flush().unwrap();
        drop(s);
        let eager = Store::open_in(mem.clone(), true).err().expect("refused");
        assert_eq!(eager.kind(), Kind::Corrupt, "{eager}");
        let s = Store::open_in_deferred(mem.clone(), true).unwrap();
        s.write_layer(a, 4096, &block(2)).unwrap();
        s.complete_load();
        let e = s.write_layer(a, 8192, &block(3)).unwrap_err();
        let Error::Faulty { faults, .. } = &e else {
            panic!("not the typed refusal: {e}")
        };
        assert!(
            faults
                .iter()
                .any(|f| matches!(f.what, What::UsedTwice { .. }) && f.at.vblock == Some(VBlock(3))),
            "{faults:?}"
        );
        assert_eq!(e.kind(), Kind::Corrupt);
        assert!(matches!(s.flush(), Err(Error::Faulty { .. })));
        let mut buf = vec![0u8; 4096];
        s.read_layer(a, 0, &mut buf).unwrap();
        assert_eq!(buf, block(1));
        drop(s);
        let r = crate::check::check(mem, false, &mut |_, _| {}).unwrap();
        assert!(
            r.faults
                .iter()
                .any(|f| matches!(f.what, What::UsedTwice { .. })),
            "{:?}",
            r.faults
        );
    }

    /// The range loader's part of step e: a range that does not load is a fault found late.
    /// Changes are refused naming it, and whoever waits for the load (a capped write, an
    /// accessor) gets the same refusal instead of waiting for ever.
    #[test]
    fn a_range_that_does_not_load_stops_the_load_and_refuses_changes() {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let a = s.create_layer("a", None, Some(64 * 4096)).unwrap().id;
        s.flush().unwrap();
        drop(s);
        let s = Store::open_in_deferred(mem, true).unwrap();
        let what = What::ChecksumPage {
            reason: "checkpoint page 7 at pool block 12: crc mismatch".into(),
        };
        s.inner
            .write()
            .unwrap()
            .late_fault(Fault::new(what, Where::default().pblock(PBlock(12))));
        s.load_stopped();
        let e = s.write_layer(a, 0, &block(1)).unwrap_err();
        assert!(
            matches!(&e, Error::Faulty { faults, .. } if faults.len() == 1),
            "{e}"
        );
        assert!(e.to_string().contains("page 7"), "{e}");
        assert!(matches!(s.wait_loaded(), Err(Error::Faulty { .. })));
        assert!(!s.is_loaded());
    }
}
