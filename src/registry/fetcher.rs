//! The extent fetcher of a lazily pulled layer (DESIGN.md §13): what a read of an unfetched
//! block waits on. It hands out only verified bytes (`RangedBlob::read` checks each extent's
//! sha256), coalesces (one fetch per extent at a time, however many readers wait for it),
//! bounds the ranged requests in flight, and rides out a registry that fails or sends wrong
//! bytes: it retries with exponential back-off until the caller's deadline, then returns the
//! last error, which names the layer's blob, the extent and what the registry said. Nothing
//! here touches the pool: the caller stores what it gets.

use crate::error::{Error, Result};
use crate::format::stream::Entry;
use crate::stream::index::RangedBlob;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Reads `len` bytes at `offset` of the blob (a ranged GET).
pub type Source = dyn Fn(u64, u64) -> Result<Vec<u8>> + Send + Sync;

#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Ranged requests in flight at once.
    pub max_in_flight: usize,
    /// How long a read waits for its extent before it fails (the "about a minute").
    pub timeout: Duration,
    /// First back-off after a failure; doubled each time up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            max_in_flight: 4,
            timeout: Duration::from_secs(60),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Most bytes between two extents of the blob that one request still fetches together: the
/// 20-byte header of the next data record, with room to spare.
const MERGE_GAP: u64 = 4096;
/// Most bytes of extents one request fetches.
const MAX_RUN: u64 = 8 << 20;

/// What became of the latest fetch of one extent, for the readers that waited on it.
struct Slot {
    /// Bumped when a fetch of the extent ends.
    round: u64,
    fetching: bool,
    /// Readers waiting for the fetch in progress; the last one to leave drops the slot, so
    /// fetched bytes are held only until every waiter has them.
    waiters: usize,
    last: Option<std::result::Result<Arc<Vec<u8>>, String>>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            round: 0,
            fetching: false,
            waiters: 0,
            last: None,
        }
    }
}

pub struct Fetcher {
    blob: RangedBlob,
    source: Box<Source>,
    policy: Policy,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    slots: HashMap<usize, Slot>,
    in_flight: usize,
    /// Ranged requests made, for `status` and tests.
    requests: u64,
}

impl Fetcher {
    pub fn new(blob: RangedBlob, source: Box<Source>, policy: Policy) -> Fetcher {
        Fetcher {
            blob,
            source,
            policy,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    pub fn blob(&self) -> &RangedBlob {
        &self.blob
    }

    /// Ranged requests made so far.
    pub fn requests(&self) -> u64 {
        self.state.lock().unwrap().requests
    }

    /// The verified bytes of data entry `i` of the index, waiting at most `policy.timeout`.
    pub fn get(&self, i: usize) -> Result<Arc<Vec<u8>>> {
        let mut got = self.get_run(i, 0)?;
        Ok(got.swap_remove(0).1)
    }

    /// The verified bytes of data entry `i` of the index, waiting at most `policy.timeout`,
    /// first in what this returns. When this call fetches it, up to `more` entries after it
    /// come in the same ranged request (each verified on its own), as long as they are data,
    /// lie next to it in the blob (at most `MERGE_GAP` bytes between: record headers) and no
    /// one fetches them already: one request for the neighbouring extents of one read. Those
    /// that came right follow `i`'s bytes, with their indexes.
    pub fn get_run(&self, i: usize, more: usize) -> Result<Vec<(usize, Arc<Vec<u8>>)>> {
        let e = *self.blob.entries.get(i).ok_or_else(|| {
            Error::InvalidInput(format!("{}: no index entry {i}", self.blob.label))
        })?;
        if e.is_whiteout() {
            return Err(Error::InvalidInput(format!(
                "{}: index entry {i} is a whiteout, not data",
                self.blob.label
            )));
        }
        let deadline = Instant::now() + self.policy.timeout;
        let mut backoff = self.policy.backoff_min;
        loop {
            let mut st = self.state.lock().unwrap();
            let room = st.in_flight < self.policy.max_in_flight;
            let slot = st.slots.entry(i).or_insert_with(Slot::new);
            if slot.fetching {
                // Someone fetches it: wait for that fetch's end and take its result.
                let round = slot.round;
                slot.waiters += 1;
                let mut st = self.wait(st, deadline, |s| s.slots[&i].round != round);
                let slot = st.slots.get_mut(&i).expect("kept while it has waiters");
                slot.waiters -= 1;
                let last = slot.last.clone();
                if slot.waiters == 0 && !slot.fetching {
                    st.slots.remove(&i);
                }
                if let Some(Ok(b)) = last {
                    return Ok(vec![(i, b)]);
                }
            } else if room {
                slot.fetching = true;
                let run = self.claim_run(&mut st, i, more);
                st.in_flight += 1;
                st.requests += 1;
                drop(st);
                let es: Vec<Entry> = run.iter().map(|&k| self.blob.entries[k]).collect();
                // Per extent: its bytes, or why not (the request failing fails them all).
                let got: Vec<std::result::Result<Arc<Vec<u8>>, String>> =
                    match self.blob.read_run(&mut |o, n| (self.source)(o, n), &es) {
                        Ok(each) => each
                            .into_iter()
                            .map(|r| r.map(Arc::new).map_err(|e| e.to_string()))
                            .collect(),
                        Err(err) => vec![Err(err.to_string()); es.len()],
                    };
                let mut st = self.state.lock().unwrap();
                st.in_flight -= 1;
                for (k, r) in run.iter().zip(&got) {
                    let slot = st.slots.get_mut(k).expect("kept while it is fetched");
                    slot.fetching = false;
                    slot.round += 1;
                    slot.last = Some(r.clone());
                    if slot.waiters == 0 {
                        st.slots.remove(k);
                    }
                }
                self.changed.notify_all();
                drop(st);
                let mut got = run.into_iter().zip(got);
                match got.next().expect("a run holds i") {
                    (_, Ok(b)) => {
                        let rest = got.filter_map(|(k, r)| Some((k, r.ok()?)));
                        return Ok(std::iter::once((i, b)).chain(rest).collect());
                    }
                    (_, Err(err)) if Instant::now() >= deadline => {
                        return Err(self.failed(&e, &err));
                    }
                    (_, Err(_)) => {
                        // The last wait is cut to the deadline, so the last try is made
                        // there: a read fails only once the whole timeout has passed.
                        let left = deadline.saturating_duration_since(Instant::now());
                        std::thread::sleep(backoff.min(left));
                        backoff = (backoff * 2).min(self.policy.backoff_max);
                        continue;
                    }
                }
            } else {
                // Too many requests in flight: wait for one to end.
                let n = st.in_flight;
                drop(self.wait(st, deadline, |s| s.in_flight < n));
            }
            if Instant::now() >= deadline {
                let st = self.state.lock().unwrap();
                let why = match st.slots.get(&i).and_then(|x| x.last.clone()) {
                    Some(Err(w)) => w,
                    _ => "no answer in time".to_string(),
                };
                return Err(self.failed(&e, &why));
            }
        }
    }

    /// Entry `i` (claimed by the caller) and up to `more` entries after it that one ranged
    /// request can bring along, each claimed (marked fetching) here.
    fn claim_run(&self, st: &mut State, i: usize, more: usize) -> Vec<usize> {
        let es = &self.blob.entries;
        let mut run = vec![i];
        let (mut end, mut bytes) = (es[i].blob_offset + es[i].length, es[i].length);
        for (k, &x) in es.iter().enumerate().skip(i + 1).take(more) {
            let near = x.blob_offset >= end && x.blob_offset - end <= MERGE_GAP;
            if x.is_whiteout() || !near || bytes + x.length > MAX_RUN {
                break;
            }
            let slot = st.slots.entry(k).or_insert_with(Slot::new);
            if slot.fetching {
                break;
            }
            slot.fetching = true;
            run.push(k);
            end = x.blob_offset + x.length;
            bytes += x.length;
        }
        run
    }

    /// Wait until `done` holds or the deadline passes.
    fn wait<'a>(
        &self,
        mut st: std::sync::MutexGuard<'a, State>,
        deadline: Instant,
        done: impl Fn(&State) -> bool,
    ) -> std::sync::MutexGuard<'a, State> {
        while !done(&st) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self.changed.wait_timeout(st, deadline - now).unwrap().0;
        }
        st
    }

    /// The error a read gets when its extent could not be had in time: EIO to a block client.
    fn failed(&self, e: &Entry, why: &str) -> Error {
        Error::Unavailable(format!(
            "{}: the extent at disk byte {} ({} bytes, blob byte {}) could not be fetched within {:?}: {why}",
            self.blob.label, e.offset, e.length, e.blob_offset, self.policy.timeout
        ))
    }
}

/// Reads waiting on the registry, across every remote layer of a server: the background
/// fills yield to them (they share the link to the registry, and a read blocks a reader while
/// a fill's bytes block no one). A fill starts an extent only when no read waits for a fetch
/// and none has for `quiet`: a container's reads come in bursts, and starting a fill's 1 MiB
/// in every short pause between them would still halve the bandwidth of the next read.
pub struct Demand {
    quiet: Duration,
    state: Mutex<DemandState>,
    changed: Condvar,
}

#[derive(Default)]
struct DemandState {
    /// Reads waiting on a registry now.
    reads: usize,
    /// When the last of them ended.
    last: Option<Instant>,
    /// Fills waiting for the reads to go quiet, for `status` and tests.
    fills: usize,
}

/// A read waiting on the registry, until dropped.
pub struct Waiting<'a>(&'a Demand);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap();
        st.reads -= 1;
        st.last = Some(Instant::now());
        self.0.changed.notify_all();
    }
}

impl Demand {
    pub fn new(quiet: Duration) -> Arc<Demand> {
        Arc::new(Demand {
            quiet,
            state: Mutex::new(DemandState::default()),
            changed: Condvar::new(),
        })
    }

    /// A read starts waiting on the registry.
    pub fn waiting(&self) -> Waiting<'_> {
        self.state.lock().unwrap().reads += 1;
        Waiting(self)
    }

    /// Reads are about to come (a layer was just pulled): the fills wait the quiet time from
    /// now, as after a read, so they do not take the link from a container's first reads.
    pub fn expect_reads(&self) {
        let mut st = self.state.lock().unwrap();
        st.last = Some(Instant::now());
        self.changed.notify_all();
    }

    /// Fills waiting for the reads to go quiet now.
    pub fn fills_waiting(&self) -> usize {
        self.state.lock().unwrap().fills
    }

    /// Wait until no read waits on the registry and none has for the quiet time, or until
    /// `cancel` (checked every 100 ms).
    pub fn wait_quiet(&self, cancel: &AtomicBool) {
        let slice = Duration::from_millis(100);
        let mut st = self.state.lock().unwrap();
        st.fills += 1;
        while !cancel.load(std::sync::atomic::Ordering::SeqCst) {
            let left = match st.last {
                _ if st.reads > 0 => slice,
                Some(t) => self.quiet.saturating_sub(t.elapsed()),
                None => Duration::ZERO,
            };
            if left.is_zero() {
                break;
            }
            st = self.changed.wait_timeout(st, left.min(slice)).unwrap().0;
        }
        st.fills -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use crate::pool::MemStorage;
    use crate::stream::Digest;
    use crate::volume::{CreateOptions, Store};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A layer of three 1 MiB data extents, its stream, and the stream opened by range.
    fn a_blob() -> (Arc<Vec<u8>>, RangedBlob) {
        let s = Store::create_in(Arc::new(MemStorage::new()), &CreateOptions::default()).unwrap();
        let id = s.create_layer("l", None, Some(4 << 20)).unwrap().id;
        for k in 0..3u8 {
            s.write_layer(id, k as u64 * (1 << 20), &vec![k + 1; 1 << 20])
                .unwrap();
        }
        s.commit_layer("l").unwrap();
        let mut bytes = Vec::new();
        crate::stream::send(&s, "l", None, &mut bytes, "a buffer", &mut |_, _| {}).unwrap();
        let bytes = Arc::new(bytes);
        let b = bytes.clone();
        let mut fetch = |o: u64, n: u64| Ok(b[o as usize..(o + n) as usize].to_vec());
        let len = bytes.len() as u64;
        let blob = RangedBlob::open(&mut fetch, Digest::sha256(&bytes), len, "blob x").unwrap();
        assert_eq!(blob.entries.len(), 3);
        (bytes, blob)
    }

    fn quick() -> Policy {
        Policy {
            max_in_flight: 2,
            timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(4),
        }
    }

    /// Wait (by condition, not by time) until `f` holds.
    fn until(f: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < end, "condition never held");
            std::thread::yield_now();
        }
    }

    /// A source over `bytes` that holds every request until `open` is set, counting requests
    /// started and the most in flight at once.
    struct Gate {
        bytes: Arc<Vec<u8>>,
        open: std::sync::atomic::AtomicBool,
        started: AtomicUsize,
        now: AtomicUsize,
        most: AtomicUsize,
    }

    fn gated(bytes: Arc<Vec<u8>>) -> Arc<Gate> {
        Arc::new(Gate {
            bytes,
            open: false.into(),
            started: 0.into(),
            now: 0.into(),
            most: 0.into(),
        })
    }

    struct OpenOnDrop<'a>(&'a Gate);

    impl Drop for OpenOnDrop<'_> {
        fn drop(&mut self) {
            self.0.open.store(true, Ordering::SeqCst);
        }
    }

    fn source(g: &Arc<Gate>) -> Box<Source> {
        let g = g.clone();
        Box::new(move |o, n| {
            g.started.fetch_add(1, Ordering::SeqCst);
            let now = g.now.fetch_add(1, Ordering::SeqCst) + 1;
            g.most.fetch_max(now, Ordering::SeqCst);
            while !g.open.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            g.now.fetch_sub(1, Ordering::SeqCst);
            Ok(g.bytes[o as usize..(o + n) as usize].to_vec())
        })
    }

    #[test]
    fn readers_of_one_extent_share_one_request_and_requests_in_flight_are_bounded() {
        let (bytes, blob) = a_blob();
        let g = gated(bytes);
        let f = &Fetcher::new(blob, source(&g), quick());
        std::thread::scope(|s| {
            // A failed check below still lets the held requests go, so the test fails, not hangs.
            let _open = OpenOnDrop(&g);
            let same: Vec<_> = (0..6).map(|_| s.spawn(move || f.get(1).unwrap())).collect();
            // Every reader of extent 1 is waiting on the one request, before it is answered.
            until(|| {
                let st = f.state.lock().unwrap();
                st.slots.get(&1).is_some_and(|x| x.waiters == 5)
            });
            assert_eq!(g.started.load(Ordering::SeqCst), 1);
            // Two other extents: one more request fits, the third waits for a free one.
            let others: Vec<_> = [0, 2]
                .map(|i| s.spawn(move || (i, f.get(i).unwrap())))
                .into();
            until(|| g.started.load(Ordering::SeqCst) == 2);
            g.open.store(true, Ordering::SeqCst);
            for t in same {
                assert_eq!(*t.join().unwrap(), vec![2u8; 1 << 20]);
            }
            for t in others {
                let (i, b) = t.join().unwrap();
                assert_eq!(*b, vec![i as u8 + 1; 1 << 20]);
            }
        });
        assert_eq!(f.requests(), 3, "one request per extent");
        assert_eq!(
            g.most.load(Ordering::SeqCst),
            2,
            "never more than max_in_flight"
        );
        assert!(f.state.lock().unwrap().slots.is_empty(), "no bytes kept");
    }

    #[test]
    fn a_failing_registry_is_waited_out_and_wrong_bytes_are_never_returned() {
        let (bytes, blob) = a_blob();
        // Down for three requests, then wrong bytes twice, then right.
        let calls = Arc::new(AtomicUsize::new(0));
        let (c, b) = (calls.clone(), bytes.clone());
        let src: Box<Source> = Box::new(move |o, n| {
            let k = c.fetch_add(1, Ordering::SeqCst);
            if k < 3 {
                return Err(Error::Unavailable("connection refused".into()));
            }
            let mut v = b[o as usize..(o + n) as usize].to_vec();
            if k < 5 {
                v[7] ^= 1;
            }
            Ok(v)
        });
        let f = Fetcher::new(blob.clone(), src, quick());
        assert_eq!(*f.get(0).unwrap(), vec![1u8; 1 << 20]);
        assert_eq!(calls.load(Ordering::SeqCst), 6);

        // Never answering right: after the timeout, an error naming the extent and the cause.
        let policy = Policy {
            timeout: Duration::from_millis(50),
            ..quick()
        };
        let down: Box<Source> =
            Box::new(|_, _| Err(Error::Unavailable("connection refused".into())));
        let e = Fetcher::new(blob.clone(), down, policy).get(2).unwrap_err();
        assert_eq!(e.kind(), Kind::Unavailable, "{e}");
        let m = e.to_string();
        assert!(
            m.contains("blob x")
                && m.contains("disk byte 2097152")
                && m.contains("connection refused"),
            "{m}"
        );
        let b = bytes.clone();
        let wrong: Box<Source> = Box::new(move |o, n| {
            let mut v = b[o as usize..(o + n) as usize].to_vec();
            v[0] ^= 1;
            Ok(v)
        });
        let e = Fetcher::new(blob, wrong, policy).get(1).unwrap_err();
        assert!(e.to_string().contains("does not match its sha256"), "{e}");
    }
}
