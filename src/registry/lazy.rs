//! A remote layer's blob as the volume's `RemoteSource` (DESIGN.md §13): blocks are looked up
//! in the blob's index, fetched by range through the extent fetcher (coalesced, bounded,
//! retried until the reader's deadline, sha256-verified) and stored with `fill_remote`. And the
//! background fill that fetches the rest and then makes the layer an ordinary one.
//!
//! Nothing here knows how the ranged reads reach the registry: the fetcher's `Source` does
//! (`range::fetch` in a server, a slice in tests).

use super::fetcher::{Demand, Fetcher};
use crate::error::{Error, Result};
use crate::format::stream::Entry;
use crate::format::{LayerId, VBlock};
use crate::volume::{RemoteSource, Store};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub struct BlobSource {
    fetcher: Fetcher,
    block_size: u64,
    /// Reads waiting on the registry (shared by a server's remote layers): fills yield to them.
    demand: Arc<Demand>,
    /// Bytes of data extents stored by this source, for `status`.
    fetched: AtomicU64,
    /// Its fill waits for reads to go quiet, for `status`.
    yielding: AtomicBool,
}

impl BlobSource {
    pub fn new(fetcher: Fetcher, block_size: u32, demand: Arc<Demand>) -> BlobSource {
        BlobSource {
            fetcher,
            block_size: block_size as u64,
            demand,
            fetched: AtomicU64::new(0),
            yielding: AtomicBool::new(false),
        }
    }

    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// Bytes of data the blob holds (its data extents; whiteouts need no fetch).
    pub fn data_bytes(&self) -> u64 {
        let es = self.entries().iter().filter(|e| !e.is_whiteout());
        es.map(|e| e.length).sum()
    }

    /// Whether its fill waits for reads to go quiet now.
    pub fn yielding(&self) -> bool {
        self.yielding.load(Ordering::Relaxed)
    }

    /// Bytes of data this source has stored.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    fn entries(&self) -> &[Entry] {
        &self.fetcher.blob().entries
    }

    /// The index entry covering block `vb` (entries are in disk order and never overlap).
    fn entry_at(&self, vb: VBlock) -> Option<usize> {
        let at = vb.0 * self.block_size;
        let es = self.entries();
        let i = es.partition_point(|e| e.offset + e.length <= at);
        es.get(i).filter(|e| e.offset <= at).map(|_| i)
    }
}

impl BlobSource {
    /// Data entry `i` and, in the same request, the entries after it up to index `last` that
    /// `layer` lacks (stopping at the first it holds), stored.
    fn fetch_run(&self, store: &Store, layer: LayerId, i: usize, last: usize) -> Result<()> {
        let es = self.entries();
        let more = (i + 1..=last)
            .take_while(|&k| {
                !es[k].is_whiteout()
                    && store
                        .remote_lacks(layer, es[k].offset, es[k].length)
                        .unwrap_or(false)
            })
            .count();
        for (k, bytes) in self.fetcher.get_run(i, more)? {
            let e = es[k];
            store.fill_remote(layer, e.offset, &bytes)?;
            self.fetched.fetch_add(e.length, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl RemoteSource for BlobSource {
    fn listed(&self, vb: VBlock) -> bool {
        self.entry_at(vb).is_some()
    }

    /// A read's fetch: counted as demand (the fills wait), with the data extents after the
    /// block's that the read also covers fetched in the same request.
    fn fetch(&self, store: &Store, layer: LayerId, vb: VBlock, end: VBlock) -> Result<()> {
        let i = self.entry_at(vb).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{}: no index entry for disk byte {}",
                self.fetcher.blob().label,
                vb.0 * self.block_size
            ))
        })?;
        let e = self.entries()[i];
        if e.is_whiteout() {
            // Written when the layer was made; a whiteout needs no bytes, only this block.
            let bs = self.block_size;
            let end = (vb.0 * bs + bs).min(e.offset + e.length);
            return store.fill_remote(layer, vb.0 * bs, &vec![0; (end - vb.0 * bs) as usize]);
        }
        let _waiting = self.demand.waiting();
        let end_byte = end.0.saturating_mul(self.block_size);
        let es = self.entries();
        let last = i + es[i + 1..].partition_point(|x| x.offset < end_byte);
        self.fetch_run(store, layer, i, last)
    }
}

/// What a background fill did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Filled {
    /// Data extents fetched by this fill (those stored before are skipped).
    pub extents: u64,
    /// All of the blob is local and the layer is no longer remote.
    pub finished: bool,
}

/// Fetch every extent of remote layer `layer` it lacks, in index order, one request each and
/// each only when no read waits on the registry and none has for a while (`Demand`: reads
/// first), committing after every `commit_every` bytes; then make it an ordinary layer (`finish_remote`) and commit. Stops at
/// `cancel` (set by `rm`, or the server stopping): what was committed stays and is not fetched
/// again by the next fill, which starts from the map. A fetch that fails past the fetcher's
/// deadline ends the fill with its error; the next fill resumes.
pub fn fill_all(
    store: &Store,
    layer: LayerId,
    src: &BlobSource,
    commit_every: u64,
    cancel: &AtomicBool,
) -> Result<Filled> {
    let mut done = Filled::default();
    let mut since_commit = 0u64;
    let data = src.entries().iter().enumerate();
    for (i, e) in data.filter(|(_, e)| !e.is_whiteout()) {
        if cancel.load(Ordering::SeqCst) {
            store.flush()?;
            return Ok(done);
        }
        if !store.remote_lacks(layer, e.offset, e.length)? {
            continue;
        }
        // Reads first: wait while any waits on the registry, and a while after.
        src.yielding.store(true, Ordering::Relaxed);
        src.demand.wait_quiet(cancel);
        src.yielding.store(false, Ordering::Relaxed);
        if cancel.load(Ordering::SeqCst) {
            continue;
        }
        src.fetch_run(store, layer, i, i)?;
        done.extents += 1;
        since_commit += e.length;
        if since_commit >= commit_every {
            store.flush()?;
            since_commit = 0;
        }
    }
    store.finish_remote(layer)?;
    store.flush()?;
    done.finished = true;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use crate::pool::MemStorage;
    use crate::registry::fetcher::{Policy, Source};
    use crate::stream::index::RangedBlob;
    use crate::stream::Digest;
    use crate::volume::remote::tests::{publish, read, same, subscribe, MIB, SIZE};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Duration;

    fn policy(timeout_ms: u64) -> Policy {
        Policy {
            max_in_flight: 2,
            timeout: Duration::from_millis(timeout_ms),
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(8),
        }
    }

    /// A blob source over `bytes` whose ranged reads go through `get`.
    fn source(bytes: &[u8], get: Box<Source>, timeout_ms: u64) -> Arc<BlobSource> {
        let mut f = |o: u64, n: u64| Ok(bytes[o as usize..(o + n) as usize].to_vec());
        let blob = RangedBlob::open(
            &mut f,
            Digest::sha256(bytes),
            bytes.len() as u64,
            "blob app",
        )
        .unwrap();
        Arc::new(BlobSource::new(
            Fetcher::new(blob, get, policy(timeout_ms)),
            4096,
            Demand::new(Duration::ZERO),
        ))
    }

    fn whiteouts(src: &BlobSource) -> Vec<(u64, u64)> {
        let es = src.entries().iter().filter(|e| e.is_whiteout());
        es.map(|e| (e.offset, e.length)).collect()
    }

    /// Ranged reads of `bytes`, counted; `cancel_after` requests set `cancel`.
    fn counted(
        bytes: Arc<Vec<u8>>,
        calls: Arc<AtomicUsize>,
        cancel: Option<(usize, Arc<AtomicBool>)>,
    ) -> Box<Source> {
        Box::new(move |o, n| {
            let k = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some((after, c)) = &cancel {
                if k >= *after {
                    c.store(true, Ordering::SeqCst);
                }
            }
            Ok(bytes[o as usize..(o + n) as usize].to_vec())
        })
    }

    #[test]
    fn a_read_across_extents_fetches_them_in_one_request_and_a_wrong_one_spoils_only_itself() {
        let (want, base, app) = publish();
        let app = Arc::new(app);
        // App's data, 0.5 MiB..3 MiB, is three extents next to each other in the blob.
        let calls = Arc::new(AtomicUsize::new(0));
        let src = source(&app, counted(app.clone(), calls.clone(), None), 10_000);
        let (s, id) = subscribe(&Arc::new(MemStorage::new()), &base, &whiteouts(&src));
        s.attach_remote(id, src.clone()).unwrap();
        let (at, len) = (MIB / 2, 5 * MIB / 2);
        same(
            &read(&s, id, at, len as usize).unwrap(),
            &want[at as usize..][..len as usize],
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "three extents, one request"
        );
        assert_eq!(src.fetched(), len);

        // The middle extent wrong in the registry: the read fails, its neighbours, which came
        // in the same request, are stored, and read again without a request.
        let e = *src.entries().iter().find(|e| e.offset == MIB).unwrap();
        let mut bad = (*app).clone();
        bad[(e.blob_offset + 5) as usize] ^= 1;
        let calls = Arc::new(AtomicUsize::new(0));
        let src = source(&app, counted(Arc::new(bad), calls.clone(), None), 200);
        let (s, id) = subscribe(&Arc::new(MemStorage::new()), &base, &whiteouts(&src));
        s.attach_remote(id, src.clone()).unwrap();
        let err = read(&s, id, at, len as usize).unwrap_err();
        assert!(
            err.to_string().contains("does not match its sha256"),
            "{err}"
        );
        assert!(!s.remote_lacks(id, at, MIB / 2).unwrap());
        assert!(s.remote_lacks(id, MIB, MIB).unwrap(), "never stored");
        assert!(!s.remote_lacks(id, 2 * MIB, MIB).unwrap());
        let n = calls.load(Ordering::SeqCst);
        same(
            &read(&s, id, 2 * MIB, MIB as usize).unwrap(),
            &want[2 * MIB as usize..][..MIB as usize],
        );
        assert_eq!(calls.load(Ordering::SeqCst), n);
    }

    #[test]
    fn the_fill_fetches_nothing_while_a_read_waits_on_the_registry() {
        let (want, base, app) = publish();
        let app = Arc::new(app);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut f = |o: u64, n: u64| Ok(app[o as usize..(o + n) as usize].to_vec());
        let blob = RangedBlob::open(&mut f, Digest::sha256(&app), app.len() as u64, "b").unwrap();
        let get = counted(app.clone(), calls.clone(), None);
        let demand = Demand::new(Duration::ZERO);
        let f = Fetcher::new(blob, get, policy(10_000));
        let src = Arc::new(BlobSource::new(f, 4096, demand.clone()));
        let (s, id) = subscribe(&Arc::new(MemStorage::new()), &base, &whiteouts(&src));
        s.attach_remote(id, src.clone()).unwrap();
        // A read of another layer waits on the registry.
        let read_waits = demand.waiting();
        std::thread::scope(|t| {
            let fill = t.spawn(|| fill_all(&s, id, &src, MIB, &AtomicBool::new(false)));
            let end = std::time::Instant::now() + Duration::from_secs(20);
            while demand.fills_waiting() == 0 {
                assert!(std::time::Instant::now() < end, "the fill never waited");
                std::thread::yield_now();
            }
            assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing fetched meanwhile");
            assert!(src.yielding(), "status shows it");
            drop(read_waits);
            let f = fill.join().unwrap().unwrap();
            assert!(f.finished);
        });
        assert!(!src.yielding());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        same(&read(&s, id, 0, SIZE as usize).unwrap(), &want);
    }

    #[test]
    fn a_fill_cut_off_resumes_without_fetching_what_was_committed() {
        let (want, base, app) = publish();
        let app = Arc::new(app);
        let mem = Arc::new(MemStorage::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let cancel = Arc::new(AtomicBool::new(false));
        let get = counted(app.clone(), calls.clone(), Some((2, cancel.clone())));
        let src = source(&app, get, 10_000);
        let (s, id) = subscribe(&mem, &base, &whiteouts(&src));
        s.attach_remote(id, src.clone()).unwrap();
        // Cut off after two extents, each committed (commit_every = 1 byte); then the process
        // dies: what the pool file holds at that moment is reopened.
        let f = fill_all(&s, id, &src, 1, &cancel).unwrap();
        assert_eq!((f.extents, f.finished), (2, false));
        let mem = Arc::new(MemStorage::from_bytes(mem.snapshot()));
        drop(s);
        let data = src.entries().iter().filter(|e| !e.is_whiteout()).count();
        let s = Store::open_in(mem.clone(), true).unwrap();
        let calls2 = Arc::new(AtomicUsize::new(0));
        let src = source(&app, counted(app.clone(), calls2.clone(), None), 10_000);
        s.attach_remote(id, src.clone()).unwrap();
        let f = fill_all(&s, id, &src, 4 * MIB, &AtomicBool::new(false)).unwrap();
        assert!(f.finished);
        assert_eq!(f.extents as usize, data - 2);
        assert_eq!(
            calls2.load(Ordering::SeqCst),
            data - 2,
            "nothing fetched twice"
        );
        assert_eq!(src.fetched(), (data as u64 - 2) * MIB);
        drop(s);
        // Whole, committed, an ordinary layer: it reads with no source and checks clean.
        let s = Store::open_in(mem.clone(), false).unwrap();
        same(&read(&s, id, 0, SIZE as usize).unwrap(), &want);
        assert!(!s.layers().iter().any(|l| l.name == "app" && l.writable));
        let r = crate::check::check(mem, true, &mut |_, _| {}).unwrap();
        assert!(r.is_clean(), "{:?}", r.faults);
    }

    #[test]
    fn a_flipped_byte_is_never_served_and_a_registry_outage_is_waited_out() {
        let (want, base, app) = publish();
        let app = Arc::new(app);
        let mem = Arc::new(MemStorage::new());
        // The registry's copy has one byte flipped inside the extent at disk byte 1 MiB.
        let src = source(&app, counted(app.clone(), Default::default(), None), 10_000);
        let e = *src.entries().iter().find(|e| e.offset == MIB).unwrap();
        let mut bad = (*app).clone();
        bad[(e.blob_offset + 77) as usize] ^= 1;
        let down = Arc::new(AtomicBool::new(false));
        let (d, bad) = (down.clone(), Arc::new(bad));
        let get: Box<Source> = Box::new(move |o, n| {
            if d.load(Ordering::SeqCst) {
                return Err(Error::Unavailable(
                    "registry 127.0.0.1:5000: connection refused".into(),
                ));
            }
            Ok(bad[o as usize..(o + n) as usize].to_vec())
        });
        let src = source(&app, get, 300);
        let (s, id) = subscribe(&mem, &base, &whiteouts(&src));
        s.attach_remote(id, src.clone()).unwrap();
        let err = read(&s, id, MIB + 4096, 4096).unwrap_err();
        assert_eq!(err.kind(), Kind::Unavailable, "{err}");
        assert!(
            err.to_string().contains("does not match its sha256"),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!("disk byte {MIB}")),
            "{err}"
        );
        assert!(
            s.remote_lacks(id, MIB, MIB).unwrap(),
            "nothing of it stored"
        );
        // Another extent reads right; with the registry down it fails after the deadline
        // naming the registry's error, and works once it is back.
        down.store(true, Ordering::SeqCst);
        let err = read(&s, id, 2 * MIB, 4096).unwrap_err();
        assert!(err.to_string().contains("connection refused"), "{err}");
        down.store(false, Ordering::SeqCst);
        same(
            &read(&s, id, 2 * MIB, 4096).unwrap(),
            &want[2 * MIB as usize..][..4096],
        );
        // The background fill stops at the bad extent with its error; the layer stays remote.
        let e = fill_all(&s, id, &src, MIB, &AtomicBool::new(false)).unwrap_err();
        assert!(e.to_string().contains("sha256"), "{e}");
        assert!(s.remote_lacks(id, MIB, MIB).unwrap());
    }
}
