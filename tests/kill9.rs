//! kill -9 for real: `thinlayer serve` takes writes and flushes from libnbd, gets SIGKILLed at
//! random moments, and every restart must show (1) everything acknowledged before the last
//! acknowledged FLUSH/FUA, byte for byte, (2) for later writes, each 4 KiB sector holding its
//! content as of that flush or the content of one of those later writes — nothing else — and
//! (3) a pool that opens and that `check --data` calls clean.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;
use thinlayer::Store;

mod support;
use support::{tl, Server};

const BLOCKS: u64 = 4096; // a 16 MiB disk keeps each verification read short
const SECTOR: usize = 4096;
const ROUNDS: u64 = 24;

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

fn parse_log(text: &str, round: u64) -> (Vec<Write>, u64) {
    let mut writes = Vec::new();
    let mut flushed = 0;
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
            ["A", _] | [] => {}
            _ => panic!("bad driver log line {line:?}"),
        }
    }
    (writes, flushed)
}

#[test]
fn sigkill_at_random_moments_loses_nothing_flushed() {
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
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let (mut total_writes, mut total_flushes) = (0usize, 0u64);
    for round in 0..ROUNDS {
        let server = Server::start(&pool, &sock);
        let mut client = Command::new(py)
            .arg(driver)
            .arg(format!("nbd+unix:///disk?socket={}", sock.display()))
            .arg(&log)
            .arg(round.to_string())
            .arg(BLOCKS.to_string())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(150 + rng % 500));
        server.signal(libc::SIGKILL);
        drop(server);
        let st = client.wait().unwrap();
        assert!(st.success(), "driver failed in round {round}");

        let (writes, flushed) = parse_log(&std::fs::read_to_string(&log).unwrap(), round);
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
        drop(store);
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
        "kill -9: {ROUNDS} rounds, {total_writes} writes, flush points total {total_flushes}"
    );
}
