use super::progress::Progress;
use crate::error::Result;
use crate::units::human;
use std::path::{Path, PathBuf};

/// Write a layer chain as a sparse raw image (for losetup / mount -o loop).
#[derive(clap::Args)]
#[command(
    after_help = "Example: thinlayer export web-1 web-1.img && mount -o loop,ro web-1.img /mnt\n\
Works while the pool is served: it exports the last committed state."
)]
pub struct Args {
    name: String,
    file: PathBuf,
}

pub fn run(pool: &Path, a: Args) -> Result<()> {
    let mut p = Progress::new(format!("export {}", a.name));
    let stats = crate::image::export_pool(
        pool,
        &a.name,
        &a.file,
        &mut |d, t| p.update(d, t),
        &mut || eprintln!("thinlayer: {:?} changed while being exported; starting again", a.name),
    );
    p.finish();
    let stats = stats?;
    println!(
        "exported {:?} to {}: {} image, {} of data written",
        a.name,
        a.file.display(),
        human(stats.size),
        human(stats.bytes_written)
    );
    Ok(())
}
