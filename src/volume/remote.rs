//! Remote layers (FORMAT.md §6.1 mode 3, DESIGN.md §13): read-only layers whose content is a
//! registry blob of which only what their map names is local. The volume knows nothing of
//! registries: a frontend attaches a `RemoteSource` per remote layer, which says which blocks
//! the blob has data for and makes one local on demand (fetch, verify, `fill_remote`).
//!
//! The rule this file keeps: a block the blob lists and the layer does not map is *never* read
//! through to the parent. Every read and every copy-on-write read of a chain with a remote
//! layer first makes its blocks local (`make_local`, without the store's lock held while the
//! source fetches), and the read itself refuses a block that is still missing (`first_gap`),
//! so not even a race can serve the parent's bytes. A remote layer without a source (no server
//! attached one, or a read-only open) refuses all its unmapped blocks.

use super::store::{Inner, Store};
use crate::error::{Error, Result};
use crate::format::{LayerId, VBlock};
use crate::layer::Change;
use std::collections::HashMap;
use std::sync::Arc;

/// The seam between the volume and whatever holds a remote layer's blob (the registry
/// frontend; an in-memory twin in tests).
pub trait RemoteSource: Send + Sync {
    /// Whether the blob lists block `vb` (data or a whiteout): unmapped, such a block is not
    /// local yet. Whiteouts count, so a whiteout not yet in the map is never read through.
    fn listed(&self, vb: VBlock) -> bool;
    /// Make block `vb` of `layer` local: fetch the extent that holds it, verify it and store it
    /// with `Store::fill_remote`. The read that needs it goes on to block `end` (exclusive):
    /// the source may make more of `vb..end` local with the same request. Blocks until then or
    /// the source's deadline; an error is what the read that needed the block fails with (EIO
    /// to a block client).
    fn fetch(&self, store: &Store, layer: LayerId, vb: VBlock, end: VBlock) -> Result<()>;
}

pub type Remotes = HashMap<LayerId, Arc<dyn RemoteSource>>;

impl Inner {
    /// The first block of `vb0..vb0+n` that the chain topped by `top` would read from a remote
    /// layer that does not hold it yet: that layer and the block.
    pub(crate) fn first_gap(&self, top: LayerId, vb0: u64, n: u64) -> Option<(LayerId, VBlock)> {
        if !self.catalog.has_remote() {
            return None;
        }
        let listed = |l: LayerId, vb: VBlock| self.remotes.get(&l).is_none_or(|s| s.listed(vb));
        (vb0..vb0 + n).find_map(|vb| {
            let vb = VBlock(vb);
            self.catalog.remote_gap(top, vb, listed).map(|l| (l, vb))
        })
    }

    /// Remote layer `id`, or why it is not one.
    fn remote_layer(&self, id: LayerId) -> Result<&crate::layer::Layer> {
        let l = self
            .catalog
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("layer {id} no longer exists")))?;
        if !l.remote {
            return Err(Error::Conflict(format!(
                "{} is not remote (or no longer: all of it is local)",
                l.describe()
            )));
        }
        Ok(l)
    }

    /// The error of a read that met block `vb` of remote layer `l` not local.
    pub(crate) fn not_local(&self, l: LayerId, vb: VBlock) -> Error {
        let what = self
            .catalog
            .get(l)
            .map_or(format!("layer {l}"), |l| l.describe());
        let at = vb.0 * self.block_size as u64;
        if self.remotes.contains_key(&l) {
            Error::Unavailable(format!("{what}: the block at byte {at} is not fetched yet"))
        } else {
            Error::Unavailable(format!(
                "{what}: the block at byte {at} is remote (not fetched yet), and nothing here fetches it: read it through the server that pulled the layer (`thinlayer serve`)"
            ))
        }
    }
}

impl Store {
    /// Attach the source of remote layer `id`'s missing blocks (replacing any before).
    pub fn attach_remote(&self, id: LayerId, source: Arc<dyn RemoteSource>) -> Result<()> {
        let mut g = self.write_now()?;
        g.remote_layer(id)?;
        g.remotes.insert(id, source);
        Ok(())
    }

    /// Make a read-only remote layer at once: its size, parent and attributes, and the
    /// whiteouts its blob lists (`zeros`: byte ranges, block-aligned but for the layer's
    /// end), which need no fetch. Its data comes later through `fill_remote`.
    pub fn create_remote_layer(
        &self,
        layer_name: &str,
        parent: Option<&str>,
        size: u64,
        attrs: super::AttrChanges<'_>,
        zeros: &[(u64, u64)],
    ) -> Result<super::LayerInfo> {
        let bs = self.block_size() as u64;
        if let Some(&(o, n)) = zeros.iter().find(|(o, n)| {
            o % bs != 0
                || o.checked_add(*n)
                    .is_none_or(|e| e > size || (e % bs != 0 && e != size))
        }) {
            return Err(Error::InvalidInput(format!(
                "layer {layer_name:?}: whiteout at byte {o} of {n} bytes is not whole blocks of the layer"
            )));
        }
        let info = self.make_layer(
            layer_name,
            parent,
            Some(size),
            super::layers::Mode::Remote,
            attrs,
        )?;
        // A new layer: no range of its map is on disk, so a lazy open's load is not waited for.
        let mut g = self.write_now()?;
        let inner = &mut *g;
        for &(o, n) in zeros {
            for vb in o / bs..(o + n).div_ceil(bs) {
                let c = Change::Map {
                    layer: info.id,
                    vblock: VBlock(vb),
                    to: Some(crate::layer::Mapping::Zero),
                };
                inner.catalog.change(&mut inner.pending, c, |_| {})?;
            }
        }
        Ok(info)
    }

    /// Store fetched, verified bytes of remote layer `id` at `offset` (block-aligned; the data
    /// may end inside the layer's last block). Blocks the layer holds already are left as they
    /// are: a fill only ever adds what was missing.
    pub fn fill_remote(&self, id: LayerId, offset: u64, data: &[u8]) -> Result<()> {
        self.with_room(|| self.fill_remote_once(id, offset, data))
    }

    fn fill_remote_once(&self, id: LayerId, offset: u64, data: &[u8]) -> Result<()> {
        // The blocks it holds already are kept: while a lazy open's maps load, the ranges
        // naming them load first, as a write's do.
        self.load_for(id, offset, data.len() as u64)?;
        let mut g = self.write_now()?;
        let bs = g.block_size as u64;
        let l = g.remote_layer(id)?;
        let end = offset.checked_add(data.len() as u64);
        if !offset.is_multiple_of(bs) || end.is_none_or(|e| e > l.disk_size) {
            return Err(Error::InvalidInput(format!(
                "{}: fill at byte {offset} of {} bytes is not inside it on a block boundary",
                l.describe(),
                data.len()
            )));
        }
        g.fill(&*self.storage, id, offset / bs, data)
    }

    /// The remote layer `id` holds all its blob now: it becomes an ordinary read-only layer
    /// (a layer commit record clears mode 3) and its source is let go.
    pub fn finish_remote(&self, id: LayerId) -> Result<()> {
        // Whether any block is still missing is asked of its whole map.
        self.load_layer(id)?;
        let mut g = self.write_now()?;
        let l = g.remote_layer(id)?;
        let disk_blocks = l.disk_size.div_ceil(g.block_size as u64);
        if let Some((_, vb)) = g.first_gap(id, 0, disk_blocks).filter(|(o, _)| *o == id) {
            return Err(g.not_local(id, vb));
        }
        let inner = &mut *g;
        inner
            .catalog
            .change(&mut inner.pending, Change::Commit(id), |_| {})?;
        inner.remotes.remove(&id);
        Ok(())
    }

    /// Whether remote layer `id` lacks any block of `offset..offset+len` in its own map: what
    /// a background fill skips when it is false.
    pub fn remote_lacks(&self, id: LayerId, offset: u64, len: u64) -> Result<bool> {
        self.load_for(id, offset, len)?;
        let g = self.read_now();
        let bs = g.block_size as u64;
        let l = g.remote_layer(id)?;
        let end = offset.saturating_add(len).min(l.disk_size);
        Ok((offset / bs..end.div_ceil(bs)).any(|vb| l.map.get(VBlock(vb)).is_none()))
    }

    /// Make blocks `offset..offset+len` of the chain topped by `top` local: each missing one
    /// is fetched by its layer's source, without the store's lock held. A range past the
    /// layer's end is left to the read to refuse.
    pub(crate) fn make_local(&self, top: LayerId, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let bs = self.block_size() as u64;
        let mut vb = offset / bs;
        let stop = (offset.saturating_add(len) - 1) / bs + 1;
        loop {
            let (l, gap, source) = {
                if !self.read_now().catalog.has_remote() {
                    return Ok(());
                }
                self.load_for(top, offset, len)?;
                let g = self.read_now();
                if !g.catalog.has_remote() {
                    return Ok(());
                }
                let Some(t) = g.catalog.get(top) else {
                    return Ok(());
                };
                let stop = stop.min(t.disk_size.div_ceil(bs));
                let Some((l, gap)) = g.first_gap(top, vb, stop.saturating_sub(vb)) else {
                    return Ok(());
                };
                match g.remotes.get(&l) {
                    Some(s) => (l, gap, s.clone()),
                    None => return Err(g.not_local(l, gap)),
                }
            };
            source.fetch(self, l, gap, VBlock(stop))?;
            let g = self.read_now();
            if g.first_gap(top, gap.0, 1) == Some((l, gap)) {
                return Err(Error::Internal(format!(
                    "{}: the source said the block at byte {} was fetched, but it is not stored",
                    g.catalog.get(l).map_or(l.to_string(), |x| x.describe()),
                    gap.0 * bs
                )));
            }
            vb = gap.0;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The read path against an in-memory twin of the registry frontend: a real version-2
    //! stream opened by range, its extents verified as the fetcher does, counted.
    use super::*;
    use crate::error::Kind;
    use crate::format::stream::Entry;
    use crate::pool::MemStorage;
    use crate::stream::index::RangedBlob;
    use crate::stream::Digest;
    use crate::volume::CreateOptions;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    pub(crate) const MIB: u64 = 1 << 20;
    pub(crate) const SIZE: u64 = 6 * MIB;

    /// What the base layer holds: every 4 KiB block a byte of its own, but zeros in
    /// 2 MiB..2.25 MiB (which app fills).
    fn base_bytes() -> Vec<u8> {
        let mut b: Vec<u8> = (0..SIZE / 4096)
            .flat_map(|b| std::iter::repeat_n((b % 251 + 1) as u8, 4096))
            .collect();
        b[2 * MIB as usize..][..MIB as usize / 4].fill(0);
        b
    }

    /// The publisher: base, and app over it changing 2.5 MiB of data and whiting out 64 KiB.
    /// Returns app's bytes, base's stream and app's stream.
    pub(crate) fn publish() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let s = Store::create_in(Arc::new(MemStorage::new()), &CreateOptions::default()).unwrap();
        let base = s.create_layer("base", None, Some(SIZE)).unwrap().id;
        s.write_layer(base, 0, &base_bytes()).unwrap();
        s.commit_layer("base").unwrap();
        let app = s.create_layer("app", Some("base"), None).unwrap().id;
        s.write_layer(app, MIB / 2, &vec![0xa5; (5 * MIB / 2) as usize])
            .unwrap();
        s.zero_layer(app, 4 * MIB, 64 << 10, false).unwrap();
        s.commit_layer("app").unwrap();
        let mut want = vec![0u8; SIZE as usize];
        s.read_layer(app, 0, &mut want).unwrap();
        let send = |name: &str| {
            let mut out = Vec::new();
            crate::stream::send(&s, name, None, &mut out, "a buffer", &mut |_, _| {}).unwrap();
            out
        };
        (want, send("base"), send("app"))
    }

    /// The registry frontend's twin: answers from the blob's bytes, verifies each extent
    /// against the index, stores it; can be made to fail.
    struct Twin {
        bytes: Vec<u8>,
        blob: RangedBlob,
        fetches: AtomicUsize,
        down: AtomicBool,
    }

    impl Twin {
        fn new(bytes: Vec<u8>) -> Arc<Twin> {
            let mut f = |o: u64, n: u64| Ok(bytes[o as usize..(o + n) as usize].to_vec());
            let blob = RangedBlob::open(&mut f, Digest::sha256(&bytes), bytes.len() as u64, "app")
                .unwrap();
            Arc::new(Twin {
                bytes,
                blob,
                fetches: AtomicUsize::new(0),
                down: AtomicBool::new(false),
            })
        }

        fn entry(&self, vb: VBlock) -> Option<Entry> {
            let at = vb.0 * 4096;
            let es = &self.blob.entries;
            let i = es.partition_point(|e| e.offset + e.length <= at);
            es.get(i).filter(|e| e.offset <= at).copied()
        }

        fn whiteouts(&self) -> Vec<(u64, u64)> {
            let es = self.blob.entries.iter().filter(|e| e.is_whiteout());
            es.map(|e| (e.offset, e.length)).collect()
        }
    }

    impl RemoteSource for Twin {
        fn listed(&self, vb: VBlock) -> bool {
            self.entry(vb).is_some()
        }

        fn fetch(&self, store: &Store, layer: LayerId, vb: VBlock, _: VBlock) -> Result<()> {
            let e = self.entry(vb).expect("asked only for listed blocks");
            if e.is_whiteout() {
                return store.fill_remote(layer, e.offset, &vec![0; e.length as usize]);
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::Unavailable("registry 127.0.0.1:1 is down".into()));
            }
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let b = &self.bytes;
            let mut f = |o: u64, n: u64| Ok(b[o as usize..(o + n) as usize].to_vec());
            let data = self.blob.read(&mut f, &e)?;
            store.fill_remote(layer, e.offset, &data)
        }
    }

    /// A pool holding base (received) and app as a remote layer over it; no source attached.
    fn subscriber(mem: &Arc<MemStorage>, base_stream: &[u8], twin: &Twin) -> (Store, LayerId) {
        subscribe(mem, base_stream, &twin.whiteouts())
    }

    /// `subscriber` given app's whiteouts.
    pub(crate) fn subscribe(
        mem: &Arc<MemStorage>,
        base_stream: &[u8],
        whiteouts: &[(u64, u64)],
    ) -> (Store, LayerId) {
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let mut input = base_stream;
        crate::stream::receive(&s, "base", None, &mut input, "base", &mut |_, _| {}).unwrap();
        let app = s
            .create_remote_layer("app", Some("base"), SIZE, &[], whiteouts)
            .unwrap()
            .id;
        (s, app)
    }

    /// Equal bytes, or the first offset where they differ (not megabytes of both).
    pub(crate) fn same(got: &[u8], want: &[u8]) {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        assert!(
            at.is_none() && got.len() == want.len(),
            "differ at byte {at:?} (lengths {} and {})",
            got.len(),
            want.len()
        );
    }

    /// The published app's bytes, its twin source, and the subscriber's pool and app layer.
    fn setup() -> (Vec<u8>, Arc<Twin>, Arc<MemStorage>, Store, LayerId) {
        let (want, base, app_stream) = publish();
        let twin = Twin::new(app_stream);
        let mem = Arc::new(MemStorage::new());
        let (s, app) = subscriber(&mem, &base, &twin);
        (want, twin, mem, s, app)
    }

    pub(crate) fn read(s: &Store, id: LayerId, at: u64, len: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        s.read_layer(id, at, &mut b).map(|_| b)
    }

    #[test]
    fn a_read_fetches_only_its_extent_and_the_rest_reads_through() {
        let (want, twin, mem, s, app) = setup();
        s.attach_remote(app, twin.clone()).unwrap();
        // Unlisted: the parent's bytes, nothing fetched. The whiteout: zeros, nothing fetched.
        same(
            &read(&s, app, 5 * MIB, 4096).unwrap(),
            &want[5 * MIB as usize..][..4096],
        );
        assert_eq!(read(&s, app, 4 * MIB, 4096).unwrap(), vec![0; 4096]);
        assert_eq!(twin.fetches.load(Ordering::SeqCst), 0);
        // One 4 KiB read of changed data moves its extent (at most 1 MiB) and no other.
        let at = 2 * MIB + 8192;
        same(
            &read(&s, app, at, 4096).unwrap(),
            &want[at as usize..][..4096],
        );
        assert_eq!(twin.fetches.load(Ordering::SeqCst), 1);
        same(
            &read(&s, app, at - 8192, 4096).unwrap(),
            &want[(at - 8192) as usize..][..4096],
        );
        assert_eq!(
            twin.fetches.load(Ordering::SeqCst),
            1,
            "same extent: stored already"
        );
        // All of it; then the layer is whole and forgets its source.
        same(&read(&s, app, 0, SIZE as usize).unwrap(), &want);
        let data_entries = twin
            .blob
            .entries
            .iter()
            .filter(|e| !e.is_whiteout())
            .count();
        assert_eq!(twin.fetches.load(Ordering::SeqCst), data_entries);
        s.finish_remote(app).unwrap();
        s.flush().unwrap();
        s.verify_consistency().unwrap();
        drop(s);
        let s = Store::open_in(mem.clone(), true).unwrap();
        same(&read(&s, app, 0, SIZE as usize).unwrap(), &want);
        // Whole again, it can be sent: the same blob, byte for byte.
        let mut again = Vec::new();
        crate::stream::send(&s, "app", None, &mut again, "a buffer", &mut |_, _| {}).unwrap();
        assert!(
            again == twin.bytes,
            "the fetched layer sends another stream"
        );
    }

    #[test]
    fn an_unfetched_block_never_reads_the_parent() {
        let (want, twin, _, s, app) = setup();
        // No source: every unmapped block of the remote layer is refused, listed or not.
        for at in [MIB, 5 * MIB] {
            let e = read(&s, app, at, 4096).unwrap_err();
            assert_eq!(e.kind(), Kind::Unavailable, "{e}");
            assert!(e.to_string().contains("layer \"app\""), "{e}");
        }
        // A failing source: the read fails with its error and nothing is stored; once the
        // registry answers the same read works.
        s.attach_remote(app, twin.clone()).unwrap();
        twin.down.store(true, Ordering::SeqCst);
        let e = read(&s, app, MIB, 4096).unwrap_err();
        assert!(e.to_string().contains("is down"), "{e}");
        twin.down.store(false, Ordering::SeqCst);
        same(
            &read(&s, app, MIB, 4096).unwrap(),
            &want[MIB as usize..][..4096],
        );
        // Not whole: it cannot be finished or sent.
        assert_eq!(s.finish_remote(app).unwrap_err().kind(), Kind::Unavailable);
        let e = crate::stream::send(&s, "app", None, &mut Vec::new(), "x", &mut |_, _| {});
        assert_eq!(e.unwrap_err().kind(), Kind::Conflict);
        // Read-only to everyone: only fills change it.
        assert_eq!(
            s.write_layer(app, 0, &[1; 4096]).unwrap_err().kind(),
            Kind::ReadOnly
        );
    }

    #[test]
    fn a_child_of_a_remote_layer_copies_fetched_bytes_and_keeps_its_own() {
        let (want, twin, _, s, app) = setup();
        s.attach_remote(app, twin.clone()).unwrap();
        let c = s.create_layer("c", Some("app"), None).unwrap().id;
        // A partial write copies the block from app: fetched first.
        let at = MIB + 100;
        s.write_layer(c, at, b"child").unwrap();
        let mut expect = want.clone();
        expect[at as usize..at as usize + 5].copy_from_slice(b"child");
        assert_eq!(twin.fetches.load(Ordering::SeqCst), 1);
        // A whole block zeroed (unmap allowed) over an unfetched block whose base is zeros: a
        // whiteout, not a hole that would read the fetched data later.
        s.zero_layer(c, 2 * MIB, 4096, true).unwrap();
        assert_eq!(twin.fetches.load(Ordering::SeqCst), 1);
        expect[2 * MIB as usize..][..4096].fill(0);
        // Dropping what equals the parent keeps it: the parent's block is not known yet.
        s.drop_unchanged(c, 2 * MIB, 4096).unwrap();
        same(&read(&s, c, 0, SIZE as usize).unwrap(), &expect);
        same(&read(&s, app, 0, SIZE as usize).unwrap(), &want);
        s.verify_consistency().unwrap();
    }

    #[test]
    fn fetched_blocks_survive_a_reopen_and_check_accepts_a_half_fetched_layer() {
        let (want, twin, mem, s, app) = setup();
        s.attach_remote(app, twin.clone()).unwrap();
        read(&s, app, MIB, 4096).unwrap();
        s.flush().unwrap();
        drop(s);
        let r = crate::check::check(mem.clone(), true, &mut |_, _| {}).unwrap();
        assert!(r.is_clean(), "{:?}", r.faults);
        // Still remote after the reopen: unfetched blocks refused until a source is attached,
        // and what was stored is not fetched again.
        let s = Store::open_in(mem.clone(), true).unwrap();
        assert_eq!(
            read(&s, app, 2 * MIB, 4096).unwrap_err().kind(),
            Kind::Unavailable
        );
        let twin = Twin::new(twin.bytes.clone());
        s.attach_remote(app, twin.clone()).unwrap();
        same(
            &read(&s, app, MIB, 4096).unwrap(),
            &want[MIB as usize..][..4096],
        );
        assert_eq!(twin.fetches.load(Ordering::SeqCst), 0);
        same(&read(&s, app, 0, SIZE as usize).unwrap(), &want);
        s.finish_remote(app).unwrap();
        s.flush().unwrap();
        drop(s);
        let r = crate::check::check(mem, true, &mut |_, _| {}).unwrap();
        assert!(r.is_clean(), "{:?}", r.faults);
    }
}
