//! What each snapshot request does to the pool. A snapshot is a layer: Prepare makes an O(1)
//! writable child of its parent's layer (or of a formatted empty base), View the same child
//! mounted read-only, Commit seals the layer under the committed name; key, kind, labels and
//! times are attributes written in the same transaction as the layer change, and every change
//! is durable (committed) before the reply, so containerd and the pool never disagree after a
//! crash of either.
//!
//! Why View is a writable child mounted `ro` rather than the parent itself: ext4 replays its
//! journal even on a read-only mount, and the kernel may write superblock fields; the child
//! takes any such write, so a committed layer never changes under its other children.

use super::api::Mount;
use super::api::{Info, Kind};
use super::base::{self, Bases};
use super::dead_log;
use super::info::{self, kind_name, labels_value, time_value};
use super::keys;
use super::remote::{LayerAt, RemoteLayers, REF_LABEL};
use super::status::{Failure, Result};
use crate::error::Error;
use crate::fuse::LostWrites;
use crate::live::LivePool;
use crate::volume::exports::{Holder, LiveExports};
use crate::volume::{BlockDevice, LayerInfo, Store};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A label that asks for the size of a snapshot without a parent (bytes, or 10G etc.).
pub const SIZE_LABEL: &str = "containerd.io/snapshot/thinlayer.size";

/// Where snapshot layers become files a loop device can use (the live files, `crate::fuse`).
pub trait Files: Send + Sync {
    /// The file of `layer`, attaching it if needed (idempotent).
    fn attach(&self, layer: &str) -> crate::Result<PathBuf>;
    /// The block device that mounts of `layer` are served from: a loop device over its file,
    /// read-only or writable, bound until `detach` (idempotent: the same device each time).
    fn device(&self, layer: &str, read_only: bool) -> crate::Result<PathBuf>;
    /// Make `layer` no longer attached (nothing to do if it is not), its devices cleared,
    /// saying which writes through its file failed while attached. `InUse` while a
    /// filesystem is mounted on its device or another loop device still has the file open.
    fn detach(&self, layer: &str) -> crate::Result<LostWrites>;
    /// Make what a filesystem mounted on `layer`'s file has written so far reach the layer
    /// (nothing to do if the layer is not attached or not mounted).
    fn sync_mounted(&self, layer: &str) -> crate::Result<()>;
    /// Where a filesystem on a loop device over `layer`'s file is mounted, if one is
    /// (attaching the file if needed).
    fn mounted_at(&self, layer: &str) -> crate::Result<Option<PathBuf>>;
    /// Run `f` on `layer`'s device if its file is attached and no one has it open (nothing
    /// is mounted on it), with opens held off until `f` returns; false if it did not run.
    fn while_unmounted(
        &self,
        layer: &str,
        f: &mut dyn FnMut(&dyn BlockDevice) -> crate::Result<()>,
    ) -> crate::Result<bool>;
}

pub struct Snapshots {
    /// The live pool's layers and who holds them: every change goes through its rules
    /// (`LivePool`), so a layer an NBD client holds is protected from containerd too.
    exports: Arc<LiveExports>,
    store: Arc<Store>,
    files: Arc<dyn Files>,
    bases: Bases,
    /// Changing requests one at a time: "does the name exist" and "make it" are one step.
    changing: Mutex<()>,
    /// Who makes remote snapshots (the live server's fills), if anyone.
    remote: Option<Arc<dyn RemoteLayers>>,
}

fn named(key: &str) -> impl Fn(Failure) -> Failure + '_ {
    move |f| f.context(format!("snapshot {key:?}"))
}

fn store_err(key: &str) -> impl Fn(Error) -> Failure + '_ {
    move |e| Failure::from(e).context(format!("snapshot {key:?}"))
}

impl Snapshots {
    /// `work_dir`: where formatted bases are made before their import (beside the pool).
    pub fn new(
        exports: Arc<LiveExports>,
        files: Arc<dyn Files>,
        work_dir: &std::path::Path,
    ) -> Self {
        Snapshots {
            store: exports.store().clone(),
            exports,
            files,
            bases: Bases::new(work_dir),
            changing: Mutex::new(()),
            remote: None,
        }
    }

    /// Make the layers of unpacks that name a thinlayer blob through `remote`, lazily.
    pub fn with_remote(mut self, remote: Arc<dyn RemoteLayers>) -> Self {
        self.remote = Some(remote);
        self
    }

    fn pool(&self) -> LivePool<'_> {
        LivePool::serving(&self.exports)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The layer of snapshot `key`, or NotFound.
    fn find(&self, key: &str) -> Result<LayerInfo> {
        if key.is_empty() {
            return Err(Failure::from(Error::InvalidInput(
                "empty snapshot key".into(),
            )));
        }
        let not_found = || Failure::from(Error::NotFound(format!("snapshot {key:?} not found")));
        match self.store.layer(&keys::layer_name(key)) {
            Ok(l) if info::is_snapshot(&l, key) => Ok(l),
            Ok(_) | Err(Error::NotFound(_)) => Err(not_found()),
            Err(e) => Err(store_err(key)(e)),
        }
    }

    fn parent_key(&self, l: &LayerInfo) -> String {
        l.parent
            .as_ref()
            .and_then(|p| self.store.layer(p).ok())
            .and_then(|p| p.attrs.get(keys::KEY).cloned())
            .unwrap_or_default()
    }

    fn mounts_of(&self, key: &str, l: &LayerInfo) -> Result<Vec<Mount>> {
        // A loop device the snapshotter binds itself (`crate::fuse::loops`: containerd's own
        // `-o loop` costs a queue freeze per mount), read-only for a view.
        let view = info::kind(l) == Kind::View;
        let device = self.files.device(&l.name, view).map_err(store_err(key))?;
        // noatime: reading a file would otherwise write its inode (relatime updates an atime
        // not newer than the mtime, as in every freshly unpacked layer), a block per inode
        // table block read from. discard: a deleted file's blocks go back to the pool (the
        // loop device punches a hole in the live file, the layer drops the blocks).
        let mut options = vec!["noatime".to_string()];
        if view {
            options.push("ro".into());
        } else {
            options.push("discard".into());
            // nobarrier: what such a snapshot's filesystem writes needs to be durable only
            // once it is committed, and Commit makes it so (the loop device detached, every
            // write in the layer, one pool commit). With barriers, each journal commit and the
            // unmount's superblock and journal writes send flushes, each a pool commit with
            // an fdatasync: most of an unpack's unmount (BENCHMARKS.md, bench-docker).
            if keys::sealed_after_unmount(key) {
                options.push("nobarrier".into());
            }
        }
        Ok(vec![Mount {
            r#type: "ext4".into(),
            source: device.display().to_string(),
            target: String::new(),
            options,
        }])
    }

    /// Prepare (`kind` Active) or View (`kind` View).
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<Mount>> {
        debug_assert!(matches!(kind, Kind::Active | Kind::View));
        if key.is_empty() {
            return Err(Failure::from(Error::InvalidInput(
                "empty snapshot key".into(),
            )));
        }
        let _one = self.lock();
        let name = keys::layer_name(key);
        match self.store.layer(&name) {
            Ok(l) if info::is_snapshot(&l, key) => {
                return Err(Failure::from(Error::AlreadyExists(format!("snapshot {key:?} already exists"))))
            }
            Ok(_) => {
                return Err(Failure::from(Error::AlreadyExists(format!("snapshot {key:?}: its layer name {name:?} is taken by a layer containerd did not make"))))
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(store_err(key)(e)),
        }
        if kind == Kind::Active {
            if let Some(target) = labels.get(REF_LABEL) {
                if self.remote_snapshot(key, parent, target, &labels)? {
                    return Err(Failure::from(Error::AlreadyExists(format!(
                        "snapshot {key:?}: its target {target:?} exists (a remote snapshot)"
                    ))));
                }
            }
        }
        let parent_layer = if parent.is_empty() {
            let size = match labels.get(SIZE_LABEL) {
                Some(v) => crate::units::parse_size(v)
                    .and_then(base::checked_size)
                    .map_err(|e| store_err(key)(e.context(format!("label {SIZE_LABEL}"))))?,
                None => base::DEFAULT_SIZE,
            };
            self.bases.get(self.pool(), size).map_err(store_err(key))?
        } else {
            let p = self.find(parent).map_err(named(key))?;
            if info::kind(&p) != Kind::Committed {
                return Err(Failure::from(Error::Conflict(format!(
                    "snapshot {key:?}: parent {parent:?} is {}, not committed",
                    kind_name(&info::kind(&p))
                ))));
            }
            p.name
        };
        let now = time_value(SystemTime::now());
        let labels = labels_value(&labels);
        let attrs = [
            (keys::KEY, Some(key)),
            (keys::KIND, Some(kind_name(&kind))),
            (keys::LABELS, Some(labels.as_str())),
            (keys::CREATED, Some(now.as_str())),
            (keys::UPDATED, Some(now.as_str())),
        ];
        let l = self
            .pool()
            .create(&name, Some(&parent_layer), None, &attrs)
            .map_err(store_err(key))?;
        self.mounts_of(key, &l)
    }

    /// An unpack's Prepare of `key` over `parent` for committed snapshot `target`: made at
    /// once from the registry if the labels name a thinlayer blob that can be read by range
    /// (true: containerd skips the layer's download and apply), or left to the usual unpack
    /// (false), with a log line saying why. containerd finds the snapshot by its
    /// `snapshot.ref` label and parent (its metadata store walks the backend's snapshots for
    /// them), so the target keeps the Prepare's labels.
    fn remote_snapshot(
        &self,
        key: &str,
        parent: &str,
        target: &str,
        labels: &HashMap<String, String>,
    ) -> Result<bool> {
        let Some(remote) = &self.remote else {
            return Ok(false);
        };
        let usual = |why: &dyn std::fmt::Display| {
            crate::log::process(
                crate::log::Level::Info,
                format_args!(
                    "containerd: layer {target} is unpacked the usual way (downloaded whole), not made remote: {why}"
                ),
            );
            Ok(false)
        };
        let at = match LayerAt::of(labels) {
            Ok(at) => at,
            Err(why) => return usual(&why),
        };
        let name = keys::layer_name(target);
        let parent_layer = if parent.is_empty() {
            None
        } else {
            match self.find(parent) {
                Ok(p) if info::kind(&p) == Kind::Committed => Some(p.name),
                _ => {
                    return usual(&format!(
                        "its parent {parent:?} is not a committed snapshot"
                    ))
                }
            }
        };
        match self.store.layer(&name) {
            // Made before (another namespace pulled the image): containerd links it.
            Ok(l)
                if info::is_snapshot(&l, target)
                    && info::kind(&l) == Kind::Committed
                    && l.parent == parent_layer =>
            {
                return Ok(true)
            }
            Ok(_) => return usual(&format!("its layer name {name:?} is taken")),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(store_err(key)(e)),
        }
        let now = time_value(SystemTime::now());
        let labels = labels_value(labels);
        let attrs = [
            (keys::KEY, Some(target)),
            (keys::KIND, Some("committed")),
            (keys::LABELS, Some(labels.as_str())),
            (keys::CREATED, Some(now.as_str())),
            (keys::UPDATED, Some(now.as_str())),
        ];
        match remote.create(&at, &name, parent_layer.as_deref(), &attrs) {
            Ok(l) => {
                crate::log::process(
                    crate::log::Level::Info,
                    format_args!(
                        "containerd: layer {target} (blob {} of {}) made remote as layer {:?}: its blocks are fetched as they are read",
                        at.layer, at.image, l.name
                    ),
                );
                Ok(true)
            }
            Err(e) => usual(&e),
        }
    }

    /// The mounts of an active snapshot or a view, attaching its file if needed (after a
    /// restart of thinlayer, nothing is attached until containerd asks).
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let l = self.find(key)?;
        if info::kind(&l) == Kind::Committed {
            return Err(Failure::from(Error::Conflict(format!(
                "snapshot {key:?} is committed; only active snapshots and views have mounts"
            ))));
        }
        // An active snapshot whose filesystem is mounted already (a running container's
        // root): a bind of that mount. Another loop device over the same live file would be
        // a second ext4 on the same blocks: written, both would corrupt it; read-only (the
        // differ of `docker commit`), it fails, since the in-use journal needs a recovery a
        // read-only device cannot do. (A snapshot Prepare just made is mounted nowhere.)
        if info::kind(&l) == Kind::Active {
            if let Some(point) = self.files.mounted_at(&l.name).map_err(store_err(key))? {
                return Ok(vec![Mount {
                    r#type: "bind".into(),
                    source: point.display().to_string(),
                    target: String::new(),
                    options: vec!["bind".into()],
                }]);
            }
        }
        self.mounts_of(key, &l)
    }

    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(Failure::from(Error::InvalidInput(
                "empty snapshot name".into(),
            )));
        }
        let _one = self.lock();
        let l = self.find(key)?;
        let kind = info::kind(&l);
        if kind != Kind::Active {
            return Err(Failure::from(Error::Conflict(format!(
                "snapshot {key:?} is {}; only active snapshots can be committed",
                kind_name(&kind)
            ))));
        }
        let new_name = keys::layer_name(name);
        match self.store.layer(&new_name) {
            Ok(_) => {
                return Err(Failure::from(Error::AlreadyExists(format!(
                    "cannot commit snapshot {key:?} as {name:?}: layer {new_name:?} already exists"
                ))))
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(store_err(key)(e)),
        }
        // Its loop device must be gone: then every write it took has reached the layer, and
        // none can come after the layer is read-only.
        let lost = self.files.detach(&l.name).map_err(store_err(key))?;
        if lost.total > 0 {
            // A loop device's writeback failing (the pool full during an unpack) reaches no
            // one who wrote: the layer is incomplete, and sealing it would make an image layer
            // with files missing. containerd removes the snapshot after this refusal.
            let message = format!(
                "snapshot {key:?}: {} write(s) to its live file failed while it was mounted ({} with the pool full); its content is incomplete, so it is not committed",
                lost.total, lost.no_space
            );
            return Err(Failure::from(if lost.no_space > 0 {
                Error::NoSpace(message)
            } else {
                Error::Corrupt(message)
            }));
        }
        self.shed_unchanged(&l).map_err(store_err(key))?;
        let now = time_value(SystemTime::now());
        let labels = labels_value(&labels);
        let attrs = [
            (keys::KEY, Some(name)),
            (keys::FROM, Some(key)),
            (keys::KIND, Some("committed")),
            (keys::LABELS, Some(labels.as_str())),
            (keys::CREATED, Some(now.as_str())),
            (keys::UPDATED, Some(now.as_str())),
        ];
        // Refused while an NBD client holds the layer writable. The content IDs are computed
        // when first asked for (`thinlayer ls`, a push), not in the Commit containerd waits
        // for: containerd never asks for them.
        self.pool()
            .commit_ids_on_demand(&l.name, Some(&new_name), &attrs)
            .map_err(store_err(key))
    }

    /// Before layer `l` is sealed, drop what it holds that nothing needs: the dead journal of
    /// its unmounted ext4 (`dead_log`; nothing to do without a recorded journal, a base made
    /// before it was recorded, or with a journal size changed), then every block that reads
    /// as its parent's does (a block the filesystem wrote back unchanged, the journal's
    /// superblock set back).
    fn shed_unchanged(&self, l: &LayerInfo) -> crate::Result<()> {
        // The live pool's rule for commit, checked before the layer changes: no writable
        // holder (an NBD client) may have it.
        let why = " (writes must not change a layer while it becomes read-only)";
        self.exports.refuse_if_attached(&l.name, l.id, true, why)?;
        if let Some(j) = self.journal_of(l) {
            dead_log::shed(&self.store, l, j)?;
        }
        self.store.drop_unchanged(l.id, 0, l.disk_size)?;
        Ok(())
    }

    /// The journal of the ext4 in layer `l`, if its base recorded one that fits the layer.
    fn journal_of(&self, l: &LayerInfo) -> Option<super::ext4::Journal> {
        let j = base::journal_under(&self.store, l)?;
        (j.offset + j.len <= l.disk_size).then_some(j)
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        let _one = self.lock();
        let l = match self.find(key) {
            Ok(l) => l,
            Err(not_found) => self.orphan_of(key).ok_or(not_found)?,
        };
        if !l.children.is_empty() {
            return Err(Failure::from(Error::Conflict(format!(
                "snapshot {key:?} has {} child snapshot(s); remove them first",
                l.children.len()
            ))));
        }
        self.files.detach(&l.name).map_err(store_err(key))?;
        // Refused while an NBD client holds the layer, naming it.
        self.pool()
            .remove(&l.name, false, &mut |_| {})
            .map_err(store_err(key))?;
        // A remote layer's fetch stops.
        if let (true, Some(r)) = (l.remote, &self.remote) {
            r.removed(l.id);
        }
        Ok(())
    }

    /// The committed snapshot that a Commit of active snapshot `key` made if containerd never
    /// got its answer (the server was killed or restarted after committing, before replying):
    /// containerd then still holds `key` and removes it, and knows nothing of the committed
    /// one, which would stay behind. containerd asks to remove a key only if its own records
    /// hold it, so such a Remove means exactly that. Without children only.
    fn orphan_of(&self, key: &str) -> Option<LayerInfo> {
        let l = self.store.layers().into_iter().find(|l| {
            l.attrs.get(keys::FROM).map(String::as_str) == Some(key)
                && info::kind(l) == Kind::Committed
                && l.children.is_empty()
        })?;
        crate::log::process(
            crate::log::Level::Warn,
            format_args!(
                "containerd: removing snapshot {:?} (layer {}) for Remove of {key:?}: a Commit of {key:?} made it, and its answer did not reach containerd",
                l.attrs.get(keys::KEY).map_or("", String::as_str),
                l.name
            ),
        );
        Some(l)
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        let l = self.find(key)?;
        Ok(info::info(&l, self.parent_key(&l)))
    }

    /// Update labels: all of them (no field paths, or `labels`), or single ones (`labels.K`);
    /// nothing else of a snapshot may change.
    pub fn update(&self, new: Info, fieldpaths: Option<Vec<String>>) -> Result<Info> {
        let key = new.name.as_str();
        let _one = self.lock();
        let l = self.find(key)?;
        let mut labels = info::info(&l, String::new()).labels;
        let paths = fieldpaths.unwrap_or_default();
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            labels = new.labels.clone();
        }
        for p in &paths {
            if p == "labels" {
                continue;
            }
            let Some(label) = p.strip_prefix("labels.") else {
                return Err(Failure::from(Error::InvalidInput(format!(
                    "snapshot {key:?}: cannot update field {p:?} (only labels)"
                ))));
            };
            match new.labels.get(label) {
                Some(v) => labels.insert(label.to_string(), v.clone()),
                None => labels.remove(label),
            };
        }
        let now = time_value(SystemTime::now());
        let value = labels_value(&labels);
        let attrs = [
            (keys::LABELS, Some(value.as_str())),
            (keys::UPDATED, Some(now.as_str())),
        ];
        self.pool()
            .set_attrs(&l.name, &attrs)
            .map_err(store_err(key))?;
        self.stat(key)
    }

    /// Every snapshot containerd made (layers with a `containerd.key`), parents first; other
    /// layers are never shown, so containerd's garbage collector cannot remove them.
    pub fn list(&self) -> Vec<Info> {
        let layers = self.store.layers();
        let key_of: HashMap<&str, &str> = layers
            .iter()
            .filter_map(|l| Some((l.name.as_str(), l.attrs.get(keys::KEY)?.as_str())))
            .collect();
        layers
            .iter()
            .filter(|l| l.attrs.contains_key(keys::KEY))
            .map(|l| {
                let parent = l.parent.as_deref().and_then(|p| key_of.get(p));
                info::info(l, parent.map_or_else(String::new, |p| p.to_string()))
            })
            .collect()
    }

    /// Bytes the snapshot's layer alone holds, from the layer's counters: exact, and current:
    /// what a mounted filesystem on it still holds in the page cache is synced to the layer
    /// first (`writeback`), so `docker ps -s` counts a write the moment it returned.
    pub fn usage(&self, key: &str) -> Result<u64> {
        let l = self.find(key)?;
        match info::kind(&l) {
            Kind::Committed => {}
            kind => {
                self.files.sync_mounted(&l.name).map_err(store_err(key))?;
                // A stopped container's filesystem is unmounted cleanly, so its journal's log
                // is dead, as at Commit: trimmed now (opens of the file wait), so a stopped
                // container costs what its files changed, not its journal's transactions. Not
                // while anything but its live file holds the layer (an NBD client may have it
                // mounted).
                if let (Kind::Active, Some(j)) = (kind, self.journal_of(&l)) {
                    let only_the_file = || {
                        self.exports
                            .attached_to(l.id)
                            .iter()
                            .all(|a| a.holder == Holder::File)
                    };
                    // Through the store: nothing is mounted and opens of the file wait.
                    self.files
                        .while_unmounted(&l.name, &mut |_unmounted| {
                            if only_the_file() {
                                dead_log::shed(&self.store, &l, j)?;
                            }
                            Ok(())
                        })
                        .map_err(store_err(key))?;
                }
            }
        }
        Ok(self.find(key)?.size)
    }
}

#[cfg(test)]
mod tests;
