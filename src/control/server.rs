//! Accepting control connections and running their requests through a handler. Each
//! connection is a hello, then requests one after another until the client closes; each
//! request gets one log line: who, what, outcome, how long.

use super::hello::{self, Greeting, Hello, VERSION};
use super::proto::{Reply, Request, ServerFrame, WireError};
use super::socket::{own_uid, peer_of, ControlSocket, Peer};
use super::wire::{self, MAX_REPLY, MAX_REQUEST};
use crate::error::{Error, Result};
use crate::listen::{Accept, Connections, Stop};
use crate::log::{Level, Log};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Connections served at once; more are refused with Busy. Each CLI command is one short
/// connection, so this bounds threads, not useful concurrency.
const MAX_CONNECTIONS: usize = 64;
/// A client that connects and says nothing holds a thread; this long at most.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that stops reading must not hold a handler (and what it locks) for long: a send
/// that moves nothing for this long gives the client up.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Progress frames at most this often (and the last one always).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Serves `socket` until `stop`: each request goes to `handler` with the peer, the
/// descriptors it carried (already checked: exactly those the request needs) and a progress
/// callback. On stop it removes the socket file, stops reading requests, lets requests in
/// flight finish and returns. Lines go to `log`, prefixed "control: ".
pub fn serve_control<H>(socket: ControlSocket, handler: &H, stop: &Stop, log: &Log) -> Result<()>
where
    H: Fn(&Peer, Request, Vec<OwnedFd>, &mut dyn FnMut(u64, u64)) -> Result<Reply> + Sync,
{
    let log = log.scoped("control");
    let conns = Control {
        socket: &socket,
        owner: own_uid(),
        mine: Hello::server(socket.pool()),
        handler,
        log: &log,
    };
    let accept = Accept {
        what: "control socket",
        thread_name: "control",
        stop,
        log: &log,
        max_connections: MAX_CONNECTIONS,
        // A request in flight is one transaction: it runs to its end.
        grace: None,
        stack_size: None,
    };
    accept
        .run(socket.listener(), &conns)
        .map_err(|e| Error::io(format!("control socket {}", socket.path().display()), e))
}

/// The accept loop's side of the control socket.
struct Control<'a, H> {
    socket: &'a ControlSocket,
    owner: u32,
    mine: Hello,
    handler: &'a H,
    log: &'a Log,
}

impl<H> Connections<UnixStream> for Control<'_, H>
where
    H: Fn(&Peer, Request, Vec<OwnedFd>, &mut dyn FnMut(u64, u64)) -> Result<Reply> + Sync,
{
    fn serve(&self, _: u64, stream: UnixStream) {
        let log = self.log;
        let peer = match prepare(&stream) {
            Ok(p) => p,
            Err(e) => return log.warn(format_args!("a new connection: {e}")),
        };
        if peer.uid != self.owner && peer.uid != 0 {
            let e = Error::io(
                format!(
                    "uid {} may not use the control socket of pool {} (owned by uid {})",
                    peer.uid,
                    self.socket.pool(),
                    self.owner
                ),
                io::Error::from_raw_os_error(libc::EACCES),
            );
            return refuse(log, &peer, &stream, &e, "not the owner");
        }
        connection(log, peer, &stream, &self.mine, self.handler);
    }

    fn too_many(&self, _: u64, stream: UnixStream) {
        let log = self.log;
        let peer = match prepare(&stream) {
            Ok(p) => p,
            Err(e) => return log.warn(format_args!("a new connection: {e}")),
        };
        let e = Error::Busy(format!(
            "the server of pool {} has {MAX_CONNECTIONS} control connections open; try again",
            self.socket.pool()
        ));
        refuse(log, &peer, &stream, &e, "too many connections");
    }

    fn stopped_accepting(&self) {
        self.socket.unpublish();
    }
}

/// The accepted socket with a send timeout, and its peer.
fn prepare(stream: &UnixStream) -> io::Result<Peer> {
    stream.set_write_timeout(Some(SEND_TIMEOUT))?;
    peer_of(stream)
}

/// Tells the client why (as its first frame, in place of the hello) and closes.
fn refuse(log: &Log, peer: &Peer, stream: &UnixStream, e: &Error, why: &str) {
    let _ = send_frame(stream, &ServerFrame::Error(WireError::from(e)));
    log.warn(format_args!("{peer}: refused, {why}"));
}

fn connection<H>(log: &Log, peer: Peer, stream: &UnixStream, mine: &Hello, handler: &H)
where
    H: Fn(&Peer, Request, Vec<OwnedFd>, &mut dyn FnMut(u64, u64)) -> Result<Reply> + Sync,
{
    let warn = |what: &str| log.warn(format_args!("{peer}: {what}"));
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
    // Descriptors sent with a hello are not asked for; dropping them closes them.
    let body = match wire::recv(stream, MAX_REQUEST) {
        Ok(Some((body, _fds))) => body,
        // What a probe (`ControlSocket::bind` finding us alive) looks like.
        Ok(None) => return log.debug(format_args!("{peer}: closed before the hello")),
        Err(e) => return drop_client(log, &peer, stream, e, "before the hello"),
    };
    match hello::answer(stream, &body, mine) {
        Ok(Greeting::Agreed) => {}
        Ok(Greeting::Mismatch(theirs)) => {
            let who = theirs.client.as_deref().unwrap_or("a client");
            return warn(&format!(
                "{who} speaks control protocol version {}, this server {VERSION}; closed",
                theirs.version
            ));
        }
        Err(e) => {
            let _ = send_frame(stream, &ServerFrame::Error(WireError::from(&e)));
            return warn(&format!("refused: {e}"));
        }
    }
    let _ = stream.set_read_timeout(None);
    loop {
        let (body, fds) = match wire::recv(stream, MAX_REQUEST) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => return drop_client(log, &peer, stream, e, "reading a request"),
        };
        match wire::decode::<Request>(&body) {
            Ok(req) => run(log, &peer, stream, req, fds, handler),
            Err(e) => {
                // The framing is intact, so the connection can go on.
                let e = Error::InvalidInput(format!("not a control request: {e}"));
                let _ = send_frame(stream, &ServerFrame::Error(WireError::from(&e)));
                warn(&format!("refused: {e}"));
            }
        }
    }
}

/// Ends a connection whose stream cannot go on (bad frame, cut short): tell the client what
/// was wrong when it is a protocol fault, log it either way.
fn drop_client(log: &Log, peer: &Peer, stream: &UnixStream, e: io::Error, when: &str) {
    if e.kind() == io::ErrorKind::InvalidData {
        let err = Error::InvalidInput(e.to_string());
        let _ = send_frame(stream, &ServerFrame::Error(WireError::from(&err)));
    }
    log.warn(format_args!("{peer}: dropped {when}: {e}"));
}

fn run<H>(log: &Log, peer: &Peer, stream: &UnixStream, req: Request, fds: Vec<OwnedFd>, handler: &H)
where
    H: Fn(&Peer, Request, Vec<OwnedFd>, &mut dyn FnMut(u64, u64)) -> Result<Reply> + Sync,
{
    let start = Instant::now();
    let what = req.to_string();
    let mut progress = Throttle {
        stream,
        last: None,
        gone: false,
    };
    let result = check_fds(&req, &fds)
        .and_then(|()| handler(peer, req, fds, &mut |d, t| progress.send(d, t)));
    let (frame, outcome, level) = match result {
        Ok(reply) => (ServerFrame::Reply(reply), "ok".to_string(), Level::Info),
        Err(e) => {
            let o = format!("error: {e}");
            (ServerFrame::Error(WireError::from(&e)), o, Level::Warn)
        }
    };
    let (sent, outcome) = match send_frame(stream, &frame) {
        Ok(Some(e)) => (Ok(()), format!("{outcome}, but {e}")),
        Ok(None) => (Ok(()), outcome),
        Err(e) => (Err(e), outcome),
    };
    let level = if sent.is_err() { Level::Warn } else { level };
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let lost = match sent {
        Ok(()) => String::new(),
        Err(e) => format!("; the reply was lost ({e})"),
    };
    log.line(
        level,
        format_args!("{peer}: {what}: {outcome} ({ms:.2} ms){lost}"),
    );
}

/// Validate at the edge: exactly the descriptors the request needs, open the right way.
/// The handler can rely on it.
fn check_fds(req: &Request, fds: &[OwnedFd]) -> Result<()> {
    let Some(what) = req.fds_expected() else {
        return match fds.len() {
            0 => Ok(()),
            n => Err(Error::InvalidInput(format!(
                "{req}: takes no file descriptors; it came with {n}"
            ))),
        };
    };
    if fds.len() != 1 {
        return Err(Error::InvalidInput(format!(
            "{req}: needs one file descriptor ({what}); it came with {}",
            fds.len()
        )));
    }
    // SAFETY: F_GETFL on a descriptor we own.
    let mode = unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFL) } & libc::O_ACCMODE;
    let ok = match req {
        Request::Import { .. } | Request::Receive { .. } => {
            mode == libc::O_RDONLY || mode == libc::O_RDWR
        }
        _ => mode == libc::O_WRONLY || mode == libc::O_RDWR,
    };
    if !ok {
        return Err(Error::InvalidInput(format!(
            "{req}: the passed file descriptor is not {what}"
        )));
    }
    Ok(())
}

/// Sends Progress frames at most every PROGRESS_EVERY; stops trying once the client is gone
/// (the request still runs to its end: it is one transaction, whole or not at all).
struct Throttle<'a> {
    stream: &'a UnixStream,
    last: Option<Instant>,
    gone: bool,
}

impl Throttle<'_> {
    fn send(&mut self, done: u64, total: u64) {
        let now = Instant::now();
        let recent = self.last.is_some_and(|t| now - t < PROGRESS_EVERY);
        if self.gone || (recent && done < total) {
            return;
        }
        self.last = Some(now);
        self.gone = send_frame(self.stream, &ServerFrame::Progress { done, total }).is_err();
    }
}

/// Sends one frame. A reply too big for the protocol goes as an error instead, which is
/// returned so the log can say so.
fn send_frame(stream: &UnixStream, frame: &ServerFrame) -> io::Result<Option<Error>> {
    let bytes = wire::encode(frame)?;
    if wire::body_len(&bytes) <= MAX_REPLY {
        return wire::send(stream, &bytes, &[]).map(|()| None);
    }
    let e = Error::Internal(format!(
        "the reply is {} bytes, over the control protocol's limit of {MAX_REPLY}",
        wire::body_len(&bytes)
    ));
    let bytes = wire::encode(&ServerFrame::Error(WireError::from(&e)))?;
    wire::send(stream, &bytes, &[]).map(|()| Some(e))
}
