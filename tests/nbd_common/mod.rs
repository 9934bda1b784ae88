//! Shared by the NBD tests: an in-memory block device with a per-block allocation map, a
//! catalog of a few of them, an in-process server on a Unix socket in a temporary directory
//! (its log lines collected), and a raw protocol client for poking at the server message by
//! message. The client speaks through the server's own codec (`thinlayer::nbd::proto`); what
//! that codec lays out is pinned to the spec by its unit tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thinlayer::listen::Stop;
use thinlayer::log::Log;
use thinlayer::nbd::proto::*;
use thinlayer::nbd::{serve_unix, ServerConfig};
use thinlayer::volume::{BlockDevice, ExportCatalog, ExportInfo, Extent, ExtentState};
use thinlayer::{Error, Result};

pub const BLOCK: u64 = 4096;

struct Inner {
    data: Vec<u8>,
    states: Vec<ExtentState>,
}

/// A `Vec<u8>` with one allocation state per 4 KiB block: the model the NBD tests check
/// replies against.
pub struct MemDevice {
    name: String,
    size: u64,
    read_only: bool,
    inner: RwLock<Inner>,
    pub flushes: AtomicU64,
    /// Reads touching bytes at or past this offset fail with EIO.
    pub fail_reads_from: AtomicU64,
}

impl MemDevice {
    pub fn new(name: &str, size: u64, read_only: bool) -> MemDevice {
        let blocks = size.div_ceil(BLOCK) as usize;
        MemDevice {
            name: name.into(),
            size,
            read_only,
            inner: RwLock::new(Inner {
                data: vec![0; size as usize],
                states: vec![ExtentState::Hole; blocks],
            }),
            flushes: AtomicU64::new(0),
            fail_reads_from: AtomicU64::new(u64::MAX),
        }
    }

    /// Writes bypassing the read-only check, to prepare fixtures.
    pub fn fill(&self, offset: u64, data: &[u8]) {
        let mut inner = self.inner.write().unwrap();
        inner.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for b in blocks_touched(offset, data.len() as u64) {
            inner.states[b] = ExtentState::Data;
        }
    }

    pub fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        self.inner.read().unwrap().data[offset as usize..offset as usize + len].to_vec()
    }

    pub fn state_of_block(&self, block: usize) -> ExtentState {
        self.inner.read().unwrap().states[block]
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(format!(
                "device \"{}\" is read-only",
                self.name
            )));
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, whole_blocks: ExtentState) {
        let mut inner = self.inner.write().unwrap();
        inner.data[offset as usize..(offset + len) as usize].fill(0);
        let first = offset.div_ceil(BLOCK);
        let end = (offset + len) / BLOCK;
        for b in first..end {
            inner.states[b as usize] = whole_blocks;
        }
        // A block cut short by the end of the device counts as whole.
        if offset + len == self.size
            && !self.size.is_multiple_of(BLOCK)
            && offset <= self.size / BLOCK * BLOCK
        {
            inner.states[(self.size / BLOCK) as usize] = whole_blocks;
        }
    }
}

fn blocks_touched(offset: u64, len: u64) -> std::ops::Range<usize> {
    if len == 0 {
        return 0..0;
    }
    (offset / BLOCK) as usize..(offset + len).div_ceil(BLOCK) as usize
}

impl BlockDevice for MemDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn block_size(&self) -> u32 {
        BLOCK as u32
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        assert!(
            offset + buf.len() as u64 <= self.size,
            "edge let a bad read through"
        );
        if offset + buf.len() as u64 > self.fail_reads_from.load(SeqCst) {
            let e = std::io::Error::from_raw_os_error(libc::EIO);
            // Worded as the store words its faults, with a pool path and a block number: what
            // must reach the server's log and never the client.
            return Err(Error::io(
                format!(
                    "pool /srv/pools/secret.pool: device \"{}\": read at {offset} (pool block {})",
                    self.name,
                    offset / BLOCK
                ),
                e,
            ));
        }
        let inner = self.inner.read().unwrap();
        buf.copy_from_slice(&inner.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        assert!(
            offset + data.len() as u64 <= self.size,
            "edge let a bad write through"
        );
        self.check_writable()?;
        self.fill(offset, data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        assert!(offset + len <= self.size);
        self.check_writable()?;
        let state = if may_unmap {
            ExtentState::Hole
        } else {
            ExtentState::Zero
        };
        self.zero(offset, len, state);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        assert!(offset + len <= self.size);
        self.check_writable()?;
        self.zero(offset, len, ExtentState::Hole);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, SeqCst);
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        assert!(offset + len <= self.size);
        let inner = self.inner.read().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let b = at / BLOCK;
            let stop = ((b + 1) * BLOCK).min(end);
            let state = inner.states[b as usize];
            match out.last_mut() {
                Some(e) if e.state == state => e.len += stop - at,
                _ => out.push(Extent {
                    offset: at,
                    len: stop - at,
                    state,
                }),
            }
            at = stop;
        }
        Ok(out)
    }
}

pub struct MemCatalog {
    pub devices: Vec<Arc<MemDevice>>,
    pub flush_alls: AtomicU64,
}

impl MemCatalog {
    /// "disk": 64 MiB writable and empty. "ro": 4 MiB read-only, first half a pattern, second
    /// half holes. "odd": writable, size not a multiple of anything.
    pub fn standard() -> MemCatalog {
        let ro = MemDevice::new("ro", 4 << 20, true);
        ro.fill(0, &pattern(0, 2 << 20));
        MemCatalog::of(vec![
            MemDevice::new("disk", 64 << 20, false),
            ro,
            MemDevice::new("odd", (1 << 20) + 123, false),
        ])
    }

    pub fn of(devices: Vec<MemDevice>) -> MemCatalog {
        MemCatalog {
            devices: devices.into_iter().map(Arc::new).collect(),
            flush_alls: AtomicU64::new(0),
        }
    }

    pub fn device(&self, name: &str) -> &Arc<MemDevice> {
        self.devices.iter().find(|d| d.name == name).unwrap()
    }
}

impl ExportCatalog for MemCatalog {
    fn exports(&self) -> Result<Vec<ExportInfo>> {
        Ok(self
            .devices
            .iter()
            .map(|d| ExportInfo {
                name: d.name.clone(),
                size: d.size,
                read_only: d.read_only,
                description: format!("test device {}", d.name),
            })
            .collect())
    }
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>> {
        match self.devices.iter().find(|d| d.name == name) {
            Some(d) => Ok(d.clone()),
            None => Err(Error::NotFound(format!("no export \"{name}\""))),
        }
    }
    fn flush_all(&self) -> Result<()> {
        self.flush_alls.fetch_add(1, SeqCst);
        Ok(())
    }
}

/// Deterministic bytes that differ with position, so misplaced data shows.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            (x >> 56) as u8
        })
        .collect()
}

/// The lines a server logged, collected as they come.
#[derive(Clone, Default)]
pub struct LogLines(Arc<Mutex<Vec<String>>>);

impl LogLines {
    pub fn sink(&self) -> Log {
        let lines = self.0.clone();
        Log::to(move |_, line| lines.lock().unwrap().push(line.to_string()))
    }

    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// The first line containing every one of `parts`, waiting (up to 20 s) for it to come.
    pub fn wait_for(&self, parts: &[&str]) -> String {
        let start = Instant::now();
        loop {
            let found = self
                .all()
                .into_iter()
                .find(|l| parts.iter().all(|p| l.contains(p)));
            if let Some(line) = found {
                return line;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no log line with {parts:?} in {:#?}",
                self.all()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A server running in this process on a socket in its own temporary directory.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub catalog: Arc<MemCatalog>,
    pub stop: Arc<Stop>,
    /// What the server logged (unless the config passed in had a sink of its own).
    pub log: LogLines,
    thread: Option<JoinHandle<Result<()>>>,
}

impl TestServer {
    pub fn start() -> TestServer {
        TestServer::start_with(MemCatalog::standard(), ServerConfig::default())
    }

    /// Starts a server with `config`, its log lines going to `TestServer::log`.
    pub fn start_with(catalog: MemCatalog, config: ServerConfig) -> TestServer {
        let log = LogLines::default();
        let config = ServerConfig {
            log: log.sink(),
            ..config
        };
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let catalog = Arc::new(catalog);
        let stop = Arc::new(Stop::new());
        let (c, s) = (catalog.clone(), stop.clone());
        let thread = std::thread::spawn(move || serve_unix(&*c, listener, &config, &s));
        TestServer {
            dir,
            socket,
            catalog,
            stop,
            log,
            thread: Some(thread),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).unwrap()
    }

    /// Stops the server and returns what `serve` returned.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop.stop();
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("server thread panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A reply as the raw client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        handle: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        handle: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    /// A chunk's payload decoded; panics (failing the test) on a simple reply or a malformed
    /// chunk.
    pub fn chunk(&self) -> Chunk<'_> {
        match self {
            Reply::Chunk { kind, payload, .. } => Chunk::unpack(*kind, payload)
                .unwrap_or_else(|| panic!("malformed chunk of type {kind}: {payload:?}")),
            other => panic!("not a chunk: {other:?}"),
        }
    }
}

/// A protocol client that does exactly what it is told, for tests that misbehave on purpose.
pub struct RawClient {
    pub s: UnixStream,
    pub structured: bool,
    pub size: u64,
    pub flags: u16,
}

impl RawClient {
    /// Reads the greeting and answers with fixed-newstyle + no-zeroes.
    pub fn greet(s: UnixStream) -> UnixStream {
        let mut s = RawClient::greet_only(s);
        s.write_all(
            &ClientFlags {
                flags: CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES,
            }
            .pack(),
        )
        .unwrap();
        s
    }

    /// Reads the greeting and checks it; answers nothing.
    pub fn greet_only(s: UnixStream) -> UnixStream {
        let mut s = s;
        // A guard against a hang, not a latency bound: with a thousand connections each on
        // its own thread (nbd_hostile), a greeting took 20 s on a 2-core machine at load 5.
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut g = [0u8; Greeting::LEN];
        s.read_exact(&mut g).unwrap();
        let greeting = Greeting::unpack(&g).expect("an NBD fixed-newstyle greeting");
        assert_ne!(greeting.flags & FLAG_FIXED_NEWSTYLE, 0);
        s
    }

    pub fn send_option(s: &mut UnixStream, opt: u32, data: &[u8]) {
        s.write_all(&OptionHeader::message(opt, data)).unwrap();
    }

    /// One option reply: (option, reply type, data).
    pub fn option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; OptionReplyHeader::LEN];
        s.read_exact(&mut h).unwrap();
        let header = OptionReplyHeader::unpack(&h).expect("option reply magic");
        let mut data = vec![0; header.len as usize];
        s.read_exact(&mut data).unwrap();
        (header.option, header.kind, data)
    }

    /// Handshakes with NBD_OPT_GO, optionally negotiating structured replies and base:allocation.
    pub fn go(s: UnixStream, export: &str, structured: bool) -> RawClient {
        let mut s = RawClient::greet(s);
        if structured {
            RawClient::send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(RawClient::option_reply(&mut s).1, REP_ACK);
            let meta = MetaContextRequest {
                name: export,
                queries: vec![BASE_ALLOCATION],
            };
            RawClient::send_option(&mut s, OPT_SET_META_CONTEXT, &meta.pack());
            assert_eq!(RawClient::option_reply(&mut s).1, REP_META_CONTEXT);
            assert_eq!(RawClient::option_reply(&mut s).1, REP_ACK);
        }
        let go = InfoRequest {
            name: export,
            wanted: vec![],
        };
        RawClient::send_option(&mut s, OPT_GO, &go.pack());
        let (mut size, mut flags) = (0, 0);
        loop {
            let (opt, kind, data) = RawClient::option_reply(&mut s);
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_INFO => match Info::unpack(&data) {
                    Some(Info::Export { size: s, flags: f }) => (size, flags) = (s, f),
                    Some(_) => {}
                    None => panic!("malformed NBD_REP_INFO {data:?}"),
                },
                REP_ACK => break,
                other => panic!(
                    "GO {export:?} failed: {other:#x} {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        RawClient {
            s,
            structured,
            size,
            flags,
        }
    }

    pub fn send(&mut self, command: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        let r = Request {
            flags,
            command,
            handle,
            offset,
            len,
        };
        self.s.write_all(&r.pack()).unwrap();
    }

    pub fn reply(&mut self) -> Reply {
        let mut h = [0u8; ChunkHeader::LEN];
        let (magic, rest) = h.split_at_mut(ReplyHeader::MAGIC_LEN);
        self.s.read_exact(magic).unwrap();
        let magic: &[u8; ReplyHeader::MAGIC_LEN] = (&*magic).try_into().unwrap();
        let len = ReplyHeader::header_len(magic)
            .unwrap_or_else(|| panic!("bad reply magic {magic:02x?}"));
        self.s
            .read_exact(&mut rest[..len - ReplyHeader::MAGIC_LEN])
            .unwrap();
        match ReplyHeader::unpack(&h[..len]).expect("a reply header") {
            ReplyHeader::Simple(SimpleReply { error, handle }) => Reply::Simple { error, handle },
            ReplyHeader::Chunk(ChunkHeader {
                flags,
                kind,
                handle,
                len,
            }) => {
                let mut payload = vec![0; len as usize];
                self.s.read_exact(&mut payload).unwrap();
                Reply::Chunk {
                    flags,
                    kind,
                    handle,
                    payload,
                }
            }
        }
    }

    /// A simple-reply READ: the data, or the error number.
    pub fn read(&mut self, offset: u64, len: u32) -> std::result::Result<Vec<u8>, u32> {
        assert!(!self.structured);
        self.send(CMD_READ, 0, 7, offset, len);
        match self.reply() {
            Reply::Simple {
                error: 0,
                handle: 7,
            } => {
                let mut data = vec![0; len as usize];
                self.s.read_exact(&mut data).unwrap();
                Ok(data)
            }
            Reply::Simple { error, handle: 7 } => Err(error),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A WRITE (or any command carrying `data`) answered by a simple reply: its error number.
    pub fn command(&mut self, command: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> u32 {
        self.send(command, flags, 9, offset, len);
        self.s.write_all(data).unwrap();
        let reply = self.reply();
        match &reply {
            Reply::Simple { error, handle: 9 } => *error,
            Reply::Chunk { handle: 9, .. } => match reply.chunk() {
                Chunk::Error { error, .. } => error,
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.command(CMD_WRITE, 0, offset, data.len() as u32, data)
    }

    /// True once the server has closed the connection.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// A well-behaved client on its own connection that writes and reads back the last MiB of
/// "disk" until told to stop: hostile tests run it alongside to show others are unaffected.
pub struct Bystander {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Bystander {
    pub fn start(server: &TestServer) -> Bystander {
        let mut c = RawClient::go(server.connect(), "disk", false);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let base = c.size - (1 << 20);
            let mut rounds = 0u64;
            while !s.load(SeqCst) || rounds == 0 {
                let off = base + (rounds * 4096 * 7) % ((1 << 20) - 65536);
                let data = pattern(off ^ rounds, 65536);
                assert_eq!(c.write(off, &data), 0, "bystander write failed");
                assert_eq!(
                    c.read(off, 65536).expect("bystander read"),
                    data,
                    "bystander data"
                );
                rounds += 1;
            }
            rounds
        });
        Bystander {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the client and returns how many verified round trips it made.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, SeqCst);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("bystander saw wrong data or an error")
    }
}
