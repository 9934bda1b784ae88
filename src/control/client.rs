//! The CLI's side of the control socket: connect if a server is there, then one call per
//! request.

use super::hello::{self, Hello};
use super::proto::{Reply, Request, ServerFrame};
use super::socket::own_uid;
use super::wire::{self, MAX_REPLY, MAX_REQUEST};
use crate::error::{Error, Result};
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a server that accepted us may take to answer the hello. Requests themselves
/// have no limit: an import of a large image takes what it takes.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Client {
    sock: UnixStream,
    path: PathBuf,
    server: Hello,
    /// A call failed half-way; the stream is out of step and is not used again.
    broken: bool,
}

impl Client {
    /// Connects to the control socket at `path` and says hello. `None`: no server there (no
    /// socket file, or one nobody listens on), so the caller opens the pool itself.
    pub fn connect(path: &Path) -> Result<Option<Client>> {
        let shown = path.display().to_string();
        let sock = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e) if no_server(&e) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(not_allowed(path, e))
            }
            Err(e) => return Err(Error::io(format!("control socket {shown}: connecting"), e)),
        };
        let _ = sock.set_read_timeout(Some(HELLO_TIMEOUT));
        let server = hello::greet(&sock, &Hello::client(), &shown)?;
        let _ = sock.set_read_timeout(None);
        Ok(Some(Client {
            sock,
            path: path.to_path_buf(),
            server,
            broken: false,
        }))
    }

    /// The server's hello: its pid, pool and software.
    pub fn server(&self) -> &Hello {
        &self.server
    }

    /// Sends `req` with `fds` attached, calls `progress` for each Progress frame, and returns
    /// the reply, or the server's error rebuilt as the same `crate::Error`.
    pub fn call(
        &mut self,
        req: &Request,
        fds: &[BorrowedFd],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Reply> {
        let ctx = |what: String| format!("control socket {}: {what}", self.path.display());
        if self.broken {
            return Err(Error::Unavailable(ctx(
                "this connection failed during an earlier request".into(),
            )));
        }
        let frame = wire::encode(req).map_err(|e| Error::io(ctx(format!("encoding {req}")), e))?;
        if wire::body_len(&frame) > MAX_REQUEST {
            return Err(Error::InvalidInput(ctx(format!(
                "{req} is {} bytes, over the limit of {MAX_REQUEST}",
                wire::body_len(&frame)
            ))));
        }
        // Until the answer is read whole, a failure leaves the stream out of step.
        self.broken = true;
        let sent = wire::send(&self.sock, &frame, fds);
        let reply = loop {
            let body = match wire::recv(&self.sock, MAX_REPLY) {
                Ok(Some((body, fds))) if fds.is_empty() => body,
                Ok(Some(_)) => {
                    return Err(Error::Internal(ctx(format!(
                        "the server sent file descriptors with its answer to {req}"
                    ))))
                }
                // Sending may have failed because the server went away; then that is the news.
                Ok(None) => return Err(self.vanished(req, sent.err())),
                Err(e) => return Err(Error::io(ctx(format!("reading the answer to {req}")), e)),
            };
            match wire::decode::<ServerFrame>(&body) {
                Ok(ServerFrame::Progress { done, total }) => progress(done, total),
                Ok(ServerFrame::Reply(r)) => break Ok(r),
                Ok(ServerFrame::Error(e)) => break Err(e.into_error()),
                Err(e) => {
                    return Err(Error::Internal(ctx(format!(
                        "cannot read the server's answer to {req}: {e}"
                    ))))
                }
            }
        };
        self.broken = false;
        reply
    }

    fn vanished(&self, req: &Request, send_error: Option<io::Error>) -> Error {
        let pid = self
            .server
            .pid
            .map_or(String::new(), |p| format!(" (pid {p})"));
        Error::io(
            format!(
                "control socket {}: the server{pid} closed the connection before answering {req}; whether it happened is unknown (`thinlayer ls` shows the pool as it is)",
                self.path.display()
            ),
            send_error.unwrap_or_else(|| io::ErrorKind::UnexpectedEof.into()),
        )
    }
}

/// Connecting failed in a way that means nobody serves there: no file, or a file nobody
/// listens on (a server that died without removing it).
fn no_server(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
    )
}

/// The socket is owner-only and we are not its owner: say so plainly, as the server would.
fn not_allowed(path: &Path, e: io::Error) -> Error {
    let owner =
        std::fs::metadata(path).map_or(String::new(), |m| format!(" (owned by uid {})", m.uid()));
    Error::io(
        format!(
            "uid {} may not use the control socket {}{owner}",
            own_uid(),
            path.display()
        ),
        e,
    )
}
