//! The transmission phase of one connection.
//!
//! One reader thread parses requests, validates them at the edge (nbdkit style: range, flags,
//! read-only and size caps are decided before a payload is read) and queues the valid ones for
//! a small pool of worker threads, started on demand, so requests are served concurrently and
//! may complete out of order. Each reply is built in one buffer and written with one call under
//! the writer lock. The number and payload bytes of requests in flight are bounded, so a client
//! cannot make the server allocate without limit.

use super::handshake::{Session, ALLOCATION_CONTEXT_ID, MAX_PAYLOAD};
use super::proto::*;
use super::stream::{drain, Stream};
use crate::volume::{BlockDevice, Extent, ExtentState};
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};

/// A rejected WRITE up to this size is read and discarded to keep the stream in step; a larger
/// one means the client is lying or hostile, and the connection is closed instead.
const MAX_DRAIN: u64 = 2 * MAX_PAYLOAD as u64;
/// Reads at least this long are split around holes; shorter ones are cheaper sent whole.
const SPLIT_READ_MIN: usize = 64 * 1024;
/// One BLOCK_STATUS reply describes at most this much and this many extents; the client asks
/// again for the rest, and the server never builds a reply proportional to a hostile length.
const BLOCK_STATUS_MAX_LEN: u64 = 1 << 30;
const BLOCK_STATUS_MAX_EXTENTS: usize = 16 * 1024;
/// Buffers larger than this are freed after use rather than kept for reuse.
const POOLED_BUFFER_MAX: usize = 1024 * 1024;
/// Device errors logged per connection; the rest are only counted.
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

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    in_flight: usize,
    in_flight_bytes: u64,
    workers: usize,
    idle: usize,
    /// Wake-ups sent to idle workers not yet taken up, so one idle worker is not counted twice.
    wakeups: usize,
    closing: bool,
}

struct Shared<'a> {
    session: &'a Session,
    device: &'a dyn BlockDevice,
    limits: &'a Limits,
    writer: Mutex<Stream>,
    /// Set when a reply could not be written: nothing more can reach the client.
    dead: AtomicBool,
    queue: Mutex<Queue>,
    work: Condvar,
    space: Condvar,
    buffers: Mutex<Vec<Vec<u8>>>,
    requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

/// Serves requests on `stream` until the client leaves, breaks the protocol, or the server
/// stops; returns after every accepted request has been answered (or the client is gone).
pub fn run(session: &Session, stream: Stream, limits: &Limits, stop: &AtomicBool) -> (Stats, End) {
    let reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => return (Stats::default(), End::Io(e)),
    };
    let shared = Shared {
        session,
        device: &*session.device,
        limits,
        writer: Mutex::new(stream),
        dead: AtomicBool::new(false),
        queue: Mutex::new(Queue::default()),
        work: Condvar::new(),
        space: Condvar::new(),
        buffers: Mutex::new(Vec::new()),
        requests: AtomicU64::new(0),
        bytes_read: AtomicU64::new(0),
        bytes_written: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    };
    let end = std::thread::scope(|scope| {
        let end = shared.read_requests(BufReader::with_capacity(64 * 1024, reader), scope);
        shared.queue.lock().unwrap().closing = true;
        shared.work.notify_all();
        end
    });
    let end = match end {
        End::Vanished | End::Io(_) if stop.load(Relaxed) => End::Shutdown,
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
fn read_header(r: &mut BufReader<Stream>, h: &mut [u8; REQUEST_LEN]) -> io::Result<bool> {
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
        let mut header = [0u8; REQUEST_LEN];
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
            if let Err(errno) = self.validate(&req) {
                if req.command == CMD_WRITE {
                    if req.len as u64 > MAX_DRAIN {
                        self.reply_error(&req, errno, "request too large");
                        return End::Violation(format!("write of {} bytes", req.len));
                    }
                    if let Err(e) = drain(&mut r, req.len as u64, &mut [0u8; 16 * 1024]) {
                        return End::Io(e);
                    }
                }
                self.errors.fetch_add(1, Relaxed);
                self.reply_error(&req, errno, "invalid request");
                continue;
            }

            self.reserve(payload_cost(&req));
            let mut payload = Vec::new();
            if req.command == CMD_WRITE {
                payload = self.take_buffer(req.len as usize);
                if let Err(e) = r.read_exact(&mut payload) {
                    self.release(payload_cost(&req));
                    return End::Io(e);
                }
            }
            self.submit(Job { req, payload }, scope);
        }
    }

    /// The edge: everything the device trait promises its callers is checked here.
    fn validate(&self, req: &Request) -> Result<(), u32> {
        let allowed = match req.command {
            CMD_READ if self.session.structured => CMD_FLAG_DF,
            CMD_READ | CMD_FLUSH | CMD_CACHE => 0,
            CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => return Err(EINVAL),
        };
        if req.flags & !allowed != 0 {
            return Err(EINVAL);
        }
        let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && self.device.is_read_only() {
            return Err(EPERM);
        }
        if payload_cost(req) > MAX_PAYLOAD as u64 {
            return Err(EOVERFLOW);
        }
        match req.command {
            CMD_FLUSH if req.offset != 0 || req.len != 0 => return Err(EINVAL),
            CMD_FLUSH => return Ok(()),
            CMD_BLOCK_STATUS if self.session.allocation_context.is_none() || req.len == 0 => {
                return Err(EINVAL)
            }
            _ => {}
        }
        let in_range = req
            .offset
            .checked_add(req.len as u64)
            .is_some_and(|end| end <= self.device.size());
        if !in_range {
            return Err(match req.command {
                CMD_WRITE | CMD_WRITE_ZEROES => ENOSPC,
                _ => EINVAL,
            });
        }
        Ok(())
    }

    /// Waits for room to accept a request costing `bytes`. A request is always admitted when
    /// nothing is in flight, so a single maximum-size request cannot wait forever.
    fn reserve(&self, bytes: u64) {
        let mut q = self.queue.lock().unwrap();
        while q.in_flight >= self.limits.max_in_flight.max(1)
            || (q.in_flight > 0 && q.in_flight_bytes + bytes > self.limits.max_in_flight_bytes)
        {
            q = self.space.wait(q).unwrap();
        }
        q.in_flight += 1;
        q.in_flight_bytes += bytes;
    }

    fn release(&self, bytes: u64) {
        let mut q = self.queue.lock().unwrap();
        q.in_flight -= 1;
        q.in_flight_bytes -= bytes;
        drop(q);
        self.space.notify_one();
    }

    fn submit<'s>(&'s self, job: Job, scope: &'s std::thread::Scope<'s, '_>) {
        let mut q = self.queue.lock().unwrap();
        q.jobs.push_back(job);
        if q.idle > q.wakeups {
            q.wakeups += 1;
            drop(q);
            self.work.notify_one();
            return;
        }
        if q.workers < self.limits.workers.max(1) {
            let spawned = std::thread::Builder::new()
                .name("nbd-worker".into())
                .stack_size(256 * 1024)
                .spawn_scoped(scope, || self.work_loop());
            if spawned.is_ok() {
                q.workers += 1;
                return;
            }
        }
        if q.workers == 0 {
            // No worker could be started: serve the request on the reader thread.
            let job = q.jobs.pop_back().expect("just queued");
            drop(q);
            self.execute(job);
        }
    }

    fn work_loop(&self) {
        loop {
            let job = {
                let mut q = self.queue.lock().unwrap();
                loop {
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    if q.closing {
                        q.workers -= 1;
                        return;
                    }
                    q.idle += 1;
                    q = self.work.wait(q).unwrap();
                    q.idle -= 1;
                    q.wakeups = q.wakeups.saturating_sub(1);
                }
            };
            self.execute(job);
        }
    }

    fn execute(&self, job: Job) {
        let Job { req, payload } = job;
        let dev = self.device;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let result = match req.command {
            CMD_READ => self.read(&req),
            CMD_WRITE => dev.write_at(req.offset, &payload).map(|()| {
                self.bytes_written.fetch_add(req.len as u64, Relaxed);
            }),
            CMD_FLUSH => dev.flush(),
            CMD_TRIM => dev.trim(req.offset, req.len as u64),
            CMD_WRITE_ZEROES => {
                let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
                dev.write_zeroes(req.offset, req.len as u64, may_unmap)
            }
            CMD_CACHE => Ok(()),
            CMD_BLOCK_STATUS => self.block_status(&req),
            _ => unreachable!("validated"),
        };
        let result = result.and_then(|()| if fua { dev.flush() } else { Ok(()) });
        self.give_buffer(payload);
        match result {
            Ok(()) if matches!(req.command, CMD_READ | CMD_BLOCK_STATUS) => {}
            Ok(()) => {
                let mut reply = [0u8; SIMPLE_REPLY_LEN];
                pack_simple_reply(&mut reply, 0, req.handle);
                self.send(&reply);
            }
            Err(e) => {
                let n = self.errors.fetch_add(1, Relaxed);
                if n < LOGGED_ERRORS {
                    eprintln!("nbd: export \"{}\": {e}", self.session.export);
                }
                self.reply_error(&req, nbd_errno(e.errno()), &e.to_string());
            }
        }
        self.release(payload_cost(&req));
    }

    /// Answers a READ; only the error path is left to the caller.
    fn read(&self, req: &Request) -> crate::Result<()> {
        let len = req.len as usize;
        let mut buf = self.take_buffer(0);
        let result = if !self.session.structured {
            buf.resize(SIMPLE_REPLY_LEN + len, 0);
            self.device
                .read_at(req.offset, &mut buf[SIMPLE_REPLY_LEN..])
                .map(|()| pack_simple_reply(&mut buf, 0, req.handle))
        } else {
            let extents = if req.flags & CMD_FLAG_DF == 0 && len >= SPLIT_READ_MIN {
                self.device.extents(req.offset, len as u64)?
            } else {
                Vec::new()
            };
            if covers(&extents, req.offset, len as u64) && has_holes(&extents) {
                self.build_split_read(req, &extents, &mut buf)
            } else {
                self.build_data_chunk(req, &mut buf)
            }
        };
        if result.is_ok() {
            self.send(&buf);
            self.bytes_read.fetch_add(req.len as u64, Relaxed);
        }
        self.give_buffer(buf);
        result
    }

    fn build_data_chunk(&self, req: &Request, buf: &mut Vec<u8>) -> crate::Result<()> {
        let head = CHUNK_HEADER_LEN + 8;
        buf.resize(head + req.len as usize, 0);
        let kind = REPLY_TYPE_OFFSET_DATA;
        pack_chunk_header(buf, REPLY_FLAG_DONE, kind, req.handle, 8 + req.len);
        buf[CHUNK_HEADER_LEN..head].copy_from_slice(&req.offset.to_be_bytes());
        self.device.read_at(req.offset, &mut buf[head..])
    }

    /// One chunk per run of data or of zeros, all in one buffer; the last one carries DONE.
    fn build_split_read(
        &self,
        req: &Request,
        extents: &[Extent],
        buf: &mut Vec<u8>,
    ) -> crate::Result<()> {
        let runs = runs(extents);
        for (i, &(offset, len, data)) in runs.iter().enumerate() {
            let flags = if i + 1 == runs.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let last_header = buf.len();
            buf.resize(last_header + CHUNK_HEADER_LEN, 0);
            if data {
                let h = &mut buf[last_header..];
                pack_chunk_header(h, flags, REPLY_TYPE_OFFSET_DATA, req.handle, 8 + len as u32);
                buf.put_u64(offset);
                let start = buf.len();
                buf.resize(start + len as usize, 0);
                self.device.read_at(offset, &mut buf[start..])?;
            } else {
                let h = &mut buf[last_header..];
                pack_chunk_header(h, flags, REPLY_TYPE_OFFSET_HOLE, req.handle, 12);
                buf.put_u64(offset);
                buf.put_u32(len as u32);
            }
        }
        Ok(())
    }

    fn block_status(&self, req: &Request) -> crate::Result<()> {
        let len = (req.len as u64).min(BLOCK_STATUS_MAX_LEN);
        let extents = self.device.extents(req.offset, len)?;
        if extents.first().map(|e| e.offset) != Some(req.offset) {
            return Err(crate::Error::Corrupt(format!(
                "device \"{}\" described no extent at byte {}",
                self.device.name(),
                req.offset
            )));
        }
        let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            BLOCK_STATUS_MAX_EXTENTS
        };
        let mut descriptors: Vec<(u64, u32)> = Vec::new();
        for e in &extents {
            let flags = match e.state {
                ExtentState::Data => 0,
                ExtentState::Zero => STATE_ZERO,
                ExtentState::Hole => STATE_HOLE | STATE_ZERO,
            };
            let full = descriptors.len() == max;
            match descriptors.last_mut() {
                Some((l, f)) if *f == flags => *l += e.len,
                _ if full => break,
                _ => descriptors.push((e.len, flags)),
            }
        }
        let mut buf = self.take_buffer(CHUNK_HEADER_LEN);
        buf.put_u32(ALLOCATION_CONTEXT_ID);
        for &(l, f) in &descriptors {
            buf.put_u32(l.min(len) as u32);
            buf.put_u32(f);
        }
        let payload = (buf.len() - CHUNK_HEADER_LEN) as u32;
        let kind = REPLY_TYPE_BLOCK_STATUS;
        pack_chunk_header(&mut buf, REPLY_FLAG_DONE, kind, req.handle, payload);
        self.send(&buf);
        self.give_buffer(buf);
        Ok(())
    }

    fn reply_error(&self, req: &Request, errno: u32, message: &str) {
        if !self.session.structured {
            let mut reply = [0u8; SIMPLE_REPLY_LEN];
            pack_simple_reply(&mut reply, errno, req.handle);
            return self.send(&reply);
        }
        let message = &message.as_bytes()[..message.len().min(1024)];
        let mut buf = Vec::with_capacity(CHUNK_HEADER_LEN + 6 + message.len());
        buf.resize(CHUNK_HEADER_LEN, 0);
        buf.put_u32(errno);
        buf.put_u16(message.len() as u16);
        buf.extend_from_slice(message);
        let len = (buf.len() - CHUNK_HEADER_LEN) as u32;
        let kind = REPLY_TYPE_ERROR;
        pack_chunk_header(&mut buf, REPLY_FLAG_DONE, kind, req.handle, len);
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

/// Whether `extents` tile `[offset, offset+len)` exactly; anything else is not trusted to
/// shape a reply.
fn covers(extents: &[Extent], offset: u64, len: u64) -> bool {
    let mut at = offset;
    for e in extents {
        if e.offset != at || e.len == 0 {
            return false;
        }
        at += e.len;
    }
    !extents.is_empty() && at == offset + len
}

fn has_holes(extents: &[Extent]) -> bool {
    extents.iter().any(|e| e.state != ExtentState::Data)
}

/// Merges extents into runs of (offset, len, is_data); Zero and Hole both read as zeros.
fn runs(extents: &[Extent]) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in extents {
        let data = e.state == ExtentState::Data;
        match out.last_mut() {
            Some((_, len, d)) if *d == data => *len += e.len,
            _ => out.push((e.offset, e.len, data)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, state: ExtentState) -> Extent {
        Extent { offset, len, state }
    }

    #[test]
    fn runs_merge_zero_and_hole() {
        let e = [
            ext(0, 10, ExtentState::Data),
            ext(10, 5, ExtentState::Zero),
            ext(15, 5, ExtentState::Hole),
            ext(20, 1, ExtentState::Data),
        ];
        assert_eq!(
            runs(&e),
            vec![(0, 10, true), (10, 10, false), (20, 1, true)]
        );
    }

    #[test]
    fn covers_rejects_gaps_and_short_lists() {
        let e = [ext(0, 10, ExtentState::Data), ext(11, 5, ExtentState::Zero)];
        assert!(!covers(&e, 0, 16));
        assert!(!covers(&e[..1], 0, 16));
        assert!(covers(&e[..1], 0, 10));
        assert!(!covers(&[], 0, 0));
    }
}
