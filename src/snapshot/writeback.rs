//! What a container wrote that has not reached its layer yet. A snapshot's filesystem is
//! mounted from a loop device over its live file: a write in the container dirties pages of
//! the ext4 on the loop device, and the layer sees them only at writeback (about 30 s later) or a sync. Usage must
//! count them at once (`docker ps -s` right after a write), so before reading the layer's
//! counters the snapshotter finds, through the kernel, the loop devices whose backing file is
//! the live file and the mounts of those devices, and syncs each filesystem (`syncfs`): its
//! dirty data and journal go to the loop device, whose flush reaches the live file's `fsync`
//! and so the pool. An idle filesystem has nothing to write, so this costs a look at the
//! file's loop devices (those seen over it before, `crate::fuse::loops::Seen`),
//! `/proc/self/mountinfo` and a `syncfs` per mount, made by the live files' binder child
//! (`crate::fuse::binder`).
//!
//! A mount made in another mount namespace is not in ours and is not synced (containerd's
//! shim mounts a container's root in the host's namespace, where `thinlayer serve` runs).

use crate::error::{Error, Result};
use crate::fuse::{unescape_mountinfo, LoopDevice};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One mount point of each device in `devices` (`MAJOR:MINOR`), from `mountinfo`'s text.
fn mount_points(mountinfo: &str, devices: &[String]) -> Vec<PathBuf> {
    let mut found: Vec<(&str, PathBuf)> = Vec::new();
    for line in mountinfo.lines() {
        // "36 35 7:3 / /run/containerd/.../rootfs rw,relatime - ext4 /dev/loop3 rw"
        let mut f = line.split(' ');
        let (Some(dev), Some(point)) = (f.nth(2), f.nth(1)) else {
            continue;
        };
        if devices.iter().any(|d| d == dev) && !found.iter().any(|(d, _)| *d == dev) {
            let point = PathBuf::from(OsStr::from_bytes(&unescape_mountinfo(point)));
            found.push((dev, point));
        }
    }
    found.into_iter().map(|(_, p)| p).collect()
}

/// Where the filesystems on `devices` (the loop devices over a file) are mounted (in our
/// mount namespace), one mount point per device.
fn mounts_over(devices: &[LoopDevice]) -> Result<Vec<PathBuf>> {
    let devices: Vec<String> = devices.iter().map(|d| d.dev.clone()).collect();
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    Ok(mount_points(&info, &devices))
}

/// One place where the filesystem on one of `devices` (the loop devices over a file) is
/// mounted, if it is.
pub fn mounted_at(devices: &[LoopDevice]) -> Result<Option<PathBuf>> {
    Ok(mounts_over(devices)?.into_iter().next())
}

/// Sync every filesystem mounted (in our mount namespace) on `devices`, the loop devices
/// over `file`, so what was written to it has reached `file`, with `syncfs` (given a mount
/// point; the live files' `syncfs` runs it in a child: see `crate::fuse::binder`). Nothing
/// to do when none is.
pub fn sync_filesystems_on(
    file: &Path,
    devices: &[LoopDevice],
    syncfs: &dyn Fn(&Path) -> std::io::Result<()>,
) -> Result<()> {
    for point in mounts_over(devices)? {
        match syncfs(&point) {
            Ok(()) => {}
            // Unmounted since mountinfo was read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "syncing the filesystem at {} (on a loop device over {})",
                        point.display(),
                        file.display()
                    ),
                    e,
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_of_the_devices_are_found_once_each_and_unescaped() {
        let info = "\
22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 22 7:3 / /run/c/rootfs rw,relatime - ext4 /dev/loop3 rw
41 22 7:3 / /run/c/other rw,relatime - ext4 /dev/loop3 rw
42 22 7:12 / /tmp/a\\040b rw,relatime - ext4 /dev/loop12 rw
43 22 7:1 / /mnt/x rw,relatime - ext4 /dev/loop1 rw
";
        let devices = ["7:3".to_string(), "7:12".to_string()];
        assert_eq!(
            mount_points(info, &devices),
            [PathBuf::from("/run/c/rootfs"), PathBuf::from("/tmp/a b")]
        );
        assert!(mount_points(info, &["7:9".to_string()]).is_empty());
    }

    #[test]
    fn a_file_no_loop_device_uses_needs_no_sync() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("not-a-backing-file");
        std::fs::write(&f, b"x").unwrap();
        let devices = crate::fuse::loop_devices_of(&f);
        sync_filesystems_on(&f, &devices, &|p| {
            panic!("nothing to sync, yet asked for {}", p.display())
        })
        .unwrap();
    }
}
