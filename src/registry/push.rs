//! `push NAME REF`: upload a layer chain, base first. A blob the registry already has is not
//! uploaded again (HEAD), so pushing a child of a pushed image uploads only the child.

use super::client::Registry;
use super::image;
use super::{pipe, Layers, Meters, Options};
use crate::error::{Error, Result};
use crate::stream::{ContentIds, Digest};
use crate::volume::LayerInfo;
use oci_client::manifest::OciManifest;
use oci_client::RegistryOperation;
use std::fs::File;
use std::io::Read;

#[derive(Debug, Default)]
pub struct PushReport {
    /// Digests of the layer blobs uploaded, and of those the registry already had.
    pub uploaded: Vec<String>,
    pub skipped: Vec<String>,
    pub bytes_uploaded: u64,
    pub manifest_url: String,
}

/// Bytes per upload request (the client's largest chunk).
const CHUNK: usize = 4 << 20;

pub fn push(
    pool: &dyn Layers,
    name: &str,
    reference: &str,
    opts: &Options,
    meters: Meters,
) -> Result<PushReport> {
    let reg = Registry::open(reference, opts)?;
    let mut chain: Vec<(LayerInfo, ContentIds)> = Vec::new();
    for l in pool.history(name)?.into_iter().rev() {
        let ids = ContentIds::of(&l).ok_or_else(|| {
            Error::Conflict(format!(
                "layer {:?} is writable; commit it before pushing (`thinlayer commit {}`)",
                l.name, l.name
            ))
        })?;
        chain.push((l, ids));
    }
    let block_size = block_size_of(pool)?;
    reg.rt
        .block_on(
            reg.client
                .auth(&reg.reference, &reg.auth, RegistryOperation::Push),
        )
        .map_err(|e| reg.error("authenticating", e))?;
    let mut report = PushReport::default();
    let mut sizes = Vec::new();
    for (l, ids) in &chain {
        let digest = ids.digest.to_string();
        let head = reg
            .rt
            .block_on(reg.client.blob_exists(&reg.reference, &digest));
        if head.map_err(|e| reg.error(&format!("looking up blob {digest}"), e))? {
            sizes.push(ids.size);
            report.skipped.push(digest);
            continue;
        }
        let n = upload(pool, &reg, &l.name, &digest, meters)?;
        report.bytes_uploaded += n;
        sizes.push(n);
        report.uploaded.push(digest);
    }
    let config = image::config(block_size, &chain);
    let cd = Digest::sha256(&config).to_string();
    let have = reg.rt.block_on(reg.client.blob_exists(&reg.reference, &cd));
    if !have.map_err(|e| reg.error(&format!("looking up the config {cd}"), e))? {
        reg.rt
            .block_on(reg.client.push_blob(&reg.reference, config.clone(), &cd))
            .map_err(|e| reg.error(&format!("uploading the config {cd}"), e))?;
    }
    let m = image::manifest(block_size, &chain, &sizes, &config);
    report.manifest_url = reg
        .rt
        .block_on(
            reg.client
                .push_manifest(&reg.reference, &OciManifest::Image(m)),
        )
        .map_err(|e| reg.error("uploading the manifest", e))?;
    Ok(report)
}

fn block_size_of(pool: &dyn Layers) -> Result<u32> {
    pool.block_size()
}

/// Send layer `name` through a pipe into a chunked upload; returns the bytes uploaded.
fn upload(
    pool: &dyn Layers,
    reg: &Registry,
    name: &str,
    digest: &str,
    meters: Meters,
) -> Result<u64> {
    let (rd, wr) = pipe()?;
    let mut meter = meters(format!("push {name}"));
    std::thread::scope(|s| {
        let sender = s.spawn(move || pool.send(name, wr, &mut *meter));
        // A blocking read on the current-thread runtime: the upload waits for the sender
        // anyway, and no other task runs meanwhile.
        let stream = futures_util::stream::unfold(File::from(rd), |mut f| async move {
            let mut buf = vec![0u8; CHUNK];
            let mut n = 0;
            while n < CHUNK {
                match f.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Some((Err(e.into()), f)),
                }
            }
            if n == 0 {
                return None;
            }
            buf.truncate(n);
            Some((Ok(bytes::Bytes::from(buf)), f))
        });
        let up = reg.rt.block_on(
            reg.client
                .push_blob_stream(&reg.reference, stream, digest, None),
        );
        let stats = sender.join().expect("send thread panicked");
        // A failed send ends the stream early: its error says why, not the registry's refusal.
        let stats = stats.map_err(|e| e.context(format!("pushing {name:?} to {}", reg.label)))?;
        up.map_err(|e| reg.error(&format!("uploading {name:?} as blob {digest}"), e))?;
        if stats.digest != digest {
            return Err(Error::Corrupt(format!(
                "layer {name:?}: its stream hashes to {}, its content ID says {digest}",
                stats.digest
            )));
        }
        Ok(stats.bytes)
    })
}
