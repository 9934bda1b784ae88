//! kill -9 for real: `thinlayer serve` takes writes and flushes from libnbd and management
//! commands (create, commit, rm, import) through its control socket, gets SIGKILLed at random
//! moments, and every restart must show (1) everything acknowledged before the last
//! acknowledged FLUSH/FUA, byte for byte, (2) for later writes, each 4 KiB sector holding its
//! content as of that flush or the content of one of those later writes — nothing else —
//! (3) every management command acknowledged before the kill in effect, and every one of them
//! whole or not at all (an import is there complete, read-only and byte-equal to its image, or
//! not there), and (4) a pool that opens and that `check --data` calls clean.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thinlayer::Store;

mod support;
use support::{tl, Server};

const BLOCKS: u64 = 4096; // a 16 MiB disk keeps each verification read short
const SECTOR: usize = 4096;

fn python_with_libnbd() -> Option<&'static str> {
    ["/usr/bin/python3", "python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import nbd"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

struct Write {
    seq: u64,
    first: u64,
    n: u64,
    tag: Vec<u8>,
}

/// What sector `s` may hold after a crash, given the content before the round, the writes
/// begun in it, and the flush point.
fn candidates(before: &[u8], writes: &[Write], flushed: u64) -> Vec<Vec<u8>> {
    let mut at_flush = before.to_vec();
    let mut later = Vec::new();
    for w in writes {
        let content = w.tag.repeat(SECTOR / w.tag.len());
        if w.seq < flushed {
            at_flush = content;
        } else {
            later.push(content);
        }
    }
    let mut c = vec![at_flush];
    c.extend(later);
    c
}

/// The writes begun, the flush point (every write with a smaller seq was flushed) and the
/// acknowledgement point (every write with a smaller seq was acknowledged: the driver sends
/// one at a time).
fn parse_log(text: &str, round: u64) -> (Vec<Write>, u64, u64) {
    let mut writes = Vec::new();
    let (mut flushed, mut acked) = (0, 0);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["B", seq, off, n] => {
                let seq: u64 = seq.parse().unwrap();
                let mut tag = format!("r{round}w{seq}").into_bytes();
                tag.resize(16, b'.');
                writes.push(Write {
                    seq,
                    first: off.parse::<u64>().unwrap() / SECTOR as u64,
                    n: n.parse().unwrap(),
                    tag,
                });
            }
            ["F", seq] => flushed = seq.parse().unwrap(),
            ["A", seq] => acked = seq.parse::<u64>().unwrap() + 1,
            ["C"] | [] => {}
            _ => panic!("bad driver log line {line:?}"),
        }
    }
    (writes, flushed, acked)
}

/// What management commands the pool must reflect after a kill.
#[derive(Default)]
struct Managed {
    /// Layers whose create/import was acknowledged and no rm of them since.
    present: BTreeSet<String>,
    /// Acknowledged as committed (read-only).
    committed: BTreeSet<String>,
    /// Acknowledged as removed.
    removed: BTreeSet<String>,
    /// An rm was sent but not acknowledged (cut off by the kill): it may have happened.
    maybe_removed: BTreeSet<String>,
    /// Every name any command may have made.
    maybe: BTreeSet<String>,
    /// Imports begun (acknowledged or not): each must be whole or absent.
    imports: BTreeSet<String>,
    acked: usize,
}

/// Run management commands against the served pool until `stop`, in a fixed pattern, noting
/// what was acknowledged (exit 0). A command cut off by the kill fails; it claims nothing.
fn manage(pool: PathBuf, image: PathBuf, round: u64, stop: Arc<AtomicBool>) -> Managed {
    let mut m = Managed::default();
    let ok = |args: &[&str]| {
        Command::new(support::bin())
            .arg("--pool")
            .arg(&pool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let mut k = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let name = format!("m{round}-{k}");
        m.maybe.insert(name.clone());
        let acked = if k % 4 == 3 {
            m.imports.insert(name.clone());
            ok(&["import", &name, image.to_str().unwrap()])
        } else {
            ok(&["create", &name, "--size", "256K"])
        };
        if acked {
            m.present.insert(name.clone());
            m.acked += 1;
        }
        if k % 3 == 1 {
            let prev = format!("m{round}-{}", k - 1);
            if m.present.contains(&prev) && ok(&["commit", &prev]) {
                m.committed.insert(prev);
                m.acked += 1;
            }
        }
        if k % 5 == 4 {
            let old = format!("m{round}-{}", k - 2);
            if m.present.contains(&old) {
                if ok(&["rm", &old]) {
                    m.present.remove(&old);
                    m.removed.insert(old);
                    m.acked += 1;
                } else {
                    m.maybe_removed.insert(old);
                }
            }
        }
        k += 1;
    }
    m
}

/// Hold the restarted pool against what the management commands were told.
fn verify_managed(store: &Store, m: &Managed, image: &[u8], round: u64) {
    let layers: BTreeSet<String> = store.layers().into_iter().map(|l| l.name).collect();
    for name in m.present.difference(&m.maybe_removed) {
        assert!(
            layers.contains(name),
            "round {round}: acknowledged {name} is gone"
        );
    }
    for name in &m.removed {
        assert!(
            !layers.contains(name),
            "round {round}: removed {name} is back"
        );
    }
    for name in &m.committed {
        if layers.contains(name) {
            assert!(
                !store.layer(name).unwrap().writable,
                "round {round}: committed {name} is writable again"
            );
        }
    }
    for name in &m.imports {
        if let Ok(l) = store.layer(name) {
            assert!(
                !l.writable,
                "round {round}: import {name} left half-made (writable)"
            );
            let mut got = vec![0u8; image.len()];
            store.read_layer(l.id, 0, &mut got).unwrap();
            assert!(
                got == image,
                "round {round}: import {name} is not the whole image"
            );
        }
    }
    for name in &layers {
        let known = name == "disk"
            || name.starts_with('m') && !name.starts_with(&format!("m{round}-"))
            || m.maybe.contains(name);
        assert!(known, "round {round}: layer {name} appeared from nowhere");
    }
}

fn write_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let image: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 253) as u8 + 1).collect();
    let path = dir.join("small.img");
    std::fs::write(&path, &image).unwrap();
    (path, image)
}

#[test]
fn sigkill_at_random_moments_loses_nothing_flushed() {
    sigkill_rounds(Keeper::Without, 24);
}

/// The same with the keeper (a default `serve`): the SIGKILL hits the server, the keeper's
/// next server replays the crash journal (into a lazy open: the load is held as above), and
/// every write *acknowledged* before the kill, flushed or not, must be there, as every
/// acknowledged management command; the next server is then stopped gracefully and the
/// pool held against the model as above. The driver flushes rarely here, so that most
/// kills find acknowledged writes that only the journal holds.
#[test]
fn sigkill_of_a_kept_server_loses_nothing_acknowledged() {
    sigkill_rounds(Keeper::With, 8);
}

#[derive(Clone, Copy, PartialEq)]
enum Keeper {
    Without,
    With,
}

/// The two tests run one after the other: each opens its pool in this process (the pool lock
/// is a flock) and spawns processes, and a child forked by one test's thread holds a copy of
/// the other's lock descriptor until it execs, so a `check` right after the other's `drop`
/// could find the pool "in use by another process" (seen once, at load 5-6).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sigkill_rounds(keeper: Keeper, rounds: u64) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(py) = python_with_libnbd() else {
        eprintln!("SKIP sigkill test: python3-libnbd not installed (CI installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let sock = dir.path().join("s.sock");
    let log = dir.path().join("driver.log");
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kill9_driver.py");
    tl(&pool, &["init"]);
    tl(
        &pool,
        &[
            "create",
            "disk",
            "--size",
            &(BLOCKS * SECTOR as u64).to_string(),
        ],
    );
    let mut disk = vec![0u8; BLOCKS as usize * SECTOR];
    let (image_path, image) = write_image(dir.path());
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let (mut total_writes, mut total_flushes, mut total_managed) = (0usize, 0u64, 0usize);
    let (mut sums_rounds, mut replays) = (0, 0);
    let serve_log = dir.path().join("serve.log");
    let args: &[&str] = match keeper {
        Keeper::Without => &[],
        // No background commit: only flushes and management commands commit.
        Keeper::With => &["--keeper", "--commit-interval", "0"],
    };
    for round in 0..rounds {
        // Every other round the pool opens from a checkpoint with maps, lazily: the load is
        // held open (a debug build's test hook) for about as long as the round runs, so the
        // writes, flushes and the kill come both before and after its completion.
        let server = Server::start_env(
            &pool,
            &sock,
            args,
            std::fs::File::create(&serve_log).unwrap(),
            &[("THINLAYER_TEST_HOLD_LOAD_MS", Path::new("350"))],
        );
        let _kill = support::KillServing(&pool);
        let stop = Arc::new(AtomicBool::new(false));
        let manager = {
            let (pool, image, stop) = (pool.clone(), image_path.clone(), stop.clone());
            std::thread::spawn(move || manage(pool, image, round, stop))
        };
        let _ = std::fs::remove_file(&log);
        let mut client = Command::new(py)
            .arg(driver)
            .arg(format!("nbd+unix:///disk?socket={}", sock.display()))
            .arg(&log)
            .arg(round.to_string())
            .arg(BLOCKS.to_string())
            .args(match keeper {
                Keeper::Without => &[][..],
                Keeper::With => &["0.01", "0.01"],
            })
            .spawn()
            .unwrap();
        // The kill must find the driver connected: on a loaded machine it may take longer
        // than the shortest wait below, and a round that never connected tests nothing.
        for _ in 0..2000 {
            if std::fs::read_to_string(&log).is_ok_and(|t| t.starts_with("C\n")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(150 + rng % 500));
        // Commands already started run into the kill; none starts after it.
        stop.store(true, Ordering::SeqCst);
        if keeper == Keeper::With {
            let (pid, kept) = support::serving(&pool).expect("status names the server");
            assert!(kept.is_some_and(|k| k != pid), "round {round}: no keeper");
            // SAFETY: killing the server this test started, by the pid it reported.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            support::wait_gone(pid);
        } else {
            server.signal(libc::SIGKILL);
        }
        let managed = manager.join().unwrap();
        total_managed += managed.acked;
        let st = client.wait().unwrap();
        assert!(st.success(), "driver failed in round {round}");
        if keeper == Keeper::With {
            // The keeper's next server replayed the journal: stop it as a host would.
            wait_for_next_server(&pool, round);
            assert!(
                support::stop_serving(&pool),
                "round {round}: nothing served"
            );
            let text = std::fs::read_to_string(&serve_log).unwrap_or_default();
            replays += text.contains("of the crash journal") as usize;
        }
        drop(server);

        let (writes, flushed, acked) = parse_log(&std::fs::read_to_string(&log).unwrap(), round);
        // With the keeper, what was acknowledged outlives the kill through its journal.
        let flushed = match keeper {
            Keeper::Without => flushed,
            Keeper::With => flushed.max(acked),
        };
        assert!(
            !writes.is_empty(),
            "round {round}: the driver wrote nothing"
        );
        total_writes += writes.len();
        total_flushes += flushed;
        let mut by_sector: HashMap<u64, Vec<Write>> = HashMap::new();
        for w in writes {
            for s in w.first..w.first + w.n {
                by_sector.entry(s).or_default().push(Write {
                    tag: w.tag.clone(),
                    ..w
                });
            }
        }
        let store = Store::open(&pool, "kill9 test verification").unwrap();
        let id = store.layer("disk").unwrap().id;
        let mut now = vec![0u8; disk.len()];
        store.read_layer(id, 0, &mut now).unwrap();
        verify_managed(&store, &managed, &image, round);
        // Every other round the next server starts from a checkpoint whose map runs keep
        // their crcs in checksum pages (FORMAT.md §5.6), and is killed serving it.
        if round % 2 == 0 {
            store.checkpoint().unwrap();
        }
        drop(store);
        let storage = thinlayer::pool::FileStorage::new(std::fs::File::open(&pool).unwrap());
        let (slots, _) = thinlayer::pool::meta::read_superblocks(&storage).unwrap();
        let rec = thinlayer::pool::meta::load(&storage, &slots[0]).unwrap();
        sums_rounds += (!rec.sums_pages.is_empty()) as usize;
        for (s, ws) in &by_sector {
            let r = *s as usize * SECTOR..(*s as usize + 1) * SECTOR;
            let ok = candidates(&disk[r.clone()], ws, flushed);
            assert!(
                ok.contains(&now[r.clone()].to_vec()),
                "round {round}: sector {s} holds {:?}..., expected one of {:?}",
                String::from_utf8_lossy(&now[r.start..r.start + 16]),
                ok.iter()
                    .map(|c| String::from_utf8_lossy(&c[..16]).into_owned())
                    .collect::<Vec<_>>()
            );
        }
        // Sectors no write touched must not change at all.
        for s in 0..BLOCKS {
            if !by_sector.contains_key(&s) {
                let r = s as usize * SECTOR..(s as usize + 1) * SECTOR;
                assert!(
                    disk[r.clone()] == now[r],
                    "round {round}: untouched sector {s} changed"
                );
            }
        }
        disk = now;
        let check = tl(&pool, &["check", "--data"]);
        assert!(check.contains("clean"), "round {round}: {check}");
    }
    eprintln!(
        "kill -9: {rounds} rounds, {total_writes} writes, durable points total {total_flushes} (flushes, or with the keeper acknowledgements), {total_managed} management commands acknowledged, {sums_rounds} rounds on checksum pages, {replays} crash journals replayed"
    );
    assert!(total_managed > 0, "no management command ever completed");
    assert!(
        sums_rounds >= rounds as usize / 4,
        "only {sums_rounds} rounds ended on a checkpoint with checksum pages"
    );
    // Each kill finds an acknowledged write not yet flushed unless a flush or a command's
    // commit came after the last write (1 write in 100 flushes or writes with FUA).
    assert!(
        keeper == Keeper::Without || replays > 0,
        "none of {rounds} kills left a journal to replay"
    );
}

/// Waits until the keeper has started the next server after a kill (the pool's `status`
/// answers with a server): 60 s at most.
fn wait_for_next_server(pool: &Path, round: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while support::serving(pool).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "round {round}: the keeper started no server in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
