//! Holding I/O still while the serving process is replaced (`thinlayer restart`). Every
//! request through a live pool's exports (NBD and live files) and every management request
//! passes the gate; `pause` closes it and waits until the requests already inside have
//! finished, so what the store holds can be committed and handed to the next process with
//! nothing half done. Requests that arrive while it is closed wait at the gate: in the old
//! process until it exits (the kernel resends the live files' ones, NBD clients reconnect),
//! or until `resume` when the new process could not take over.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

#[derive(Default)]
struct State {
    paused: bool,
    inside: u64,
}

#[derive(Default)]
pub struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

/// A request inside the gate; dropping it lets `pause` go on.
pub struct Pass<'a>(&'a Gate);

impl Gate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enter, waiting while the gate is closed.
    pub fn enter(&self) -> Pass<'_> {
        let mut g = self.lock();
        while g.paused {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.inside += 1;
        Pass(self)
    }

    /// Close the gate and wait for the requests inside to leave. Returns when it was closed.
    pub fn pause(&self) -> Instant {
        let mut g = self.lock();
        g.paused = true;
        let closed = Instant::now();
        while g.inside > 0 {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        closed
    }

    /// Open it again: the waiting requests go on.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.inside -= 1;
        if g.inside == 0 {
            self.0.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn pause_waits_for_requests_inside_and_holds_new_ones_until_resume() {
        let gate = Arc::new(Gate::default());
        let inside = gate.enter();
        let paused = Arc::new(AtomicBool::new(false));
        let pauser = {
            let (gate, paused) = (gate.clone(), paused.clone());
            std::thread::spawn(move || {
                gate.pause();
                paused.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !paused.load(Ordering::SeqCst),
            "pause returned with a request inside"
        );
        drop(inside);
        pauser.join().unwrap();
        assert!(gate.is_paused());
        let entered = Arc::new(AtomicBool::new(false));
        let late = {
            let (gate, entered) = (gate.clone(), entered.clone());
            std::thread::spawn(move || {
                let _p = gate.enter();
                entered.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !entered.load(Ordering::SeqCst),
            "a request got through a closed gate"
        );
        gate.resume();
        late.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }
}
