//! Content IDs (docs/FORMAT.md §6.5, docs/STREAM.md §3). A read-only layer's digest is the
//! sha256 of its canonical send stream over its parent, which is also the registry blob's
//! digest; its chain ID covers its parent's chain ID too, OCI-style:
//! `chain(base) = digest(base)`, `chain(L) = sha256("<chain(parent)> <digest(L)>")`.
//! Neither depends on pool addresses, times or names. Both are kept as layer attributes,
//! written when a layer is committed, imported or received; a layer committed before this
//! existed gets them computed when first asked for (and stored if the pool is writable).

pub use super::digest::Digest;
use super::send::{self, SendStats};
use crate::error::{Error, Result};
use crate::volume::{LayerInfo, Store};

pub const DIGEST_ATTR: &str = "content.digest";
pub const CHAIN_ATTR: &str = "content.chain_id";
/// The stream's length in bytes: a registry manifest names each blob's size.
pub const SIZE_ATTR: &str = "content.size";
/// The stream format version the digest was taken over (docs/STREAM.md §1); absent: 1, the
/// only version before it was recorded. `send` writes a layer in its own version, so its
/// content IDs stay what they were.
pub const VERSION_ATTR: &str = "content.stream_version";

/// A layer's content digest and chain ID, and its stream's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentIds {
    pub digest: Digest,
    pub chain_id: Digest,
    pub size: u64,
    /// The stream format version of the stream the digest is of.
    pub version: u32,
}

impl ContentIds {
    pub fn new(parent_chain: Option<Digest>, digest: Digest, size: u64) -> ContentIds {
        let chain_id = match parent_chain {
            None => digest,
            Some(p) => Digest::sha256(format!("{p} {digest}").as_bytes()),
        };
        ContentIds {
            digest,
            chain_id,
            size,
            version: crate::format::stream::VERSION,
        }
    }

    /// The IDs of a stream of format version `version` (a received one's).
    pub fn with_version(self, version: u32) -> ContentIds {
        ContentIds { version, ..self }
    }

    /// The IDs a layer's attributes hold, if both are there and well formed.
    pub fn of(l: &LayerInfo) -> Option<ContentIds> {
        let digest = l.attrs.get(DIGEST_ATTR)?.parse().ok()?;
        let chain_id = l.attrs.get(CHAIN_ATTR)?.parse().ok()?;
        let size = l.attrs.get(SIZE_ATTR)?.parse().ok()?;
        let version = match l.attrs.get(VERSION_ATTR) {
            Some(v) => v.parse().ok()?,
            None => crate::format::stream::VERSION_1,
        };
        Some(ContentIds {
            digest,
            chain_id,
            size,
            version,
        })
    }

    pub fn attrs(&self) -> [(&'static str, String); 4] {
        [
            (DIGEST_ATTR, self.digest.to_string()),
            (CHAIN_ATTR, self.chain_id.to_string()),
            (SIZE_ATTR, self.size.to_string()),
            (VERSION_ATTR, self.version.to_string()),
        ]
    }

    /// `attrs` as the store's attribute changes take them.
    pub fn changes<'a>(a: &'a [(&'static str, String); 4]) -> [(&'static str, Option<&'a str>); 4] {
        a.each_ref().map(|(k, v)| (*k, Some(v.as_str())))
    }
}

/// Store `ids` on layer `name` and commit, if the pool can be changed.
fn keep(store: &Store, name: &str, ids: &ContentIds) -> Result<()> {
    if !store.is_writable() {
        return Ok(());
    }
    let a = ids.attrs();
    store.set_attrs(name, &ContentIds::changes(&a))?;
    store.flush()
}

/// The content IDs of read-only layer `name` and of every ancestor, computing (and keeping)
/// those missing. Writable layers have none: their content can still change.
pub fn ids(store: &Store, name: &str) -> Result<ContentIds> {
    let chain = store.history(name)?;
    let mut parent: Option<Digest> = None;
    let mut last = None;
    for l in chain.iter().rev() {
        if l.writable || l.importing {
            return Err(Error::Conflict(format!(
                "layer {:?} is writable and has no content ID yet; commit it first",
                l.name
            )));
        }
        let ids = match ContentIds::of(l) {
            Some(ids) => ids,
            None => {
                let (digest, st) = send::digest(store, &l.name, parent)?;
                let ids = ContentIds::new(parent, digest, st.bytes);
                keep(store, &l.name, &ids)?;
                ids
            }
        };
        parent = Some(ids.chain_id);
        last = Some(ids);
    }
    Ok(last.expect("a history holds at least the layer itself"))
}

/// Compute and keep the IDs of a layer just committed or imported: one read of its own
/// blocks, under the store's read lock a chunk at a time (writers to other layers go on).
pub fn record(store: &Store, name: &str) -> Result<(ContentIds, SendStats)> {
    let l = store.layer(name)?;
    let parent = match &l.parent {
        Some(p) => Some(ids(store, p)?.chain_id),
        None => None,
    };
    let (digest, stats) = send::digest(store, name, parent)?;
    let ids = ContentIds::new(parent, digest, stats.bytes);
    keep(store, name, &ids)?;
    Ok((ids, stats))
}

/// `layers` with every read-only layer's IDs filled in (for `ls` and `history`): those the
/// catalogue lacks are computed, and kept when the pool is writable. Those of a layer over a
/// remote layer not all fetched yet cannot be (`Conflict`): they stay missing until it is. A
/// layer removed since `layers` was taken (containerd's garbage collector runs beside `ls`)
/// is left out.
pub fn fill(store: &Store, layers: Vec<LayerInfo>) -> Result<Vec<LayerInfo>> {
    let mut out = Vec::with_capacity(layers.len());
    for mut l in layers {
        if !(l.writable || l.importing || ContentIds::of(&l).is_some()) {
            match ids(store, &l.name) {
                Ok(ids) => {
                    for (k, v) in ids.attrs() {
                        l.attrs.insert(k.to_string(), v);
                    }
                }
                Err(e) if e.kind() == crate::error::Kind::Conflict => {}
                Err(Error::NotFound(_))
                    if matches!(store.layer(&l.name), Err(Error::NotFound(_))) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
        out.push(l);
    }
    Ok(out)
}

/// The read-only layer whose chain ID is `chain`, if the pool holds one.
pub fn find_chain(store: &Store, chain: &Digest) -> Result<Option<LayerInfo>> {
    let want = chain.to_string();
    for l in fill(store, store.layers())? {
        if l.attrs.get(CHAIN_ATTR) == Some(&want) {
            return Ok(Some(l));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_leaves_out_a_layer_removed_since_the_list_was_taken() {
        use crate::pool::MemStorage;
        let s = Store::create_in(
            std::sync::Arc::new(MemStorage::new()),
            &crate::volume::CreateOptions::default(),
        )
        .unwrap();
        for name in ["a", "b"] {
            let l = s.create_layer(name, None, Some(1 << 20)).unwrap();
            s.write_layer(l.id, 0, &[7; 4096]).unwrap();
            s.commit_layer(name).unwrap();
        }
        let listed = s.layers();
        s.remove_layer("a").unwrap();
        let filled = fill(&s, listed).unwrap();
        let names: Vec<&str> = filled.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["b"]);
        assert!(ContentIds::of(&filled[0]).is_some());
    }

    #[test]
    fn digests_print_parse_and_chain_like_oci() {
        let d = Digest::sha256(b"abc");
        assert_eq!(
            d.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert_eq!(d.short(), "ba7816bf8f01");
        assert!("sha256:xyz".parse::<Digest>().is_err());
        assert_eq!(ContentIds::new(None, d, 1).chain_id, d);
        let c = ContentIds::new(Some(d), d, 1).chain_id;
        assert_eq!(c, Digest::sha256(format!("{d} {d}").as_bytes()));
    }
}
