use super::progress::Progress;
use crate::error::Result;
use std::path::Path;

/// Verify the pool: superblocks, metadata checksums, block ownership, counters;
/// with --data also every data block's checksum. Exits 1 if anything is wrong.
#[derive(clap::Args)]
pub struct Args {
    /// Also read every data block and verify its checksum.
    #[arg(long)]
    data: bool,
    #[arg(long)]
    json: bool,
}

pub fn run(pool: &Path, a: Args) -> Result<i32> {
    let mut p = Progress::new("check data");
    let r = crate::check::check_pool(pool, a.data, &mut |d, t| p.update(d, t));
    p.finish();
    let r = r?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap());
    } else {
        for f in &r.faults {
            println!("FAULT: {f}");
        }
        for n in &r.notes {
            println!("WARNING: {n}");
        }
        let data = if a.data {
            format!(", {} data blocks verified", r.verified_blocks)
        } else {
            String::new()
        };
        println!(
            "pool {}: generation {}, {} layers, {} data blocks{data}: {}",
            pool.display(),
            r.generation,
            r.layers,
            r.data_blocks,
            if r.is_clean() {
                "clean".to_string()
            } else {
                format!("{} fault(s)", r.faults.len())
            }
        );
    }
    Ok(if r.is_clean() { 0 } else { 1 })
}
