//! The allocator of the thinlayer binary, which maps the FUSE session threads' read buffers
//! as it hands them out.
//!
//! Why: the kernel gives a request to a session thread by taking it off its queue and copying
//! it into the thread's buffer. A server killed by SIGKILL (the keeper's case: no `leave`)
//! may be caught in that copy; the copy of a page into buffer memory not yet mapped needs a
//! page fault, which a task with SIGKILL pending is refused, and the kernel then ends the
//! request with EIO instead of keeping it for the next server's FUSE_NOTIFY_RESEND. The
//! caller sees the error: a loop device's write fails and the filesystem above it loses the
//! data ("failed to convert unwritten extents ... potential data loss"), seen about one kill
//! in four during a 128 MiB writeback (tests/containerd.rs,
//! `a_kill_while_usage_syncs_...`). fuser allocates each session thread's buffer zeroed
//! (16 MiB; calloc maps none of it) and fills only what requests need, so a thread's first
//! large WRITE meets unmapped pages. Mapped ahead, a copy never faults.
//!
//! What: a zeroed allocation of at least 1 MiB made by a thread named `fuser-…` (fuser's
//! session threads; the name is read with `prctl`, which allocates nothing) has its first
//! `MAPPED` bytes populated (`MADV_POPULATE_WRITE`, Linux 5.14), the largest request the
//! kernel sends (1 MiB of data and its header) with room to spare. Everything else goes to the
//! system allocator untouched.

use std::alloc::{GlobalAlloc, Layout, System};

/// How much of a session buffer is mapped: a 1 MiB WRITE, its headers, and slack.
const MAPPED: usize = 2 << 20;
/// Smaller zeroed allocations are not read buffers.
const LARGE: usize = 1 << 20;
/// `MADV_POPULATE_WRITE` from linux/mman.h (the libc crate may not define it).
const MADV_POPULATE_WRITE: libc::c_int = 23;

pub struct SessionBuffers;

/// Whether the calling thread's name starts with `fuser-`.
fn in_session_thread() -> bool {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer given.
    let r = unsafe {
        libc::prctl(
            libc::PR_GET_NAME,
            name.as_mut_ptr() as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    r == 0 && name.starts_with(b"fuser-")
}

unsafe impl GlobalAlloc for SessionBuffers {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && layout.size() >= LARGE && in_session_thread() {
            // The whole pages inside the allocation, up to MAPPED bytes; a failure (an old
            // kernel) leaves them to be mapped as before.
            let page = 4096;
            let start = (p as usize).next_multiple_of(page);
            let end = (p as usize + layout.size().min(MAPPED)) & !(page - 1);
            if end > start {
                // SAFETY: advice on pages inside memory just allocated to us.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE)
                };
            }
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident pages of `len` bytes at `p`, by mincore.
    fn resident(p: *const u8, len: usize) -> usize {
        let page = 4096;
        let start = (p as usize) & !(page - 1);
        let pages = (p as usize + len - start).div_ceil(page);
        let mut v = vec![0u8; pages];
        // SAFETY: mincore of a range inside a live allocation, into a vector of its pages.
        let r = unsafe { libc::mincore(start as *mut libc::c_void, pages * page, v.as_mut_ptr()) };
        assert_eq!(r, 0);
        v.iter().filter(|b| **b & 1 == 1).count()
    }

    #[test]
    fn a_session_threads_large_zeroed_buffer_is_mapped_and_others_are_not() {
        let size = 16 << 20;
        let layout = Layout::from_size_align(size, 8).unwrap();
        let run = |name: &str| {
            let name = name.to_string();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    // SAFETY: a non-zero layout; freed below with the same layout.
                    let p = unsafe { SessionBuffers.alloc_zeroed(layout) };
                    assert!(!p.is_null());
                    let n = resident(p, MAPPED);
                    // SAFETY: allocated above with this layout.
                    unsafe { SessionBuffers.dealloc(p, layout) };
                    n
                })
                .unwrap()
                .join()
                .unwrap()
        };
        let other = run("worker");
        assert!(other < 16, "{other} pages mapped in another thread");
        let mapped = run("fuser-0");
        assert!(
            mapped >= MAPPED / 4096 - 1,
            "{mapped} pages mapped in a session thread"
        );
    }
}
