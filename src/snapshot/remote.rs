//! containerd's remote snapshots (DESIGN.md §13): which labels of a Prepare ask for one, and
//! the seam through which the live server makes a committed snapshot from a registry's blob
//! at once (`RemoteLayers`, implemented by `server::lazy` over the registry's fills). What a
//! remote snapshot is for containerd — a committed snapshot named by the `snapshot.ref` label
//! that Prepare answers with ALREADY_EXISTS — is `Snapshots::prepare`'s.
//!
//! The labels are containerd's own (`pkg/snapshotters/annotations.go`): a client that wraps
//! its pull with `snapshotters.AppendInfoHandlerWrapper` (Docker ≥ 24 with the containerd image
//! store; the CRI plugin and nerdctl only in some configurations, DESIGN.md §13) puts them on
//! every layer descriptor of the manifest, and
//! the unpacker passes a layer's descriptor annotations prefixed `containerd.io/snapshot/` to
//! Prepare, with `containerd.io/snapshot.ref` = the chain ID the layer commits as.

use crate::format::LayerId;
use crate::volume::{AttrChanges, LayerInfo};
use std::collections::HashMap;

/// The chain ID of the committed snapshot an unpack's Prepare is for (containerd's unpacker).
pub const REF_LABEL: &str = "containerd.io/snapshot.ref";
/// The image reference being pulled (`host[:port]/repository:tag`).
pub const IMAGE_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// The digest of the image's manifest.
pub const MANIFEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The digest of the layer's blob.
pub const LAYER_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";

/// Where a layer's blob is, from a Prepare's labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerAt {
    pub image: String,
    pub manifest: String,
    pub layer: String,
}

impl LayerAt {
    /// The blob a Prepare's labels name, or why they name none (a message for the log).
    pub fn of(labels: &HashMap<String, String>) -> Result<LayerAt, String> {
        let get = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
        match (get(IMAGE_LABEL), get(MANIFEST_LABEL), get(LAYER_LABEL)) {
            (Some(image), Some(manifest), Some(layer)) => Ok(LayerAt {
                image,
                manifest,
                layer,
            }),
            _ => Err(format!(
                "the client passed no {IMAGE_LABEL}, {MANIFEST_LABEL} and {LAYER_LABEL} labels (it does not wrap its pull with containerd's snapshotters.AppendInfoHandlerWrapper)"
            )),
        }
    }
}

/// Makes read-only layers whose data stays in a registry until read (the live server's fills).
pub trait RemoteLayers: Send + Sync {
    /// Make layer `name` over `parent` from the blob `at` names, remote (its blocks fetched by
    /// range as they are read, the rest in the background), with `attrs` in the same
    /// transaction; durable. An error says why not (a registry not allowed, not a thinlayer
    /// layer, no index, the registry failing): the caller unpacks the layer the usual way.
    fn create(
        &self,
        at: &LayerAt,
        name: &str,
        parent: Option<&str>,
        attrs: AttrChanges,
    ) -> crate::Result<LayerInfo>;

    /// Layer `id` was removed: stop fetching it.
    fn removed(&self, id: LayerId);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_is_located_only_when_all_three_labels_are_there() {
        let mut labels: HashMap<String, String> = [
            (REF_LABEL, "sha256:c"),
            (IMAGE_LABEL, "127.0.0.1:5000/a/b:1"),
            (MANIFEST_LABEL, "sha256:m"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert!(LayerAt::of(&labels).unwrap_err().contains(LAYER_LABEL));
        labels.insert(LAYER_LABEL.into(), "sha256:l".into());
        assert_eq!(
            LayerAt::of(&labels).unwrap(),
            LayerAt {
                image: "127.0.0.1:5000/a/b:1".into(),
                manifest: "sha256:m".into(),
                layer: "sha256:l".into()
            }
        );
    }
}
