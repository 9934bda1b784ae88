//! FUSE requests translated to the attached layers' devices. A frontend like `nbd/`: it
//! validates at the edge (range, read-only, the one directory) and maps errors to errnos;
//! what attaching means is `files.rs`, what a write does is the volume's business (copy on
//! first write, zero detection), and `fsync` is the store's durable flush.
//!
//! The kernel side is set up for loop devices: files are opened with FOPEN_DIRECT_IO, so a
//! loop device over a file does not cache every block twice (the filesystem above caches
//! it already) and every write reaches the store before it is acknowledged;
//! FOPEN_PARALLEL_DIRECT_WRITES lets writes to one file run at once, one per session thread.
//! Unless `serve --no-loop-direct-io`, a loop device bound to a file is switched to
//! direct-I/O mode at the file's first I/O after an open (`loops`), so that it keeps several of those
//! requests in flight.

use super::files::{LiveFile, Table, ROOT_INO};
use super::loops::DirectIo;
use crate::error::Error;
use crate::log::{self, Level};
use crate::volume::BlockDevice;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::cell::RefCell;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The largest read or write one request carries: the kernel's default cap (256 pages).
pub const MAX_IO: u32 = 1 << 20;
/// Entries and attributes are not cached: attach and detach show at once, and a lookup is
/// a map access.
const TTL: Duration = Duration::ZERO;
/// Device errors logged per mount; the rest are counted (a dying disk must not flood the log).
const LOGGED_ERRORS: u64 = 20;

pub struct Fs {
    pub table: Arc<Table>,
    pub mounted: SystemTime,
    uid: u32,
    gid: u32,
    errors: AtomicU64,
    /// Set unless `serve --no-loop-direct-io`.
    direct_io: Option<DirectIo>,
}

thread_local! {
    /// Each session thread's read buffer, reused from request to request.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Fs {
    pub fn new(table: Arc<Table>, direct_io: Option<DirectIo>) -> Fs {
        // SAFETY: geteuid and getegid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Fs {
            table,
            mounted: SystemTime::now(),
            uid,
            gid,
            errors: AtomicU64::new(0),
            direct_io,
        }
    }

    /// The file for I/O on `ino`, as `file`; unless `serve --no-loop-direct-io`, its first I/O
    /// since an open has the loop devices over it switched to direct I/O (in the background:
    /// this request is not held up).
    fn io_file(&self, ino: INodeNo) -> Result<Arc<LiveFile>, Errno> {
        let f = self.file(ino)?;
        if let Some(dio) = &self.direct_io {
            if f.first_io_since_open() {
                dio.request(&f.path, f.open_handles());
            }
        }
        Ok(f)
    }

    fn root_attr(&self) -> FileAttr {
        self.attr(
            INodeNo(ROOT_INO),
            FileType::Directory,
            0o700,
            0,
            0,
            self.mounted,
        )
    }

    fn file_attr(&self, f: &LiveFile) -> FileAttr {
        // `du` on a file shows what the layer alone holds in the pool.
        let own = self
            .table
            .exports()
            .store()
            .layer(&f.layer)
            .map_or(0, |l| l.size);
        let perm = if f.writable() { 0o600 } else { 0o400 };
        let size = f.device.size();
        self.attr(
            INodeNo(f.ino),
            FileType::RegularFile,
            perm,
            size,
            own,
            f.since,
        )
    }

    fn attr(
        &self,
        ino: INodeNo,
        kind: FileType,
        perm: u16,
        size: u64,
        used: u64,
        time: SystemTime,
    ) -> FileAttr {
        FileAttr {
            ino,
            size,
            blocks: used.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The file for I/O on `ino`; a detached one (forced, with handles left open) fails EIO.
    fn file(&self, ino: INodeNo) -> Result<Arc<LiveFile>, Errno> {
        self.table.by_ino(ino.0).ok_or(Errno::EIO)
    }

    /// As `file`, for a change: a read-only layer's file refuses it.
    fn writable_file(&self, ino: INodeNo) -> Result<Arc<LiveFile>, Errno> {
        let f = self.io_file(ino)?;
        if f.writable() {
            Ok(f)
        } else {
            Err(Errno::EROFS)
        }
    }

    /// A device error as the caller sees it, logged with what and where.
    fn failed(&self, f: &LiveFile, what: &str, offset: u64, len: u64, e: Error) -> Errno {
        if what != "read" {
            f.note_failed_write(e.errno() == libc::ENOSPC);
        }
        let n = self.errors.fetch_add(1, Ordering::Relaxed);
        if n < LOGGED_ERRORS {
            log::process(
                Level::Warn,
                format_args!(
                    "thinlayer: live file {}: {what} of {len} bytes at byte {offset} failed: {e}",
                    f.path.display()
                ),
            );
        } else if n == LOGGED_ERRORS {
            log::process(
                Level::Warn,
                format_args!("thinlayer: live files: further errors are counted, not logged"),
            );
        }
        Errno::from_i32(e.errno())
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // Loop devices in direct-I/O mode and aio clients submit many requests at once; let
        // the kernel keep them in flight rather than queue them behind one another.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = (parent.0 == ROOT_INO)
            .then(|| name.to_str().and_then(|n| self.table.by_name(n)))
            .flatten();
        match found {
            Some(f) => reply.entry(&TTL, &self.file_attr(&f), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT_INO {
            return reply.attr(&TTL, &self.root_attr());
        }
        match self.table.by_ino(ino.0) {
            Some(f) => reply.attr(&TTL, &self.file_attr(&f)),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Times may be set (`touch` works) and change nothing; a disk image's size, mode and
    /// owner are the layer's, so changing them is refused.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino.0 == ROOT_INO {
            return reply.error(Errno::EPERM);
        }
        let Some(f) = self.table.by_ino(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let attr = self.file_attr(&f);
        let changes_size = size.is_some_and(|s| s != attr.size);
        let changes_mode = mode.is_some_and(|m| m as u16 & 0o7777 != attr.perm);
        let changes_owner =
            uid.is_some_and(|u| u != attr.uid) || gid.is_some_and(|g| g != attr.gid);
        if changes_size || changes_mode || changes_owner {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Opens and releases change the table a restart hands over: they wait at the gate.
        let _pass = self.table.exports().gate().enter();
        let Some(f) = self.table.by_ino(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // Root passes every permission check, so the mode bits alone do not keep a
        // read-only layer read-only: refuse write access here (losetup then falls back
        // to a read-only loop device).
        if flags.acc_mode() != OpenAccMode::O_RDONLY && !f.writable() {
            return reply.error(Errno::EROFS);
        }
        if self.table.open(ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        let how = FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        reply.opened(FileHandle(ino.0), how);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.table.exports().gate().enter();
        self.table.release(ino.0);
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let f = match self.io_file(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // A read at or past the end reads nothing; one across it is cut short (as a file).
        let end = f.device.size();
        let len = (size as u64).min(end.saturating_sub(offset)) as usize;
        READ_BUF.with_borrow_mut(|buf| {
            buf.resize(len, 0);
            match f.device.read_at(offset, buf) {
                Ok(()) => reply.data(buf),
                Err(e) => reply.error(self.failed(&f, "read", offset, len as u64, e)),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let f = match self.writable_file(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // The file cannot grow: as on a block device, a write at the end is ENOSPC and one
        // across it writes what fits.
        let end = f.device.size();
        if offset >= end && !data.is_empty() {
            f.note_failed_write(true);
            return reply.error(Errno::ENOSPC);
        }
        let data = &data[..(data.len() as u64).min(end - offset) as usize];
        match f.device.write_at(offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(self.failed(&f, "write", offset, data.len() as u64, e)),
        }
    }

    /// `close` is not a durability point (the data already reached the store).
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// `fsync`/`fdatasync`, and a loop device's REQ_FLUSH: the store's durable commit, which
    /// covers every write acknowledged so far (concurrent ones share one commit).
    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _data: bool, reply: ReplyEmpty) {
        let f = match self.file(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        match f.device.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.failed(&f, "fsync", 0, 0, e)),
        }
    }

    /// Punching a hole is a discard (the loop driver's DISCARD, `fstrim`), zeroing a range is
    /// WRITE_ZEROES; plain allocation is a no-op within the file (it is thin by design).
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let f = match self.writable_file(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let end = f.device.size();
        let start = offset.min(end);
        let len = offset.saturating_add(length).min(end) - start;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let result = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            libc::FALLOC_FL_PUNCH_HOLE if keep => f.device.trim(start, len),
            libc::FALLOC_FL_ZERO_RANGE => f.device.write_zeroes(start, len, false),
            0 if keep || offset.saturating_add(length) <= end => Ok(()),
            0 => return reply.error(Errno::EFBIG),
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.failed(&f, "fallocate", start, len, e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let root = INodeNo(ROOT_INO);
        let mut entries = vec![
            (root, FileType::Directory, ".".to_string()),
            (root, FileType::Directory, "..".to_string()),
        ];
        for f in self.table.list() {
            entries.push((INodeNo(f.ino), FileType::RegularFile, f.file_name.clone()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.table.list();
        let blocks: u64 = files.iter().map(|f| f.device.size() / 4096).sum();
        reply.statfs(blocks, 0, 0, files.len() as u64, 0, 4096, 255, 4096);
    }
}
