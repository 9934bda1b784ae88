//! `import NAME FILE [--parent P]`: a raw image becomes a read-only layer. Blocks that read the
//! same as the parent chain are not stored, so a modified copy of an image costs only the
//! changed blocks, and zeros over a hole cost nothing.

use super::{PageBuf, CHUNK, WRITEBACK_EVERY};
use crate::error::{Error, Result};
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
    // Three threads in a pipeline, so the slowest stage sets the pace rather than the sum:
    // this one reads the image and picks the blocks that differ; the writer stores them (each
    // direct write waits for the disk: strace of an import of 512 MiB counted 0.6-1.0 s in
    // 512 writes of 1 MiB, on the thread that also read and compared, at load 7-9); the third
    // feeds `diff` (the content ID's hashing costs about as much CPU as the I/O). Chunks go
    // through in order, so the pool's blocks are allocated in the image's order and the
    // content ID is hashed in it. Buffers go round, so at most `BUFFERS` chunks are in memory.
    let (to_write, writes) = mpsc::sync_channel::<Chunk>(BUFFERS);
    let (to_diff, chunks) = mpsc::sync_channel::<Chunk>(BUFFERS);
    let (back, free) = mpsc::channel::<PageBuf>();
    for _ in 0..BUFFERS {
        back.send(PageBuf::new()).expect("the receiver is here");
    }
    let sink = &mut *diff;
    std::thread::scope(|scope| -> Result<()> {
        // Moved in, so leaving the scope (on an error too) closes the channels and ends the
        // other two threads, which the scope then waits for.
        let to_write = to_write;
        scope.spawn(move || {
            for c in chunks {
                c.feed(sink, bs as usize);
                // The importer may have stopped on an error: then nobody needs the buffer.
                let _ = back.send(c.buf);
            }
        });
        let writer = scope.spawn(move || store_chunks(store, layer.id, writes, to_diff));
        let read = read_chunks(
            f, label, store, &parent_id, size, &free, to_write, &mut stats, progress,
        );
        // The writer's error first: a reader that stopped because the writer did has none.
        writer.join().expect("import writer panicked")?;
        read
    })?;
    progress(size, size);
    let attrs = diff.attrs();
    let changes: Vec<(&str, Option<&str>)> =
        attrs.iter().map(|(k, v)| (*k, Some(v.as_str()))).collect();
    Ok((import.finish(&changes)?, stats))
}

/// Chunks in the pipeline: one being read, written and hashed each, one queued before each of
/// the last two stages.
const BUFFERS: usize = 5;

/// The reading stage of `import_from`: read the image chunk by chunk (holes skipped where there
/// is no parent), note the runs of blocks that differ from the parent chain, hand each chunk on
/// to the writer. Stops early, without an error, when the writer stopped (it failed).
#[allow(clippy::too_many_arguments)]
fn read_chunks(
    f: &File,
    label: &str,
    store: &Store,
    parent: &Option<LayerInfo>,
    size: u64,
    free: &mpsc::Receiver<PageBuf>,
    to_write: mpsc::SyncSender<Chunk>,
    stats: &mut ImportStats,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let bs = store.block_size() as u64;
    let mut pbuf = vec![0u8; CHUNK];
    // Holes in the source read as zeros; over no parent they cost nothing, so skip them.
    let start = |off: u64, stats: &mut ImportStats| -> Option<u64> {
        if parent.is_some() {
            return (off < size).then_some(off);
        }
        let d = match next_data(f, off) {
            Some(d) => (d / bs * bs).max(off).min(size),
            None => size,
        };
        stats.bytes_skipped_holes += d.saturating_sub(off);
        (d < size).then_some(d)
    };
    let mut next = start(0, stats);
    while let Some(off) = next {
        let mut n = (CHUNK as u64).min(size - off);
        if parent.is_none() {
            // Read up to the next hole only: a hole's zeros need neither reading nor checking.
            if let Some(h) = next_hole(f, off).filter(|&h| h > off) {
                n = n.min(h.div_ceil(bs) * bs - off).min(size - off);
            }
        }
        let n = n as usize;
        // None: the writer stopped, so the hashing thread did and gave back no more buffers.
        let Ok(mut buf) = free.recv() else {
            return Ok(());
        };
        let data = buf.get_mut(0..n);
        read_full(f, data, off)
            .map_err(|e| Error::io(format!("reading {label} at byte {off}"), e))?;
        stats.bytes_read += n as u64;
        let base = match parent {
            Some(p) => {
                let plen = p.disk_size.saturating_sub(off).min(n as u64) as usize;
                store.read_layer(p.id, off, &mut pbuf[..plen])?;
                pbuf[plen..n].fill(0);
                Some(&pbuf[..n])
            }
            None => None,
        };
        // Runs of blocks that differ from what the parent chain reads: what the writer stores.
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
            stats.bytes_changed += (e - s) as u64;
            stored.push(s..e);
            i = j;
        }
        next = start(off + n as u64, stats);
        let continues = next == Some(off + n as u64);
        let chunk = Chunk {
            off,
            len: n,
            buf,
            stored,
            continues,
        };
        if to_write.send(chunk).is_err() {
            return Ok(());
        }
        progress(off + n as u64, size);
    }
    Ok(())
}

/// The writing stage of `import_from`: store each chunk's runs in layer `id`, then hand the
/// chunk on to be hashed. On an error it stops, which closes both channels.
fn store_chunks(
    store: &Store,
    id: crate::format::LayerId,
    chunks: mpsc::Receiver<Chunk>,
    to_diff: mpsc::SyncSender<Chunk>,
) -> Result<()> {
    let mut unsynced = 0u64;
    for c in chunks {
        for r in &c.stored {
            store.write_layer_bulk(id, c.off + r.start as u64, c.buf.get(r.clone()))?;
            unsynced += r.len() as u64;
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
        // The hashing thread ends only when this channel closes.
        to_diff
            .send(c)
            .expect("the feeding thread runs until the channel closes");
    }
    Ok(())
}

/// A chunk of the image: `len` bytes at byte `off`, the byte ranges of it the import stored, and
/// whether the next chunk starts where this one ends (a run of data may go on into it).
struct Chunk {
    off: u64,
    len: usize,
    buf: PageBuf,
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
                if is_zero(self.buf.get(s..e)) {
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
                self.buf.get(r.start..r.end),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use crate::pool::storage::{MemStorage, Storage};
    use crate::volume::CreateOptions;
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// The pool in memory, noting the length of each bulk write (what an import stores its
    /// blocks with) and refusing every one after the first `ok`.
    struct Bulk {
        mem: MemStorage,
        ok: AtomicUsize,
        lens: std::sync::Mutex<Vec<usize>>,
    }

    impl Bulk {
        fn new(ok: usize) -> Arc<Bulk> {
            Arc::new(Bulk {
                mem: MemStorage::new(),
                ok: AtomicUsize::new(ok),
                lens: Default::default(),
            })
        }
    }

    impl Storage for Bulk {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
            self.mem.write_at(data, offset)
        }
        fn write_bulk_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
            let left = self.ok.load(Ordering::SeqCst);
            if left == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.ok.store(left - 1, Ordering::SeqCst);
            self.lens.lock().unwrap().push(data.len());
            self.mem.write_at(data, offset)
        }
        fn sync(&self) -> io::Result<()> {
            self.mem.sync()
        }
        fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
            self.mem.punch_hole(offset, len)
        }
        fn len(&self) -> io::Result<u64> {
            self.mem.len()
        }
        fn allocated(&self) -> io::Result<u64> {
            self.mem.allocated()
        }
    }

    #[test]
    fn an_import_whose_pool_write_fails_stops_with_that_error_and_leaves_no_layer() {
        let store = Store::create_in(Bulk::new(3), &CreateOptions::default()).unwrap();
        // More chunks than the pipeline holds buffers, all data: the reader is still reading
        // when the writer fails, and must stop rather than wait for a buffer.
        let mut img = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..(BUFFERS + 4) * CHUNK)
            .map(|i| (i % 251) as u8 | 1)
            .collect();
        std::io::Write::write_all(&mut img, &data).unwrap();
        let e = import(&store, "img", img.path(), None, &mut |_, _| {}).unwrap_err();
        assert_eq!(e.kind(), Kind::Io, "{e}");
        assert!(e.to_string().contains("writing"), "{e}");
        assert_eq!(store.layer("img").unwrap_err().kind(), Kind::NotFound);
        // The pool takes an import again once the fault is gone.
        let ok = Store::create_in(Arc::new(MemStorage::new()), &CreateOptions::default()).unwrap();
        let (l, st) = import(&ok, "img", img.path(), None, &mut |_, _| {}).unwrap();
        assert_eq!(st.bytes_changed, data.len() as u64);
        let mut back = vec![0u8; data.len()];
        ok.read_layer(l.id, 0, &mut back).unwrap();
        assert!(back == data);
    }

    #[test]
    fn an_import_stores_a_chunk_of_data_in_one_write_where_the_pool_blocks_follow_each_other() {
        let storage = Bulk::new(usize::MAX);
        let store = Store::create_in(storage.clone(), &CreateOptions::default()).unwrap();
        // Two chunks of data, a hole, and a chunk that ends in a partial block.
        let mut img = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..2 * CHUNK).map(|i| (i % 253) as u8 | 1).collect();
        std::io::Write::write_all(&mut img, &data).unwrap();
        img.as_file().set_len(5 * CHUNK as u64 + 100).unwrap();
        img.as_file()
            .write_all_at(&[9; 100], 5 * CHUNK as u64)
            .unwrap();
        let (l, _) = import(&store, "img", img.path(), None, &mut |_, _| {}).unwrap();
        // The allocator hands out runs of at most 256 blocks (1 MiB of 4 KiB blocks); the
        // fresh pool's runs follow each other, so each chunk goes as one write. (The partial
        // block at the end is written under the store's lock, not as a bulk write.)
        assert_eq!(
            *storage.lens.lock().unwrap(),
            vec![CHUNK, CHUNK],
            "bulk writes of the import"
        );
        let mut back = vec![0u8; 5 * CHUNK + 100];
        store.read_layer(l.id, 0, &mut back).unwrap();
        assert!(back[..2 * CHUNK] == data[..]);
        assert!(back[2 * CHUNK..5 * CHUNK].iter().all(|&b| b == 0));
        assert_eq!(&back[5 * CHUNK..], &[9; 100][..]);
    }
}
