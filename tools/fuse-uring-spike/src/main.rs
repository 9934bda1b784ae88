//! fuse-uring-spike: the smallest FUSE server that serves one file through either transport,
//! `/dev/fuse` read/write or FUSE over io_uring (Linux 6.14+), to measure what the transport
//! itself costs per request (issue 21, item 2; docs/BENCHMARKS.md, "FUSE over io_uring", and
//! `tools/bench-fuse-uring`, which drives it).
//!
//! Both transports share one request handler, so a difference between them is the transport's:
//! - dev: THREADS threads each `read(/dev/fuse)` a request and `write` its reply (two system
//!   calls per request; any thread may take any request);
//! - uring: one thread per possible CPU (pinned to it unless `--no-pin`), each with its own
//!   ring (SQE128) holding DEPTH registered entries of its queue. The kernel puts a request on
//!   the queue of the CPU that sent it; a reply goes back with the next fetch in one
//!   `io_uring_enter` (FUSE_IO_URING_CMD_COMMIT_AND_FETCH). `/dev/fuse` is still read by one
//!   thread for what the ring does not carry (INIT, interrupts, forgets).
//!
//! The file, `MOUNT/data`, is BACKING (created and sized): READ is a `pread` of it, WRITE a
//! `pwrite`, FSYNC an `fdatasync` (`--no-sync`: answered at once).
//!
//! Usage (root): fuse-uring-spike --mount DIR --backing FILE --size BYTES
//!                   [--transport dev|uring] [--threads N] [--depth N] [--no-sync]
//!                   [--no-pin] [--slow-fsync-ms MS] [--hold-fd-then-serve SECS]
//! It prints `ready` on stdout once requests flow and exits when DIR is unmounted, printing how
//! many requests each transport carried. `--transport uring` needs
//! `/sys/module/fuse/parameters/enable_uring` = Y; the tool never writes it.
//! `--hold-fd-then-serve SECS` is the restart probe: see `restart_probe`.
//!
//! A measuring tool, not thinlayer's code: thinlayer serves live files through the fuser crate.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

// --- the FUSE protocol: the few structures and numbers used here (include/uapi/linux/fuse.h) ---

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_SETATTR: u32 = 4;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_FSYNC: u32 = 20;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_FSYNCDIR: u32 = 30;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;

const FUSE_ASYNC_READ: u64 = 1 << 0;
const FUSE_BIG_WRITES: u64 = 1 << 5;
const FUSE_ASYNC_DIO: u64 = 1 << 15;
const FUSE_MAX_PAGES: u64 = 1 << 22;
const FUSE_INIT_EXT: u64 = 1 << 30;
const FUSE_OVER_IO_URING: u64 = 1 << 41;

const FUSE_NOTIFY_RESEND: i32 = 7;

/// struct fuse_in_header
const IN_HEADER: usize = 40;
/// struct fuse_out_header
const OUT_HEADER: usize = 16;
/// struct fuse_uring_req_header: in_out[128], op_in[128], struct fuse_uring_ent_in_out (32).
const RING_IN_OUT: usize = 0;
const RING_OP_IN: usize = 128;
const RING_ENT: usize = 256;
const RING_HEADER: usize = 288;
/// FUSE_IO_URING_CMD_*
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// Requests answered through each transport, printed at exit (is the ring really used?).
static DEV_REQS: AtomicU64 = AtomicU64::new(0);
static RING_REQS: AtomicU64 = AtomicU64::new(0);
/// Pin each ring thread to its queue's CPU (what libfuse does); `--no-pin` leaves them free.
static PIN: AtomicBool = AtomicBool::new(true);

const MAX_WRITE: usize = 1 << 20;
const MAX_PAGES: u16 = 256;
const ROOT: u64 = 1;
const DATA: u64 = 2;

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn put_u16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// The size of an opcode's first argument, which the ring carries apart from the payload
/// (`op_in`); on `/dev/fuse` it comes first after the header.
fn op_header_size(opcode: u32) -> usize {
    match opcode {
        FUSE_READ | FUSE_WRITE => 40,
        FUSE_GETATTR | FUSE_FSYNC | FUSE_FSYNCDIR => 16,
        FUSE_SETATTR => 88,
        FUSE_OPEN | FUSE_OPENDIR => 8,
        FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_FLUSH => 24,
        FUSE_INIT => 64,
        FUSE_FORGET => 8,
        FUSE_INTERRUPT => 8,
        FUSE_BATCH_FORGET => 8,
        _ => 0,
    }
}

struct Server {
    backing: File,
    size: u64,
    sync: bool,
    slow_fsync: Duration,
}

impl Server {
    /// struct fuse_attr (88 bytes) at `o`.
    fn attr(&self, out: &mut [u8], o: usize, ino: u64) {
        out[o..o + 88].fill(0);
        put_u64(out, o, ino);
        let (mode, nlink, size) = if ino == ROOT {
            (libc::S_IFDIR | 0o755, 2, 0)
        } else {
            (libc::S_IFREG | 0o644, 1, self.size)
        };
        put_u64(out, o + 8, size);
        put_u64(out, o + 16, size.div_ceil(512));
        put_u32(out, o + 60, mode);
        put_u32(out, o + 64, nlink);
        put_u32(out, o + 80, 4096);
    }

    /// Answers one request: the reply's payload goes to `out`; returns (error, payload length),
    /// or None for a request that takes no reply.
    fn handle(
        &self,
        opcode: u32,
        nodeid: u64,
        op: &[u8],
        rest: &[u8],
        out: &mut [u8],
    ) -> Option<(i32, usize)> {
        Some(match opcode {
            FUSE_LOOKUP => {
                let name = rest.split(|&c| c == 0).next().unwrap_or(&[]);
                if nodeid != ROOT || name != b"data" {
                    return Some((-libc::ENOENT, 0));
                }
                out[..40].fill(0);
                put_u64(out, 0, DATA);
                put_u64(out, 16, 3600);
                put_u64(out, 24, 3600);
                self.attr(out, 40, DATA);
                (0, 128)
            }
            FUSE_GETATTR | FUSE_SETATTR => {
                out[..16].fill(0);
                put_u64(out, 0, 3600);
                self.attr(out, 16, nodeid);
                (0, 104)
            }
            FUSE_OPEN | FUSE_OPENDIR => {
                out[..16].fill(0);
                (0, 16)
            }
            FUSE_READ => {
                let offset = u64_at(op, 8);
                let size = (u32_at(op, 16) as usize).min(out.len());
                let end = (offset + size as u64).min(self.size);
                let n = end.saturating_sub(offset) as usize;
                match self.backing.read_at(&mut out[..n], offset) {
                    Ok(got) => (0, got),
                    Err(e) => (-e.raw_os_error().unwrap_or(libc::EIO), 0),
                }
            }
            FUSE_WRITE => {
                let offset = u64_at(op, 8);
                let size = u32_at(op, 16) as usize;
                match self.backing.write_all_at(&rest[..size], offset) {
                    Ok(()) => {
                        put_u64(out, 0, size as u64);
                        (0, 8)
                    }
                    Err(e) => (-e.raw_os_error().unwrap_or(libc::EIO), 0),
                }
            }
            FUSE_FSYNC => {
                if !self.slow_fsync.is_zero() {
                    std::thread::sleep(self.slow_fsync);
                }
                if self.sync {
                    if let Err(e) = self.backing.sync_data() {
                        return Some((-e.raw_os_error().unwrap_or(libc::EIO), 0));
                    }
                }
                (0, 0)
            }
            FUSE_STATFS => {
                out[..80].fill(0);
                put_u32(out, 40, 4096);
                put_u32(out, 44, 255);
                put_u32(out, 48, 4096);
                (0, 80)
            }
            FUSE_FLUSH | FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_FSYNCDIR | FUSE_READDIR
            | FUSE_DESTROY => (0, 0),
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => return None,
            _ => (-libc::ENOSYS, 0),
        })
    }
}

// --- /dev/fuse ---

fn mount(dir: &str) -> File {
    // SAFETY: plain open(2) of a device node.
    let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "open /dev/fuse: {}",
        std::io::Error::last_os_error()
    );
    let data = CString::new(format!(
        "fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other"
    ))
    .unwrap();
    let target = CString::new(dir).unwrap();
    // SAFETY: valid C strings; mount(2) as root.
    let rc = unsafe {
        libc::mount(
            c"fuse-uring-spike".as_ptr(),
            target.as_ptr(),
            c"fuse.spike".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    assert!(rc == 0, "mount: {}", std::io::Error::last_os_error());
    // SAFETY: fd is ours.
    unsafe { File::from_raw_fd(fd) }
}

fn dev_reply(dev: &File, unique: u64, error: i32, payload: &[u8]) {
    let mut hdr = [0u8; OUT_HEADER];
    put_u32(&mut hdr, 0, (OUT_HEADER + payload.len()) as u32);
    put_u32(&mut hdr, 4, error as u32);
    put_u64(&mut hdr, 8, unique);
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut _,
            iov_len: OUT_HEADER,
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut _,
            iov_len: payload.len(),
        },
    ];
    // SAFETY: both buffers live across the call. An error (ENOENT: the request was
    // interrupted) is the kernel's to keep.
    unsafe { libc::writev(dev.as_raw_fd(), iov.as_ptr(), 2) };
}

/// Answers INIT: what thinlayer asks for (max_write 1 MiB, async DIO), plus the ring when asked.
fn init_reply(dev: &File, buf: &[u8], uring: bool) {
    let unique = u64_at(buf, 8);
    let op = &buf[IN_HEADER..];
    let minor = u32_at(op, 4);
    let mut kflags = u32_at(op, 12) as u64;
    if kflags & FUSE_INIT_EXT != 0 {
        kflags |= (u32_at(op, 16) as u64) << 32;
    }
    let mut flags =
        FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES | FUSE_INIT_EXT;
    if uring {
        assert!(
            kflags & FUSE_OVER_IO_URING != 0,
            "the kernel does not offer FUSE_OVER_IO_URING (enable_uring?)"
        );
        flags |= FUSE_OVER_IO_URING;
    }
    flags &= kflags;
    let mut out = [0u8; 64];
    put_u32(&mut out, 0, 7);
    put_u32(&mut out, 4, minor.min(42));
    put_u32(&mut out, 8, u32_at(op, 8));
    put_u32(&mut out, 12, flags as u32);
    put_u16(&mut out, 16, 64);
    put_u16(&mut out, 18, 48);
    put_u32(&mut out, 20, MAX_WRITE as u32);
    put_u32(&mut out, 24, 1);
    put_u16(&mut out, 28, MAX_PAGES);
    put_u32(&mut out, 32, (flags >> 32) as u32);
    eprintln!("INIT: kernel 7.{minor}, flags {flags:#x}");
    dev_reply(dev, unique, 0, &out);
}

/// Reads `/dev/fuse` until the connection ends; INIT goes to `on_init`.
fn dev_loop(dev: &File, server: &Server, mut on_init: impl FnMut(&[u8])) {
    let mut buf = vec![0u8; MAX_WRITE + 4096];
    let mut out = vec![0u8; MAX_WRITE];
    loop {
        // SAFETY: buf is ours and large enough for any request (max_write + headers).
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
                _ => return, // ENODEV: unmounted
            }
        }
        let req = &buf[..n as usize];
        let opcode = u32_at(req, 4);
        let unique = u64_at(req, 8);
        if opcode == FUSE_INIT {
            on_init(req);
            continue;
        }
        DEV_REQS.fetch_add(1, Relaxed);
        let body = &req[IN_HEADER..];
        let split = op_header_size(opcode).min(body.len());
        if let Some((err, len)) = server.handle(
            opcode,
            u64_at(req, 16),
            &body[..split],
            &body[split..],
            &mut out,
        ) {
            dev_reply(dev, unique, err, &out[..len]);
        }
        if opcode == FUSE_DESTROY {
            return;
        }
    }
}

// --- FUSE over io_uring ---

/// One registered ring entry: its header block and its payload buffer, and the iovecs the
/// kernel reads at registration (they must stay put).
struct Entry {
    header: Vec<u8>,
    payload: Vec<u8>,
    iov: [libc::iovec; 2],
}

/// A URING_CMD SQE for /dev/fuse (fixed file 0) with struct fuse_uring_cmd_req in its command
/// area. The crate's builder sets `addr` but not `len`, which REGISTER needs (2 iovecs).
fn ring_cmd(
    cmd_op: u32,
    qid: u16,
    commit_id: u64,
    user_data: u64,
    iov: Option<&[libc::iovec; 2]>,
) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    put_u64(&mut cmd, 8, commit_id);
    put_u16(&mut cmd, 16, qid);
    let mut b = opcode::UringCmd80::new(types::Fixed(0), cmd_op).cmd(cmd);
    if let Some(iov) = iov {
        b = b.addr(Some(iov.as_ptr() as u64));
    }
    let e = b.build().user_data(user_data);
    // SAFETY: Entry128 is repr(C), 128 bytes: the 64-byte io_uring_sqe and 64 more command
    // bytes. `len` is the u32 at offset 24 of io_uring_sqe.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
    if iov.is_some() {
        put_u32(&mut raw, 24, 2);
    }
    unsafe { std::mem::transmute(raw) }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// One queue: registers DEPTH entries, then answers what the kernel hands it until the
/// connection ends (a CQE with an error: -ENOTCONN at unmount).
fn ring_queue(dev: RawFd, server: &Server, qid: u16, depth: usize, ready: &std::sync::Barrier) {
    if PIN.load(Relaxed) {
        pin_to_cpu(qid as usize);
    }
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder()
        .setup_cqsize(2 * depth as u32)
        .build(depth as u32)
        .expect("io_uring_setup (SQE128)");
    ring.submitter()
        .register_files(&[dev])
        .expect("register /dev/fuse");
    let mut ents: Vec<Box<Entry>> = (0..depth)
        .map(|_| {
            let mut e = Box::new(Entry {
                header: vec![0u8; 4096],
                payload: vec![0u8; MAX_WRITE],
                iov: [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 2],
            });
            e.iov = [
                libc::iovec {
                    iov_base: e.header.as_mut_ptr().cast(),
                    iov_len: RING_HEADER,
                },
                libc::iovec {
                    iov_base: e.payload.as_mut_ptr().cast(),
                    iov_len: MAX_WRITE,
                },
            ];
            e
        })
        .collect();
    for (i, e) in ents.iter().enumerate() {
        let sqe = ring_cmd(CMD_REGISTER, qid, 0, i as u64, Some(&e.iov));
        // SAFETY: the iovecs and buffers live as long as the ring (ents outlives the loop).
        unsafe { ring.submission().push(&sqe).expect("sq full") };
    }
    ring.submit().expect("submit REGISTER");
    ready.wait();
    let mut reply = vec![0u8; MAX_WRITE];
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => panic!("io_uring_enter: {e}"),
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (i, res) in done {
            if res != 0 {
                if res == -libc::ENOTCONN || res == -libc::ECONNABORTED {
                    return;
                }
                panic!(
                    "ring qid {qid} entry {i}: {}",
                    std::io::Error::from_raw_os_error(-res)
                );
            }
            RING_REQS.fetch_add(1, Relaxed);
            let e = &mut ents[i as usize];
            let h = &e.header;
            let opcode = u32_at(h, RING_IN_OUT + 4);
            let unique = u64_at(h, RING_IN_OUT + 8);
            let nodeid = u64_at(h, RING_IN_OUT + 16);
            let commit_id = u64_at(h, RING_ENT + 8);
            let payload_sz = u32_at(h, RING_ENT + 16) as usize;
            let op = h[RING_OP_IN..RING_OP_IN + op_header_size(opcode)].to_vec();
            let (err, len) = server
                .handle(opcode, nodeid, &op, &e.payload[..payload_sz], &mut reply)
                .unwrap_or((0, 0));
            e.payload[..len].copy_from_slice(&reply[..len]);
            let h = &mut e.header;
            put_u32(h, RING_IN_OUT, (OUT_HEADER + len) as u32);
            put_u32(h, RING_IN_OUT + 4, err as u32);
            put_u64(h, RING_IN_OUT + 8, unique);
            put_u32(h, RING_ENT + 16, len as u32);
            let sqe = ring_cmd(CMD_COMMIT_AND_FETCH, qid, commit_id, i, None);
            // SAFETY: as above.
            unsafe { ring.submission().push(&sqe).expect("sq full") };
        }
    }
}

fn possible_cpus() -> usize {
    let s =
        std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_else(|_| "0".into());
    s.trim()
        .rsplit(['-', ','])
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(1, |n| n + 1)
}

fn start_rings(dev: RawFd, server: &Arc<Server>, depth: usize) {
    let n = possible_cpus();
    let ready = Arc::new(std::sync::Barrier::new(n + 1));
    for qid in 0..n {
        let (s, r) = (server.clone(), ready.clone());
        std::thread::Builder::new()
            .name(format!("ring-{qid}"))
            .spawn(move || ring_queue(dev, &s, qid as u16, depth, &r))
            .unwrap();
    }
    ready.wait();
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut mnt, mut backing, mut size) = (String::new(), String::new(), 0u64);
    let (mut transport, mut threads, mut depth, mut sync, mut slow) =
        ("dev".to_string(), 4usize, 8usize, true, 0u64);
    let mut hold = 0u64;
    while let Some(a) = args.next() {
        let mut v = || args.next().expect("option value");
        match a.as_str() {
            "--mount" => mnt = v(),
            "--backing" => backing = v(),
            "--size" => size = v().parse().unwrap(),
            "--transport" => transport = v(),
            "--threads" => threads = v().parse().unwrap(),
            "--depth" => depth = v().parse().unwrap(),
            "--no-sync" => sync = false,
            "--no-pin" => PIN.store(false, Relaxed),
            "--slow-fsync-ms" => slow = v().parse().unwrap(),
            "--hold-fd-then-serve" => hold = v().parse().unwrap(),
            _ => panic!("unknown option {a}"),
        }
    }
    let uring = match transport.as_str() {
        "dev" => false,
        "uring" => true,
        t => panic!("--transport dev|uring, not {t}"),
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&backing)
        .expect("backing");
    file.set_len(size).unwrap();
    let server = Arc::new(Server {
        backing: file,
        size,
        sync,
        slow_fsync: Duration::from_millis(slow),
    });
    let dev = Arc::new(mount(&mnt));
    if hold > 0 {
        return restart_probe(&dev, &server, uring, threads, depth, hold);
    }
    let mut others = Vec::new();
    let started = AtomicBool::new(false);
    dev_loop(&dev, &server, |req| {
        init_reply(&dev, req, uring);
        if started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if uring {
            start_rings(dev.as_raw_fd(), &server, depth);
        } else {
            for _ in 1..threads {
                let (d, s) = (dev.clone(), server.clone());
                others.push(std::thread::spawn(move || dev_loop(&d, &s, |_| {})));
            }
        }
        println!("ready");
        std::io::stdout().flush().unwrap();
    });
    // Unmounted: the ring threads end on their own (-ENOTCONN); do not wait for them.
    eprintln!(
        "requests: /dev/fuse {}, ring {}",
        DEV_REQS.load(Relaxed),
        RING_REQS.load(Relaxed)
    );
    std::process::exit(0);
}

/// The restart probe: does a request that one process took (from the ring, or from
/// `/dev/fuse` as the control) reach the next process when the first one dies? The parent keeps `/dev/fuse` open (as
/// `thinlayer restart` hands it on) and answers INIT; a child registers the rings and serves
/// with FSYNC sleeping `--slow-fsync-ms`. After `hold` seconds the parent SIGKILLs the child
/// (a test's client is then inside a slow FSYNC), registers rings of its own (uring), writes
/// FUSE_NOTIFY_RESEND to `/dev/fuse`, prints `resent` and serves; the client's FSYNC then either
/// completes (resent) or hangs.
fn restart_probe(
    dev: &Arc<File>,
    server: &Arc<Server>,
    uring: bool,
    threads: usize,
    depth: usize,
    hold: u64,
) {
    // INIT first, on /dev/fuse, in the parent.
    let mut buf = vec![0u8; MAX_WRITE + 4096];
    // SAFETY: buf is ours.
    let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n > 0 && u32_at(&buf, 4) == FUSE_INIT);
    init_reply(dev, &buf[..n as usize], uring);
    // SAFETY: fork in a process with one thread.
    let child = unsafe { libc::fork() };
    if child == 0 {
        if uring {
            start_rings(dev.as_raw_fd(), server, depth);
        } else {
            for _ in 0..threads {
                let (d, s) = (dev.clone(), server.clone());
                std::thread::spawn(move || dev_loop(&d, &s, |_| {}));
            }
        }
        println!("ready");
        std::io::stdout().flush().unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::thread::sleep(Duration::from_secs(hold));
    // SAFETY: our child.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    eprintln!("child {child} killed");
    let server2 = Arc::new(Server {
        backing: server.backing.try_clone().unwrap(),
        size: server.size,
        sync: server.sync,
        slow_fsync: Duration::ZERO,
    });
    if uring {
        let (d, s) = (dev.clone(), server2.clone());
        std::thread::spawn(move || start_rings(d.as_raw_fd(), &s, depth));
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut hdr = [0u8; OUT_HEADER];
    put_u32(&mut hdr, 0, OUT_HEADER as u32);
    put_u32(&mut hdr, 4, FUSE_NOTIFY_RESEND as u32);
    // SAFETY: a 16-byte notification.
    let rc = unsafe { libc::write(dev.as_raw_fd(), hdr.as_ptr().cast(), OUT_HEADER) };
    println!("resent (write rc {rc})");
    std::io::stdout().flush().unwrap();
    dev_loop(dev, &server2, |_| {});
    std::process::exit(0);
}
