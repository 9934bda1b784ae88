use super::open_ro;
use super::progress::Progress;
use crate::error::{Error, Result};
use crate::pool::lock::PoolLock;
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
    let mut attempt = 0;
    let stats = loop {
        let store = open_ro(pool)?;
        let mut p = Progress::new(format!("export {}", a.name));
        let r = crate::image::export(&store, &a.name, &a.file, &mut |d, t| p.update(d, t));
        p.finish();
        match r {
            // A serving process may free and reuse blocks of the state we opened while we read
            // it; that reads as a checksum mismatch. Start again from its newer state.
            Err(Error::Corrupt(_)) if attempt < 3 && is_served(pool) => {
                eprintln!(
                    "thinlayer: {:?} changed while being exported; starting again",
                    a.name
                );
                attempt += 1;
            }
            r => break r?,
        }
    };
    println!(
        "exported {:?} to {}: {} image, {} of data written",
        a.name,
        a.file.display(),
        human(stats.size),
        human(stats.bytes_written)
    );
    Ok(())
}

fn is_served(pool: &Path) -> bool {
    matches!(
        PoolLock::acquire(pool, "thinlayer export"),
        Err(Error::Busy(_))
    )
}
