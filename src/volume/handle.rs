//! `Volume`: one layer chain of an open store, as a `BlockDevice`; and the store as an
//! `ExportCatalog` for servers.

use super::device::{BlockDevice, ExportCatalog, ExportInfo, Extent};
use super::store::Store;
use crate::error::Result;
use crate::format::LayerId;
use std::sync::Arc;

#[derive(Clone)]
pub struct Volume {
    store: Arc<Store>,
    id: LayerId,
    name: String,
    size: u64,
    read_only: bool,
    block_size: u32,
}

impl Volume {
    pub fn open(store: &Arc<Store>, name: &str) -> Result<Volume> {
        let info = store.layer_head(name)?;
        if info.importing {
            return Err(crate::error::Error::NotFound(format!(
                "layer {name:?} is still being imported"
            )));
        }
        Ok(Volume {
            store: store.clone(),
            id: info.id,
            name: info.name,
            size: info.disk_size,
            read_only: !info.writable || !store.is_writable(),
            block_size: store.block_size(),
        })
    }

    pub fn id(&self) -> LayerId {
        self.id
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

impl BlockDevice for Volume {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.store.read_layer(self.id, offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.store.write_layer(self.id, offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.store.zero_layer(self.id, offset, len, may_unmap)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.store.zero_layer(self.id, offset, len, true)
    }
    fn flush(&self) -> Result<()> {
        self.store.flush()
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.store.extents_layer(self.id, offset, len)
    }
}

/// Serve the layers of a store; `only` restricts the exports to the named layers.
pub struct StoreExports {
    pub store: Arc<Store>,
    pub only: Vec<String>,
}

impl StoreExports {
    /// The export `name` as a volume, if it is one.
    pub fn volume(&self, name: &str) -> Result<Volume> {
        if !self.only.is_empty() && !self.only.iter().any(|n| n == name) {
            return Err(crate::error::Error::NotFound(format!(
                "no export named {name:?}"
            )));
        }
        Volume::open(&self.store, name)
    }
}

impl ExportCatalog for StoreExports {
    fn exports(&self) -> Result<Vec<ExportInfo>> {
        // Heads only: listing exports (a client naming none, or asking for a description)
        // must not wait for a lazily opened pool's maps.
        Ok(self
            .store
            .layer_heads()
            .into_iter()
            .filter(|(l, _)| !l.importing && (self.only.is_empty() || self.only.contains(&l.name)))
            .map(|(l, parent)| ExportInfo {
                description: format!(
                    "thinlayer {} layer{}",
                    if l.writable { "writable" } else { "read-only" },
                    parent
                        .as_ref()
                        .map_or(String::new(), |p| format!(" on {p}"))
                ),
                read_only: !l.writable || !self.store.is_writable(),
                size: l.disk_size,
                name: l.name,
            })
            .collect())
    }

    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>> {
        Ok(Arc::new(self.volume(name)?))
    }

    fn flush_all(&self) -> Result<()> {
        if self.store.is_writable() {
            self.store.flush()
        } else {
            Ok(())
        }
    }
}
