//! A layer blob read by HTTP Range requests (docs/STREAM.md §5): the footer, the index, then
//! any extent, each verified before it is returned (`stream::index::RangedBlob`). What a lazy
//! pull reads a remote layer through; a version-1 blob has no index and is pulled whole.

use super::client::Registry;
use crate::error::{Error, Result};
use crate::stream::index::RangedBlob;
use crate::stream::Digest;
use futures_util::StreamExt;
use oci_client::client::BlobResponse;
use oci_client::manifest::OciDescriptor;

/// Bytes `offset .. offset + len` of blob `d`: one ranged GET. A registry that answers with
/// the whole blob (ignoring Range) is refused rather than downloaded.
pub fn fetch(reg: &Registry, d: &OciDescriptor, offset: u64, len: u64) -> Result<Vec<u8>> {
    let what = || {
        format!(
            "reading bytes {offset}..{} of blob {}",
            offset + len,
            d.digest
        )
    };
    reg.rt.block_on(async {
        let r = reg
            .client
            .pull_blob_stream_partial(&reg.reference, d, offset, Some(len))
            .await
            .map_err(|e| reg.error(&what(), e))?;
        let BlobResponse::Partial(mut st) = r else {
            return Err(Error::Unavailable(format!(
                "{}: {}: the registry answered with the whole blob, not the range",
                reg.label,
                what()
            )));
        };
        let mut out = Vec::with_capacity(len as usize);
        while let Some(chunk) = st.next().await {
            let chunk = chunk.map_err(|e| Error::io(format!("{}: {}", reg.label, what()), e))?;
            if out.len() + chunk.len() > len as usize {
                return Err(Error::Corrupt(format!(
                    "{}: {}: the registry sent more than asked",
                    reg.label,
                    what()
                )));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    })
}

/// Open blob `d` for ranged reads: its footer and index, verified against its digest.
pub fn open(reg: &Registry, d: &OciDescriptor) -> Result<RangedBlob> {
    let digest: Digest = d.digest.parse()?;
    let label = format!("{}: blob {}", reg.label, d.digest);
    RangedBlob::open(
        &mut |o, n| fetch(reg, d, o, n),
        digest,
        d.size as u64,
        &label,
    )
}

/// Extent `e` of `blob` (opened from `d`), verified.
pub fn read(
    reg: &Registry,
    d: &OciDescriptor,
    blob: &RangedBlob,
    e: &crate::format::stream::Entry,
) -> Result<Vec<u8>> {
    blob.read(&mut |o, n| fetch(reg, d, o, n), e)
}
