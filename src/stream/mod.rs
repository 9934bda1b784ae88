//! Layers as streams (docs/STREAM.md): `send` writes a layer's diff over an ancestor in the
//! canonical stream format, `receive` recreates it, and `content` names a layer by the digest
//! of its own stream (its content ID) and by the chain ID over its ancestors'.
pub mod content;
pub mod decode;
pub mod digest;
pub mod encode;
pub mod index;
pub mod receive;
pub mod send;
pub mod source;

pub use content::ContentIds;
pub use digest::Digest;
pub use receive::{receive, receive_checked, ReceiveStats};
pub use send::SendStats;

use crate::error::Result;
use crate::volume::Store;

/// Send layer `name` over `from` (default: its parent; it must be an ancestor) into `out`, the
/// header naming the ancestor's chain ID (computed if the layer has none yet). `label` names the
/// destination in errors.
pub fn send(
    store: &Store,
    name: &str,
    from: Option<&str>,
    out: &mut dyn std::io::Write,
    label: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SendStats> {
    let top = store.layer(name)?;
    let floor = match from.map(str::to_string).or(top.parent) {
        Some(f) => Some(store.layer(&f)?),
        None => None,
    };
    let chain = match &floor {
        Some(f) => Some(content::ids(store, &f.name)?.chain_id),
        None => None,
    };
    send::send_over(store, name, floor.as_ref(), chain, out, label, progress)
}
