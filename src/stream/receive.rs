//! `receive NAME [--parent P]`: recreate a layer from a send stream. The layer is made as an
//! import is (incomplete until the end record verifies, so a crash leaves nothing), and only
//! a canonical stream is accepted: then the received layer sends back the same bytes and its
//! content digest is the stream's.

use super::content::{self, ContentIds, Digest};
use super::decode::{Decoder, Record};
use crate::error::{Error, Result};
use crate::format::stream::{End, RUN_CUT};
use crate::volume::{ExtentState, LayerInfo, Store};
use serde::{Deserialize, Serialize};
use std::io::Read;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ReceiveStats {
    pub bytes_read: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub digest: String,
    pub chain_id: String,
}

/// Receive the stream `input` (named `label` in errors) as new read-only layer `name`. Its
/// parent is `parent`, which must have the chain ID the stream names, or else the layer of the
/// pool with that chain ID. On any error the layer does not exist.
pub fn receive(
    store: &Store,
    name: &str,
    parent: Option<&str>,
    input: &mut dyn Read,
    label: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(LayerInfo, ReceiveStats)> {
    receive_checked(store, name, parent, None, input, label, progress)
}

/// `receive`, refusing the stream (before anything is committed) unless its digest is
/// `expect`: a registry blob is checked against the digest the manifest names.
pub fn receive_checked(
    store: &Store,
    name: &str,
    parent: Option<&str>,
    expect: Option<Digest>,
    input: &mut dyn Read,
    label: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(LayerInfo, ReceiveStats)> {
    let input = std::io::BufReader::with_capacity(1 << 20, input);
    let (mut dec, header) = Decoder::new(input, label)?;
    let bs = store.block_size();
    if header.block_size != bs {
        return Err(Error::InvalidInput(format!(
            "{label}: the stream has {}-byte blocks, the pool {bs}-byte blocks",
            header.block_size
        )));
    }
    let need = (header.parent_chain_id != [0; 32]).then_some(Digest(header.parent_chain_id));
    let parent = match (need, parent) {
        (None, None) => None,
        (None, Some(p)) => {
            return Err(Error::Conflict(format!(
                "{label} holds a base layer (no parent), but --parent {p:?} was given"
            )))
        }
        (Some(need), Some(p)) => {
            let have = content::ids(store, p)?.chain_id;
            if have != need {
                return Err(Error::Conflict(format!(
                    "{label} needs a parent with chain ID {need}; --parent {p:?} has chain ID {have}"
                )));
            }
            Some(store.layer(p)?)
        }
        (Some(need), None) => Some(content::find_chain(store, &need)?.ok_or_else(|| {
            Error::NotFound(format!(
                "{label} needs a parent with chain ID {need}, and no layer of the pool has it; receive or pull that layer first"
            ))
        })?),
    };
    let import = store.importing(
        name,
        parent.as_ref().map(|p| p.name.as_str()),
        header.disk_size,
        &format!("{label}: the layer"),
    )?;
    let (end, digest) = fill(store, import.layer(), parent.as_ref(), &mut dec, progress)?;
    if let Some(want) = expect.filter(|w| *w != digest) {
        return Err(Error::Corrupt(format!(
            "{label}: digest mismatch: the stream is {digest}, expected {want}"
        )));
    }
    let ids = ContentIds::new(need, digest, dec.pos).with_version(header.version);
    let layer = import.finish(&ContentIds::changes(&ids.attrs()))?;
    Ok((
        layer,
        ReceiveStats {
            bytes_read: dec.pos,
            data_bytes: end.data_bytes,
            zero_bytes: end.zero_bytes,
            digest: ids.digest.to_string(),
            chain_id: ids.chain_id.to_string(),
        },
    ))
}

/// Write the records into the new layer, checking each is where a canonical stream puts it.
fn fill<R: Read>(
    store: &Store,
    layer: &LayerInfo,
    parent: Option<&LayerInfo>,
    dec: &mut Decoder<R>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(End, Digest)> {
    let bs = store.block_size() as u64;
    let size = layer.disk_size;
    let mut seen = End::default();
    // Where the last record ended, and whether it was data.
    let mut last: Option<(u64, bool)> = None;
    loop {
        let at = dec.pos;
        let label = dec.label.clone();
        let bad = |why: String| Error::InvalidInput(format!("{label}: record at byte {at}: {why}"));
        let (offset, len, data) = match dec.next_record()? {
            Record::End { end, digest } => {
                let counts = |e: &End| (e.data_records, e.data_bytes, e.zero_records, e.zero_bytes);
                if counts(&end) != counts(&seen) {
                    return Err(bad(format!(
                        "the end record counts {:?} (data records, bytes, zero records, bytes), the stream held {:?}",
                        counts(&end),
                        counts(&seen)
                    )));
                }
                progress(size, size);
                return Ok((end, digest));
            }
            Record::Data { offset, bytes } => (offset, bytes.len() as u64, Some(bytes)),
            Record::Zero { offset, len } => (offset, len, None),
        };
        let end = offset.checked_add(len).filter(|&e| e <= size && len > 0);
        let Some(end) = end else {
            return Err(bad(format!(
                "run at byte {offset} of {len} bytes is empty or past the layer's end ({size} bytes)"
            )));
        };
        if !offset.is_multiple_of(bs) || !(len.is_multiple_of(bs) || end == size) {
            return Err(bad(format!(
                "run at byte {offset} of {len} bytes is not whole {bs}-byte blocks"
            )));
        }
        if let Some((prev, prev_data)) = last {
            let joins = offset == prev && prev_data == data.is_some();
            if offset < prev || (joins && !(data.is_some() && offset.is_multiple_of(RUN_CUT))) {
                return Err(bad(format!(
                    "run at byte {offset} overlaps or continues the one before (ending at {prev}): not block order, or not canonical"
                )));
            }
        }
        last = Some((end, data.is_some()));
        match data {
            Some(bytes) => {
                if offset / RUN_CUT != (end - 1) / RUN_CUT {
                    return Err(bad(format!(
                        "data run at byte {offset} of {len} bytes crosses a {RUN_CUT}-byte cut"
                    )));
                }
                if let Some(i) = bytes
                    .chunks(bs as usize)
                    .position(|b| b.iter().all(|&x| x == 0))
                {
                    return Err(bad(format!(
                        "data block at byte {} is all zeros (a canonical stream sends a whiteout or nothing)",
                        offset + i as u64 * bs
                    )));
                }
                store.write_layer(layer.id, offset, &bytes)?;
                seen.data_records += 1;
                seen.data_bytes += len;
            }
            None => {
                let over_data = parent.is_some_and(|p| {
                    store
                        .extents_layer(p.id, offset, len)
                        .is_ok_and(|x| x.iter().all(|e| e.state == ExtentState::Data))
                });
                if !over_data {
                    return Err(bad(format!(
                        "zero run at byte {offset} of {len} bytes is not all over the parent's data (not canonical)"
                    )));
                }
                store.zero_layer(layer.id, offset, len, true)?;
                seen.zero_records += 1;
                seen.zero_bytes += len;
            }
        }
        progress(end, size);
    }
}
