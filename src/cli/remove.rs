use super::transaction;
use crate::error::Result;
use crate::units::human;
use std::path::Path;

/// Remove a layer and free its blocks (refused while it has children).
#[derive(clap::Args)]
pub struct Args {
    name: String,
}

pub fn run(pool: &Path, a: Args) -> Result<()> {
    let freed = transaction(pool, |s| {
        let size = s.layer(&a.name)?.size;
        s.remove_layer(&a.name)?;
        Ok(size)
    })?;
    println!("removed {:?}, freed {}", a.name, human(freed));
    Ok(())
}
