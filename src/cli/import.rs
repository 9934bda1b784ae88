use super::open_rw;
use super::progress::Progress;
use crate::error::Result;
use crate::units::human;
use std::path::{Path, PathBuf};

/// Import a raw image file as a read-only layer, storing only blocks that differ from --parent.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  mkfs.ext4 -d rootfs/ base.img 1G && thinlayer import acme/base:1.0 base.img\n  thinlayer import acme/app:2 app.img --parent acme/base:1.0   # stores only the changed blocks"
)]
pub struct Args {
    name: String,
    file: PathBuf,
    /// Store only the blocks that differ from this read-only layer.
    #[arg(long)]
    parent: Option<String>,
}

pub fn run(pool: &Path, a: Args) -> Result<()> {
    let store = open_rw(pool)?;
    let mut p = Progress::new(format!("import {}", a.name));
    let r = crate::image::import(
        &store,
        &a.name,
        &a.file,
        a.parent.as_deref(),
        &mut |d, t| p.update(d, t),
    );
    p.finish();
    let (info, stats) = r?;
    println!(
        "imported {:?} from {}: {} disk, stored {} ({} read, {} of holes skipped)",
        info.name,
        a.file.display(),
        human(info.disk_size),
        human(info.size),
        human(stats.bytes_read),
        human(stats.bytes_skipped_holes)
    );
    Ok(())
}
