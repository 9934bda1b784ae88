//! Raw (loop) images: import one as a layer storing only what differs from its parent, and
//! export a chain as a sparse raw file.
pub mod export;
pub mod import;

pub use export::{export, export_pool, export_to, ExportStats};
pub use import::{import, import_from, DiffSink, ImportStats, NoDiff};

/// Bytes moved per I/O call: large enough to stream, small enough to keep memory flat.
pub(crate) const CHUNK: usize = 4 << 20;

/// Bytes written between two starts of their writeback (`pool::storage::start_writeback`): an
/// import or export ends in a sync of everything it wrote, and the disk had better work while
/// the rest is read than after.
pub(crate) const WRITEBACK_EVERY: u64 = 32 << 20;

/// A buffer of `CHUNK` bytes starting on a page boundary, so the pool moves what it holds with
/// O_DIRECT (`Store::write_layer_bulk`, `read_layer_bulk`).
pub(crate) struct PageBuf {
    buf: Vec<u8>,
    /// Where the aligned bytes start in `buf` (a Vec's heap block does not move with it).
    at: usize,
}

impl PageBuf {
    pub(crate) fn new() -> Self {
        use crate::pool::storage::DIRECT_ALIGN;
        let buf = vec![0u8; CHUNK + DIRECT_ALIGN];
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        PageBuf { buf, at }
    }

    pub(crate) fn get(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.buf[self.at + r.start..self.at + r.end]
    }

    pub(crate) fn get_mut(&mut self, r: std::ops::Range<usize>) -> &mut [u8] {
        &mut self.buf[self.at + r.start..self.at + r.end]
    }
}
