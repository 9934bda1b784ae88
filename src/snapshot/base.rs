//! Formatted empty bases: a snapshot without a parent is a child of an empty ext4 filesystem
//! of its size, made once per size with mkfs and kept as a read-only layer, so a new image
//! chain costs no mkfs. Made for small layers (docs/DESIGN.md §11.1): `inline_data` keeps a
//! file or directory of up to 128 bytes in its inode (no data block, no block bitmap
//! change), and one flex group keeps a small change's bitmaps and inode table in one group. Lazy initialisation is off: mkfs writes the inode tables and journal
//! now (as zeros, which the import does not store), so the kernel's ext4lazyinit thread never
//! writes them into a container's layer later. Where mkfs put the journal is kept on the base
//! (`keys::JOURNAL`) for Commit's trim of the journal's dead log (`ext4`).

use super::{ext4, keys};
use crate::error::{Error, Result};
use crate::live::LivePool;
use crate::log::{self, Level};
use crate::volume::{LayerInfo, Store};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Large and sparse: an empty filesystem of this size costs a few MiB of metadata.
pub const DEFAULT_SIZE: u64 = 10 << 30;
/// Smaller filesystems leave too little room for ext4's own metadata to be worth it.
pub const MIN_SIZE: u64 = 64 << 20;
/// Base sizes are whole MiB, so sizes that differ by a few bytes share a base.
const ROUND: u64 = 1 << 20;

pub struct Bases {
    /// Where mkfs writes its image before the import (beside the pool: same disk, not tmpfs).
    work_dir: PathBuf,
    /// One base is made at a time, so two Prepares of a new size do not both run mkfs.
    making: Mutex<()>,
}

/// The layer name of the base of `size` bytes.
pub fn name(size: u64) -> String {
    format!("containerd/ext4-base/{size}")
}

/// A size a snapshot asked for, rounded up to whole MiB and checked.
pub fn checked_size(asked: u64) -> Result<u64> {
    if asked < MIN_SIZE {
        return Err(Error::InvalidInput(format!(
            "size {asked} is below the smallest base, {MIN_SIZE} bytes"
        )));
    }
    asked
        .checked_next_multiple_of(ROUND)
        .ok_or_else(|| Error::InvalidInput(format!("size {asked} is too large")))
}

impl Bases {
    pub fn new(work_dir: &Path) -> Bases {
        Bases {
            work_dir: work_dir.to_path_buf(),
            making: Mutex::new(()),
        }
    }

    /// The base layer for `size` bytes (from `checked_size`), made now if there is none.
    pub fn get(&self, pool: LivePool<'_>, size: u64) -> Result<String> {
        let store = pool.store();
        let name = name(size);
        let _one = self.making.lock().unwrap_or_else(|p| p.into_inner());
        match store.layer(&name) {
            Ok(l) if !l.writable && !l.importing => return Ok(name),
            Ok(_) => {
                return Err(Error::Conflict(format!(
                "layer {name:?} has the name of a formatted base but is writable or being imported"
            )))
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let image = self
            .work_dir
            .join(format!(".thinlayer-mkfs-{}-{size}.img", std::process::id()));
        let made = self.make(pool, &name, &image, size);
        let _ = std::fs::remove_file(&image);
        made?;
        log::process(
            Level::Info,
            format_args!("thinlayer: made formatted base {name:?} for containerd"),
        );
        Ok(name)
    }

    fn make(&self, pool: LivePool<'_>, name: &str, image: &Path, size: u64) -> Result<()> {
        let ctx = |what: &str| format!("making base {name:?} in {}: {what}", image.display());
        let f = std::fs::File::create(image).map_err(|e| Error::io(ctx("creating"), e))?;
        f.set_len(size).map_err(|e| Error::io(ctx("sizing"), e))?;
        drop(f);
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "inline_data", "-b"])
            .arg(block_size(size).to_string())
            .arg("-G")
            .arg(flex_groups(size).to_string())
            .arg("-E")
            .arg("lazy_itable_init=0,lazy_journal_init=0,nodiscard")
            .arg(image)
            .output()
            .map_err(|e| Error::io(ctx("running mkfs.ext4"), e))?;
        if !out.status.success() {
            return Err(Error::Internal(ctx(&format!(
                "mkfs.ext4 failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))));
        }
        let journal =
            read_journal(image).map_err(|e| Error::io(ctx("reading its superblock"), e))?;
        // The import commits the layer whole or removes it; a crash in between leaves it marked
        // incomplete, and the next open removes it.
        let f = std::fs::File::open(image).map_err(|e| Error::io(ctx("opening"), e))?;
        let label = image.display().to_string();
        pool.import(name, None, &f, &label, &mut |_, _| {})?;
        let journal = journal.map(|j| j.to_attr());
        pool.set_attrs(
            name,
            &[
                (keys::BASE, Some("ext4")),
                (keys::JOURNAL, journal.as_deref()),
            ],
        )
    }
}

/// The filesystem's block size: 4 KiB, or 1 KiB below 512 MiB, as mke2fs.conf's `small` type
/// picks (in a small filesystem of 4 KiB blocks mkfs splits the journal round the one
/// group's flex metadata, and the journal trim wants it in one piece).
fn block_size(size: u64) -> u64 {
    if size < 512 << 20 {
        1024
    } else {
        4096
    }
}

/// Block groups per flex group: all of them, so the filesystem is one flex group. Orlov
/// spreads top-level directories over flex groups (a new one goes to the group with the fewest
/// directories, never the root's), and each group it touches costs a block bitmap, an inode
/// bitmap and an inode table block in a layer; in one flex group a small change stays in the
/// first group's. A group holds 8 blocks per byte of a block (its bitmap): 128 MiB of 4 KiB
/// blocks.
fn flex_groups(size: u64) -> u64 {
    let b = block_size(size);
    size.div_ceil(8 * b * b).next_power_of_two().max(16)
}

/// The journal mkfs made in `image`.
fn read_journal(image: &Path) -> std::io::Result<Option<ext4::Journal>> {
    use std::os::unix::fs::FileExt;
    let (offset, len) = ext4::SUPERBLOCK;
    let mut sb = vec![0u8; len];
    std::fs::File::open(image)?.read_exact_at(&mut sb, offset)?;
    Ok(ext4::journal(&sb))
}

/// The journal of the formatted base under layer `l` (the nearest ancestor that is one), if
/// it was recorded.
pub fn journal_under(store: &Store, l: &LayerInfo) -> Option<ext4::Journal> {
    let mut parent = l.parent.clone();
    while let Some(name) = parent {
        let p = store.layer(&name).ok()?;
        if p.attrs.contains_key(keys::BASE) {
            return ext4::Journal::from_attr(p.attrs.get(keys::JOURNAL)?);
        }
        parent = p.parent;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filesystem_is_one_flex_group() {
        assert_eq!(flex_groups(MIN_SIZE), 16);
        assert_eq!(flex_groups(511 << 20), 64);
        assert_eq!(flex_groups(512 << 20), 16);
        assert_eq!(flex_groups(DEFAULT_SIZE), 128);
        assert_eq!(flex_groups(100 << 30), 1024);
        assert_eq!(flex_groups(128 << 30), 1024);
    }

    #[test]
    fn sizes_round_up_to_mib_and_small_ones_are_refused() {
        assert_eq!(checked_size(DEFAULT_SIZE).unwrap(), DEFAULT_SIZE);
        assert_eq!(checked_size(MIN_SIZE + 1).unwrap(), MIN_SIZE + ROUND);
        assert!(checked_size(MIN_SIZE - 1).is_err());
        assert!(checked_size(u64::MAX).is_err());
    }
}
