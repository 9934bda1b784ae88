//! The lifecycle of a layer being filled by an import (a raw image, a send stream): made
//! incomplete, filled, then committed whole with its attributes — or, on any failure, removed
//! again. One guard for every kind of import, so none forgets a step.
//!
//! Crash story: until `finish` commits, the layer is marked incomplete on disk; even if a live
//! server's background commits make its first blocks durable, the next writable open removes
//! it (`Store::discarded`). A failure without a crash removes it at once (`Drop`), in the open
//! transaction, which may be shared with other writers: nothing of theirs goes with it.

use super::{AttrChanges, LayerInfo, Store};
use crate::error::{Error, Result};

/// A layer being imported: incomplete until `finish`; dropped unfinished, it is removed.
pub struct Importing<'a> {
    store: &'a Store,
    layer: LayerInfo,
    done: bool,
}

impl Store {
    /// Make layer `name` (`size` bytes, over `parent`) for an import to fill. `what` names the
    /// source in the refusal of a size smaller than the parent's (`image a.img`, `s.tl: the
    /// layer`).
    pub fn importing(
        &self,
        name: &str,
        parent: Option<&str>,
        size: u64,
        what: &str,
    ) -> Result<Importing<'_>> {
        if let Some(p) = parent {
            let pl = self.layer(p)?;
            if size < pl.disk_size {
                return Err(Error::InvalidInput(format!(
                    "{what} is {size} bytes, smaller than its parent {p:?} ({} bytes)",
                    pl.disk_size
                )));
            }
        }
        let layer = self.begin_import(name, parent, size)?;
        Ok(Importing {
            store: self,
            layer,
            done: false,
        })
    }
}

impl Importing<'_> {
    /// The layer as it was made.
    pub fn layer(&self) -> &LayerInfo {
        &self.layer
    }

    /// Commit the filled layer read-only with `attrs` in the same transaction, and flush:
    /// when this returns, the layer is durable.
    pub fn finish(mut self, attrs: AttrChanges<'_>) -> Result<LayerInfo> {
        let name = self.layer.name.clone();
        self.store.finish_import_with(&name, attrs)?;
        self.done = true;
        self.store.flush()?;
        self.store.layer(&name)
    }
}

impl Drop for Importing<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: if even this fails the store is unusable (poisoned) and a reopen
            // forgets the incomplete layer anyway.
            let _ = self.store.remove_layer(&self.layer.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::error::Kind;
    use crate::pool::MemStorage;
    use crate::volume::{CreateOptions, Store};
    use std::sync::Arc;

    fn store() -> Store {
        Store::create_in(Arc::new(MemStorage::new()), &CreateOptions::default()).unwrap()
    }

    #[test]
    fn an_unfinished_import_leaves_no_layer_and_a_finished_one_is_committed() {
        let s = store();
        let i = s.importing("half", None, 1 << 20, "image a.img").unwrap();
        assert!(s.layer("half").unwrap().importing);
        drop(i);
        assert_eq!(s.layer("half").unwrap_err().kind(), Kind::NotFound);

        let i = s.importing("whole", None, 1 << 20, "image a.img").unwrap();
        s.write_layer(i.layer().id, 0, &[7; 4096]).unwrap();
        let l = i.finish(&[("note", Some("x"))]).unwrap();
        assert!(!l.writable && !l.importing);
        assert_eq!(l.attrs["note"], "x");
    }

    #[test]
    fn an_import_smaller_than_its_parent_is_refused_naming_the_source() {
        let s = store();
        s.create_layer("p", None, Some(2 << 20)).unwrap();
        s.commit_layer("p").unwrap();
        let e = s
            .importing("c", Some("p"), 1 << 20, "image a.img")
            .err()
            .unwrap();
        assert_eq!(e.kind(), Kind::InvalidInput);
        assert_eq!(
            e.to_string(),
            format!(
                "image a.img is {} bytes, smaller than its parent \"p\" ({} bytes)",
                1 << 20,
                2 << 20
            )
        );
        assert_eq!(s.layer("c").unwrap_err().kind(), Kind::NotFound);
    }
}
