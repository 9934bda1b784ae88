use super::Target;
use crate::error::Result;
use crate::units::{human, parse_size};

/// Create a layer: a base with --size, or a child of a committed layer with --parent.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  thinlayer create scratch --size 10G            # an empty base layer\n  thinlayer create web-1 --parent acme/base:1.0  # a container on an image, costs no data\n\n\
A child's size defaults to its parent's; it may be larger (the extra reads as zeros).\n\
While the pool is served the new layer is an NBD export at once."
)]
pub struct CreateArgs {
    /// Layer name, e.g. web-1 or acme/base:1.0 (at most 255 bytes, no control characters).
    name: String,
    /// The read-only layer to build on.
    #[arg(long)]
    parent: Option<String>,
    /// Disk size (required for a base layer), e.g. 10G.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
}

pub fn run_create(t: &Target, a: CreateArgs) -> Result<()> {
    let info = t.create(&a.name, a.parent.as_deref(), a.size)?;
    println!(
        "created writable layer {:?} ({}{})",
        info.name,
        human(info.disk_size),
        info.parent.map_or(String::new(), |p| format!(" on {p:?}"))
    );
    Ok(())
}

/// Make a writable layer read-only for good, so layers can be built on it.
#[derive(clap::Args)]
#[command(
    after_help = "While the pool is served, a layer with writable NBD connections is refused\n\
(naming them): disconnect them first, so no write can land after the layer is sealed."
)]
pub struct CommitArgs {
    name: String,
}

pub fn run_commit(t: &Target, a: CommitArgs) -> Result<()> {
    t.commit(&a.name)?;
    println!("committed {:?}: now read-only", a.name);
    Ok(())
}
