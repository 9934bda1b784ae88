//! Reading through a chain: the one home of chain resolution. Every read, copy-on-write check,
//! block-status query and export asks a `Resolver` what the chain reads for a block range.
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
//! A chain whose read-only part is one layer (an image with no parent) needs no merging: its
//! own map answers, and caching would only copy it.
//!
//! Memory is bounded by `MAX_ENTRIES` (16 bytes each, 32 MiB); past it, arbitrary chunks are
//! dropped and rebuilt when read again. Invalidation: a removed layer's chunks are dropped (only
//! that layer's own key can name it, since it has no children), and any change to a committed
//! layer's map — which only replay does, before anything is read — clears everything.

use super::map::{split, ChunkHasher, CrcRef, Mapping, Slot, CHUNK_BITS, CHUNK_LEN};
use super::node::Layer;
use crate::format::{LayerId, PBlock, VBlock};
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::{Arc, RwLock};

/// What a chain reads for one block. A paged crc is resolved by the reader, through the
/// pool's checksum page cache (`Inner::crc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    Data {
        pblock: PBlock,
        crc: CrcRef,
        owner: LayerId,
    },
    /// A whiteout in some layer of the chain.
    Zero,
    /// Mapped nowhere.
    Hole,
}

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
    /// Merge chunk `c` of `chain` (top-most first, all read-only). None: a paged crc's
    /// position does not fit a slot (a checkpoint of over 2^32 blocks); the chunk is walked.
    fn build(chain: &[&Layer], c: u64) -> Option<MergedChunk> {
        let mut seen: Vec<Option<Entry>> = vec![None; CHUNK_LEN as usize];
        for l in chain {
            for (vb, m) in l.map.chunk_entries(c) {
                let key = (vb.0 & (CHUNK_LEN - 1)) as u16;
                if seen[key as usize].is_none() {
                    seen[key as usize] = Some(Entry {
                        slot: Slot::new(key, m)?,
                        owner: l.id.0,
                    });
                }
            }
        }
        Some(MergedChunk(seen.into_iter().flatten().collect()))
    }

    pub fn get(&self, key: u16) -> Resolved {
        match self.0.binary_search_by_key(&key, |e| e.slot.key()) {
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
    /// that chain (top-most first) when the chunk has to be built. None: it cannot be merged
    /// (`MergedChunk::build`).
    pub fn chunk<'a>(
        &self,
        base: LayerId,
        c: u64,
        chain: impl FnOnce() -> Vec<&'a Layer>,
    ) -> Option<Arc<MergedChunk>> {
        if let Some(m) = self.read().map.get(&(base, c)) {
            return Some(m.clone());
        }
        let chain = chain();
        debug_assert!(chain.iter().all(|l| !l.writable));
        let merged = Arc::new(MergedChunk::build(&chain, c)?);
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
        Some(merged)
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

    /// Drop everything (a committed layer's map changed: replay only; or a checkpoint moved
    /// the paged crcs the entries name).
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

/// A chain seen from its top layer, ready to answer what it reads. Only the top layer can be
/// writable (a writable layer has no children), so it is looked at directly; everything below
/// comes from the merged-chunk cache: one lookup per block whatever the depth.
pub struct Resolver<'a> {
    layers: &'a BTreeMap<LayerId, Layer>,
    cache: &'a ChainCache,
    top: LayerId,
    /// The top layer when it is writable (looked at block by block).
    own: Option<&'a Layer>,
    /// The first read-only layer of the chain, whose merged chunks answer the rest.
    base: Option<LayerId>,
    /// That layer when it is the last of the chain: its own map answers as fast as a merged
    /// chunk would, and the cache would only copy it (16 bytes a block, against an extent
    /// map's ~4 for an imported image).
    alone: Option<&'a Layer>,
}

impl<'a> Resolver<'a> {
    pub fn new(layers: &'a BTreeMap<LayerId, Layer>, cache: &'a ChainCache, top: LayerId) -> Self {
        let (own, base) = match layers.get(&top) {
            None => (None, None),
            Some(t) if t.writable => (Some(t), t.parent),
            Some(_) => (None, Some(top)),
        };
        let alone = base
            .and_then(|b| layers.get(&b))
            .filter(|l| l.parent.is_none());
        Resolver {
            layers,
            cache,
            top,
            own,
            base,
            alone,
        }
    }

    /// The chain from the top down to its base.
    pub fn layers(&self) -> Vec<&'a Layer> {
        chain(self.layers, self.top)
    }

    /// What blocks `vb0..vb0 + n` read, appended to `out`.
    pub fn range(&self, vb0: u64, n: u64, out: &mut Vec<Resolved>) {
        let mut cur: Option<(u64, Option<Arc<MergedChunk>>)> = None;
        for vb in vb0..vb0 + n {
            let r = match (self.own.and_then(|l| l.map.get(VBlock(vb))), self.base) {
                (Some(Mapping::Data { pblock, crc }), _) => Resolved::Data {
                    pblock,
                    crc,
                    owner: self.top,
                },
                (Some(Mapping::Zero), _) => Resolved::Zero,
                (None, None) => Resolved::Hole,
                (None, Some(b)) if self.alone.is_some() => {
                    match self.alone.and_then(|l| l.map.get(VBlock(vb))) {
                        Some(Mapping::Data { pblock, crc }) => Resolved::Data {
                            pblock,
                            crc,
                            owner: b,
                        },
                        Some(Mapping::Zero) => Resolved::Zero,
                        None => Resolved::Hole,
                    }
                }
                (None, Some(b)) => {
                    let (c, key) = split(VBlock(vb));
                    if cur.as_ref().is_none_or(|(cc, _)| *cc != c) {
                        let chunk = self.cache.chunk(b, c, || chain(self.layers, b));
                        cur = Some((c, chunk));
                    }
                    match &cur.as_ref().unwrap().1 {
                        Some(chunk) => chunk.get(key),
                        None => walk(&chain(self.layers, b), VBlock(vb)),
                    }
                }
            };
            debug_assert_eq!(r, walk(&self.layers(), VBlock(vb)));
            out.push(r);
        }
    }

    /// What one block reads.
    pub fn block(&self, vb: VBlock) -> Resolved {
        let mut out = Vec::with_capacity(1);
        self.range(vb.0, 1, &mut out);
        out[0]
    }

    /// Walk blocks `start..end`, calling `f(first_block, count, what)` for each run. Only the
    /// chunks some layer of the chain maps are looked at (`mapped_chunks`); the space between
    /// them is passed as holes without counting chunk by chunk, so block status over a mostly
    /// empty petabyte costs what the layers hold, not what they could hold.
    pub fn runs(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64, Resolved)) {
        if start >= end {
            return;
        }
        let chain = self.layers();
        let mut buf = Vec::with_capacity(CHUNK_LEN as usize);
        let mut vb = start;
        for c in mapped_chunks(&chain, start >> CHUNK_BITS, (end - 1) >> CHUNK_BITS) {
            let (from, to) = (
                (c << CHUNK_BITS).max(start),
                ((c + 1) << CHUNK_BITS).min(end),
            );
            if vb < from {
                f(vb, from - vb, Resolved::Hole);
            }
            buf.clear();
            self.range(from, to - from, &mut buf);
            for (i, r) in buf.iter().enumerate() {
                f(from + i as u64, 1, *r);
            }
            vb = to;
        }
        if vb < end {
            f(vb, end - vb, Resolved::Hole);
        }
    }
}

/// The chunks among `c0..=c1` that any layer of `chain` maps a block in, ascending, each once.
pub fn mapped_chunks(chain: &[&Layer], c0: u64, c1: u64) -> Vec<u64> {
    let mut cs: Vec<u64> = chain.iter().flat_map(|l| l.map.chunks_in(c0, c1)).collect();
    cs.sort_unstable();
    cs.dedup();
    cs
}

/// The chain from `top` down to its base.
pub fn chain(layers: &BTreeMap<LayerId, Layer>, top: LayerId) -> Vec<&Layer> {
    let mut out = Vec::new();
    let mut cur = layers.get(&top);
    while let Some(l) = cur {
        out.push(l);
        cur = l.parent.and_then(|p| layers.get(&p));
    }
    out
}

/// What `chain` (top-most first) reads for `vb`, found by walking it: the definition the cache
/// must agree with (checked under debug assertions and by the tests).
pub fn walk(chain: &[&Layer], vb: VBlock) -> Resolved {
    for l in chain {
        match l.map.get(vb) {
            Some(Mapping::Data { pblock, crc }) => {
                return Resolved::Data {
                    pblock,
                    crc,
                    owner: l.id,
                }
            }
            Some(Mapping::Zero) => return Resolved::Zero,
            None => {}
        }
    }
    Resolved::Hole
}

#[cfg(test)]
mod tests {
    use crate::format::record::{MapEntry, MapTarget, Record};
    use crate::format::{LayerId, PBlock, VBlock};
    use crate::layer::Catalog;

    fn create(c: &mut Catalog, id: u32, parent: Option<u32>) {
        c.apply(crate::layer::catalog::tests::create(id, parent))
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
                c.resolver(LayerId(top)).range(0, blocks, &mut got);
                let chain = c.chain(LayerId(top));
                for (b, r) in got.iter().enumerate() {
                    assert_eq!(*r, super::walk(&chain, VBlock(b as u64)), "block {b}");
                }
                // Runs cover the range exactly and agree block by block.
                let mut next = 0;
                c.resolver(LayerId(top)).runs(0, blocks, |vb, n, r| {
                    assert_eq!(vb, next);
                    for b in vb..vb + n {
                        assert_eq!(r, super::walk(&chain, VBlock(b)), "run block {b}");
                    }
                    next = vb + n;
                });
                assert_eq!(next, blocks);
            }
        }
        assert!(c.cached_entries() > 0);
    }

    #[test]
    fn entry_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<super::Entry>(), 16);
    }

    /// Removing a committed layer drops its merged chunks: a layer created later with the same
    /// id (possible after reopening) must not read the old layer's blocks. (A chain of one
    /// layer is read from its map, not cached, so the layer has a parent here.)
    #[test]
    fn removed_layer_leaves_nothing_cached() {
        let mut c = Catalog::new();
        create(&mut c, 1, None);
        c.apply(Record::LayerCommit(LayerId(1))).unwrap();
        create(&mut c, 2, Some(1));
        let d = MapTarget::Data {
            pblock: PBlock(50),
            crc: 1,
        };
        map(&mut c, 2, vec![(3, d)]);
        c.apply(Record::LayerCommit(LayerId(2))).unwrap();
        assert!(matches!(
            c.resolver(LayerId(2)).block(VBlock(3)),
            super::Resolved::Data { .. }
        ));
        assert!(c.cached_entries() > 0);
        c.apply(Record::LayerRemove(LayerId(2))).unwrap();
        assert_eq!(c.cached_entries(), 0);
        create(&mut c, 2, Some(1));
        c.apply(Record::LayerCommit(LayerId(2))).unwrap();
        assert_eq!(
            c.resolver(LayerId(2)).block(VBlock(3)),
            super::Resolved::Hole
        );
    }

    /// A read-only layer with no parent answers from its own map: reading it caches nothing
    /// (the cache would copy an extent map at 16 bytes a block).
    #[test]
    fn a_chain_of_one_layer_is_not_cached() {
        let mut c = Catalog::new();
        create(&mut c, 1, None);
        let d = |b: u64| MapTarget::Data {
            pblock: PBlock(50 + b),
            crc: b as u32,
        };
        map(&mut c, 1, (0..3000).map(|b| (b, d(b))).collect());
        c.apply(Record::LayerCommit(LayerId(1))).unwrap();
        let mut got = Vec::new();
        c.resolver(LayerId(1)).range(0, 3000, &mut got);
        assert_eq!(got[2999], super::walk(&c.chain(LayerId(1)), VBlock(2999)));
        assert_eq!(c.cached_entries(), 0);
    }
}
