//! `thinlayer migrate`: convert a pool of an older format version to the current one, in place
//! (FORMAT.md §11). One step per version passed, `N → N+1`; a format change adds its step to
//! `STEPS` and nothing else here changes.
//!
//! Crash story: nothing is written until the converted state has loaded with the current code;
//! then two superblocks of the current version are written, one per slot, each synced. Power
//! lost before the first leaves the old pool untouched; between the two, the newest slot is
//! current (this version opens by it and heals the other) and the older slot is the old
//! version's (the old binary opens by it: the same state). After both, the converted pool is
//! opened like any other and given a checkpoint, so its maps are written with the current
//! version's records (map runs and map singles, their crcs in checksum pages): an ordinary checkpoint commit,
//! with its own crash story.

use super::store::{load_generation, Store};
use crate::error::{Error, Result};
use crate::format::superblock::{Superblock, MIGRATES_FROM, VERSION};
use crate::pool::lock::PoolLock;
use crate::pool::meta;
use crate::pool::{FileStorage, Storage};
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;

/// One conversion from version `from` to `from + 1`: given the storage and the superblock of
/// the state to convert, it writes what the new version needs (into free space only: the old
/// state must stay intact until the superblocks are written) and returns the superblock that
/// names the converted state.
struct Step {
    from: u32,
    what: &'static str,
    run: fn(&dyn Storage, Superblock) -> Result<Superblock>,
}

const STEPS: &[Step] = &[
    Step {
        from: 2,
        what: "layer records may be mode 3 (remote); a version-2 pool has none, so only the version changes",
        run: |_, sb| Ok(sb),
    },
    Step {
        from: 3,
        what: "maps may hold map runs (one record per contiguous run); a version-3 pool's map records stay valid, so the version changes, then a checkpoint rewrites the maps with runs",
        run: |_, sb| Ok(sb),
    },
    Step {
        from: 4,
        what: "a checkpoint's map runs may keep their crcs in checksum pages; a version-4 pool's records stay valid, so the version changes, then a checkpoint moves the crcs of its runs into checksum pages",
        run: |_, sb| Ok(sb),
    },
    Step {
        from: 5,
        what: "a checkpoint's single data blocks may keep their crcs in checksum pages (map singles); a version-5 pool's records stay valid, so the version changes, then a checkpoint moves the crcs of its single blocks into checksum pages",
        run: |_, sb| Ok(sb),
    },
    Step {
        from: 6,
        what: "a checkpoint writes its maps after every other record, behind a map index saying where each range of them starts, so an open need not read them; a version-6 pool's records stay valid, so the version changes, then a checkpoint writes the index",
        run: |_, sb| Ok(sb),
    },
];

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The version the pool had (the newest loadable slot's).
    pub from: u32,
    pub to: u32,
    /// What each step changed, in order; empty when the pool was already current.
    pub steps: Vec<&'static str>,
}

/// Convert the pool at `path` to the current version, under its lock.
pub fn migrate(path: &Path) -> Result<Migrated> {
    let _lock = PoolLock::acquire(path, "thinlayer migrate")?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening pool {}", path.display()), e))?;
    let storage = Arc::new(FileStorage::new(file));
    migrate_in(storage).map_err(|e| e.context(format!("pool {}", path.display())))
}

/// `migrate` on any storage (the caller holds the pool's lock).
pub fn migrate_in(storage: Arc<dyn Storage>) -> Result<Migrated> {
    let m = convert_slots(&*storage)?;
    if !m.steps.is_empty() {
        // The whole catalogue again, in this version's records. The pool is converted
        // whatever happens here; a pool a writable open refuses (a fault `check` reports) keeps
        // its old records until its next checkpoint.
        Store::open_in(storage, true)
            .and_then(|s| s.checkpoint())
            .map_err(|e| {
                e.context(format!(
                    "converted to format version {VERSION}, but its maps were not rewritten as a checkpoint"
                ))
            })?;
    }
    Ok(m)
}

/// Bring both superblock slots to the current version.
fn convert_slots(storage: &dyn Storage) -> Result<Migrated> {
    let slots = meta::read_superblocks_any(storage)?;
    if slots.is_empty() {
        return Err(Error::Corrupt(format!(
            "no superblock slot of a version this thinlayer converts ({MIGRATES_FROM} to {VERSION}); `thinlayer check` says why"
        )));
    }
    let newest_seen = slots[0].1.generation;
    if slots.iter().all(|(v, _)| *v == VERSION) {
        return Ok(Migrated {
            from: VERSION,
            to: VERSION,
            steps: Vec::new(),
        });
    }
    // As an open chooses (FORMAT.md §3.2): the newest slot whose streams load, converted.
    let mut errors = Vec::new();
    for (version, sb) in slots {
        match convert(storage, version, sb) {
            Ok((sb, steps)) => {
                write_current(storage, sb, newest_seen)?;
                return Ok(Migrated {
                    from: version,
                    to: VERSION,
                    steps,
                });
            }
            Err(e @ Error::Corrupt(_)) => errors.push(format!("version {version} superblock: {e}")),
            Err(e) => return Err(e),
        }
    }
    Err(Error::Corrupt(format!(
        "no superblock leads to readable metadata, nothing converted: {}",
        errors.join("; ")
    )))
}

/// Run the steps from `version` up, then load the result with the current code.
fn convert(
    storage: &dyn Storage,
    version: u32,
    mut sb: Superblock,
) -> Result<(Superblock, Vec<&'static str>)> {
    let mut done = Vec::new();
    for v in version..VERSION {
        let step = STEPS.iter().find(|s| s.from == v).ok_or_else(|| {
            Error::Internal(format!(
                "no conversion from format version {v} to {}",
                v + 1
            ))
        })?;
        sb = (step.run)(storage, sb)?;
        done.push(step.what);
    }
    load_generation(storage, &sb, false)?;
    Ok((sb, done))
}

/// Write `sb` as the current version into both slots, at generations above any seen, each
/// made durable before the next.
fn write_current(storage: &dyn Storage, mut sb: Superblock, newest_seen: u64) -> Result<()> {
    for gen in [newest_seen + 1, newest_seen + 2] {
        sb.generation = gen;
        meta::make_durable(storage, &sb)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::MemStorage;
    use crate::volume::{CreateOptions, Store};
    use std::sync::Arc;

    /// A pool in memory with one layer, its slots then rewritten as `version` wrote them.
    fn pool_of_version(version: u32) -> Arc<MemStorage> {
        let mem = Arc::new(MemStorage::new());
        {
            let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
            s.create_layer("base", None, Some(1 << 20)).unwrap();
            s.commit_layer("base").unwrap();
            s.flush().unwrap();
        }
        let (slots, _) = meta::read_superblocks(&*mem).unwrap();
        for sb in slots {
            let mut b = [0u8; crate::format::PAGE_SIZE];
            b[..sb.encode().len()].copy_from_slice(&sb.encode_as(version));
            let off = crate::format::SUPERBLOCK_OFFSETS[(sb.generation % 2) as usize];
            mem.write_at(&b, off).unwrap();
        }
        mem
    }

    #[test]
    fn an_older_pool_is_refused_by_name_until_migrated() {
        for from in [2, 3, 4] {
            an_older_pool_is_refused_by_name_until_migrated_from(from);
        }
    }

    fn an_older_pool_is_refused_by_name_until_migrated_from(from: u32) {
        let mem = pool_of_version(from);
        let e = Store::open_in(mem.clone(), false).err().unwrap();
        assert_eq!(e.kind(), crate::error::Kind::Conflict);
        assert!(e.to_string().contains("thinlayer migrate"), "{e}");
        let m = migrate_in(mem.clone()).unwrap();
        let steps = (VERSION - from) as usize;
        assert_eq!((m.from, m.to, m.steps.len()), (from, VERSION, steps));
        let s = Store::open_in(mem.clone(), false).unwrap();
        assert!(s.layers().iter().any(|l| l.name == "base"));
        s.verify_consistency().unwrap();
        drop(s);
        // Both slots are current now, and a second run has nothing to do.
        assert!(meta::read_superblocks_any(&*mem)
            .unwrap()
            .iter()
            .all(|(v, _)| *v == VERSION));
        assert_eq!(migrate_in(mem.clone()).unwrap().steps.len(), 0);
    }

    #[test]
    fn a_migrate_cut_off_between_its_two_superblocks_opens_and_finishes() {
        let mem = pool_of_version(2);
        let slots = meta::read_superblocks_any(&*mem).unwrap();
        // Power lost after the first superblock write: one slot current, one old.
        let mut sb = slots[0].1.clone();
        sb.generation += 1;
        meta::make_durable(&*mem, &sb).unwrap();
        let s = Store::open_in(mem.clone(), true).unwrap();
        assert!(s.layers().iter().any(|l| l.name == "base"));
        drop(s);
        let m = migrate_in(mem.clone()).unwrap();
        assert!(m.steps.is_empty(), "the writable open healed the old slot");
        Store::open_in(mem, false)
            .unwrap()
            .verify_consistency()
            .unwrap();
    }
}
