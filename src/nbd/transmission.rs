//! The transmission phase of one connection.
//!
//! One reader thread parses requests, validates them at the edge (`validate`: range, flags,
//! read-only and size caps are decided before a payload is read) and queues the valid ones for
//! a small pool of worker threads, started on demand, so requests are served concurrently and
//! may complete out of order. Each reply is built in one buffer and written with one call under
//! the writer lock. The number and payload bytes of requests in flight are bounded, so a client
//! cannot make the server allocate without limit.

use super::handshake::{Session, MAX_PAYLOAD};
use super::proto::*;
use super::queue::{Dispatch, JobQueue};
use super::reply;
use super::stream::{drain, Stream};
use super::validate::{Edge, Refusal};
use crate::listen::Stop;
use crate::log::Log;
use crate::volume::BlockDevice;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

/// A rejected WRITE up to this size is read and discarded to keep the stream in step; a larger
/// one means the client is lying or hostile, and the connection is closed instead.
const MAX_DRAIN: u64 = 2 * MAX_PAYLOAD as u64;
/// Buffers larger than this are freed after use rather than kept for reuse.
const POOLED_BUFFER_MAX: usize = 1024 * 1024;
/// Errors (refused requests and device errors) logged per connection; the rest are only
/// counted, so a client cannot flood the log.
const LOGGED_ERRORS: u64 = 5;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Worker threads per connection (the reader is extra).
    pub workers: usize,
    /// Requests accepted but not yet answered.
    pub max_in_flight: usize,
    /// READ and WRITE payload bytes accepted but not yet answered.
    pub max_in_flight_bytes: u64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

/// Why transmission ended.
#[derive(Debug)]
pub enum End {
    /// NBD_CMD_DISC.
    Disconnected,
    /// End of file on a request boundary without NBD_CMD_DISC.
    Vanished,
    /// The server is shutting down (the read side was closed under us).
    Shutdown,
    /// The client broke the protocol in a way the stream cannot recover from.
    Violation(String),
    Io(io::Error),
}

struct Job {
    req: Request,
    payload: Vec<u8>,
}

struct Shared<'a> {
    session: &'a Session,
    device: &'a dyn BlockDevice,
    limits: &'a Limits,
    log: &'a Log,
    /// Who the connection is, for log lines.
    client: &'a (dyn fmt::Display + Sync),
    writer: Mutex<Stream>,
    /// Set when a reply could not be written: nothing more can reach the client.
    dead: AtomicBool,
    queue: JobQueue<Job>,
    buffers: Mutex<Vec<Vec<u8>>>,
    requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

/// Serves requests on `stream` until the client leaves, breaks the protocol, or the server
/// stops; returns after every accepted request has been answered (or the client is gone).
pub fn run(
    session: &Session,
    stream: Stream,
    limits: &Limits,
    stop: &Stop,
    log: &Log,
    client: &(dyn fmt::Display + Sync),
) -> (Stats, End) {
    let reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => return (Stats::default(), End::Io(e)),
    };
    let shared = Shared {
        session,
        device: &*session.device,
        limits,
        log,
        client,
        writer: Mutex::new(stream),
        dead: AtomicBool::new(false),
        queue: JobQueue::new(
            limits.max_in_flight,
            limits.max_in_flight_bytes,
            limits.workers,
        ),
        buffers: Mutex::new(Vec::new()),
        requests: AtomicU64::new(0),
        bytes_read: AtomicU64::new(0),
        bytes_written: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    };
    let end = std::thread::scope(|scope| {
        let end = shared.read_requests(BufReader::with_capacity(64 * 1024, reader), scope);
        shared.queue.close();
        end
    });
    let end = match end {
        End::Vanished | End::Io(_) if stop.is_stopped() => End::Shutdown,
        e => e,
    };
    let stats = Stats {
        requests: shared.requests.load(Relaxed),
        bytes_read: shared.bytes_read.load(Relaxed),
        bytes_written: shared.bytes_written.load(Relaxed),
        errors: shared.errors.load(Relaxed),
    };
    (stats, end)
}

/// Reads a request header; `Ok(false)` is a clean end of file before its first byte.
fn read_header(r: &mut BufReader<Stream>, h: &mut [u8; Request::LEN]) -> io::Result<bool> {
    if r.fill_buf()?.is_empty() {
        return Ok(false);
    }
    r.read_exact(h)?;
    Ok(true)
}

fn payload_cost(req: &Request) -> u64 {
    match req.command {
        CMD_READ | CMD_WRITE => req.len as u64,
        _ => 0,
    }
}

impl<'a> Shared<'a> {
    fn read_requests<'s>(
        &'s self,
        mut r: BufReader<Stream>,
        scope: &'s std::thread::Scope<'s, '_>,
    ) -> End {
        let mut header = [0u8; Request::LEN];
        loop {
            if self.dead.load(Relaxed) {
                return End::Io(io::ErrorKind::BrokenPipe.into());
            }
            match read_header(&mut r, &mut header) {
                Ok(true) => {}
                Ok(false) => return End::Vanished,
                Err(e) => return End::Io(e),
            }
            let Some(req) = Request::unpack(&header) else {
                return End::Violation("bad request magic".into());
            };
            self.requests.fetch_add(1, Relaxed);
            if req.command == CMD_DISC {
                return End::Disconnected;
            }
            if let Err(why) = self.edge().check(&req) {
                let errno = why.errno(&req);
                if req.command == CMD_WRITE {
                    if req.len as u64 > MAX_DRAIN {
                        self.refused(&req, why, errno, "; too large to skip, closing");
                        self.reply_error(&req, errno);
                        return End::Violation(format!("write of {} bytes", req.len));
                    }
                    if let Err(e) = drain(&mut r, req.len as u64, &mut [0u8; 16 * 1024]) {
                        return End::Io(e);
                    }
                }
                self.refused(&req, why, errno, "");
                self.reply_error(&req, errno);
                continue;
            }

            self.queue.reserve(payload_cost(&req));
            let mut payload = Vec::new();
            if req.command == CMD_WRITE {
                payload = self.take_buffer(req.len as usize);
                if let Err(e) = r.read_exact(&mut payload) {
                    self.queue.release(payload_cost(&req), None);
                    return End::Io(e);
                }
            }
            self.submit(Job { req, payload }, scope);
        }
    }

    /// What the edge checks a request against (asked afresh: the device owns its size).
    fn edge(&self) -> Edge {
        Edge {
            size: self.device.size(),
            read_only: self.device.is_read_only(),
            structured: self.session.structured,
            allocation: self.session.allocation_context.is_some(),
        }
    }

    /// Logs a refusal with its reason (the client is sent only `errno`).
    fn refused(&self, req: &Request, why: Refusal, errno: u32, then: &str) {
        if self.count_error() {
            self.log(format_args!(
                "refused {req}: {why}; sent {}{then}",
                errno_name(errno)
            ));
        }
    }

    /// Counts an error and says whether it may still be logged.
    fn count_error(&self) -> bool {
        let n = self.errors.fetch_add(1, Relaxed);
        if n == LOGGED_ERRORS {
            self.log(format_args!("further errors are counted, not logged"));
        }
        n < LOGGED_ERRORS
    }

    fn log(&self, what: fmt::Arguments) {
        let export = &self.session.export;
        self.log
            .warn(format_args!("{} export \"{export}\": {what}", self.client));
    }

    fn submit<'s>(&'s self, job: Job, scope: &'s std::thread::Scope<'s, '_>) {
        if self.queue.push(job) == Dispatch::Queued {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("nbd-worker".into())
            .stack_size(256 * 1024)
            .spawn_scoped(scope, || {
                while let Some(job) = self.queue.pop() {
                    self.execute(job);
                }
            });
        if spawned.is_err() {
            // No thread to be had: serve on the reader rather than leave requests unanswered.
            for job in self.queue.worker_not_started() {
                self.execute(job);
            }
        }
    }

    fn execute(&self, job: Job) {
        let Job { req, payload } = job;
        let dev = self.device;
        let started = Instant::now();
        let mut out = None;
        let result = match req.command {
            CMD_READ => {
                let buf = out.insert(self.take_buffer(0));
                reply::read(dev, self.session.structured, &req, buf)
            }
            CMD_WRITE => dev.write_at(req.offset, &payload),
            CMD_FLUSH => dev.flush(),
            CMD_TRIM => dev.trim(req.offset, req.len as u64),
            CMD_WRITE_ZEROES => {
                let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
                dev.write_zeroes(req.offset, req.len as u64, may_unmap)
            }
            CMD_CACHE => Ok(()),
            CMD_BLOCK_STATUS => {
                let buf = out.insert(self.take_buffer(0));
                reply::block_status(dev, &req, buf)
            }
            _ => unreachable!("validated"),
        };
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let result = result.and_then(|()| if fua { dev.flush() } else { Ok(()) });
        // Device time only: sending is not work another worker could share.
        let took = started.elapsed();
        self.give_buffer(payload);
        match result {
            Ok(()) => {
                match req.command {
                    CMD_READ => self.bytes_read.fetch_add(req.len as u64, Relaxed),
                    CMD_WRITE => self.bytes_written.fetch_add(req.len as u64, Relaxed),
                    _ => 0,
                };
                match &out {
                    Some(buf) => self.send(buf),
                    None => {
                        let done = SimpleReply {
                            error: 0,
                            handle: req.handle,
                        };
                        self.send(&done.pack());
                    }
                }
            }
            Err(e) => {
                let errno = nbd_errno(e.errno());
                if self.count_error() {
                    self.log(format_args!(
                        "{req} failed: {e}; sent {}",
                        errno_name(errno)
                    ));
                }
                // The detail (pool paths, block numbers) is logged above, not sent.
                self.reply_error(&req, errno);
            }
        }
        if let Some(buf) = out {
            self.give_buffer(buf);
        }
        self.queue.release(payload_cost(&req), Some(took));
    }

    /// An error reply: the code, and in a structured reply only `errno_text` for it.
    fn reply_error(&self, req: &Request, errno: u32) {
        if !self.session.structured {
            let reply = SimpleReply {
                error: errno,
                handle: req.handle,
            };
            return self.send(&reply.pack());
        }
        let mut buf = Vec::new();
        let chunk = Chunk::Error {
            error: errno,
            message: errno_text(errno),
        };
        chunk.pack_into(REPLY_FLAG_DONE, req.handle, &mut buf);
        self.send(&buf);
    }

    fn send(&self, bytes: &[u8]) {
        if self.dead.load(Relaxed) {
            return;
        }
        let mut w = self.writer.lock().unwrap();
        if w.write_all(bytes).is_err() {
            self.dead.store(true, Relaxed);
            // Wake the reader too: nothing it reads could be answered.
            w.shutdown_both();
        }
    }

    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let mut buf = self.buffers.lock().unwrap().pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        buf
    }

    fn give_buffer(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > POOLED_BUFFER_MAX {
            return;
        }
        let mut pool = self.buffers.lock().unwrap();
        if pool.len() < 2 * self.limits.workers + 2 {
            pool.push(buf);
        }
    }
}
