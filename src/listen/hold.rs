//! Holding the accept loops without stopping them. While a restart hands the listening sockets
//! to a new process, this one must not accept a connection: it exits after the hand-over, and
//! such a client would see its connection closed. Held, the loops leave the listeners alone
//! (clients that connect wait in the listen backlog, for whichever process accepts next);
//! connections already open are not touched. Released (a hand-over that failed), they accept
//! again.
//!
//! The flag is behind a lock that every accept(2) is made under (`Acceptor::next`), so once
//! `hold` returns no accept is under way and none starts. Two eventfds tell a loop blocked in
//! poll(2) that the state changed: one readable while held, one while not. Waiters never
//! read them; only `hold` and `release` do, under the lock, to set them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{OnceLock, RwLock, RwLockReadGuard};

#[derive(Debug, Default)]
pub struct Hold {
    held: RwLock<bool>,
    /// Made on first need, so a `Hold` can be in a `static` `Stop`.
    fds: OnceLock<Signals>,
}

#[derive(Debug)]
struct Signals {
    held: OwnedFd,
    running: OwnedFd,
}

impl Hold {
    pub const fn new() -> Hold {
        Hold {
            held: RwLock::new(false),
            fds: OnceLock::new(),
        }
    }

    /// Stops the accept loops accepting; returns once none is inside accept(2).
    pub fn hold(&self) {
        let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
        *held = true;
        if let Some(s) = self.fds.get() {
            s.set(true);
        }
    }

    /// Lets them accept again.
    pub fn release(&self) {
        let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
        *held = false;
        if let Some(s) = self.fds.get() {
            s.set(false);
        }
    }

    /// Held now? The guard keeps it so (a `hold` waits for it): accept under it.
    pub(super) fn state(&self) -> RwLockReadGuard<'_, bool> {
        self.held.read().unwrap_or_else(|p| p.into_inner())
    }

    /// (readable while held, readable while not), for poll(2).
    pub(super) fn fds(&self) -> io::Result<(RawFd, RawFd)> {
        let s = match self.fds.get() {
            Some(s) => s,
            None => {
                let made = Signals {
                    held: eventfd()?,
                    running: eventfd()?,
                };
                // Under the lock, so no hold or release runs between making and setting.
                let held = self.held.write().unwrap_or_else(|p| p.into_inner());
                let s = self.fds.get_or_init(|| made);
                s.set(*held);
                s
            }
        };
        Ok((s.held.as_raw_fd(), s.running.as_raw_fd()))
    }
}

impl Signals {
    /// Makes `held` readable and `running` not, or the other way round.
    fn set(&self, held: bool) {
        let (on, off) = if held {
            (&self.held, &self.running)
        } else {
            (&self.running, &self.held)
        };
        let mut n = 0u64;
        // SAFETY: 8-byte read and write on our own non-blocking eventfds. A read of an empty
        // one fails with EAGAIN and leaves it empty, which is the point.
        unsafe {
            libc::read(off.as_raw_fd(), &mut n as *mut u64 as *mut libc::c_void, 8);
            n = 1;
            libc::write(on.as_raw_fd(), &n as *const u64 as *const libc::c_void, 8);
        }
    }
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; a non-negative result is a new fd.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}
