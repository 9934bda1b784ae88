//! Accept until stop: the one serving loop of the NBD server and the control socket. It
//! waits in poll(2) on the listener and the stop descriptor together, so a stop wakes it at
//! once; each connection gets its own scoped thread; at stop it stops accepting, stops every
//! connection reading (shutdown(SHUT_RD): its reader sees end of file, its replies still go
//! out), waits for in-flight requests to finish, within a grace period if one is given, cuts
//! off the rest, and returns once every connection thread has ended.

use super::stop::{poll_in, Stop};
use crate::log::Log;
use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// After an accept failure that is not the client's (out of descriptors, say), wait this long
/// before the next (a stop still ends the wait at once).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A listening socket the loop can accept from.
pub trait Listen {
    type Conn: Conn;
    fn listen_fd(&self) -> RawFd;
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
    /// One connection, blocking (whatever the listener's mode).
    fn accept_conn(&self) -> io::Result<Self::Conn>;
}

/// A connected socket: a second handle on it lets the loop wake or cut off its reader.
pub trait Conn: Send + Sized {
    fn try_clone_conn(&self) -> io::Result<Self>;
    fn shutdown_conn(&self, how: Shutdown) -> io::Result<()>;
}

/// What a server does with its connections.
pub trait Connections<C>: Sync {
    /// Serves one connection to its end, on its own thread. `id` counts accepted connections
    /// from 1.
    fn serve(&self, id: u64, conn: C);

    /// The connection limit was reached: tell the client why if the protocol can, and log it.
    /// Dropping `conn` closes it.
    fn too_many(&self, id: u64, conn: C) {
        let _ = (id, conn);
    }

    /// Called once, as accepting ends and before connections are asked to finish.
    fn stopped_accepting(&self) {}
}

/// How to run the loop.
pub struct Accept<'a> {
    /// The listener, for log lines ("unix listener").
    pub what: &'a str,
    /// Connection threads are named `{thread_name}-{id}`.
    pub thread_name: &'a str,
    pub stop: &'a Stop,
    pub log: &'a Log,
    /// Connections served at once; further ones go to `Connections::too_many`.
    pub max_connections: usize,
    /// At stop, how long connections get to finish in-flight requests before they are cut
    /// off. None: as long as they take.
    pub grace: Option<Duration>,
    /// Stack size of connection threads; None: Rust's default.
    pub stack_size: Option<usize>,
}

impl Accept<'_> {
    /// Serves `listener` until stop (see the module comment). Fails only if the listener
    /// cannot be set up for the loop.
    pub fn run<L: Listen>(&self, listener: &L, conns: &impl Connections<L::Conn>) -> io::Result<()>
    where
        L::Conn: 'static,
    {
        let acceptor = Acceptor::new(listener, self.stop)?;
        let open = Open::default();
        std::thread::scope(|scope| {
            let mut next_id = 0u64;
            while let Some(conn) = acceptor.next(self.log, self.what) {
                next_id += 1;
                let id = next_id;
                if open.len() >= self.max_connections {
                    conns.too_many(id, conn);
                    continue;
                }
                match conn.try_clone_conn() {
                    Ok(handle) => open.insert(id, handle),
                    Err(e) => {
                        let what = self.what;
                        self.log
                            .warn(format_args!("connection #{id} on {what}: {e}"));
                        continue;
                    }
                }
                let mut builder =
                    std::thread::Builder::new().name(format!("{}-{id}", self.thread_name));
                if let Some(size) = self.stack_size {
                    builder = builder.stack_size(size);
                }
                let open = &open;
                let spawned = builder.spawn_scoped(scope, move || {
                    conns.serve(id, conn);
                    open.remove(id);
                });
                if let Err(e) = spawned {
                    self.log
                        .error(format_args!("cannot start a connection thread: {e}"));
                    open.remove(id);
                }
            }
            conns.stopped_accepting();
            open.close(self.grace);
        });
        Ok(())
    }
}

/// Accepting from one listener until stop, leaving it alone while accepting is held
/// (`Stop::hold`). The accept loop of `Accept::run`, and of servers that run their own
/// connections (the containerd gRPC server feeds its reactor from it).
pub struct Acceptor<'a, L> {
    listener: &'a L,
    stop: &'a Stop,
    stop_fd: RawFd,
    /// (readable while held, readable while not)
    hold_fds: (RawFd, RawFd),
}

impl<'a, L: Listen> Acceptor<'a, L> {
    /// Puts `listener` in non-blocking mode: an accept under the hold's lock must not block
    /// (the other process may take the connection poll said was there).
    pub fn new(listener: &'a L, stop: &'a Stop) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Acceptor {
            listener,
            stop,
            stop_fd: stop.wake_fd()?,
            hold_fds: stop.hold.fds()?,
        })
    }

    /// The next connection; None once stopped. Failures that are not the client's are logged
    /// and backed off from; accepting goes on.
    pub fn next(&self, log: &Log, what: &str) -> Option<L::Conn> {
        let (held_fd, running_fd) = self.hold_fds;
        while !self.stop.is_stopped() {
            if *self.stop.hold.state() {
                let _ = poll_in(&[self.stop_fd, running_fd], -1);
                continue;
            }
            let ready = match poll_in(&[self.listener.listen_fd(), self.stop_fd, held_fd], -1) {
                Ok(r) => r,
                Err(e) => {
                    log.error(format_args!("waiting on the {what}: {e}"));
                    self.stop.wait(Some(ACCEPT_BACKOFF));
                    continue;
                }
            };
            if ready[1] || ready[2] || !ready[0] {
                continue;
            }
            // Held since poll returned: leave the connection in the backlog.
            let held = self.stop.hold.state();
            if *held {
                continue;
            }
            match self.listener.accept_conn() {
                Ok(c) => return Some(c),
                Err(e) if is_transient(&e) => continue,
                Err(e) => {
                    drop(held);
                    // Out of descriptors or similar: say so, back off, keep serving.
                    log.error(format_args!("accept on {what}: {e}"));
                    self.stop.wait(Some(ACCEPT_BACKOFF));
                }
            }
        }
        None
    }
}

/// A second handle on every open connection.
struct Open<C> {
    conns: Mutex<HashMap<u64, C>>,
    /// Signalled as connections end.
    ended: Condvar,
}

impl<C> Default for Open<C> {
    fn default() -> Self {
        Open {
            conns: Mutex::new(HashMap::new()),
            ended: Condvar::new(),
        }
    }
}

impl<C: Conn> Open<C> {
    fn len(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    fn insert(&self, id: u64, c: C) {
        self.conns.lock().unwrap().insert(id, c);
    }

    fn remove(&self, id: u64) {
        self.conns.lock().unwrap().remove(&id);
        self.ended.notify_all();
    }

    /// Stops every connection reading requests, waits for them to answer what they have, and
    /// cuts off those still busy after `grace`.
    fn close(&self, grace: Option<Duration>) {
        let mut conns = self.conns.lock().unwrap();
        for c in conns.values() {
            let _ = c.shutdown_conn(Shutdown::Read);
        }
        let deadline = grace.map(|g| Instant::now() + g);
        while !conns.is_empty() {
            match deadline {
                None => conns = self.ended.wait(conns).unwrap(),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    conns = self.ended.wait_timeout(conns, d - now).unwrap().0;
                }
            }
        }
        for c in conns.values() {
            let _ = c.shutdown_conn(Shutdown::Both);
        }
    }
}

/// Accept failures that say nothing about the server: try again.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
    )
}

/// `Listen` and `Conn` for a std listener and its stream type, which have the same methods.
macro_rules! std_socket {
    ($listener:ty, $stream:ty) => {
        impl Listen for $listener {
            type Conn = $stream;
            fn listen_fd(&self) -> RawFd {
                self.as_raw_fd()
            }
            fn set_nonblocking(&self, on: bool) -> io::Result<()> {
                <$listener>::set_nonblocking(self, on)
            }
            fn accept_conn(&self) -> io::Result<$stream> {
                let (s, _) = self.accept()?;
                s.set_nonblocking(false)?;
                Ok(s)
            }
        }

        impl Conn for $stream {
            fn try_clone_conn(&self) -> io::Result<Self> {
                self.try_clone()
            }
            fn shutdown_conn(&self, how: Shutdown) -> io::Result<()> {
                self.shutdown(how)
            }
        }
    };
}

std_socket!(UnixListener, UnixStream);
std_socket!(TcpListener, TcpStream);

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    /// Echoes one byte back, then waits for end of file.
    struct Echo {
        served: AtomicUsize,
        refused: AtomicUsize,
        stopped: AtomicUsize,
    }

    impl Connections<UnixStream> for Echo {
        fn serve(&self, _: u64, mut c: UnixStream) {
            let mut b = [0u8; 1];
            if c.read_exact(&mut b).is_ok() {
                let _ = c.write_all(&b);
            }
            // Until shutdown(SHUT_RD) at stop, or the client closes.
            let _ = c.read(&mut b);
            self.served.fetch_add(1, SeqCst);
        }
        fn too_many(&self, _: u64, _: UnixStream) {
            self.refused.fetch_add(1, SeqCst);
        }
        fn stopped_accepting(&self) {
            self.stopped.fetch_add(1, SeqCst);
        }
    }

    #[test]
    fn serves_refuses_over_the_limit_and_a_stop_ends_it_with_connections_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let stop = Stop::new();
        let echo = Echo {
            served: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            stopped: AtomicUsize::new(0),
        };
        let log = Log::to(|_, _| {});
        let accept = Accept {
            what: "test listener",
            thread_name: "test",
            stop: &stop,
            log: &log,
            max_connections: 1,
            grace: None,
            stack_size: None,
        };
        std::thread::scope(|s| {
            let server = s.spawn(|| accept.run(&listener, &echo));
            let mut a = UnixStream::connect(&path).unwrap();
            a.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            a.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"x");
            // The second is over the limit: refused (closed at once).
            let mut c = UnixStream::connect(&path).unwrap();
            assert_eq!(c.read(&mut b).unwrap(), 0);
            assert_eq!(echo.refused.load(SeqCst), 1);
            // `a` stays open; the stop wakes its reader, and the loop returns.
            stop.stop();
            server.join().unwrap().unwrap();
            drop(a);
        });
        assert_eq!(echo.served.load(SeqCst), 1);
        assert_eq!(echo.stopped.load(SeqCst), 1);
    }
}
