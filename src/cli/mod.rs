//! The `thinlayer` command line. Each subcommand lives in its own file: it parses, calls one
//! library function, prints.

mod check;
mod create;
mod df;
mod export;
mod import;
mod init;
mod ls;
mod progress;
mod remove;
mod serve;
mod table;

use crate::error::{Error, Result};
use crate::volume::Store;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

const AFTER_HELP: &str = "\
A pool file holds every layer. A layer is a sparse block map over its parent: reads fall through
to the nearest layer that holds a block, the first write to a parent's block copies it
(copy-on-write), and unwritten blocks cost nothing.

Typical session:
  thinlayer init                                  # create the default pool
  thinlayer import acme/base:1.0 rootfs.ext4      # a raw ext4 image becomes a read-only layer
  thinlayer create web --parent acme/base:1.0     # a writable container layer, O(1)
  thinlayer serve --socket /run/thinlayer.sock &  # NBD: nbd-client, qemu, nbdfuse...
  thinlayer ls; thinlayer history web; thinlayer df

Sizes accept 4096, 64K, 10G, 1T (binary units).";

#[derive(Parser)]
#[command(name = "thinlayer", version, about = "Block-level copy-on-write layer store for container images, served over NBD", after_help = AFTER_HELP)]
pub struct Cli {
    /// The pool file. Default: $THINLAYER_POOL, else /var/lib/thinlayer/pool for root,
    /// else ~/.local/share/thinlayer/pool.
    #[arg(long, global = true, env = "THINLAYER_POOL", value_name = "PATH")]
    pool: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Init(init::Args),
    Create(create::CreateArgs),
    Commit(create::CommitArgs),
    Rm(remove::Args),
    Ls(ls::LsArgs),
    History(ls::HistoryArgs),
    Df(df::Args),
    Import(import::Args),
    Export(export::Args),
    Check(check::Args),
    Serve(serve::Args),
}

/// Where the pool lives when neither --pool nor THINLAYER_POOL says.
pub fn default_pool_path() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/thinlayer/pool");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("thinlayer/pool")
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().collect();
    args.join(" ")
}

/// Open the pool to change it (takes the lock).
fn open_rw(pool: &Path) -> Result<Store> {
    Store::open(pool, &command_line())
}

/// Open the pool to look at it (no lock: works while `serve` holds it).
fn open_ro(pool: &Path) -> Result<Store> {
    Store::open_read_only(pool)
}

/// Run one change as one transaction: commit if `f` succeeds, nothing if it fails.
fn transaction<T>(pool: &Path, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
    let store = open_rw(pool)?;
    let out = f(&store)?;
    store.flush()?;
    Ok(out)
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    let pool = cli.pool.clone().unwrap_or_else(default_pool_path);
    let result: Result<i32> = match cli.command {
        Command::Init(a) => init::run(&pool, a).map(|_| 0),
        Command::Create(a) => create::run_create(&pool, a).map(|_| 0),
        Command::Commit(a) => create::run_commit(&pool, a).map(|_| 0),
        Command::Rm(a) => remove::run(&pool, a).map(|_| 0),
        Command::Ls(a) => ls::run_ls(&pool, a).map(|_| 0),
        Command::History(a) => ls::run_history(&pool, a).map(|_| 0),
        Command::Df(a) => df::run(&pool, a).map(|_| 0),
        Command::Import(a) => import::run(&pool, a).map(|_| 0),
        Command::Export(a) => export::run(&pool, a).map(|_| 0),
        Command::Check(a) => check::run(&pool, a),
        Command::Serve(a) => serve::run(&pool, a).map(|_| 0),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("thinlayer: error: {e}");
            match e {
                Error::Busy(_) => 75,
                Error::NotFound(_) => 2,
                _ => 1,
            }
        }
    }
}
