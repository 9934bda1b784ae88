//! `thinlayer restart`: the serving process hands what the kernel and the clients hold to a
//! new process, which serves on. Held: the live files' `/dev/fuse` descriptor (the kernel
//! keeps the mount, and the loop devices on its files, as long as one is open), the NBD,
//! control and containerd listening sockets (clients that connect meanwhile wait in their
//! backlog), and the table of attached files. The steps, and what a kill at each leaves,
//! are in docs/DESIGN.md ("Restarting the server"):
//!
//! 1. The old process starts the new binary with one end of a socket pair as descriptor 3
//!    (`serve --resume-fd 3`); the new one says hello (pid, version, protocol).
//! 2. The old one closes the gate (`volume/gate.rs`): requests in flight finish, new ones
//!    wait. It commits and lets go of the pool's lock (`Store::release`).
//! 3. It sends its state and the descriptors (SCM_RIGHTS). The new one opens the pool,
//!    adopts the descriptors and says ready, then serves.
//! 4. The old one's FUSE threads stop reading `/dev/fuse` (`fuse/leave.rs`: a thread the
//!    exit kills while a request is copied to it fails that request with EIO).
//! 5. The old one answers the `restart` request and exits without closing anything; once
//!    it is gone the new one asks the kernel to resend the FUSE requests the old one read
//!    and held at its gate or its stopped threads hold (FUSE_NOTIFY_RESEND).
//!
//! If the new process fails before it is ready (it does not start, refuses the pool, dies),
//! the old one takes the pool back (`Store::take_back`), opens the gate and serves on; the
//! request fails saying why.

use super::keeper::Link;
use super::{Config, Parts};
use crate::control::{wire, ControlSocket, Reply, Status};
use crate::error::{Error, Result};
use crate::fuse::{FileState, LiveFiles};
use crate::listen::Stop;
use crate::log::{self, Level};
use crate::nbd::{Bound, Listener, ServerConfig};
use crate::volume::exports::LiveExports;
use crate::volume::journal::Journal;
use crate::volume::Store;
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Bumped when the messages below change; a new binary that speaks another is refused.
pub(crate) const PROTOCOL: u32 = 1;
/// The descriptor the new process finds its end of the socket pair on.
pub const RESUME_FD: RawFd = 3;
/// How long a new process may take to say hello (it has only started).
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long it may take to open the pool and say ready (opening reads the metadata).
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_MESSAGE: usize = 16 << 20;
/// How long the session threads may take to stop reading (each only has to be scheduled).
const STOP_READING_TIMEOUT: Duration = Duration::from_secs(2);

/// New process -> old process.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FromNew {
    Hello {
        pid: u32,
        version: String,
        protocol: u32,
    },
    Ready {
        pid: u32,
    },
    Failed {
        message: String,
    },
}

/// Old process (or keeper) -> new process, with the descriptors in the order of `Fds::all`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct State {
    pub pool: PathBuf,
    nbd_unix: Option<PathBuf>,
    nbd_tcp: Option<String>,
    pub control: PathBuf,
    only: Vec<String>,
    commit_interval_ms: Option<u64>,
    files_dir: Option<PathBuf>,
    pub files: Vec<FileState>,
    containerd: Option<PathBuf>,
    pub binary: PathBuf,
    pub old_pid: u32,
    generation: u64,
    /// A crash journal's memfd follows the listeners (`volume/journal.rs`).
    #[serde(default)]
    pub journal: bool,
    /// A link to the keeper comes last, and the keeper's pid.
    #[serde(default)]
    pub keeper: bool,
    #[serde(default)]
    pub keeper_pid: u32,
    /// Loop devices over live files switched to direct I/O (not `serve --no-loop-direct-io`);
    /// a server from before this field existed had no way to ask, so the new default applies.
    #[serde(default = "direct_io_by_default")]
    loop_direct_io: bool,
    /// `serve --remote-timeout` (absent: the default) and `--no-remote-fill`.
    #[serde(default)]
    remote_timeout_ms: Option<u64>,
    #[serde(default)]
    no_remote_fill: bool,
    /// `serve --map-cache` in bytes (absent from a state written before it existed).
    #[serde(default)]
    map_cache: Option<u64>,
    /// `serve --lazy-registry`.
    #[serde(default)]
    lazy_registries: Vec<String>,
}

fn direct_io_by_default() -> bool {
    true
}

/// Second descriptors of what a restart hands over, taken before the serving threads own
/// the originals.
pub(crate) struct Fds {
    nbd: OwnedFd,
    control: OwnedFd,
    fuse: Option<OwnedFd>,
    containerd: Option<OwnedFd>,
    journal: Option<OwnedFd>,
    keeper: Option<OwnedFd>,
}

impl Fds {
    pub(crate) fn of(
        nbd: &Bound,
        control: &ControlSocket,
        files: Option<&LiveFiles>,
        containerd: Option<&ControlSocket>,
        store: &Store,
        keeper: Option<&Link>,
    ) -> Result<Fds> {
        let dup = |fd: BorrowedFd, what: &str| {
            fd.try_clone_to_owned()
                .map_err(|e| Error::io(format!("duplicating the {what} descriptor"), e))
        };
        Ok(Fds {
            nbd: dup(nbd.fd(), "NBD listener")?,
            control: dup(control.listener_fd(), "control socket")?,
            fuse: files.map(|f| dup(f.device(), "/dev/fuse")).transpose()?,
            containerd: containerd
                .map(|c| dup(c.listener_fd(), "containerd socket"))
                .transpose()?,
            journal: store.journal_fd(),
            keeper: keeper.map(|k| k.dup()).transpose()?,
        })
    }

    /// What the keeper holds: everything but the link to it.
    pub(crate) fn all(&self) -> Vec<BorrowedFd<'_>> {
        let mut v = vec![self.nbd.as_fd(), self.control.as_fd()];
        v.extend(self.fuse.as_ref().map(|f| f.as_fd()));
        v.extend(self.containerd.as_ref().map(|f| f.as_fd()));
        v.extend(self.journal.as_ref().map(|f| f.as_fd()));
        v
    }

    /// What the next process of a restart gets: all, and this process's link to the keeper.
    fn handed_over(&self) -> Vec<BorrowedFd<'_>> {
        let mut v = self.all();
        v.extend(self.keeper.as_ref().map(|f| f.as_fd()));
        v
    }
}

/// The serving process as a restart sees it.
pub(crate) struct Serving<'a> {
    pub cfg: &'a Config,
    pub store: &'a Store,
    pub exports: &'a LiveExports,
    pub files: Option<&'a LiveFiles>,
    pub fds: &'a Fds,
    pub started: SystemTime,
    pub binary: &'a Path,
    pub generation: u64,
    /// Held while a restart runs: a second one is refused.
    pub restarting: Mutex<()>,
    /// The serving loops' stop; its `hold` keeps them from accepting during a hand-over.
    pub stop: &'a Stop,
    /// The remote layers' fetches: stopped while the pool is handed over.
    pub lazy: &'a super::lazy::Lazy,
    pub keeper: Option<&'a Link>,
}

impl Serving<'_> {
    /// `status`, with what only the server knows.
    pub fn status(&self, mut s: Status) -> Status {
        s.started = humantime::format_rfc3339_seconds(self.started).to_string();
        s.listen = vec![self.cfg.nbd.to_string()];
        s.binary = self.binary.display().to_string();
        s.control = self.cfg.control.display().to_string();
        s.files_dir = self.files.map(|f| f.dir().display().to_string());
        s.files = self
            .files
            .map(|f| {
                f.list()
                    .into_iter()
                    .map(|f| f.path.display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        s.containerd = self
            .cfg
            .containerd
            .as_ref()
            .map(|p| p.display().to_string());
        s.generation = self.generation;
        s.keeper = self.keeper.and_then(|k| k.pid());
        s
    }

    /// Hand everything to a new process running `binary` (default: this server's binary, as
    /// it is on disk now). On success this process exits shortly after the reply is sent.
    pub fn restart(&self, binary: Option<PathBuf>) -> Result<Reply> {
        let Ok(_one) = self.restarting.try_lock() else {
            return Err(Error::Busy(
                "a restart of this server is already under way; try again when it is done".into(),
            ));
        };
        let binary = binary.unwrap_or_else(|| self.binary.to_path_buf());
        let shown = binary.display().to_string();
        let (ours, theirs) = UnixStream::pair()
            .map_err(|e| Error::io("restart: making the hand-over socket pair", e))?;
        let mut child = spawn(
            &binary,
            &self.cfg.pool,
            &self.cfg.control,
            "--resume-fd",
            theirs,
            false,
        )?;
        let fail = |child: &mut Child, why: String| -> Error {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            Error::Unavailable(format!(
                "restart: the new server ({shown}, pid {}) did not take over: {why} ({status}); \
                 this server (pid {}) serves on",
                child.id(),
                std::process::id()
            ))
        };
        // 1. Hello.
        match receive(&ours, HELLO_TIMEOUT) {
            Ok((FromNew::Hello { protocol, .. }, _)) if protocol == PROTOCOL => {}
            Ok((
                FromNew::Hello {
                    protocol, version, ..
                },
                _,
            )) => {
                return Err(fail(
                    &mut child,
                    format!(
                    "it is {version}, speaking hand-over protocol {protocol}, this one {PROTOCOL}"
                ),
                ))
            }
            Ok((m, _)) => return Err(fail(&mut child, format!("it said {m:?} first"))),
            Err(e) => return Err(fail(&mut child, format!("no hello: {e}"))),
        }
        // 2. No more accepting (a connection accepted now would die with this process;
        // held, clients wait in the listen backlog for the new one), gate closed, commit,
        // lock released.
        self.stop.hold.hold();
        let closed = self.exports.gate().pause();
        // The new process resumes the remote layers' fetches from what is committed.
        self.lazy.stop();
        if let Err(e) = self.store.release() {
            self.lazy.resume();
            self.exports.gate().resume();
            self.stop.hold.release();
            return Err(fail(
                &mut child,
                format!("this server could not commit: {e}"),
            ));
        }
        // 3. State and descriptors; the new process opens the pool and adopts them.
        let outcome = self
            .send_state(&ours, &binary)
            .and_then(|()| receive(&ours, READY_TIMEOUT));
        let new_pid = match outcome {
            Ok((FromNew::Ready { pid }, _)) => pid,
            other => {
                let why = match other {
                    Ok((FromNew::Failed { message }, _)) => message,
                    Ok((m, _)) => format!("it said {m:?}"),
                    Err(e) => e.to_string(),
                };
                let e = fail(&mut child, why);
                self.take_back()?;
                return Err(e);
            }
        };
        // 4. Before this process exits, its FUSE threads stop reading: a thread killed by the
        // exit while the kernel copies a request to it would fail that request with EIO.
        if let Some(f) = self.files {
            if let Err(e) = f.stop_reading(STOP_READING_TIMEOUT) {
                log::process(Level::Warn, format_args!("thinlayer: {e}"));
            }
        }
        let held = closed.elapsed();
        log::process(
            Level::Info,
            format_args!(
                "thinlayer: handed over to pid {new_pid} ({shown}); I/O held {} ms; exiting",
                held.as_millis()
            ),
        );
        // 5. The new process serves. Exit once the reply is on its way; the requests held
        // at the gate are the kernel's to resend (FUSE) or the clients' to retry (NBD).
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            std::process::exit(0);
        });
        // The child is the new server now: not waited for, not killed.
        std::mem::forget(child);
        Ok(Reply::Restarted {
            old_pid: std::process::id(),
            new_pid,
            binary: shown,
            held_ms: held.as_millis() as u64,
        })
    }

    fn send_state(&self, sock: &UnixStream, binary: &Path) -> io::Result<()> {
        let state = self.state(binary);
        wire::send(sock, &wire::encode(&state)?, &self.fds.handed_over())
    }

    /// What a next process needs besides the descriptors (`thinlayer restart`, the keeper).
    pub fn state(&self, binary: &Path) -> State {
        let (nbd_unix, nbd_tcp) = match &self.cfg.nbd {
            Listener::Unix(p) => (Some(p.clone()), None),
            Listener::Tcp(a) => (None, Some(a.to_string())),
        };
        State {
            pool: self.cfg.pool.clone(),
            nbd_unix,
            nbd_tcp,
            control: self.cfg.control.clone(),
            only: self.cfg.only.clone(),
            commit_interval_ms: self.cfg.commit_interval.map(|d| d.as_millis() as u64),
            files_dir: self.files.map(|f| f.dir().to_path_buf()),
            files: self.files.map(|f| f.handover()).unwrap_or_default(),
            containerd: self.cfg.containerd.clone(),
            binary: binary.to_path_buf(),
            old_pid: std::process::id(),
            generation: self.generation,
            journal: self.fds.journal.is_some(),
            keeper: self.fds.keeper.is_some(),
            keeper_pid: self.keeper.map_or(0, |k| k.keeper_pid()),
            loop_direct_io: self.cfg.loop_direct_io,
            remote_timeout_ms: Some(self.cfg.remote.timeout.as_millis() as u64),
            no_remote_fill: !self.cfg.remote.background,
            map_cache: Some(self.cfg.map_cache),
            lazy_registries: self.cfg.remote.registries.clone(),
        }
    }

    /// After a failed hand-over: the pool again, and the gate open.
    fn take_back(&self) -> Result<()> {
        let taken = self
            .store
            .take_back("thinlayer serve (after a failed restart)");
        self.lazy.resume();
        self.exports.gate().resume();
        self.stop.hold.release();
        taken.map_err(|e| {
            e.context("restart failed, and this server could not take the pool back; stop it")
        })
    }
}

/// Start `binary` as `serve FLAG 3` with `theirs` as descriptor 3: a new server
/// (`--resume-fd`) or the keeper (`--keeper-fd`, in its own process group with `detach`).
pub(crate) fn spawn(
    binary: &Path,
    pool: &Path,
    control: &Path,
    flag: &str,
    theirs: UnixStream,
    detach: bool,
) -> Result<Child> {
    let fd: OwnedFd = theirs.into();
    let raw = fd.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.arg("--pool")
        .arg(pool)
        .arg("--control")
        .arg(control)
        .args(["serve", flag, &RESUME_FD.to_string()])
        .stdin(Stdio::null());
    if detach {
        cmd.process_group(0);
    }
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            if raw == RESUME_FD {
                // Already in place: only the close-on-exec flag goes.
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(raw, RESUME_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        Error::io(
            format!("restart: starting the new server {}", binary.display()),
            e,
        )
    })?;
    drop(fd);
    Ok(child)
}

pub(crate) fn receive(sock: &UnixStream, timeout: Duration) -> io::Result<(FromNew, Vec<OwnedFd>)> {
    sock.set_read_timeout(Some(timeout))?;
    match wire::recv(sock, MAX_MESSAGE) {
        Ok(Some((body, fds))) => Ok((
            wire::decode(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            fds,
        )),
        Ok(None) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "it exited (or closed the hand-over socket)",
        )),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer in {} s", timeout.as_secs()),
        )),
        Err(e) => Err(e),
    }
}

/// The new process's side (`serve --resume-fd`): hello, take the state and descriptors,
/// open the pool, adopt them, say ready, serve.
pub fn resume(fd: RawFd, command_line: &str) -> Result<()> {
    // As `run`: a SIGTERM during the take-over stops, never kills.
    super::install_signal_handlers()?;
    // SAFETY: the old process put our end of the socket pair at `fd` and nothing else owns it.
    let sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let say = |m: &FromNew| -> Result<()> {
        let frame = wire::encode(m).map_err(|e| Error::io("restart: encoding", e))?;
        wire::send(&sock, &frame, &[]).map_err(|e| Error::io("restart: telling the old server", e))
    };
    say(&FromNew::Hello {
        pid: std::process::id(),
        version: format!("thinlayer {}", env!("CARGO_PKG_VERSION")),
        protocol: PROTOCOL,
    })?;
    sock.set_read_timeout(Some(READY_TIMEOUT))
        .map_err(|e| Error::io("restart: hand-over socket", e))?;
    let (body, fds) = wire::recv(&sock, MAX_MESSAGE)
        .map_err(|e| Error::io("restart: receiving the state", e))?
        .ok_or_else(|| {
            Error::Unavailable("restart: the old server went away before the hand-over".into())
        })?;
    let state: State = wire::decode(&body)
        .map_err(|e| Error::Internal(format!("restart: the old server's state: {e}")))?;
    let old_pid = state.old_pid;
    let parts = match adopt(state, fds, command_line) {
        Ok(p) => p,
        Err(e) => {
            let _ = say(&FromNew::Failed {
                message: e.to_string(),
            });
            return Err(e);
        }
    };
    let files = parts.files.clone();
    say(&FromNew::Ready {
        pid: std::process::id(),
    })?;
    let after = move || {
        let Some(f) = files else {
            return;
        };
        // What the old process's FUSE threads hold at its gate is ours to resend: now (it
        // never answers them; were it to, the kernel would no longer know the request), and
        // once more when it has exited, for what they read in between.
        resend(&f);
        std::thread::spawn(move || {
            wait_gone(old_pid);
            resend(&f);
        });
    };
    super::serve(parts, Some(Box::new(after)))
}

fn resend(f: &LiveFiles) {
    match f.resend() {
        Ok(true) => {}
        Ok(false) => log::process(
            Level::Warn,
            format_args!(
                "thinlayer: this kernel cannot resend FUSE requests (Linux 6.9 has \
                 FUSE_NOTIFY_RESEND): requests the old process held stay unanswered"
            ),
        ),
        Err(e) => log::process(Level::Error, format_args!("thinlayer: {e}")),
    }
}

fn adopt(state: State, fds: Vec<OwnedFd>, command_line: &str) -> Result<Parts> {
    let started = SystemTime::now();
    let want = 2
        + state.files_dir.is_some() as usize
        + state.containerd.is_some() as usize
        + state.journal as usize
        + state.keeper as usize;
    if fds.len() != want {
        return Err(Error::Internal(format!(
            "restart: {} descriptors came, {want} expected",
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let mut next = || fds.next().expect("counted above");
    let nbd = match (&state.nbd_unix, &state.nbd_tcp) {
        (Some(p), _) => Listener::Unix(p.clone()),
        (None, Some(a)) => Listener::Tcp(
            a.parse()
                .map_err(|e| Error::Internal(format!("restart: NBD address {a:?}: {e}")))?,
        ),
        (None, None) => return Err(Error::Internal("restart: no NBD listener".into())),
    };
    let cfg = Config {
        pool: state.pool.clone(),
        nbd,
        control: state.control.clone(),
        only: state.only.clone(),
        commit_interval: state.commit_interval_ms.map(Duration::from_millis),
        nbd_config: ServerConfig::default(),
        files: state.files_dir.clone(),
        containerd: state.containerd.clone(),
        keeper: state.keeper,
        loop_direct_io: state.loop_direct_io,
        remote: super::lazy::Remote {
            timeout: state.remote_timeout_ms.map_or(
                super::lazy::Remote::default().timeout,
                Duration::from_millis,
            ),
            background: !state.no_remote_fill,
            registries: state.lazy_registries.clone(),
        },
        map_cache: state.map_cache.unwrap_or(crate::pool::sums::DEFAULT_BUDGET),
    };
    let nbd_fd = next();
    let control_fd = next();
    let fuse = state.files_dir.as_ref().map(|_| next());
    let containerd_fd = state.containerd.as_ref().map(|_| next());
    let journal = state.journal.then(&mut next);
    let keeper = state
        .keeper
        .then(|| Link::new(UnixStream::from(next()), state.keeper_pid));
    // What can fail comes first. A socket adopted and then dropped would remove its file,
    // which the old process (serving on after this failure) still needs.
    let journal = journal.map(Journal::adopt).transpose()?;
    // A graceful restart's journal holds nothing to replay; a crash's (the keeper's) is
    // replayed after the ranges its records touch are loaded. Either way the rest of the
    // maps load in the background, as at a first start.
    let (store, replayed) = Store::open_lazy(&cfg.pool, command_line, journal)?;
    store.set_map_cache(cfg.map_cache);
    // The first reads after the open find their crcs in memory (DESIGN §12); the thread
    // stops by itself.
    let _ = store.prefetch_map_cache();
    if replayed.transactions > 0 {
        log::process(
            Level::Warn,
            format_args!(
                "thinlayer: replayed {} transaction(s) of the crash journal ({} block(s) \
                 written but not committed by pid {}{}){}",
                replayed.transactions,
                replayed.blocks,
                state.old_pid,
                if replayed.torn > 0 {
                    format!(
                        "; {} block(s) held a write it had not answered",
                        replayed.torn
                    )
                } else {
                    String::new()
                },
                if store.is_loaded() {
                    ""
                } else {
                    "; the rest of the maps load in the background"
                }
            ),
        );
    }
    let exports = std::sync::Arc::new(LiveExports::new(store.clone(), cfg.only.clone()));
    let files = match (&state.files_dir, fuse) {
        (Some(dir), Some(fd)) => Some(std::sync::Arc::new(LiveFiles::adopt(
            dir,
            exports.clone(),
            fd,
            &state.files,
            state.loop_direct_io,
        )?)),
        _ => None,
    };
    let control = ControlSocket::adopt(control_fd.into(), &cfg.control, &cfg.pool)?;
    let containerd = match (&state.containerd, containerd_fd) {
        (Some(p), Some(fd)) => match ControlSocket::adopt(fd.into(), p, &cfg.pool) {
            Ok(c) => Some(c),
            Err(e) => {
                std::mem::forget(control);
                return Err(e);
            }
        },
        _ => None,
    };
    let nbd_socket = Bound::adopt(&cfg.nbd, nbd_fd);
    Ok(Parts {
        cfg,
        store,
        exports,
        nbd_socket,
        files,
        containerd,
        control,
        started,
        binary: state.binary,
        generation: state.generation + 1,
        keeper: keeper.map(std::sync::Arc::new),
    })
}

/// Wait until process `pid` has exited (it is not our child, and may stay a zombie until
/// whoever started it reaps it: a pidfd is readable from the moment it exits).
fn wait_gone(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        // Already gone (ESRCH), or no pidfds: nothing to wait for.
        return;
    }
    // SAFETY: a descriptor pidfd_open just returned.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own.
    if unsafe { libc::poll(&mut p, 1, 60_000) } == 0 {
        log::process(
            Level::Warn,
            format_args!("thinlayer: the old server (pid {pid}) is still there after 60 s"),
        );
    }
}
