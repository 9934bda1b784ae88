//! `export NAME FILE`: write a chain as a sparse raw image. Only data extents are written;
//! everything that reads as zeros stays a hole, as `cp --sparse=always` would leave it.

use super::CHUNK;
use crate::error::{Error, Result};
use crate::volume::{ExtentState, Store};
use serde::Serialize;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

#[derive(Debug, Default, Serialize)]
pub struct ExportStats {
    pub size: u64,
    pub bytes_written: u64,
}

pub fn export(
    store: &Store,
    name: &str,
    file: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportStats> {
    let layer = store.layer(name)?;
    let size = layer.disk_size;
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(file)
        .map_err(|e| Error::io(format!("creating {}", file.display()), e))?;
    let werr = |e| Error::io(format!("writing {}", file.display()), e);
    out.set_len(size).map_err(werr)?;
    let mut stats = ExportStats {
        size,
        ..Default::default()
    };
    let mut buf = vec![0u8; CHUNK];
    // Walk the map in windows so a huge sparse layer never builds a huge extent list.
    let window = 1u64 << 30;
    let mut pos = 0;
    while pos < size {
        let wlen = window.min(size - pos);
        for x in store.extents_layer(layer.id, pos, wlen)? {
            if x.state != ExtentState::Data {
                continue;
            }
            let mut off = x.offset;
            while off < x.offset + x.len {
                let n = (CHUNK as u64).min(x.offset + x.len - off) as usize;
                store
                    .read_layer(layer.id, off, &mut buf[..n])
                    .map_err(|e| e.context(format!("exporting {name:?}")))?;
                out.write_all_at(&buf[..n], off).map_err(werr)?;
                stats.bytes_written += n as u64;
                off += n as u64;
                progress(off, size);
            }
        }
        pos += wlen;
        progress(pos, size);
    }
    out.sync_all().map_err(werr)?;
    Ok(stats)
}
