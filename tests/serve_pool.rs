//! `thinlayer serve` on a real pool, with the real clients: nbd-client's listing, nbdinfo's map
//! against the layer maps, qemu-img compare against `thinlayer export`, and multi-conn flush
//! semantics through libnbd. Each test skips with a message if its client is not installed.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

mod support;
use support::{have, tl, Server};

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A pool with an image layer (data, then holes) and a container on it.
fn fixture() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let img = dir.path().join("img.raw");
    let mut data = vec![0u8; 8 << 20];
    for (i, b) in data[..(2 << 20)].iter_mut().enumerate() {
        *b = (i % 251 + 1) as u8;
    }
    data[(6 << 20)..(6 << 20) + 65536].fill(0xcd);
    std::fs::write(&img, &data).unwrap();
    tl(&pool, &["init"]);
    tl(&pool, &["import", "image", img.to_str().unwrap()]);
    tl(&pool, &["create", "box", "--parent", "image"]);
    (dir, pool)
}

#[test]
fn nbd_client_lists_the_exports_over_tcp() {
    if !have("nbd-client") {
        eprintln!("SKIP: nbd-client not installed (CI installs it)");
        return;
    }
    let (_d, pool) = fixture();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut c = Command::new(support::bin())
        .arg("--pool")
        .arg(&pool)
        .args([
            "serve",
            "--no-keeper",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    for _ in 0..100 {
        let o = Command::new("nbd-client")
            .args(["-l", "127.0.0.1", &port.to_string()])
            .output()
            .unwrap();
        out = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
    assert!(out.lines().any(|l| l.starts_with("image:")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("box:")), "{out}");
}

#[test]
fn nbdinfo_map_and_qemu_img_compare_agree_with_the_store() {
    if !have("nbdinfo") || !have("qemu-img") || !have("qemu-io") {
        eprintln!("SKIP: nbdinfo/qemu-img/qemu-io not installed (CI installs them)");
        return;
    }
    let (d, pool) = fixture();
    let s = Server::start(&pool, &pool.with_extension("sock"));
    // In the container: new data in a hole, a zeroed range over the image's data (a whiteout),
    // and an unaligned write.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 4M 64k",
        "-c",
        "write -z 0 64k",
        "-c",
        "write -P 0x22 1000 3000",
        "-c",
        "flush",
        &s.uri("box"),
    ]));
    let map: serde_json::Value = serde_json::from_str(&run(Command::new("nbdinfo").args([
        "--map",
        "--json",
        &s.uri("box"),
    ])))
    .unwrap();
    let state_at = |off: u64| {
        let e = map
            .as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["offset"].as_u64().unwrap() <= off
                    && off < e["offset"].as_u64().unwrap() + e["length"].as_u64().unwrap()
            })
            .unwrap();
        e["type"].as_u64().unwrap()
    };
    assert_eq!(
        state_at(0),
        0,
        "the unaligned write made block 0 data again"
    );
    assert_eq!(
        state_at(8192),
        2,
        "whiteout over image data reads as zero, allocated"
    );
    assert_eq!(state_at(1 << 20), 0, "image data through the chain");
    assert_eq!(state_at(3 << 20), 3, "mapped nowhere: hole");
    assert_eq!(state_at(4 << 20), 0, "container data");
    assert_eq!(state_at(6 << 20), 0, "image data");
    let list = run(Command::new("nbdinfo").args(["--list", "--json", &s.uri("")]));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let exports = list["exports"].as_array().unwrap();
    let ro = |n: &str| {
        exports.iter().find(|e| e["export-name"] == n).unwrap()["is_read_only"]
            .as_bool()
            .unwrap()
    };
    assert!(ro("image") && !ro("box"));
    s.stop();

    let out = d.path().join("box.raw");
    tl(&pool, &["export", "box", out.to_str().unwrap()]);
    let s = Server::start(&pool, &pool.with_extension("sock"));
    let cmp = run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        out.to_str().unwrap(),
        &s.uri("box"),
    ]));
    assert!(cmp.contains("identical"), "{cmp}");
    s.stop();
}

#[test]
fn a_flush_on_one_connection_makes_writes_from_another_durable_and_visible() {
    let py = "/usr/bin/python3";
    let has_libnbd = Command::new(py)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_libnbd {
        eprintln!("SKIP: python3-libnbd not installed (CI installs it)");
        return;
    }
    let (_d, pool) = fixture();
    let s = Server::start(&pool, &pool.with_extension("sock"));
    let script = r#"
import nbd, sys
uri = sys.argv[1]
a, b, c = nbd.NBD(), nbd.NBD(), nbd.NBD()
for h in (a, b, c):
    h.connect_uri(uri)
assert a.can_multi_conn()
a.pwrite(b"\x5a" * 8192, 12288)
b.flush()
assert c.pread(8192, 12288) == b"\x5a" * 8192
try:
    nbd_ro = nbd.NBD()
    nbd_ro.set_strict_mode(0)  # let the server, not libnbd, refuse the write
    nbd_ro.connect_uri(uri.replace("/box?", "/image?"))
    nbd_ro.pwrite(b"x" * 512, 0)
    sys.exit("write to a read-only export succeeded")
except nbd.Error as e:
    assert "EPERM" in str(e) and "server does not support" not in str(e), e
print("ok")
"#;
    let out = run(Command::new(py).args(["-c", script, &s.uri("box")]));
    assert!(out.contains("ok"));
    // SIGKILL: nothing but the client's flush made the write durable.
    s.signal(libc::SIGKILL);
    drop(s);
    let store = thinlayer::Store::open_read_only(&pool).unwrap();
    let id = store.layer("box").unwrap().id;
    let mut buf = vec![0u8; 8192];
    store.read_layer(id, 12288, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a), "a flushed write was lost");
}

#[test]
fn a_full_pool_answers_enospc_keeps_its_data_and_takes_writes_again_after_a_trim() {
    if !have("qemu-io") {
        eprintln!("SKIP: qemu-io not installed (CI installs qemu-utils)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    tl(&pool, &["init", "--max-size", "4M"]);
    tl(&pool, &["create", "disk", "--size", "64M"]);
    let s = Server::start(&pool, &pool.with_extension("sock"));
    let io = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(s.uri("disk")).output().unwrap()
    };
    let o = io(&["write -P 0x61 0 1M", "flush"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Far more than the cap: the write fails with ENOSPC, the connection and data survive.
    let o = io(&["write -P 0x62 8M 8M"]);
    let err = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    let o = io(&["read -P 0x61 0 1M"]);
    assert!(
        o.status.success(),
        "earlier data damaged: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Give space back (discard, committed by flush); writes fit again.
    let o = io(&[
        "discard 8M 8M",
        "flush",
        "write -P 0x63 16M 1M",
        "flush",
        "read -P 0x63 16M 1M",
        "read -P 0x61 0 1M",
    ]);
    assert!(
        o.status.success()
            && !String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    s.stop();
    let check = tl(&pool, &["check", "--data"]);
    assert!(check.contains("clean"), "{check}");
}
