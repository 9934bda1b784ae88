//! Layers as streams (docs/STREAM.md): `send` writes a layer's diff over an ancestor in the
//! canonical stream format, `receive` recreates it, and `content` names a layer by the digest
//! of its own stream (its content ID) and by the chain ID over its ancestors'.
pub mod content;
pub mod decode;
pub mod encode;
pub mod receive;
pub mod send;

pub use content::{ContentIds, Digest};
pub use receive::{receive, receive_checked, ReceiveStats};
pub use send::{send, SendStats};
