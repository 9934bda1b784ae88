//! `export NAME FILE`: write a chain as a sparse raw image. Only data extents are written;
//! everything that reads as zeros stays a hole, as `cp --sparse=always` would leave it.
//! Reading (and checksumming) the pool and writing the file overlap: `READERS` threads fill
//! buffers, each with one request in flight, while the calling thread writes the filled ones.
//! A buffer holds up to `CHUNK` bytes of data extents packed back to back, so the extents on
//! both sides of a hole come in one request when the pool holds them side by side.

use super::{PageBuf, CHUNK, WRITEBACK_EVERY};
use crate::error::{Error, Result};
use crate::volume::{ExtentState, Store};
use serde::Serialize;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct ExportStats {
    pub size: u64,
    pub bytes_written: u64,
}

/// Reader threads, so that several requests are in flight at the disk: fio on this VM's disk
/// read 1.2-1.4 GB/s with two 4 MiB direct reads in flight, 1.3-1.8 with four (docs/
/// BENCHMARKS.md, "Export: few large direct reads in flight"). Buffers: one being filled by
/// each reader, one being written, one queued (24 MiB in all).
const READERS: usize = 4;
const BUFFERS: usize = READERS + 2;

/// Export layer `name` of `store` to the image file at `file` (created or truncated).
pub fn export(
    store: &Store,
    name: &str,
    file: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportStats> {
    store.layer(name)?;
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(file)
        .map_err(|e| Error::io(format!("creating {}", file.display()), e))?;
    export_to(store, name, &out, &file.display().to_string(), progress)
}

/// Export layer `name` into `out`, an empty file opened for writing by whoever may write it
/// (the control API gets it from its client as a descriptor). `label` names it in errors.
pub fn export_to(
    store: &Store,
    name: &str,
    out: &File,
    label: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportStats> {
    let layer = store.layer(name)?;
    let size = layer.disk_size;
    let werr = |e| Error::io(format!("writing {label}"), e);
    // Empty first: only data extents are written, so nothing of an earlier attempt (or of the
    // file's old content) may survive where this layer reads zeros.
    out.set_len(0).map_err(werr)?;
    out.set_len(size).map_err(werr)?;
    let (full_tx, full_rx) = sync_channel::<(Chunk, PageBuf)>(BUFFERS);
    let (empty_tx, empty_rx) = sync_channel::<PageBuf>(BUFFERS);
    for _ in 0..BUFFERS {
        empty_tx.send(PageBuf::new()).unwrap();
    }
    let planner = Mutex::new(Planner::new(store, layer.id, size));
    let empty_rx = Mutex::new(empty_rx);
    let stop = AtomicBool::new(false);
    let (read_result, write_result) = std::thread::scope(|s| {
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let full = full_tx.clone();
                let (planner, empty, stop) = (&planner, &empty_rx, &stop);
                s.spawn(move || read_chunks(store, layer.id, name, planner, full, empty, stop))
            })
            .collect();
        drop(full_tx);
        let w = write_chunks(out, full_rx, empty_tx, size, progress);
        let mut r = Ok(());
        for h in readers {
            let one = h.join().expect("export reader panicked");
            if r.is_ok() {
                r = one;
            }
        }
        (r, w)
    });
    // A failed write ends the reader early; its own error is then only a consequence.
    let written = write_result.map_err(werr)?;
    read_result?;
    out.sync_all().map_err(werr)?;
    Ok(ExportStats {
        size,
        bytes_written: written,
    })
}

/// Export from the pool file at `pool` into `out` without taking the pool's lock. Another
/// process holding the pool may free and reuse blocks of the committed state being read; that
/// reads as a checksum mismatch, so the export starts again from the newer state (up to three
/// times; `restarted` is told).
pub fn export_pool(
    pool: &Path,
    name: &str,
    out: &File,
    label: &str,
    progress: &mut dyn FnMut(u64, u64),
    restarted: &mut dyn FnMut(),
) -> Result<ExportStats> {
    let mut attempt = 0;
    loop {
        let store = Store::open_read_only(pool)?;
        match export_to(&store, name, out, label, progress) {
            Err(Error::Corrupt(_)) if attempt < 3 && is_held(pool) => {
                restarted();
                attempt += 1;
            }
            r => return r,
        }
    }
}

fn is_held(pool: &Path) -> bool {
    matches!(
        crate::pool::lock::PoolLock::acquire(pool, "thinlayer export"),
        Err(Error::Busy(_))
    )
}

/// Data extents of the layer packed into `Chunk`s, in the layer's order.
struct Planner<'a> {
    store: &'a Store,
    id: crate::format::LayerId,
    size: u64,
    block: u64,
    /// Where the next window of the map starts.
    next_window: u64,
    /// Data extents (offset, len) of the windows seen, not packed yet.
    pending: VecDeque<(u64, u64)>,
}

/// Pieces `(offset in the layer, len)` of data, back to back in one buffer; `covered`: every
/// byte of the layer before it is planned (for the progress shown).
struct Chunk {
    pieces: Vec<(u64, u64)>,
    covered: u64,
}

impl<'a> Planner<'a> {
    fn new(store: &'a Store, id: crate::format::LayerId, size: u64) -> Self {
        Planner {
            store,
            id,
            size,
            block: store.block_size() as u64,
            next_window: 0,
            pending: VecDeque::new(),
        }
    }

    fn next(&mut self) -> Result<Option<Chunk>> {
        // Walk the map in windows so a huge sparse layer never builds a huge extent list.
        const WINDOW: u64 = 1 << 30;
        while self.pending.is_empty() && self.next_window < self.size {
            let len = WINDOW.min(self.size - self.next_window);
            let xs = self.store.extents_layer(self.id, self.next_window, len)?;
            self.pending.extend(
                xs.iter()
                    .filter(|x| x.state == ExtentState::Data)
                    .map(|x| (x.offset, x.len)),
            );
            self.next_window += len;
        }
        let aligned = |(o, l): (u64, u64)| o % self.block == 0 && l % self.block == 0;
        let mut pieces = Vec::new();
        let mut room = CHUNK as u64;
        while let Some(&(off, len)) = self.pending.front() {
            // An unaligned extent (a layer's end within a block) goes alone, as one read.
            if !pieces.is_empty() && !aligned((off, len)) {
                break;
            }
            let n = len.min(room);
            pieces.push((off, n));
            room -= n;
            if n == len {
                self.pending.pop_front();
            } else {
                self.pending[0] = (off + n, len - n);
            }
            if room == 0 || !aligned((off, n)) {
                break;
            }
        }
        let covered = match self.pending.front() {
            Some(&(off, _)) => off,
            None => self.next_window,
        };
        Ok((!pieces.is_empty()).then_some(Chunk { pieces, covered }))
    }
}

/// One reader: take the next chunk, fill a free buffer from the pool, hand it to the writer;
/// until the layer is read, the writer stopped, or a reader failed (`stop`).
fn read_chunks(
    store: &Store,
    id: crate::format::LayerId,
    name: &str,
    planner: &Mutex<Planner>,
    full: SyncSender<(Chunk, PageBuf)>,
    empty: &Mutex<Receiver<PageBuf>>,
    stop: &AtomicBool,
) -> Result<()> {
    let failed = |e: Error| {
        stop.store(true, Ordering::Relaxed);
        Err(e.context(format!("exporting {name:?}")))
    };
    while !stop.load(Ordering::Relaxed) {
        let chunk = match planner.lock().unwrap().next() {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return failed(e),
        };
        // The writer stopped (it failed): its error is reported by the caller.
        let Ok(mut buf) = empty.lock().unwrap().recv() else {
            break;
        };
        let n: u64 = chunk.pieces.iter().map(|p| p.1).sum();
        let into = buf.get_mut(0..n as usize);
        // Each block is read once: around the page cache where it is not cached already.
        let r = match chunk.pieces[..] {
            [(off, _)] => store.read_layer_bulk(id, off, into),
            _ => store.read_layer_ranges(id, &chunk.pieces, into),
        };
        if let Err(e) = r {
            return failed(e);
        }
        if full.send((chunk, buf)).is_err() {
            break;
        }
    }
    Ok(())
}

fn write_chunks(
    out: &File,
    full: Receiver<(Chunk, PageBuf)>,
    empty: SyncSender<PageBuf>,
    size: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> std::io::Result<u64> {
    let mut written = 0;
    let mut unsynced = 0;
    let mut covered = 0;
    for (chunk, buf) in full {
        let mut at = 0;
        for &(off, n) in &chunk.pieces {
            out.write_all_at(buf.get(at..at + n as usize), off)?;
            at += n as usize;
        }
        written += at as u64;
        unsynced += at as u64;
        if unsynced >= WRITEBACK_EVERY {
            // The export ends in a sync of the whole file; started now, the disk writes while
            // the rest is read, instead of after it (as qemu-img convert + sync does). Only a
            // hint: a failure here shows at that sync.
            let _ = crate::pool::storage::start_writeback(out);
            unsynced = 0;
        }
        // Two readers finish out of order: the progress shown only goes forward.
        covered = covered.max(chunk.covered);
        progress(covered, size);
        let _ = empty.send(buf);
    }
    progress(size, size);
    Ok(written)
}
