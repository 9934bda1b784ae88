//! The keeper (`serve --keeper`): a small process that outlives a crash of the server. It
//! holds second descriptors of what the kernel and the clients hold (the `/dev/fuse`
//! connection, the listening sockets), the crash journal (the open transaction's records,
//! `volume/journal.rs`), and the hand-over state (configuration, table of attached files),
//! which the serving process keeps current. When the serving process dies without saying it
//! stops (SIGKILL, abort, a panic), the keeper starts a new one and hands everything over as
//! `thinlayer restart` does (`handover.rs`, `serve --resume-fd`); the new process replays
//! the journal, serves, and has the kernel resend the FUSE requests the dead one had read.
//! A clean stop tells the keeper, which then exits. DESIGN.md §10.1 has the crash analysis.
//!
//! The keeper never opens the pool: it is started before the server takes it, and it only
//! passes descriptors on. It speaks to each server over a socket pair (`Link`); a graceful
//! restart hands the server's end to the next process, which registers on it.

use super::handover::{self, FromNew, State};
use crate::control::wire;
use crate::error::{Error, Result};
use crate::fuse::FileState;
use crate::log::{self, Level};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The descriptor the keeper finds its end of the first server's link on.
pub const KEEPER_FD: RawFd = 3;
/// A server that dies sooner than this after it registered (it served) counts towards a crash
/// loop. Short: one that served longer was killed by something else, and making it wait
/// would stall every container for nothing (bench-restart kills every 2 s: with 10 s here the
/// stalls grew to 8 s).
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Server -> keeper.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToKeeper {
    /// The process `pid` serves now; with the hand-over state and descriptors (in the order
    /// `handover::Fds::all` gives them).
    Register { pid: u32, state: Box<State> },
    /// The table of attached files changed.
    Files { files: Vec<FileState> },
    /// A clean stop: the keeper exits.
    Stop,
}

/// A server's end of the link to its keeper.
pub(crate) struct Link {
    sock: Mutex<UnixStream>,
    pid: u32,
    gone: AtomicBool,
}

impl Link {
    /// Start the keeper: this binary, `serve --keeper-fd 3`, in its own process group (a
    /// terminal's ^C is for the server, which then stops the keeper itself).
    pub fn start(pool: &Path, control: &Path) -> Result<Link> {
        let binary = std::env::current_exe()
            .map_err(|e| Error::io("finding the path of this program", e))?;
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| Error::io("making the keeper's socket pair", e))?;
        let child = handover::spawn(&binary, pool, control, "--keeper-fd", theirs, true)?;
        let pid = child.id();
        // The keeper outlives this process; its parent reaps it (or init does).
        std::mem::forget(child);
        Ok(Link::new(ours, pid))
    }

    pub fn new(sock: UnixStream, pid: u32) -> Link {
        Link {
            sock: Mutex::new(sock),
            pid,
            gone: AtomicBool::new(false),
        }
    }

    /// The keeper's pid, even if it is gone.
    pub fn keeper_pid(&self) -> u32 {
        self.pid
    }

    /// The keeper's pid while it is there.
    pub fn pid(&self) -> Option<u32> {
        (!self.gone.load(Ordering::SeqCst)).then_some(self.pid)
    }

    /// A second descriptor of this end, for the next process of a graceful restart.
    pub fn dup(&self) -> Result<OwnedFd> {
        let g = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        g.as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicating the keeper link", e))
    }

    /// Send the message `m` makes, made under the link's lock: messages go in the order their
    /// contents were taken.
    fn send(&self, m: impl FnOnce() -> ToKeeper, fds: &[BorrowedFd]) {
        if self.gone.load(Ordering::SeqCst) {
            return;
        }
        let g = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        let sent = wire::encode(&m()).and_then(|f| wire::send(&g, &f, fds));
        if let Err(e) = sent {
            self.gone.store(true, Ordering::SeqCst);
            log::process(
                Level::Warn,
                format_args!(
                    "thinlayer: the keeper (pid {}) is gone ({e}): a crash of this server now \
                     ends the live files' I/O; a restart or a new `serve --keeper` starts one",
                    self.pid
                ),
            );
        }
    }

    pub fn register(&self, state: State, fds: &[BorrowedFd]) {
        let m = || ToKeeper::Register {
            pid: std::process::id(),
            state: Box::new(state),
        };
        self.send(m, fds);
    }

    /// The table of files, as `table` gives it at the moment of sending.
    pub fn files(&self, table: &dyn Fn() -> Vec<FileState>) {
        self.send(|| ToKeeper::Files { files: table() }, &[]);
    }

    pub fn stop(&self) {
        self.send(|| ToKeeper::Stop, &[]);
    }
}

fn say(level: Level, m: std::fmt::Arguments) {
    log::process(level, format_args!("thinlayer keeper: {m}"));
}

/// The server the keeper watches.
struct Watched {
    pid: u32,
    pidfd: Option<OwnedFd>,
    /// Started by the keeper (its child, reaped by it).
    child: Option<Child>,
    since: Instant,
}

/// The keeper's loop (`serve --keeper-fd`): until a server says stop, or the first one goes
/// away before registering.
pub fn run(fd: RawFd) -> Result<()> {
    // SAFETY: the server put our end of the socket pair at `fd`; nothing else owns it.
    let mut link = Some(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }));
    let mut held: Option<(State, Vec<OwnedFd>)> = None;
    let mut watched: Option<Watched> = None;
    let mut crashes = 0u32;
    loop {
        let mut polls = Vec::new();
        if let Some(l) = &link {
            polls.push(libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if let Some(fd) = watched.as_ref().and_then(|w| w.pidfd.as_ref()) {
            polls.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // A server that was gone before its pidfd could be opened is dead now.
        let dead = watched.as_ref().is_some_and(|w| w.pidfd.is_none());
        if polls.is_empty() && !dead {
            say(Level::Info, format_args!("no server to watch; exiting"));
            return Ok(());
        }
        // SAFETY: pollfds we own, for as long as the call.
        let timeout = if dead { 0 } else { -1 };
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("keeper: poll", e));
        }
        // Messages first: a graceful restart's new server registers before the old one exits.
        if let Some(l) = &link {
            if polls[0].revents != 0 {
                match wire::recv(l, 16 << 20) {
                    Ok(Some((body, fds))) => match wire::decode::<ToKeeper>(&body) {
                        Ok(ToKeeper::Register { pid, state }) => {
                            if watched.as_ref().is_none_or(|w| w.pid != pid) {
                                say(Level::Info, format_args!("watching server pid {pid}"));
                                let child = watched
                                    .take()
                                    .and_then(|w| w.child.filter(|c| c.id() == pid));
                                watched = Some(Watched {
                                    pid,
                                    pidfd: pidfd(pid),
                                    child,
                                    since: Instant::now(),
                                });
                            }
                            held = Some((*state, fds));
                        }
                        Ok(ToKeeper::Files { files }) => {
                            if let Some((s, _)) = &mut held {
                                s.files = files;
                            }
                        }
                        Ok(ToKeeper::Stop) => {
                            say(Level::Info, format_args!("the server stopped; exiting"));
                            return Ok(());
                        }
                        Err(e) => say(Level::Error, format_args!("bad message: {e}")),
                    },
                    // Every server end is closed: the server is gone (or going).
                    Ok(None) | Err(_) => {
                        link = None;
                        if held.is_none() {
                            say(
                                Level::Info,
                                format_args!("the server went away before it served; exiting"),
                            );
                            return Ok(());
                        }
                    }
                }
                continue;
            }
        }
        let Some(w) = watched.take() else {
            continue;
        };
        let how = match w.child {
            Some(mut c) => c.wait().map(|s| s.to_string()).unwrap_or_default(),
            None => "it exited".to_string(),
        };
        let Some((state, fds)) = held.as_mut() else {
            return Ok(());
        };
        let lived = w.since.elapsed();
        crashes = if lived < CRASH_LOOP_WINDOW {
            crashes + 1
        } else {
            1
        };
        say(
            Level::Error,
            format_args!(
                "server pid {} died ({how}) after {:.1} s without stopping; starting a new one",
                w.pid,
                lived.as_secs_f64()
            ),
        );
        state.old_pid = w.pid;
        let mut attempt = crashes;
        loop {
            if attempt > 1 {
                let wait = Duration::from_secs(1 << (attempt - 2).min(5)).min(MAX_BACKOFF);
                say(
                    Level::Warn,
                    format_args!(
                        "crash loop ({} starts died within {} ms): waiting {} s before the next",
                        attempt - 1,
                        CRASH_LOOP_WINDOW.as_millis(),
                        wait.as_secs()
                    ),
                );
                std::thread::sleep(wait);
            }
            match successor(state, fds) {
                Ok((child, new_link)) => {
                    let pid = child.id();
                    say(Level::Info, format_args!("server pid {pid} took over"));
                    link = Some(new_link);
                    watched = Some(Watched {
                        pid,
                        pidfd: pidfd(pid),
                        child: Some(child),
                        since: Instant::now(),
                    });
                    break;
                }
                Err(e) => {
                    say(Level::Error, format_args!("{e}"));
                    attempt += 1;
                }
            }
        }
    }
}

/// Start a new server on the held state and descriptors, with a new link to this keeper.
fn successor(state: &mut State, fds: &[OwnedFd]) -> Result<(Child, UnixStream)> {
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| Error::io("keeper: making a socket pair", e))?;
    let (link, server_end) =
        UnixStream::pair().map_err(|e| Error::io("keeper: making a socket pair", e))?;
    let mut child = handover::spawn(
        &state.binary,
        &state.pool,
        &state.control,
        "--resume-fd",
        theirs,
        false,
    )?;
    let fail = |child: &mut Child, why: String| {
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        Error::Unavailable(format!(
            "the new server ({}, pid {}) did not take over: {why} ({status})",
            state.binary.display(),
            child.id()
        ))
    };
    match handover::receive(&ours, handover::HELLO_TIMEOUT) {
        Ok((FromNew::Hello { protocol, .. }, _)) if protocol == handover::PROTOCOL => {}
        Ok((m, _)) => return Err(fail(&mut child, format!("it said {m:?}"))),
        Err(e) => return Err(fail(&mut child, format!("no hello: {e}"))),
    }
    state.keeper = true;
    state.keeper_pid = std::process::id();
    // The held descriptors, then the new server's end of its link to this keeper.
    let mut all: Vec<BorrowedFd> = fds.iter().map(|f| f.as_fd()).collect();
    all.push(server_end.as_fd());
    let sent = wire::encode(&*state).and_then(|f| wire::send(&ours, &f, &all));
    if let Err(e) = sent {
        return Err(fail(&mut child, format!("sending the state: {e}")));
    }
    drop(server_end);
    match handover::receive(&ours, handover::READY_TIMEOUT) {
        Ok((FromNew::Ready { .. }, _)) => Ok((child, link)),
        Ok((FromNew::Failed { message }, _)) => Err(fail(&mut child, message)),
        Ok((m, _)) => Err(fail(&mut child, format!("it said {m:?}"))),
        Err(e) => Err(fail(&mut child, e.to_string())),
    }
}

fn pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a descriptor pidfd_open just returned.
    (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}
