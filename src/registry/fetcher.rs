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
            let slot = st.slots.entry(i).or_insert(Slot {
                round: 0,
                fetching: false,
                waiters: 0,
                last: None,
            });
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
                    return Ok(b);
                }
            } else if room {
                slot.fetching = true;
                st.in_flight += 1;
                st.requests += 1;
                drop(st);
                let got = self
                    .blob
                    .read(&mut |o, n| (self.source)(o, n), &e)
                    .map(Arc::new);
                let mut st = self.state.lock().unwrap();
                st.in_flight -= 1;
                let slot = st.slots.get_mut(&i).expect("kept while it is fetched");
                slot.fetching = false;
                slot.round += 1;
                slot.last = Some(got.as_ref().map(Arc::clone).map_err(|e| e.to_string()));
                if slot.waiters == 0 {
                    st.slots.remove(&i);
                }
                self.changed.notify_all();
                drop(st);
                match got {
                    Ok(b) => return Ok(b),
                    Err(err) if Instant::now() >= deadline => {
                        return Err(self.failed(&e, &err.to_string()));
                    }
                    Err(_) => {
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
