//! The catalogue: every layer with its name, parent, mode and block map. It is rebuilt by
//! replaying records (checkpoint, then log) and serialises itself back into a checkpoint.

use super::map::{BlockMap, Mapping};
use super::resolve::{split, ChainCache, MergedChunk};
use crate::error::{Error, Result};
use crate::format::record::{LayerCreate, MapEntry, MapTarget, Record, RecordWriter};
use crate::format::{LayerId, PBlock, VBlock};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub struct Layer {
    pub id: LayerId,
    pub name: String,
    pub parent: Option<LayerId>,
    pub disk_size: u64,
    pub created_secs: u64,
    pub created_nanos: u32,
    pub writable: bool,
    pub map: BlockMap,
    pub children: Vec<LayerId>,
}

impl Layer {
    pub fn describe(&self) -> String {
        format!("layer {:?} ({})", self.name, self.id)
    }
}

/// What a chain reads for one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    Data {
        pblock: PBlock,
        crc: u32,
        owner: LayerId,
    },
    /// A whiteout in some layer of the chain.
    Zero,
    /// Mapped nowhere.
    Hole,
}

#[derive(Default)]
pub struct Catalog {
    layers: BTreeMap<LayerId, Layer>,
    by_name: HashMap<String, LayerId>,
    next_id: u32,
    /// Damage found while replaying that does not stop the load (counters that disagree with
    /// the map they count); `check` reports it and a writable open refuses it.
    pub faults: Vec<String>,
    /// Merged chunks of read-only chains, so reads do not walk the chain (see `resolve.rs`).
    cache: ChainCache,
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

    pub fn get_mut(&mut self, id: LayerId) -> Option<&mut Layer> {
        self.layers.get_mut(&id)
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
        let mut out = Vec::new();
        let mut cur = self.layers.get(&top);
        while let Some(l) = cur {
            out.push(l);
            cur = l.parent.and_then(|p| self.layers.get(&p));
        }
        out
    }

    /// What the chain topped by `top` reads for blocks `vb0..vb0 + n`, appended to `out`.
    /// Only the top layer can be writable (a writable layer has no children), so it is looked
    /// at directly; everything below comes from the merged-chunk cache, one lookup per block
    /// whatever the depth.
    pub fn resolve_range(&self, top: LayerId, vb0: u64, n: u64, out: &mut Vec<Resolved>) {
        let Some(t) = self.layers.get(&top) else {
            out.extend(std::iter::repeat_n(Resolved::Hole, n as usize));
            return;
        };
        let (own, base) = if t.writable {
            (Some(t), t.parent)
        } else {
            (None, Some(top))
        };
        let mut cur: Option<(u64, Arc<MergedChunk>)> = None;
        for vb in vb0..vb0 + n {
            let r = match (own.and_then(|l| l.map.get(VBlock(vb))), base) {
                (Some(Mapping::Data { pblock, crc }), _) => Resolved::Data {
                    pblock,
                    crc,
                    owner: top,
                },
                (Some(Mapping::Zero), _) => Resolved::Zero,
                (None, None) => Resolved::Hole,
                (None, Some(b)) => {
                    let (c, key) = split(vb);
                    if cur.as_ref().is_none_or(|(cc, _)| *cc != c) {
                        cur = Some((c, self.cache.chunk(b, c, || self.chain(b))));
                    }
                    cur.as_ref().unwrap().1.get(key)
                }
            };
            debug_assert_eq!(r, Self::resolve_in(&self.chain(top), VBlock(vb)));
            out.push(r);
        }
    }

    /// What the chain topped by `top` reads for `vb` (through the cache).
    pub fn resolve(&self, top: LayerId, vb: VBlock) -> Resolved {
        let mut out = Vec::with_capacity(1);
        self.resolve_range(top, vb.0, 1, &mut out);
        out[0]
    }

    /// Entries held by the merged-chunk cache.
    pub fn cached_entries(&self) -> usize {
        self.cache.entries()
    }

    /// What the chain starting at `chain[0]` reads for `vb`, walking it (no cache).
    pub fn resolve_in(chain: &[&Layer], vb: VBlock) -> Resolved {
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

    /// Apply one record (replay, or a change made now). Validates references, so damaged
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
                        map: BlockMap::new(),
                        children: Vec::new(),
                    },
                );
            }
            Record::LayerCommit(id) => self.must(id)?.writable = false,
            Record::LayerRemove(id) => {
                let l = self.must(id)?;
                if !l.children.is_empty() {
                    return Err(Error::Corrupt(format!(
                        "layer {id} removed while it has children"
                    )));
                }
                let l = self.layers.remove(&id).unwrap();
                self.cache.forget(id);
                self.by_name.remove(&l.name);
                if let Some(p) = l.parent.and_then(|p| self.layers.get_mut(&p)) {
                    p.children.retain(|&c| c != id);
                }
            }
            Record::Map { layer, entries } => {
                if !self.must(layer)?.writable {
                    // Only replay changes a committed layer; no merged chunk may outlive it.
                    self.cache.clear();
                }
                let l = self.must(layer)?;
                for e in entries {
                    match e.target {
                        MapTarget::Unmapped => {
                            l.map.remove(e.vblock);
                        }
                        MapTarget::Zero => {
                            l.map.set(e.vblock, Mapping::Zero);
                        }
                        MapTarget::Data { pblock, crc } => {
                            if pblock.0 > super::map::MAX_PBLOCK {
                                return Err(Error::Corrupt(format!(
                                    "layer {layer}: {} maps to impossible {pblock}",
                                    e.vblock
                                )));
                            }
                            l.map.set(e.vblock, Mapping::Data { pblock, crc });
                        }
                    }
                }
            }
            Record::LayerCounters {
                layer,
                data_blocks,
                zero_blocks,
            } => {
                let l = self.must(layer)?;
                let actual = (l.map.data_blocks(), l.map.zero_blocks());
                if actual != (data_blocks, zero_blocks) {
                    let m = format!(
                        "{}: stored counters say {data_blocks} data and {zero_blocks} zero blocks, its map holds {} and {}",
                        l.describe(),
                        actual.0,
                        actual.1
                    );
                    self.faults.push(m);
                }
            }
        }
        Ok(())
    }

    fn must(&mut self, id: LayerId) -> Result<&mut Layer> {
        self.layers
            .get_mut(&id)
            .ok_or_else(|| Error::Corrupt(format!("record names unknown layer {id}")))
    }

    /// Write the whole catalogue as checkpoint records. Parents have smaller ids than their
    /// children, so id order replays parents first.
    pub fn encode_checkpoint(&self, w: &mut RecordWriter) {
        for l in self.layers.values() {
            w.layer_create(&LayerCreate {
                id: l.id,
                parent: l.parent,
                disk_size: l.disk_size,
                created_secs: l.created_secs,
                created_nanos: l.created_nanos,
                writable: l.writable,
                name: l.name.clone(),
            });
            for (vblock, m) in l.map.iter() {
                let target = match m {
                    Mapping::Data { pblock, crc } => MapTarget::Data { pblock, crc },
                    Mapping::Zero => MapTarget::Zero,
                };
                w.map(l.id, MapEntry { vblock, target });
            }
            // After the entries, so replay can compare them with the map it just rebuilt.
            w.layer_counters(l.id, l.map.data_blocks(), l.map.zero_blocks());
        }
    }
}
