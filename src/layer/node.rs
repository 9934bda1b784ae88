//! One layer of the catalogue: its identity, place in the tree, mode and own block map.

use super::map::BlockMap;
use crate::format::LayerId;

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
    pub map: BlockMap,
    pub children: Vec<LayerId>,
}

impl Layer {
    pub fn describe(&self) -> String {
        format!("layer {:?} ({})", self.name, self.id)
    }
}
