use super::progress::Progress;
use super::Target;
use crate::error::Result;

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

pub fn run(t: &Target, a: Args) -> Result<i32> {
    let mut p = Progress::new("check data");
    let r = t.check(a.data, &mut |d, total| p.update(d, total));
    p.finish();
    let r = r?;
    let pool = &t.pool;
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
