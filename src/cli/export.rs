use super::progress::Progress;
use super::Target;
use crate::error::{Error, Result};
use crate::units::human;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// Write a layer chain as a sparse raw image (for losetup / mount -o loop).
#[derive(clap::Args)]
#[command(
    after_help = "Example: thinlayer export web-1 web-1.img && mount -o loop,ro web-1.img /mnt\n\
The file is created by this command, as the user running it; a server owning the pool gets\n\
only the open descriptor. Through a server a writable layer is exported as it is now,\n\
including writes not yet committed."
)]
pub struct Args {
    name: String,
    file: PathBuf,
}

pub fn run(t: &Target, a: Args) -> Result<()> {
    // Not truncated here: the export empties it only once the layer is known to exist, so a
    // mistyped name costs nothing (and a file made for nothing is removed again).
    let existed = a.file.exists();
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&a.file)
        .map_err(|e| Error::io(format!("creating {}", a.file.display()), e))?;
    let mut p = Progress::new(format!("export {}", a.name));
    let label = a.file.display().to_string();
    let r = t.export(&a.name, OwnedFd::from(out), &label, &mut |d, total| {
        p.update(d, total)
    });
    p.finish();
    if r.is_err() && !existed {
        let _ = std::fs::remove_file(&a.file);
    }
    let stats = r?;
    println!(
        "exported {:?} to {}: {} image, {} of data written",
        a.name,
        a.file.display(),
        human(stats.size),
        human(stats.bytes_written)
    );
    Ok(())
}
