use super::Target;
use crate::error::Result;
use crate::units::human;

/// Remove a layer and free its blocks (refused while it has children).
#[derive(clap::Args)]
#[command(
    after_help = "While the pool is served, a layer that NBD clients have open is refused,\n\
naming the connections; --force cuts them off first (their requests fail with EIO)."
)]
pub struct Args {
    name: String,
    /// Disconnect NBD clients that have the layer open, then remove it.
    #[arg(long)]
    force: bool,
}

pub fn run(t: &Target, a: Args) -> Result<()> {
    let freed = t.remove(&a.name, a.force)?;
    println!("removed {:?}, freed {}", a.name, human(freed));
    Ok(())
}
