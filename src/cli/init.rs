use crate::error::Result;
use crate::units::{human, parse_size};
use crate::volume::{CreateOptions, Store};
use std::path::Path;

/// Create a new, empty pool file.
#[derive(clap::Args)]
#[command(
    after_help = "Example: thinlayer --pool /srv/images.pool init --block-size 4K --max-size 100G\n\n\
The block size is the copy-on-write granularity, fixed for the pool's life: 4K (the default)\n\
copies only the 4 KiB a small write touches; larger blocks mean smaller metadata."
)]
pub struct Args {
    /// Copy-on-write block size: a power of two from 4K to 1M.
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    block_size: u64,
    /// Cap on the pool file's size; writes past it fail with "pool full" (ENOSPC).
    #[arg(long, value_parser = parse_size)]
    max_size: Option<u64>,
}

pub fn run(pool: &Path, a: Args) -> Result<()> {
    if !crate::format::valid_block_size(a.block_size) {
        return Err(crate::error::Error::InvalidInput(format!(
            "--block-size {} is not a power of two from 4K to 1M",
            a.block_size
        )));
    }
    let opts = CreateOptions {
        block_size: a.block_size as u32,
        max_size: a.max_size,
    };
    Store::create(pool, &opts, "thinlayer init")?;
    println!(
        "created pool {} (block size {}{})",
        pool.display(),
        human(a.block_size),
        a.max_size
            .map_or(String::new(), |m| format!(", max size {}", human(m)))
    );
    Ok(())
}
