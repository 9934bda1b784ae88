//! An in-memory self-check of an open store, for tests: the catalogue's structure, the map
//! counters, and that the allocator's idea of used blocks is exactly what the maps and the
//! metadata streams reference (plus the frees waiting for the open transaction to commit).
//! `check` (the fsck) looks at what is durable; this looks at the live state, so it also
//! catches blocks leaked or double-mapped by the open transaction.

use super::store::Store;
use crate::error::{Error, Result};
use crate::format::{first_data_block, PBlock};
use crate::layer::Mapping;
use std::collections::HashMap;

impl Store {
    /// Verify the live state; `Error::Corrupt` lists every fault found.
    pub fn verify_consistency(&self) -> Result<()> {
        let g = self.read();
        let mut faults: Vec<String> = g.load_faults.clone();
        let bs = g.block_size as u64;
        let first = first_data_block(g.block_size);
        // Who references each pool block.
        let mut refs: HashMap<PBlock, String> = HashMap::new();
        let mut claim = |b: PBlock, who: String, faults: &mut Vec<String>| {
            if b.0 < first {
                faults.push(format!("{who}: pool block {} is in the superblock area", b.0));
            }
            if let Some(prev) = refs.insert(b, who.clone()) {
                faults.push(format!("pool block {} is used by {prev} and by {who}", b.0));
            }
        };
        for &b in &g.pool.meta.ckpt_blocks {
            claim(b, "the checkpoint".into(), &mut faults);
        }
        for &b in &g.pool.meta.log_blocks {
            claim(b, "the log".into(), &mut faults);
        }
        for l in g.catalog.layers() {
            let (mut data, mut zero) = (0, 0);
            for (vb, m) in l.map.iter() {
                if vb.0.saturating_mul(bs) >= l.disk_size {
                    faults.push(format!("{}: {vb} mapped past its end", l.describe()));
                }
                match m {
                    Mapping::Data { pblock, .. } => {
                        data += 1;
                        claim(pblock, format!("{} {vb}", l.describe()), &mut faults);
                    }
                    Mapping::Zero => zero += 1,
                }
            }
            if (data, zero) != (l.map.data_blocks(), l.map.zero_blocks()) {
                faults.push(format!(
                    "{}: counters say {} data and {} zero blocks, the map holds {data} and {zero}",
                    l.describe(),
                    l.map.data_blocks(),
                    l.map.zero_blocks()
                ));
            }
            if let Some(p) = l.parent {
                match g.catalog.get(p) {
                    None => faults.push(format!("{}: parent {p} is missing", l.describe())),
                    Some(p) => {
                        if !p.children.contains(&l.id) {
                            faults.push(format!(
                                "{} does not list child {}",
                                p.describe(),
                                l.describe()
                            ));
                        }
                        if p.writable {
                            faults.push(format!("{} has a writable parent", l.describe()));
                        }
                        if p.disk_size > l.disk_size {
                            faults.push(format!("{} is smaller than its parent", l.describe()));
                        }
                    }
                }
            }
            for c in &l.children {
                if g.catalog.get(*c).and_then(|c| c.parent) != Some(l.id) {
                    faults.push(format!(
                        "{} lists {c} as a child, which it is not",
                        l.describe()
                    ));
                }
            }
            if l.id >= g.catalog.next_id() {
                faults.push(format!(
                    "{} is not below the next id {}",
                    l.describe(),
                    g.catalog.next_id()
                ));
            }
        }
        for b in g.pool.alloc.pending_frees() {
            claim(b, "a free waiting for commit".into(), &mut faults);
        }
        let mut used = 0u64;
        for b in g.pool.alloc.used_blocks() {
            used += 1;
            if !refs.contains_key(&b) {
                faults.push(format!(
                    "pool block {} is allocated but nothing references it (leaked)",
                    b.0
                ));
            }
        }
        for (&b, who) in &refs {
            if !g.pool.alloc.is_used(b) {
                faults.push(format!(
                    "pool block {}, used by {who}, is free in the allocator",
                    b.0
                ));
            }
        }
        for b in g.pool.alloc.fresh_blocks() {
            if !g.pool.alloc.is_used(b) {
                faults.push(format!("pool block {} is fresh but free", b.0));
            }
        }
        if used != g.pool.alloc.used_count() {
            faults.push(format!(
                "allocator counts {} used blocks, its bitmap has {used}",
                g.pool.alloc.used_count()
            ));
        }
        if faults.is_empty() {
            Ok(())
        } else {
            Err(Error::Corrupt(format!(
                "{} consistency fault(s): {}",
                faults.len(),
                faults.join("; ")
            )))
        }
    }

    /// Blocks the allocator counts as used (data, metadata, and frees awaiting commit).
    pub fn used_blocks(&self) -> u64 {
        self.read().pool.alloc.used_count()
    }
}
