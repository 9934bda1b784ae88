//! The checkpoint's map index (FORMAT.md §6.3.4), checked against the records it points
//! into: every entry starts a record; the records before the first entry are not map records,
//! those after are; and each range holds only map records of its layer naming blocks from its
//! first block up to the next range of the same layer. An open that reads the whole
//! checkpoint checks this as it replays (`Walk`), and one that loads a range on demand checks
//! that range's records the same way, so a damaged index is never taken for a map.

use crate::error::{Error, Result};
use crate::format::record::{IndexEntry, Record};

/// The first block past range `i`: the next range's first block if it is of the same layer.
pub fn range_end(index: &[IndexEntry], i: usize) -> u64 {
    match index.get(i + 1) {
        Some(n) if n.layer == index[i].layer => n.vblock.0,
        _ => u64::MAX,
    }
}

/// Whether `rec`, a record of range `i`, lies in it: a map record of its layer naming blocks
/// in its span. Damage names the range.
pub fn in_range(index: &[IndexEntry], i: usize, at: u64, rec: &Record) -> Result<()> {
    let e = index[i];
    let end = range_end(index, i);
    match rec.map_span() {
        Some((layer, lo, hi)) if layer == e.layer && lo >= e.vblock.0 && hi < end => Ok(()),
        _ => Err(Error::Corrupt(format!(
            "checkpoint, byte {at}: a record that is not a map record of layer {} within blocks {}..{end} lies in that range of the map index (page {}, seq {}, offset {})",
            e.layer, e.vblock.0, e.page, e.seq, e.offset
        ))),
    }
}

/// Checks a checkpoint's records, met in order, against its index.
pub struct Walk<'a> {
    index: &'a [IndexEntry],
    /// Entries whose position has been passed.
    next: usize,
}

impl<'a> Walk<'a> {
    pub fn new(index: &'a [IndexEntry]) -> Self {
        Walk { index, next: 0 }
    }

    /// The record starting at byte `at` of the checkpoint is `rec`. A checkpoint without an
    /// index (no maps, or version 6 as `migrate` loads it) has no rule to break.
    pub fn record(&mut self, at: u64, rec: &Record) -> Result<()> {
        if self.index.is_empty() {
            return Ok(());
        }
        if let Some(e) = self.index.get(self.next) {
            if e.position() < at {
                return Err(inside(e));
            }
            if e.position() == at {
                self.next += 1;
            }
        }
        match (self.next.checked_sub(1), rec.map_span()) {
            (None, None) => Ok(()),
            (None, Some((layer, lo, _))) => Err(Error::Corrupt(format!(
                "checkpoint, byte {at}: a map record of layer {layer} at block {lo} before the map index's first range"
            ))),
            (Some(i), _) => in_range(self.index, i, at, rec),
        }
    }

    /// The checkpoint ended: an entry not met points past its last record.
    pub fn finish(&self) -> Result<()> {
        match self.index.get(self.next) {
            Some(e) => Err(inside(e)),
            None => Ok(()),
        }
    }
}

fn inside(e: &IndexEntry) -> Error {
    Error::Corrupt(format!(
        "checkpoint: map index entry {e:?} does not point at the start of a record"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::record::{MapEntry, MapTarget};
    use crate::format::{LayerId, VBlock};

    fn entry(layer: u32, vblock: u64, position: u64) -> IndexEntry {
        IndexEntry {
            layer: LayerId(layer),
            vblock: VBlock(vblock),
            page: 10 + position / 4048,
            seq: (position / 4048) as u32,
            offset: (position % 4048) as u32,
        }
    }

    fn map(layer: u32, vblocks: &[u64]) -> Record {
        let entries = vblocks
            .iter()
            .map(|&v| MapEntry {
                vblock: VBlock(v),
                target: MapTarget::Zero,
            })
            .collect();
        Record::Map {
            layer: LayerId(layer),
            entries,
        }
    }

    /// Layer 1's ranges from block 0 and 2048, layer 2's from 1024.
    fn index() -> Vec<IndexEntry> {
        vec![entry(1, 0, 100), entry(1, 2048, 200), entry(2, 1024, 300)]
    }

    fn walk(records: &[(u64, Record)]) -> Result<()> {
        let index = index();
        let mut w = Walk::new(&index);
        for (at, r) in records {
            w.record(*at, r)?;
        }
        w.finish()
    }

    #[test]
    fn records_in_their_ranges_pass() {
        walk(&[
            (0, Record::LayerCommit(LayerId(1))),
            (100, map(1, &[0, 5, 2047])),
            (150, map(1, &[1000])),
            (200, map(1, &[2048, 1 << 40])),
            (300, map(2, &[1024, 1030])),
        ])
        .unwrap();
    }

    #[test]
    fn what_an_index_must_not_say_is_damage() {
        let before = (0, Record::LayerCommit(LayerId(1)));
        let cases: Vec<(Vec<(u64, Record)>, &str)> = vec![
            // A map record before the first range.
            (vec![(0, map(1, &[0]))], "before the map index"),
            // A block of the next range of the same layer.
            (
                vec![before.clone(), (100, map(1, &[2048]))],
                "within blocks 0..2048",
            ),
            // Another layer's record.
            (vec![before.clone(), (100, map(2, &[0]))], "of layer id 1"),
            // A non-map record among the ranges.
            (
                vec![before.clone(), (100, Record::LayerCommit(LayerId(1)))],
                "not a map record",
            ),
            // An entry inside a record: the walk passes 200 without a record there.
            (
                vec![before.clone(), (100, map(1, &[0])), (250, map(1, &[2048]))],
                "start of a record",
            ),
            // An entry past the last record.
            (
                vec![before.clone(), (100, map(1, &[0])), (200, map(1, &[2048]))],
                "start of a record",
            ),
            // Below the range's first block.
            (
                vec![
                    before,
                    (100, map(1, &[0])),
                    (200, map(1, &[2048])),
                    (300, map(2, &[5])),
                ],
                "within blocks 1024..",
            ),
        ];
        for (records, want) in cases {
            let e = walk(&records).unwrap_err();
            assert!(matches!(e, Error::Corrupt(_)), "{e}");
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
    }
}
