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
Blobs the repository already has are not sent again; a blob this pool pushed to or pulled\n\
from another repository of the same registry is mounted from there instead of uploaded. Credentials come from ~/.docker/config.json\n\
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
    /// Progress lines on stderr (bytes, total, rate) even when it is not a terminal.
    #[arg(long)]
    progress: bool,
    /// Print the summary as JSON (blob digests by what happened to them, bytes, seconds).
    #[arg(long)]
    json: bool,
}

/// Download an image pushed by `thinlayer push`, skipping layers the pool already holds.
#[derive(clap::Args)]
#[command(
    after_help = "The top layer is named NAME (default: REF as written); the layers under it are\n\
named by their chain IDs unless the pool already holds them.\n\n\
With --lazy (needs `thinlayer serve`): the layers are made at once as remote layers and the\n\
command returns before their data moves. A read of a block not yet local (NBD, a live file, a\n\
container) fetches its extent by HTTP Range, verified against the blob's digest; the server\n\
fetches the rest in the background and resumes after a restart. The server reaches the\n\
registry itself, with the docker credentials of the user it runs as. Blobs pushed before\n\
stream version 2 cannot be read by range and are downloaded whole (the output says so).\n\
`ls` shows what is fetched, `status` the fetches in progress and their errors."
)]
#[cfg_attr(not(feature = "registry"), allow(dead_code))]
pub struct PullArgs {
    reference: String,
    name: Option<String>,
    /// Return before the data moves: remote layers fetched on demand and in the background by
    /// the live server.
    #[arg(long)]
    lazy: bool,
    /// Speak plain HTTP (no TLS) to a registry that is not on this machine.
    #[arg(long)]
    plain_http: bool,
    /// Progress lines on stderr (bytes, total, rate) even when it is not a terminal.
    #[arg(long)]
    progress: bool,
    /// Print the summary as JSON (blob digests by what happened to them, bytes, seconds).
    #[arg(long)]
    json: bool,
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

/// The meters of a command: progress lines on a terminal, or everywhere with `always`.
#[cfg(feature = "registry")]
fn meters(always: bool) -> impl Fn(String) -> Box<Meter> + Sync {
    move |what| {
        let mut bar = Bar(Progress::shown(what, always));
        Box::new(move |d, t| bar.0.update(d, t))
    }
}

/// `--json`'s summary: the report, the reference and the time taken.
#[cfg(feature = "registry")]
fn print_json(reference: &str, report: &impl serde::Serialize, t: std::time::Instant) {
    let mut v = serde_json::to_value(report).expect("a report serialises");
    v["reference"] = reference.into();
    v["seconds"] = t.elapsed().as_secs_f64().into();
    println!("{}", serde_json::to_string_pretty(&v).unwrap());
}

#[cfg(feature = "registry")]
pub fn run_push(t: &Target, a: PushArgs) -> Result<()> {
    let opts = Options {
        plain_http: a.plain_http,
    };
    let start = std::time::Instant::now();
    let r = registry::push::push(t, &a.name, &a.reference, &opts, &meters(a.progress))?;
    if a.json {
        print_json(&a.reference, &r, start);
        return Ok(());
    }
    println!(
        "pushed {:?} to {}: {} layer(s) uploaded ({}), {} mounted from another repository, {} already there",
        a.name,
        a.reference,
        r.uploaded.len(),
        human(r.bytes_uploaded),
        r.mounted.len(),
        r.skipped.len()
    );
    Ok(())
}

#[cfg(feature = "registry")]
pub fn run_pull(t: &Target, a: PullArgs) -> Result<()> {
    let opts = Options {
        plain_http: a.plain_http,
    };
    let start = std::time::Instant::now();
    let r = if a.lazy {
        t.pull_lazy(&a.reference, a.name.as_deref(), a.plain_http)?
    } else {
        registry::pull::pull(
            t,
            &a.reference,
            a.name.as_deref(),
            &opts,
            &meters(a.progress),
        )?
    };
    if a.json {
        print_json(&a.reference, &r, start);
        return Ok(());
    }
    if a.lazy {
        println!(
            "pulled {} as {:?}: {} layer(s) remote, fetched on demand and in the background; {} downloaded whole ({}, stream version 1: not readable by range); {} already in the pool",
            a.reference,
            r.name,
            r.lazy.len(),
            r.downloaded.len(),
            human(r.bytes_downloaded),
            r.skipped.len()
        );
        return Ok(());
    }
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
