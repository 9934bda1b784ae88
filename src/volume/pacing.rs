//! The background load's manners toward the block paths (DESIGN §12 item 3c): a lazily
//! opened pool's loader takes the store's write lock once a range, and after each hold
//! leaves the lock to the block paths that came meanwhile, for at most as long as it held
//! it. Measured at 6260727 (100M scattered blocks, a timer in a scratch build): 63% of the
//! reads during the load arrived while the loader held the lock and waited the rest of its
//! hold (490 µs median), because it came back for the lock after only the next range's
//! decode (about 50 µs); a client reading at queue depth 1 met a hold at almost every read.
//! Neither the readers' own lock (they never waited for it otherwise) nor the CPU (the
//! loader at `SCHED_IDLE` left the median as it was) was the cause.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How often the loader, leaving the lock, looks whether block paths still come: a reader
/// at queue depth 1 sends its next request within about this long of its last reply.
const SLICE: Duration = Duration::from_micros(100);

/// Counts the block paths (reads, writes, zeroes, block status) that came and that are under
/// way, for the loader to leave the lock to.
#[derive(Default)]
pub(crate) struct BlockPaths {
    arrived: AtomicU64,
    in_flight: AtomicUsize,
}

/// A block path under way, from its start (before its first lock) to its end.
pub(crate) struct Visit<'a>(&'a BlockPaths);

impl Drop for Visit<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl BlockPaths {
    pub(crate) fn enter(&self) -> Visit<'_> {
        self.arrived.fetch_add(1, Relaxed);
        self.in_flight.fetch_add(1, Relaxed);
        Visit(self)
    }

    /// How many came so far.
    pub(crate) fn arrived(&self) -> u64 {
        self.arrived.load(Relaxed)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// Called by the loader holding no lock, after a hold that took `held` and began when
    /// `arrived()` said `before`: if a block path came since, wait while one is under way or
    /// another came within the last `SLICE`, for at most `held` (so the loader keeps at
    /// least half the time under steady reads, and its load ends: about twice as long at
    /// worst as with no reads). No block path since: no wait. Returns how many times it
    /// slept.
    pub(crate) fn make_way(&self, before: u64, held: Duration) -> u32 {
        let start = Instant::now();
        let mut seen = before;
        let mut slept = 0;
        loop {
            let now = self.arrived();
            if now == seen && self.in_flight() == 0 {
                break;
            }
            seen = now;
            let left = held.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(SLICE.min(left));
            slept += 1;
        }
        slept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No block path since the hold began: the loader goes straight on (an idle server's
    /// load is not slowed).
    #[test]
    fn without_block_paths_the_loader_does_not_wait() {
        let p = BlockPaths::default();
        drop(p.enter());
        let before = p.arrived();
        assert_eq!(p.make_way(before, Duration::from_secs(3600)), 0);
    }

    /// A block path under way when the loader lets go of the lock keeps it waiting until
    /// the path ends (its hold long enough).
    #[test]
    fn a_block_path_under_way_keeps_the_loader_waiting_until_it_ends() {
        let p = std::sync::Arc::new(BlockPaths::default());
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let before = p.arrived();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = {
            let (p, done) = (p.clone(), done.clone());
            std::thread::spawn(move || {
                let visit = p.enter();
                tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(5));
                done.store(true, Relaxed);
                drop(visit);
            })
        };
        rx.recv().unwrap();
        assert!(p.make_way(before, Duration::from_secs(3600)) > 0);
        assert!(
            done.load(Relaxed),
            "the loader went on while a block path was under way"
        );
        path.join().unwrap();
    }

    /// Block paths that never stop do not hold the loader past its budget (its hold): the
    /// load ends under any read load.
    #[test]
    fn block_paths_that_never_stop_leave_the_loader_its_share() {
        let p = BlockPaths::default();
        let before = p.arrived();
        let _forever = p.enter();
        assert!(p.make_way(before, Duration::from_millis(1)) > 0);
        assert_eq!(p.in_flight(), 1);
    }
}
