use super::progress::Progress;
use super::{unexpected, Target};
use crate::control::{Reply, Request};
use crate::error::{Error, Result};
use crate::units::human;
use std::io::IsTerminal;
use std::os::fd::AsFd;

/// Write a read-only layer as a stream (docs/STREAM.md) to standard output: its diff over its
/// parent, or over --from, an older ancestor.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  thinlayer send acme/app:2 > app-2.tls\n  thinlayer send acme/app:2 --from acme/base:1 | ssh host thinlayer receive acme/app:2\n\n\
The stream is canonical: the same layer gives the same bytes on every host, and its sha256 is\n\
the layer's content digest (`thinlayer ls`)."
)]
pub struct SendArgs {
    name: String,
    /// Send the diff over this ancestor instead of the parent (several layers in one).
    #[arg(long, value_name = "ANCESTOR")]
    from: Option<String>,
}

/// Recreate a layer from a stream on standard input (see `send`).
#[derive(clap::Args)]
#[command(
    after_help = "The stream names its parent by chain ID: the layer of the pool with that ID\n\
becomes the parent (or --parent, which must have it). Nothing is left behind by a torn or\n\
damaged stream."
)]
pub struct ReceiveArgs {
    name: String,
    #[arg(long)]
    parent: Option<String>,
}

pub fn run_send(t: &Target, a: SendArgs) -> Result<()> {
    let out = std::io::stdout();
    if out.is_terminal() {
        return Err(Error::InvalidInput(
            "send writes a binary stream: redirect standard output to a file or a pipe".into(),
        ));
    }
    let fd = out
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("duplicating standard output", e))?;
    let req = Request::Send {
        name: a.name.clone(),
        from: a.from,
        label: Some("standard output".into()),
    };
    let mut p = Progress::new(format!("send {}", a.name));
    let r = t.call(req, vec![fd], &mut |d, total| p.update(d, total));
    p.finish();
    match r? {
        Reply::Sent { stats } => {
            eprintln!(
                "sent {:?}: {} stream ({} of data, {} of whiteouts), {}",
                a.name,
                human(stats.bytes),
                human(stats.data_bytes),
                human(stats.zero_bytes),
                stats.digest
            );
            Ok(())
        }
        r => Err(unexpected(r)),
    }
}

pub fn run_receive(t: &Target, a: ReceiveArgs) -> Result<()> {
    let input = std::io::stdin();
    if input.is_terminal() {
        return Err(Error::InvalidInput(
            "receive reads a stream from standard input: redirect it from a file or a pipe".into(),
        ));
    }
    let fd = input
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("duplicating standard input", e))?;
    let req = Request::Receive {
        name: a.name.clone(),
        parent: a.parent,
        digest: None,
        label: Some("standard input".into()),
    };
    let mut p = Progress::new(format!("receive {}", a.name));
    let r = t.call(req, vec![fd], &mut |d, total| p.update(d, total));
    p.finish();
    match r? {
        Reply::Received { layer, stats } => {
            println!(
                "received {:?}: {} disk, stored {} ({} stream), chain ID {}",
                layer.name,
                human(layer.disk_size),
                human(layer.size),
                human(stats.bytes_read),
                stats.chain_id
            );
            Ok(())
        }
        r => Err(unexpected(r)),
    }
}
