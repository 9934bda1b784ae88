use super::transaction;
use crate::error::Result;
use crate::units::{human, parse_size};
use std::path::Path;

/// Create a layer: a base with --size, or a child of a committed layer with --parent.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  thinlayer create scratch --size 10G            # an empty base layer\n  thinlayer create web-1 --parent acme/base:1.0  # a container on an image, costs no data\n\n\
A child's size defaults to its parent's; it may be larger (the extra reads as zeros)."
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

pub fn run_create(pool: &Path, a: CreateArgs) -> Result<()> {
    let info = transaction(pool, |s| {
        s.create_layer(&a.name, a.parent.as_deref(), a.size)
    })?;
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
pub struct CommitArgs {
    name: String,
}

pub fn run_commit(pool: &Path, a: CommitArgs) -> Result<()> {
    transaction(pool, |s| s.commit_layer(&a.name))?;
    println!("committed {:?}: now read-only", a.name);
    Ok(())
}
