use super::Target;
use crate::error::Result;
#[cfg(feature = "registry")]
use {
    super::progress::Progress,
    super::unexpected,
    crate::control::{Reply, Request},
    crate::registry::{self, Layers, Meter, Options},
    crate::stream::{ReceiveStats, SendStats},
    crate::units::human,
    crate::volume::LayerInfo,
    std::os::fd::OwnedFd,
};

/// Upload a read-only layer and its ancestors to an OCI registry, one blob per layer.
#[derive(clap::Args)]
#[command(
    after_help = "Example: thinlayer push acme/app:2 registry.example:5000/acme/app:2\n\n\
Blobs the registry already has are not sent again. Credentials come from ~/.docker/config.json\n\
($DOCKER_CONFIG) as docker and skopeo write them (`docker login`). HTTPS, except for a registry\n\
on loopback (127.0.0.1, localhost, ::1) or with --plain-http."
)]
#[cfg_attr(not(feature = "registry"), allow(dead_code))]
pub struct PushArgs {
    name: String,
    reference: String,
    /// Speak plain HTTP (no TLS) to a registry that is not on this machine.
    #[arg(long)]
    plain_http: bool,
}

/// Download an image pushed by `thinlayer push`, skipping layers the pool already holds.
#[derive(clap::Args)]
#[command(
    after_help = "The top layer is named NAME (default: REF as written); the layers under it are\n\
named by their chain IDs unless the pool already holds them."
)]
#[cfg_attr(not(feature = "registry"), allow(dead_code))]
pub struct PullArgs {
    reference: String,
    name: Option<String>,
    /// Speak plain HTTP (no TLS) to a registry that is not on this machine.
    #[arg(long)]
    plain_http: bool,
}

#[cfg(feature = "registry")]
/// The pool as the registry code sees it: every step is a request through `Target`, so a
/// live server gets streams as pipe descriptors and never opens a connection itself.
struct Via<'a>(&'a Target);

#[cfg(feature = "registry")]
impl Layers for Via<'_> {
    fn layers(&self) -> Result<Vec<LayerInfo>> {
        match self.0.call(Request::Ls, Vec::new(), &mut |_, _| {})? {
            Reply::Layers(v) => Ok(v),
            r => Err(unexpected(r)),
        }
    }

    fn history(&self, name: &str) -> Result<Vec<LayerInfo>> {
        let req = Request::History { name: name.into() };
        match self.0.call(req, Vec::new(), &mut |_, _| {})? {
            Reply::Layers(v) => Ok(v),
            r => Err(unexpected(r)),
        }
    }

    fn block_size(&self) -> Result<u32> {
        match self.0.call(Request::Df, Vec::new(), &mut |_, _| {})? {
            Reply::Usage(u) => Ok(u.block_size),
            r => Err(unexpected(r)),
        }
    }

    fn send(&self, name: &str, out: OwnedFd, progress: &mut Meter) -> Result<SendStats> {
        let req = Request::Send {
            name: name.into(),
            from: None,
            label: Some("the upload".into()),
        };
        match self.0.call(req, vec![out], progress)? {
            Reply::Sent { stats } => Ok(stats),
            r => Err(unexpected(r)),
        }
    }

    fn receive(
        &self,
        name: &str,
        parent: Option<&str>,
        digest: &str,
        input: OwnedFd,
        progress: &mut Meter,
    ) -> Result<(LayerInfo, ReceiveStats)> {
        let req = Request::Receive {
            name: name.into(),
            parent: parent.map(str::to_string),
            digest: Some(digest.into()),
            label: Some(format!("the download of {digest}")),
        };
        match self.0.call(req, vec![input], progress)? {
            Reply::Received { layer, stats } => Ok((layer, stats)),
            r => Err(unexpected(r)),
        }
    }
}

#[cfg(feature = "registry")]
/// A progress line that ends itself when the step is over.
struct Bar(Progress);

#[cfg(feature = "registry")]
impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish();
    }
}

#[cfg(feature = "registry")]
fn meter(what: String) -> Box<Meter> {
    let mut bar = Bar(Progress::new(what));
    Box::new(move |d, t| bar.0.update(d, t))
}

#[cfg(feature = "registry")]
pub fn run_push(t: &Target, a: PushArgs) -> Result<()> {
    let opts = Options {
        plain_http: a.plain_http,
    };
    let r = registry::push::push(&Via(t), &a.name, &a.reference, &opts, &meter)?;
    println!(
        "pushed {:?} to {}: {} layer(s) uploaded ({}), {} already there",
        a.name,
        a.reference,
        r.uploaded.len(),
        human(r.bytes_uploaded),
        r.skipped.len()
    );
    Ok(())
}

#[cfg(feature = "registry")]
pub fn run_pull(t: &Target, a: PullArgs) -> Result<()> {
    let opts = Options {
        plain_http: a.plain_http,
    };
    let r = registry::pull::pull(&Via(t), &a.reference, a.name.as_deref(), &opts, &meter)?;
    println!(
        "pulled {} as {:?}: {} layer(s) downloaded ({}), {} already in the pool",
        a.reference,
        r.name,
        r.downloaded.len(),
        human(r.bytes_downloaded),
        r.skipped.len()
    );
    Ok(())
}

#[cfg(not(feature = "registry"))]
pub fn run_push(_: &Target, _: PushArgs) -> Result<()> {
    Err(crate::features::missing("registry", "push"))
}

#[cfg(not(feature = "registry"))]
pub fn run_pull(_: &Target, _: PullArgs) -> Result<()> {
    Err(crate::features::missing("registry", "pull"))
}
