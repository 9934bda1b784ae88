//! Which layers are attached as live files, and who has each file open. This is the policy
//! half of the frontend (`fs.rs` only translates FUSE requests): attach is idempotent and
//! registers the file with the live server's exports, so `rm` and `commit` refuse the layer
//! naming the file; detach refuses while the file is open (a loop device holds it open) unless
//! forced; `rm --force` revokes the registration, and the file then vanishes from the directory.

use super::names::file_name;
use crate::error::{Error, Result};
use crate::log::{self, Level};
use crate::volume::exports::{Attached, Holder, LiveExports};
use crate::volume::BlockDevice;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// The root directory's inode; files get fresh numbers from 2 up, never reused, so a handle
/// left open on a detached file can never reach a layer attached later.
pub const ROOT_INO: u64 = 1;

/// How long a detach waits for a file's last close. The kernel sends FUSE's RELEASE in the
/// background after the last `close` (a loop device's, when it is torn down at umount), so
/// a detach right after `umount` would otherwise race it.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// One attached layer.
pub struct LiveFile {
    pub ino: u64,
    /// The layer's name; `path`'s file name is its encoding (`names.rs`).
    pub layer: String,
    pub file_name: String,
    pub path: PathBuf,
    pub since: SystemTime,
    /// The layer's device, registered with the live exports while this value lives.
    pub device: Arc<Attached>,
    /// Open handles (`open` minus `release`), counted under the table's lock.
    opens: AtomicU64,
    /// Writes, zeroings and flushes that failed while attached (the kernel's writeback does
    /// not tell the program that wrote, so whoever seals the layer must ask here).
    failed_writes: AtomicU64,
    /// Of those, the ones that found the pool full.
    failed_no_space: AtomicU64,
    /// Opened since the last look for loop devices over it (`loops`): the next I/O looks.
    look_for_loops: AtomicBool,
}

/// One attached file as a restart hands it to the next process: the same inode (the kernel
/// knows the file by it) and the same count of open handles (a loop device's).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileState {
    pub ino: u64,
    pub layer: String,
    pub opens: u64,
    /// Seconds since the epoch.
    pub since: u64,
    pub lost_writes: u64,
    pub lost_no_space: u64,
}

/// What a live file lost while attached: `LiveFiles::detach` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LostWrites {
    pub total: u64,
    pub no_space: u64,
}

impl LiveFile {
    /// A write (or zeroing, or flush) through this file failed.
    pub fn note_failed_write(&self, no_space: bool) {
        self.failed_writes.fetch_add(1, Ordering::Relaxed);
        if no_space {
            self.failed_no_space.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn lost_writes(&self) -> LostWrites {
        LostWrites {
            total: self.failed_writes.load(Ordering::Relaxed),
            no_space: self.failed_no_space.load(Ordering::Relaxed),
        }
    }

    pub fn writable(&self) -> bool {
        !self.device.is_read_only()
    }

    /// Whether this is the first I/O since the file was opened (once true per open). A loop
    /// device is bound to the file between its open and its first I/O (`losetup`, `mount -o
    /// loop` and containerd open the file, bind it, then read the filesystem through it), so
    /// this is when to look for one.
    pub fn first_io_since_open(&self) -> bool {
        self.look_for_loops.load(Ordering::Relaxed)
            && self.look_for_loops.swap(false, Ordering::Relaxed)
    }

    pub fn open_handles(&self) -> u64 {
        self.opens.load(Ordering::SeqCst)
    }

    /// Cut off by `rm --force`: it is no longer listed, and its I/O fails with EIO.
    fn revoked(&self) -> bool {
        self.device.attachment().is_revoked()
    }
}

#[derive(Default)]
struct Files {
    by_name: BTreeMap<String, Arc<LiveFile>>,
    by_ino: HashMap<u64, Arc<LiveFile>>,
    by_layer: HashMap<String, String>,
}

impl Files {
    fn remove(&mut self, f: &LiveFile) {
        self.by_name.remove(&f.file_name);
        self.by_ino.remove(&f.ino);
        self.by_layer.remove(&f.layer);
    }

    /// Forget the files `rm --force` revoked (their layers are gone).
    fn prune(&mut self) {
        let gone: Vec<_> = self
            .by_name
            .values()
            .filter(|f| f.revoked())
            .cloned()
            .collect();
        for f in gone {
            self.remove(&f);
        }
    }
}

/// The attached files of one mount; shared by the FUSE request handlers and `LiveFiles`.
pub struct Table {
    exports: Arc<LiveExports>,
    dir: PathBuf,
    files: RwLock<Files>,
    next_ino: AtomicU64,
    /// Signalled whenever a handle is released (detach waits on it).
    closed: (Mutex<()>, Condvar),
    /// Told the table after every attach, detach, open and release (the keeper keeps it).
    watch: std::sync::OnceLock<Watch>,
}

/// Who wants the table whenever it changes. It is given a way to take the table, so that it
/// can take it at the moment it passes it on: of two changes told at once, the one passed on
/// last then carries both.
pub type Watch = Box<dyn Fn(&dyn Fn() -> Vec<FileState>) + Send + Sync>;

impl Table {
    pub fn new(exports: Arc<LiveExports>, dir: &Path) -> Table {
        Table {
            exports,
            dir: dir.to_path_buf(),
            files: RwLock::default(),
            next_ino: AtomicU64::new(ROOT_INO + 1),
            closed: (Mutex::new(()), Condvar::new()),
            watch: std::sync::OnceLock::new(),
        }
    }

    /// Have `w` told the table whenever it changes (once; later calls are ignored).
    pub fn watch(&self, w: Watch) {
        let _ = self.watch.set(w);
    }

    /// Tell the watcher; called with no lock of the table held, before the request that
    /// changed it is answered.
    fn changed(&self) {
        if let Some(w) = self.watch.get() {
            w(&|| self.snapshot());
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn exports(&self) -> &LiveExports {
        &self.exports
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Files> {
        self.files.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Files> {
        self.files.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The listed files, in name order.
    pub fn list(&self) -> Vec<Arc<LiveFile>> {
        let mut g = self.write();
        g.prune();
        g.by_name.values().cloned().collect()
    }

    pub fn by_name(&self, file_name: &str) -> Option<Arc<LiveFile>> {
        let f = self.read().by_name.get(file_name).cloned()?;
        (!f.revoked()).then_some(f)
    }

    /// The file behind an inode, for I/O: still there after `rm --force` (its device then
    /// fails with EIO), gone after a detach.
    pub fn by_ino(&self, ino: u64) -> Option<Arc<LiveFile>> {
        self.read().by_ino.get(&ino).cloned()
    }

    /// Count an open of `ino`; `None` if it is no longer attached. Under the lock, so a
    /// detach either sees this open or the open sees the file gone.
    pub fn open(&self, ino: u64) -> Option<Arc<LiveFile>> {
        let g = self.read();
        let f = g.by_ino.get(&ino)?;
        f.opens.fetch_add(1, Ordering::SeqCst);
        f.look_for_loops.store(true, Ordering::Relaxed);
        let f = f.clone();
        drop(g);
        self.changed();
        Some(f)
    }

    pub fn release(&self, ino: u64) {
        if let Some(f) = self.read().by_ino.get(&ino) {
            f.opens.fetch_sub(1, Ordering::SeqCst);
        }
        self.changed();
        let _g = self.closed.0.lock().unwrap_or_else(|p| p.into_inner());
        self.closed.1.notify_all();
    }

    /// The table as `FileState`s, in inode order.
    pub fn snapshot(&self) -> Vec<FileState> {
        let mut v: Vec<FileState> = self
            .list()
            .iter()
            .map(|f| FileState {
                ino: f.ino,
                layer: f.layer.clone(),
                opens: f.open_handles(),
                since: f
                    .since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                lost_writes: f.failed_writes.load(Ordering::Relaxed),
                lost_no_space: f.failed_no_space.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by_key(|f| f.ino);
        v
    }

    /// Fill an empty table with the files another process had (`snapshot`). A layer that is
    /// gone is an error naming it: the pool and the table must be from the same moment.
    pub fn restore(&self, files: &[FileState]) -> Result<()> {
        for s in files {
            self.insert(
                &s.layer,
                Some(s.ino),
                s.opens,
                SystemTime::UNIX_EPOCH + Duration::from_secs(s.since),
                (s.lost_writes, s.lost_no_space),
            )
            .map_err(|e| e.context(format!("restoring live file of layer {:?}", s.layer)))?;
        }
        let next = files
            .iter()
            .map(|f| f.ino + 1)
            .max()
            .unwrap_or(ROOT_INO + 1);
        self.next_ino.fetch_max(next, Ordering::Relaxed);
        Ok(())
    }

    /// See `LiveFiles::attach`.
    pub fn attach(&self, layer: &str) -> Result<PathBuf> {
        let mut g = self.write();
        g.prune();
        if let Some(f) = g.by_layer.get(layer).and_then(|n| g.by_name.get(n)) {
            return Ok(f.path.clone());
        }
        drop(g);
        let path = self.insert(layer, None, 0, SystemTime::now(), (0, 0))?;
        self.changed();
        Ok(path)
    }

    /// Register `layer`'s file: a fresh inode unless `ino` is given (a restored table).
    fn insert(
        &self,
        layer: &str,
        ino: Option<u64>,
        opens: u64,
        since: SystemTime,
        lost: (u64, u64),
    ) -> Result<PathBuf> {
        let mut g = self.write();
        if let Some(f) = g.by_layer.get(layer).and_then(|n| g.by_name.get(n)) {
            return Ok(f.path.clone());
        }
        let info = self.exports.store().layer(layer)?;
        let file_name = file_name(&info.name, info.id);
        let path = self.dir.join(&file_name);
        let device = self
            .exports
            .hold(layer, &path.display().to_string(), Holder::File)?;
        let f = Arc::new(LiveFile {
            ino: ino.unwrap_or_else(|| self.next_ino.fetch_add(1, Ordering::Relaxed)),
            layer: info.name.clone(),
            file_name: file_name.clone(),
            path: path.clone(),
            since,
            device,
            opens: AtomicU64::new(opens),
            failed_writes: AtomicU64::new(lost.0),
            failed_no_space: AtomicU64::new(lost.1),
            // A restored file that is open may have a loop device on it that an older server
            // left buffered.
            look_for_loops: AtomicBool::new(opens > 0),
        });
        g.by_layer.insert(info.name, file_name.clone());
        g.by_ino.insert(f.ino, f.clone());
        g.by_name.insert(file_name, f);
        Ok(path)
    }

    /// See `LiveFiles::while_closed`. `others` says, under the table's write lock (I/O on the
    /// files held off), given the path and its open handles, how many open handles may
    /// remain; `None`: not now.
    pub fn while_closed<T>(
        &self,
        layer: &str,
        others: &dyn Fn(&Path, u64) -> Result<Option<u64>>,
        f: impl FnOnce(&dyn BlockDevice) -> Result<T>,
    ) -> Result<Option<T>> {
        if !self.read().by_layer.contains_key(layer) {
            return Ok(None);
        }
        // Inside the gate first, as every request on the files (the table's lock second): a
        // restart's pause waits for this to finish, and nothing under it enters the gate again
        // (so `f` gets a plain volume, not the file's device: a second enter would wait for
        // the pause that waits for the first).
        let _pass = self.exports.gate().enter();
        // The write lock holds off `open`, which counts an open under the read lock, and
        // every read and write, which find their file under it.
        let g = self.write();
        let Some(file) = g.by_layer.get(layer).and_then(|n| g.by_name.get(n)) else {
            return Ok(None);
        };
        let opens = file.open_handles();
        if file.revoked() || Some(opens) != others(&file.path, opens)? {
            return Ok(None);
        }
        let v = crate::volume::Volume::open(self.exports.store(), &file.layer)?;
        f(&v).map(Some)
    }

    /// See `LiveFiles::detach`.
    pub fn detach(&self, layer: &str, force: bool) -> Result<LostWrites> {
        let deadline = Instant::now() + CLOSE_GRACE;
        loop {
            let mut g = self.write();
            g.prune();
            let Some(f) = g
                .by_layer
                .get(layer)
                .and_then(|n| g.by_name.get(n))
                .cloned()
            else {
                return Err(Error::NotFound(format!(
                    "layer {layer:?} is not attached as a live file in {}",
                    self.dir.display()
                )));
            };
            let open = f.open_handles();
            if open == 0 || force {
                if open > 0 {
                    log::process(
                        Level::Warn,
                        format_args!(
                            "thinlayer: detach --force {layer:?}: {} was open {open} time(s); \
                             its further I/O fails with EIO",
                            f.path.display()
                        ),
                    );
                }
                // Dropping the last reference unregisters the layer from the exports.
                g.remove(&f);
                drop(g);
                self.changed();
                // A request handler that took the file before the removal may hold it a moment
                // longer (it replies, then lets go): the layer stays registered as held until
                // the last holder lets go, and the caller's next step (a commit, a remove)
                // must find it free. Each holds it for one request, so this is brief.
                let deadline = Instant::now() + CLOSE_GRACE;
                while (Arc::strong_count(&f) > 1 || Arc::strong_count(&f.device) > 1)
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                return Ok(f.lost_writes());
            }
            drop(g);
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::InUse {
                    message: format!(
                        "layer {layer:?}: live file {} is open ({open} handle(s); a loop device? \
                         see `losetup -j {}`); detach it after they close, or use --force",
                        f.path.display(),
                        f.path.display()
                    ),
                    holders: vec![f.path.display().to_string()],
                });
            }
            let g = self.closed.0.lock().unwrap_or_else(|p| p.into_inner());
            let _ = self
                .closed
                .1
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(100)));
        }
    }
}
