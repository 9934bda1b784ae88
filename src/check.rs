//! `check`: the fsck. Verifies the superblocks, every metadata page checksum (by loading the
//! streams), that no pool block is referenced twice, that counters match the maps, that the
//! catalogue's structure is sound, and with `data` every data block's checksum.

use crate::error::{Error, Result};
use crate::format::{first_data_block, PBlock};
use crate::layer::Mapping;
use crate::pool::{meta, Storage};
use crate::volume::Store;
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct CheckReport {
    /// Each fault names its location: slot, page, layer, block, byte offset.
    pub faults: Vec<String>,
    pub notes: Vec<String>,
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

/// Check the pool held by `storage`. `progress(done, total)` is called while verifying data.
pub fn check(
    storage: Arc<dyn Storage>,
    data: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let (good_slots, bad_slots) = meta::read_superblocks(&*storage)?;
    // One bad slot beside a good one is what power loss during a superblock write leaves; the
    // good slot is used and the next writable open rewrites the bad one. Damage and a torn
    // write look alike here, so it is a warning; a state that fails to load is a fault below.
    for e in &bad_slots {
        let m = format!("{e} (torn by a crash during a commit, or damaged); the other slot is in use and the next writable open rewrites this one");
        if good_slots.is_empty() {
            r.faults.push(m);
        } else {
            r.notes.push(m);
        }
    }
    let store = match Store::open_in(storage.clone(), false) {
        Ok(s) => s,
        Err(e @ (Error::Corrupt(_) | Error::Invalid(_))) => {
            r.faults.push(e.to_string());
            return Ok(r);
        }
        Err(e) => return Err(e),
    };
    let g = store.read();
    r.generation = g.meta.sb.generation;
    r.layers = g.catalog.len();
    // A fallback to an older slot means the newer state is damaged.
    r.faults.extend(
        g.load_notes
            .iter()
            .filter(|n| n.starts_with("using superblock"))
            .cloned(),
    );
    r.faults.extend(g.load_faults.iter().cloned());
    let bs = g.block_size as u64;
    let file_blocks = storage
        .len()
        .map_err(|e| Error::io("reading pool size", e))?
        .div_ceil(bs);
    let first = first_data_block(g.block_size);
    let mut data_refs: Vec<(PBlock, u32, crate::format::LayerId, u64)> = Vec::new();
    for l in g.catalog.layers() {
        if let Some(p) = l.parent.and_then(|p| g.catalog.get(p)) {
            if p.writable {
                r.faults.push(format!(
                    "{} has a writable parent {}",
                    l.describe(),
                    p.describe()
                ));
            }
            if l.disk_size < p.disk_size {
                r.faults.push(format!(
                    "{} is smaller than its parent {}",
                    l.describe(),
                    p.describe()
                ));
            }
        }
        let blocks = l.disk_size.div_ceil(bs);
        for (vb, m) in l.map.iter() {
            if vb.0 >= blocks {
                r.faults.push(format!(
                    "{}: {vb} is mapped past the layer's end ({} bytes)",
                    l.describe(),
                    l.disk_size
                ));
            }
            if let Mapping::Data { pblock, crc } = m {
                r.data_blocks += 1;
                if pblock.0 >= file_blocks || pblock.0 < first {
                    r.faults.push(format!(
                        "{}: {vb} (byte offset {}) maps {pblock}, outside the pool file",
                        l.describe(),
                        vb.0.saturating_mul(bs)
                    ));
                } else if data {
                    data_refs.push((pblock, crc, l.id, vb.0));
                }
            }
        }
    }
    if data {
        // In pool order, so the file is read front to back.
        data_refs.sort_by_key(|d| d.0);
        let total = data_refs.len() as u64;
        let mut buf = vec![0u8; bs as usize];
        for (i, (p, crc, id, vb)) in data_refs.iter().enumerate() {
            storage
                .read_at(&mut buf, p.0 * bs)
                .map_err(|e| Error::io(format!("reading {p}"), e))?;
            let actual = crate::format::checksum::data(&buf);
            if actual != *crc {
                let who = g.catalog.get(*id).map_or(String::new(), |l| l.describe());
                r.faults.push(format!(
                    "{who}: data block {vb} (byte offset {}) at {p} fails its checksum (stored {crc:#010x}, computed {actual:#010x})",
                    vb.saturating_mul(bs)
                ));
            }
            r.verified_blocks += 1;
            if i % 4096 == 0 {
                progress(i as u64, total);
            }
        }
        progress(total, total);
    }
    Ok(r)
}
