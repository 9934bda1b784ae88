//! Catalogue changes (create, commit, remove) and the Docker-style accounting views.

use super::store::{Inner, Store};
use crate::error::{Error, Result};
use crate::format::record::LayerCreate;
use crate::format::LayerId;
use crate::layer::{name, Change, Layer};
use serde::Serialize;

/// What serving a layer needs of it (`Store::layer_head`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerHead {
    pub id: crate::format::LayerId,
    pub name: String,
    pub disk_size: u64,
    pub writable: bool,
    pub importing: bool,
}

/// One layer as `ls` and `history` show it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LayerInfo {
    pub name: String,
    pub parent: Option<String>,
    pub writable: bool,
    /// Pool bytes this layer alone holds.
    pub size: u64,
    /// `size` summed over the layer and its ancestors (Docker's virtual size).
    pub virtual_size: u64,
    /// The volume's logical size in bytes.
    pub disk_size: u64,
    /// RFC 3339.
    pub created: String,
    /// Still being filled by an import: not an export, and not committable by hand.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub importing: bool,
    /// Pulled lazily (`pull --lazy`, FORMAT.md §6.1 mode 3) and not all local yet: its
    /// unfetched blocks are fetched from the registry when read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remote: bool,
    /// Of a remote layer: bytes of its data fetched (local) so far, of `content.size`'s blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched: Option<u64>,
    /// Frontends' attributes (FORMAT.md §6.5), e.g. a snapshotter's key and labels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub attrs: std::collections::BTreeMap<String, String>,
    #[serde(skip)]
    pub id: LayerId,
    #[serde(skip)]
    pub children: Vec<String>,
}

/// The pool as `df` shows it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PoolUsage {
    pub path: Option<String>,
    pub block_size: u32,
    pub layers: usize,
    /// The pool file's logical length.
    pub file_size: u64,
    /// Bytes the pool file occupies on disk (`du`).
    pub file_allocated: u64,
    /// Blocks in use (data and metadata), in bytes.
    pub allocated: u64,
    pub data_bytes: u64,
    pub metadata_bytes: u64,
    /// Bytes still allocatable under `--max-size` (null without a cap).
    pub free_under_cap: Option<u64>,
    pub max_size: Option<u64>,
    /// Remote layers (`pull --lazy`, not all fetched yet), and the data bytes they hold so
    /// far (part of `data_bytes`); what they lack is in the registry, not here.
    #[serde(default)]
    pub remote_layers: usize,
    #[serde(default)]
    pub remote_fetched: u64,
    /// Sum of every layer's virtual size: what the layers would take without sharing.
    pub virtual_total: u64,
    /// The maps are still loading (a lazily opened pool, DESIGN §5.3): the allocator counts
    /// every block below the file's extent at open as used until the load completes, so
    /// `allocated` is counted instead from the maps (a layer's ranges not loaded yet by the
    /// counters the checkpoint stored for them), the streams and the frees waiting for a
    /// commit, and `free_under_cap` is the cap less that: what the pool has free once loaded,
    /// as far as is known now.
    #[serde(default)]
    pub loading: bool,
    /// `virtual_total - data_bytes`.
    pub sharing_saves: u64,
}

fn rfc3339(secs: u64, nanos: u32) -> String {
    // RFC 3339 ends at year 9999; a later time can only come from a damaged record.
    const MAX_RFC3339_SECS: u64 = 253_402_300_799;
    if secs > MAX_RFC3339_SECS {
        return format!("@{secs} (not a valid date)");
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos.min(999_999_999));
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Inner {
    pub(crate) fn layer_by_name(&self, name: &str) -> Result<&Layer> {
        self.catalog.by_name(name)
    }

    fn info(&self, l: &Layer) -> LayerInfo {
        let bs = self.block_size as u64;
        let virtual_size = self
            .catalog
            .chain(l.id)
            .iter()
            .map(|a| self.data_blocks(a) * bs)
            .sum();
        self.info_with(l, virtual_size)
    }

    /// Every layer's virtual size in one pass: parents have smaller ids than their children,
    /// so in id order a parent's sum is ready before its children need it. O(layers).
    fn virtual_sizes(&self) -> std::collections::HashMap<crate::format::LayerId, u64> {
        let bs = self.block_size as u64;
        let mut v = std::collections::HashMap::with_capacity(self.catalog.len());
        for l in self.catalog.layers() {
            let below = l.parent.and_then(|p| v.get(&p).copied()).unwrap_or(0);
            v.insert(l.id, below + self.data_blocks(l) * bs);
        }
        v
    }

    /// Every layer's `info`, parents before children.
    fn infos(&self) -> Vec<LayerInfo> {
        let v = self.virtual_sizes();
        self.catalog
            .layers()
            .map(|l| self.info_with(l, v[&l.id]))
            .collect()
    }

    fn info_with(&self, l: &Layer, virtual_size: u64) -> LayerInfo {
        let bs = self.block_size as u64;
        LayerInfo {
            name: l.name.clone(),
            parent: l
                .parent
                .and_then(|p| self.catalog.get(p))
                .map(|p| p.name.clone()),
            writable: l.writable,
            size: self.data_blocks(l) * bs,
            virtual_size,
            disk_size: l.disk_size,
            created: rfc3339(l.created_secs, l.created_nanos),
            importing: l.incomplete,
            remote: l.remote,
            fetched: l.remote.then(|| self.data_blocks(l) * bs),
            attrs: l.attrs.clone(),
            id: l.id,
            children: l
                .children
                .iter()
                .filter_map(|c| self.catalog.get(*c))
                .map(|c| c.name.clone())
                .collect(),
        }
    }
}

/// What a new layer is (FORMAT.md §6.1's mode): writable, being imported, or remote.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Writable,
    Importing,
    Remote,
}

/// Attribute changes applied together: a value of None drops the key.
pub type AttrChanges<'a> = &'a [(&'a str, Option<&'a str>)];

fn validate_attrs(layer_name: &str, attrs: AttrChanges<'_>) -> Result<()> {
    match attrs
        .iter()
        .find_map(|(k, v)| crate::format::record::attr_problem(k, *v))
    {
        Some(p) => Err(Error::InvalidInput(format!("layer {layer_name:?}: {p}"))),
        None => Ok(()),
    }
}

impl Inner {
    /// Apply already-validated attribute changes to the open transaction.
    fn change_attrs(&mut self, id: LayerId, attrs: AttrChanges<'_>) -> Result<()> {
        for &(key, value) in attrs {
            let c = Change::Attr {
                layer: id,
                key,
                value,
            };
            self.catalog.change(&mut self.pending, c, |_| {})?;
        }
        Ok(())
    }

    fn rename(&mut self, id: LayerId, from: &str, to: &str) -> Result<()> {
        name::validate(to)?;
        if from == to {
            return Ok(());
        }
        if self.catalog.by_name(to).is_ok() {
            return Err(Error::AlreadyExists(format!(
                "cannot rename layer {from:?}: a layer named {to:?} already exists"
            )));
        }
        let c = Change::Rename {
            layer: id,
            name: to,
        };
        self.catalog.change(&mut self.pending, c, |_| {})
    }
}

impl Store {
    /// Make a layer: a base (`parent` None, `size` required) or a child of a read-only layer
    /// (size defaults to the parent's and may be larger). Costs O(1) whatever the parent holds.
    pub fn create_layer(
        &self,
        layer_name: &str,
        parent: Option<&str>,
        size: Option<u64>,
    ) -> Result<LayerInfo> {
        self.make_layer(layer_name, parent, size, Mode::Writable, &[])
    }

    /// `create_layer` with attributes, in one transaction: no commit can hold the layer
    /// without them.
    pub fn create_layer_with(
        &self,
        layer_name: &str,
        parent: Option<&str>,
        size: Option<u64>,
        attrs: AttrChanges<'_>,
    ) -> Result<LayerInfo> {
        self.make_layer(layer_name, parent, size, Mode::Writable, attrs)
    }

    /// Change attributes of a layer, all or none, in one transaction.
    pub fn set_attrs(&self, layer_name: &str, attrs: AttrChanges<'_>) -> Result<()> {
        validate_attrs(layer_name, attrs)?;
        // The catalog only: nothing here looks at a map, so no wait for a lazy load.
        let mut g = self.write_now()?;
        let id = g.catalog.by_name(layer_name)?.id;
        g.change_attrs(id, attrs)
    }

    /// Give a layer a new name (unused, valid).
    pub fn rename_layer(&self, layer_name: &str, new_name: &str) -> Result<()> {
        let mut g = self.write_now()?;
        let id = g.catalog.by_name(layer_name)?.id;
        g.rename(id, layer_name, new_name)
    }

    /// Make a layer for an import to fill. Until `finish_import` commits it, it is marked
    /// incomplete on disk: even if commits of the open transaction (a live server's) make its
    /// first blocks durable, a crash leaves nothing half-made, because the next writable open
    /// removes incomplete layers.
    pub fn begin_import(
        &self,
        layer_name: &str,
        parent: Option<&str>,
        size: u64,
    ) -> Result<LayerInfo> {
        self.make_layer(layer_name, parent, Some(size), Mode::Importing, &[])
    }

    pub(super) fn make_layer(
        &self,
        layer_name: &str,
        parent: Option<&str>,
        size: Option<u64>,
        mode: Mode,
        attrs: AttrChanges<'_>,
    ) -> Result<LayerInfo> {
        name::validate(layer_name)?;
        validate_attrs(layer_name, attrs)?;
        // A layer is made in the catalog alone, so a container can start, an image be
        // imported or a lazy pull begin while a lazily opened pool's maps load (their reads
        // and writes load what they touch). The load's completion removes the layers a crash
        // left half-imported, not an import begun here (`Store::discard_incomplete`).
        let mut g = self.write_now()?;
        if g.catalog.by_name(layer_name).is_ok() {
            return Err(Error::AlreadyExists(format!(
                "a layer named {layer_name:?} already exists"
            )));
        }
        let (parent_id, disk_size) = match parent {
            None => {
                let size = size.ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "layer {layer_name:?}: a base layer needs --size (or give --parent)"
                    ))
                })?;
                (None, size)
            }
            Some(p) => {
                let pl = g.catalog.by_name(p)?;
                if pl.writable {
                    return Err(Error::Conflict(format!(
                        "parent {p:?} is writable; commit it first (`thinlayer commit {p}`) so it can no longer change under its children"
                    )));
                }
                let size = size.unwrap_or(pl.disk_size);
                if size < pl.disk_size {
                    return Err(Error::InvalidInput(format!(
                        "layer {layer_name:?}: size {size} is smaller than its parent {p:?} ({} bytes)",
                        pl.disk_size
                    )));
                }
                (Some(pl.id), size)
            }
        };
        if disk_size == 0 {
            return Err(Error::InvalidInput(format!(
                "layer {layer_name:?}: size must be more than 0 bytes"
            )));
        }
        let max_disk = crate::layer::map::MAX_PBLOCK.saturating_mul(g.block_size as u64) / 2;
        if disk_size > max_disk {
            return Err(Error::InvalidInput(format!(
                "layer {layer_name:?}: size {disk_size} is larger than the supported {max_disk} bytes"
            )));
        }
        let (secs, nanos) = {
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (d.as_secs(), d.subsec_nanos())
        };
        let c = LayerCreate {
            id: g.catalog.next_id(),
            parent: parent_id,
            disk_size,
            created_secs: secs,
            created_nanos: nanos,
            writable: mode != Mode::Remote,
            incomplete: mode == Mode::Importing,
            remote: mode == Mode::Remote,
            name: layer_name.to_string(),
        };
        let inner = &mut *g;
        inner
            .catalog
            .change(&mut inner.pending, Change::Create(&c), |_| {})?;
        inner.change_attrs(c.id, attrs)?;
        let l = g.catalog.get(c.id).unwrap();
        Ok(g.info(l))
    }

    /// Make a writable layer read-only for good, so it can be a parent.
    pub fn commit_layer(&self, layer_name: &str) -> Result<()> {
        self.seal_layer(layer_name, false, None, &[])
    }

    /// `commit_layer`, and in the same transaction a new name and attribute changes (a
    /// snapshotter commits an active snapshot under its committed name).
    pub fn commit_layer_with(
        &self,
        layer_name: &str,
        new_name: Option<&str>,
        attrs: AttrChanges<'_>,
    ) -> Result<()> {
        self.seal_layer(layer_name, false, new_name, attrs)
    }

    /// Commit a layer `begin_import` made, now that it holds the whole image.
    pub fn finish_import(&self, layer_name: &str) -> Result<()> {
        self.seal_layer(layer_name, true, None, &[])
    }

    /// `finish_import` with attribute changes in the same transaction (a received layer
    /// commits together with its content IDs).
    pub fn finish_import_with(&self, layer_name: &str, attrs: AttrChanges<'_>) -> Result<()> {
        self.seal_layer(layer_name, true, None, attrs)
    }

    fn seal_layer(
        &self,
        layer_name: &str,
        import_done: bool,
        new_name: Option<&str>,
        attrs: AttrChanges<'_>,
    ) -> Result<()> {
        validate_attrs(layer_name, attrs)?;
        if let Some(n) = new_name {
            name::validate(n)?;
        }
        // A commit changes the catalog only: no wait for a lazy open's load.
        let mut g = self.write_now()?;
        if let Some(n) = new_name.filter(|&n| n != layer_name) {
            if g.catalog.by_name(n).is_ok() {
                return Err(Error::AlreadyExists(format!(
                    "cannot commit layer {layer_name:?} as {n:?}: a layer named {n:?} already exists"
                )));
            }
        }
        let l = g.catalog.by_name(layer_name)?;
        if l.incomplete && !import_done {
            return Err(Error::Conflict(format!(
                "layer {layer_name:?} is still being imported"
            )));
        }
        if !l.writable {
            return Err(Error::Conflict(format!(
                "layer {layer_name:?} is already committed (read-only)"
            )));
        }
        let id = l.id;
        let inner = &mut *g;
        // Every check is done: none of these can fail now, so the transaction gets all or none.
        inner
            .catalog
            .change(&mut inner.pending, Change::Commit(id), |_| {})?;
        inner.change_attrs(id, attrs)?;
        if let Some(n) = new_name {
            inner.rename(id, layer_name, n)?;
        }
        Ok(())
    }

    /// Remove a layer without children and free its blocks. While a lazily opened pool's
    /// maps load, the layer's own ranges load first (the removal frees every block its map
    /// holds, and the completion un-claims them, §5.3); the rest of the load is not waited
    /// for.
    pub fn remove_layer(&self, layer_name: &str) -> Result<()> {
        let mut g = loop {
            let id = self.read_now().catalog.by_name(layer_name)?.id;
            self.load_layer(id)?;
            let g = self.write_now()?;
            // Between the two locks the name may have gone to another layer, whose ranges
            // may not be loaded: then load those.
            let now = g.catalog.by_name(layer_name)?.id;
            if g.lazy.as_ref().is_none_or(|l| !l.has_unloaded(now)) {
                break g;
            }
            debug_assert_ne!(now, id, "load_layer left {layer_name:?} unloaded");
        };
        let inner = &mut *g;
        let l = inner.catalog.by_name(layer_name)?;
        if !l.children.is_empty() {
            let names: Vec<String> = l
                .children
                .iter()
                .filter_map(|c| inner.catalog.get(*c))
                .map(|c| format!("{:?}", c.name))
                .collect();
            return Err(Error::Conflict(format!(
                "layer {layer_name:?} has children ({}); remove them first",
                names.join(", ")
            )));
        }
        let id = l.id;
        let alloc = &mut inner.pool.alloc;
        inner
            .catalog
            .change(&mut inner.pending, Change::Remove(id), |p| alloc.free(p))
    }

    /// A layer's description. Like every listing here it answers while a lazily opened
    /// pool's maps load: the blocks of ranges not loaded yet are counted from the counters
    /// the checkpoint stored (`Inner::data_blocks`), as `df` counts them.
    pub fn layer(&self, layer_name: &str) -> Result<LayerInfo> {
        let g = self.read_now();
        let l = g.layer_by_name(layer_name)?;
        Ok(g.info(l))
    }

    /// What serving a layer needs to know of it, without waiting for a lazily opened pool's
    /// maps (`layer` counts their blocks): its id, name, size and mode.
    pub fn layer_head(&self, layer_name: &str) -> Result<LayerHead> {
        let g = self.read_now();
        let l = g.layer_by_name(layer_name)?;
        Ok(LayerHead {
            id: l.id,
            name: l.name.clone(),
            disk_size: l.disk_size,
            writable: l.writable,
            importing: l.incomplete,
        })
    }

    /// `layer_head` of every layer, parents before children, each with its parent's name:
    /// what listing exports needs, without waiting for a lazily opened pool's maps.
    pub fn layer_heads(&self) -> Vec<(LayerHead, Option<String>)> {
        let g = self.read_now();
        g.catalog
            .layers()
            .map(|l| {
                let parent = l
                    .parent
                    .and_then(|p| g.catalog.get(p))
                    .map(|p| p.name.clone());
                let head = LayerHead {
                    id: l.id,
                    name: l.name.clone(),
                    disk_size: l.disk_size,
                    writable: l.writable,
                    importing: l.incomplete,
                };
                (head, parent)
            })
            .collect()
    }

    /// The remote layers (`pull --lazy`), as `layers` gives them, without waiting for a
    /// lazily opened pool's maps (the serve's start asks, to resume their fills).
    pub fn remote_layers(&self) -> Vec<LayerInfo> {
        let remote: Vec<LayerId> = {
            let g = self.read_now();
            g.catalog
                .layers()
                .filter(|l| l.remote)
                .map(|l| l.id)
                .collect()
        };
        if remote.is_empty() {
            return Vec::new();
        }
        // A fill resumes from a remote layer's whole map (which chunks are fetched): their
        // ranges load first, the other layers' are not waited for. A range that fails to
        // load is not this listing's to report: the fill's own calls load what they touch
        // and fail naming it.
        for id in remote {
            let _ = self.load_layer(id);
        }
        self.read_now()
            .infos()
            .into_iter()
            .filter(|l| l.remote)
            .collect()
    }

    /// Every layer, parents before children.
    pub fn layers(&self) -> Vec<LayerInfo> {
        self.read_now().infos()
    }

    /// The chain from `layer_name` down to its base, like `docker history`.
    pub fn history(&self, layer_name: &str) -> Result<Vec<LayerInfo>> {
        let g = self.read_now();
        let l = g.layer_by_name(layer_name)?;
        Ok(g.catalog.chain(l.id).iter().map(|l| g.info(l)).collect())
    }

    pub fn usage(&self) -> Result<PoolUsage> {
        // Answers while the maps load, as far as is known (`PoolUsage::loading`).
        let g = self.read_now();
        let bs = g.block_size as u64;
        let data_blocks: u64 = g.catalog.layers().map(|l| g.data_blocks(l)).sum();
        let virtual_total = g.virtual_sizes().values().sum::<u64>();
        let meta_blocks = g.metadata_blocks();
        let first = crate::format::first_data_block(g.block_size);
        let alloc = &g.pool.alloc;
        let loading = alloc.loading_floor().is_some();
        let used = if loading {
            data_blocks + meta_blocks + alloc.pending_frees().count() as u64
        } else {
            alloc.used_count()
        };
        let max_blocks = g.pool.meta.sb.max_blocks;
        Ok(PoolUsage {
            path: self.path().map(|p| p.display().to_string()),
            block_size: g.block_size,
            layers: g.catalog.len(),
            file_size: self
                .storage
                .len()
                .map_err(|e| Error::io("reading pool size", e))?,
            file_allocated: self
                .storage
                .allocated()
                .map_err(|e| Error::io("reading pool size", e))?,
            allocated: (used + first) * bs,
            data_bytes: data_blocks * bs,
            metadata_bytes: meta_blocks * bs,
            free_under_cap: match loading {
                true => (max_blocks > 0).then(|| max_blocks.saturating_sub(first + used)),
                false => alloc.free_under_cap(),
            }
            .map(|b| b * bs),
            max_size: (max_blocks > 0).then(|| max_blocks * bs),
            remote_layers: g.catalog.layers().filter(|l| l.remote).count(),
            remote_fetched: g
                .catalog
                .layers()
                .filter(|l| l.remote)
                .map(|l| l.map.data_blocks() * bs)
                .sum(),
            virtual_total,
            sharing_saves: virtual_total.saturating_sub(data_blocks * bs),
            loading,
        })
    }

    /// Heap bytes held by all block maps (for the memory benchmark).
    pub fn map_heap_bytes(&self) -> usize {
        self.read()
            .catalog
            .layers()
            .map(|l| l.map.heap_bytes())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use crate::pool::MemStorage;
    use crate::volume::{CreateOptions, Store};
    use std::sync::Arc;

    /// Attributes and names come back from the log and from a checkpoint alike; a refused
    /// commit-under-a-new-name changes nothing at all.
    #[test]
    fn attributes_and_renames_survive_log_and_checkpoint() {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        s.create_layer("taken", None, Some(1 << 20)).unwrap();
        let attrs = [("containerd.key", Some("default/1/a")), ("x", Some(""))];
        s.create_layer_with("a", None, Some(1 << 20), &attrs)
            .unwrap();
        let e = s
            .commit_layer_with("a", Some("taken"), &[("x", None)])
            .unwrap_err();
        assert!(e.to_string().contains("\"taken\" already exists"), "{e}");
        let a = s.layer("a").unwrap();
        assert!(a.writable);
        assert_eq!(a.attrs.get("x").map(String::as_str), Some(""));
        s.commit_layer_with(
            "a",
            Some("sha256:aa"),
            &[("x", None), ("containerd.kind", Some("committed"))],
        )
        .unwrap();
        s.flush().unwrap();
        let want = |s: &Store| {
            assert!(s.layer("a").is_err());
            let l = s.layer("sha256:aa").unwrap();
            assert!(!l.writable);
            let got: Vec<(&str, &str)> = l
                .attrs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(
                got,
                [
                    ("containerd.key", "default/1/a"),
                    ("containerd.kind", "committed")
                ]
            );
        };
        want(&s);
        drop(s);
        // From the log ...
        let s = Store::open_in(mem.clone(), true).unwrap();
        want(&s);
        // ... and from a checkpoint.
        s.set_checkpoint_threshold(0);
        s.set_attrs("taken", &[("k", Some("v"))]).unwrap();
        s.flush().unwrap();
        drop(s);
        let s = Store::open_in(mem, false).unwrap();
        want(&s);
        assert_eq!(s.layer("taken").unwrap().attrs["k"], "v");
    }

    /// A pool whose committed layer "base" (1 GiB) holds `n` scattered single blocks (many
    /// ranges in a checkpoint's index): block `i * 37 % 200000` holds bytes of `i % 250 + 1`.
    fn scattered_base(n: u64) -> (Arc<MemStorage>, Store) {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let base = s.create_layer("base", None, Some(1 << 30)).unwrap().id;
        for i in 0..n {
            s.write_layer(
                base,
                (i * 37 % 200_000) * 4096,
                &[(i % 250) as u8 + 1; 4096],
            )
            .unwrap();
        }
        s.commit_layer("base").unwrap();
        (mem, s)
    }

    /// Open `mem` lazily and run `f` on it in another thread while nothing loads the maps
    /// in the background: a call that waits for the load would wait for ever, so the 120 s
    /// guard fails it. Returns the store, its maps still loading, and what `f` returned.
    fn before_the_load<T: Send + 'static>(
        mem: &Arc<MemStorage>,
        f: impl FnOnce(&Store) -> T + Send + 'static,
    ) -> (Arc<Store>, T) {
        let s = Arc::new(Store::open_in_lazy(mem.clone(), true).unwrap());
        assert!(!s.is_loaded());
        let (tx, rx) = std::sync::mpsc::channel();
        let t = {
            let s = s.clone();
            std::thread::spawn(move || tx.send(f(&s)).unwrap())
        };
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("a layer change or listing waited for the maps' load");
        t.join().unwrap();
        assert!(!s.is_loaded(), "the load completed early");
        (s, got)
    }

    /// While a lazily opened pool's maps load, a container's layer is made, written,
    /// committed, renamed and listed without waiting for the load (nothing here loads the
    /// maps in the background, so a wait would never end: the 120 s guard fails it), with the
    /// sizes an eager open gives; the load then completes over it and a reopen holds it all.
    #[test]
    fn layers_are_made_committed_and_listed_while_the_maps_load() {
        const BS: u64 = 4096;
        let (mem, s) = scattered_base(6000);
        s.set_checkpoint_threshold(0);
        s.flush().unwrap();
        drop(s);
        let eager_base = Store::open_in(mem.clone(), false)
            .unwrap()
            .layer("base")
            .unwrap();

        let (s, (made, (all, history, base_now))) = before_the_load(&mem, |s| {
            let made = s.create_layer("c", Some("base"), None).unwrap();
            s.write_layer(made.id, 37 * BS, &[9; 4096]).unwrap();
            s.flush().unwrap();
            s.commit_layer_with("c", Some("c2"), &[("k", Some("v"))])
                .unwrap();
            s.set_attrs("c2", &[("k2", Some("w"))]).unwrap();
            s.rename_layer("c2", "c3").unwrap();
            s.flush().unwrap();
            let listed = (
                s.layers(),
                s.history("c3").unwrap(),
                s.layer("base").unwrap(),
            );
            (made, listed)
        });
        assert_eq!(made.virtual_size, eager_base.virtual_size);
        assert_eq!(base_now.size, eager_base.size);
        assert_eq!(base_now.virtual_size, eager_base.virtual_size);
        let c = all.iter().find(|l| l.name == "c3").unwrap();
        assert!(!c.writable);
        assert_eq!(c.size, BS);
        assert_eq!(c.virtual_size, eager_base.virtual_size + BS);
        assert_eq!(history.len(), 2);
        assert_eq!(history[1].size, eager_base.size);

        s.complete_in_background().unwrap().join().unwrap();
        assert!(s.is_loaded());
        let loaded = s.layer("c3").unwrap();
        assert_eq!((loaded.size, loaded.virtual_size), (c.size, c.virtual_size));
        s.verify_consistency().unwrap();
        drop(s);
        let report = crate::check::check(mem.clone(), true, &mut |_, _| {}).unwrap();
        assert!(report.is_clean(), "{:?}", report.faults);
        let s = Store::open_in(mem, false).unwrap();
        let l = s.layer("c3").unwrap();
        assert!(!l.writable);
        assert_eq!(l.attrs["k"], "v");
        assert_eq!(l.attrs["k2"], "w");
        let mut got = vec![0; 4096];
        s.read_layer(l.id, 37 * BS, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 9), "the layer's own block");
        s.read_layer(l.id, 74 * BS, &mut got).unwrap();
        assert!(
            got.iter().all(|&b| b == 3),
            "base's block 74 (i = 2) through the chain"
        );
    }

    /// While a lazily opened pool's maps load, a committed layer is removed (its own ranges
    /// load first: it frees every block it maps), an image is imported and a lazy pull's
    /// remote layer made and filled, all without waiting for the load (nothing
    /// here loads the maps in the background: the 120 s guard fails a wait). The load's
    /// completion then removes the layer a crash left half-imported before the open, but
    /// not one whose import began in this process; the allocator it rebuilds holds what an
    /// eager open that made the same changes holds, and `check` is clean.
    #[test]
    fn layers_are_removed_and_imported_while_the_maps_load() {
        const BS: u64 = 4096;
        let (mem, s) = scattered_base(3000);
        let gone = s.create_layer("gone", Some("base"), None).unwrap().id;
        for i in 0..3000u64 {
            s.write_layer(gone, (i * 53 % 200_000) * BS, &[7; 4096])
                .unwrap();
        }
        s.commit_layer("gone").unwrap();
        let half = s.begin_import("half", None, 64 * BS).unwrap().id;
        s.write_layer(half, 0, &[5; 4096]).unwrap();
        s.set_checkpoint_threshold(0);
        s.flush().unwrap();
        drop(s);

        // The same changes, each store its own copy of the pool.
        let changes = |s: &Store| {
            s.remove_layer("gone").unwrap();
            let img = s.begin_import("img", Some("base"), 1 << 30).unwrap().id;
            s.write_layer_bulk(img, 37 * BS, &[8; 2 * 4096]).unwrap();
            s.finish_import_with("img", &[("k", Some("v"))]).unwrap();
            let pending = s.begin_import("pending", None, 64 * BS).unwrap().id;
            s.write_layer_bulk(pending, 0, &[6; 4096]).unwrap();
            let r = s
                .create_remote_layer("r", Some("img"), 1 << 30, &[], &[(BS, BS)])
                .unwrap()
                .id;
            s.fill_remote(r, 0, &[4; 4096]).unwrap();
            let lacks = s.remote_lacks(r, 0, 2 * BS).unwrap();
            s.flush().unwrap();
            (img, lacks)
        };
        let eager = Store::open_in(Arc::new(MemStorage::from_bytes(mem.snapshot())), true).unwrap();
        let (_, eager_lacks) = changes(&eager);

        let (s, ((img, lacks), listed)) = before_the_load(&mem, move |s| {
            let done = changes(s);
            (done, s.layers())
        });
        assert_eq!(lacks, eager_lacks);
        // What `ls` shows but the creation times (each store made its layers itself).
        let shown = |ls: Vec<crate::volume::LayerInfo>| {
            let mut ls: Vec<_> = ls
                .into_iter()
                .map(|l| crate::volume::LayerInfo {
                    created: String::new(),
                    ..l
                })
                .collect();
            ls.sort_by(|a, b| a.name.cmp(&b.name));
            ls
        };
        let listed = shown(listed);
        let names: Vec<&str> = listed.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["base", "half", "img", "pending", "r"]);
        // The eager open removed the crash's half import at once; the lazy one, at the end.
        let listed: Vec<_> = listed.into_iter().filter(|l| l.name != "half").collect();
        assert_eq!(listed, shown(eager.layers()));

        s.complete_in_background().unwrap().join().unwrap();
        assert!(s.is_loaded());
        assert_eq!(s.discarded(), ["half"], "only the crash's half import goes");
        assert_eq!(eager.discarded(), ["half"]);
        assert_eq!(shown(s.layers()), shown(eager.layers()));
        assert_eq!(s.used_blocks(), eager.used_blocks());
        s.verify_consistency().unwrap();
        s.finish_import("pending").unwrap();
        s.flush().unwrap();
        drop(s);
        let report = crate::check::check(mem.clone(), true, &mut |_, _| {}).unwrap();
        assert!(report.is_clean(), "{:?}", report.faults);
        let s = Store::open_in(mem, false).unwrap();
        assert!(s.layer("gone").is_err() && s.layer("half").is_err());
        assert!(!s.layer("pending").unwrap().importing);
        let mut got = vec![0; 4096];
        s.read_layer(img, 38 * BS, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 8), "the import's block");
        s.read_layer(img, 74 * BS, &mut got).unwrap();
        assert!(
            got.iter().all(|&b| b == 3),
            "base's block 74 (i = 2) through the chain"
        );
    }

    #[test]
    fn creation_times_past_year_9999_print_without_panicking() {
        assert_eq!(super::rfc3339(0, 0), "1970-01-01T00:00:00Z");
        assert!(super::rfc3339(u64::MAX, u32::MAX).contains("not a valid date"));
    }
}
