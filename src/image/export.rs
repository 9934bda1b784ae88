//! `export NAME FILE`: write a chain as a sparse raw image. Only data extents are written;
//! everything that reads as zeros stays a hole, as `cp --sparse=always` would leave it.
//! Reading (and checksumming) the pool and writing the file overlap: a writer thread takes
//! filled buffers while the next ones are read.

use super::{PageBuf, CHUNK, WRITEBACK_EVERY};
use crate::error::{Error, Result};
use crate::volume::{ExtentState, Store};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct ExportStats {
    pub size: u64,
    pub bytes_written: u64,
}

/// Buffers in flight between the reader and the writer.
const DEPTH: usize = 3;

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
    let (full_tx, full_rx) = sync_channel::<(u64, usize, PageBuf)>(DEPTH);
    let (empty_tx, empty_rx) = sync_channel::<PageBuf>(DEPTH + 1);
    for _ in 0..DEPTH + 1 {
        empty_tx.send(PageBuf::new()).unwrap();
    }
    let (read_result, write_result) = std::thread::scope(|s| {
        let writer = s.spawn(|| write_chunks(out, full_rx, empty_tx));
        let r = read_chunks(store, layer.id, size, name, full_tx, &empty_rx, progress);
        (r, writer.join().expect("export writer panicked"))
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

fn read_chunks(
    store: &Store,
    id: crate::format::LayerId,
    size: u64,
    name: &str,
    full: SyncSender<(u64, usize, PageBuf)>,
    empty: &Receiver<PageBuf>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    // Walk the map in windows so a huge sparse layer never builds a huge extent list.
    let window = 1u64 << 30;
    let mut pos = 0;
    while pos < size {
        let wlen = window.min(size - pos);
        for x in store.extents_layer(id, pos, wlen)? {
            if x.state != ExtentState::Data {
                continue;
            }
            let mut off = x.offset;
            while off < x.offset + x.len {
                let n = (CHUNK as u64).min(x.offset + x.len - off) as usize;
                // The writer stopped (it failed): its error is reported by the caller.
                let Ok(mut buf) = empty.recv() else {
                    return Ok(());
                };
                // Each block is read once: around the page cache, where it is aligned.
                store
                    .read_layer_bulk(id, off, buf.get_mut(0..n))
                    .map_err(|e| e.context(format!("exporting {name:?}")))?;
                if full.send((off, n, buf)).is_err() {
                    return Ok(());
                }
                off += n as u64;
                progress(off, size);
            }
        }
        pos += wlen;
        progress(pos, size);
    }
    Ok(())
}

fn write_chunks(
    out: &File,
    full: Receiver<(u64, usize, PageBuf)>,
    empty: SyncSender<PageBuf>,
) -> std::io::Result<u64> {
    let mut written = 0;
    let mut unsynced = 0;
    for (off, n, buf) in full {
        out.write_all_at(buf.get(0..n), off)?;
        written += n as u64;
        unsynced += n as u64;
        if unsynced >= WRITEBACK_EVERY {
            // The export ends in a sync of the whole file; started now, the disk writes while
            // the rest is read, instead of after it (as qemu-img convert + sync does). Only a
            // hint: a failure here shows at that sync.
            let _ = crate::pool::storage::start_writeback(out);
            unsynced = 0;
        }
        let _ = empty.send(buf);
    }
    Ok(written)
}
