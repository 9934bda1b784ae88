use crate::error::Result;
use crate::nbd::{self, Listener, ServerConfig};
use crate::volume::{Committer, Store, StoreExports};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Serve layers over NBD: read-only layers as read-only exports, writable ones writable.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  thinlayer serve --socket /run/thinlayer.sock\n  nbdinfo --list 'nbd+unix:///?socket=/run/thinlayer.sock'\n  nbdfuse /mnt/web/disk 'nbd+unix:///web?socket=/run/thinlayer.sock' &  # a file backed by layer web\n  nbd-client -unix /run/thinlayer.sock -N web /dev/nbd0   # with the kernel module\n\n\
SIGINT/SIGTERM: stop accepting, finish requests in flight, commit, exit 0.\n\
Unflushed writes are committed every --commit-interval seconds anyway."
)]
pub struct Args {
    /// Unix socket to listen on (default: POOL.sock beside the pool).
    #[arg(long, conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// Listen on TCP instead: `--listen` alone is 127.0.0.1:10809 (the NBD port on loopback);
    /// an address other than loopback only when given explicitly.
    #[arg(long, value_name = "ADDR:PORT", num_args = 0..=1, default_missing_value = "127.0.0.1:10809")]
    listen: Option<SocketAddr>,
    /// Export only these layers (repeatable); default: all.
    #[arg(long = "export", value_name = "NAME")]
    exports: Vec<String>,
    /// Seconds between background commits of unflushed writes (0 = only on FLUSH/exit).
    #[arg(long, default_value_t = 5)]
    commit_interval: u64,
}

pub fn run(pool: &Path, a: Args) -> Result<()> {
    let store = Arc::new(Store::open(pool, &super::command_line())?);
    for name in &a.exports {
        store.layer(name)?;
    }
    let listener = match (a.listen, a.socket) {
        (Some(addr), _) => Listener::Tcp(addr),
        (None, Some(p)) => Listener::Unix(p),
        (None, None) => {
            let mut p = pool.as_os_str().to_owned();
            p.push(".sock");
            Listener::Unix(PathBuf::from(p))
        }
    };
    let stop = nbd::install_signal_handlers()?;
    let catalog = StoreExports {
        store: store.clone(),
        only: a.exports.clone(),
    };
    eprintln!(
        "thinlayer: serving {} layer(s) of {} on {listener}",
        catalog_count(&store, &a.exports),
        pool.display()
    );
    let committer = (a.commit_interval > 0)
        .then(|| Committer::start(store.clone(), Duration::from_secs(a.commit_interval)));
    let result = nbd::serve(&catalog, &listener, &ServerConfig::default(), &stop);
    stop.store(true, Ordering::Relaxed);
    if let Some(c) = committer {
        c.stop();
    }
    result?;
    store.flush().map_err(|e| e.context("final commit"))?;
    eprintln!("thinlayer: stopped; all writes committed");
    Ok(())
}

fn catalog_count(store: &Store, only: &[String]) -> usize {
    if only.is_empty() {
        store.layers().len()
    } else {
        only.len()
    }
}
