//! The live pool: one process owns the pool and, at once, serves its layers over NBD, answers
//! management requests on the control socket, and commits in the background. A layer created
//! or imported is an export at once; a removed one is gone; layers held by NBD connections are
//! protected (`volume/exports.rs`). What each request does is `ops.rs`, shared with the CLI's direct
//! path, so a user never needs to know whether a server runs. With `--files DIR` it also
//! mounts the live files (`crate::fuse`): attached layers as disk-image files for loop devices.

pub mod ops;
mod signals;

pub use signals::install_signal_handlers;

use crate::control::{serve_control, ControlSocket, Peer, Request};
use crate::error::Result;
use crate::fuse::LiveFiles;
use crate::log::Log;
use crate::nbd::{self, Listener, ServerConfig};
use crate::snapshot::{self, Snapshots};
use crate::volume::exports::LiveExports;
use crate::volume::{Committer, Store};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How to serve a pool.
pub struct Config {
    pub pool: PathBuf,
    /// Where NBD clients connect.
    pub nbd: Listener,
    /// The control socket (docs/CONTROL.md), `POOL.ctl` by default.
    pub control: PathBuf,
    /// Export only these layers; empty = every layer, as it comes and goes.
    pub only: Vec<String>,
    /// Background commits of unflushed writes (None = only on FLUSH and at exit).
    pub commit_interval: Option<Duration>,
    pub nbd_config: ServerConfig,
    /// Mount the live files here (`serve --files`); None = no live files.
    pub files: Option<PathBuf>,
    /// Serve containerd's snapshots API here (`serve --containerd-socket`); needs `files`.
    pub containerd: Option<PathBuf>,
}

/// Serve until SIGINT/SIGTERM: finish requests in flight, commit, remove the sockets.
pub fn run(cfg: Config, command_line: &str) -> Result<()> {
    let log = Log::process().scoped("thinlayer");
    let store = Arc::new(Store::open(&cfg.pool, command_line)?);
    for name in store.discarded() {
        log.warn(format_args!(
            "removed layer {name:?}: a crash interrupted its import"
        ));
    }
    for name in &cfg.only {
        store.layer(name)?;
    }
    let exports = Arc::new(LiveExports::new(store.clone(), cfg.only.clone()));
    let stop = install_signal_handlers()?;
    // Both sockets are bound before either is served, the control socket last: when it
    // appears, the server is ready for every kind of client.
    let nbd_socket = nbd::bind(&cfg.nbd)?;
    let files = match &cfg.files {
        Some(dir) => Some(Arc::new(LiveFiles::mount(dir, exports.clone())?)),
        None => None,
    };
    let snapshotter = match (&cfg.containerd, &files) {
        (Some(path), Some(f)) => {
            let work_dir = cfg.pool.parent().unwrap_or(std::path::Path::new("."));
            let core = Snapshots::new(store.clone(), f.clone(), work_dir);
            Some(snapshot::Server::start(
                Arc::new(core),
                path,
                &cfg.pool,
                stop.clone(),
            )?)
        }
        (Some(_), None) => {
            return Err(crate::Error::InvalidInput(
                "--containerd-socket needs live files (--files DIR): containerd mounts them".into(),
            ))
        }
        (None, _) => None,
    };
    let control = ControlSocket::bind(&cfg.control, &cfg.pool)?;
    let committer = cfg
        .commit_interval
        .map(|every| Committer::start(store.clone(), every));
    log.info(format_args!(
        "serving {} on {} (NBD) and {} (control): {} layer(s){}",
        cfg.pool.display(),
        cfg.nbd,
        cfg.control.display(),
        store.layers().len(),
        if cfg.only.is_empty() {
            ", exports follow the layers".to_string()
        } else {
            format!(", exports fixed to {}", cfg.only.join(", "))
        }
    ));
    if let Some(f) = &files {
        log.info(format_args!("live files in {}", f.dir().display()));
    }
    if let Some(p) = &cfg.containerd {
        log.info(format_args!("containerd snapshotter on {}", p.display()));
    }
    // The control layer has checked the peer's uid and logs who asked; the request itself
    // does not depend on who.
    let handler =
        |_: &Peer, req: Request, fds: Vec<OwnedFd>, progress: &mut dyn FnMut(u64, u64)| match req {
            Request::Attach { .. } | Request::Detach { .. } => {
                ops::execute_files(&store, files.as_deref(), req)
            }
            _ => ops::execute(&store, Some(&exports), req, fds, progress),
        };
    let (nbd_result, control_result) = std::thread::scope(|s| {
        let c = s.spawn(|| serve_control(control, &handler, &stop, &Log::process()));
        let n = nbd::serve_bound(&*exports, nbd_socket, &cfg.nbd_config, &stop);
        // Whatever ended the NBD side ends the control side too.
        stop.stop();
        (n, c.join().expect("control thread panicked"))
    });
    if let Some(c) = committer {
        c.stop();
    }
    // containerd's requests in flight finish before the files go and the last commit.
    let snapshotter_result = snapshotter.map_or(Ok(()), |s| s.join());
    // Before the last commit: no write can come in after it.
    let unmounted = files.as_ref().map_or(Ok(()), |f| f.unmount());
    nbd_result?;
    control_result?;
    snapshotter_result?;
    store.flush().map_err(|e| e.context("final commit"))?;
    unmounted?;
    log.info(format_args!("stopped; all writes committed"));
    Ok(())
}
