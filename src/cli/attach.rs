use super::Target;
use crate::calls::Attached;
use crate::error::Result;

/// Attach a layer as a live file (a raw disk image) in the server's --files directory.
#[derive(clap::Args)]
#[command(
    after_help = "Needs a running `thinlayer serve --files DIR`. Prints the file's path:\n\
  mount -o loop \"$(thinlayer attach web)\" /mnt/web\n\n\
Attaching an attached layer prints the same path. While attached, rm and commit of the\n\
layer are refused. A read-only layer's file is read-only (losetup makes a read-only loop\n\
device). Attachments end when the server stops."
)]
pub struct AttachArgs {
    name: String,
    /// Machine-readable output: {"name", "path", "writable"}.
    #[arg(long)]
    json: bool,
}

/// Detach a live file: the file vanishes and the layer may be removed or committed.
#[derive(clap::Args)]
#[command(
    after_help = "Refused while the file is open (a loop device over it: umount, or losetup -d,\n\
first); --force detaches anyway and the open handles get EIO."
)]
pub struct DetachArgs {
    name: String,
    /// Detach even while the file is open.
    #[arg(long)]
    force: bool,
}

pub fn run_attach(t: &Target, a: AttachArgs) -> Result<()> {
    let Attached {
        name,
        path,
        writable,
    } = t.attach(&a.name)?;
    if a.json {
        let v = serde_json::json!({"name": name, "path": path, "writable": writable});
        println!("{v}");
    } else {
        println!("{path}");
    }
    Ok(())
}

pub fn run_detach(t: &Target, a: DetachArgs) -> Result<()> {
    t.detach(&a.name, a.force)?;
    println!("detached {:?}", a.name);
    Ok(())
}
