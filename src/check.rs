//! `check`: the fsck. Loading the pool verifies the superblocks, every metadata page checksum
//! (the checkpoint's checksum pages, read on demand otherwise, are read here) and the rules every pool obeys (volume/invariants.rs: no pool block referenced twice,
//! counters match the maps, the catalogue's structure is sound); `check` reports what the load
//! found and, with `data`, verifies every data block's checksum.

use crate::error::{Error, Result};
use crate::fault::{Fault, What, Where};
use crate::format::first_data_block;
use crate::layer::Mapping;
use crate::pool::lock::PoolLock;
use crate::pool::{FileStorage, Storage};
use crate::volume::Store;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CheckReport {
    /// Each fault names its location: slot, page, layer, block, byte offset.
    pub faults: Vec<Fault>,
    /// Warnings: damage the state in use does not depend on (a torn superblock slot).
    pub notes: Vec<Fault>,
    pub generation: u64,
    pub layers: usize,
    pub data_blocks: u64,
    /// Data blocks whose checksum was verified (`--data`).
    pub verified_blocks: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.faults.is_empty()
    }
}

/// Check the pool file at `path`, holding its lock: no writer may run meanwhile, since blocks
/// it frees and reuses would look like damage. (A live server checks its own pool with
/// `check` under its commit lock instead.)
pub fn check_pool(
    path: &Path,
    data: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport> {
    let _lock = PoolLock::acquire(path, "thinlayer check")?;
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening pool {}", path.display()), e))?;
    check(Arc::new(FileStorage::new(file)), data, progress)
}

/// Check the pool held by `storage`. `progress(done, total)` is called while verifying data.
pub fn check(
    storage: Arc<dyn Storage>,
    data: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let store = match Store::open_in(storage.clone(), false) {
        Ok(s) => s,
        Err(e @ (Error::Corrupt(_) | Error::InvalidInput(_))) => {
            let what = What::Unloadable {
                reason: e.to_string(),
            };
            r.faults.push(Fault::new(what, Where::default()));
            return Ok(r);
        }
        Err(e) => return Err(e),
    };
    let g = store.read();
    r.generation = g.pool.meta.sb.generation;
    r.layers = g.catalog.len();
    // One bad slot beside a good one is what power loss during a superblock write leaves: a
    // warning. A fallback to an older generation means the newer state is damaged: a fault.
    for n in &g.load_notes {
        if n.is_warning() {
            r.notes.push(n.clone());
        } else {
            r.faults.push(n.clone());
        }
    }
    r.faults.extend(g.load_faults.iter().cloned());
    // The checkpoint's checksum pages are read on demand, not at load: all of them here.
    if let Err(e) = g.pool.meta.sums().verify_all(&*storage) {
        let what = What::ChecksumPage {
            reason: e.to_string(),
        };
        r.faults.push(Fault::new(what, Where::default()));
    }
    r.data_blocks = g.catalog.layers().map(|l| l.map.data_blocks()).sum();
    if !data {
        return Ok(r);
    }
    let bs = g.block_size as u64;
    let file_blocks = storage
        .len()
        .map_err(|e| Error::io("reading pool size", e))?
        .div_ceil(bs);
    let first = first_data_block(g.block_size);
    // Blocks outside the file are faults already; the rest are read in pool order, so the file
    // is read front to back.
    let mut refs = Vec::new();
    for l in g.catalog.layers() {
        for (vb, m) in l.map.iter() {
            if let Mapping::Data { pblock, crc } = m {
                if pblock.0 >= first && pblock.0 < file_blocks {
                    refs.push((pblock, crc, l, vb));
                }
            }
        }
    }
    refs.sort_by_key(|d| d.0);
    let total = refs.len() as u64;
    let mut buf = vec![0u8; bs as usize];
    for (i, (p, crc, l, vb)) in refs.iter().enumerate() {
        storage
            .read_at(&mut buf, p.0 * bs)
            .map_err(|e| Error::io(format!("reading {p}"), e))?;
        let computed = crate::format::checksum::data(&buf);
        // A damaged checksum page was reported above; its blocks cannot be verified.
        let Ok(crc) = g.crc(&*storage, *crc) else {
            continue;
        };
        if computed != crc {
            let what = What::Checksum {
                stored: crc,
                computed,
            };
            let at = Where::layer(l.id, &l.name)
                .block(*vb, g.block_size)
                .pblock(*p);
            r.faults.push(Fault::new(what, at));
        }
        r.verified_blocks += 1;
        if i % 4096 == 0 {
            progress(i as u64, total);
        }
    }
    progress(total, total);
    Ok(r)
}
