//! Leaving a FUSE connection to the next process (`thinlayer restart`): before the old
//! process exits, its session threads stop reading `/dev/fuse`.
//!
//! Why: the kernel hands a request to a reader by taking it off the queue and then copying
//! it into the reader's buffer. A process that exits kills its threads; a copy under way in
//! a thread with SIGKILL pending fails as soon as it touches a buffer page not yet mapped
//! (the fault is refused), and the kernel then ends the request with EIO instead of keeping
//! it for FUSE_NOTIFY_RESEND. The caller (a loop device's flush, a PostgreSQL fdatasync) gets
//! the error. With a loop device in direct-I/O mode many requests are in flight and the
//! hand-over's resend wakes the old readers just as the process exits, so the window is hit
//! often (tests/restart.rs: 8 failures in 15 PostgreSQL runs before this).
//!
//! How: each session thread gets a signal whose handler never returns. A thread blocked in
//! `read` leaves it without taking a request; one that was copying finishes the copy (only a
//! fatal signal refuses the fault) and keeps the request unanswered, which the kernel still
//! holds for the next process's resend, as it does for the requests held at the gate. Once
//! every session thread is parked the process can exit: no reader of the connection dies in
//! it. A SIGKILL of the server (the keeper's case) cannot be covered this way: there the
//! session buffers are mapped ahead (`prefault`), so a copy under way does not fault.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Session threads parked so far.
static PARKED: AtomicUsize = AtomicUsize::new(0);

/// The FUSE crate names its session threads `fuser-0`, `fuser-1`, ...
const THREAD_PREFIX: &[u8] = b"fuser-";

/// A real-time signal nothing else in the server uses (std and the crates we use take none).
fn park_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn park(_: libc::c_int) {
    // An atomic add and pause(2): async-signal-safe. The thread stays here until the process
    // exits; whatever it was waiting for (a read, the gate) is not resumed.
    PARKED.fetch_add(1, SeqCst);
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

fn install() -> io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid start; the handler is async-signal-safe.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = park as extern "C" fn(libc::c_int) as libc::sighandler_t;
            // No SA_RESTART: the interrupted read is not to be made again (the handler does
            // not return anyway).
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(park_signal(), &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(io::Error::last_os_error());
        }
    });
    result
}

/// The threads of this process whose name starts with `prefix`, by thread id.
fn threads_named(prefix: &[u8]) -> io::Result<Vec<libc::pid_t>> {
    let mut tids = Vec::new();
    for e in std::fs::read_dir("/proc/self/task")? {
        let e = e?;
        let Ok(comm) = std::fs::read(e.path().join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if comm.starts_with(prefix) {
            if let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                tids.push(tid);
            }
        }
    }
    Ok(tids)
}

/// Park every FUSE session thread of this process, waiting up to `timeout` for them to be
/// parked (`TimedOut` naming how many were not). Only for a process about to exit: its live
/// files are served by no thread of it from now on.
pub fn stop_reading(timeout: Duration) -> io::Result<()> {
    let (parked, all) = park_threads(THREAD_PREFIX, timeout)?;
    if parked < all {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{} of {all} session threads still read /dev/fuse after {} ms",
                all - parked,
                timeout.as_millis()
            ),
        ));
    }
    Ok(())
}

/// Park the threads named `prefix...`: how many parked within `timeout`, of how many.
fn park_threads(prefix: &[u8], timeout: Duration) -> io::Result<(usize, usize)> {
    install()?;
    let tids = threads_named(prefix)?;
    let before = PARKED.load(SeqCst);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    for &tid in &tids {
        // SAFETY: tgkill of a thread of this process with a signal whose handler is set.
        if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, park_signal()) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
    }
    // The handlers run as soon as each thread is scheduled; a bounded wait for them to say so.
    let start = Instant::now();
    loop {
        let parked = PARKED.load(SeqCst) - before;
        if parked >= tids.len() || start.elapsed() >= timeout {
            return Ok((parked, tids.len()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread blocked in a read (of a pipe) is parked: it leaves the read, and what is
    /// written to the pipe afterwards stays there, read by no one.
    #[test]
    fn a_thread_blocked_in_read_is_parked_and_reads_no_more() {
        let mut fds = [0; 2];
        // SAFETY: pipe fills two descriptors we own (leaked: the parked thread keeps one).
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let [read_end, write_end] = fds;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("parktest-0".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() }).unwrap();
                let mut b = [0u8; 1];
                // SAFETY: reading into a buffer we own.
                unsafe { libc::read(read_end, b.as_mut_ptr().cast(), 1) };
                // Reached only if the read was not left for good: the byte is consumed,
                // which the check below sees.
            })
            .unwrap();
        let tid = rx.recv().unwrap();
        // Wait until the thread sleeps (in the read), so the signal interrupts the read.
        let stat = format!("/proc/self/task/{tid}/stat");
        while !std::fs::read_to_string(&stat)
            .unwrap()
            .rsplit(") ")
            .next()
            .is_some_and(|s| s.starts_with('S'))
        {
            std::thread::yield_now();
        }
        assert_eq!(
            park_threads(b"parktest-", Duration::from_secs(10)).unwrap(),
            (1, 1)
        );
        // SAFETY: writing one byte we own to our pipe; then a non-blocking read of it back.
        unsafe {
            assert_eq!(libc::write(write_end, b"x".as_ptr().cast(), 1), 1);
            libc::fcntl(read_end, libc::F_SETFL, libc::O_NONBLOCK);
            let mut b = [0u8; 1];
            assert_eq!(
                libc::read(read_end, b.as_mut_ptr().cast(), 1),
                1,
                "the byte was read"
            );
        }
    }
}
