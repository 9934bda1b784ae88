//! What a layer changes over an ancestor, from the maps alone: the input of a send stream and
//! of content IDs (docs/STREAM.md). The diff of `top` over `floor` holds every block that a
//! layer above `floor` maps: its data where the top-most of them maps data, and a whiteout
//! where it maps zeros and `floor`'s chain would show data. A whiteout over what `floor` reads
//! as zeros anyway is no change, so it is left out: the diff depends only on what the layers
//! hold, never on how a frontend happened to write it.

use super::device::{Extent, ExtentState};
use super::store::Store;
use crate::error::{Error, Result};
use crate::format::{LayerId, VBlock};
use crate::layer::map::{CHUNK_BITS, CHUNK_LEN};
use crate::layer::{chain, Layer, Resolved};

impl Store {
    /// The diff of layer `top` over its ancestor `floor` (None: over nothing, the whole chain)
    /// for bytes `offset..offset+len`, as Data and Zero extents in block order (holes are
    /// left out). Block-aligned except where the layer's last block ends early.
    pub fn diff_extents(
        &self,
        top: LayerId,
        floor: Option<LayerId>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>> {
        // A lazily opened pool: the chain's ranges under these bytes are loaded first, as for
        // a read, so a diff (a commit's content IDs, `ls`, a send) does not wait for the rest.
        self.load_for(top, offset, len)?;
        let g = self.read_now();
        let t = g
            .catalog
            .get(top)
            .ok_or_else(|| Error::NotFound(format!("layer {top} no longer exists")))?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= t.disk_size)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{}: diff range at byte {offset} of {len} bytes goes past its end",
                    t.describe()
                ))
            })?;
        let all = g.catalog.chain(top);
        // The maps of a remote layer miss what is not fetched yet: a diff of them would be
        // wrong, not short.
        if let Some(r) = all.iter().find(|l| l.remote) {
            return Err(Error::Conflict(format!(
                "{} is remote and not all fetched yet: {} cannot be diffed (sent, pushed) until it is",
                r.describe(),
                t.describe()
            )));
        }
        let above: Vec<&Layer> = match floor {
            None => all,
            Some(f) => {
                let Some(i) = all.iter().position(|l| l.id == f) else {
                    return Err(Error::InvalidInput(format!(
                        "{} is not an ancestor of {}",
                        g.catalog.get(f).map_or(f.to_string(), |l| l.describe()),
                        t.describe()
                    )));
                };
                all[..i].to_vec()
            }
        };
        let below = floor.map(|f| g.catalog.resolver(f));
        let bs = g.block_size as u64;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let mut push = |vb: u64, state: ExtentState| {
            let (s, e) = ((vb * bs).max(offset), ((vb + 1) * bs).min(end));
            match out.last_mut() {
                Some(x) if x.state == state && x.offset + x.len == s => x.len += e - s,
                _ => out.push(Extent {
                    offset: s,
                    len: e - s,
                    state,
                }),
            }
        };
        let (vb_start, vb_end) = (offset / bs, (end - 1) / bs + 1);
        let mut floor_reads = Vec::with_capacity(CHUNK_LEN as usize);
        // A chunk none of the layers above the floor maps changes nothing: only the mapped
        // ones are visited, so the diff of a huge sparse layer costs what it holds.
        for c in chain::mapped_chunks(&above, vb_start >> CHUNK_BITS, (vb_end - 1) >> CHUNK_BITS) {
            let (from, to) = (
                (c << CHUNK_BITS).max(vb_start),
                ((c + 1) << CHUNK_BITS).min(vb_end),
            );
            floor_reads.clear();
            if let Some(r) = &below {
                r.range(from, to - from, &mut floor_reads);
            }
            for b in from..to {
                match chain::walk(&above, VBlock(b)) {
                    Resolved::Data { .. } => push(b, ExtentState::Data),
                    Resolved::Zero => {
                        let under = floor_reads.get((b - from) as usize);
                        if matches!(under, Some(Resolved::Data { .. })) {
                            push(b, ExtentState::Zero);
                        }
                    }
                    Resolved::Hole => {}
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::pool::MemStorage;
    use crate::volume::{CreateOptions, ExtentState, Store};
    use std::sync::Arc;

    /// A whiteout counts only over data; data counts wherever a layer above the floor holds it.
    #[test]
    fn the_diff_holds_data_above_the_floor_and_whiteouts_over_data_only() {
        let s = Store::create_in(Arc::new(MemStorage::new()), &CreateOptions::default()).unwrap();
        let base = s.create_layer("base", None, Some(1 << 20)).unwrap().id;
        s.write_layer(base, 0, &[1; 8192]).unwrap();
        s.commit_layer("base").unwrap();
        let top = s
            .create_layer("top", Some("base"), Some(2 << 20))
            .unwrap()
            .id;
        // Whiteout over data (block 0), whiteout kept over a hole (block 4), data past the
        // parent's end.
        s.zero_layer(top, 0, 4096, false).unwrap();
        s.zero_layer(top, 4 * 4096, 4096, false).unwrap();
        s.write_layer(top, (1 << 20) + 4096, &[2; 4096]).unwrap();
        let d = s.diff_extents(top, Some(base), 0, 2 << 20).unwrap();
        let got: Vec<(u64, u64, ExtentState)> =
            d.iter().map(|x| (x.offset, x.len, x.state)).collect();
        assert_eq!(
            got,
            [
                (0, 4096, ExtentState::Zero),
                ((1 << 20) + 4096, 4096, ExtentState::Data)
            ]
        );
        // Over nothing, the whole chain: the base's second block shows through.
        let d = s.diff_extents(top, None, 0, 2 << 20).unwrap();
        assert_eq!(d[0].offset, 4096);
        assert_eq!(d[0].state, ExtentState::Data);
        assert!(s.diff_extents(base, Some(top), 0, 4096).is_err());
    }

    /// A 256 PiB layer holding two blocks: its diff and its extents cost what it holds. Before
    /// the walkers visited only mapped chunks, each looked at all 2^36 chunk numbers here, minutes
    /// each (a 256 TiB layer from a registry kept `send` busy for minutes).
    #[test]
    fn a_huge_sparse_layer_diffs_by_what_it_holds() {
        let s = Store::create_in(Arc::new(MemStorage::new()), &CreateOptions::default()).unwrap();
        let size = 1u64 << 58;
        let big = s.create_layer("big", None, Some(size)).unwrap().id;
        let far = size - 3 * 4096;
        s.write_layer(big, 4096, &[7; 4096]).unwrap();
        s.write_layer(big, far, &[9; 4096]).unwrap();
        let d = s.diff_extents(big, None, 0, size).unwrap();
        let got: Vec<(u64, u64, ExtentState)> =
            d.iter().map(|x| (x.offset, x.len, x.state)).collect();
        assert_eq!(
            got,
            [
                (4096, 4096, ExtentState::Data),
                (far, 4096, ExtentState::Data)
            ]
        );
        let e = s.extents_layer(big, 0, size).unwrap();
        let got: Vec<(u64, u64, ExtentState)> =
            e.iter().map(|x| (x.offset, x.len, x.state)).collect();
        assert_eq!(
            got,
            [
                (0, 4096, ExtentState::Hole),
                (4096, 4096, ExtentState::Data),
                (8192, far - 8192, ExtentState::Hole),
                (far, 4096, ExtentState::Data),
                (far + 4096, 8192, ExtentState::Hole),
            ]
        );
    }
}
