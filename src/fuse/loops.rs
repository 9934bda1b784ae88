//! Loop devices over live files: finding them (through `/sys/block`), making and clearing the
//! ones the snapshotter serves its mounts from, and switching them to direct I/O.
//!
//! Why the snapshotter makes its own: `mount -o loop` in containerd 1.6 sets a device up with
//! `LOOP_SET_FD` and then `LOOP_SET_STATUS64`, and the second call freezes the device's queue,
//! which waits for an RCU grace period: 10-24 ms a mount on this machine, against 0.1 ms for
//! one `LOOP_CONFIGURE` (`attach`). A `docker build` step mounts five times in containerd
//! (the differ's two views, the unpack), so this was most of the build's gap to overlayfs
//! (docs/BENCHMARKS.md). A device made here is answered as the mount's source
//! (`/dev/loopN`), stays bound while its snapshot lives (no autoclear: a number containerd was
//! given can never come to mean another file while the snapshot exists, and a server restart
//! finds the devices where it left them), and is cleared when its snapshot is committed or
//! removed (`release`), or at the server's stop if nothing has it mounted.
//!
//! A loop device in its default, buffered mode writes to its backing file through the page
//! cache, one request at a time; in direct-I/O mode (`LOOP_SET_DIRECT_IO`, `losetup
//! --direct-io=on`) it submits several requests at once as asynchronous direct I/O. A live
//! file is opened FOPEN_DIRECT_IO (no second cache under the filesystem's own), so the
//! buffered mode buys nothing and costs the queue depth: fio's random 4 KiB writes at qd16
//! went from 6-12k to 42-44k IOPS, pgbench 1.4-3.8x (docs/BENCHMARKS.md). `mount -o loop` and
//! containerd 1.6 set loop devices up buffered and have no option to ask otherwise, so the
//! server switches each loop device it finds over one of its files (`DirectIo`; `serve
//! --no-loop-direct-io` does not).
//!
//! The switch keeps the durability promise: a direct-I/O loop device sends the same FUSE
//! WRITEs (each acknowledged once in the store) and turns a flush into the file's `fsync`
//! as before; the kernel flushes the backing file and drains the device's queue before it
//! changes mode. With several requests in flight, a restart's old process is often caught
//! with a session thread taking one from `/dev/fuse`; `leave` stops them reading before it
//! exits, which a request copied to a thread the exit kills would otherwise fail with EIO
//! (tests/restart.rs's PostgreSQL runs: 8 failures in 15 runs with direct I/O before it).

use crate::log::{self, Level};
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;

/// `LOOP_SET_DIRECT_IO` from linux/loop.h (the libc crate does not define the loop ioctls).
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;

/// A loop device, as `/sys/block` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `loop3`: the device is `/dev/loop3`.
    pub name: String,
    /// `7:3`, as `/proc/self/mountinfo` names the device a filesystem is on.
    pub dev: String,
    /// Whether it runs in direct-I/O mode now.
    pub direct_io: bool,
    /// Whether it refuses writes (`LO_FLAGS_READ_ONLY`).
    pub read_only: bool,
}

impl LoopDevice {
    /// `/dev/loop3`.
    pub fn path(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }
}

/// Every loop device whose backing file is `file` (its path as the kernel prints it, in
/// this mount namespace).
pub fn devices_of(file: &Path) -> Vec<LoopDevice> {
    devices_in(Path::new("/sys/block"), file)
}

fn devices_in(sys_block: &Path, file: &Path) -> Vec<LoopDevice> {
    let Ok(dir) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let want = file.as_os_str().as_bytes();
    let line = |p: PathBuf| {
        let mut b = std::fs::read(p).ok()?;
        if b.last() == Some(&b'\n') {
            b.pop();
        }
        Some(b)
    };
    let mut found: Vec<LoopDevice> = dir
        .flatten()
        .filter(|e| e.file_name().as_bytes().starts_with(b"loop"))
        .filter_map(|e| {
            let p = e.path();
            // A loop device with nothing bound has no backing_file.
            if line(p.join("loop/backing_file"))? != want {
                return None;
            }
            Some(LoopDevice {
                name: e.file_name().to_string_lossy().into_owned(),
                dev: String::from_utf8(line(p.join("dev"))?).ok()?,
                direct_io: line(p.join("loop/dio")).is_some_and(|d| d == b"1"),
                read_only: line(p.join("ro")).is_some_and(|d| d == b"1"),
            })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Switch `/dev/NAME` to direct I/O.
fn set_direct_io(name: &str) -> std::io::Result<()> {
    let dev = Path::new("/dev").join(OsStr::new(name));
    // Read-only is enough for the ioctl (root), and leaves a read-only device alone.
    let f = std::fs::File::open(&dev)?;
    // SAFETY: an ioctl with an integer argument on a descriptor we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_DIRECT_IO as _, 1 as libc::c_ulong) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Switch every buffered loop device over `file` to direct I/O; each switch and each
/// refusal is logged (a device the kernel refuses stays buffered and works as before).
pub fn switch_to_direct_io(file: &Path) {
    for d in devices_of(file).into_iter().filter(|d| !d.direct_io) {
        match set_direct_io(&d.name) {
            Ok(()) => log::process(
                Level::Info,
                format_args!(
                    "thinlayer: live file {}: loop device /dev/{} switched to direct I/O",
                    file.display(),
                    d.name
                ),
            ),
            Err(e) => log::process(
                Level::Warn,
                format_args!(
                    "thinlayer: live file {}: loop device /dev/{} stays buffered: \
                     LOOP_SET_DIRECT_IO failed: {e}",
                    file.display(),
                    d.name
                ),
            ),
        }
    }
}

/// A thread that switches the loop devices over a file to direct I/O when asked. The
/// request comes from a FUSE request handler, which must not wait for it: the kernel
/// flushes the file and drains the loop device's queue before it changes mode, and those
/// requests need the session threads. Ends when dropped.
pub struct DirectIo {
    tx: Mutex<mpsc::Sender<PathBuf>>,
}

impl DirectIo {
    pub fn start() -> std::io::Result<DirectIo> {
        let (tx, rx) = mpsc::channel::<PathBuf>();
        std::thread::Builder::new()
            .name("loop-dio".into())
            .spawn(move || {
                for file in rx {
                    switch_to_direct_io(&file);
                }
            })?;
        Ok(DirectIo { tx: Mutex::new(tx) })
    }

    /// Look for buffered loop devices over `file` and switch them, soon (without waiting).
    pub fn request(&self, file: &Path) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        // The thread lives as long as this value; a send cannot fail before it is dropped.
        let _ = tx.send(file.to_path_buf());
    }
}

/// The loop ioctls this module uses (linux/loop.h).
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn zeroed_info() -> LoopInfo64 {
    // SAFETY: a plain C struct of integers and byte arrays; all zeros is its empty value.
    unsafe { std::mem::zeroed() }
}

/// Bind a new loop device to `file` with one `LOOP_CONFIGURE` (read-only if asked, in
/// direct-I/O mode if asked, never autoclear: see the module's comment).
pub fn attach(file: &Path, read_only: bool, direct_io: bool) -> std::io::Result<LoopDevice> {
    use std::os::unix::fs::OpenOptionsExt;
    let backing = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(file)?;
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    let mut info = zeroed_info();
    info.flags = if read_only { LO_FLAGS_READ_ONLY } else { 0 }
        | if direct_io { LO_FLAGS_DIRECT_IO } else { 0 };
    // What `losetup -l` shows of an old-style binding; the kernel keeps the real path.
    let name = file.as_os_str().as_bytes();
    let n = name.len().min(info.file_name.len() - 1);
    info.file_name[..n].copy_from_slice(&name[..n]);
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    // Another process may take the free device between the two calls: then ask again.
    let mut last = None;
    for _ in 0..64 {
        // SAFETY: an ioctl without an argument on a descriptor we own.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if number < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let name = format!("loop{number}");
        let dev = match std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(Path::new("/dev").join(&name))
        {
            Ok(d) => d,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
        if r == 0 {
            return Ok(LoopDevice {
                dev: format!("7:{number}"),
                name,
                direct_io,
                read_only,
            });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
        last = Some(e);
    }
    Err(last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)))
}

/// Open `/dev/NAME` exclusively: `None` if something has it so (a mounted filesystem).
/// While the descriptor is held, nothing can mount it.
fn open_unmounted(name: &str) -> std::io::Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(Path::new("/dev").join(name))
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `/dev/NAME` is bound to `file` itself, not to an earlier file of the same path (a
/// live-files mount that died with a killed server leaves its devices over a dead file).
fn binds(name: &str, file: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(dev), Ok(meta)) = (
        std::fs::File::open(Path::new("/dev").join(name)),
        std::fs::metadata(file),
    ) else {
        return false;
    };
    let mut info = zeroed_info();
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64`, which `info` is.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info) } != 0 {
        return false;
    }
    info.device == meta.dev() && info.inode == meta.ino()
}

/// A loop device over `file` (the file itself, see `binds`) in the given mode, if there is one.
pub fn bound(file: &Path, read_only: bool) -> Option<LoopDevice> {
    devices_of(file)
        .into_iter()
        .find(|d| d.read_only == read_only && binds(&d.name, file))
}

/// What `release` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// Every loop device over the file is cleared (or there was none).
    All,
    /// These devices have a filesystem mounted: nothing was cleared.
    Mounted(Vec<String>),
}

/// Clear every loop device over `file`, unless one is mounted. Each is held exclusively
/// first, so none can be mounted between the check and the clear; the kernel clears a
/// device at the last close after `LOOP_CLR_FD`, which is ours.
pub fn release(file: &Path) -> std::io::Result<Released> {
    let devices = devices_of(file);
    let mut held = Vec::with_capacity(devices.len());
    let mut mounted = Vec::new();
    for d in &devices {
        match open_unmounted(&d.name)? {
            Some(f) => held.push(f),
            None => mounted.push(d.path().display().to_string()),
        }
    }
    if !mounted.is_empty() {
        return Ok(Released::Mounted(mounted));
    }
    for f in &held {
        // SAFETY: an ioctl without an argument on a descriptor we own.
        if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD as _) } != 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: another process cleared it meanwhile.
            if e.raw_os_error() != Some(libc::ENXIO) {
                return Err(e);
            }
        }
    }
    Ok(Released::All)
}

/// Clear every loop device whose backing file is in directory `dir` and that nothing has
/// mounted (a dead live-files mount's: see `mount::prepare`); returns how many.
pub fn clear_unmounted_under(dir: &Path) -> usize {
    let mut prefix = dir.as_os_str().as_bytes().to_vec();
    prefix.push(b'/');
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return 0;
    };
    let mut cleared = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(backing) = std::fs::read(e.path().join("loop/backing_file")) else {
            continue;
        };
        if !name.starts_with("loop") || !backing.starts_with(&prefix) {
            continue;
        }
        let Ok(Some(f)) = open_unmounted(&name) else {
            continue;
        };
        // SAFETY: an ioctl without an argument on a descriptor we own.
        if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD as _) } == 0 {
            cleared += 1;
        }
    }
    cleared
}

/// If no loop device over `file` has a filesystem mounted (none is held exclusively), how
/// many there are (each holds one open of it); `None` if one is mounted. Asks the kernel
/// nothing that would reach the file's FUSE server (the caller may hold off its requests):
/// a device left over an earlier, dead file of the same path counts too, which only makes
/// the count too high to match.
pub fn unmounted_binding(file: &Path) -> std::io::Result<Option<u64>> {
    let devices = devices_of(file);
    for d in &devices {
        if open_unmounted(&d.name)?.is_none() {
            return Ok(None);
        }
    }
    Ok(Some(devices.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_loop(sys: &Path, name: &str, backing: Option<&str>, dio: &str) {
        let d = sys.join(name);
        std::fs::create_dir_all(d.join("loop")).unwrap();
        std::fs::write(d.join("dev"), format!("7:{}\n", &name[4..])).unwrap();
        std::fs::write(d.join("ro"), if dio == "1" { "1\n" } else { "0\n" }).unwrap();
        if let Some(b) = backing {
            std::fs::write(d.join("loop/backing_file"), format!("{b}\n")).unwrap();
            std::fs::write(d.join("loop/dio"), format!("{dio}\n")).unwrap();
        }
    }

    #[test]
    fn the_loop_devices_over_a_file_are_found_with_their_mode() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        fake_loop(sys, "loop0", Some("/srv/files/web"), "0");
        fake_loop(sys, "loop1", Some("/srv/files/db"), "0");
        fake_loop(sys, "loop2", None, "0");
        fake_loop(sys, "loop3", Some("/srv/files/web"), "1");
        std::fs::create_dir_all(sys.join("vda")).unwrap();
        let found = devices_in(sys, Path::new("/srv/files/web"));
        assert_eq!(
            found,
            [
                LoopDevice {
                    name: "loop0".into(),
                    dev: "7:0".into(),
                    direct_io: false,
                    read_only: false
                },
                LoopDevice {
                    name: "loop3".into(),
                    dev: "7:3".into(),
                    direct_io: true,
                    read_only: true
                },
            ]
        );
        assert!(devices_in(sys, Path::new("/srv/files/we")).is_empty());
    }

    #[test]
    fn a_file_no_loop_device_uses_has_none() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("plain");
        std::fs::write(&f, b"x").unwrap();
        assert!(devices_of(&f).is_empty());
        switch_to_direct_io(&f);
    }
}
