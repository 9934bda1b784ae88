//! SIGINT/SIGTERM turn into the server's `Stop`, so shutdown runs on ordinary threads (finish
//! requests, commit) rather than inside a signal handler, and every serving loop wakes at once.

use crate::listen::Stop;
use crate::{Error, Result};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering::SeqCst};
use std::sync::Arc;

/// The stop the handler sets. It is leaked on purpose: a signal may arrive at any moment for
/// the rest of the process's life, so it must never be freed.
static STOP: AtomicPtr<Stop> = AtomicPtr::new(ptr::null_mut());

extern "C" fn on_signal(_: libc::c_int) {
    // An atomic load, an atomic store and a write(2): async-signal-safe (the stop's
    // descriptor exists before the handler is installed).
    let p = STOP.load(SeqCst);
    if !p.is_null() {
        // SAFETY: `p` came from `Arc::into_raw` and is never released.
        unsafe { (*p).stop() };
    }
}

/// Installs handlers for SIGINT and SIGTERM and returns the stop they trigger, for the
/// servers' `stop`. Each handler is one-shot (SA_RESETHAND): if shutdown hangs, a second signal
/// kills the process the ordinary way. Calling this again returns the same stop.
pub fn install_signal_handlers() -> Result<Arc<Stop>> {
    let fresh = Arc::into_raw(Arc::new(Stop::new())) as *mut Stop;
    let raw = match STOP.compare_exchange(ptr::null_mut(), fresh, SeqCst, SeqCst) {
        Ok(_) => fresh,
        Err(existing) => {
            // SAFETY: `fresh` was made above and never shared.
            drop(unsafe { Arc::from_raw(fresh) });
            existing
        }
    };
    // SAFETY: `raw` is a leaked Arc, alive for the rest of the process.
    let stop = unsafe { &*raw };
    stop.wake_fd()
        .map_err(|e| Error::io("the stop signal's eventfd", e))?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler is async-signal-safe.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, ptr::null_mut())
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::io(format!("install handler for signal {sig}"), e));
        }
    }
    // SAFETY: `raw` is a leaked Arc; hand out a new counted reference to it.
    unsafe {
        Arc::increment_strong_count(raw);
        Ok(Arc::from_raw(raw))
    }
}
