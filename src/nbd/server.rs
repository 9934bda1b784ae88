//! Listening, accepting, one thread per connection, and orderly shutdown: stop accepting, let
//! in-flight requests finish, commit the pool.

use super::handshake::{self, Outcome};
use super::stream::Stream;
use super::transmission::{self, End, Limits, Stats};
use crate::listen::{Accept, Connections, Listen, Stop};
use crate::log::Log;
use crate::volume::ExportCatalog;
use crate::{Error, Result};
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Further connections are closed at once.
    pub max_connections: usize,
    /// Worker threads per connection; requests on a connection run this many at a time.
    pub workers_per_connection: usize,
    /// Requests per connection accepted but not yet answered.
    pub max_in_flight: usize,
    /// READ/WRITE payload bytes per connection accepted but not yet answered.
    pub max_in_flight_bytes: u64,
    /// Each read during the handshake must arrive within this time.
    pub handshake_timeout: Option<Duration>,
    /// The export a client gets by asking for "". Unset: the only export, if there is one.
    pub default_export: Option<String>,
    /// At shutdown, how long connections get to finish in-flight requests before they are
    /// cut off (a client that stops reading replies would otherwise hold shutdown forever).
    pub shutdown_grace: Duration,
    /// Where log lines go, each prefixed "nbd: ": a line per connection (info), refused
    /// requests and device errors (warn, a few per connection), accept failures (error).
    pub log: Log,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 4096,
            workers_per_connection: 8,
            max_in_flight: 64,
            max_in_flight_bytes: 64 * 1024 * 1024,
            handshake_timeout: Some(Duration::from_secs(30)),
            default_export: None,
            shutdown_grace: Duration::from_secs(10),
            log: Log::process(),
        }
    }
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listener {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listener::Unix(p) => write!(f, "unix socket {}", p.display()),
            Listener::Tcp(a) => write!(f, "tcp {a}"),
        }
    }
}

/// Binds `listener` and serves `catalog` until `stop` becomes true; then stops accepting, lets
/// in-flight requests finish, commits with `flush_all` and returns. A Unix socket file is
/// removed on the way out (and a stale one, left by a dead server, on the way in).
pub fn serve(
    catalog: &dyn ExportCatalog,
    listener: &Listener,
    config: &ServerConfig,
    stop: &Stop,
) -> Result<()> {
    serve_bound(catalog, bind(listener)?, config, stop)
}

/// A listener bound but not yet served, so a process serving several sockets can bind them
/// all before any client is told it is ready.
pub enum Bound {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Bound {
    /// A listener another server process bound, handed over as its descriptor.
    pub fn adopt(listener: &Listener, fd: std::os::fd::OwnedFd) -> Bound {
        match listener {
            Listener::Tcp(_) => Bound::Tcp(TcpListener::from(fd)),
            Listener::Unix(path) => Bound::Unix(UnixListener::from(fd), path.clone()),
        }
    }

    /// The listening descriptor, to hand to the next server process.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Bound::Tcp(l) => l.as_fd(),
            Bound::Unix(l, _) => l.as_fd(),
        }
    }
}

/// Bind `listener` (replacing a stale Unix socket left by a dead server; refusing a live one).
pub fn bind(listener: &Listener) -> Result<Bound> {
    let ctx = || format!("nbd: listen on {listener}");
    match listener {
        Listener::Tcp(addr) => Ok(Bound::Tcp(
            TcpListener::bind(addr).map_err(|e| Error::io(ctx(), e))?,
        )),
        Listener::Unix(path) => {
            remove_stale_socket(path).map_err(|e| Error::io(ctx(), e))?;
            let l = UnixListener::bind(path).map_err(|e| Error::io(ctx(), e))?;
            Ok(Bound::Unix(l, path.clone()))
        }
    }
}

/// Serve a bound listener (see `serve`).
pub fn serve_bound(
    catalog: &dyn ExportCatalog,
    bound: Bound,
    config: &ServerConfig,
    stop: &Stop,
) -> Result<()> {
    match bound {
        Bound::Tcp(l) => serve_tcp(catalog, l, config, stop),
        Bound::Unix(l, path) => {
            let result = serve_unix(catalog, l, config, stop);
            let _ = std::fs::remove_file(path);
            result
        }
    }
}

fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another server is listening there",
            )),
            Err(_) => std::fs::remove_file(path),
        },
        _ => Ok(()),
    }
}

/// Serves on an already-bound Unix listener (tests bind one in a temporary directory).
pub fn serve_unix(
    catalog: &dyn ExportCatalog,
    listener: UnixListener,
    config: &ServerConfig,
    stop: &Stop,
) -> Result<()> {
    Server::new(catalog, config, stop, "unix").run(&listener, |s| Ok((Stream::Unix(s), None)))
}

/// Serves on an already-bound TCP listener.
pub fn serve_tcp(
    catalog: &dyn ExportCatalog,
    listener: TcpListener,
    config: &ServerConfig,
    stop: &Stop,
) -> Result<()> {
    Server::new(catalog, config, stop, "tcp").run(&listener, |s: TcpStream| {
        let peer = s.peer_addr().ok();
        // Replies are written whole; waiting to coalesce them only adds latency.
        s.set_nodelay(true)?;
        Ok((Stream::Tcp(s), peer))
    })
}

struct Server<'a> {
    catalog: &'a dyn ExportCatalog,
    config: &'a ServerConfig,
    stop: &'a Stop,
    limits: Limits,
    kind: &'static str,
    log: Log,
}

/// Who a log line is about.
struct Client {
    kind: &'static str,
    id: u64,
    peer: Option<SocketAddr>,
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} client #{}", self.kind, self.id)?;
        match self.peer {
            Some(p) => write!(f, " ({p})"),
            None => Ok(()),
        }
    }
}

/// The accept loop's side of the server, for one kind of socket.
struct Conns<'s, 'a, F> {
    server: &'s Server<'a>,
    wrap: F,
}

impl<C, F> Connections<C> for Conns<'_, '_, F>
where
    F: Fn(C) -> io::Result<(Stream, Option<SocketAddr>)> + Sync,
{
    fn serve(&self, id: u64, conn: C) {
        let kind = self.server.kind;
        match (self.wrap)(conn) {
            Ok((stream, peer)) => self.server.connection(Client { kind, id, peer }, stream),
            Err(e) => self
                .server
                .log
                .warn(format_args!("{kind} client #{id}: {e}")),
        }
    }

    fn too_many(&self, id: u64, _: C) {
        let kind = self.server.kind;
        let log = &self.server.log;
        log.warn(format_args!(
            "{kind} client #{id}: refused, too many connections"
        ));
    }
}

impl<'a> Server<'a> {
    fn new(
        catalog: &'a dyn ExportCatalog,
        config: &'a ServerConfig,
        stop: &'a Stop,
        kind: &'static str,
    ) -> Self {
        Server {
            catalog,
            config,
            stop,
            limits: Limits {
                workers: config.workers_per_connection,
                max_in_flight: config.max_in_flight,
                max_in_flight_bytes: config.max_in_flight_bytes,
            },
            kind,
            log: config.log.scoped("nbd"),
        }
    }

    /// Accepts until stop (`crate::listen`), then commits with `flush_all`.
    fn run<L: Listen>(
        &self,
        listener: &L,
        wrap: impl Fn(L::Conn) -> io::Result<(Stream, Option<SocketAddr>)> + Sync,
    ) -> Result<()>
    where
        L::Conn: 'static,
    {
        let what = format!("{} listener", self.kind);
        let accept = Accept {
            what: &what,
            thread_name: "nbd-conn",
            stop: self.stop,
            log: &self.log,
            max_connections: self.config.max_connections,
            grace: Some(self.config.shutdown_grace),
            stack_size: Some(256 * 1024),
        };
        accept
            .run(listener, &Conns { server: self, wrap })
            .map_err(|e| Error::io(format!("nbd: {what}"), e))?;
        self.catalog
            .flush_all()
            .map_err(|e| e.context("nbd: commit at shutdown"))
    }

    fn connection(&self, client: Client, mut stream: Stream) {
        let _ = stream.set_read_timeout(self.config.handshake_timeout);
        let default = self.config.default_export.as_deref();
        let who = client.to_string();
        match handshake::negotiate(&mut stream, self.catalog, default, &who) {
            Ok(Outcome::Transmission(session)) => {
                let _ = stream.set_read_timeout(None);
                let (stats, end) = transmission::run(
                    &session,
                    stream,
                    &self.limits,
                    self.stop,
                    &self.log,
                    &client,
                );
                let export = &session.export;
                self.log(format_args!(
                    "{client} export \"{export}\": {} {}",
                    describe(&end),
                    summary(&stats)
                ));
            }
            Ok(Outcome::Aborted) => self.log(format_args!("{client}: left during handshake")),
            Err(e) if self.stop.is_stopped() => self.log(format_args!(
                "{client}: closed by shutdown during handshake ({e})"
            )),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                self.log(format_args!("{client}: vanished during handshake"))
            }
            // The socket's read timeout (EAGAIN, as Linux says it): the timeout bounds each
            // read, so the client sent nothing at all for that long.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let waited = self.config.handshake_timeout.unwrap_or_default();
                self.log(format_args!(
                    "{client}: handshake timed out (nothing received for {}), closed",
                    seconds(waited)
                ))
            }
            Err(e) => self.log(format_args!("{client}: handshake failed: {e}")),
        }
    }

    /// A line about a connection's life.
    fn log(&self, line: fmt::Arguments) {
        self.log.info(line)
    }
}

fn describe(end: &End) -> String {
    match end {
        End::Disconnected => "disconnected".into(),
        End::Vanished => "vanished".into(),
        End::Shutdown => "closed by shutdown".into(),
        End::Violation(what) => format!("dropped for protocol violation ({what})"),
        End::Io(e) => format!("lost ({e})"),
    }
}

fn summary(s: &Stats) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    format!(
        "after {} requests, {:.1} MiB read, {:.1} MiB written, {} errors",
        s.requests,
        mib(s.bytes_read),
        mib(s.bytes_written),
        s.errors
    )
}

/// `30 s`, `0.2 s`.
fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}
