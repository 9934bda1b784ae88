//! The catalogue: every layer with its name, parent, mode and block map. It is rebuilt by
//! replaying records (checkpoint, then log) and serialises itself back into a checkpoint.

use super::map::{BlockMap, Mapping};
use crate::error::{Error, Result};
use crate::format::record::{LayerCreate, MapEntry, MapTarget, Record, RecordWriter};
use crate::format::{LayerId, PBlock, VBlock};
use std::collections::{BTreeMap, HashMap};

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

    /// What the chain starting at `chain[0]` reads for `vb`.
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
                self.by_name.remove(&l.name);
                if let Some(p) = l.parent.and_then(|p| self.layers.get_mut(&p)) {
                    p.children.retain(|&c| c != id);
                }
            }
            Record::Map { layer, entries } => {
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
