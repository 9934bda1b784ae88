//! The ranges of a checkpoint's maps not loaded yet (DESIGN.md §12, item 3b): an open of a
//! version-7 pool reads the records before the maps and the map index (FORMAT.md §6.3.4), not
//! the maps; this says which ranges of which layer are still on disk only, which ones a
//! request touching some blocks needs, and when a layer's map (and then every map) is whole,
//! so its counters can be compared. Reading a range's records is the pool's
//! (`pool::meta::range_records`); applying them is the catalogue's (`Catalog::apply_checkpoint`,
//! the one home of replay). The store ties them together under its lock.

use super::map::CHUNK_BITS;
use super::Catalog;
use crate::error::{Error, Result};
use crate::format::record::{IndexEntry, Record};
use crate::format::superblock::StreamRef;
use crate::format::{LayerId, PBlock, VBlock};
use crate::pool::{meta, Storage, SumPages};
use std::collections::HashMap;
use std::sync::Arc;

/// What a layer's loaded ranges added to its map, and how many of its ranges are left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    pub ranges_left: usize,
    pub data: u64,
    pub zero: u64,
}

/// A range just loaded into a layer's map: which, where, and what it added to the map's
/// counters (what the store audits and claims as it loads it, `invariants::claim_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    pub layer: LayerId,
    /// The chunks it holds, first and last (a range never cuts a chunk): every entry of
    /// the layer's map in them came from it, since whatever changes a range's blocks loads
    /// it first.
    pub chunks: (u64, u64),
    pub data: u64,
    pub zero: u64,
}

/// The checkpoint the ranges are read from, and which of them are loaded.
pub struct Unloaded {
    /// The checkpoint stream the index points into; it stays the pool's until the next
    /// checkpoint, which waits for the load to complete.
    pub checkpoint: StreamRef,
    /// Shared with the readers of ranges (`RangeReader`), which read without the store's lock.
    index: Arc<[IndexEntry]>,
    loaded: Vec<bool>,
    left: usize,
    /// Where the background load goes on from: every range before it is loaded.
    cursor: usize,
    layers: HashMap<LayerId, Counted>,
    /// Ranges whose pages or records were found damaged: what failed, named again to every
    /// request that needs them (the load cannot fall back to an older superblock any more).
    failed: HashMap<usize, String>,
    /// The checkpoint's blocks met so far (its head's at open, each range's as it loads):
    /// all of them once the load is complete, which the allocator and the next checkpoint
    /// (which frees them) need.
    pub blocks: Vec<PBlock>,
    /// The pool file's blocks at open: a range naming a data block at or past it names one
    /// outside the file (the store's audit of each range, as an eager open's).
    pub file_blocks: u64,
    pages_per_block: u64,
}

impl Unloaded {
    pub fn new(checkpoint: StreamRef, index: Vec<IndexEntry>, pages_per_block: u64) -> Self {
        let mut layers: HashMap<LayerId, Counted> = HashMap::new();
        for e in &index {
            layers.entry(e.layer).or_default().ranges_left += 1;
        }
        Unloaded {
            checkpoint,
            loaded: vec![false; index.len()],
            left: index.len(),
            cursor: 0,
            index: index.into(),
            layers,
            failed: HashMap::new(),
            blocks: Vec::new(),
            file_blocks: u64::MAX,
            pages_per_block,
        }
    }

    /// Load ranges `ranges` into `catalog`'s maps, each read (`RangeReader::read`) and
    /// applied (`apply`) in turn. `on_applied` is called after each range is in the map
    /// (those before a failed one too).
    pub fn load(
        &mut self,
        catalog: &mut Catalog,
        storage: &dyn Storage,
        sums: &SumPages,
        ranges: &[usize],
        on_applied: &mut dyn FnMut(&Catalog, Applied),
    ) -> Result<()> {
        let reader = self.reader();
        for &i in ranges {
            if self.failed.contains_key(&i) || self.loaded[i] {
                self.apply(catalog, storage, sums, Decoded::nothing(i), on_applied)?;
                continue;
            }
            let decoded = reader.read(storage, i);
            self.apply(catalog, storage, sums, decoded, on_applied)?;
        }
        Ok(())
    }

    /// What reads ranges without the store's lock (the checkpoint's pages do not change
    /// until the load completes: the next checkpoint waits for it).
    pub fn reader(&self) -> RangeReader {
        RangeReader {
            checkpoint: self.checkpoint,
            index: self.index.clone(),
            pages_per_block: self.pages_per_block,
        }
    }

    /// Apply range `decoded.range`, read before (perhaps without the store's lock), into
    /// `catalog`'s maps as a whole open applies it (`Catalog::apply_checkpoint`), unless it
    /// was loaded meanwhile (by a block path, or the background load): a range is applied
    /// once. A layer whose last range this is has its stored counters compared with what
    /// its ranges added. A range of a layer the log removed is skipped. Damage (in the
    /// pages, the records, or found applying them) fails the range for good, named to every
    /// request that needs it.
    pub fn apply(
        &mut self,
        catalog: &mut Catalog,
        storage: &dyn Storage,
        sums: &SumPages,
        decoded: Decoded,
        on_applied: &mut dyn FnMut(&Catalog, Applied),
    ) -> Result<()> {
        let i = decoded.range;
        if let Some(why) = self.failed.get(&i) {
            return Err(Error::Corrupt(why.clone()));
        }
        if self.loaded[i] {
            return Ok(());
        }
        let layer = self.index[i].layer;
        let Some(before) = catalog.get(layer).map(|l| counts(&l.map)) else {
            self.skip(i);
            return Ok(());
        };
        let capacity = sums.capacity();
        let mut resolve = |at: u64, n: usize| sums.crcs(storage, at, n);
        let applied = decoded.records.and_then(|(records, blocks)| {
            for rec in records {
                catalog.apply_checkpoint(rec, capacity, &mut resolve)?;
            }
            Ok(blocks)
        });
        match applied {
            Ok(blocks) => self.blocks.extend(blocks),
            Err(e) => {
                let e = e.context(format!(
                    "loading the maps of layer {layer} from block {} (checkpoint page {}, seq {})",
                    self.index[i].vblock.0, self.index[i].page, self.index[i].seq
                ));
                self.failed.insert(i, e.to_string());
                return Err(e);
            }
        }
        let after = catalog.get(layer).map_or(before, |l| counts(&l.map));
        let (data, zero) = (after.0 - before.0, after.1 - before.1);
        if let Some((layer, c)) = self.loaded(i, data, zero) {
            catalog.compare_stored(layer, (c.data, c.zero));
        }
        let chunks = self.chunks(i);
        on_applied(
            catalog,
            Applied {
                layer,
                chunks,
                data,
                zero,
            },
        );
        Ok(())
    }

    /// The chunks range `i` holds, first and last: from its first block's to the one before
    /// the next range of its layer, or to the layer's end.
    pub fn chunks(&self, i: usize) -> (u64, u64) {
        let e = &self.index[i];
        let last = match self.index.get(i + 1) {
            Some(n) if n.layer == e.layer => (n.vblock.0 >> CHUNK_BITS).saturating_sub(1),
            _ => u64::MAX >> CHUNK_BITS,
        };
        (e.vblock.0 >> CHUNK_BITS, last)
    }

    /// Whether a range failed to load.
    pub fn has_failed(&self) -> bool {
        !self.failed.is_empty()
    }

    pub fn index(&self) -> &[IndexEntry] {
        &self.index
    }

    /// Whether range `i` failed to load, or is loaded: nothing left to read for it.
    pub fn is_settled(&self, i: usize) -> bool {
        self.loaded[i] || self.failed.contains_key(&i)
    }

    /// Whether every range is loaded.
    pub fn is_complete(&self) -> bool {
        self.left == 0
    }

    /// Ranges not loaded yet.
    pub fn left(&self) -> usize {
        self.left
    }

    /// Data blocks `layer`'s ranges not loaded yet hold: what the checkpoint stored for its
    /// map (`stored`: its counters), less what its loaded ranges added (nothing else changes
    /// a range before it is loaded).
    pub fn data_not_loaded(&self, layer: LayerId, stored: Option<(u64, u64)>) -> u64 {
        match (self.layers.get(&layer), stored) {
            (Some(c), Some((data, _))) if c.ranges_left > 0 => data.saturating_sub(c.data),
            _ => 0,
        }
    }

    /// Whether `layer` still has ranges on disk only.
    pub fn has_unloaded(&self, layer: LayerId) -> bool {
        self.layers.get(&layer).is_some_and(|c| c.ranges_left > 0)
    }

    /// The ranges of `layer` holding any of blocks `v0..=v1` that are not loaded, ascending.
    pub fn touching(&self, layer: LayerId, v0: u64, v1: u64) -> Vec<usize> {
        if !self.has_unloaded(layer) || v0 > v1 {
            return Vec::new();
        }
        // The range holding v0: the last entry of the layer starting at or before it (or the
        // layer's first, which starts past it).
        let after = self
            .index
            .partition_point(|e| (e.layer, e.vblock) <= (layer, VBlock(v0)));
        let first_of_layer = self.index.partition_point(|e| e.layer < layer);
        let from = after.saturating_sub(1).max(first_of_layer);
        (from..self.index.len())
            .take_while(|&i| self.index[i].layer == layer && self.index[i].vblock.0 <= v1)
            .filter(|&i| !self.loaded[i])
            .collect()
    }

    /// The next range the background load should read, if any is left (a failed range is
    /// passed: it stays failed).
    pub fn next_to_load(&mut self) -> Option<usize> {
        while self.cursor < self.loaded.len() && self.is_settled(self.cursor) {
            self.cursor += 1;
        }
        (self.cursor < self.loaded.len()).then_some(self.cursor)
    }

    pub fn is_loaded(&self, i: usize) -> bool {
        self.loaded[i]
    }

    /// Range `i` is in the map now, having added `data` and `zero` blocks to it. Returns the
    /// layer's totals when this was its last range (its counters can be compared).
    pub fn loaded(&mut self, i: usize, data: u64, zero: u64) -> Option<(LayerId, Counted)> {
        debug_assert!(!self.loaded[i]);
        self.loaded[i] = true;
        self.left -= 1;
        let layer = self.index[i].layer;
        let c = self.layers.get_mut(&layer).expect("a layer of the index");
        c.ranges_left -= 1;
        c.data += data;
        c.zero += zero;
        (c.ranges_left == 0).then_some((layer, *c))
    }

    /// Range `i` belongs to a layer that no longer exists (removed by the log): nothing to load.
    pub fn skip(&mut self, i: usize) {
        if !self.loaded[i] {
            self.loaded[i] = true;
            self.left -= 1;
            if let Some(c) = self.layers.get_mut(&self.index[i].layer) {
                c.ranges_left -= 1;
            }
        }
    }
}

/// Reads a range's records from the checkpoint (`meta::range_records`, every page verified),
/// each checked to lie in the range (`pool::index::in_range`): the disk reads and decoding
/// of a load, done without the store's lock so that block paths do not wait behind them.
pub struct RangeReader {
    checkpoint: StreamRef,
    index: Arc<[IndexEntry]>,
    pages_per_block: u64,
}

impl RangeReader {
    pub fn read(&self, storage: &dyn Storage, i: usize) -> Decoded {
        let records = (|| {
            let (ckpt, ppb) = (&self.checkpoint, self.pages_per_block);
            let mut r = meta::range_records(storage, ckpt, ppb, &self.index, i)?;
            let mut records = Vec::new();
            loop {
                let at = r.position();
                let Some(rec) = r.next_record()? else {
                    break;
                };
                crate::pool::index::in_range(&self.index, i, at, &rec)?;
                records.push(rec);
            }
            Ok((records, r.take_blocks()))
        })();
        Decoded { range: i, records }
    }
}

/// Range `range`'s records and the checkpoint blocks their pages lie in, or what was found
/// damaged reading them (`RangeReader::read`), to apply under the store's lock
/// (`Unloaded::apply`).
pub struct Decoded {
    range: usize,
    records: Result<(Vec<Record>, Vec<PBlock>)>,
}

impl Decoded {
    /// Nothing read: for a range `apply` passes (loaded or failed already).
    fn nothing(range: usize) -> Self {
        let records = Ok((Vec::new(), Vec::new()));
        Decoded { range, records }
    }

    pub fn range(&self) -> usize {
        self.range
    }
}

fn counts(m: &super::BlockMap) -> (u64, u64) {
    (m.data_blocks(), m.zero_blocks())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(layer: u32, vblock: u64, i: u64) -> IndexEntry {
        IndexEntry {
            layer: LayerId(layer),
            vblock: VBlock(vblock),
            page: 10 + i,
            seq: i as u32,
            offset: 0,
        }
    }

    fn unloaded() -> Unloaded {
        let index = vec![
            entry(1, 0, 0),
            entry(1, 4096, 1),
            entry(1, 8192, 2),
            entry(3, 1024, 3),
        ];
        Unloaded::new(StreamRef::default(), index, 1)
    }

    #[test]
    fn a_request_needs_the_ranges_holding_its_blocks() {
        let mut u = unloaded();
        let l1 = LayerId(1);
        assert_eq!(u.touching(l1, 0, 0), [0]);
        assert_eq!(u.touching(l1, 4095, 4096), [0, 1]);
        assert_eq!(u.touching(l1, 5000, 1 << 40), [1, 2]);
        assert_eq!(u.touching(l1, 9000, 9000), [2]);
        // Layer 3's first range starts at 1024: blocks below it are in no range.
        assert_eq!(u.touching(LayerId(3), 0, 10), Vec::<usize>::new());
        assert_eq!(u.touching(LayerId(3), 0, 2000), [3]);
        assert_eq!(u.touching(LayerId(2), 0, u64::MAX), Vec::<usize>::new());
        assert_eq!(u.loaded(1, 5, 1), None);
        assert_eq!(u.touching(l1, 0, 1 << 40), [0, 2]);
        assert_eq!(u.next_to_load(), Some(0));
        assert_eq!(u.loaded(0, 2, 0), None);
        assert_eq!(u.next_to_load(), Some(2));
        let done = u.loaded(2, 1, 1).unwrap();
        assert_eq!(done.0, l1);
        assert_eq!((done.1.data, done.1.zero), (8, 2));
        assert!(!u.has_unloaded(l1));
        assert!(!u.is_complete());
        u.skip(3);
        assert!(u.is_complete());
        assert_eq!(u.next_to_load(), None);
    }
}
