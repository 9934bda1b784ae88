//! The live server's remote layers (DESIGN.md §13): `pull --lazy` makes an image's layers
//! remote at once and returns; each remote layer gets a `BlobSource` (reads of unfetched
//! blocks fetch their extent by range, verified) and a thread that fetches the rest
//! (`lazy::fill_all`). At every start of the server, each remote layer's blob is opened again
//! (footer and index, verified against `content.digest`) and its fill resumes from the map:
//! nothing committed is fetched again.
//!
//! The server dials only the registries named in remote layers' `registry.sources`, with the
//! credentials of the user it runs as (its docker config, `auth.rs`): the control socket is
//! owner-only, so the client that asked for the pull is that user (or root).
//!
//! A registry that fails is waited out: a read waits up to `Options::timeout` and then fails
//! (EIO, logged here naming the layer, extent and registry error); the fill thread backs off
//! and tries again until the layer is all local or removed, so reads and the fill resume by
//! themselves when the registry answers.

use super::client::Registry;
use super::fetcher::{Demand, Fetcher, Policy};
use super::image::{A_LAYER_FORMAT, LAYER_TYPE};
use super::lazy::{fill_all, BlobSource};
use super::pull::{self, Got};
use super::{range, Options as RegistryOptions, StoreLayers};
use crate::control::{FillStatus, Pulled};
use crate::error::{Error, Kind, Result};
use crate::format::{LayerId, VBlock};
use crate::live::LivePool;
use crate::log::Log;
use crate::stream::content::{ContentIds, DIGEST_ATTR, SIZE_ATTR};
use crate::stream::source::{plain_http, sources, PLAIN_HTTP_ATTR, SOURCES_ATTR};
use crate::volume::exports::LiveExports;
use crate::volume::{AttrChanges, LayerInfo, RemoteSource, Store};
use oci_client::manifest::OciDescriptor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How remote layers are fetched (`serve --remote-timeout`, `--no-remote-fill`,
/// `--lazy-registry`).
#[derive(Clone, Debug)]
pub struct Options {
    /// How long a read of an unfetched block waits for the registry before it fails (EIO).
    pub timeout: Duration,
    /// Fetch all of each remote layer in the background; without, only what is read.
    pub background: bool,
    /// The fill commits after this many bytes fetched.
    pub commit_every: u64,
    /// How long the fills wait after the last read that waited on a registry before they fetch
    /// again (`fetcher::Demand`).
    pub fill_quiet: Duration,
    /// The registries (`host[:port]`) containerd's remote snapshots may come from: the
    /// server dials a registry for containerd only if it is named here.
    pub registries: Vec<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            timeout: Duration::from_secs(60),
            background: true,
            commit_every: 8 << 20,
            fill_quiet: Duration::from_secs(1),
            registries: Vec::new(),
        }
    }
}

/// The first and longest wait of a fill thread after a failure.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// One remote layer's fetching.
struct Fill {
    name: String,
    /// `host[:port]/repository`.
    location: String,
    cancel: AtomicBool,
    source: Mutex<Option<Arc<BlobSource>>>,
    /// Told when `source` is set.
    opened: std::sync::Condvar,
    /// (state, last error) for `status`.
    state: Mutex<(&'static str, Option<String>)>,
}

impl Fill {
    fn set(&self, state: &'static str, error: Option<String>) {
        *self.state.lock().unwrap() = (state, error);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Sleep `d`, or less if cancelled.
    fn pause(&self, d: Duration) {
        let end = std::time::Instant::now() + d;
        while !self.cancelled() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50).min(d));
        }
    }
}

/// The remote layers of a live server and their fetches.
pub struct Fills {
    exports: Arc<LiveExports>,
    opts: Options,
    fills: Mutex<HashMap<LayerId, Arc<Fill>>>,
    /// Reads waiting on a registry, across every remote layer: the fills yield to them.
    demand: Arc<Demand>,
    log: Log,
}

/// A blob source whose failures the server's log hears of, naming the layer.
struct Logged {
    fill: Arc<Fill>,
    inner: Arc<BlobSource>,
    log: Log,
}

impl RemoteSource for Logged {
    fn listed(&self, vb: VBlock) -> bool {
        self.inner.listed(vb)
    }

    fn fetch(&self, store: &Store, layer: LayerId, vb: VBlock, end: VBlock) -> Result<()> {
        self.inner.fetch(store, layer, vb, end).inspect_err(|e| {
            self.log.warn(format_args!(
                "layer {:?}: a read of an unfetched block failed (EIO to the reader): {e}",
                self.fill.name
            ));
        })
    }
}

/// The source of a remote layer whose blob is being opened again (at a server's start): a
/// read waits for the opening, up to the remote timeout, as for a fetch. Until then which
/// blocks the blob lists is unknown, so every unmapped block waits; one the blob turns out
/// not to list reads through to the parent, as it would have.
struct Opening {
    fill: Arc<Fill>,
    timeout: Duration,
}

impl RemoteSource for Opening {
    fn listed(&self, _: VBlock) -> bool {
        true
    }

    fn fetch(&self, store: &Store, layer: LayerId, vb: VBlock, end: VBlock) -> Result<()> {
        let g = self.fill.source.lock().unwrap();
        let (g, _) = self
            .fill
            .opened
            .wait_timeout_while(g, self.timeout, |s| s.is_none())
            .unwrap();
        let Some(s) = g.clone() else {
            let (_, why) = self.fill.state.lock().unwrap().clone();
            return Err(Error::Unavailable(format!(
                "layer {:?}: its blob in {} could not be opened within {:?}{}",
                self.fill.name,
                self.fill.location,
                self.timeout,
                why.map_or_else(String::new, |w| format!(": {w}"))
            )));
        };
        drop(g);
        if s.listed(vb) {
            s.fetch(store, layer, vb, end)
        } else {
            Ok(())
        }
    }
}

impl Fills {
    pub fn new(exports: Arc<LiveExports>, opts: Options) -> Arc<Fills> {
        Arc::new(Fills {
            exports,
            demand: Demand::new(opts.fill_quiet),
            opts,
            fills: Mutex::new(HashMap::new()),
            log: Log::process().scoped("thinlayer"),
        })
    }

    fn store(&self) -> &Store {
        self.exports.store()
    }

    /// Resume every remote layer of the pool: open its blob again and fill it, each on its
    /// own thread (a registry that does not answer holds up nothing else).
    pub fn resume_all(self: &Arc<Self>) {
        let remote: Vec<LayerInfo> = self.store().remote_layers();
        for l in remote {
            let Some(location) = sources(&l).into_iter().next() else {
                self.log.error(format_args!(
                    "layer {:?} is remote but names no registry ({SOURCES_ATTR}): its unfetched blocks cannot be read",
                    l.name
                ));
                continue;
            };
            self.log.info(format_args!(
                "layer {:?}: resuming its fetch from {location}",
                l.name
            ));
            self.start(l.id, &l.name, &location, None);
        }
    }

    /// `pull --lazy`: the image's layers the pool lacks become remote layers (blobs of stream
    /// version 1, which have no index, are downloaded whole), their fetches start, and the
    /// reply comes at once.
    pub fn pull(
        self: &Arc<Self>,
        reference: &str,
        name: Option<&str>,
        opts: &RegistryOptions,
    ) -> Result<Pulled> {
        let reg = Arc::new(Registry::open(reference, opts)?);
        let pool = LivePool::serving(&self.exports);
        let layers = StoreLayers(pool);
        let quiet = |_: String| -> Box<super::Meter> { Box::new(|_, _| {}) };
        pull::pull_with(&reg, &layers, name, &mut |d, layer_name, parent| {
            if layer_version(d) <= crate::format::stream::VERSION_1 {
                let (l, n) = pull::download(&layers, &reg, d, layer_name, parent, &quiet)?;
                return Ok((l, Got::Downloaded(n)));
            }
            let info = self.lazy_layer(&reg, d, layer_name, parent, &[])?;
            Ok((info, Got::Lazy))
        })
    }

    /// Blob `d` of `reg` as remote layer `name` over `parent` (with `extra` attributes in the
    /// same transaction), attached and its fetch started.
    fn lazy_layer(
        self: &Arc<Self>,
        reg: &Arc<Registry>,
        d: &OciDescriptor,
        name: &str,
        parent: Option<&str>,
        extra: AttrChanges,
    ) -> Result<LayerInfo> {
        let location = reg.location();
        let blob = range::open(reg, d)?;
        let info = self.make_remote(&blob, d, name, parent, reg, extra)?;
        // Whoever pulled it is about to read it: its reads go first.
        self.demand.expect_reads();
        let source = self.source(reg, d, blob);
        self.start(info.id, &info.name, &location, Some(source));
        Ok(info)
    }

    /// A containerd remote snapshot (DESIGN.md §13): blob `layer` of manifest `manifest` of
    /// image `image` (a reference naming its registry and repository) as remote layer `name`
    /// over `parent`, with the snapshot's attributes `extra`, its fetch started. Refused,
    /// saying why, for a registry not in `Options::registries`, a blob that is not a
    /// thinlayer layer of this image, or one of stream version 1 (no index): containerd then
    /// unpacks it the usual way.
    pub fn snapshot(
        self: &Arc<Self>,
        image: &str,
        manifest: &str,
        layer: &str,
        name: &str,
        parent: Option<&str>,
        extra: AttrChanges,
    ) -> Result<LayerInfo> {
        // Checked before anything is dialled or read (credentials).
        let r: oci_client::Reference = image.parse().map_err(|e| {
            Error::InvalidInput(format!("{image:?} is not an image reference: {e}"))
        })?;
        let host = r.resolve_registry();
        if !self.opts.registries.iter().any(|a| a == host) {
            return Err(Error::InvalidInput(format!(
                "registry {host} is not one containerd's layers are pulled lazily from (serve --lazy-registry)"
            )));
        }
        let reg = Arc::new(Registry::open(
            &format!("{host}/{}@{manifest}", r.repository()),
            &RegistryOptions::default(),
        )?);
        let layers = pull::image_layers(&reg)?;
        let Some(d) = layers.iter().find(|d| d.digest == layer) else {
            return Err(Error::InvalidInput(format!(
                "{}: the manifest lists no layer {layer}",
                reg.label
            )));
        };
        if layer_version(d) <= crate::format::stream::VERSION_1 {
            return Err(Error::InvalidInput(format!(
                "{}: blob {layer} is of stream version 1, which has no index to read it by range",
                reg.label
            )));
        }
        self.lazy_layer(&reg, d, name, parent, extra)
    }

    /// Layer `name` over `parent`, remote, for blob `d` opened as `blob`: its size, content
    /// IDs, location and whiteouts.
    fn make_remote(
        &self,
        blob: &crate::stream::index::RangedBlob,
        d: &OciDescriptor,
        name: &str,
        parent: Option<&str>,
        reg: &Registry,
        extra: AttrChanges,
    ) -> Result<LayerInfo> {
        let store = self.store();
        let h = &blob.header;
        if h.block_size != store.block_size() {
            return Err(Error::InvalidInput(format!(
                "{}: its blocks are {} bytes, this pool's {}: it cannot be a layer here",
                blob.label,
                h.block_size,
                store.block_size()
            )));
        }
        let parent_chain = match parent {
            Some(p) => Some(crate::stream::content::ids(store, p)?.chain_id),
            None => None,
        };
        let want = parent_chain.map_or([0; 32], |c| c.0);
        if h.parent_chain_id != want {
            return Err(Error::Corrupt(format!(
                "{}: it is a diff over another parent than {parent:?} (chain ID in its header)",
                blob.label
            )));
        }
        let ids = ContentIds::new(parent_chain, blob.digest, d.size as u64).with_version(h.version);
        let mut attrs: Vec<(&str, String)> = ids.attrs().into();
        attrs.extend(source_attrs(reg));
        let mut changes: Vec<(&str, Option<&str>)> =
            attrs.iter().map(|(k, v)| (*k, Some(v.as_str()))).collect();
        changes.extend_from_slice(extra);
        let zeros: Vec<(u64, u64)> = blob
            .entries
            .iter()
            .filter(|e| e.is_whiteout())
            .map(|e| (e.offset, e.length))
            .collect();
        LivePool::serving(&self.exports).create_remote(name, parent, h.disk_size, &changes, &zeros)
    }

    /// The source of blob `d`'s extents: ranged GETs through `reg`.
    fn source(
        &self,
        reg: &Arc<Registry>,
        d: &OciDescriptor,
        blob: crate::stream::index::RangedBlob,
    ) -> Arc<BlobSource> {
        let (reg, d) = (reg.clone(), d.clone());
        let policy = Policy {
            timeout: self.opts.timeout,
            ..Policy::default()
        };
        let get = Box::new(move |o, n| range::fetch(&reg, &d, o, n));
        Arc::new(BlobSource::new(
            Fetcher::new(blob, get, policy),
            self.store().block_size(),
            self.demand.clone(),
        ))
    }

    /// Open remote layer `l`'s blob again from its attributes: `location`, `content.digest`
    /// and `content.size`.
    fn reopen(&self, l: &LayerInfo, location: &str) -> Result<Arc<BlobSource>> {
        let attr = |k: &str| {
            l.attrs.get(k).cloned().ok_or_else(|| {
                Error::Corrupt(format!(
                    "remote layer {:?} has no {k} attribute: its blob cannot be found",
                    l.name
                ))
            })
        };
        let digest = attr(DIGEST_ATTR)?;
        let size: i64 = attr(SIZE_ATTR)?.parse().map_err(|_| {
            Error::Corrupt(format!(
                "remote layer {:?}: {SIZE_ATTR} is not a number",
                l.name
            ))
        })?;
        let reg = Arc::new(Registry::open(
            &format!("{location}@{digest}"),
            &reopen_options(l, location),
        )?);
        let d = OciDescriptor {
            media_type: LAYER_TYPE.into(),
            digest,
            size,
            urls: None,
            artifact_type: None,
            annotations: None,
        };
        let blob = range::open(&reg, &d)?;
        if blob.header.block_size != self.store().block_size() {
            return Err(Error::Corrupt(format!(
                "{}: {}-byte blocks, this pool's are {}",
                blob.label,
                blob.header.block_size,
                self.store().block_size()
            )));
        }
        Ok(self.source(&reg, &d, blob))
    }

    /// Attach `source` (or open one) to remote layer `id` and fetch it on a thread.
    fn start(
        self: &Arc<Self>,
        id: LayerId,
        name: &str,
        location: &str,
        source: Option<Arc<BlobSource>>,
    ) {
        let fill = Arc::new(Fill {
            name: name.to_string(),
            location: location.to_string(),
            cancel: AtomicBool::new(false),
            source: Mutex::new(None),
            opened: std::sync::Condvar::new(),
            state: Mutex::new(("opening", None)),
        });
        if let Some(old) = self.fills.lock().unwrap().insert(id, fill.clone()) {
            old.cancel.store(true, Ordering::SeqCst);
        }
        // Attached before the reply (or, at a start, before anything is served), so no read
        // of the layer finds it sourceless.
        let attached = match source {
            Some(s) => self.attach(id, &fill, s),
            None => self.store().attach_remote(
                id,
                Arc::new(Opening {
                    fill: fill.clone(),
                    timeout: self.opts.timeout,
                }),
            ),
        };
        if let Err(e) = attached {
            fill.set("failed", Some(e.to_string()));
            return;
        }
        let me = self.clone();
        let t = std::thread::Builder::new()
            .name(format!("fill {id}"))
            .spawn(move || me.run(id, &fill));
        if let Err(e) = t {
            self.log
                .error(format_args!("layer {name:?}: no thread for its fetch: {e}"));
        }
    }

    fn attach(&self, id: LayerId, fill: &Arc<Fill>, s: Arc<BlobSource>) -> Result<()> {
        let logged = Arc::new(Logged {
            fill: fill.clone(),
            inner: s.clone(),
            log: self.log.clone(),
        });
        self.store().attach_remote(id, logged)?;
        *fill.source.lock().unwrap() = Some(s);
        fill.opened.notify_all();
        Ok(())
    }

    /// A fill thread: open the blob if need be, then fetch until all is local, retrying after
    /// failures (the registry down, a wrong byte) until cancelled or the layer is gone.
    fn run(&self, id: LayerId, fill: &Arc<Fill>) {
        let mut wait = RETRY_MIN;
        while !fill.cancelled() {
            match self.step(id, fill) {
                Ok(()) => return,
                Err(_) if fill.cancelled() => return,
                // Removed, or no longer remote: nothing left to fetch.
                Err(e) if matches!(e.kind(), Kind::NotFound | Kind::Conflict) => return,
                Err(e) => {
                    self.log.warn(format_args!(
                        "layer {:?}: fetching from {} failed, trying again in {wait:?}: {e}",
                        fill.name, fill.location
                    ));
                    fill.set("waiting", Some(e.to_string()));
                    fill.pause(wait);
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// One attempt of a fill thread: Ok when it is done (all local, cancelled, or on demand
    /// only).
    fn step(&self, id: LayerId, fill: &Arc<Fill>) -> Result<()> {
        let source = fill.source.lock().unwrap().clone();
        let source = match source {
            Some(s) => s,
            None => {
                let l = self.store().layers().into_iter().find(|l| l.id == id);
                let Some(l) = l.filter(|l| l.remote) else {
                    return Ok(());
                };
                let s = self.reopen(&l, &fill.location)?;
                self.attach(id, fill, s.clone())?;
                s
            }
        };
        if !self.opts.background {
            fill.set("on demand", None);
            return Ok(());
        }
        fill.set("fetching", None);
        let f = fill_all(
            self.store(),
            id,
            &source,
            self.opts.commit_every,
            &fill.cancel,
        )?;
        if f.finished {
            self.log.info(format_args!(
                "layer {:?}: all of it is local now ({} extent(s) fetched by this fill)",
                fill.name, f.extents
            ));
            self.fills.lock().unwrap().remove(&id);
        }
        Ok(())
    }

    /// Stop fetching layer `id` (it was removed).
    pub fn cancel(&self, id: LayerId) {
        if let Some(f) = self.fills.lock().unwrap().remove(&id) {
            f.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// Stop every fill. Not waited for: a fill blocked on a registry that does not answer
    /// would hold up the server's stop; what a fill stores after the server's last commit
    /// is not committed, and is fetched again by the next fill.
    pub fn stop(&self) {
        for (_, f) in self.fills.lock().unwrap().drain() {
            f.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// The fetches in progress, for `status`.
    pub fn status(&self) -> Vec<FillStatus> {
        let fills: Vec<(LayerId, Arc<Fill>)> = self
            .fills
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        if fills.is_empty() {
            return Vec::new();
        }
        // `remote_layers`: `layers` waits for a lazily opened pool's maps, and `status` must
        // answer while they load (it waited for the whole load).
        let layers = self.store().remote_layers();
        let mut out: Vec<FillStatus> = fills
            .into_iter()
            .filter_map(|(id, f)| {
                let l = layers.iter().find(|l| l.id == id && l.remote)?;
                let (state, error) = f.state.lock().unwrap().clone();
                let src = f.source.lock().unwrap().clone();
                // Its fill gives the link to reads for now.
                let state = match &src {
                    Some(s) if state == "fetching" && s.yielding() => "yielding to reads",
                    _ => state,
                };
                Some(FillStatus {
                    layer: l.name.clone(),
                    registry: f.location.clone(),
                    fetched: l.fetched.unwrap_or(0),
                    total: src.as_ref().map_or(0, |s| s.data_bytes()),
                    requests: src.as_ref().map_or(0, |s| s.fetcher().requests()),
                    state: state.to_string(),
                    error,
                })
            })
            .collect();
        out.sort_by(|a, b| a.layer.cmp(&b.layer));
        out
    }
}

/// Where a remote layer's blob is, as attributes: `registry.sources`, and the host in
/// `registry.plain_http` when `reg` speaks plain HTTP (so a restart resumes the same way).
fn source_attrs(reg: &Registry) -> Vec<(&'static str, String)> {
    let mut v = vec![(SOURCES_ATTR, reg.location())];
    if reg.plain_http {
        v.push((
            PLAIN_HTTP_ATTR,
            reg.reference.resolve_registry().to_string(),
        ));
    }
    v
}

/// How to reach `location` again for remote layer `l`: over plain HTTP if it was so reached.
fn reopen_options(l: &LayerInfo, location: &str) -> RegistryOptions {
    RegistryOptions {
        plain_http: plain_http(l, location),
    }
}

/// The stream version a layer descriptor names (1 when it names none: older pushes).
fn layer_version(d: &OciDescriptor) -> u32 {
    d.annotations
        .as_ref()
        .and_then(|a| a.get(A_LAYER_FORMAT))
        .and_then(|v| v.parse().ok())
        .unwrap_or(crate::format::stream::VERSION_1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer with the source attributes `make_remote` gives a layer pulled through `reg`,
    /// as a pool closed and opened again has it.
    fn recorded(reg: &Registry) -> LayerInfo {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pool");
        let s = Store::create(&p, &crate::volume::CreateOptions::default(), "a test").unwrap();
        s.create_layer("l", None, Some(1 << 20)).unwrap();
        s.commit_layer("l").unwrap();
        let attrs = source_attrs(reg);
        let changes: Vec<(&str, Option<&str>)> =
            attrs.iter().map(|(k, v)| (*k, Some(v.as_str()))).collect();
        s.set_attrs("l", &changes).unwrap();
        s.flush().unwrap();
        drop(s);
        Store::open(&p, "a test").unwrap().layer("l").unwrap()
    }

    /// The registry the fetch of `l` resumes with at a start (as `reopen` opens it).
    fn resumed(l: &LayerInfo) -> Registry {
        let location = sources(l).into_iter().next().unwrap();
        let blob = format!("{location}@sha256:{}", "ab".repeat(32));
        Registry::open(&blob, &reopen_options(l, &location)).unwrap()
    }

    #[test]
    fn a_layer_pulled_over_plain_http_resumes_over_plain_http() {
        let image = "registry.example:5000/acme/app:1";
        let plain = Registry::open(image, &RegistryOptions { plain_http: true }).unwrap();
        assert!(plain.plain_http);
        let l = recorded(&plain);
        let again = resumed(&l);
        assert!(again.plain_http, "--plain-http was forgotten");
        assert_eq!(again.location(), "registry.example:5000/acme/app");
        // The record is for that registry only: another one is dialled with HTTPS.
        assert!(!plain_http(&l, "registry.example:5001/acme/app"));
        assert!(!plain_http(&l, "other.example/acme/app"));

        let tls = Registry::open(image, &RegistryOptions::default()).unwrap();
        assert!(!tls.plain_http);
        let l = recorded(&tls);
        assert!(!l.attrs.contains_key(PLAIN_HTTP_ATTR));
        assert!(!resumed(&l).plain_http, "HTTPS became plain HTTP");
    }
}
