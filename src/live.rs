//! The live pool's rules, in one place for every frontend: the control socket (and the CLI
//! without a server), the containerd snapshotter and the registry all change layers through
//! `LivePool`, never round it.
//!
//! The rules: a layer an NBD connection or a live file holds is not committed (while a
//! writable holder could still change it) nor removed, unless `--force` cuts the holders off
//! first; each change is one transaction, flushed before the call returns; a layer committed
//! or imported gets its content IDs recorded; an import is filled as an incomplete layer that
//! is committed whole or removed (`Store::importing`).

use crate::error::Result;
use crate::image::{DiffSink, ImportStats};
use crate::stream::send::DiffDigest;
use crate::stream::{content, ContentIds, Digest, ReceiveStats};
use crate::volume::exports::LiveExports;
use crate::volume::{AttrChanges, LayerInfo, Store};
use std::fs::File;
use std::io::Read;

/// A store and, on a live server, its exports (who holds which layer). Cheap: make one per
/// request.
#[derive(Clone, Copy)]
pub struct LivePool<'a> {
    store: &'a Store,
    exports: Option<&'a LiveExports>,
}

impl<'a> LivePool<'a> {
    /// A pool without holders: the CLI that opened the pool itself.
    pub fn direct(store: &'a Store) -> LivePool<'a> {
        LivePool {
            store,
            exports: None,
        }
    }

    /// A live server's pool, whose exports' holders protect their layers.
    pub fn serving(exports: &'a LiveExports) -> LivePool<'a> {
        LivePool {
            store: exports.store(),
            exports: Some(exports),
        }
    }

    pub fn store(&self) -> &'a Store {
        self.store
    }

    /// Make layer `name` (over `parent`, or a base of `size` bytes) with `attrs`, durable.
    pub fn create(
        &self,
        name: &str,
        parent: Option<&str>,
        size: Option<u64>,
        attrs: AttrChanges<'_>,
    ) -> Result<LayerInfo> {
        let info = self.store.create_layer_with(name, parent, size, attrs)?;
        self.store.flush()?;
        Ok(info)
    }

    /// Make read-only remote layer `name` (`pull --lazy`, DESIGN.md §13) over `parent`:
    /// `size` bytes, `attrs`, the whiteouts `zeros`; durable. Its data is fetched later.
    pub fn create_remote(
        &self,
        name: &str,
        parent: Option<&str>,
        size: u64,
        attrs: AttrChanges<'_>,
        zeros: &[(u64, u64)],
    ) -> Result<LayerInfo> {
        let info = self
            .store
            .create_remote_layer(name, parent, size, attrs, zeros)?;
        self.store.flush()?;
        Ok(info)
    }

    /// Seal layer `name` read-only (renamed to `new_name` if given) with `attrs`, durable,
    /// and record its content IDs. Refused (`InUse`) while a writable holder has it: writes
    /// must not change a layer while it becomes read-only.
    pub fn commit(&self, name: &str, new_name: Option<&str>, attrs: AttrChanges<'_>) -> Result<()> {
        self.seal(name, new_name, attrs)?;
        // The content IDs: one read of the layer's own blocks, after the commit and off the
        // write lock. A crash before they are kept only means they are computed when first
        // asked for. Over a remote layer not all fetched yet they cannot be computed
        // (`Conflict`): they are left for later likewise.
        match content::record(self.store, new_name.unwrap_or(name)) {
            Err(e) if e.kind() != crate::error::Kind::Conflict => Err(e),
            _ => Ok(()),
        }
    }

    /// As `commit`, but the content IDs are left to whoever first asks for them
    /// (`content::ids` and `content::fill` compute and keep them), as after a crash between
    /// a commit and their recording. For the containerd snapshotter: containerd keeps its own
    /// digests of what it unpacks and never asks for these, and hashing every block of a
    /// freshly unpacked layer is a read of all of it inside the Commit containerd waits for.
    pub fn commit_ids_on_demand(
        &self,
        name: &str,
        new_name: Option<&str>,
        attrs: AttrChanges<'_>,
    ) -> Result<()> {
        self.seal(name, new_name, attrs)
    }

    /// Make layer `name` read-only, durable: the commit rule and the transaction.
    fn seal(&self, name: &str, new_name: Option<&str>, attrs: AttrChanges<'_>) -> Result<()> {
        if let Some(x) = self.exports {
            let id = self.store.layer(name)?.id;
            let why = " (writes must not change a layer while it becomes read-only)";
            x.refuse_if_attached(name, id, true, why)?;
        }
        self.store.commit_layer_with(name, new_name, attrs)?;
        self.store.flush()
    }

    /// Remove layer `name`, durable; returns the bytes it held. Refused (`InUse`) while
    /// anyone holds it, unless `force`: then the holders are cut off first (their I/O fails
    /// with EIO from then on), and `cut_off` hears how many.
    pub fn remove(&self, name: &str, force: bool, cut_off: &mut dyn FnMut(usize)) -> Result<u64> {
        let info = self.store.layer(name)?;
        if let Some(x) = self.exports {
            // A layer with children is refused below: don't cut anyone off for nothing.
            if force && info.children.is_empty() {
                let n = x.revoke(info.id);
                if n > 0 {
                    cut_off(n);
                }
            } else if !force {
                x.refuse_if_attached(name, info.id, false, ", or use rm --force")?;
            }
        }
        self.store.remove_layer(name)?;
        self.store.flush()?;
        Ok(info.size)
    }

    /// Change attributes of layer `name` in one transaction, durable.
    pub fn set_attrs(&self, name: &str, attrs: AttrChanges<'_>) -> Result<()> {
        self.store.set_attrs(name, attrs)?;
        self.store.flush()
    }

    /// Import the raw image `f` (named `label` in errors) as read-only layer `name`, with its
    /// content IDs recorded.
    pub fn import(
        &self,
        name: &str,
        parent: Option<&str>,
        f: &File,
        label: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(LayerInfo, ImportStats)> {
        // The content IDs are hashed from what the import writes, in the same pass, and
        // committed with the layer: one read of the image, one commit.
        let parent_chain = match parent {
            Some(p) => Some(content::ids(self.store, p)?.chain_id),
            None => None,
        };
        let size = f
            .metadata()
            .map_err(|e| crate::error::Error::io(format!("reading {label}"), e))?
            .len();
        let mut ids = ImportIds {
            hash: Some(DiffDigest::new(self.store.block_size(), size, parent_chain)),
            parent_chain,
        };
        crate::image::import_from(self.store, name, f, label, parent, progress, &mut ids)
    }

    /// Receive a send stream as read-only layer `name` (its content IDs are the stream's),
    /// refused unless its digest is `expect` when given.
    pub fn receive(
        &self,
        name: &str,
        parent: Option<&str>,
        expect: Option<Digest>,
        input: &mut dyn Read,
        label: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(LayerInfo, ReceiveStats)> {
        crate::stream::receive_checked(self.store, name, parent, expect, input, label, progress)
    }
}

/// An import's content IDs, hashed from the blocks it stores.
struct ImportIds {
    hash: Option<DiffDigest>,
    parent_chain: Option<Digest>,
}

impl DiffSink for ImportIds {
    fn data(&mut self, offset: u64, bytes: &[u8], ends: bool) {
        if let Some(h) = &mut self.hash {
            h.data(offset, bytes, ends);
        }
    }
    fn zero(&mut self, offset: u64, len: u64) {
        if let Some(h) = &mut self.hash {
            h.zero(offset, len);
        }
    }
    fn attrs(&mut self) -> Vec<(&'static str, String)> {
        let Some(h) = self.hash.take() else {
            return Vec::new();
        };
        let (digest, stats) = h.finish();
        ContentIds::new(self.parent_chain, digest, stats.bytes)
            .attrs()
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, Kind};
    use crate::pool::MemStorage;
    use crate::stream::ContentIds;
    use crate::volume::exports::Holder;
    use crate::volume::CreateOptions;
    use std::sync::Arc;

    fn exports() -> LiveExports {
        let store = Store::create_in(Arc::new(MemStorage::new()), &CreateOptions::default());
        LiveExports::new(Arc::new(store.unwrap()), Vec::new())
    }

    #[test]
    fn a_held_layer_is_neither_committed_nor_removed_and_force_cuts_off() {
        let x = exports();
        let p = LivePool::serving(&x);
        p.create("web", None, Some(1 << 20), &[]).unwrap();
        let dev = x.hold("web", "unix client #1", Holder::Nbd).unwrap();
        for e in [
            p.commit("web", None, &[]).unwrap_err(),
            p.remove("web", false, &mut |_| {}).unwrap_err(),
        ] {
            let Error::InUse { holders, .. } = &e else {
                panic!("{e:?}")
            };
            assert_eq!(holders, &["unix client #1"]);
        }
        assert!(p.store().layer("web").unwrap().writable);
        let mut cut = 0;
        p.remove("web", true, &mut |n| cut = n).unwrap();
        assert_eq!(cut, 1);
        assert!(dev.attachment().is_revoked());
        assert_eq!(p.store().layer("web").unwrap_err().kind(), Kind::NotFound);
    }

    #[test]
    fn a_committed_layer_has_its_content_ids_and_its_new_name() {
        let x = exports();
        let p = LivePool::serving(&x);
        p.create("w", None, Some(1 << 20), &[]).unwrap();
        p.store()
            .write_layer(p.store().layer("w").unwrap().id, 0, &[1; 4096])
            .unwrap();
        p.commit("w", Some("sealed"), &[("k", Some("v"))]).unwrap();
        let l = p.store().layer("sealed").unwrap();
        assert!(!l.writable);
        assert!(ContentIds::of(&l).is_some(), "{:?}", l.attrs);
        assert_eq!(l.attrs["k"], "v");
    }

    /// The IDs an import hashes as it writes are the ones a second read (`send`) computes:
    /// data runs crossing a 4 MiB cut, whiteouts over the parent's data, blocks equal to the
    /// parent's (not stored), holes (not read), and a short last block. Over a pool in memory
    /// and over a pool file, where the import's blocks are written with O_DIRECT.
    #[test]
    fn an_import_hashes_the_stream_send_would_write() {
        // In the source tree, not /tmp: a tmpfs /tmp would not take the O_DIRECT path.
        let file = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let on_file = Store::create_in(
            Arc::new(crate::pool::storage::FileStorage::new(file)),
            &CreateOptions::default(),
        );
        let on_file = LiveExports::new(Arc::new(on_file.unwrap()), Vec::new());
        for x in [exports(), on_file] {
            an_import_hashes_the_stream_send_would_write_in(&x);
        }
    }

    fn an_import_hashes_the_stream_send_would_write_in(x: &LiveExports) {
        let p = LivePool::serving(x);
        let dir = tempfile::tempdir().unwrap();
        let mib = 1usize << 20;
        let mut base = vec![0u8; 12 * mib];
        for (i, b) in base.iter_mut().enumerate().take(7 * mib) {
            *b = (i / 4096 % 251 + 1) as u8;
        }
        base[5 * mib..6 * mib].fill(0); // a hole in the file, between data
        let mut child = base.clone();
        child.extend(vec![0u8; 3 * mib + 1000]); // bigger than its parent, short last block
        child[2 * mib..3 * mib].fill(0); // whiteouts
        child[3 * mib + 4096..5 * mib].fill(9); // data across the 4 MiB cut
        child[9 * mib..10 * mib].fill(7); // data over the parent's zeros
        let n = child.len();
        child[n - 500..].fill(3);
        // Without a parent and not starting at a 4 MiB cut: the 4 MiB chunks read end inside
        // runs that go on in the next chunk.
        let mut shifted = vec![0u8; 12 * mib];
        for (i, b) in shifted
            .iter_mut()
            .enumerate()
            .skip(mib + 4096)
            .take(9 * mib)
        {
            *b = (i / 4096 % 13 + 1) as u8;
        }
        let images = [
            ("base", &base, None),
            ("child", &child, Some("base")),
            ("shifted", &shifted, None),
        ];
        for (name, bytes, parent) in images {
            let path = dir.path().join(name);
            // Sparse: whole MiBs of zeros are holes, read (or not) through SEEK_DATA/SEEK_HOLE.
            let w = std::fs::File::create(&path).unwrap();
            w.set_len(bytes.len() as u64).unwrap();
            for (k, m) in bytes.chunks(mib).enumerate() {
                if m.iter().any(|&b| b != 0) {
                    std::os::unix::fs::FileExt::write_all_at(&w, m, (k * mib) as u64).unwrap();
                }
            }
            drop(w);
            let f = std::fs::File::open(&path).unwrap();
            let (l, st) = p.import(name, parent, &f, name, &mut |_, _| {}).unwrap();
            if name == "base" {
                assert_eq!(st.bytes_read, 6 * mib as u64, "holes are not read");
            }
            let mut back = vec![0u8; bytes.len()];
            p.store().read_layer(l.id, 0, &mut back).unwrap();
            assert!(back == *bytes, "{name} reads back as imported");
            let got = ContentIds::of(&l).expect("an import records its content IDs");
            let parent_chain = parent.map(|q| content::ids(p.store(), q).unwrap().chain_id);
            let (digest, st) = crate::stream::send::digest(p.store(), name, parent_chain).unwrap();
            assert_eq!(
                got,
                ContentIds::new(parent_chain, digest, st.bytes),
                "{name}"
            );
            // And the digests binaries before now computed for these images (main at 5360685,
            // `thinlayer import` of the same files): whatever changes in how the stream is
            // hashed, a layer keeps its name.
            let before = match name {
                "base" => "sha256:efca4a290ed6bf7d977ccab697f5c55a6d111402ed622597b632f2483120388d",
                "child" => {
                    "sha256:246bb03618afb9ae5c83715ad57ca923e2d4ec92053dcb4c6de955d3a5491f41"
                }
                _ => continue,
            };
            assert_eq!(got.digest.to_string(), before, "{name}");
        }
    }
}
