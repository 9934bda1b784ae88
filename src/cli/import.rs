use super::progress::Progress;
use super::Target;
use crate::error::{Error, Result};
use crate::units::human;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// Import a raw image file as a read-only layer, storing only blocks that differ from --parent.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  mkfs.ext4 -d rootfs/ base.img 1G && thinlayer import acme/base:1.0 base.img\n  thinlayer import acme/app:2 app.img --parent acme/base:1.0   # stores only the changed blocks\n\n\
The file is opened by this command, as the user running it; a server owning the pool gets\n\
only the open descriptor."
)]
pub struct Args {
    name: String,
    file: PathBuf,
    /// Store only the blocks that differ from this read-only layer.
    #[arg(long)]
    parent: Option<String>,
}

pub fn run(t: &Target, a: Args) -> Result<()> {
    let f = std::fs::File::open(&a.file)
        .map_err(|e| Error::io(format!("opening image {}", a.file.display()), e))?;
    let mut p = Progress::new(format!("import {}", a.name));
    let label = a.file.display().to_string();
    let r = t.import(
        &a.name,
        a.parent.as_deref(),
        OwnedFd::from(f),
        &label,
        &mut |d, total| p.update(d, total),
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
