//! The layer catalogue, each layer's sparse block map, and reading through a chain.
pub mod catalog;
pub mod chain;
pub mod lazy;
pub mod map;
pub mod name;
pub mod node;
pub mod singles;

pub use catalog::{Catalog, Change};
pub use chain::{Resolved, Resolver};
pub use map::{BlockMap, Mapping};
pub use node::Layer;
