//! `import NAME FILE [--parent P]`: a raw image becomes a read-only layer. Blocks that read the
//! same as the parent chain are not stored, so a modified copy of an image costs only the
//! changed blocks, and zeros over a hole cost nothing.

use super::{CHUNK, WRITEBACK_EVERY};
use crate::error::{Error, Result};
use crate::pool::storage::DIRECT_ALIGN;
use crate::volume::io::is_zero;
use crate::volume::{LayerInfo, Store};
use serde::Serialize;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::mpsc;

#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct ImportStats {
    pub bytes_read: u64,
    /// Bytes of blocks that differed from the parent chain and were stored (or whited out).
    pub bytes_changed: u64,
    /// Bytes skipped without reading because the source file has a hole there.
    pub bytes_skipped_holes: u64,
}

/// Sees the diff an import stores, in block order, as it is written: the content ID is hashed
/// in the same pass as the layer is filled (`LivePool::import`), not by reading the layer again.
pub trait DiffSink {
    /// A run of blocks that differ from the parent chain, none of them all zeros (the image's
    /// last block may be short). `ends`: the block after the run is not a data block of the
    /// diff, so the sink may use `bytes` now rather than keep a copy until the run goes on.
    fn data(&mut self, offset: u64, bytes: &[u8], ends: bool);
    /// A block that reads as zeros where the parent chain holds data (a whiteout).
    fn zero(&mut self, offset: u64, len: u64);
    /// Attributes the layer is committed with, once every block was seen.
    fn attrs(&mut self) -> Vec<(&'static str, String)>;
}

/// No observer: the layer gets no attributes.
pub struct NoDiff;

impl DiffSink for NoDiff {
    fn data(&mut self, _: u64, _: &[u8], _: bool) {}
    fn zero(&mut self, _: u64, _: u64) {}
    fn attrs(&mut self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// Next data offset at or after `off` in `f` (SEEK_DATA), or None past the last data.
fn next_data(f: &File, off: u64) -> Option<u64> {
    seek(f, off, libc::SEEK_DATA)
}

/// Next hole at or after `off` in `f` (SEEK_HOLE; the end of the file counts as one), or None
/// if the file cannot tell.
fn next_hole(f: &File, off: u64) -> Option<u64> {
    seek(f, off, libc::SEEK_HOLE)
}

fn seek(f: &File, off: u64, whence: libc::c_int) -> Option<u64> {
    // SAFETY: lseek on a descriptor owned by `f`; it does not touch memory.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        // ENXIO: no data (or hole) after `off`. Anything else (no SEEK_DATA support): the
        // file is all data, as far as we can tell.
        return if e.raw_os_error() == Some(libc::ENXIO) {
            None
        } else {
            Some(off)
        };
    }
    Some(r as u64)
}

/// Import the image file at `file` as a new read-only layer `name`, committed when it returns.
/// On any error the layer does not exist.
pub fn import(
    store: &Store,
    name: &str,
    file: &Path,
    parent: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(LayerInfo, ImportStats)> {
    let f =
        File::open(file).map_err(|e| Error::io(format!("opening image {}", file.display()), e))?;
    import_from(
        store,
        name,
        &f,
        &file.display().to_string(),
        parent,
        progress,
        &mut NoDiff,
    )
}

/// Import from `f`, an image opened for reading by whoever may read it (the control API gets
/// it from its client as a descriptor). `label` names it in errors. On failure the half-made
/// layer is removed again (`Store::importing`). `diff` sees every block stored, in order, and
/// names the attributes the layer is committed with.
pub fn import_from(
    store: &Store,
    name: &str,
    f: &File,
    label: &str,
    parent: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
    diff: &mut (dyn DiffSink + Send),
) -> Result<(LayerInfo, ImportStats)> {
    let meta = f
        .metadata()
        .map_err(|e| Error::io(format!("reading {label}"), e))?;
    if !meta.is_file() {
        return Err(Error::InvalidInput(format!(
            "{label} is not a regular file"
        )));
    }
    let size = meta.len();
    if size == 0 {
        return Err(Error::InvalidInput(format!("image {label} is empty")));
    }
    let import = store.importing(name, parent, size, &format!("image {label}"))?;
    let layer = import.layer().clone();
    let parent_id = match parent {
        Some(p) => Some(store.layer(p)?),
        None => None,
    };
    let bs = store.block_size() as u64;
    let mut stats = ImportStats::default();
    // Two threads, two cores: this one reads, compares and writes; the other feeds `diff`
    // (the content ID's hashing costs about as much CPU as the I/O). Buffers go round between
    // them, so at most `BUFFERS` chunks are in memory.
    let (to_diff, chunks) = mpsc::sync_channel::<Chunk>(BUFFERS);
    let (back, free) = mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        back.send(vec![0u8; CHUNK + DIRECT_ALIGN])
            .expect("the receiver is here");
    }
    let sink = &mut *diff;
    std::thread::scope(|scope| -> Result<()> {
        // Moved in, so leaving the scope (on an error too) closes the channel and ends the
        // feeding thread, which the scope then waits for.
        let to_diff = to_diff;
        scope.spawn(move || {
            for c in chunks {
                c.feed(sink, bs as usize);
                // The importer may have stopped on an error: then nobody needs the buffer.
                let _ = back.send(c.buf);
            }
        });
        let mut pbuf = vec![0u8; CHUNK];
        let mut unsynced = 0u64;
        // Holes in the source read as zeros; over no parent they cost nothing, so skip them.
        let start = |off: u64, stats: &mut ImportStats| -> Option<u64> {
            if parent_id.is_some() {
                return (off < size).then_some(off);
            }
            let d = match next_data(f, off) {
                Some(d) => (d / bs * bs).max(off).min(size),
                None => size,
            };
            stats.bytes_skipped_holes += d.saturating_sub(off);
            (d < size).then_some(d)
        };
        let mut next = start(0, &mut stats);
        while let Some(off) = next {
            let mut n = (CHUNK as u64).min(size - off);
            if parent_id.is_none() {
                // Read up to the next hole only: a hole's zeros need neither reading nor checking.
                if let Some(h) = next_hole(f, off).filter(|&h| h > off) {
                    n = n.min(h.div_ceil(bs) * bs - off).min(size - off);
                }
            }
            let n = n as usize;
            let mut buf = free
                .recv()
                .expect("the feeding thread returns every buffer");
            // Read to a page-aligned start, so the pool writes it with O_DIRECT.
            let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
            let data = &mut buf[at..at + n];
            read_full(f, data, off)
                .map_err(|e| Error::io(format!("reading {label} at byte {off}"), e))?;
            stats.bytes_read += n as u64;
            let base = match &parent_id {
                Some(p) => {
                    let plen = p.disk_size.saturating_sub(off).min(n as u64) as usize;
                    store.read_layer(p.id, off, &mut pbuf[..plen])?;
                    pbuf[plen..n].fill(0);
                    Some(&pbuf[..n])
                }
                None => None,
            };
            // Store runs of blocks that differ from what the parent chain reads.
            let blocks = n.div_ceil(bs as usize);
            let mut stored = Vec::new();
            let mut i = 0;
            while i < blocks {
                let differs = |k: usize| {
                    let (s, e) = (k * bs as usize, ((k + 1) * bs as usize).min(n));
                    match base {
                        Some(b) => data[s..e] != b[s..e],
                        None => !is_zero(&data[s..e]),
                    }
                };
                if !differs(i) {
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < blocks && differs(j) {
                    j += 1;
                }
                let (s, e) = (i * bs as usize, (j * bs as usize).min(n));
                store.write_layer_bulk(layer.id, off + s as u64, &data[s..e])?;
                stats.bytes_changed += (e - s) as u64;
                unsynced += (e - s) as u64;
                stored.push(s..e);
                i = j;
            }
            if unsynced >= WRITEBACK_EVERY {
                // The commit at the end syncs every block written; started now, their
                // writeback overlaps the reading and hashing of the rest (qemu-img leaves it
                // all to the end). strace of an import of 512 MiB: the final fdatasync took
                // 0.05-0.27 s without this, under 0.01 s with it. Blocks written with O_DIRECT
                // (`write_layer_bulk`) have no dirty pages; this covers those buffered.
                store.start_writeback();
                unsynced = 0;
            }
            next = start(off + n as u64, &mut stats);
            let continues = next == Some(off + n as u64);
            to_diff
                .send(Chunk {
                    off,
                    len: n,
                    at,
                    buf,
                    stored,
                    continues,
                })
                .expect("the feeding thread runs until the channel closes");
            progress(off + n as u64, size);
        }
        Ok(())
    })?;
    progress(size, size);
    let attrs = diff.attrs();
    let changes: Vec<(&str, Option<&str>)> =
        attrs.iter().map(|(k, v)| (*k, Some(v.as_str()))).collect();
    Ok((import.finish(&changes)?, stats))
}

/// Chunks read ahead of the thread that feeds the diff sink.
const BUFFERS: usize = 3;

/// A chunk of the image: `len` bytes at byte `off`, the byte ranges of it the import stored, and
/// whether the next chunk starts where this one ends (a run of data may go on into it).
struct Chunk {
    off: u64,
    len: usize,
    /// Where the chunk starts in `buf` (its first page-aligned byte).
    at: usize,
    buf: Vec<u8>,
    stored: Vec<std::ops::Range<usize>>,
    continues: bool,
}

impl Chunk {
    /// Show `diff` the stored blocks, in order: runs of data blocks, and whiteouts.
    fn feed(&self, diff: &mut (dyn DiffSink + Send), bs: usize) {
        for r in &self.stored {
            let mut run = r.start;
            for s in (r.start..r.end).step_by(bs) {
                let e = (s + bs).min(r.end);
                if is_zero(&self.buf[self.at + s..self.at + e]) {
                    self.data(diff, run..s);
                    diff.zero(self.off + s as u64, (e - s) as u64);
                    run = e;
                }
            }
            self.data(diff, run..r.end);
        }
    }

    fn data(&self, diff: &mut (dyn DiffSink + Send), r: std::ops::Range<usize>) {
        if !r.is_empty() {
            let ends = r.end < self.len || !self.continues;
            diff.data(
                self.off + r.start as u64,
                &self.buf[self.at + r.start..self.at + r.end],
                ends,
            );
        }
    }
}

fn read_full(f: &File, mut buf: &mut [u8], mut off: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match f.read_at(buf, off) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while importing",
                ))
            }
            Ok(k) => {
                buf = &mut buf[k..];
                off += k as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
