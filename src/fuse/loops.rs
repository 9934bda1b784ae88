//! Loop devices over live files: finding them (through `/sys/block`), and switching them to
//! direct I/O.
//!
//! A loop device in its default, buffered mode writes to its backing file through the page
//! cache, one request at a time; in direct-I/O mode (`LOOP_SET_DIRECT_IO`, `losetup
//! --direct-io=on`) it submits several requests at once as asynchronous direct I/O. A live
//! file is opened FOPEN_DIRECT_IO (no second cache under the filesystem's own), so the
//! buffered mode buys nothing and costs the queue depth: fio's random 4 KiB writes at qd16
//! went from 6-12k to 42-44k IOPS, pgbench 1.4-3.8x (docs/BENCHMARKS.md). `mount -o loop` and
//! containerd 1.6 set loop devices up buffered and have no option to ask otherwise, so with
//! `serve --loop-direct-io` the server switches each loop device it finds over one of its
//! files (`DirectIo`).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_loop(sys: &Path, name: &str, backing: Option<&str>, dio: &str) {
        let d = sys.join(name);
        std::fs::create_dir_all(d.join("loop")).unwrap();
        std::fs::write(d.join("dev"), format!("7:{}\n", &name[4..])).unwrap();
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
                    direct_io: false
                },
                LoopDevice {
                    name: "loop3".into(),
                    dev: "7:3".into(),
                    direct_io: true
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
