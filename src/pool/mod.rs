//! The pool file: the storage seam, block allocation, metadata streams and the commit protocol.
//! This layer moves bytes and blocks; what the metadata records mean is the `layer` module's.

pub mod alloc;
pub mod commit;
pub mod index;
pub mod lock;
pub mod meta;
pub mod records;
pub mod sim;
pub mod sparse_bits;
pub mod storage;
pub mod sums;

pub use alloc::{Allocator, Sealed};
pub use commit::{Commit, Pool, Punch};
pub use meta::{MetaStreams, Recovered};
pub use sim::SimStorage;
pub use storage::{FileStorage, MemStorage, Storage};
pub use sums::SumPages;
