//! Building the replies that carry data (READ, BLOCK_STATUS) into one buffer each, so a reply
//! goes out in a single write. The caller sends the buffer; errors are the caller's to answer.

use super::handshake::ALLOCATION_CONTEXT_ID;
use super::proto::*;
use crate::volume::{BlockDevice, Extent, ExtentState};
use crate::{Error, Result};

/// Reads at least this long are split around holes; shorter ones are cheaper sent whole.
const SPLIT_READ_MIN: usize = 64 * 1024;
/// One BLOCK_STATUS reply describes at most this much and this many extents; the client asks
/// again for the rest, and the server never builds a reply proportional to a hostile length.
const BLOCK_STATUS_MAX_LEN: u64 = 1 << 30;
const BLOCK_STATUS_MAX_EXTENTS: usize = 16 * 1024;

/// A READ reply: a simple reply with the data, or structured chunks. Unless the client said
/// DF, a long read over holes sends them as hole chunks instead of zeros.
pub fn read(
    dev: &dyn BlockDevice,
    structured: bool,
    req: &Request,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let len = req.len as usize;
    if !structured {
        buf.resize(SimpleReply::LEN + len, 0);
        dev.read_at(req.offset, &mut buf[SimpleReply::LEN..])?;
        let header = SimpleReply {
            error: 0,
            handle: req.handle,
        };
        header.pack_into(buf);
        return Ok(());
    }
    if req.flags & CMD_FLAG_DF == 0 && len >= SPLIT_READ_MIN {
        let extents = dev.extents(req.offset, len as u64)?;
        if covers(&extents, req.offset, len as u64) && has_holes(&extents) {
            return split_read(dev, req, &extents, buf);
        }
    }
    data_chunk(dev, req.offset, req.len, req.handle, REPLY_FLAG_DONE, buf)
}

/// Appends one OFFSET_DATA chunk read from the device.
fn data_chunk(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u32,
    handle: u64,
    flags: u16,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let data = begin_offset_data(buf, flags, handle, offset, len);
    dev.read_at(offset, &mut buf[data])
}

/// One chunk per run of data or of zeros; the last one carries DONE.
fn split_read(
    dev: &dyn BlockDevice,
    req: &Request,
    extents: &[Extent],
    buf: &mut Vec<u8>,
) -> Result<()> {
    let runs = runs(extents);
    for (i, &(offset, len, data)) in runs.iter().enumerate() {
        let flags = if i + 1 == runs.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        // Every run lies inside the request, whose length is a u32.
        let len = len as u32;
        if data {
            data_chunk(dev, offset, len, req.handle, flags, buf)?;
        } else {
            Chunk::OffsetHole { offset, len }.pack_into(flags, req.handle, buf);
        }
    }
    Ok(())
}

/// A BLOCK_STATUS reply for `base:allocation`: holes read as zeros and are unallocated, zero
/// extents read as zeros but are allocated, data is neither.
pub fn block_status(dev: &dyn BlockDevice, req: &Request, buf: &mut Vec<u8>) -> Result<()> {
    let len = (req.len as u64).min(BLOCK_STATUS_MAX_LEN);
    let extents = dev.extents(req.offset, len)?;
    if extents.first().map(|e| e.offset) != Some(req.offset) {
        let msg = format!(
            "device \"{}\" described no extent at byte {}",
            dev.name(),
            req.offset
        );
        return Err(Error::Corrupt(msg));
    }
    let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        BLOCK_STATUS_MAX_EXTENTS
    };
    let mut descriptors: Vec<(u64, u32)> = Vec::new();
    for e in &extents {
        let flags = match e.state {
            ExtentState::Data => 0,
            ExtentState::Zero => STATE_ZERO,
            ExtentState::Hole => STATE_HOLE | STATE_ZERO,
        };
        let full = descriptors.len() == max;
        match descriptors.last_mut() {
            Some((l, f)) if *f == flags => *l += e.len,
            _ if full => break,
            _ => descriptors.push((e.len, flags)),
        }
    }
    let chunk = Chunk::BlockStatus {
        context: ALLOCATION_CONTEXT_ID,
        descriptors: descriptors
            .into_iter()
            .map(|(l, flags)| Descriptor {
                len: l.min(len) as u32,
                flags,
            })
            .collect(),
    };
    chunk.pack_into(REPLY_FLAG_DONE, req.handle, buf);
    Ok(())
}

/// Whether `extents` tile `[offset, offset+len)` exactly; anything else is not trusted to
/// shape a reply.
fn covers(extents: &[Extent], offset: u64, len: u64) -> bool {
    let mut at = offset;
    for e in extents {
        if e.offset != at || e.len == 0 {
            return false;
        }
        at += e.len;
    }
    !extents.is_empty() && at == offset + len
}

fn has_holes(extents: &[Extent]) -> bool {
    extents.iter().any(|e| e.state != ExtentState::Data)
}

/// Merges extents into runs of (offset, len, is_data); Zero and Hole both read as zeros.
fn runs(extents: &[Extent]) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in extents {
        let data = e.state == ExtentState::Data;
        match out.last_mut() {
            Some((_, len, d)) if *d == data => *len += e.len,
            _ => out.push((e.offset, e.len, data)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, state: ExtentState) -> Extent {
        Extent { offset, len, state }
    }

    #[test]
    fn runs_merge_zero_and_hole() {
        let e = [
            ext(0, 10, ExtentState::Data),
            ext(10, 5, ExtentState::Zero),
            ext(15, 5, ExtentState::Hole),
            ext(20, 1, ExtentState::Data),
        ];
        assert_eq!(
            runs(&e),
            vec![(0, 10, true), (10, 10, false), (20, 1, true)]
        );
    }

    #[test]
    fn covers_rejects_gaps_and_short_lists() {
        let e = [ext(0, 10, ExtentState::Data), ext(11, 5, ExtentState::Zero)];
        assert!(!covers(&e, 0, 16));
        assert!(!covers(&e[..1], 0, 16));
        assert!(covers(&e[..1], 0, 10));
        assert!(!covers(&[], 0, 0));
    }
}
