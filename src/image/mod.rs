//! Raw (loop) images: import one as a layer storing only what differs from its parent, and
//! export a chain as a sparse raw file.
pub mod export;
pub mod import;
mod pagebuf;

pub(crate) use pagebuf::PageBuf;

pub use export::{export, export_pool, export_to, ExportStats};
pub use import::{import, import_from, DiffSink, ImportStats, NoDiff};

/// Bytes moved per I/O call: large enough to stream, small enough to keep memory flat.
pub(crate) const CHUNK: usize = 4 << 20;

/// Bytes written between two starts of their writeback (`pool::storage::start_writeback`): an
/// import or export ends in a sync of everything it wrote, and the disk had better work while
/// the rest is read than after.
pub(crate) const WRITEBACK_EVERY: u64 = 32 << 20;
