//! The `thinlayer` command line. Each subcommand lives in its own file: it parses, calls one
//! library function, prints.

mod attach;
mod check;
mod create;
mod df;
mod export;
mod import;
mod init;
mod ls;
mod migrate;
mod progress;
mod registry;
mod remove;
mod restart;
mod send;
mod serve;
mod table;

use crate::error::{Error, Kind, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

const AFTER_HELP: &str = "\
A pool file holds every layer. A layer is a sparse block map over its parent: reads fall through
to the nearest layer that holds a block, the first write to a parent's block copies it
(copy-on-write), and unwritten blocks cost nothing.

Typical session:
  thinlayer init                                  # create the default pool
  thinlayer import acme/base:1.0 rootfs.ext4      # a raw ext4 image becomes a read-only layer
  thinlayer create web --parent acme/base:1.0     # a writable container layer, O(1)
  thinlayer serve --socket /run/thinlayer.sock &  # NBD: nbd-client, qemu, nbdfuse...
  thinlayer create web-2 --parent acme/base:1.0   # works while serving: asks the server
  thinlayer ls; thinlayer history web; thinlayer df

While `serve` owns a pool, every command goes through its control socket (POOL.ctl beside
the pool, or --control) with the same output and exit codes as when it opens the pool itself.

Sizes accept 4096, 64K, 10G, 1T (binary units).";

#[derive(Parser)]
#[command(name = "thinlayer", version, about = "Block-level copy-on-write layer store for container images, served over NBD", after_help = AFTER_HELP)]
pub struct Cli {
    /// The pool file. Default: $THINLAYER_POOL, else /var/lib/thinlayer/pool for root,
    /// else ~/.local/share/thinlayer/pool.
    #[arg(long, global = true, env = "THINLAYER_POOL", value_name = "PATH")]
    pool: Option<PathBuf>,

    /// The control socket of a server owning the pool (default: POOL.ctl). When a server
    /// answers there, every command goes through it; otherwise the pool is opened here.
    #[arg(long, global = true, env = "THINLAYER_CONTROL", value_name = "PATH")]
    control: Option<PathBuf>,

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
    Migrate(migrate::Args),
    Serve(serve::Args),
    Attach(attach::AttachArgs),
    Restart(restart::RestartArgs),
    Status(restart::StatusArgs),
    Detach(attach::DetachArgs),
    Send(send::SendArgs),
    Receive(send::ReceiveArgs),
    Push(registry::PushArgs),
    Pull(registry::PullArgs),
    /// The server's loop binder child (`crate::fuse::binder`); not for users.
    #[command(name = "loop-binder", hide = true)]
    LoopBinder,
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

pub use crate::calls::Target;

/// The process's logger (`crate::log`): lines to stderr, warnings and errors labelled, up to
/// the level `THINLAYER_LOG` names (error, warn, info, debug; info if unset or unknown).
fn install_logger() {
    let max = std::env::var("THINLAYER_LOG")
        .ok()
        .and_then(|v| crate::log::Level::parse(&v))
        .unwrap_or(crate::log::Level::Info);
    crate::log::install(
        Box::new(|level, line| match level {
            crate::log::Level::Error => eprintln!("error: {line}"),
            crate::log::Level::Warn => eprintln!("warning: {line}"),
            _ => eprintln!("{line}"),
        }),
        max,
    );
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    // A server's live files bind loop devices through a child running this very program.
    crate::fuse::binder::set_program(PathBuf::from("/proc/self/exe"));
    install_logger();
    let pool = cli.pool.clone().unwrap_or_else(default_pool_path);
    let control = cli
        .control
        .clone()
        .unwrap_or_else(|| crate::control::default_path(&pool));
    let t = Target { pool, control };
    let result: Result<i32> = match cli.command {
        Command::Init(a) => init::run(&t.pool, a).map(|_| 0),
        Command::Create(a) => create::run_create(&t, a).map(|_| 0),
        Command::Commit(a) => create::run_commit(&t, a).map(|_| 0),
        Command::Rm(a) => remove::run(&t, a).map(|_| 0),
        Command::Ls(a) => ls::run_ls(&t, a).map(|_| 0),
        Command::History(a) => ls::run_history(&t, a).map(|_| 0),
        Command::Df(a) => df::run(&t, a).map(|_| 0),
        Command::Import(a) => import::run(&t, a).map(|_| 0),
        Command::Export(a) => export::run(&t, a).map(|_| 0),
        Command::Check(a) => check::run(&t, a),
        Command::Migrate(a) => migrate::run(&t.pool, a).map(|_| 0),
        Command::Serve(a) => serve::run(&t, a).map(|_| 0),
        Command::Attach(a) => attach::run_attach(&t, a).map(|_| 0),
        Command::Restart(a) => restart::run_restart(&t, a).map(|_| 0),
        Command::Status(a) => restart::run_status(&t, a).map(|_| 0),
        Command::Detach(a) => attach::run_detach(&t, a).map(|_| 0),
        Command::Send(a) => send::run_send(&t, a).map(|_| 0),
        Command::Receive(a) => send::run_receive(&t, a).map(|_| 0),
        Command::Push(a) => registry::run_push(&t, a).map(|_| 0),
        Command::Pull(a) => registry::run_pull(&t, a).map(|_| 0),
        Command::LoopBinder => Ok(crate::fuse::binder::serve_child()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("thinlayer: error: {e}");
            exit_code(&e)
        }
    }
}

/// The exit code of a failed command, from its error's kind: the one place they are mapped
/// (docs/CONTROL.md lists them).
pub fn exit_code(e: &Error) -> i32 {
    match e.kind() {
        // EX_TEMPFAIL: another process has the pool; try again.
        Kind::Busy => 75,
        // EX_UNAVAILABLE: no server, a registry unreachable.
        Kind::Unavailable => 69,
        Kind::NotFound => 2,
        Kind::Io
        | Kind::InvalidInput
        | Kind::AlreadyExists
        | Kind::Conflict
        | Kind::InUse
        | Kind::NoSpace
        | Kind::ReadOnly
        | Kind::Corrupt
        | Kind::Internal => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_kind() {
        for k in Kind::ALL {
            let want = match k {
                Kind::Busy => 75,
                Kind::Unavailable => 69,
                Kind::NotFound => 2,
                _ => 1,
            };
            assert_eq!(exit_code(&Error::new(k, "x".into())), want, "{k:?}");
        }
    }
}
