//! Loop devices over live files: finding them (through `/sys/block`), making and clearing the
//! ones the snapshotter serves its mounts from, and switching them to direct I/O.
//!
//! Why the snapshotter makes its own: `mount -o loop` in containerd 1.6 sets a device up with
//! `LOOP_SET_FD` and then `LOOP_SET_STATUS64`, and the second call freezes the device's queue,
//! which waits for an RCU grace period: 10-24 ms a mount on this machine, against one
//! `LOOP_CONFIGURE` (0.15 ms), which the loop binder makes (`binder`; `attach` runs
//! `losetup` where there is none). A `docker build` step mounts five times in containerd
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
use std::collections::HashMap;
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
/// this mount namespace), by a look at every bound loop device: for a file that is not one of
/// this process's live files (else `Seen::devices_of`).
pub fn devices_of(file: &Path) -> Vec<LoopDevice> {
    devices_in(Path::new("/sys/block"), &bound_names(), file)
}

/// The loop devices last found over each live file, so that a snapshot call need not read
/// every bound loop device's `backing_file` to find its file's (that look was 10 % of the
/// snapshot calls' CPU in a `docker build`, 25 looks a build pair, docs/BENCHMARKS.md).
///
/// A remembered list is used only if it still holds: each of its devices still shows the
/// file as its backing file (read again, with its mode), and together they account for every
/// open handle of the file. Every loop device bound over a file holds an open of it of its
/// own (`losetup`, `mount -o loop`, containerd and the binder each open the file, bind it,
/// and close their descriptor), counted by the live files before the device exists and
/// carried across a restart (`FileState::opens`); so a device someone else bound over the
/// file, or one cleared and bound again, shows as an open the list does not account for,
/// and the look is made again. A file no one has open has no loop device at all. (Two
/// devices bound from one descriptor share an open and would hide the second; no program
/// that binds loop devices for mounts does that.)
#[derive(Default)]
pub struct Seen {
    by_file: Mutex<HashMap<PathBuf, Vec<String>>>,
}

impl Seen {
    /// The loop devices over live file `file`, which has `opens` open handles now (`None`:
    /// not known, so look).
    pub fn devices_of(&self, file: &Path, opens: Option<u64>) -> Vec<LoopDevice> {
        self.devices_in(Path::new("/sys/block"), bound_names, file, opens)
    }

    /// `devices_of` over `sys_block`, with the bound devices' names from `bound` if it has
    /// to look at them all.
    fn devices_in(
        &self,
        sys_block: &Path,
        bound: impl FnOnce() -> Option<Vec<String>>,
        file: &Path,
        opens: Option<u64>,
    ) -> Vec<LoopDevice> {
        if opens == Some(0) {
            self.forget(file);
            return Vec::new();
        }
        let known = self.names(file);
        if !known.is_empty() && opens == Some(known.len() as u64) {
            let want = file.as_os_str().as_bytes();
            let found: Vec<LoopDevice> = known
                .iter()
                .filter_map(|name| device_at(sys_block, name, want))
                .collect();
            if found.len() == known.len() {
                return found;
            }
        }
        let found = devices_in(sys_block, &bound(), file);
        let names = found.iter().map(|d| d.name.clone()).collect();
        self.lock().insert(file.to_path_buf(), names);
        found
    }

    /// A device this process just bound over `file`.
    pub fn bound(&self, file: &Path, device: &LoopDevice) {
        let mut g = self.lock();
        let names = g.entry(file.to_path_buf()).or_default();
        if !names.contains(&device.name) {
            names.push(device.name.clone());
            names.sort();
        }
    }

    /// `file`'s devices are cleared (or it has none).
    pub fn forget(&self, file: &Path) {
        self.lock().remove(file);
    }

    fn names(&self, file: &Path) -> Vec<String> {
        self.lock().get(file).cloned().unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Vec<String>>> {
        self.by_file.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The loop devices that have a file bound, by name (`loop3`): those `/proc/partitions`
/// lists, which skips devices of no size (an unbound loop device has none). Every loop
/// device ever made stays in `/sys/block` until removed, bound or not (74 on the machine
/// the benchmarks run on, 3 of them bound), and a snapshot call looks for its file's
/// devices several times: reading each one's `loop/backing_file` was 25 scans and 1850
/// opens a `docker build` pair. `None` (no /proc) falls back to every loop device.
fn bound_names() -> Option<Vec<String>> {
    let text = std::fs::read_to_string("/proc/partitions").ok()?;
    Some(partitions_loops(&text))
}

/// The loop devices in a `/proc/partitions` text (`major minor #blocks name` lines).
fn partitions_loops(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter(|n| n.starts_with("loop") && n[4..].bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

/// The names of the loop devices to look at: the bound ones if known, else every one in
/// `sys_block`.
fn candidates(sys_block: &Path, bound: &Option<Vec<String>>) -> Vec<String> {
    match bound {
        Some(names) => names.clone(),
        None => std::fs::read_dir(sys_block)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("loop"))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn devices_in(sys_block: &Path, bound: &Option<Vec<String>>, file: &Path) -> Vec<LoopDevice> {
    let want = file.as_os_str().as_bytes();
    let mut found: Vec<LoopDevice> = candidates(sys_block, bound)
        .into_iter()
        .filter_map(|name| device_at(sys_block, &name, want))
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Loop device `name` in `sys_block`, if its backing file is `want` (a path's bytes).
fn device_at(sys_block: &Path, name: &str, want: &[u8]) -> Option<LoopDevice> {
    let line = |p: PathBuf| {
        let mut b = std::fs::read(p).ok()?;
        if b.last() == Some(&b'\n') {
            b.pop();
        }
        Some(b)
    };
    let p = sys_block.join(name);
    // A loop device with nothing bound has no backing_file.
    if line(p.join("loop/backing_file"))? != want {
        return None;
    }
    Some(LoopDevice {
        name: name.to_string(),
        dev: String::from_utf8(line(p.join("dev"))?).ok()?,
        direct_io: line(p.join("loop/dio")).is_some_and(|d| d == b"1"),
        read_only: line(p.join("ro")).is_some_and(|d| d == b"1"),
    })
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

/// Switch every buffered one of `devices` (the loop devices over `file`) to direct I/O; each
/// switch and each refusal is logged (a device the kernel refuses stays buffered and works
/// as before).
pub fn switch_to_direct_io(file: &Path, devices: Vec<LoopDevice>) {
    for d in devices.into_iter().filter(|d| !d.direct_io) {
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
    tx: Mutex<mpsc::Sender<(PathBuf, u64)>>,
}

impl DirectIo {
    /// The thread, finding the devices through `seen` (the live files').
    pub fn start(seen: std::sync::Arc<Seen>) -> std::io::Result<DirectIo> {
        let (tx, rx) = mpsc::channel::<(PathBuf, u64)>();
        std::thread::Builder::new()
            .name("loop-dio".into())
            .spawn(move || {
                for (file, opens) in rx {
                    switch_to_direct_io(&file, seen.devices_of(&file, Some(opens)));
                }
            })?;
        Ok(DirectIo { tx: Mutex::new(tx) })
    }

    /// Look for buffered loop devices over `file`, which has `opens` open handles (counted
    /// after the open whose first I/O this is, so they include a new device's), and switch
    /// them, soon (without waiting).
    pub fn request(&self, file: &Path, opens: u64) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        // The thread lives as long as this value; a send cannot fail before it is dropped.
        let _ = tx.send((file.to_path_buf(), opens));
    }
}

/// `LOOP_CLR_FD` from linux/loop.h.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;

/// Bind a new loop device to `file` (read-only if asked, in direct-I/O mode if asked, never
/// autoclear: see the module's comment), with `losetup`, which makes it with one
/// `LOOP_CONFIGURE`: for a process with no loop binder (`binder`, which says why this runs
/// in a child process, never in the server).
pub fn attach(file: &Path, read_only: bool, direct_io: bool) -> std::io::Result<LoopDevice> {
    let mut cmd = std::process::Command::new("losetup");
    cmd.args(["--find", "--show"]);
    if read_only {
        cmd.arg("--read-only");
    }
    cmd.arg(if direct_io {
        "--direct-io=on"
    } else {
        "--direct-io=off"
    });
    let out = cmd.arg(file).stdin(std::process::Stdio::null()).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let shown = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let name = shown
        .strip_prefix("/dev/")
        .filter(|n| n.starts_with("loop"))
        .ok_or_else(|| std::io::Error::other(format!("losetup printed {shown:?}")))?
        .to_string();
    Ok(LoopDevice {
        dev: format!("7:{}", &name[4..]),
        name,
        direct_io,
        read_only,
    })
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

/// What `release` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// Every loop device over the file is cleared (or there was none).
    All,
    /// These devices have a filesystem mounted: nothing was cleared.
    Mounted(Vec<String>),
}

/// Clear `devices` (every loop device over a file), unless one is mounted. Each is held
/// exclusively first, so none can be mounted between the check and the clear; the kernel
/// clears a device at the last close after `LOOP_CLR_FD`, which is ours.
pub fn release(devices: &[LoopDevice]) -> std::io::Result<Released> {
    let mut held = Vec::with_capacity(devices.len());
    let mut mounted = Vec::new();
    for d in devices {
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
    let names = candidates(Path::new("/sys/block"), &bound_names());
    let mut cleared = 0;
    for name in names {
        let backing_file = Path::new("/sys/block")
            .join(&name)
            .join("loop/backing_file");
        let Ok(backing) = std::fs::read(backing_file) else {
            continue;
        };
        if !backing.starts_with(&prefix) {
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

/// Clear `devices` (those over a file) now, or, for one with a filesystem mounted, as soon
/// as that is unmounted (the kernel then marks it autoclear). At a server's stop: no device
/// stays bound to a file that is going away.
pub fn clear_all(devices: &[LoopDevice]) {
    for d in devices {
        if let Ok(f) = std::fs::File::open(d.path()) {
            // SAFETY: an ioctl without an argument on a descriptor we own.
            unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD as _) };
        }
    }
}

/// If none of `devices` (the loop devices over a file) has a filesystem mounted (none is
/// held exclusively), how many there are (each holds one open of the file); `None` if one
/// is mounted. Asks the kernel nothing that would reach the file's FUSE server (the caller
/// may hold off its requests).
pub fn unmounted_binding(devices: &[LoopDevice]) -> std::io::Result<Option<u64>> {
    for d in devices {
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
        let found = devices_in(sys, &None, Path::new("/srv/files/web"));
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
        assert!(devices_in(sys, &None, Path::new("/srv/files/we")).is_empty());
        // With the bound devices named (from /proc/partitions), only those are read.
        let only0 = Some(vec!["loop0".to_string()]);
        let found = devices_in(sys, &only0, Path::new("/srv/files/web"));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "loop0");
    }

    /// `Seen::devices_in` over `sys`, counting the looks at every bound device.
    fn seen_in(seen: &Seen, sys: &Path, file: &str, opens: u64, looks: &mut u32) -> Vec<String> {
        let bound = || {
            *looks += 1;
            None
        };
        seen.devices_in(sys, bound, Path::new(file), Some(opens))
            .into_iter()
            .map(|d| format!("{}{}", d.name, if d.read_only { " ro" } else { "" }))
            .collect()
    }

    fn unbind(sys: &Path, name: &str) {
        std::fs::remove_file(sys.join(name).join("loop/backing_file")).unwrap();
    }

    #[test]
    fn the_devices_seen_over_a_file_are_used_only_while_they_account_for_its_opens() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let web = "/srv/files/web";
        let seen = Seen::default();
        let mut looks = 0;
        // No open: no device, without a look (a stale device in sysfs cannot hold the file).
        fake_loop(sys, "loop0", Some(web), "0");
        assert!(seen_in(&seen, sys, web, 0, &mut looks).is_empty());
        assert_eq!(looks, 0);
        // One open, nothing seen yet: a look, remembered; the next call reads loop0 only.
        assert_eq!(seen_in(&seen, sys, web, 1, &mut looks), ["loop0"]);
        assert_eq!(seen_in(&seen, sys, web, 1, &mut looks), ["loop0"]);
        assert_eq!(looks, 1);
        // loop0 cleared and another device bound over the same file (one open still): the
        // remembered loop0 no longer shows the file, so the look is made again.
        unbind(sys, "loop0");
        fake_loop(sys, "loop5", Some(web), "0");
        assert_eq!(seen_in(&seen, sys, web, 1, &mut looks), ["loop5"]);
        assert_eq!(looks, 2);
        // loop5 cleared and bound again over the file read-only: its mode is read again.
        unbind(sys, "loop5");
        fake_loop(sys, "loop5", Some(web), "1");
        assert_eq!(seen_in(&seen, sys, web, 1, &mut looks), ["loop5 ro"]);
        assert_eq!(looks, 2);
        // Someone else binds another device over it (`mount -o loop`): a second open that
        // the remembered devices do not account for, so a look finds both.
        fake_loop(sys, "loop9", Some(web), "0");
        assert_eq!(
            seen_in(&seen, sys, web, 2, &mut looks),
            ["loop5 ro", "loop9"]
        );
        assert_eq!(looks, 3);
        // A device this process bound is remembered without a look; another file's list
        // is its own.
        fake_loop(sys, "loop7", Some("/srv/files/db"), "0");
        seen.bound(
            Path::new("/srv/files/db"),
            &LoopDevice {
                name: "loop7".into(),
                dev: "7:7".into(),
                direct_io: false,
                read_only: false,
            },
        );
        assert_eq!(
            seen_in(&seen, sys, "/srv/files/db", 1, &mut looks),
            ["loop7"]
        );
        assert_eq!(looks, 3);
        // An open that is no loop device's: every call looks (and finds what there is).
        assert_eq!(
            seen_in(&seen, sys, "/srv/files/db", 2, &mut looks),
            ["loop7"]
        );
        assert_eq!(
            seen_in(&seen, sys, "/srv/files/db", 2, &mut looks),
            ["loop7"]
        );
        assert_eq!(looks, 5);
        // Forgotten (its devices released): the next call looks.
        seen.forget(Path::new(web));
        assert_eq!(
            seen_in(&seen, sys, web, 2, &mut looks),
            ["loop5 ro", "loop9"]
        );
        assert_eq!(looks, 6);
    }

    #[test]
    fn bound_loop_devices_are_read_from_proc_partitions() {
        let text = "major minor  #blocks  name\n\n   7        3     524288 loop3\n 254        0  268435456 vda\n   7       12         64 loop12\n 259        0  1000 loopy\n";
        assert_eq!(partitions_loops(text), ["loop3", "loop12"]);
        assert!(partitions_loops("").is_empty());
    }

    #[test]
    fn a_file_no_loop_device_uses_has_none() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("plain");
        std::fs::write(&f, b"x").unwrap();
        assert!(devices_of(&f).is_empty());
        switch_to_direct_io(&f, devices_of(&f));
    }
}
