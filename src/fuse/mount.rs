//! Mounting the live-files directory and taking it down again. A server killed with SIGKILL
//! leaves a dead FUSE mount behind (every access fails with ENOTCONN); the next start finds
//! it, says so, and detaches it lazily before mounting afresh.

use crate::error::{Error, Result};
use crate::log::{self, Level};
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Make `dir` ready to mount on: created if missing, a dead mount left by a killed server
/// lazily unmounted, anything else mounted there (or files in it) refused.
pub fn prepare(dir: &Path) -> Result<PathBuf> {
    let ctx = |what: &str| format!("live files: {what} {}", dir.display());
    if let Err(e) = std::fs::metadata(dir) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            // The snapshotter's loop devices outlive a killed server (they are never
            // autoclear, `loops`); those nothing has mounted are cleared, found by their
            // backing files' paths while the dead mount still shows them under `dir`.
            let absolute = match (dir.parent().map(Path::canonicalize), dir.file_name()) {
                (Some(Ok(parent)), Some(name)) => parent.join(name),
                _ => dir.to_path_buf(),
            };
            let cleared = super::loops::clear_unmounted_under(&absolute);
            detach_lazily(dir).map_err(|e| Error::io(ctx("unmounting the dead mount at"), e))?;
            log::process(
                Level::Warn,
                format_args!(
                    "thinlayer: {} was a dead live-files mount (a server was killed): unmounted \
                     it and cleared {cleared} unmounted loop device(s) over its files; \
                     filesystems still mounted on its files fail with EIO until unmounted",
                    dir.display()
                ),
            );
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(ctx("creating"), e))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::io(ctx("resolving"), e))?;
    if let Some(fstype) = mounted_at(&dir).map_err(|e| Error::io(ctx("reading mounts for"), e))? {
        return Err(Error::Conflict(format!(
            "live files: {} is already a mount point ({fstype}); give an unused directory",
            dir.display()
        )));
    }
    let mut entries = std::fs::read_dir(&dir).map_err(|e| Error::io(ctx("listing"), e))?;
    if entries.next().is_some() {
        return Err(Error::Conflict(format!(
            "live files: {} is not empty; the mount would hide its files, give an empty directory",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Unmount `dir`; if files are still open there (a loop device), detach it lazily instead,
/// so the name is free at once. Returns whether the unmount was complete.
pub fn unmount(dir: &Path) -> io::Result<bool> {
    let c = cpath(dir)?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EBUSY) {
        return Err(e);
    }
    detach_lazily(dir)?;
    Ok(false)
}

fn detach_lazily(dir: &Path) -> io::Result<()> {
    let c = cpath(dir)?;
    // SAFETY: as above.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// The type of the filesystem mounted at `dir` (canonical), if one is.
fn mounted_at(dir: &Path) -> io::Result<Option<String>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().find_map(|line| {
        // "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw"
        let (left, right) = line.split_once(" - ")?;
        let point = left.split(' ').nth(4)?;
        (unescape(point) == dir.as_os_str().as_bytes())
            .then(|| right.split(' ').next().unwrap_or("?").to_string())
    }))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/my\040disk"), b"/mnt/my disk");
        assert_eq!(unescape(r"/a\134b"), b"/a\\b");
        assert_eq!(unescape("/plain"), b"/plain");
    }

    #[test]
    fn the_root_is_a_mount_point_and_a_fresh_directory_is_not() {
        assert!(mounted_at(Path::new("/")).unwrap().is_some());
        let d = tempfile::tempdir().unwrap();
        let d = d.path().canonicalize().unwrap();
        assert_eq!(mounted_at(&d).unwrap(), None);
    }

    #[test]
    fn prepare_creates_the_directory_and_refuses_one_with_files() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("files");
        assert!(prepare(&dir).is_ok());
        assert!(dir.is_dir());
        std::fs::write(dir.join("x"), b"x").unwrap();
        let e = prepare(&dir).unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains("files"), "{e}");
    }
}
