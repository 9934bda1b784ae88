//! Reading through a chain without walking it: a cache of merged chunks of read-only chains.
//!
//! A read looks for each block in the top layer, then its parent, and so on: with 64 layers
//! that is up to 64 map lookups per block. But a committed layer never changes, and neither does
//! anything below it (a parent is committed before it can have a child), so what the chain
//! starting at a committed layer reads for a chunk of 1024 blocks is fixed for as long as that
//! layer exists. We merge such a chunk once — one pass over the chunk's entries in each layer,
//! the top-most entry winning — and keep it keyed by (first committed layer, chunk). A read then
//! looks in its writable layers (usually just the top one) and does one cache lookup, whatever
//! the depth.
//!
//! Memory is bounded by `MAX_ENTRIES` (16 bytes each, 32 MiB); past it, arbitrary chunks are
//! dropped and rebuilt when read again. Invalidation: a removed layer's chunks are dropped (only
//! that layer's own key can name it, since it has no children), and any change to a committed
//! layer's map — which only replay does, before anything is read — clears everything.

use super::catalog::Resolved;
use super::map::{ChunkHasher, Mapping, Slot, CHUNK_BITS, CHUNK_LEN};
use super::Layer;
use crate::format::LayerId;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::{Arc, RwLock};

/// Cap on cached entries over all chunks.
const MAX_ENTRIES: usize = 1 << 21;

/// One block of a merged chunk: the map's slot and the layer that holds it, 16 bytes.
#[derive(Clone, Copy, Debug)]
struct Entry {
    slot: Slot,
    owner: u32,
}

impl Entry {
    fn resolved(&self) -> Resolved {
        match self.slot.mapping() {
            Mapping::Data { pblock, crc } => Resolved::Data {
                pblock,
                crc,
                owner: LayerId(self.owner),
            },
            Mapping::Zero => Resolved::Zero,
        }
    }
}

/// What a read-only chain reads for one chunk: its mapped blocks, sorted by key.
pub struct MergedChunk(Box<[Entry]>);

impl MergedChunk {
    /// Merge chunk `c` of `chain` (top-most first, all read-only).
    fn build(chain: &[&Layer], c: u64) -> MergedChunk {
        let mut seen: Vec<Option<Entry>> = vec![None; CHUNK_LEN as usize];
        for l in chain {
            for (vb, m) in l.map.chunk_entries(c) {
                let key = (vb.0 & (CHUNK_LEN - 1)) as u16;
                seen[key as usize].get_or_insert(Entry {
                    slot: Slot::new(key, m),
                    owner: l.id.0,
                });
            }
        }
        MergedChunk(seen.into_iter().flatten().collect())
    }

    pub fn get(&self, key: u16) -> Resolved {
        match self.0.binary_search_by_key(&key, |e| e.slot.key) {
            Ok(i) => self.0[i].resolved(),
            Err(_) => Resolved::Hole,
        }
    }
}

#[derive(Default)]
struct Chunks {
    map: HashMap<(LayerId, u64), Arc<MergedChunk>, BuildHasherDefault<ChunkHasher>>,
    entries: usize,
}

/// The cache. Shared by concurrent readers (they hold the store's read lock), so it locks
/// inside; a lookup that hits takes only the read side.
#[derive(Default)]
pub struct ChainCache {
    chunks: RwLock<Chunks>,
}

impl ChainCache {
    /// The merged chunk `c` of the chain starting at the read-only layer `base`; `chain` gives
    /// that chain (top-most first) when the chunk has to be built.
    pub fn chunk<'a>(
        &self,
        base: LayerId,
        c: u64,
        chain: impl FnOnce() -> Vec<&'a Layer>,
    ) -> Arc<MergedChunk> {
        if let Some(m) = self.read().map.get(&(base, c)) {
            return m.clone();
        }
        let chain = chain();
        debug_assert!(chain.iter().all(|l| !l.writable));
        let merged = Arc::new(MergedChunk::build(&chain, c));
        let mut g = self.chunks.write().unwrap_or_else(|p| p.into_inner());
        if g.entries + merged.0.len() > MAX_ENTRIES {
            // Drop arbitrary chunks (hash order) down to 3/4 of the cap.
            let mut drop = Vec::new();
            let mut left = g.entries;
            for (k, v) in &g.map {
                if left + merged.0.len() <= MAX_ENTRIES * 3 / 4 {
                    break;
                }
                left -= v.0.len();
                drop.push(*k);
            }
            for k in drop {
                g.map.remove(&k);
            }
            g.entries = left;
        }
        g.entries += merged.0.len();
        if let Some(old) = g.map.insert((base, c), merged.clone()) {
            g.entries -= old.0.len();
        }
        merged
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Chunks> {
        self.chunks.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Drop the chunks of the chain starting at `id` (the layer is being removed).
    pub fn forget(&self, id: LayerId) {
        let mut g = self.chunks.write().unwrap_or_else(|p| p.into_inner());
        if g.map.is_empty() {
            return;
        }
        let mut freed = 0;
        g.map.retain(|k, v| {
            let keep = k.0 != id;
            if !keep {
                freed += v.0.len();
            }
            keep
        });
        g.entries -= freed;
    }

    /// Drop everything (a committed layer's map changed: replay only).
    pub fn clear(&self) {
        let mut g = self.chunks.write().unwrap_or_else(|p| p.into_inner());
        if !g.map.is_empty() {
            *g = Chunks::default();
        }
    }

    /// Entries held (for tests and the memory benchmark).
    pub fn entries(&self) -> usize {
        self.read().entries
    }
}

/// Split a virtual block number into (chunk, key within the chunk).
pub fn split(vb: u64) -> (u64, u16) {
    (vb >> CHUNK_BITS, (vb & (CHUNK_LEN - 1)) as u16)
}

#[cfg(test)]
mod tests {
    use crate::format::record::{LayerCreate, MapEntry, MapTarget, Record};
    use crate::format::{LayerId, PBlock, VBlock};
    use crate::layer::Catalog;

    fn create(c: &mut Catalog, id: u32, parent: Option<u32>) {
        c.apply(Record::LayerCreate(LayerCreate {
            id: LayerId(id),
            parent: parent.map(LayerId),
            disk_size: 1 << 30,
            created_secs: 0,
            created_nanos: 0,
            writable: true,
            name: format!("l{id}"),
        }))
        .unwrap();
    }

    fn map(c: &mut Catalog, id: u32, entries: Vec<(u64, MapTarget)>) {
        let entries = entries
            .into_iter()
            .map(|(vb, target)| MapEntry {
                vblock: VBlock(vb),
                target,
            })
            .collect();
        c.apply(Record::Map {
            layer: LayerId(id),
            entries,
        })
        .unwrap();
    }

    /// Every block of a deep chain with data, whiteouts and holes in every layer reads the same
    /// through the cache as by walking the chain, before and after the cache is warm.
    #[test]
    fn cached_resolve_matches_walking_the_chain() {
        let mut c = Catalog::new();
        let depth = 12u32;
        let blocks = 3 * 1024 + 17;
        for id in 1..=depth {
            create(&mut c, id, (id > 1).then(|| id - 1));
            let entries = (0..blocks)
                .filter(|b| (b * 7 + id as u64 * 13).is_multiple_of(5))
                .map(|b| {
                    let t = if (b + id as u64).is_multiple_of(4) {
                        MapTarget::Zero
                    } else {
                        MapTarget::Data {
                            pblock: PBlock(id as u64 * 100_000 + b),
                            crc: b as u32 ^ id,
                        }
                    };
                    (b, t)
                })
                .collect();
            map(&mut c, id, entries);
            if id < depth {
                c.apply(Record::LayerCommit(LayerId(id))).unwrap();
            }
        }
        for top in [depth, depth - 1, 1] {
            for _pass in 0..2 {
                let mut got = Vec::new();
                c.resolve_range(LayerId(top), 0, blocks, &mut got);
                let chain = c.chain(LayerId(top));
                for (b, r) in got.iter().enumerate() {
                    assert_eq!(
                        *r,
                        Catalog::resolve_in(&chain, VBlock(b as u64)),
                        "block {b}"
                    );
                }
            }
        }
        assert!(c.cached_entries() > 0);
    }

    #[test]
    fn entry_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<super::Entry>(), 16);
    }

    /// Removing a committed layer drops its merged chunks: a layer created later with the same
    /// id (possible after reopening) must not read the old layer's blocks.
    #[test]
    fn removed_layer_leaves_nothing_cached() {
        let mut c = Catalog::new();
        create(&mut c, 1, None);
        let d = MapTarget::Data {
            pblock: PBlock(50),
            crc: 1,
        };
        map(&mut c, 1, vec![(3, d)]);
        c.apply(Record::LayerCommit(LayerId(1))).unwrap();
        assert!(matches!(
            c.resolve(LayerId(1), VBlock(3)),
            crate::layer::catalog::Resolved::Data { .. }
        ));
        c.apply(Record::LayerRemove(LayerId(1))).unwrap();
        assert_eq!(c.cached_entries(), 0);
        create(&mut c, 1, None);
        c.apply(Record::LayerCommit(LayerId(1))).unwrap();
        assert_eq!(
            c.resolve(LayerId(1), VBlock(3)),
            crate::layer::catalog::Resolved::Hole
        );
    }
}
