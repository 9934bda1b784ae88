//! Background commits, for every long-running frontend (the NBD server, the control API): they
//! bound what a crash can lose when clients never flush, and the open transaction's memory.

use super::store::Store;
use crate::log::{self, Level};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Commit early once the open transaction's records pass this size, whatever the interval.
pub const PENDING_TRIGGER_BYTES: usize = 16 << 20;
/// How often the committer looks at the store.
const TICK: Duration = Duration::from_millis(100);

/// A thread that commits a store's open transaction every `every`, or sooner when it grows
/// past `PENDING_TRIGGER_BYTES`. Stops (without a last commit: the owner makes that) when
/// dropped or `stop`ped.
pub struct Committer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    pub fn start(store: Arc<Store>, every: Duration) -> Committer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || {
                let mut waited = Duration::ZERO;
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    waited += TICK;
                    let big = store.pending_bytes() > PENDING_TRIGGER_BYTES;
                    if (waited >= every || big) && store.has_pending() {
                        if let Err(e) = store.flush() {
                            log::process(
                                Level::Error,
                                format_args!("thinlayer: background commit failed: {e}"),
                            );
                        }
                        waited = Duration::ZERO;
                    }
                }
            })
            .expect("spawning the committer thread");
        Committer {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop and wait for the thread (a commit it is making finishes first).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.halt();
    }
}
