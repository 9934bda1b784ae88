//! The I/O seam under the pool. `FileStorage` is the real pool file; `MemStorage` is its
//! in-memory twin for tests. Fault-injecting implementations live beside the tests that use them.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::{Mutex, OnceLock};

#[allow(clippy::len_without_is_empty)] // a pool file is never empty
pub trait Storage: Send + Sync {
    /// Fill `buf` from `offset`; bytes past the end of the storage read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// `write_at` for a bulk writer (an image import) filling fresh blocks that nobody reads
    /// while it writes: the storage may bypass its cache. Durable still only after `sync`.
    fn write_bulk_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(data, offset)
    }
    /// `read_at` for a bulk reader (an export) of blocks it reads once: the storage may
    /// bypass its cache.
    fn read_bulk_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset)
    }
    /// Make every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Start writing back what was written so far, without waiting for it, so that a later
    /// `sync` finds less to wait for. A hint: durable is only what `sync` made so; storage
    /// with nothing to start does nothing.
    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }
    /// Release the space of a range; it reads as zeros afterwards. Best effort on filesystems
    /// without hole punching: the content is then left as it was (nothing references it).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Logical length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Bytes the storage really occupies (what `du` shows).
    fn allocated(&self) -> io::Result<u64>;
}

pub struct FileStorage {
    file: File,
    /// The pool file opened again with O_DIRECT, for writing and for reading, on the first
    /// bulk write or read; None if that open failed (the filesystem refuses O_DIRECT, or a
    /// read-only pool file): bulk I/O then goes through the page cache.
    direct_write: OnceLock<Option<File>>,
    direct_read: OnceLock<Option<File>>,
}

/// Alignment of buffer, offset and length that every O_DIRECT write here keeps (the page size,
/// a multiple of any device's logical block size); a bulk write not aligned so is buffered.
pub const DIRECT_ALIGN: usize = 4096;

impl FileStorage {
    pub fn new(file: File) -> Self {
        FileStorage {
            file,
            direct_write: OnceLock::new(),
            direct_read: OnceLock::new(),
        }
    }

    fn direct(&self, write: bool) -> Option<&File> {
        let cell = if write {
            &self.direct_write
        } else {
            &self.direct_read
        };
        cell.get_or_init(|| {
            use std::os::unix::fs::OpenOptionsExt;
            // The same inode, page cache bypassed. The kernel writes back (and, for a write,
            // drops) cached pages of a range before direct I/O to it, so the buffered
            // descriptor and the direct one stay coherent.
            std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
                .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
                .ok()
        })
        .as_ref()
    }
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file.read_at(buf, offset) {
                Ok(0) => {
                    buf.fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// O_DIRECT when aligned: perf of an import of 512 MiB put 21 % of its CPU in the copy
    /// into the pool's page cache, plus the page allocation and writeback around it, for
    /// pages nobody reads soon (docs/BENCHMARKS.md, "Import: the pool written with O_DIRECT").
    fn write_bulk_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some(d) = self.direct(true).filter(|_| aligned(data, offset)) {
            match d.write_all_at(data, offset) {
                // A filesystem that opens O_DIRECT but wants another alignment: buffered.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                r => return r,
            }
        }
        self.file.write_all_at(data, offset)
    }

    /// What the page cache holds is copied from it, the rest, when aligned, read with O_DIRECT:
    /// on this VM a cold buffered read of 512 MiB cost 0.9 s of system time (new page-cache
    /// pages), a direct one 0.03 s (docs/BENCHMARKS.md, "Import: the pool written with
    /// O_DIRECT"), and it evicts nobody's pages when the cache is full. A range cached in part
    /// (blocks a container read lately) is taken in pieces of `CACHE_PROBE` bytes, each from
    /// where it is. After a short direct read (the end of the file) or a refusal the rest is
    /// read buffered, so bytes past the end still read as zeros.
    fn read_bulk_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(d) = self.direct(false).filter(|_| aligned(buf, offset)) else {
            return self.read_at(buf, offset);
        };
        let len = buf.len();
        if all_cached(&self.file, offset, len) {
            return self.read_at(buf, offset);
        }
        // Pieces end where the file's offset is a multiple of CACHE_PROBE.
        let piece_end = |at: usize| {
            let probe = CACHE_PROBE as u64;
            let abs = offset + at as u64;
            ((abs / probe + 1) * probe - offset).min(len as u64) as usize
        };
        let cached = |at: usize| all_cached(&self.file, offset + at as u64, piece_end(at) - at);
        let mut at = 0;
        while at < len {
            // A run of pieces that are all cached, or all not.
            let from_cache = cached(at);
            let mut end = piece_end(at);
            while end < len && cached(end) == from_cache {
                end = piece_end(end);
            }
            let piece = &mut buf[at..end];
            let piece_at = offset + at as u64;
            if from_cache {
                self.read_at(piece, piece_at)?;
            } else {
                let n = read_direct(d, piece, piece_at)?;
                self.read_at(&mut piece[n..], piece_at + n as u64)?;
            }
            at = end;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn start_writeback(&self) -> io::Result<()> {
        start_writeback(&self.file)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: plain syscall on a valid descriptor owned by self.file.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
            _ => Err(e),
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn allocated(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

/// Whether the page cache holds every page of `len` bytes of `file` at `offset`. Asking with a
/// read (preadv2 RWF_NOWAIT) would not do: a miss starts readahead, which fills the cache with
/// the pages a direct read avoids.
fn all_cached(file: &File, offset: u64, len: usize) -> bool {
    cached_pages(file, offset, len as u64).is_ok_and(|n| n * 4096 >= len as u64)
}

/// Pages of `len` bytes of `file` at `offset` that the page cache holds (cachestat, Linux 6.5;
/// an older kernel gives an error).
pub fn cached_pages(file: &File, offset: u64, len: u64) -> io::Result<u64> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451; // the same number on every architecture
    let range = Range { off: offset, len };
    let mut st = Stat::default();
    // SAFETY: the syscall reads `range` and writes `st`, both live locals of the kernel's
    // layout (struct cachestat_range, struct cachestat); flags 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0u32,
        )
    };
    if r == 0 {
        Ok(st.nr_cache)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes of a partly cached bulk read whose residency is asked at a time (`read_bulk_at`),
/// aligned in the file: 64 pages, so a 4 MiB read asks 16-17 times (cachestat costs about a
/// microsecond).
const CACHE_PROBE: usize = 256 << 10;

/// Fill `buf` from `offset` of `d` (opened O_DIRECT) as far as direct reads go: the bytes read,
/// fewer than asked at the end of the file or where the filesystem refuses the alignment.
fn read_direct(d: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match d.read_at(&mut buf[done..], offset + done as u64) {
            Ok(n) if n > 0 && n.is_multiple_of(DIRECT_ALIGN) => done += n,
            Ok(n) => return Ok(done + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(done),
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn aligned(buf: &[u8], offset: u64) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        && buf.len().is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(DIRECT_ALIGN as u64)
}

/// Queue the dirty pages of `file` for the disk and return without waiting for them, so that
/// a later sync of it finds less left to write (a bulk writer calls this as it goes).
pub fn start_writeback(file: &File) -> io::Result<()> {
    // The whole file (offset 0, length 0); pages already under writeback are left alone.
    // SAFETY: plain syscall on a valid descriptor owned by `file`.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A pool held in memory: the twin of `FileStorage` for tests and benchmarks.
#[derive(Default)]
pub struct MemStorage {
    bytes: Mutex<Vec<u8>>,
    extents: Mutex<Extents>,
}

/// What a sparse file's extent map would go through: which 4 KiB pages hold space, how many
/// pages a write had to allocate (a hole or the file's end) and how many punches removed
/// some. Each of those is a change a host filesystem's `fdatasync` writes besides the data.
#[derive(Default)]
struct Extents {
    held: bitvec::vec::BitVec,
    allocated: u64,
    punches: u64,
}

impl MemStorage {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let pages = bytes.len().div_ceil(4096);
        MemStorage {
            bytes: Mutex::new(bytes),
            extents: Mutex::new(Extents {
                held: bitvec::vec::BitVec::repeat(true, pages),
                ..Extents::default()
            }),
        }
    }
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }
    /// Pages that writes found without space (holes, the end) and punches, so far: how often
    /// a file would have changed its extents.
    pub fn extent_changes(&self) -> (u64, u64) {
        let e = self.extents.lock().unwrap();
        (e.allocated, e.punches)
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let b = self.bytes.lock().unwrap();
        let start = (offset as usize).min(b.len());
        let end = (offset as usize + buf.len()).min(b.len());
        let n = end - start;
        buf[..n].copy_from_slice(&b[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut b = self.bytes.lock().unwrap();
        let end = offset as usize + data.len();
        if b.len() < end {
            b.resize(end, 0);
        }
        b[offset as usize..end].copy_from_slice(data);
        let mut e = self.extents.lock().unwrap();
        let pages = offset as usize / 4096..end.div_ceil(4096);
        if e.held.len() < pages.end {
            e.held.resize(pages.end, false);
        }
        for p in pages {
            if !e.held.replace(p, true) {
                e.allocated += 1;
            }
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut b = self.bytes.lock().unwrap();
        let start = (offset as usize).min(b.len());
        let end = (offset as usize + len as usize).min(b.len());
        b[start..end].fill(0);
        let mut e = self.extents.lock().unwrap();
        e.punches += 1;
        // Only whole pages are given back, as a filesystem does.
        let held = e.held.len();
        let pages = (start.div_ceil(4096)).min(held)..(end / 4096).min(held);
        e.held[pages].fill(false);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.lock().unwrap().len() as u64)
    }

    fn allocated(&self) -> io::Result<u64> {
        // Count non-zero 4 KiB pages, as a sparse file would occupy.
        let b = self.bytes.lock().unwrap();
        Ok(b.chunks(4096).filter(|c| c.iter().any(|&x| x != 0)).count() as u64 * 4096)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `f`'s first `len` bytes in the page cache (mmap + mincore).
    fn cached_pages(f: &File, len: usize) -> usize {
        // SAFETY: a fresh read-only shared mapping of `len` bytes of a file at least that long,
        // unmapped before returning; mincore writes one byte per page into a vector that long.
        unsafe {
            let m = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(m, libc::MAP_FAILED);
            let mut v = vec![0u8; len.div_ceil(4096)];
            assert_eq!(libc::mincore(m, len, v.as_mut_ptr()), 0);
            libc::munmap(m, len);
            v.iter().filter(|&&b| b & 1 != 0).count()
        }
    }

    /// A page-aligned bulk write goes around the page cache (O_DIRECT), one that is not aligned
    /// through it; both read back through the buffered descriptor as written. The file is in
    /// the source tree, not /tmp: where /tmp is tmpfs, O_DIRECT writes still land in the cache.
    #[test]
    fn an_aligned_bulk_write_bypasses_the_page_cache_and_reads_back() {
        let f = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let s = FileStorage::new(f.try_clone().unwrap());
        let len = 1usize << 20;
        let mut buf = vec![0u8; len + 2 * DIRECT_ALIGN];
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        // Written once buffered first, so the direct write must also drop cached pages.
        s.write_at(&buf[at + 1..at + 1 + len], 0).unwrap();
        s.write_bulk_at(&buf[at..at + len], 0).unwrap();
        assert_eq!(
            cached_pages(&f, len),
            0,
            "an aligned bulk write leaves no cached page"
        );
        s.write_bulk_at(&buf[at + 1..at + 1 + len], len as u64)
            .unwrap();
        let mut back = vec![0u8; 2 * len];
        s.read_at(&mut back, 0).unwrap();
        assert!(
            back[..len] == buf[at..at + len],
            "the direct write reads back"
        );
        assert!(
            back[len..] == buf[at + 1..at + 1 + len],
            "the buffered one too"
        );
    }

    /// A page-aligned bulk read of a range not all in the page cache reads around it
    /// (O_DIRECT) and caches nothing; of a cached range, from the cache; past the end, zeros.
    #[test]
    fn an_aligned_bulk_read_of_uncached_blocks_bypasses_the_page_cache() {
        let f = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let s = FileStorage::new(f.try_clone().unwrap());
        let len = 1usize << 20;
        let mut buf = vec![0u8; 2 * len + DIRECT_ALIGN];
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        s.write_at(&data, 0).unwrap();
        s.sync().unwrap();
        // SAFETY: advice on a valid descriptor: drop the (clean, synced) cached pages.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(cached_pages(&f, len), 0, "nothing cached to start with");
        let out = &mut buf[at..at + 2 * len];
        s.read_bulk_at(out, 0).unwrap();
        assert!(
            out[..len] == data[..],
            "a direct read reads what was written"
        );
        assert!(out[len..].iter().all(|&b| b == 0), "past the end: zeros");
        assert_eq!(
            cached_pages(&f, len),
            0,
            "an uncached bulk read caches nothing"
        );
        let mut warm = vec![0u8; len];
        s.read_at(&mut warm, 0).unwrap();
        out.fill(1);
        s.read_bulk_at(&mut out[..len], 0).unwrap();
        assert!(out[..len] == data[..], "a cached range reads the same");
    }

    /// Bytes this thread has had read from a block device (task I/O accounting): a read the
    /// page cache answers adds nothing, a direct one adds what it read.
    fn thread_read_bytes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("read_bytes: "))
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A bulk read of a range the cache holds in part (every other `CACHE_PROBE` piece, and a
    /// page of one more) takes the cached pieces from the cache and reads only the others from
    /// the disk, without caching them: the same bytes, no more disk reads than the uncached
    /// pieces, and nothing newly cached.
    #[test]
    fn a_bulk_read_of_a_partly_cached_range_reads_from_disk_only_what_is_not_cached() {
        let f = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let s = FileStorage::new(f.try_clone().unwrap());
        let len = 4usize << 20;
        let data: Vec<u8> = (0..len).map(|i| (i % 249) as u8).collect();
        s.write_at(&data, 0).unwrap();
        s.sync().unwrap();
        // SAFETY: advice on a valid descriptor: drop the (clean, synced) cached pages.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(cached_pages(&f, len), 0, "nothing cached to start with");
        // No readahead: only what is read here gets cached.
        // SAFETY: advice on a valid descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        let mut tmp = vec![0u8; CACHE_PROBE];
        for k in (0..len / CACHE_PROBE).step_by(2) {
            s.read_at(&mut tmp, (k * CACHE_PROBE) as u64).unwrap();
        }
        s.read_at(&mut tmp[..4096], (CACHE_PROBE + 8192) as u64)
            .unwrap();
        let cached = cached_pages(&f, len);
        assert_eq!(
            cached,
            len / 2 / 4096 + 1,
            "half the pieces and one page cached"
        );
        let mut buf = vec![0u8; len + DIRECT_ALIGN];
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let out = &mut buf[at..at + len];
        let before = thread_read_bytes();
        s.read_bulk_at(out, 0).unwrap();
        let from_disk = thread_read_bytes() - before;
        assert!(out == &data[..], "the pieces are put together in order");
        assert!(
            from_disk > 0 && from_disk <= (len / 2) as u64,
            "{from_disk} bytes read from the disk for {} not cached",
            len / 2
        );
        assert_eq!(cached_pages(&f, len), cached, "nothing newly cached");
    }

    #[test]
    fn a_started_writeback_is_accepted_by_the_kernel_and_changes_no_byte() {
        let f = tempfile::tempfile().unwrap();
        let s = FileStorage::new(f);
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        s.write_at(&data, 8192).unwrap();
        // A refused call (wrong flags, a descriptor it cannot take) is an error here.
        s.start_writeback().unwrap();
        s.write_at(&data[..4096], 0).unwrap();
        s.start_writeback().unwrap();
        s.sync().unwrap();
        let mut back = vec![0u8; data.len()];
        s.read_at(&mut back, 8192).unwrap();
        assert!(back == data);
        // Memory has nothing to start.
        MemStorage::new().start_writeback().unwrap();
    }
}
