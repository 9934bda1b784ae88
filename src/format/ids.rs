//! Newtypes for the numbers that must never be mixed up.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A block of the pool file: byte offset = number × block size.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct PBlock(pub u64);

/// A block of a layer's virtual disk: byte offset = number × block size.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct VBlock(pub u64);

/// A layer's permanent number. Names can be reused after `rm`; ids of live layers are unique.
/// Ids start at 1, so the default, 0, never names a live layer.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct LayerId(pub u32);

impl fmt::Display for PBlock {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "pool block {}", self.0)
    }
}
impl fmt::Display for VBlock {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}
impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "id {}", self.0)
    }
}
