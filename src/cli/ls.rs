use super::{table, Target};
use crate::error::Result;
use crate::stream::ContentIds;
use crate::units::human;
use crate::volume::LayerInfo;

/// List layers: SIZE is what a layer alone holds, VIRTUAL SIZE adds its ancestors.
#[derive(clap::Args)]
#[command(
    after_help = "Through a running server the figures are live: they include writes not yet\n\
committed. Without one they are the pool's last committed state."
)]
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
    if l.remote {
        // How much is local: of the blob's size, the nearest a pool knows of the total.
        let total = l
            .attrs
            .get(crate::stream::content::SIZE_ATTR)
            .and_then(|s| s.parse::<u64>().ok());
        return match (l.fetched, total) {
            (Some(f), Some(t)) if t > 0 => format!("remote {}%", (f * 100 / t).min(99)),
            _ => "remote".into(),
        };
    }
    match (l.importing, l.writable) {
        (true, _) => "importing",
        (false, true) => "writable",
        (false, false) => "read-only",
    }
    .into()
}

/// The short content ID (12 hex digits of the chain ID, as `docker images` shows), or "-"
/// for a writable layer, which has none yet.
fn short_id(l: &LayerInfo) -> String {
    ContentIds::of(l).map_or_else(|| "-".into(), |c| c.chain_id.short())
}

pub fn run_ls(t: &Target, a: LsArgs) -> Result<()> {
    let layers = t.ls()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&layers).unwrap());
        return Ok(());
    }
    let rows: Vec<Vec<String>> = layers
        .iter()
        .map(|l| {
            vec![
                short_id(l),
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
            "ID",
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

pub fn run_history(t: &Target, a: HistoryArgs) -> Result<()> {
    let chain = t.history(&a.name)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&chain).unwrap());
        return Ok(());
    }
    let rows: Vec<Vec<String>> = chain
        .iter()
        .map(|l| {
            vec![
                short_id(l),
                l.name.clone(),
                l.created.clone(),
                human(l.size),
                mode(l),
            ]
        })
        .collect();
    table::print(&["ID", "LAYER", "CREATED", "SIZE", "MODE"], &rows);
    Ok(())
}
