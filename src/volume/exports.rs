//! The exports of a live pool, and who has them open. Every layer is an export the moment it
//! exists (unless `serve --export` fixed the set) and stops being one when it is removed;
//! each NBD connection's device, and each live file's (`crate::fuse`), is registered here while
//! open, so `rm` and `commit` can refuse a layer in use, naming its holders, and `rm --force`
//! can cut them off first.

use super::gate::Gate;
use super::{BlockDevice, ExportCatalog, ExportInfo, Extent, Store, StoreExports, Volume};
use crate::error::{Error, Result};
use crate::format::LayerId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// What kind of frontend holds a layer: it decides how a refusal tells the user to let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// An NBD connection (`client` is the NBD server's name for it).
    Nbd,
    /// A live file (`client` is the file's path).
    File,
}

/// One open connection's (or live file's) hold on a layer.
#[derive(Debug)]
pub struct Attachment {
    pub layer: LayerId,
    pub export: String,
    /// Who: the NBD server's name for the connection, or the live file's path.
    pub client: String,
    pub holder: Holder,
    pub since: SystemTime,
    pub writable: bool,
    /// Set by `rm --force`: every further request fails with EIO, so the client can never
    /// read or write through a layer that is gone (let alone another layer's blocks).
    revoked: AtomicBool,
}

impl Attachment {
    pub fn describe(&self) -> String {
        let since = humantime::format_rfc3339_seconds(self.since);
        let mode = if self.writable {
            "writable"
        } else {
            "read-only"
        };
        match self.holder {
            Holder::Nbd => format!(
                "{} on export {:?} ({mode}) since {since}",
                self.client, self.export
            ),
            Holder::File => format!("live file {} ({mode}) since {since}", self.client),
        }
    }

    /// Whether `rm --force` has cut this holder off.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }
}

type Registry = Mutex<HashMap<u64, Arc<Attachment>>>;

pub struct LiveExports {
    inner: StoreExports,
    attached: Arc<Registry>,
    next: AtomicU64,
    /// Every device's I/O passes it; closed while the serving process is replaced.
    gate: Arc<Gate>,
}

impl LiveExports {
    pub fn new(store: Arc<Store>, only: Vec<String>) -> LiveExports {
        LiveExports {
            inner: StoreExports { store, only },
            attached: Arc::default(),
            next: AtomicU64::new(1),
            gate: Arc::default(),
        }
    }

    /// The gate every device's I/O passes (`thinlayer restart` closes it).
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// The store the exports are layers of.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// The connections holding layer `id`.
    pub fn attached_to(&self, id: LayerId) -> Vec<Arc<Attachment>> {
        let g = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = g.values().filter(|a| a.layer == id).cloned().collect();
        v.sort_by_key(|a| a.since);
        v
    }

    /// The layers exported now.
    pub fn names(&self) -> Vec<String> {
        self.inner
            .exports()
            .map(|v| v.into_iter().map(|e| e.name).collect())
            .unwrap_or_default()
    }

    /// Every open connection.
    pub fn all(&self) -> Vec<Arc<Attachment>> {
        let g = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        g.values().cloned().collect()
    }

    /// Refuse `what` on `layer` while connections (all, or only writable ones) hold it.
    pub fn refuse_if_attached(
        &self,
        layer: &str,
        id: LayerId,
        only_writable: bool,
        what: &str,
    ) -> Result<()> {
        let held: Vec<_> = self
            .attached_to(id)
            .into_iter()
            .filter(|a| !only_writable || a.writable)
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = held.iter().map(|a| a.describe()).collect();
        let files = held.iter().filter(|a| a.holder == Holder::File).count();
        let nbd = held.len() - files;
        let (by, advice) = match (nbd, files) {
            (_, 0) => (format!("{nbd} NBD connection(s)"), "disconnect them first"),
            (0, _) => (
                format!("{files} live file(s)"),
                "detach it first (thinlayer detach)",
            ),
            _ => (
                format!("{nbd} NBD connection(s) and {files} live file(s)"),
                "disconnect and detach them first",
            ),
        };
        Err(Error::InUse {
            message: format!(
                "layer {layer:?} is in use by {by}: {}; {advice}{what}",
                names.join("; ")
            ),
            holders: held.iter().map(|a| a.client.clone()).collect(),
        })
    }

    /// Cut off every connection holding `id`: their requests fail with EIO from now on.
    pub fn revoke(&self, id: LayerId) -> usize {
        let held = self.attached_to(id);
        for a in &held {
            a.revoked.store(true, Ordering::SeqCst);
        }
        held.len()
    }

    /// Open an export for a connection, registering it until the device is dropped.
    pub fn open_for(&self, name: &str, client: &str) -> Result<Arc<dyn BlockDevice>> {
        Ok(self.hold(name, client, Holder::Nbd)?)
    }

    /// Open an export for `holder`, registering it until the device is dropped; the device
    /// shows its registration (`Attached::attachment`), so a holder can tell it was revoked.
    pub fn hold(&self, name: &str, client: &str, holder: Holder) -> Result<Arc<Attached>> {
        let vol = self.inner.volume(name)?;
        let at = Arc::new(Attachment {
            layer: vol.id(),
            export: name.to_string(),
            client: client.to_string(),
            holder,
            since: SystemTime::now(),
            writable: !vol.is_read_only(),
            revoked: AtomicBool::new(false),
        });
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, at.clone());
        Ok(Arc::new(Attached {
            vol,
            at,
            key,
            registry: self.attached.clone(),
            gate: self.gate.clone(),
        }))
    }
}

impl ExportCatalog for LiveExports {
    fn exports(&self) -> Result<Vec<ExportInfo>> {
        self.inner.exports()
    }
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>> {
        self.open_for(name, "an NBD client")
    }
    fn open_for(&self, name: &str, client: &str) -> Result<Arc<dyn BlockDevice>> {
        LiveExports::open_for(self, name, client)
    }
    fn flush_all(&self) -> Result<()> {
        self.inner.flush_all()
    }
}

/// A holder's device: the layer's volume, refusing I/O once revoked.
pub struct Attached {
    vol: Volume,
    at: Arc<Attachment>,
    key: u64,
    registry: Arc<Registry>,
    gate: Arc<Gate>,
}

impl Attached {
    pub fn attachment(&self) -> &Attachment {
        &self.at
    }

    fn live(&self) -> Result<&Volume> {
        if self.at.revoked.load(Ordering::SeqCst) {
            return Err(Error::io(
                format!("layer {:?} was removed while attached", self.at.export),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(&self.vol)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl BlockDevice for Attached {
    fn name(&self) -> &str {
        self.vol.name()
    }
    fn size(&self) -> u64 {
        self.vol.size()
    }
    fn is_read_only(&self) -> bool {
        self.vol.is_read_only()
    }
    fn block_size(&self) -> u32 {
        self.vol.block_size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _pass = self.gate.enter();
        self.live()?.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let _pass = self.gate.enter();
        self.live()?.write_at(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let _pass = self.gate.enter();
        self.live()?.write_zeroes(offset, len, may_unmap)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let _pass = self.gate.enter();
        self.live()?.trim(offset, len)
    }
    fn flush(&self) -> Result<()> {
        let _pass = self.gate.enter();
        self.live()?.flush()
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let _pass = self.gate.enter();
        self.live()?.extents(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use crate::pool::MemStorage;
    use crate::volume::CreateOptions;

    #[test]
    fn a_held_layer_is_refused_as_in_use_naming_its_holders() {
        let mem = Arc::new(MemStorage::new());
        let store = Arc::new(Store::create_in(mem, &CreateOptions::default()).unwrap());
        store.create_layer("web", None, Some(1 << 20)).unwrap();
        let x = LiveExports::new(store.clone(), Vec::new());
        let id = store.layer("web").unwrap().id;
        x.refuse_if_attached("web", id, false, "").unwrap();
        let dev = x.hold("web", "unix client 3", Holder::Nbd).unwrap();
        let e = x.refuse_if_attached("web", id, false, "").unwrap_err();
        assert_eq!(e.kind(), Kind::InUse);
        let Error::InUse { holders, .. } = &e else {
            unreachable!()
        };
        assert_eq!(holders, &["unix client 3"]);
        drop(dev);
        x.refuse_if_attached("web", id, false, "").unwrap();
    }
}
