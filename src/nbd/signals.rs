//! SIGINT/SIGTERM turn into a stop flag the server polls, so shutdown runs on ordinary threads
//! (finish requests, commit) rather than inside a signal handler.

use crate::{Error, Result};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering::SeqCst};
use std::sync::Arc;

/// The flag the handler sets. It is leaked on purpose: a signal may arrive at any moment for
/// the rest of the process's life, so the flag must never be freed.
static FLAG: AtomicPtr<AtomicBool> = AtomicPtr::new(ptr::null_mut());

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic load and store: async-signal-safe.
    let p = FLAG.load(SeqCst);
    if !p.is_null() {
        // SAFETY: `p` came from `Arc::into_raw` and is never released.
        unsafe { (*p).store(true, SeqCst) };
    }
}

/// Installs handlers for SIGINT and SIGTERM and returns the flag they set, for `serve`'s
/// `stop`. Each handler is one-shot (SA_RESETHAND): if shutdown hangs, a second signal kills
/// the process the ordinary way. Calling this again returns the same flag.
pub fn install_signal_handlers() -> Result<Arc<AtomicBool>> {
    let fresh = Arc::into_raw(Arc::new(AtomicBool::new(false))) as *mut AtomicBool;
    let raw = match FLAG.compare_exchange(ptr::null_mut(), fresh, SeqCst, SeqCst) {
        Ok(_) => fresh,
        Err(existing) => {
            // SAFETY: `fresh` was made above and never shared.
            drop(unsafe { Arc::from_raw(fresh) });
            existing
        }
    };
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
