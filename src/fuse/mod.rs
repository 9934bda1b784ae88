//! Live files: each attached layer as one regular file, a raw disk image that `losetup` and
//! `mount -o loop` use, in a FUSE filesystem the live server mounts (`serve --files DIR`).
//! A frontend beside `nbd/`: reads and writes go through the same volume path NBD uses,
//! `fsync` is the store's durable flush, and the attachment is registered with the server's
//! exports, so a layer in use cannot be removed or committed under its loop device.
//!
//! `names` maps layer names to file names, `files` holds the policy (attach, detach, who has
//! a file open), `fs` translates FUSE requests, `mount` sets the directory up and takes it
//! down, `loops` finds the loop devices over a file and switches them to direct I/O, `binder`
//! is the child process that binds the snapshotter's loop devices. `adopt`
//! serves a mount another process made, from its `/dev/fuse` descriptor and its table of
//! files (`thinlayer restart`, the keeper): the loop devices on the files never notice the
//! change of process; `leave` stops the old process's session threads reading before it
//! exits, so none of the requests in flight is lost with it.
//!
//! Without the `fuse` feature (`crate::features`) only the FUSE session (`fs`, `adopt`, and
//! fuser) is left out: `LiveFiles` keeps its type, so the server and the CLI need no second
//! version, but `mount` refuses, so the table and mount code below it are never reached.
#![cfg_attr(not(feature = "fuse"), allow(dead_code))]

mod adopt;
pub mod binder;
mod files;
#[cfg(feature = "fuse")]
mod fs;
mod leave;
mod loops;
mod mount;
mod names;
pub mod prefault;

pub use files::{FileState, LostWrites, CLOSE_GRACE};
pub use loops::{devices_of as loop_devices_of, LoopDevice};
pub use mount::unescape as unescape_mountinfo;

use crate::error::{Error, Result};
use crate::log::{self, Level};
use crate::volume::exports::LiveExports;
use files::Table;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

/// FUSE session threads: each reads and serves one request at a time, so this many
/// requests (across all files) are served at once.
const SESSION_THREADS: usize = 4;

/// The session settings, the same for a mount and an adopted one.
#[cfg(feature = "fuse")]
fn session_config() -> fuser::Config {
    let mut config = fuser::Config::default();
    // Without allow_other only the mounting user (root) may enter.
    config.acl = fuser::SessionACL::Owner;
    config.n_threads = Some(SESSION_THREADS);
    // All threads read the one descriptor that is handed over: requests a killed process
    // read stay on a descriptor that lives on (the keeper's copy), where the kernel can
    // resend them; a per-thread clone would take them down with it.
    config.clone_fd = false;
    config
}

/// The thread that switches loop devices over the files to direct I/O (`loops`), unless
/// told not to (`serve --no-loop-direct-io`).
#[cfg(feature = "fuse")]
fn direct_io(wanted: bool, seen: &Arc<loops::Seen>) -> Result<Option<loops::DirectIo>> {
    if !wanted {
        return Ok(None);
    }
    loops::DirectIo::start(seen.clone())
        .map(Some)
        .map_err(|e| Error::io("live files: starting the loop-dio thread", e))
}

/// One attached layer, as `LiveFiles::list` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub layer: String,
    pub path: PathBuf,
    pub writable: bool,
    /// Open handles now (a loop device holds one).
    pub open: u64,
    pub since: SystemTime,
}

/// The live-files directory of a running server. Shared (`Arc`) by the control requests
/// and the containerd snapshotter; every method is safe to call from any thread.
pub struct LiveFiles {
    table: Arc<Table>,
    session: Mutex<Option<JoinHandle<std::io::Result<()>>>>,
    /// The kernel connection (a second descriptor of the one the session reads), for handing
    /// it over to the next process.
    device: OwnedFd,
    /// `serve --loop-direct-io`: loop devices made here (`loop_device`) start in that mode.
    loop_direct_io: bool,
    /// One `loop_device` at a time: two at once could both find none and bind two devices
    /// over one file, and two writable filesystems on one layer corrupt it. It holds the
    /// child that binds them.
    making_loops: Mutex<binder::Binder>,
    /// Another binder child for `syncfs` (`syncfs`), so a long sync never holds up a binding.
    syncing: Mutex<binder::Binder>,
    /// The loop devices last found over each file (`loop_devices_of`), shared with the
    /// thread that switches them to direct I/O.
    seen: Arc<loops::Seen>,
}

impl LiveFiles {
    /// Mount the live-files filesystem on `dir` (created if missing; a dead mount left by a
    /// killed server is detached first), root-only, empty until layers are attached.
    /// Without the `fuse` feature this build has no FUSE session: `Unavailable`, and nothing
    /// is touched.
    /// With `loop_direct_io`, loop devices over the files are switched to direct I/O
    /// (`loops`).
    pub fn mount(dir: &Path, exports: Arc<LiveExports>, loop_direct_io: bool) -> Result<LiveFiles> {
        #[cfg(not(feature = "fuse"))]
        {
            let _ = (dir, exports, loop_direct_io);
            Err(crate::features::missing(
                "fuse",
                "live files (serve --files)",
            ))
        }
        #[cfg(feature = "fuse")]
        Self::mount_fuse(dir, exports, loop_direct_io)
    }

    #[cfg(feature = "fuse")]
    fn mount_fuse(
        dir: &Path,
        exports: Arc<LiveExports>,
        loop_direct_io: bool,
    ) -> Result<LiveFiles> {
        let dir = mount::prepare(dir)?;
        let table = Arc::new(Table::new(exports, &dir));
        let mut config = session_config();
        config.mount_options = vec![
            fuser::MountOption::FSName("thinlayer".into()),
            fuser::MountOption::Subtype("thinlayer".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoExec,
            fuser::MountOption::NoAtime,
        ];
        let seen = Arc::new(loops::Seen::default());
        let session = fuser::Session::new(
            fs::Fs::new(table.clone(), direct_io(loop_direct_io, &seen)?),
            &dir,
            &config,
        )
        .map_err(|e| Error::io(format!("live files: mounting on {}", dir.display()), e))?;
        let device = session
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("live files: duplicating the /dev/fuse descriptor", e))?;
        Self::start(table, session, device, loop_direct_io, seen)
    }

    /// Serve the live files another process mounted on `dir` and handed over: `device` is
    /// its `/dev/fuse` descriptor, `files` its table (`handover`). The files keep their
    /// inode numbers and open counts, so the kernel's view and the loop devices on them
    /// stay valid. Requests the other process read and did not answer are asked for again
    /// once it is gone (`resend`).
    pub fn adopt(
        dir: &Path,
        exports: Arc<LiveExports>,
        device: OwnedFd,
        files: &[FileState],
        loop_direct_io: bool,
    ) -> Result<LiveFiles> {
        #[cfg(not(feature = "fuse"))]
        {
            let _ = (dir, exports, device, files, loop_direct_io);
            Err(crate::features::missing("fuse", "live files (a restart)"))
        }
        #[cfg(feature = "fuse")]
        Self::adopt_fuse(dir, exports, device, files, loop_direct_io)
    }

    #[cfg(feature = "fuse")]
    fn adopt_fuse(
        dir: &Path,
        exports: Arc<LiveExports>,
        device: OwnedFd,
        files: &[FileState],
        loop_direct_io: bool,
    ) -> Result<LiveFiles> {
        let table = Arc::new(Table::new(exports, dir));
        table.restore(files)?;
        let session_fd = device
            .try_clone()
            .map_err(|e| Error::io("live files: duplicating the /dev/fuse descriptor", e))?;
        let seen = Arc::new(loops::Seen::default());
        let session = adopt::session(
            fs::Fs::new(table.clone(), direct_io(loop_direct_io, &seen)?),
            session_fd,
            &session_config(),
        )
        .map_err(|e| {
            Error::io(
                format!("live files: taking over the mount on {}", dir.display()),
                e,
            )
        })?;
        Self::start(table, session, device, loop_direct_io, seen)
    }

    #[cfg(feature = "fuse")]
    fn start(
        table: Arc<Table>,
        session: fuser::Session<fs::Fs>,
        device: OwnedFd,
        loop_direct_io: bool,
        seen: Arc<loops::Seen>,
    ) -> Result<LiveFiles> {
        let thread = std::thread::Builder::new()
            .name("live-files".into())
            .spawn(move || session.run())
            .map_err(|e| Error::io("live files: starting the session thread", e))?;
        Ok(LiveFiles {
            table,
            session: Mutex::new(Some(thread)),
            device,
            loop_direct_io,
            making_loops: Mutex::new(binder::Binder::default()),
            syncing: Mutex::new(binder::Binder::default()),
            seen,
        })
    }

    /// The kernel connection, to hand to the next process.
    pub fn device(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }

    /// The table of files, to hand to the next process (taken with the exports' gate closed,
    /// so no open or release is under way).
    pub fn handover(&self) -> Vec<FileState> {
        self.table.snapshot()
    }

    /// Have `w` told the table of files whenever it changes (the keeper's copy).
    pub fn watch(&self, w: files::Watch) {
        self.table.watch(w);
    }

    /// Stop serving before this process exits, having handed the connection to the next one
    /// (`thinlayer restart`): every session thread leaves `/dev/fuse` and stays away, so
    /// none is killed while the kernel copies a request to it (which fails the request with
    /// EIO); what they hold is the next process's to resend (`leave`). An error if some did
    /// not stop within `timeout`.
    pub fn stop_reading(&self, timeout: std::time::Duration) -> Result<()> {
        leave::stop_reading(timeout).map_err(|e| {
            Error::io(
                format!(
                    "live files {}: stopping the session threads",
                    self.dir().display()
                ),
                e,
            )
        })
    }

    /// Ask the kernel to send again the requests a previous process read and did not answer.
    /// Call once that process is gone. `Ok(false)`: the kernel cannot (before Linux 6.9).
    pub fn resend(&self) -> Result<bool> {
        adopt::resend(self.device.as_fd()).map_err(|e| {
            Error::io(
                format!(
                    "live files {}: asking the kernel to resend (fd {})",
                    self.dir().display(),
                    self.device.as_raw_fd()
                ),
                e,
            )
        })
    }

    /// The mounted directory (canonical).
    pub fn dir(&self) -> &Path {
        self.table.dir()
    }

    /// Attach layer `layer` as a live file and return its path: `DIR/NAME`, the name with `/`
    /// and `%` percent-encoded. Idempotent: an attached layer returns the same path. A
    /// writable layer's file is read-write (0600), a read-only one's 0400 and refuses opens
    /// for writing. While attached, `rm` and `commit` of the layer are refused naming the file.
    /// Errors: `NotFound` for no such layer (or one still being imported).
    pub fn attach(&self, layer: &str) -> Result<PathBuf> {
        self.table.attach(layer)
    }

    /// Detach layer `layer`: its file vanishes and the layer is free for `rm` and `commit`.
    /// While the file is open (a loop device holds it until it is detached; the kernel's last
    /// close arrives shortly after `umount` of an autoclear loop device) this waits up to
    /// `CLOSE_GRACE`, then refuses with `Conflict` naming the file, unless `force`: then open
    /// handles get EIO from now on. `NotFound` if the layer is not attached.
    /// Returns what writes through the file failed while it was attached (the pool full, or
    /// I/O errors): a loop device's writeback loses them without telling the writer.
    pub fn detach(&self, layer: &str, force: bool) -> Result<LostWrites> {
        self.table.detach(layer, force)
    }

    /// Run `f` on attached layer `layer`'s device while no one has its file open (no loop
    /// device: nothing mounted on it), holding off opens until `f` returns; `None` without
    /// running it when the file is open or the layer is not attached. For changes that are
    /// safe only while no filesystem is mounted on the file (the snapshotter's trim of a dead
    /// journal).
    pub fn while_closed<T>(
        &self,
        layer: &str,
        f: impl FnOnce(&dyn crate::volume::BlockDevice) -> Result<T>,
    ) -> Result<Option<T>> {
        self.table.while_closed(layer, &|_, _| Ok(Some(0)), f)
    }

    /// As `while_closed`, but the file may be open by loop devices nothing has mounted (the
    /// snapshotter's, `loop_device`). They are checked with the file's I/O held off, so a
    /// mount that comes after the check reads nothing until `f` has returned, and it reads
    /// through an empty cache (a device no one had open has none).
    pub fn while_unmounted<T>(
        &self,
        layer: &str,
        f: impl FnOnce(&dyn crate::volume::BlockDevice) -> Result<T>,
    ) -> Result<Option<T>> {
        let others = |path: &Path, opens: u64| {
            loops::unmounted_binding(&self.seen.devices_of(path, Some(opens))).map_err(|e| {
                Error::io(
                    format!("live file {}: looking at its loop devices", path.display()),
                    e,
                )
            })
        };
        self.table.while_closed(layer, &others, f)
    }

    /// The loop device that mounts of attached layer `layer`'s file are served from
    /// (`/dev/loopN`), read-only or writable: one bound to the file in that mode already, or a
    /// new one (`loops::attach`). It stays bound until `release_loop_devices`.
    pub fn loop_device(&self, layer: &str, read_only: bool) -> Result<PathBuf> {
        let path = self.attach(layer)?;
        let mut binder = self.making_loops.lock().unwrap_or_else(|p| p.into_inner());
        // By path: a device left over a dead live-files mount shows another path once that
        // mount is detached, and the start that detaches it clears those nothing has mounted
        // first (`mount::prepare`).
        if let Some(d) = self
            .loop_devices_of(&path)
            .into_iter()
            .find(|d| d.read_only == read_only)
        {
            return Ok(d.path());
        }
        let d = match binder.bind(&path, read_only, self.loop_direct_io) {
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                loops::attach(&path, read_only, self.loop_direct_io)
            }
            r => r,
        };
        let d = d.map_err(|e| {
            Error::io(
                format!("live file {}: binding a loop device", path.display()),
                e,
            )
        })?;
        self.seen.bound(&path, &d);
        log::process(
            Level::Debug,
            format_args!(
                "thinlayer: live file {}: loop device /dev/{}",
                path.display(),
                d.name
            ),
        );
        Ok(d.path())
    }

    /// `syncfs` of the filesystem mounted at `point` (one on a loop device over a live file),
    /// in the binder child (`binder`): the sync waits for the loop device's writes, which are
    /// this server's own FUSE requests. In a process with no binder, here.
    pub fn syncfs(&self, point: &Path) -> std::io::Result<()> {
        let mut b = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        match b.syncfs(point) {
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => binder::syncfs_at(point),
            r => r,
        }
    }

    /// Clear every loop device over `layer`'s file (nothing to do if it is not attached), so
    /// the file can close; `InUse` naming the devices, and nothing cleared, if a filesystem is
    /// mounted on one.
    pub fn release_loop_devices(&self, layer: &str) -> Result<()> {
        let Some(path) = self.path(layer) else {
            return Ok(());
        };
        // A lazy unmount (dockerd's) returns before the kernel lets go of the device: as
        // for the file's last close (`detach`), that is waited for a moment.
        let deadline = std::time::Instant::now() + CLOSE_GRACE;
        let released = loop {
            let one = self.making_loops.lock().unwrap_or_else(|p| p.into_inner());
            match loops::release(&self.loop_devices_of(&path)) {
                Ok(loops::Released::Mounted(_)) if std::time::Instant::now() < deadline => {
                    drop(one);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                r => break r,
            }
        };
        match released {
            Ok(loops::Released::All) => {
                self.seen.forget(&path);
                Ok(())
            }
            Ok(loops::Released::Mounted(devices)) => Err(Error::InUse {
                message: format!(
                    "layer {layer:?}: a filesystem is mounted on {} (over live file {}); unmount it first",
                    devices.join(", "),
                    path.display()
                ),
                holders: devices,
            }),
            Err(e) => Err(Error::io(
                format!("live file {}: clearing its loop devices", path.display()),
                e,
            )),
        }
    }

    /// Every loop device bound over `path` (one of these files, else a look at all), found
    /// cheaply from the devices seen over it before while they account for all its opens
    /// (`loops::Seen`).
    pub fn loop_devices_of(&self, path: &Path) -> Vec<LoopDevice> {
        let opens = path
            .file_name()
            .and_then(|n| self.table.by_name(&n.to_string_lossy()))
            .filter(|f| f.path == path)
            .map(|f| f.open_handles());
        self.seen.devices_of(path, opens)
    }

    /// The file of an attached layer.
    pub fn path(&self, layer: &str) -> Option<PathBuf> {
        self.list()
            .into_iter()
            .find(|f| f.layer == layer)
            .map(|f| f.path)
    }

    /// Every attached layer, in file-name order.
    pub fn list(&self) -> Vec<FileInfo> {
        self.table
            .list()
            .iter()
            .map(|f| FileInfo {
                layer: f.layer.clone(),
                path: f.path.clone(),
                writable: f.writable(),
                open: f.open_handles(),
                since: f.since,
            })
            .collect()
    }

    /// Unmount (at server shutdown). Files still open are named: their loop devices fail
    /// from now on. A busy mount is detached lazily, and its session threads end with the
    /// process.
    pub fn unmount(&self) -> Result<()> {
        let Some(thread) = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return Ok(());
        };
        // The snapshotter's loop devices: cleared, those nothing has mounted at once (so
        // that their files close), the others when their filesystems are unmounted, so none
        // stays bound to a file that is going away.
        let mut released = Vec::new();
        for f in self.list().into_iter().filter(|f| f.open > 0) {
            let _one = self.making_loops.lock().unwrap_or_else(|p| p.into_inner());
            let devices = self.seen.devices_of(&f.path, Some(f.open));
            let unmounted = matches!(loops::unmounted_binding(&devices), Ok(Some(_)));
            loops::clear_all(&devices);
            if unmounted {
                released.push(f.layer);
            }
        }
        // The kernel's last close of a cleared device reaches us a moment later.
        let deadline = std::time::Instant::now() + CLOSE_GRACE;
        while std::time::Instant::now() < deadline
            && self
                .list()
                .iter()
                .any(|f| f.open > 0 && released.contains(&f.layer))
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for f in self.list().iter().filter(|f| f.open > 0) {
            log::process(
                Level::Warn,
                format_args!(
                    "thinlayer: live file {} is still open ({} handle(s)); its I/O fails from \
                     now on",
                    f.path.display(),
                    f.open
                ),
            );
        }
        let dir = self.dir();
        let complete = mount::unmount(dir)
            .map_err(|e| Error::io(format!("live files: unmounting {}", dir.display()), e))?;
        if complete {
            // The kernel ends the session once the mount is gone.
            match thread.join() {
                Ok(Err(e)) => log::process(
                    Level::Error,
                    format_args!("thinlayer: live files session: {e}"),
                ),
                Err(_) => log::process(
                    Level::Error,
                    format_args!("thinlayer: live files session thread panicked"),
                ),
                Ok(Ok(())) => {}
            }
        }
        Ok(())
    }
}
