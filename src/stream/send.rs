//! `send NAME [--from ANCESTOR]`: a read-only layer's diff over an ancestor (its parent by
//! default) as a canonical stream. Canonical: data runs are maximal runs of the diff's data
//! blocks cut at every multiple of `RUN_CUT`, zero runs are maximal, so equal layers give
//! equal bytes on every host.

use super::content::ContentIds;
use super::digest::Digest;
use super::encode::Encoder;
use crate::error::{Error, Result};
use crate::format::stream::{End, Header, RUN_CUT, VERSION};
use crate::format::LayerId;
use crate::volume::{ExtentState, LayerInfo, Store};
use serde::{Deserialize, Serialize};
use std::io::Write;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SendStats {
    /// Bytes of the stream.
    pub bytes: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// The stream's digest (`sha256:...`): the layer's content digest when sent over its parent.
    pub digest: String,
}

/// Send layer `name` over `floor` (an ancestor, or None for the whole chain), whose chain ID
/// `floor_chain` the header names, into `out`. `label` names the destination in errors.
/// `stream::send` finds both.
pub fn send_over(
    store: &Store,
    name: &str,
    floor: Option<&LayerInfo>,
    floor_chain: Option<Digest>,
    out: &mut dyn Write,
    label: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SendStats> {
    let top = store.layer(name)?;
    // In the version its content IDs were taken in, so its digest stays what it was.
    let version = ContentIds::of(&top).map_or(VERSION, |i| i.version);
    let (_, stats) = write_stream(
        store,
        &top,
        floor,
        floor_chain,
        version,
        out,
        label,
        progress,
    )?;
    Ok(stats)
}

/// The content digest of read-only layer `name` over its parent, whose chain ID is
/// `parent_chain`: its stream in the current version, hashed and thrown away.
pub fn digest(
    store: &Store,
    name: &str,
    parent_chain: Option<Digest>,
) -> Result<(Digest, SendStats)> {
    let top = store.layer(name)?;
    let floor = match &top.parent {
        Some(p) => Some(store.layer(p)?),
        None => None,
    };
    let mut sink = std::io::sink();
    write_stream(
        store,
        &top,
        floor.as_ref(),
        parent_chain,
        VERSION,
        &mut sink,
        "the digest",
        &mut |_, _| {},
    )
}

// Private, with two callers (a send and a digest) that differ in every argument but the store:
// a struct for them would only rename the list.
#[allow(clippy::too_many_arguments)]
fn write_stream(
    store: &Store,
    top: &LayerInfo,
    floor: Option<&LayerInfo>,
    floor_chain: Option<Digest>,
    version: u32,
    out: &mut dyn Write,
    label: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Digest, SendStats)> {
    if top.writable || top.importing {
        return Err(Error::Conflict(format!(
            "layer {:?} is writable; commit it first (`thinlayer commit {}`) so it cannot change while it is sent",
            top.name, top.name
        )));
    }
    let werr = |e| {
        Error::io(
            format!("writing the stream of {:?} to {label}", top.name),
            e,
        )
    };
    let bs = store.block_size() as u64;
    let size = top.disk_size;
    let header = header(version, bs as u32, size, floor_chain);
    let out = std::io::BufWriter::with_capacity(1 << 20, out);
    let mut enc = Encoder::new(out, &header).map_err(werr)?;
    let floor_id = floor.map(|f| f.id);
    let mut buf = Vec::with_capacity(RUN_CUT as usize);
    // Windows of whole cuts, so a huge sparse layer never builds a huge extent list.
    let window = 256 * RUN_CUT;
    let mut pos = 0;
    while pos < size {
        let wlen = window.min(size - pos);
        for x in store.diff_extents(top.id, floor_id, pos, wlen)? {
            if x.state == ExtentState::Zero {
                enc.zero(x.offset, x.len).map_err(werr)?;
                continue;
            }
            let mut off = x.offset;
            let end = x.offset + x.len;
            while off < end {
                let n = (end.min((off / RUN_CUT + 1) * RUN_CUT) - off) as usize;
                buf.resize(n, 0);
                store
                    .read_layer(top.id, off, &mut buf)
                    .map_err(|e| e.context(format!("sending {:?}", top.name)))?;
                put_run(store, &mut enc, floor_id, off, &buf, bs).map_err(werr)?;
                off += n as u64;
                progress(off, size);
            }
        }
        pos += wlen;
        progress(pos, size);
    }
    let (digest, end, bytes) = enc.finish().map_err(werr)?;
    Ok(finished(digest, end, bytes))
}

fn finished(digest: Digest, end: End, bytes: u64) -> (Digest, SendStats) {
    let stats = SendStats {
        bytes,
        data_bytes: end.data_bytes,
        zero_bytes: end.zero_bytes,
        digest: digest.to_string(),
    };
    (digest, stats)
}

fn header(version: u32, block_size: u32, disk_size: u64, floor_chain: Option<Digest>) -> Header {
    Header {
        version,
        flags: 0,
        block_size,
        disk_size,
        parent_chain_id: floor_chain.map_or([0; 32], |d| d.0),
    }
}

/// The digest of a diff whose pieces arrive in block order from somewhere other than the
/// store: an import hashes what it writes, so the content ID costs no second read of the layer.
/// It cuts data runs as `write_stream` does (maximal runs of data blocks, cut at every multiple
/// of `RUN_CUT`), so it yields the bytes `send` would; a test holds the two equal.
pub struct DiffDigest {
    enc: Encoder<std::io::Sink>,
    /// The data run being gathered: its offset and bytes.
    at: u64,
    run: Vec<u8>,
}

impl DiffDigest {
    /// The stream of a layer of `disk_size` bytes over a parent whose chain ID is `parent_chain`.
    pub fn new(block_size: u32, disk_size: u64, parent_chain: Option<Digest>) -> DiffDigest {
        let header = header(VERSION, block_size, disk_size, parent_chain);
        DiffDigest {
            enc: Encoder::new(std::io::sink(), &header).expect("a sink takes every write"),
            at: 0,
            run: Vec::with_capacity(RUN_CUT as usize),
        }
    }

    /// Data blocks of the diff, in a row (none all zeros; the layer's last one may be short).
    /// `ends`: no data block follows them directly. A piece of them that is a whole run (it
    /// ends at a cut, or where the run ends) is hashed where it lies; only a piece the next
    /// call may extend is copied aside until it does.
    pub fn data(&mut self, offset: u64, bytes: &[u8], ends: bool) {
        if !self.run.is_empty() && self.at + self.run.len() as u64 != offset {
            self.put_run();
        }
        let mut at = 0;
        while at < bytes.len() {
            let o = offset + at as u64;
            if o.is_multiple_of(RUN_CUT) {
                self.put_run();
            }
            let n = ((RUN_CUT - o % RUN_CUT) as usize).min(bytes.len() - at);
            let piece = &bytes[at..at + n];
            at += n;
            let whole = (o + n as u64).is_multiple_of(RUN_CUT) || (at == bytes.len() && ends);
            if self.run.is_empty() && whole {
                self.enc.data(o, piece).expect("a sink takes every write");
                continue;
            }
            if self.run.is_empty() {
                self.at = o;
            }
            self.run.extend_from_slice(piece);
            if whole {
                self.put_run();
            }
        }
    }

    /// A whiteout of the diff: zeros over the parent's data.
    pub fn zero(&mut self, offset: u64, len: u64) {
        self.put_run();
        self.enc
            .zero(offset, len)
            .expect("a sink takes every write");
    }

    fn put_run(&mut self) {
        if !self.run.is_empty() {
            self.enc
                .data(self.at, &self.run)
                .expect("a sink takes every write");
            self.run.clear();
        }
    }

    /// The stream's digest and its sizes, as `digest` reports them.
    pub fn finish(mut self) -> (Digest, SendStats) {
        self.put_run();
        let (digest, end, bytes) = self.enc.finish().expect("a sink takes every write");
        finished(digest, end, bytes)
    }
}

/// One cut of data blocks. A data block that reads as zeros (stores never keep one, but a
/// stream must not depend on that) goes out as what it means: a whiteout over the floor's
/// data, or nothing over zeros.
fn put_run<W: Write>(
    store: &Store,
    enc: &mut Encoder<W>,
    floor: Option<LayerId>,
    off: u64,
    buf: &[u8],
    bs: u64,
) -> std::io::Result<()> {
    let mut start = 0;
    let blocks: Vec<&[u8]> = buf.chunks(bs as usize).collect();
    for (i, b) in blocks.iter().enumerate() {
        if b.iter().any(|&x| x != 0) {
            continue;
        }
        if start < i {
            enc.data(
                off + start as u64 * bs,
                &buf[start * bs as usize..i * bs as usize],
            )?;
        }
        start = i + 1;
        let at = off + i as u64 * bs;
        let over_data = floor.is_some_and(|f| {
            store
                .extents_layer(f, at, b.len() as u64)
                .is_ok_and(|x| x.iter().any(|e| e.state == ExtentState::Data))
        });
        if over_data {
            enc.zero(at, b.len() as u64)?;
        }
    }
    if start < blocks.len() {
        enc.data(off + start as u64 * bs, &buf[start * bs as usize..])?;
    }
    Ok(())
}
