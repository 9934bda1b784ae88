//! The buffers an import and an export move data through: `CHUNK` bytes on huge pages where
//! the kernel gives them.
//!
//! Why huge pages: a direct read or write (O_DIRECT) is built from the buffer's pages, one
//! segment each where they are not physically next to each other, and this VM's disk takes at
//! most 254 segments in a request (`/sys/block/vda/queue/max_segments`). On 4 KiB pages a 4 MiB
//! read of the pool became requests of 0.5-1 MiB on the disk (`/proc/diskstats`, export of the
//! bench image with the page cache dropped: 1000-1100 reads of 490-720 KiB on average, against
//! qemu-img's buffered readahead at 2 MiB); on 2 MiB pages it goes as 2-4 requests of up to
//! 3.6 MiB (docs/BENCHMARKS.md, "Export: direct requests as large as asked").

use super::CHUNK;
use std::ptr::NonNull;

/// The size of a transparent huge page on x86-64 and of the mapping's alignment: a THP backs
/// only a naturally aligned 2 MiB range.
const HUGE_PAGE: usize = 2 << 20;

/// A buffer of `CHUNK` bytes on its own anonymous mapping, aligned to `HUGE_PAGE` and marked
/// for transparent huge pages (`MADV_HUGEPAGE`) before any page of it is touched. Where the
/// kernel has none to give (THP off, memory fragmented) it is on 4 KiB pages: still aligned for
/// O_DIRECT, only cut into smaller requests.
pub(crate) struct PageBuf {
    /// The mapping: `MAP_LEN` bytes, of which `CHUNK` are used from `at`.
    map: NonNull<u8>,
    at: usize,
}

/// Room to move the start up to the next huge-page boundary.
const MAP_LEN: usize = CHUNK + HUGE_PAGE;

// SAFETY: the mapping is owned by this value alone (like a Vec's heap block); nothing else
// holds its address.
unsafe impl Send for PageBuf {}

impl PageBuf {
    pub(crate) fn new() -> Self {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAP_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            // Out of address space or memory: what a Vec of this size would do.
            let layout = std::alloc::Layout::from_size_align(MAP_LEN, 4096).expect("valid");
            std::alloc::handle_alloc_error(layout);
        }
        let map = NonNull::new(p.cast::<u8>()).expect("mmap returned MAP_FAILED or an address");
        let at = map.as_ptr().align_offset(HUGE_PAGE);
        // A hint: refused (THP compiled out), the buffer works on small pages. The pages are
        // zero-filled by the kernel when first touched.
        // SAFETY: the range lies inside the mapping just made.
        unsafe {
            libc::madvise(map.as_ptr().add(at).cast(), CHUNK, libc::MADV_HUGEPAGE);
        }
        PageBuf { map, at }
    }

    pub(crate) fn get(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.all()[r]
    }

    pub(crate) fn get_mut(&mut self, r: std::ops::Range<usize>) -> &mut [u8] {
        &mut self.all_mut()[r]
    }

    fn all(&self) -> &[u8] {
        // SAFETY: `CHUNK` bytes from `at` lie inside the mapping, readable (zero-filled until
        // written) and borrowed as long as `self` is.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(self.at), CHUNK) }
    }

    fn all_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `all`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr().add(self.at), CHUNK) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no borrow of it outlives `self`.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), MAP_LEN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `THPeligible` of the mapping holding `addr`, from /proc/self/smaps.
    fn thp_eligible(addr: usize) -> Option<bool> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = (a..b).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("THPeligible:") {
                    return Some(v.trim() == "1");
                }
            }
        }
        None
    }

    #[test]
    fn page_buf_is_huge_page_aligned_and_eligible_for_huge_pages() {
        let mut b = PageBuf::new();
        let addr = b.get(0..1).as_ptr() as usize;
        assert_eq!(addr % HUGE_PAGE, 0, "buffer at {addr:#x}");
        // Zero-filled and writable over its whole length.
        assert!(b.get(0..CHUNK).iter().all(|&x| x == 0));
        b.get_mut(CHUNK - 1..CHUNK)[0] = 7;
        assert_eq!(b.get(CHUNK - 1..CHUNK)[0], 7);
        // With THP on or on request (`always` or `madvise`), the kernel must count the buffer
        // as eligible: that needs the MADV_HUGEPAGE hint under `madvise`, this host's setting.
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
        if thp.is_ok_and(|s| !s.contains("[never]")) {
            assert_eq!(thp_eligible(addr), Some(true), "mapping at {addr:#x}");
        }
    }
}
