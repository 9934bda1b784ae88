//! One layer of the catalogue: its identity, place in the tree, mode and own block map.

use super::map::BlockMap;
use crate::format::LayerId;
use std::collections::BTreeMap;

pub struct Layer {
    pub id: LayerId,
    pub name: String,
    pub parent: Option<LayerId>,
    pub disk_size: u64,
    pub created_secs: u64,
    pub created_nanos: u32,
    pub writable: bool,
    /// Being filled by an import (see `LayerCreate::incomplete`).
    pub incomplete: bool,
    /// Fetched from a registry on demand (see `LayerCreate::remote`): an unmapped block its
    /// blob lists is not local yet, and must not read through to the parent.
    pub remote: bool,
    pub map: BlockMap,
    /// What frontends keep about the layer (FORMAT.md §6.5): keys with a prefix per owner.
    pub attrs: BTreeMap<String, String>,
    pub children: Vec<LayerId>,
}

impl Layer {
    pub fn describe(&self) -> String {
        format!("layer {:?} ({})", self.name, self.id)
    }
}
