//! Loop devices over active snapshots' live files in direct-I/O mode. containerd sets up the
//! loop device of a `loop` mount itself, in buffered mode: the loop device's worker sends one
//! request at a time to the file and waits for the live file's reply before the next, so an
//! unpack's writeback crosses the FUSE hop at one request's latency each. In direct-I/O mode
//! the loop device submits its requests asynchronously and keeps many in flight, which the live
//! files take in parallel (`FUSE_ASYNC_DIO`, parallel direct writes; `crate::fuse::fs`).
//! containerd 1.6 has no mount option for it, so once a mount is handed out the snapshotter
//! watches for a loop device over the file and switches it (`LOOP_SET_DIRECT_IO`, allowed on a
//! bound device: the kernel drains its queue first). Data and ordering are the same in both
//! modes; a device the kernel refuses to switch stays buffered.
//!
//! One thread watches every handed-out file for `WATCH` (containerd mounts within
//! milliseconds of the reply; a snapshot nobody mounts is forgotten then), scanning
//! /sys/block every `TICK` while it has anything to watch, and sleeping otherwise.

use super::writeback::{backs, loop_devices_of};
use crate::log::{self, Level};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

const WATCH: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_millis(10);
/// linux/loop.h.
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;

struct Watcher {
    files: Mutex<Vec<(PathBuf, Instant)>>,
    wake: Condvar,
}

fn watcher() -> &'static Watcher {
    static W: OnceLock<&'static Watcher> = OnceLock::new();
    W.get_or_init(|| {
        let w: &'static Watcher = Box::leak(Box::new(Watcher {
            files: Mutex::new(Vec::new()),
            wake: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("loop-dio".into())
            .spawn(move || w.run())
            .expect("starting the loop-dio thread");
        w
    })
}

/// Switch the loop device that will be set up over `file` to direct I/O, once it appears.
/// `THINLAYER_LOOP_DIO=off` in the server's environment leaves loop devices buffered (for
/// comparisons: tools/bench-docker runs both).
pub fn when_mounted(file: PathBuf) {
    static OFF: OnceLock<bool> = OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("THINLAYER_LOOP_DIO").is_ok_and(|v| v == "off")) {
        return;
    }
    let w = watcher();
    let mut files = w.files.lock().unwrap_or_else(|p| p.into_inner());
    files.retain(|(f, _)| *f != file);
    files.push((file, Instant::now() + WATCH));
    w.wake.notify_one();
}

impl Watcher {
    fn run(&self) {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            while files.is_empty() {
                files = self.wake.wait(files).unwrap_or_else(|p| p.into_inner());
            }
            let now = Instant::now();
            files.retain(|(f, until)| *until > now && !switched(f));
            files = self
                .wake
                .wait_timeout(files, TICK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Whether a loop device over `file` is in direct-I/O mode now (switched here if needed).
fn switched(file: &Path) -> bool {
    let mut done = false;
    for (name, _) in loop_devices_of(file) {
        let sys = Path::new("/sys/block").join(&name);
        if std::fs::read_to_string(sys.join("loop/dio")).is_ok_and(|d| d.trim() == "1") {
            done = true;
            continue;
        }
        match set_direct_io(&name, &sys, file) {
            Ok(true) => done = true,
            Ok(false) => {}
            Err(e) => {
                log::process(
                    Level::Debug,
                    format_args!(
                        "thinlayer: loop device /dev/{name} over {} stays buffered: {e}",
                        file.display()
                    ),
                );
                // Refused for good (alignment, an old kernel): stop watching.
                done = true;
            }
        }
    }
    done
}

/// Switch /dev/`name` to direct I/O if it still has `file` as its backing file once opened
/// (an open device cannot be cleared and reused for another file under us); false if it no
/// longer does.
fn set_direct_io(name: &str, sys: &Path, file: &Path) -> std::io::Result<bool> {
    let dev = std::fs::File::open(Path::new("/dev").join(name))?;
    if !backs(sys, file) {
        return Ok(false);
    }
    // SAFETY: an ioctl with an integer argument on a descriptor we own.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_DIRECT_IO, 1 as libc::c_ulong) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}
