//! Shared by the fuzz targets and the seed-corpus generator: valid pool images built in-process
//! (the starting points `pool_open` mutates), a page classifier so mutations land on structures
//! rather than zeros, and an in-process NBD server on a Unix socket for the protocol targets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thinlayer::format::checksum::{self, Kind};
use thinlayer::format::PAGE_SIZE;
use thinlayer::listen::Stop;
use thinlayer::nbd::proto::*;
use thinlayer::nbd::{serve_unix, ServerConfig};
use thinlayer::pool::{MemStorage, Storage};
use thinlayer::volume::StoreExports;
use thinlayer::{CreateOptions, Store};

pub const LAYER_SIZE: u64 = 256 * 1024;

/// A recognisable, non-zero pattern for byte `i` of layer `tag`.
pub fn pattern(tag: u8, i: u64) -> u8 {
    (i as u8).wrapping_mul(31) ^ tag ^ ((i >> 8) as u8) | 1
}

fn write_pattern(s: &Store, layer: &str, tag: u8, offset: u64, len: u64) {
    let id = s.layer(layer).unwrap().id;
    let data: Vec<u8> = (offset..offset + len).map(|i| pattern(tag, i)).collect();
    s.write_layer(id, offset, &data).unwrap();
}

/// A small pool: a committed base, a child with copy-on-write data and a whiteout, a removed
/// layer, several commits (log pages only, no checkpoint).
pub fn small_pool(block_size: u32) -> Vec<u8> {
    let storage = Arc::new(MemStorage::new());
    let s = Store::create_in(
        storage.clone(),
        &CreateOptions {
            block_size,
            max_size: None,
        },
    )
    .unwrap();
    populate(&s);
    drop(s);
    storage.snapshot()
}

fn populate(s: &Store) {
    s.create_layer("base", None, Some(LAYER_SIZE)).unwrap();
    write_pattern(s, "base", 1, 0, 64 * 1024);
    write_pattern(s, "base", 2, 128 * 1024, 8192 + 100);
    s.flush().unwrap();
    s.commit_layer("base").unwrap();
    s.create_layer("app", Some("base"), None).unwrap();
    write_pattern(s, "app", 3, 4096, 4096);
    s.flush().unwrap();
    let app = s.layer("app").unwrap().id;
    s.zero_layer(app, 16384, 8192, false).unwrap();
    s.create_layer("scratch", None, Some(LAYER_SIZE)).unwrap();
    write_pattern(s, "scratch", 4, 0, 4096);
    s.flush().unwrap();
    s.remove_layer("scratch").unwrap();
    write_pattern(s, "app", 5, 200 * 1024, 3000);
    s.flush().unwrap();
}

/// A pool whose log grew past the checkpoint threshold: a checkpoint, then a short log.
pub fn checkpointed_pool() -> Vec<u8> {
    let storage = Arc::new(MemStorage::new());
    let s = Store::create_in(storage.clone(), &CreateOptions::default()).unwrap();
    populate(&s);
    let app = s.layer("app").unwrap().id;
    // Every flush appends at least one log page; past 1024 pages the commit checkpoints.
    for i in 0..1030u64 {
        s.write_layer(app, (i % 8) * 4096 + 40 * 1024, &[i as u8 | 1; 512])
            .unwrap();
        s.flush().unwrap();
    }
    write_pattern(&s, "app", 6, 100 * 1024, 4096);
    s.flush().unwrap();
    drop(s);
    storage.snapshot()
}

/// What a 4 KiB page of a pool image holds, judged from its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    Superblock,
    Meta(Kind),
    Data,
}

/// The non-zero pages of an image and what each is.
pub fn classify(image: &[u8]) -> Vec<(u64, PageKind)> {
    let mut out = Vec::new();
    for (n, p) in image.chunks(PAGE_SIZE).enumerate() {
        if p.iter().all(|&b| b == 0) {
            continue;
        }
        let kind = if n < 2 {
            PageKind::Superblock
        } else {
            meta_kind(p).map_or(PageKind::Data, PageKind::Meta)
        };
        out.push((n as u64, kind));
    }
    out
}

fn meta_kind(p: &[u8]) -> Option<Kind> {
    if p.len() < PAGE_SIZE {
        return None;
    }
    [Kind::CheckpointPage, Kind::LogPage, Kind::ChecksumPage]
        .into_iter()
        .find(|&k| checksum::verify(k, p).is_ok())
}

/// Reseal the checksum of a structure after a mutation, so decoding gets past the crc and the
/// fields themselves are what is tested.
pub fn reseal(image: &mut [u8], page: u64, kind: PageKind) {
    let structure = &mut image[page as usize * PAGE_SIZE..];
    match kind {
        PageKind::Superblock => checksum::seal(Kind::Superblock, structure),
        PageKind::Meta(k) => checksum::seal(k, structure),
        PageKind::Data => {}
    }
}

/// An NBD server over a store in memory with a read-only "base" and a writable child "app".
pub struct NbdServer {
    pub socket: PathBuf,
    pub store: Arc<Store>,
}

static STOP: Stop = Stop::new();

/// The server's accept thread, joined at exit (`stop_server`).
static SERVE_THREAD: Mutex<Option<JoinHandle<()>>> = Mutex::new(None);

/// How many threads the process runs between inputs: libFuzzer's own, the main thread and the
/// server's accept thread. Every connection thread has ended when the count is back to it.
static IDLE_THREADS: OnceLock<usize> = OnceLock::new();

/// At process exit, before LeakSanitizer's check (which `atexit` registered first, so it runs
/// last): stop the server and join its thread, which joins every connection thread. No thread
/// of ours is still running, or half-way through its thread-local destructors, when the leak
/// check looks (an exiting thread's `__cxa_thread_atexit_impl` records would show as leaks).
extern "C" fn stop_server() {
    STOP.stop();
    let thread = SERVE_THREAD
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(t) = thread {
        let _ = t.join();
    }
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

pub fn nbd_server() -> &'static NbdServer {
    static SERVER: OnceLock<NbdServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        // libFuzzer's main does not ignore SIGPIPE as Rust's does; a closed socket must be an
        // error, not the end of the process.
        // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let storage = Arc::new(MemStorage::from_bytes(small_pool(4096)));
        let store = Arc::new(Store::open_in(storage as Arc<dyn Storage>, true).unwrap());
        let dir = std::env::temp_dir().join(format!("thinlayer-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let exports = StoreExports {
            store: store.clone(),
            only: Vec::new(),
        };
        let config = ServerConfig {
            handshake_timeout: Some(Duration::from_secs(5)),
            workers_per_connection: 2,
            ..ServerConfig::default()
        };
        let before = thread_count();
        let thread = std::thread::spawn(move || {
            let _ = serve_unix(&exports, listener, &config, &STOP);
        });
        *SERVE_THREAD.lock().unwrap() = Some(thread);
        IDLE_THREADS.set(before + 1).unwrap();
        // SAFETY: `stop_server` is an `extern "C" fn()` that touches only statics.
        let registered = unsafe { libc::atexit(stop_server) };
        assert_eq!(registered, 0, "atexit(stop_server) failed");
        NbdServer { socket, store }
    })
}

/// Wait until every connection thread the server started has ended (the server closes a
/// connection before its thread has finished): an input leaves no thread behind it, so the
/// next input and the leak checks find the process as the last input left it.
fn wait_for_connection_threads() {
    let idle = *IDLE_THREADS.get().expect("the fuzz server runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while thread_count() > idle {
        assert!(
            Instant::now() < deadline,
            "a connection thread outlived its connection by 20 s"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Connect, send `input` (then end the write side), and read until the server closes the
/// connection; then wait for the connection's thread to end. A server that keeps the
/// connection open after the client is done is a hang.
pub fn exchange(server: &NbdServer, input: Vec<u8>) -> Vec<u8> {
    let mut s = UnixStream::connect(&server.socket).expect("connect to the fuzz server");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    // Written from another thread: the server may answer while we still send.
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&input);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if out.len() < 1 << 20 {
                    out.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("server neither answered nor closed the connection: {e}"),
        }
    }
    writer.join().unwrap();
    drop(s);
    wait_for_connection_threads();
    out
}

/// The client half of a fixed-newstyle handshake that ends in NBD_OPT_GO for `export`.
pub fn handshake_bytes(export: &str, structured: bool, allocation: bool) -> Vec<u8> {
    let mut b = ClientFlags {
        flags: CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES,
    }
    .pack()
    .to_vec();
    if structured {
        b.extend_from_slice(&OptionHeader::message(OPT_STRUCTURED_REPLY, &[]));
    }
    if allocation {
        let meta = MetaContextRequest {
            name: export,
            queries: vec![BASE_ALLOCATION],
        };
        b.extend_from_slice(&OptionHeader::message(OPT_SET_META_CONTEXT, &meta.pack()));
    }
    let go = InfoRequest {
        name: export,
        wanted: vec![],
    };
    b.extend_from_slice(&OptionHeader::message(OPT_GO, &go.pack()));
    b
}

/// Point a send stream's header at the parent chain ID `chain` (when the input is long enough
/// to have a header), so a mutated stream still finds the harness's parent.
pub fn reparent_stream(stream: &mut [u8], chain: [u8; 32]) {
    use thinlayer::format::stream::{header, Header};
    let Some(h) = stream.get(..header::LEN) else {
        return;
    };
    let Ok(mut h) = Header::unpack(h.try_into().unwrap()) else {
        return;
    };
    h.parent_chain_id = chain;
    stream[..header::LEN].copy_from_slice(&h.pack());
}

/// Reseal a send stream after a mutation: the first end record found by walking the record
/// headers gets the digest of everything before it, and in a version-2 stream everything after
/// it becomes the padding, index and footer its records make (docs/STREAM.md §5), so decoding
/// gets past the hashes and the rules behind them are what is tested. Input without such a
/// record is left as it is.
pub fn reseal_stream(stream: &mut Vec<u8>) {
    use thinlayer::format::stream::{self as fmt, End, Header};
    use thinlayer::stream::index::IndexBuilder;
    let mut index = IndexBuilder::default();
    let mut pos = fmt::header::LEN;
    while pos + fmt::record::LEN <= stream.len() {
        let rh: &[u8; fmt::record::LEN] = stream[pos..pos + fmt::record::LEN].try_into().unwrap();
        let (tag, len) = fmt::unpack_record(rh);
        let payload = pos + fmt::record::LEN;
        let body = usize::try_from(len)
            .ok()
            .and_then(|l| payload.checked_add(l))
            .filter(|&e| e <= stream.len())
            .map(|e| &stream[payload..e]);
        match (tag, body) {
            // A record ending past 2^64 is refused by the decoder before its index entry
            // would matter; the index cannot describe it.
            (fmt::TAG_DATA, Some(b))
                if b.len() >= 8
                    && fmt::run::OFFSET
                        .get(&b[..8])
                        .checked_add(b.len() as u64 - 8)
                        .is_some() =>
            {
                // The stream's own hash is not what this target checks.
                let mut stream_hash = thinlayer::format::sha256::Sha256::new();
                index.data(
                    fmt::run::OFFSET.get(&b[..8]),
                    payload as u64 + 8,
                    &b[8..],
                    &mut stream_hash,
                )
            }
            (fmt::TAG_ZERO, Some(b)) if b.len() == fmt::run::LEN => {
                let (o, l) = fmt::unpack_run(b);
                index.zero(o, l);
            }
            _ => {}
        }
        if tag == fmt::TAG_END && len == fmt::end::LEN as u64 {
            let end_at = payload + fmt::end::LEN;
            if end_at <= stream.len() {
                let p: &[u8; fmt::end::LEN] = stream[payload..end_at].try_into().unwrap();
                let mut end = End::unpack(p);
                end.digest = thinlayer::stream::Digest::sha256(&stream[..pos]).0;
                stream[payload..end_at].copy_from_slice(&end.pack());
                let header = Header::unpack(stream[..fmt::header::LEN].try_into().unwrap());
                if let Some(h) = header.ok().filter(|h| h.version >= 2) {
                    let mut hash = thinlayer::format::sha256::Sha256::new();
                    hash.update(&stream[..end_at]);
                    let tail = index.tail(&h, &hash);
                    stream.truncate(end_at);
                    stream.extend_from_slice(&tail);
                }
            }
            return;
        }
        match usize::try_from(len)
            .ok()
            .and_then(|l| payload.checked_add(l))
        {
            Some(next) => pos = next,
            None => return,
        }
    }
}

/// Whether a send stream holds a record of a kind this version does not know, before its end
/// record. Readers skip such records by design (docs/STREAM.md), so a stream holding one is
/// accepted without being the canonical form the encoder writes.
pub fn has_unknown_record(stream: &[u8]) -> bool {
    use thinlayer::format::stream as fmt;
    let mut pos = fmt::header::LEN;
    while pos + fmt::record::LEN <= stream.len() {
        let rh: &[u8; fmt::record::LEN] = stream[pos..pos + fmt::record::LEN].try_into().unwrap();
        let (tag, len) = fmt::unpack_record(rh);
        match tag {
            fmt::TAG_END => return false,
            fmt::TAG_DATA | fmt::TAG_ZERO => {}
            _ => return true,
        }
        match usize::try_from(len)
            .ok()
            .and_then(|l| (pos + fmt::record::LEN).checked_add(l))
        {
            Some(next) => pos = next,
            None => return false,
        }
    }
    false
}
