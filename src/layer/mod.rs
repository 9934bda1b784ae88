//! The layer catalogue and each layer's sparse block map.
pub mod catalog;
pub mod map;
pub mod name;
pub mod resolve;

pub use catalog::{Catalog, Layer};
pub use map::{BlockMap, Mapping};
