//! The live pool: one process owns the pool and, at once, serves its layers over NBD, answers
//! management requests on the control socket, and commits in the background. A layer created
//! or imported is an export at once; a removed one is gone; layers held by NBD connections are
//! protected (`volume/exports.rs`). What each request does is `ops.rs`, shared with the CLI's direct
//! path, so a user never needs to know whether a server runs. With `--files DIR` it also
//! mounts the live files (`crate::fuse`): attached layers as disk-image files for loop devices.
//! `handover.rs` replaces the serving process with a new one without closing what the kernel
//! and the clients hold (`thinlayer restart`).

pub mod handover;
pub mod keeper;
pub mod lazy;
pub mod ops;
mod signals;

pub use signals::install_signal_handlers;

use crate::control::{serve_control, ControlSocket, Peer, Reply, Request};
use crate::error::Result;
use crate::fuse::LiveFiles;
use crate::listen::Stop;
use crate::log::Log;
use crate::nbd::{self, Listener, ServerConfig};
use crate::volume::exports::LiveExports;
use crate::volume::journal::Journal;
use crate::volume::{Committer, Store};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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
    /// Start a keeper (`serve --keeper`, `keeper.rs`) that restarts this server if it dies,
    /// and keep a crash journal for it.
    pub keeper: bool,
    /// Switch loop devices over the live files to direct I/O (the default; `serve
    /// --no-loop-direct-io` leaves them buffered; `fuse::loops`).
    pub loop_direct_io: bool,
    /// How remote layers are fetched (`serve --remote-timeout`, `--no-remote-fill`).
    pub remote: lazy::Remote,
    /// Bytes of checksum pages kept in memory (`serve --map-cache`, `pool::sums`).
    pub map_cache: u64,
}

/// Everything a serving process holds: what `run` builds from scratch and `handover::resume`
/// builds from what the previous process handed over.
pub(crate) struct Parts {
    pub cfg: Config,
    pub store: Arc<Store>,
    pub exports: Arc<LiveExports>,
    pub nbd_socket: nbd::Bound,
    pub files: Option<Arc<LiveFiles>>,
    /// The containerd socket, bound (served once `serve` starts).
    pub containerd: Option<ControlSocket>,
    pub control: ControlSocket,
    /// This process's start, and the binary it runs (what `restart` runs by default).
    pub started: SystemTime,
    pub binary: PathBuf,
    /// 1 for the process `serve` started, +1 for each restart.
    pub generation: u64,
    pub keeper: Option<Arc<keeper::Link>>,
}

/// Serve until SIGINT/SIGTERM: finish requests in flight, commit, remove the sockets.
pub fn run(cfg: Config, command_line: &str) -> Result<()> {
    let started = SystemTime::now();
    // Before any socket or mount exists: a SIGTERM that comes as soon as one appears (a
    // supervisor's stop right after the start) must stop the server, not kill it with its
    // live files mounted. The serving loops see the stop it sets when they start.
    install_signal_handlers()?;
    // The keeper first, while this process is small and holds nothing it must not inherit.
    let keeper = if cfg.keeper {
        Some(Arc::new(keeper::Link::start(&cfg.pool, &cfg.control)?))
    } else {
        None
    };
    let journal = keeper.as_ref().map(|_| Journal::create()).transpose()?;
    // The maps load in the background while the server serves (DESIGN §12 item 3): block
    // paths load the ranges they touch first. A new journal has nothing to replay, so the
    // keeper's journal does not make the open eager.
    let (store, _) = Store::open_lazy(&cfg.pool, command_line, journal)?;
    store.set_map_cache(cfg.map_cache);
    // The first reads after the open find their crcs in memory (DESIGN §12); the thread
    // stops by itself.
    let _ = store.prefetch_map_cache();
    for name in store.discarded() {
        let log = Log::process().scoped("thinlayer");
        log.warn(format_args!(
            "removed layer {name:?}: a crash interrupted its import"
        ));
    }
    for name in &cfg.only {
        store.layer_head(name)?;
    }
    let exports = Arc::new(LiveExports::new(store.clone(), cfg.only.clone()));
    // Both sockets are bound before either is served, the control socket last: when it
    // appears, the server is ready for every kind of client.
    let nbd_socket = nbd::bind(&cfg.nbd)?;
    let files = match &cfg.files {
        Some(dir) => Some(Arc::new(LiveFiles::mount(
            dir,
            exports.clone(),
            cfg.loop_direct_io,
        )?)),
        None => None,
    };
    let containerd = match (&cfg.containerd, &files) {
        (Some(path), Some(_)) => Some(
            ControlSocket::bind(path, &cfg.pool)
                .map_err(|e| e.context(format!("containerd socket {}", path.display())))?,
        ),
        (Some(_), None) => {
            return Err(crate::Error::InvalidInput(
                "--containerd-socket needs live files (--files DIR): containerd mounts them".into(),
            ))
        }
        (None, _) => None,
    };
    let control = ControlSocket::bind(&cfg.control, &cfg.pool)?;
    let binary = std::env::current_exe()
        .map_err(|e| crate::Error::io("finding the path of this program", e))?;
    serve(
        Parts {
            cfg,
            store,
            exports,
            nbd_socket,
            files,
            containerd,
            control,
            started,
            binary,
            generation: 1,
            keeper,
        },
        None,
    )
}

/// Serve `parts` until SIGINT/SIGTERM, or until a restart hands them to the next process
/// (then this process exits from `handover`). `then`: run once serving (the new process of
/// a restart tells the old one).
pub(crate) fn serve(parts: Parts, then: Option<Box<dyn FnOnce() + Send>>) -> Result<()> {
    let stop = install_signal_handlers()?;
    let log = Log::process().scoped("thinlayer");
    let Parts {
        cfg,
        store,
        exports,
        nbd_socket,
        files,
        containerd,
        control,
        started,
        binary,
        generation,
        keeper,
    } = parts;
    let fds = handover::Fds::of(
        &nbd_socket,
        &control,
        files.as_deref(),
        containerd.as_ref(),
        &store,
        keeper.as_deref(),
    )?;
    // Every remote layer's fetch resumes (each on its own thread: a registry that does not
    // answer holds up nothing).
    let lazy = lazy::Lazy::start(&exports, cfg.remote.clone());
    let snapshotter = start_snapshotter(&cfg, &exports, containerd, files.as_ref(), &stop, &lazy)?;
    let committer = cfg
        .commit_interval
        .map(|every| Committer::start(store.clone(), every));
    log.info(format_args!(
        "serving {} on {} (NBD) and {} (control): {} layer(s){}",
        cfg.pool.display(),
        cfg.nbd,
        cfg.control.display(),
        store.layer_heads().len(),
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
    let me = handover::Serving {
        cfg: &cfg,
        store: &store,
        exports: &exports,
        files: files.as_deref(),
        fds: &fds,
        started,
        binary: &binary,
        generation,
        restarting: std::sync::Mutex::new(()),
        stop: &stop,
        keeper: keeper.as_deref(),
        lazy: &lazy,
    };
    if let Some(k) = &keeper {
        // The keeper holds everything from now on, and hears of every change to the files:
        // watched first, then registered, then the table once more, so that an open or
        // release in between is in the last table the keeper gets.
        if let Some(f) = &files {
            let k = k.clone();
            f.watch(Box::new(move |table| k.files(table)));
        }
        k.register(me.state(&binary), &fds.all());
        if let Some(f) = &files {
            k.files(&|| f.handover());
        }
        log.info(format_args!(
            "keeper pid {}: restarts this server if it dies",
            k.pid().unwrap_or(0)
        ));
    }
    // The control layer has checked the peer's uid and logs who asked; the request itself
    // does not depend on who.
    let handler =
        |_: &Peer, req: Request, fds: Vec<OwnedFd>, progress: &mut dyn FnMut(u64, u64)| match req {
            Request::Restart { binary } => me.restart(binary.map(PathBuf::from)),
            Request::Status => {
                let Reply::Status(s) = ops::execute(&store, Some(&exports), req, fds, progress)?
                else {
                    unreachable!("status answers with a status");
                };
                let mut s = me.status(*s);
                s.fills = lazy.status();
                Ok(Reply::Status(Box::new(s)))
            }
            req => {
                // Held while a restart hands the pool over: the next process answers it.
                let _pass = exports.gate().enter();
                match req {
                    Request::Attach { .. } | Request::Detach { .. } => {
                        ops::execute_files(&store, files.as_deref(), req)
                    }
                    Request::PullLazy {
                        reference,
                        name,
                        plain_http,
                    } => lazy
                        .pull(&reference, name.as_deref(), plain_http)
                        .map(Reply::Pulled),
                    Request::Remove { ref name, .. } => {
                        let id = store.layer(name).ok().map(|l| l.id);
                        let r = ops::execute(&store, Some(&exports), req, fds, progress)?;
                        // A removed remote layer's fetch stops.
                        if let Some(id) = id {
                            lazy.cancel(id);
                        }
                        Ok(r)
                    }
                    _ => ops::execute(&store, Some(&exports), req, fds, progress),
                }
            }
        };
    if let Some(f) = then {
        f();
    }
    let (nbd_result, control_result) = std::thread::scope(|s| {
        let c = s.spawn(|| serve_control(control, &handler, &stop, &Log::process()));
        let n = nbd::serve_bound(&*exports, nbd_socket, &cfg.nbd_config, &stop);
        // Whatever ended the NBD side ends the control side too.
        stop.stop();
        (n, c.join().expect("control thread panicked"))
    });
    // A stop, not a crash: the keeper goes too.
    if let Some(k) = &keeper {
        k.stop();
    }
    if let Some(c) = committer {
        c.stop();
    }
    lazy.stop();
    // containerd's requests in flight finish before the files go and the last commit.
    let snapshotter_result = snapshotter.map_or(Ok(()), |join| join());
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

/// Waits for a frontend's threads to end once `stop` is set.
type Join = Box<dyn FnOnce() -> Result<()>>;

/// containerd's snapshotter on its bound socket, if asked for; over the live files.
#[cfg(feature = "containerd")]
fn start_snapshotter(
    cfg: &Config,
    exports: &Arc<LiveExports>,
    containerd: Option<ControlSocket>,
    files: Option<&Arc<LiveFiles>>,
    stop: &Arc<Stop>,
    lazy: &lazy::Lazy,
) -> Result<Option<Join>> {
    use crate::snapshot::{self, Snapshots};
    let (Some(socket), Some(f)) = (containerd, files) else {
        return Ok(None);
    };
    let work_dir = cfg.pool.parent().unwrap_or(std::path::Path::new("."));
    let core = Snapshots::new(exports.clone(), f.clone(), work_dir);
    // containerd's remote snapshots come from the registry's fills.
    #[cfg(feature = "registry")]
    let core = core.with_remote(Arc::new(lazy.clone()));
    #[cfg(not(feature = "registry"))]
    let _ = lazy;
    let server = snapshot::Server::start_on(Arc::new(core), socket, stop.clone())?;
    Ok(Some(Box::new(move || server.join())))
}

/// This build has no snapshotter (`cli/serve.rs` refuses --containerd-socket before this).
#[cfg(not(feature = "containerd"))]
fn start_snapshotter(
    _: &Config,
    _: &Arc<LiveExports>,
    containerd: Option<ControlSocket>,
    _: Option<&Arc<LiveFiles>>,
    _: &Arc<Stop>,
    _: &lazy::Lazy,
) -> Result<Option<Join>> {
    match containerd {
        Some(_) => Err(crate::features::missing(
            "containerd",
            "serve --containerd-socket",
        )),
        None => Ok(None),
    }
}
