//! thinlayer: a block-level, thin-provisioned copy-on-write layer store.
//!
//! Layers of the crate depend downward only:
//! `format` (bytes <-> structs) → `pool` (the pool file, allocation, commits) → `layer` (catalogue
//! and block maps) → `volume` (a chain as a block device) → frontends (`nbd`, `fuse`, `image`, `control`, `cli`).
pub mod check;
pub mod cli;
pub mod control;
pub mod error;
pub mod fault;
pub mod format;
pub mod fuse;
pub mod image;
pub mod layer;
pub mod listen;
pub mod live;
pub mod log;
pub mod nbd;
pub mod pool;
pub mod registry;
pub mod server;
pub mod snapshot;
pub mod stream;
pub mod units;
pub mod volume;

pub use error::{Error, Result};
pub use volume::{BlockDevice, CreateOptions, LayerInfo, PoolUsage, Store, Volume};
