//! How a containerd snapshot key becomes a layer name, and the attribute keys a snapshot's
//! layer carries (FORMAT.md §6.5, prefix `containerd.`).
//!
//! containerd's keys are already readable — `NS/ID/sha256:CHAINID` for an image layer, `NS/ID/t1`
//! for container t1 — so a key that is a valid layer name is used as it is: `thinlayer ls`
//! shows the chain ID or the container id. Any other key (longer than a name may be, control
//! characters, white space at an end) becomes a cleaned prefix and a hash of the whole key, the
//! same every time. The exact key is always kept in the `containerd.key` attribute, and a
//! lookup checks it, so a user's layer that happens to bear a snapshot's name is never taken
//! for the snapshot.

use crate::format::MAX_NAME_LEN;

/// The exact containerd key (a committed snapshot's name). Only layers with it are snapshots.
pub const KEY: &str = "containerd.key";
/// On a committed snapshot: the key of the active snapshot it was committed from.
pub const FROM: &str = "containerd.from";
/// `active`, `view` or `committed`.
pub const KIND: &str = "containerd.kind";
/// The snapshot's labels, one JSON object (label keys can be longer than attribute keys).
pub const LABELS: &str = "containerd.labels";
/// Times as `SECONDS.NANOSECONDS` since the epoch.
pub const CREATED: &str = "containerd.created";
pub const UPDATED: &str = "containerd.updated";
/// On a formatted empty base (not a snapshot): its filesystem type.
pub const BASE: &str = "containerd.base";
/// On a formatted ext4 base: where its journal lies, `OFFSET+LEN/BLOCK` in bytes
/// (`ext4::Journal`), so Commit can trim the journal's dead log.
pub const JOURNAL: &str = "containerd.journal";

/// Room left for the hash suffix when a key must be shortened.
const KEPT_PREFIX: usize = MAX_NAME_LEN - 24;

/// The layer name of snapshot `key` (not empty).
pub fn layer_name(key: &str) -> String {
    debug_assert!(!key.is_empty());
    if crate::layer::name::validate(key).is_ok() {
        return key.to_string();
    }
    let cleaned: String = key
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    let mut prefix = cleaned.trim();
    while prefix.len() > KEPT_PREFIX {
        let mut cut = KEPT_PREFIX;
        while !prefix.is_char_boundary(cut) {
            cut -= 1;
        }
        prefix = prefix[..cut].trim_end();
    }
    format!("{prefix} ~{:016x}", fnv1a64(key.as_bytes()))
}

/// Whether active snapshot `key` is one whose filesystem is written once, unmounted and then
/// committed, so that what it holds matters only from its Commit on, which makes it durable
/// (DESIGN §10.1, "Flushes only where someone needs them"): containerd's unpacks and applies
/// (`extract-…`, its `snapshots.UnpackKeyPrefix`) and Docker's init layers (`ID-init-key`,
/// committed as `ID-init` once dockerd has written its files). A crash before the Commit
/// leaves a snapshot that is never committed: containerd unpacks again under a new key, and a
/// container whose init layer was not committed was never made. Any other key (a container's
/// root, a classic-builder step's layer) is not.
///
/// containerd's metadata store hands keys on as `NAMESPACE/ID/KEY`; a key of another shape is
/// taken whole.
pub fn sealed_after_unmount(key: &str) -> bool {
    let mut parts = key.splitn(3, '/');
    let own = match (parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(id), Some(own)) if id.bytes().all(|b| b.is_ascii_digit()) => own,
        _ => key,
    };
    own.starts_with("extract-") || own.ends_with("-init-key")
}

/// FNV-1a, 64 bits: small, and fixed by its definition (std's hasher may change between
/// releases, and a layer name must not).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_keys_are_their_own_names() {
        for k in [
            "testns/3/sha256:0123abcd",
            "testns/9/t1",
            "default/4/extract-1 sha256:ab",
        ] {
            assert_eq!(layer_name(k), k);
        }
    }

    #[test]
    fn unpacks_and_docker_init_layers_are_sealed_after_unmount_and_nothing_else() {
        for k in [
            "moby/12/extract-388677147-hz29 sha256:77e3",
            "extract-1 sha256:ab",
            "moby/40/caae3fe7-init-key",
        ] {
            assert!(sealed_after_unmount(k), "{k}");
        }
        for k in [
            "moby/41/caae3fe7",
            "moby/40/caae3fe7-init",
            "moby/9/29b1c38ae3e8",
            "ns/x/extract-1 sha256:ab",
            "ns/1/my-extract-1",
            "t1",
        ] {
            assert!(!sealed_after_unmount(k), "{k}");
        }
    }

    #[test]
    fn other_keys_get_a_valid_name_that_is_stable_and_tells_them_apart() {
        let long_a = format!("ns/1/{}", "a".repeat(300));
        let long_b = format!("ns/1/{}b", "a".repeat(300));
        for k in [
            long_a.as_str(),
            &long_b,
            " lead",
            "tab\there",
            "é".repeat(200).as_str(),
        ] {
            let n = layer_name(k);
            crate::layer::name::validate(&n).unwrap_or_else(|e| panic!("{k:?} -> {n:?}: {e}"));
            assert_eq!(n, layer_name(k), "deterministic");
        }
        assert_ne!(layer_name(&long_a), layer_name(&long_b));
        assert!(layer_name(&long_a).starts_with("ns/1/aaa"));
        assert_eq!(
            fnv1a64(b"a"),
            0xaf63_dc4c_8601_ec8c,
            "FNV-1a's published value"
        );
    }
}
