use super::Target;
use crate::error::Result;
use crate::units::human;

/// Show pool usage: file size, allocated, free under the cap, metadata, sharing savings.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
}

pub fn run(t: &Target, a: Args) -> Result<()> {
    let u = t.df()?;
    let pool = &t.pool;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&u).unwrap());
        return Ok(());
    }
    println!("pool            {}", pool.display());
    println!("block size      {}", human(u.block_size as u64));
    println!("layers          {}", u.layers);
    println!(
        "file size       {} (occupies {} on disk)",
        human(u.file_size),
        human(u.file_allocated)
    );
    println!(
        "allocated       {} ({} data, {} metadata)",
        human(u.allocated),
        human(u.data_bytes),
        human(u.metadata_bytes)
    );
    if u.remote_layers > 0 {
        println!(
            "remote          {} layer(s) pulled lazily hold {} of it so far; the rest is in the registry (`thinlayer status`)",
            u.remote_layers,
            human(u.remote_fetched)
        );
    }
    match (u.free_under_cap, u.max_size) {
        (Some(f), Some(m)) => println!("free            {} of max {}", human(f), human(m)),
        _ => println!("free            unlimited (no --max-size)"),
    }
    println!(
        "sharing saves   {} (layers' virtual sizes add up to {})",
        human(u.sharing_saves),
        human(u.virtual_total)
    );
    if u.loading {
        println!("loading         the server is still loading the maps: allocated and free are counted from the counters the checkpoint stored, exact once loaded");
    }
    Ok(())
}
