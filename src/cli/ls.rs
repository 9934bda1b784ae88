use super::{open_ro, table};
use crate::error::Result;
use crate::units::human;
use crate::volume::LayerInfo;
use std::path::Path;

/// List layers: SIZE is what a layer alone holds, VIRTUAL SIZE adds its ancestors.
#[derive(clap::Args)]
pub struct LsArgs {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Show a layer's chain down to its base, like `docker history`.
#[derive(clap::Args)]
pub struct HistoryArgs {
    name: String,
    #[arg(long)]
    json: bool,
}

fn mode(l: &LayerInfo) -> String {
    if l.writable { "writable" } else { "read-only" }.into()
}

pub fn run_ls(pool: &Path, a: LsArgs) -> Result<()> {
    let layers = open_ro(pool)?.layers();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&layers).unwrap());
        return Ok(());
    }
    let rows: Vec<Vec<String>> = layers
        .iter()
        .map(|l| {
            vec![
                l.name.clone(),
                l.parent.clone().unwrap_or_else(|| "-".into()),
                mode(l),
                human(l.size),
                human(l.virtual_size),
                human(l.disk_size),
                l.created.clone(),
            ]
        })
        .collect();
    table::print(
        &[
            "NAME",
            "PARENT",
            "MODE",
            "SIZE",
            "VIRTUAL SIZE",
            "DISK SIZE",
            "CREATED",
        ],
        &rows,
    );
    Ok(())
}

pub fn run_history(pool: &Path, a: HistoryArgs) -> Result<()> {
    let chain = open_ro(pool)?.history(&a.name)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&chain).unwrap());
        return Ok(());
    }
    let rows: Vec<Vec<String>> = chain
        .iter()
        .map(|l| vec![l.name.clone(), l.created.clone(), human(l.size), mode(l)])
        .collect();
    table::print(&["LAYER", "CREATED", "SIZE", "MODE"], &rows);
    Ok(())
}
