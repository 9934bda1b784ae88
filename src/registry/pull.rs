//! `pull REF [NAME]`: receive an image's chain base first, skipping every layer whose chain ID
//! the pool already holds (so pulling a child of a pulled image downloads only the child).
//! Each blob is streamed through a pipe into `receive`, which verifies it before committing:
//! a broken download leaves nothing behind.

use super::client::Registry;
use super::image::{is_layer_type, A_CHAIN_ID, LAYER_TYPE};
use super::{pipe, Layers, Meters, Options};
use crate::error::{Error, Result};
use crate::stream::content::CHAIN_ATTR;
use futures_util::StreamExt;
use oci_client::manifest::{OciDescriptor, OciManifest};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;

/// What a pull did (`pull --json` prints it; a lazy pull's reply is the same value).
pub type PullReport = crate::control::Pulled;

/// How one layer the pool lacked was got.
pub enum Got {
    /// Downloaded whole: this many bytes.
    Downloaded(u64),
    /// Made remote: fetched later, on demand and in the background (`pull --lazy`).
    Lazy,
}

/// Gets blob `d` into the pool as layer `name` over `parent`.
pub type GetLayer<'a> =
    dyn FnMut(&OciDescriptor, &str, Option<&str>) -> Result<(crate::volume::LayerInfo, Got)> + 'a;

/// Pull `reference` into the pool; the top layer is named `name` (default: the reference as
/// written), the layers under it by their chain IDs.
pub fn pull(
    pool: &dyn Layers,
    reference: &str,
    name: Option<&str>,
    opts: &Options,
    meters: Meters,
) -> Result<PullReport> {
    let reg = Registry::open(reference, opts)?;
    pull_with(&reg, pool, name, &mut |d, layer_name, parent| {
        let (layer, n) = download(pool, &reg, d, layer_name, parent, meters)?;
        Ok((layer, Got::Downloaded(n)))
    })
}

/// The walk of a pull, base first: layers whose chain ID the pool holds are skipped, the
/// others got by `get` (downloaded, or made remote by a lazy pull) and checked against the
/// manifest's chain IDs; then every layer's location is recorded.
pub fn pull_with(
    reg: &Registry,
    pool: &dyn Layers,
    name: Option<&str>,
    get: &mut GetLayer,
) -> Result<PullReport> {
    let layers = image_layers(reg)?;
    let mut have: HashMap<String, String> = HashMap::new();
    for l in pool.layers()? {
        if let Some(c) = l.attrs.get(CHAIN_ATTR) {
            have.insert(c.clone(), l.name.clone());
        }
    }
    let top_name = name.unwrap_or(&reg.label).to_string();
    let mut report = PullReport::default();
    let mut parent: Option<String> = None;
    // Every layer of the image, base first, as the pool names it.
    let mut names = Vec::new();
    for (i, d) in layers.iter().enumerate() {
        let chain = d
            .annotations
            .as_ref()
            .and_then(|a| a.get(A_CHAIN_ID))
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{}: layer {} has no {A_CHAIN_ID} annotation",
                    reg.label, d.digest
                ))
            })?;
        if let Some(n) = have.get(chain) {
            report.skipped.push(d.digest.clone());
            parent = Some(n.clone());
            names.push(n.clone());
            continue;
        }
        let last = i + 1 == layers.len();
        let layer_name = if last {
            top_name.clone()
        } else {
            chain.clone()
        };
        let (layer, got) = get(d, &layer_name, parent.as_deref())?;
        if layer.attrs.get(CHAIN_ATTR) != Some(chain) {
            return Err(Error::Corrupt(format!(
                "{}: layer {} was received as {:?} with chain ID {:?}, the manifest says {chain}",
                reg.label,
                d.digest,
                layer.name,
                layer.attrs.get(CHAIN_ATTR)
            )));
        }
        match got {
            Got::Downloaded(n) => {
                report.bytes_downloaded += n;
                report.downloaded.push(d.digest.clone());
            }
            Got::Lazy => report.lazy.push(d.digest.clone()),
        }
        have.insert(chain.clone(), layer.name.clone());
        names.push(layer.name.clone());
        parent = Some(layer.name);
    }
    report.name = parent.expect("an image has layers");
    // Where each blob is, for a later push to another repository to mount it from.
    let here = reg.location();
    for n in &names {
        pool.record_source(n, &here)?;
    }
    Ok(report)
}

/// The layer descriptors of a thinlayer image's manifest, base first; any other kind of
/// manifest or layer is refused naming it.
pub fn image_layers(reg: &Registry) -> Result<Vec<OciDescriptor>> {
    let (manifest, _) = reg
        .rt
        .block_on(reg.client.pull_manifest(&reg.reference, &reg.auth))
        .map_err(|e| reg.error("fetching the manifest", e))?;
    let OciManifest::Image(m) = manifest else {
        return Err(Error::InvalidInput(format!(
            "{}: an image index, not a thinlayer image",
            reg.label
        )));
    };
    if let Some(l) = m.layers.iter().find(|l| !is_layer_type(&l.media_type)) {
        return Err(Error::InvalidInput(format!(
            "{}: not a thinlayer image: layer {} has media type {:?}, not {LAYER_TYPE:?}",
            reg.label, l.digest, l.media_type
        )));
    }
    if m.layers.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{}: the image has no layers",
            reg.label
        )));
    }
    Ok(m.layers)
}

/// Stream blob `d` through a pipe into `receive`; returns the layer and the bytes downloaded.
pub fn download(
    pool: &dyn Layers,
    reg: &Registry,
    d: &OciDescriptor,
    name: &str,
    parent: Option<&str>,
    meters: Meters,
) -> Result<(crate::volume::LayerInfo, u64)> {
    let (rd, wr) = pipe()?;
    let mut meter = meters(format!("pull {name}"));
    let digest = d.digest.as_str();
    std::thread::scope(|s| {
        let receiver = s.spawn(move || pool.receive(name, parent, digest, rd, &mut *meter));
        let mut out = File::from(wr);
        let got = reg.rt.block_on(async {
            let mut st = reg.client.pull_blob_stream(&reg.reference, d).await?;
            let mut n = 0u64;
            while let Some(chunk) = st.next().await {
                let chunk = chunk?;
                n += chunk.len() as u64;
                // The receiver stopped (it refused the stream): its error says why.
                if out.write_all(&chunk).is_err() {
                    break;
                }
            }
            Ok::<u64, oci_client::errors::OciDistributionError>(n)
        });
        // End of stream for the receiver, whatever happened.
        drop(out);
        let r = receiver.join().expect("receive thread panicked");
        let n = got.map_err(|e| reg.error(&format!("downloading blob {digest}"), e))?;
        let (layer, _) =
            r.map_err(|e| e.context(format!("pulling {} (blob {digest})", reg.label)))?;
        Ok((layer, n))
    })
}
