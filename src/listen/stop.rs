//! The stop signal every serving loop waits on: a flag, and an eventfd that becomes readable
//! when the flag is set, so a thread blocked in poll(2) (an accept loop, a backoff, a grace
//! period) wakes at once instead of looking at the flag now and then. The eventfd is never
//! read: once written it stays readable, so any number of waiters see it.

use super::Hold;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering::SeqCst};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Stop {
    flag: AtomicBool,
    /// Made on first need (`wake_fd`), so a `Stop` can be a `static`.
    wake: OnceLock<OwnedFd>,
    /// Accepting held, not stopped (a restart handing the listeners over).
    pub hold: Hold,
}

impl Stop {
    pub const fn new() -> Stop {
        Stop {
            flag: AtomicBool::new(false),
            wake: OnceLock::new(),
            hold: Hold::new(),
        }
    }

    /// Sets the flag and wakes every waiter. Async-signal-safe once `wake_fd` has been called
    /// (an atomic store and a write(2)); before that there is no waiter to wake.
    pub fn stop(&self) {
        self.flag.store(true, SeqCst);
        // Pairs with the fence in `wake_fd`: either the waiter sees the flag, or we see its fd.
        fence(SeqCst);
        if let Some(fd) = self.wake.get() {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from `one` to our eventfd. EAGAIN (counter full) still
            // leaves it readable, which is all that matters.
            unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.flag.load(SeqCst)
    }

    /// A descriptor that is readable (POLLIN) once `stop` has been called, for poll(2) or an
    /// async reactor. Never read from it.
    pub fn wake_fd(&self) -> io::Result<RawFd> {
        if let Some(fd) = self.wake.get() {
            return Ok(fd.as_raw_fd());
        }
        // SAFETY: eventfd has no memory preconditions; a non-negative result is a new fd.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // A racing caller may have set it first; then ours is dropped (closed).
        let fd = self.wake.get_or_init(|| fd).as_raw_fd();
        fence(SeqCst);
        if self.is_stopped() {
            // `stop` may have run before the fd existed: make it readable ourselves.
            self.stop();
        }
        Ok(fd)
    }

    /// Sleeps until `stop` or until `timeout` has passed (None: no limit); returns whether
    /// stopped. A backoff that a stop cuts short.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let Ok(fd) = self.wake_fd() else {
            // No descriptor to wait on (out of them): sleep in short steps instead.
            while !self.is_stopped() && deadline.is_none_or(|d| Instant::now() < d) {
                std::thread::sleep(Duration::from_millis(10));
            }
            return self.is_stopped();
        };
        loop {
            if self.is_stopped() {
                return true;
            }
            let left = match deadline {
                None => -1,
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    millis_up(d - now)
                }
            };
            let _ = poll_in(&[fd], left);
        }
    }
}

/// `d` in whole milliseconds, rounded up (so a wait never returns early), for poll(2).
pub(super) fn millis_up(d: Duration) -> libc::c_int {
    d.as_nanos()
        .div_ceil(1_000_000)
        .min(libc::c_int::MAX as u128) as libc::c_int
}

/// poll(2) for POLLIN on `fds`; which of them are readable (or in error: the caller's next
/// call on it says what). EINTR reads as "none".
pub(super) fn poll_in(fds: &[RawFd], timeout_ms: libc::c_int) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a valid array of `p.len()` pollfds for the duration of the call.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter().map(|p| p.revents != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_waiter_wakes_when_stopped_and_not_before() {
        let stop = Arc::new(Stop::new());
        assert!(!stop.wait(Some(Duration::from_millis(20))));
        let s = stop.clone();
        let waiter = std::thread::spawn(move || s.wait(None));
        std::thread::sleep(Duration::from_millis(20));
        stop.stop();
        assert!(waiter.join().unwrap());
        // It stays stopped: a later waiter returns at once.
        assert!(stop.wait(None));
    }

    #[test]
    fn a_stop_before_the_descriptor_exists_still_makes_it_readable() {
        let stop = Stop::new();
        stop.stop();
        let fd = stop.wake_fd().unwrap();
        assert_eq!(poll_in(&[fd], 0).unwrap(), vec![true]);
    }
}
