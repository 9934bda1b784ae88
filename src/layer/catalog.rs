//! The catalogue: every layer with its name, parent, mode and block map. It is rebuilt by
//! replaying records (checkpoint, then log) and serialises itself back into a checkpoint.

use super::chain::{self, ChainCache, Resolver};
use super::map::{BlockMap, Mapping, PagedRun, PagedSingle};
use super::node::Layer;
use crate::error::{Error, Result};
use crate::fault::{Fault, What, Where};
use crate::format::record::{attr_problem, LayerCreate, MapEntry, MapTarget, Record, RecordWriter};
use crate::format::{LayerId, PBlock, VBlock};
use crate::pool::sums::PagedSingles;
use std::collections::{BTreeMap, HashMap};

/// Map entries a log replay sorts at a time (`Catalog::replay_log`): 40 MiB of them with their
/// places, whose sort is cheaper than the cache misses of applying them in write order. Above
/// glibc's largest mmap threshold (32 MiB), so the buffer is a mapping of its own, returned
/// whole when freed, and does not raise the threshold for the allocations after it.
const LOG_BATCH: usize = 5 << 18;

/// Map records a range of a checkpoint's map index holds at least (FORMAT.md §6.3.4): 16
/// pages, read in one request when the range is loaded on demand; at 100M scattered blocks
/// the index is ~0.04 % of the checkpoint.
pub const INDEX_RANGE_BYTES: usize = 64 << 10;

/// A change made now, as opposed to a record replayed from disk.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    Create(&'a LayerCreate),
    Commit(LayerId),
    Remove(LayerId),
    /// Set (`Some`) or drop (`None`) one attribute of a layer.
    Attr {
        layer: LayerId,
        key: &'a str,
        value: Option<&'a str>,
    },
    Rename {
        layer: LayerId,
        name: &'a str,
    },
    /// Set (`Some`) or drop (`None`) one entry of a writable layer's own map.
    Map {
        layer: LayerId,
        vblock: VBlock,
        to: Option<Mapping>,
    },
}

#[derive(Default)]
pub struct Catalog {
    layers: BTreeMap<LayerId, Layer>,
    by_name: HashMap<String, LayerId>,
    next_id: u32,
    /// Damage found while replaying that does not stop the load (counters that disagree with
    /// the map they count); `check` reports it and a writable open refuses it.
    pub faults: Vec<Fault>,
    /// Merged chunks of read-only chains, so reads do not walk the chain (see `chain.rs`).
    cache: ChainCache,
    /// Live layers of mode remote: while there are none, reads need not look for them.
    remote: usize,
    /// The counters records of the checkpoint being loaded (version 7 writes them before the
    /// maps), compared with the maps once they are whole (`compare_counters`).
    expected: BTreeMap<LayerId, (u64, u64)>,
}

impl Catalog {
    pub fn new() -> Self {
        Catalog {
            next_id: 1,
            ..Default::default()
        }
    }

    pub fn layers(&self) -> impl Iterator<Item = &Layer> {
        self.layers.values()
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    pub fn get(&self, id: LayerId) -> Option<&Layer> {
        self.layers.get(&id)
    }

    pub fn by_name(&self, name: &str) -> Result<&Layer> {
        self.by_name
            .get(name)
            .and_then(|id| self.layers.get(id))
            .ok_or_else(|| Error::NotFound(format!("no layer named {name:?}")))
    }

    pub fn next_id(&self) -> LayerId {
        LayerId(self.next_id)
    }

    /// The chain from `top` down to its base.
    pub fn chain(&self, top: LayerId) -> Vec<&Layer> {
        chain::chain(&self.layers, top)
    }

    /// What the chain topped by `top` reads, through the merged-chunk cache.
    pub fn resolver(&self, top: LayerId) -> Resolver<'_> {
        Resolver::new(&self.layers, &self.cache, top)
    }

    /// Whether any live layer is remote (FORMAT.md §6.1, mode 3).
    pub fn has_remote(&self) -> bool {
        self.remote > 0
    }

    /// The remote layer that block `vb` of the chain topped by `top` would read from, if it is
    /// not local yet: walking down, the first remote layer that does not map `vb` where
    /// `listed(layer, vb)` says its blob has data for it. None: the chain reads `vb` from the
    /// maps as usual (a remote layer's unlisted blocks read through to its parent).
    pub fn remote_gap(
        &self,
        top: LayerId,
        vb: VBlock,
        listed: impl Fn(LayerId, VBlock) -> bool,
    ) -> Option<LayerId> {
        let mut at = Some(top);
        while let Some(l) = at.and_then(|id| self.layers.get(&id)) {
            if l.map.get(vb).is_some() {
                return None;
            }
            if l.remote && listed(l.id, vb) {
                return Some(l.id);
            }
            at = l.parent;
        }
        None
    }

    /// Entries held by the merged-chunk cache.
    pub fn cached_entries(&self) -> usize {
        self.cache.entries()
    }

    /// Make a change: apply it and append its record to `log` (the open transaction) in one
    /// step, so the catalogue in memory and the records that will rebuild it cannot drift apart.
    /// Pool blocks the change stops referencing are passed to `freed`. Nothing is logged if the
    /// change is refused.
    pub fn change(
        &mut self,
        log: &mut RecordWriter,
        c: Change<'_>,
        mut freed: impl FnMut(PBlock),
    ) -> Result<()> {
        match c {
            Change::Create(lc) => {
                self.apply(Record::LayerCreate(lc.clone()))?;
                log.layer_create(lc);
            }
            Change::Commit(id) => {
                self.apply(Record::LayerCommit(id))?;
                log.layer_commit(id);
            }
            Change::Attr { layer, key, value } => {
                if let Some(p) = attr_problem(key, value) {
                    return Err(Error::InvalidInput(p));
                }
                self.apply(Record::LayerAttr {
                    layer,
                    key: key.to_string(),
                    value: value.map(str::to_string),
                })?;
                log.layer_attr(layer, key, value);
            }
            Change::Rename { layer, name } => {
                self.apply(Record::LayerRename {
                    layer,
                    name: name.to_string(),
                })?;
                log.layer_rename(layer, name);
            }
            Change::Remove(id) => {
                let blocks: Vec<PBlock> = match self.layers.get(&id) {
                    Some(l) => l.map.iter().filter_map(|(_, m)| m.pblock()).collect(),
                    None => Vec::new(),
                };
                self.apply(Record::LayerRemove(id))?;
                log.layer_remove(id);
                blocks.into_iter().for_each(freed);
            }
            Change::Map { layer, vblock, to } => {
                // The hot path of every write: one map update, no record built and replayed.
                let l = self.must(layer)?;
                debug_assert!(
                    l.writable || l.remote,
                    "only writable layers change their maps, and remote ones fill theirs"
                );
                if !l.writable {
                    // A remote layer gains a fetched block: no merged chunk may outlive it.
                    self.cache.clear();
                }
                let l = self.must(layer)?;
                let old = match to {
                    Some(m) => l.map.set(vblock, m),
                    None => l.map.remove(vblock),
                };
                // A change maps a block just written (or copied with its crc read): known.
                let target =
                    Mapping::target(to, |r| r.known().expect("a changed block's crc is known"));
                log.map(layer, MapEntry { vblock, target });
                let kept = to.and_then(|m| m.pblock());
                if let Some(p) = old.and_then(|m| m.pblock()).filter(|&p| Some(p) != kept) {
                    freed(p);
                }
            }
        }
        Ok(())
    }

    /// Apply one record (replay, or through `change`). Validates references, so damaged
    /// metadata is reported rather than half-applied into an impossible catalogue.
    pub fn apply(&mut self, rec: Record) -> Result<()> {
        match rec {
            Record::LayerCreate(c) => {
                if self.layers.contains_key(&c.id) {
                    return Err(Error::Corrupt(format!("layer {} created twice", c.id)));
                }
                if self.by_name.contains_key(&c.name) {
                    return Err(Error::Corrupt(format!(
                        "two layers named {:?} (second is {})",
                        c.name, c.id
                    )));
                }
                if let Some(p) = c.parent {
                    let parent = self.layers.get_mut(&p).ok_or_else(|| {
                        Error::Corrupt(format!("layer {} has missing parent {p}", c.id))
                    })?;
                    parent.children.push(c.id);
                }
                self.next_id = self.next_id.max(c.id.0 + 1);
                self.remote += c.remote as usize;
                self.by_name.insert(c.name.clone(), c.id);
                self.layers.insert(
                    c.id,
                    Layer {
                        id: c.id,
                        name: c.name,
                        parent: c.parent,
                        disk_size: c.disk_size,
                        created_secs: c.created_secs,
                        created_nanos: c.created_nanos,
                        writable: c.writable,
                        incomplete: c.incomplete,
                        remote: c.remote,
                        map: BlockMap::new(),
                        attrs: Default::default(),
                        children: Vec::new(),
                    },
                );
            }
            Record::LayerCommit(id) => {
                let l = self.must(id)?;
                let was_remote = std::mem::replace(&mut l.remote, false);
                l.writable = false;
                l.incomplete = false;
                self.remote -= was_remote as usize;
            }
            Record::LayerRemove(id) => {
                let l = self.must(id)?;
                if !l.children.is_empty() {
                    return Err(Error::Corrupt(format!(
                        "layer {id} removed while it has children"
                    )));
                }
                let l = self.layers.remove(&id).unwrap();
                self.remote -= l.remote as usize;
                self.cache.forget(id);
                self.by_name.remove(&l.name);
                if let Some(p) = l.parent.and_then(|p| self.layers.get_mut(&p)) {
                    p.children.retain(|&c| c != id);
                }
            }
            Record::LayerAttr { layer, key, value } => {
                let l = self.must(layer)?;
                match value {
                    Some(v) => l.attrs.insert(key, v),
                    None => l.attrs.remove(&key),
                };
            }
            Record::LayerRename { layer, name } => {
                if let Some(&other) = self.by_name.get(&name) {
                    if other != layer {
                        return Err(Error::Corrupt(format!(
                            "layer {layer} renamed to {name:?}, the name of layer {other}"
                        )));
                    }
                }
                let l = self.must(layer)?;
                let old = std::mem::replace(&mut l.name, name.clone());
                self.by_name.remove(&old);
                self.by_name.insert(name, layer);
            }
            Record::Map { layer, entries } => self.apply_map(layer, entries.iter())?,
            Record::MapRun { layer, run } => {
                if !self.must(layer)?.writable {
                    self.cache.clear();
                }
                let l = self.must(layer)?;
                // The decoder checked the run's blocks against the sentinels; the map holds 48
                // bits, so its last block must fit as every data entry's must.
                let n = run.crcs.len() as u64;
                let last = PBlock(run.pblock.0 + n - 1);
                if last.0 > super::map::MAX_PBLOCK {
                    return Err(Error::Corrupt(format!(
                        "layer {layer}: {} maps to impossible {last}",
                        VBlock(run.vblock.0 + n - 1)
                    )));
                }
                l.map.set_run(run.vblock, run.pblock, &run.crcs);
            }
            // The loader reads the checksum pages and resolves the runs that name them
            // (`Record::resolve`) before applying; met here, they stand where they cannot.
            Record::ChecksumPages(_)
            | Record::MapRunSums { .. }
            | Record::MapSinglesSums { .. } => {
                return Err(Error::Corrupt(
                    "a checksum record (FORMAT.md §6.3.2, §6.3.3) in the log, or in a checkpoint past its checksum pages".into(),
                ))
            }
            Record::MapIndex(_) => {
                return Err(Error::Corrupt(
                    "a map index record (FORMAT.md §6.3.4) in the log, or in a checkpoint past its checksum pages and index".into(),
                ))
            }
            Record::LayerCounters {
                layer,
                data_blocks,
                zero_blocks,
            } => {
                let l = self.must(layer)?;
                let actual = (l.map.data_blocks(), l.map.zero_blocks());
                self.compare(layer, (data_blocks, zero_blocks), actual);
            }
        }
        Ok(())
    }

    /// A fault if the counters a checkpoint stored for `layer` are not what its map holds.
    fn compare(&mut self, layer: LayerId, stored: (u64, u64), actual: (u64, u64)) {
        let Some(l) = self.layers.get(&layer) else {
            return;
        };
        if let Some(what) = What::counters(stored, actual) {
            let at = Where::layer(l.id, &l.name);
            self.faults.push(Fault::new(what, at));
        }
    }

    /// Layer `layer`'s map is whole from the checkpoint, whose ranges added `counted` (data,
    /// zero) blocks to it: compare them with the counters record the checkpoint held for it
    /// (a lazily loaded map, which the log may have changed since its ranges loaded).
    pub fn compare_stored(&mut self, layer: LayerId, counted: (u64, u64)) {
        if let Some(stored) = self.expected.remove(&layer) {
            self.compare(layer, stored, counted);
        }
    }

    /// The counters (data, zero blocks) the checkpoint stored for `layer`, while its map is
    /// not whole yet (a lazily loaded one's ranges left).
    pub fn stored_counters(&self, layer: LayerId) -> Option<(u64, u64)> {
        self.expected.get(&layer).copied()
    }

    /// Layers whose counters record is not compared yet.
    pub fn uncompared(&self) -> Vec<LayerId> {
        self.expected.keys().copied().collect()
    }

    /// The checkpoint's maps are whole: compare the counters records it held with them (a
    /// version-7 checkpoint writes them before the maps, FORMAT.md §6.4).
    pub fn compare_counters(&mut self) {
        for (layer, stored) in std::mem::take(&mut self.expected) {
            let actual = match self.layers.get(&layer) {
                Some(l) => (l.map.data_blocks(), l.map.zero_blocks()),
                None => continue,
            };
            self.compare(layer, stored, actual);
        }
    }

    /// Apply map entries of `layer` in order (a map record, or a sorted batch of them).
    fn apply_map<'e>(
        &mut self,
        layer: LayerId,
        entries: impl Iterator<Item = &'e MapEntry> + Clone,
    ) -> Result<()> {
        if !self.must(layer)?.writable {
            // Only replay changes a committed layer; no merged chunk may outlive it.
            self.cache.clear();
        }
        let l = self.must(layer)?;
        for e in entries.clone() {
            if let MapTarget::Data { pblock, .. } = e.target {
                if pblock.0 > super::map::MAX_PBLOCK {
                    return Err(Error::Corrupt(format!(
                        "layer {layer}: {} maps to impossible {pblock}",
                        e.vblock
                    )));
                }
            }
        }
        l.map.put_all(entries.map(|e| {
            let to = match e.target {
                MapTarget::Unmapped => None,
                MapTarget::Zero => Some(Mapping::Zero),
                MapTarget::Data { pblock, crc } => Some(Mapping::data(pblock, crc)),
            };
            (e.vblock, to)
        }));
        Ok(())
    }

    /// Replay a log's records: `apply` on each in turn, except that consecutive map records of
    /// one layer, up to `LOG_BATCH` entries, are applied sorted by block, each block's entries
    /// in their order (the sort's key ends with the entry's place in the batch), so the map
    /// ends as it would have; nothing else can see the order within the batch. A log holds
    /// writes in the order they came, which for scattered writes hits a different chunk (a
    /// cache miss, an insert inside its vector) each time; sorted, a chunk's entries arrive
    /// together (`BlockMap::put_all`). A checkpoint needs none of this: it is written chunk by
    /// chunk, blocks in order. The batch is one buffer, allocated once and sorted in place: a
    /// batch grown by doubling and a stable sort's scratch, freed and allocated again batch
    /// after batch, left 35 MB of a 10M-block replay in the server's heap (3.6 bytes per block).
    pub fn replay_log(&mut self, mut next: impl FnMut() -> Result<Option<Record>>) -> Result<()> {
        let mut batch: Vec<(MapEntry, u32)> = Vec::new();
        let mut of: Option<LayerId> = None;
        let flush = |c: &mut Catalog, batch: &mut Vec<(MapEntry, u32)>, of: Option<LayerId>| {
            let Some(layer) = of else {
                return Ok(());
            };
            batch.sort_unstable_by_key(|(e, seq)| (e.vblock, *seq));
            let r = c.apply_map(layer, batch.iter().map(|(e, _)| e));
            batch.clear();
            r
        };
        while let Some(rec) = next()? {
            match rec {
                Record::Map { layer, entries } => {
                    if of != Some(layer) || batch.len() + entries.len() > LOG_BATCH {
                        flush(self, &mut batch, of)?;
                        of = Some(layer);
                    }
                    if batch.capacity() == 0 {
                        batch.reserve_exact(LOG_BATCH.max(entries.len()));
                    }
                    let at = batch.len() as u32;
                    batch.extend(entries.into_iter().zip(at..));
                }
                rec => {
                    flush(self, &mut batch, of.take())?;
                    self.apply(rec)?;
                }
            }
        }
        flush(self, &mut batch, of)
    }

    /// Apply one record of a checkpoint: as `apply`, but a map run or map singles naming
    /// their crcs in the checkpoint's checksum stream (`capacity` positions) keep those
    /// positions in the map instead of the crcs (`BlockMap::set_run_paged`,
    /// `BlockMap::set_singles_paged`); `resolve(position, n)` reads crcs for what cannot be
    /// paged.
    pub fn apply_checkpoint(
        &mut self,
        rec: Record,
        capacity: u64,
        resolve: &mut dyn FnMut(u64, usize) -> Result<Vec<u32>>,
    ) -> Result<()> {
        let (layer, run) = match PagedRun::of(rec) {
            Ok(r) => r,
            Err(Record::MapSinglesSums {
                layer,
                sums_at,
                entries,
            }) => return self.apply_singles(layer, sums_at, &entries, capacity, resolve),
            Err(Record::LayerCounters {
                layer,
                data_blocks,
                zero_blocks,
            }) => {
                self.must(layer)?;
                self.expected.insert(layer, (data_blocks, zero_blocks));
                return Ok(());
            }
            Err(rec) => return self.apply(rec),
        };
        let (vblock, pblock, sums_at) = (VBlock(run.vblock), PBlock(run.pblock), run.sums_at);
        let n = run.count as u64;
        if sums_at.saturating_add(n) > capacity {
            return Err(Error::Corrupt(format!(
                "checkpoint: map run of layer {layer} at virtual block {} names crcs {sums_at}..{} of a checksum stream of at most {capacity}",
                vblock.0,
                sums_at.saturating_add(n)
            )));
        }
        let last = PBlock(pblock.0 + n - 1);
        if last.0 > super::map::MAX_PBLOCK {
            return Err(Error::Corrupt(format!(
                "layer {layer}: {} maps to impossible {last}",
                VBlock(vblock.0 + n - 1)
            )));
        }
        let l = self.must(layer)?;
        l.map.set_run_paged(vblock, pblock, n, sums_at, resolve)
    }

    /// A checkpoint's map singles record (FORMAT.md §6.3.3): the decoder checked the
    /// entries' order and sentinels; here their pool blocks and crc positions are checked
    /// against the map's and the stream's bounds.
    fn apply_singles(
        &mut self,
        layer: LayerId,
        sums_at: u64,
        entries: &[(VBlock, PBlock)],
        capacity: u64,
        resolve: &mut dyn FnMut(u64, usize) -> Result<Vec<u32>>,
    ) -> Result<()> {
        let end = sums_at.saturating_add(entries.len() as u64);
        if end > capacity {
            return Err(Error::Corrupt(format!(
                "checkpoint: map singles of layer {layer} from virtual block {} name crcs {sums_at}..{end} of a checksum stream of at most {capacity}",
                entries[0].0 .0
            )));
        }
        if let Some(&(v, p)) = entries.iter().find(|e| e.1 .0 > super::map::MAX_PBLOCK) {
            return Err(Error::Corrupt(format!(
                "layer {layer}: {v} maps to impossible {p}"
            )));
        }
        if !self.must(layer)?.writable {
            self.cache.clear();
        }
        let l = self.must(layer)?;
        l.map.set_singles_paged(entries, sums_at, resolve)
    }

    /// The checkpoint whose paged runs are `runs` (sorted by layer and block) and paged
    /// singles `singles` (its map singles records, sorted by layer and position) is the
    /// pool's now: every map keeps their positions in its checksum stream instead of crcs
    /// (`BlockMap::rebase`); `resolve` reads the old stream's crcs for what is not paged any
    /// more. The merged chunks name old positions: dropped.
    pub fn rebase(
        &mut self,
        runs: &[(LayerId, PagedRun)],
        singles: &[PagedSingles],
        resolve: &mut dyn FnMut(u64, usize) -> Result<Vec<u32>>,
    ) -> Result<()> {
        self.cache.clear();
        for l in self.layers.values_mut() {
            let from = runs.partition_point(|r| r.0 < l.id);
            let to = runs.partition_point(|r| r.0 <= l.id);
            let mine: Vec<PagedRun> = runs[from..to].iter().map(|r| r.1).collect();
            let from = singles.partition_point(|r| r.layer < l.id);
            let to = singles.partition_point(|r| r.layer <= l.id);
            let my_singles: Vec<PagedSingle> = singles[from..to]
                .iter()
                .flat_map(|r| {
                    r.entries
                        .iter()
                        .zip(r.sums_at..)
                        .map(|(e, at)| PagedSingle {
                            vblock: e.0 .0,
                            pblock: e.1 .0,
                            sums_at: at,
                        })
                })
                .collect();
            l.map.rebase(&mine, &my_singles, resolve)?;
        }
        Ok(())
    }

    fn must(&mut self, id: LayerId) -> Result<&mut Layer> {
        self.layers
            .get_mut(&id)
            .ok_or_else(|| Error::Corrupt(format!("record names unknown layer {id}")))
    }

    /// Write the whole catalogue as checkpoint records (FORMAT.md §6.7): first every layer
    /// without its map (creates in id order, attributes, counters: parents have smaller ids
    /// than their children, so id order replays parents first), then each layer's map chunk
    /// by chunk in block order, a range of the map index starting (`RecordWriter::range_start`)
    /// at the first chunk of a layer and at the first chunk after each `INDEX_RANGE_BYTES` of
    /// records, so a range never cuts a chunk. A paged crc is read through `crc` (the current
    /// checkpoint's checksum stream, which the new one copies before it is freed).
    pub fn encode_checkpoint(
        &self,
        w: &mut RecordWriter,
        crc: &mut dyn FnMut(u64) -> Result<u32>,
    ) -> Result<()> {
        const _: () = assert!(crate::format::record::INDEX_ALIGN_BITS == super::map::CHUNK_BITS);
        for l in self.layers.values() {
            w.layer_create(&LayerCreate {
                id: l.id,
                parent: l.parent,
                disk_size: l.disk_size,
                created_secs: l.created_secs,
                created_nanos: l.created_nanos,
                writable: l.writable,
                incomplete: l.incomplete,
                remote: l.remote,
                name: l.name.clone(),
            });
            for (k, v) in &l.attrs {
                w.layer_attr(l.id, k, Some(v));
            }
            w.layer_counters(l.id, l.map.data_blocks(), l.map.zero_blocks());
        }
        for l in self.layers.values() {
            let mut since: Option<usize> = None;
            for c in l.map.chunks_in(0, u64::MAX >> super::map::CHUNK_BITS) {
                if since.is_none_or(|at| w.len_with_held() - at >= INDEX_RANGE_BYTES) {
                    w.range_start(l.id, VBlock(c << super::map::CHUNK_BITS));
                    since = Some(w.buf.len());
                }
                self.encode_chunk(l, c, w, crc)?;
            }
        }
        w.cut();
        Ok(())
    }

    /// Chunk `c` of layer `l`'s map as checkpoint records.
    fn encode_chunk(
        &self,
        l: &Layer,
        c: u64,
        w: &mut RecordWriter,
        crc: &mut dyn FnMut(u64) -> Result<u32>,
    ) -> Result<()> {
        {
            for (vblock, m) in l.map.chunk_entries(c) {
                let mut failed = None;
                let target = Mapping::target(Some(m), |r| match r {
                    super::map::CrcRef::Known(c) => c,
                    super::map::CrcRef::Paged(at) => crc(at).unwrap_or_else(|e| {
                        failed = Some(e);
                        0
                    }),
                });
                if let Some(e) = failed {
                    return Err(e.context(format!(
                        "writing a checkpoint: layer {}, {vblock}",
                        l.describe()
                    )));
                }
                w.map(l.id, MapEntry { vblock, target });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The record creating writable layer `id` (named `l<id>`, 1 GiB) over `parent`.
    pub(crate) fn create(id: u32, parent: Option<u32>) -> Record {
        Record::LayerCreate(LayerCreate {
            id: LayerId(id),
            parent: parent.map(LayerId),
            disk_size: 1 << 30,
            created_secs: 0,
            created_nanos: 0,
            writable: true,
            incomplete: false,
            remote: false,
            name: format!("l{id}"),
        })
    }

    /// A log's map record: many entries over few blocks, so a batch names blocks many times
    /// over, in any order; or an attribute record, which ends a batch.
    fn record() -> impl Strategy<Value = Record> {
        let target = prop_oneof![
            1 => Just(MapTarget::Unmapped),
            1 => Just(MapTarget::Zero),
            4 => (0u64..200, any::<u32>()).prop_map(|(p, crc)| MapTarget::Data {
                pblock: PBlock(100 + p),
                crc
            }),
        ];
        let entry = (0u64..80, target).prop_map(|(vb, target)| MapEntry {
            vblock: VBlock(vb * 13 % 2100),
            target,
        });
        prop_oneof![
            6 => (1u32..3, proptest::collection::vec(entry, 1..200))
                .prop_map(|(l, entries)| Record::Map { layer: LayerId(l), entries }),
            1 => (1u32..3).prop_map(|l| Record::LayerAttr {
                layer: LayerId(l),
                key: "k".into(),
                value: Some("v".into()),
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Replaying a log in sorted batches ends with the maps (and counters) that applying
        /// its records one by one in order gives, whatever blocks the records name again.
        #[test]
        fn replay_log_ends_as_applying_in_order(
            records in proptest::collection::vec(record(), 1..30)
        ) {
            let layers = [create(1, None), create(2, None)];
            let all: Vec<Record> = layers.into_iter().chain(records).collect();
            let mut in_order = Catalog::new();
            for r in all.clone() {
                in_order.apply(r).unwrap();
            }
            let mut batched = Catalog::new();
            let mut it = all.into_iter();
            batched.replay_log(|| Ok(it.next())).unwrap();
            for id in [LayerId(1), LayerId(2)] {
                let (a, b) = (&in_order.get(id).unwrap().map, &batched.get(id).unwrap().map);
                prop_assert_eq!(a.range(0, u64::MAX), b.range(0, u64::MAX));
                prop_assert_eq!(
                    (a.data_blocks(), a.zero_blocks()),
                    (b.data_blocks(), b.zero_blocks())
                );
            }
        }
    }
}
