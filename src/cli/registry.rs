use super::Target;
use crate::error::Result;
#[cfg(feature = "registry")]
use {
    super::progress::Progress,
    crate::registry::{self, Meter, Options},
    crate::units::human,
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

/// A progress line that ends itself when the step is over.
#[cfg(feature = "registry")]
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
    let r = registry::push::push(t, &a.name, &a.reference, &opts, &meter)?;
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
    let r = registry::pull::pull(t, &a.reference, a.name.as_deref(), &opts, &meter)?;
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
