use crate::error::Result;
use crate::volume::migrate::migrate;
use std::path::{Path, PathBuf};

/// Convert a pool made by an older thinlayer to this version's format, in place.
#[derive(clap::Args)]
#[command(after_help = "Example: thinlayer migrate /var/lib/thinlayer/pool\n\n\
A pool of an older format version is refused by every other command, naming its version and\n\
this command. migrate takes the pool's lock (stop the server first), converts one version at a\n\
time, loads the result, and only then writes the two superblocks: power lost at any point\n\
leaves a pool that this version or the old one opens. Then it rewrites the catalogue as a\n\
checkpoint in the new version's records (from version 3: map runs, 4 bytes a block of an\n\
imported image instead of 20; from version 5: single blocks' crcs in checksum pages, so a\n\
served pool keeps about 7 bytes a scattered block in memory instead of 13). A pool already\n\
current is left alone.\n\
Layers, names and data are kept; docs/FORMAT.md §11 lists the versions.")]
pub struct Args {
    /// The pool file (default: --pool, $THINLAYER_POOL, or the default pool).
    #[arg(value_name = "POOL")]
    pool: Option<PathBuf>,
}

pub fn run(default_pool: &Path, a: Args) -> Result<()> {
    let pool = a.pool.as_deref().unwrap_or(default_pool);
    let m = migrate(pool)?;
    if m.steps.is_empty() {
        println!(
            "pool {}: already format version {}, nothing to do",
            pool.display(),
            m.to
        );
        return Ok(());
    }
    println!(
        "pool {}: format version {} -> {}",
        pool.display(),
        m.from,
        m.to
    );
    for (i, what) in m.steps.iter().enumerate() {
        println!(
            "  {} -> {}: {what}",
            m.from + i as u32,
            m.from + i as u32 + 1
        );
    }
    Ok(())
}
