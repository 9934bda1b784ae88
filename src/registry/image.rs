//! The image a push writes: media types, annotations, the config blob and the manifest.

use crate::stream::{ContentIds, Digest};
use crate::volume::LayerInfo;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use serde::Serialize;
use std::collections::BTreeMap;

/// A layer blob: a thinlayer send stream (docs/STREAM.md), not a tar. Under OCI's layer
/// prefix, so containerd's clients take it for a layer (`images.IsLayerType`): only layers are
/// unpacked through a snapshotter and given the remote-snapshot labels (DESIGN.md §13), and a
/// differ that does not know it refuses it (`images.DiffCompression`: "unrecognised
/// mediatype") instead of untarring a block stream.
pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.thinlayer.v1";
/// The media type pushes wrote before `LAYER_TYPE`: containerd does not take it for a layer.
/// Still pulled.
pub const LAYER_TYPE_V0: &str = "application/vnd.thinlayer.layer.v1";

/// Whether `media_type` names a thinlayer layer blob (either media type).
pub fn is_layer_type(media_type: &str) -> bool {
    media_type == LAYER_TYPE || media_type == LAYER_TYPE_V0
}
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

pub const A_BLOCK_SIZE: &str = "org.thinlayer.block-size";
pub const A_DISK_SIZE: &str = "org.thinlayer.disk-size";
pub const A_FORMAT: &str = "org.thinlayer.stream-version";
/// On each layer descriptor: its chain ID, so a pull can skip layers the pool holds without
/// fetching them.
pub const A_CHAIN_ID: &str = "org.thinlayer.chain-id";
pub const A_NAME: &str = "org.thinlayer.layer-name";
/// On each layer descriptor: its stream's format version (2 and up can be read by range).
pub const A_LAYER_FORMAT: &str = "org.thinlayer.stream-version";

/// An OCI image config (so generic tools such as `skopeo inspect` can read the image); its
/// diff IDs are the layer streams' digests. No creation time: pushing the same chain twice
/// makes the same config, byte for byte.
#[derive(Serialize)]
struct Config<'a> {
    architecture: &'a str,
    os: &'a str,
    config: ConfigLabels,
    rootfs: RootFs,
}

#[derive(Serialize)]
struct ConfigLabels {
    #[serde(rename = "Labels")]
    labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

/// The image's annotations; its stream version is the top layer's (each layer's is on its
/// descriptor: a chain may mix versions).
fn annotations(block_size: u32, top: &(LayerInfo, ContentIds)) -> BTreeMap<String, String> {
    [
        (A_BLOCK_SIZE, block_size.to_string()),
        (A_DISK_SIZE, top.0.disk_size.to_string()),
        (A_FORMAT, top.1.version.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The architecture as OCI (Go) names it.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        a => a,
    }
}

/// The config blob for a chain (base first).
pub fn config(block_size: u32, chain: &[(LayerInfo, ContentIds)]) -> Vec<u8> {
    let top = chain.last().expect("a chain has a layer");
    let c = Config {
        architecture: oci_arch(),
        os: "linux",
        config: ConfigLabels {
            labels: annotations(block_size, top),
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: chain.iter().map(|(_, i)| i.digest.to_string()).collect(),
        },
    };
    serde_json::to_vec(&c).expect("a config always serialises")
}

/// The manifest: one descriptor per layer (base first) of `sizes[i]` bytes.
pub fn manifest(
    block_size: u32,
    chain: &[(LayerInfo, ContentIds)],
    sizes: &[u64],
    config: &[u8],
) -> OciImageManifest {
    let top = chain.last().expect("a chain has a layer");
    let layers = chain
        .iter()
        .zip(sizes)
        .map(|((l, ids), &size)| OciDescriptor {
            media_type: LAYER_TYPE.into(),
            digest: ids.digest.to_string(),
            size: size as i64,
            urls: None,
            artifact_type: None,
            annotations: Some(
                [
                    (A_CHAIN_ID.to_string(), ids.chain_id.to_string()),
                    (A_NAME.to_string(), l.name.clone()),
                    (A_LAYER_FORMAT.to_string(), ids.version.to_string()),
                ]
                .into(),
            ),
        })
        .collect();
    OciImageManifest {
        schema_version: 2,
        media_type: Some(MANIFEST_TYPE.into()),
        config: OciDescriptor {
            media_type: CONFIG_TYPE.into(),
            digest: Digest::sha256(config).to_string(),
            size: config.len() as i64,
            urls: None,
            artifact_type: None,
            annotations: None,
        },
        layers,
        subject: None,
        artifact_type: None,
        annotations: Some(annotations(block_size, top)),
    }
}
