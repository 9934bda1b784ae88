//! The `thinlayer` binary as users run it: images made by mkfs.ext4, containers, accounting,
//! and every error path (a clear message, and a pool that `check` still calls clean).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod support;
use support::{data_ranges, have};

struct Pool {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Pool {
    fn new() -> Pool {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.pool");
        Pool { dir, path }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_thinlayer"))
            .arg("--pool")
            .arg(&self.path)
            .args(args)
            .output()
            .unwrap()
    }

    /// Run, expect success, return stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "thinlayer {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Run, expect failure, return stderr (which must name what went wrong).
    fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            !o.status.success(),
            "thinlayer {args:?} succeeded but should fail"
        );
        let err = String::from_utf8(o.stderr).unwrap();
        // Our errors and clap's argument errors both lead with "error:".
        assert!(err.contains("error: "), "unclear error: {err}");
        err
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn assert_clean(&self) {
        let out = self.ok(&["check", "--data"]);
        assert!(out.contains("clean"), "check not clean: {out}");
    }

    fn layers(&self) -> Vec<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(&self.ok(&["ls", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    fn layer(&self, name: &str) -> serde_json::Value {
        self.layers()
            .into_iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("no layer {name}"))
    }
}

/// An ext4 image of `size` populated from a directory with a few files.
fn make_ext4(dir: &Path, img: &Path, size: &str) {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(root.join("etc/hostname"), "thinlayer-test\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("usr/bin/app"), &big).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&root)
        .arg(img)
        .arg(size)
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 failed");
}

fn blocks_differing(a: &[u8], b: &[u8], bs: usize) -> usize {
    a.chunks(bs)
        .zip(b.chunks(bs))
        .filter(|(x, y)| x != y)
        .count()
}

#[test]
fn ext4_image_round_trips_byte_identical_and_fsck_clean() {
    if !have("mkfs.ext4") || !have("e2fsck") {
        eprintln!("SKIP: mkfs.ext4/e2fsck not installed (CI installs e2fsprogs)");
        return;
    }
    let p = Pool::new();
    let img = p.file("base.img");
    make_ext4(p.dir.path(), &img, "64M");
    p.ok(&["init"]);
    let out = p.ok(&["import", "acme/my-base-image:1.0", img.to_str().unwrap()]);
    assert!(out.contains("imported"), "{out}");
    let exported = p.file("out.img");
    p.ok(&[
        "export",
        "acme/my-base-image:1.0",
        exported.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(&img).unwrap(),
        std::fs::read(&exported).unwrap()
    );
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&exported)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    // Sparse out: the exported file occupies about what the layer stores, not 64 MiB.
    use std::os::unix::fs::MetadataExt;
    let on_disk = std::fs::metadata(&exported).unwrap().blocks() * 512;
    let stored = p.layer("acme/my-base-image:1.0")["size"].as_u64().unwrap();
    assert!(
        on_disk <= stored + (1 << 20),
        "export not sparse: {on_disk} vs {stored}"
    );
    assert!(stored < 32 << 20, "import stored zeros: {stored}");
    p.assert_clean();
}

#[test]
fn five_containers_cost_nothing_and_show_the_image_virtual_size() {
    if !have("mkfs.ext4") {
        eprintln!("SKIP: mkfs.ext4 not installed (CI installs e2fsprogs)");
        return;
    }
    let p = Pool::new();
    let img = p.file("base.img");
    make_ext4(p.dir.path(), &img, "32M");
    p.ok(&["init"]);
    p.ok(&["import", "img", img.to_str().unwrap()]);
    let image_size = p.layer("img")["size"].as_u64().unwrap();
    assert!(image_size > 0);
    // The pool's own count of the blocks it uses, not the host's `file_allocated` (st_blocks):
    // that one also counts the host filesystem's extent-tree blocks, and an import that writes
    // with O_DIRECT beside other tests' allocations leaves the pool file fragmented enough that
    // one more extent sometimes costs ext4 a tree block (seen in 3 runs of 8 of this file).
    let before: u64 = serde_json::from_str::<serde_json::Value>(&p.ok(&["df", "--json"])).unwrap()
        ["allocated"]
        .as_u64()
        .unwrap();
    for i in 0..5 {
        p.ok(&["create", &format!("c{i}"), "--parent", "img"]);
    }
    for i in 0..5 {
        let l = p.layer(&format!("c{i}"));
        assert_eq!(l["size"], 0);
        assert_eq!(l["virtual_size"].as_u64().unwrap(), image_size);
        assert_eq!(l["parent"], "img");
        assert_eq!(l["writable"], true);
        assert_eq!(l["disk_size"].as_u64().unwrap(), 32 << 20);
        assert!(l["created"].as_str().unwrap().ends_with('Z'));
    }
    let df: serde_json::Value = serde_json::from_str(&p.ok(&["df", "--json"])).unwrap();
    let grown = df["allocated"].as_u64().unwrap() - before;
    assert!(
        grown <= 5 * 4096,
        "five containers grew the pool by {grown} bytes"
    );
    assert_eq!(df["sharing_saves"].as_u64().unwrap(), 5 * image_size);
    let hist: serde_json::Value =
        serde_json::from_str(&p.ok(&["history", "c3", "--json"])).unwrap();
    let names: Vec<&str> = hist
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["c3", "img"]);
    let table = p.ok(&["ls"]);
    assert!(
        table.starts_with("ID") && table.contains("VIRTUAL SIZE"),
        "{table}"
    );
    p.assert_clean();
}

#[test]
fn child_import_stores_only_changed_blocks() {
    let p = Pool::new();
    let base: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 253) as u8).collect();
    let mut modified = base.clone();
    // Three separate 4 KiB blocks change, one of them only by a byte; one block becomes zeros.
    modified[10] ^= 0xff;
    modified[5 * 4096 + 100..5 * 4096 + 200].fill(7);
    modified[(1 << 20) + 4095] = 0;
    modified[2 << 20..(2 << 20) + 4096].fill(0);
    let (a, b) = (p.file("a.img"), p.file("b.img"));
    std::fs::write(&a, &base).unwrap();
    std::fs::write(&b, &modified).unwrap();
    p.ok(&["init"]);
    p.ok(&["import", "base", a.to_str().unwrap()]);
    p.ok(&["import", "child", b.to_str().unwrap(), "--parent", "base"]);
    let changed = blocks_differing(&base, &modified, 4096);
    assert_eq!(changed, 4);
    // The zeroed block is a whiteout: no data stored for it.
    assert_eq!(p.layer("child")["size"].as_u64().unwrap(), 3 * 4096);
    let out = p.file("child.out");
    p.ok(&["export", "child", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), modified);
    p.assert_clean();
}

/// Pages of the file at `path` that the page cache holds.
fn cached_pages(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    thinlayer::pool::storage::cached_pages(&f, 0, f.metadata().unwrap().len()).unwrap()
}

/// An export reads the pool's cached blocks from the cache and the rest around it, packing
/// the data extents on both sides of a hole into one request: whatever the cache holds, the
/// image is the same, byte for byte and hole for hole. A chain (a child changing, zeroing and
/// adding blocks over its parent) of 1 MiB extents and single blocks between holes, exported
/// with the pool uncached, cached in every other 256 KiB, and cached whole.
#[test]
fn an_export_is_the_same_whatever_part_of_the_pool_is_cached() {
    use std::os::unix::io::AsRawFd;
    // In the target directory, not /tmp: where /tmp is tmpfs, nothing can be uncached.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = Pool {
        path: dir.path().join("test.pool"),
        dir,
    };
    let mib = 1usize << 20;
    let mut base = vec![0u8; 24 * mib];
    for (m, chunk) in base.chunks_mut(mib).enumerate().filter(|(m, _)| m % 3 != 1) {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = ((m * 7 + i / 4096) % 251 + 1) as u8;
        }
    }
    let mut child = base.clone();
    child[mib + 8192..mib + 12288].fill(0x5a); // one block in a hole of the base
    child[3 * mib..3 * mib + 65536].fill(0); // a whiteout over the base's data
    child[6 * mib + 4096..6 * mib + 8192].fill(0xa5); // a changed block
    let (a, b) = (p.file("base.img"), p.file("child.img"));
    std::fs::write(&a, &base).unwrap();
    std::fs::write(&b, &child).unwrap();
    p.ok(&["init"]);
    p.ok(&["import", "base", a.to_str().unwrap()]);
    p.ok(&["import", "child", b.to_str().unwrap(), "--parent", "base"]);
    let pool = std::fs::File::open(&p.path).unwrap();
    pool.sync_all().unwrap();
    let pages = pool.metadata().unwrap().len() / 4096;
    let drop_cache = || {
        // SAFETY: advice on a valid descriptor: drop the pool's (clean, synced) cached pages.
        unsafe { libc::posix_fadvise(pool.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    };
    let export = |label: &str| {
        let out = p.file(label);
        p.ok(&["export", "child", out.to_str().unwrap()]);
        let bytes = std::fs::read(&out).unwrap();
        assert!(bytes == child, "the export with the pool {label} differs");
        data_ranges(&out)
    };
    drop_cache();
    assert_eq!(cached_pages(&p.path), 0, "the pool is uncached");
    let uncached = export("uncached");
    // SAFETY: advice on a valid descriptor: no readahead, only what is read here is cached.
    unsafe { libc::posix_fadvise(pool.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let mut piece = vec![0u8; 256 << 10];
    for at in (0..pages * 4096).step_by(512 << 10) {
        let _ = std::os::unix::fs::FileExt::read_at(&pool, &mut piece, at).unwrap();
    }
    let cached = cached_pages(&p.path);
    assert!(
        cached > 0 && cached < pages,
        "{cached} of {pages} pages cached"
    );
    assert_eq!(export("partly cached"), uncached, "the same holes");
    std::fs::read(&p.path).unwrap();
    assert_eq!(export("cached"), uncached, "the same holes");
    // What is a hole: where neither layer holds data (the whiteout may be either).
    let is_data = |at: usize| {
        uncached
            .iter()
            .any(|&(s, e)| s <= at as u64 && (at as u64) < e)
    };
    assert!(!is_data(4 * mib + 4096) && is_data(mib + 8192) && is_data(6 * mib + 4096));
    p.assert_clean();
}

#[test]
fn layer_errors_are_clear_and_leave_the_pool_clean() {
    let p = Pool::new();
    let err = p.fails(&["ls"]);
    assert!(
        err.contains("does not exist") && err.contains("init"),
        "{err}"
    );
    let err = p.fails(&["init", "--block-size", "3K"]);
    assert!(
        err.contains("3072") && err.contains("power of two"),
        "{err}"
    );
    p.ok(&["init"]);
    let err = p.fails(&["init"]);
    assert!(err.contains("already exists"), "{err}");
    p.ok(&["create", "base", "--size", "1M"]);
    let err = p.fails(&["create", "base", "--size", "1M"]);
    assert!(err.contains("\"base\" already exists"), "{err}");
    let err = p.fails(&["create", "kid", "--parent", "base"]);
    assert!(err.contains("commit it first"), "{err}");
    let err = p.fails(&["create", "x", "--size", "12Q"]);
    assert!(err.contains("12Q"), "{err}");
    let err = p.fails(&["create", "nosize"]);
    assert!(err.contains("--size"), "{err}");
    let err = p.fails(&["create", "", "--size", "1M"]);
    assert!(err.contains("empty"), "{err}");
    let err = p.fails(&["create", "a\tb", "--size", "1M"]);
    assert!(err.contains("control character"), "{err}");
    let long = "n".repeat(300);
    let err = p.fails(&["create", &long, "--size", "1M"]);
    assert!(err.contains("300 bytes"), "{err}");
    let err = p.fails(&["create", "kid", "--parent", "ghost"]);
    assert!(err.contains("ghost"), "{err}");
    p.ok(&["commit", "base"]);
    let err = p.fails(&["commit", "base"]);
    assert!(err.contains("already committed"), "{err}");
    p.ok(&["create", "kid", "--parent", "base"]);
    let err = p.fails(&["create", "small", "--parent", "base", "--size", "4K"]);
    assert!(err.contains("smaller than its parent"), "{err}");
    let err = p.fails(&["rm", "base"]);
    assert!(err.contains("children") && err.contains("\"kid\""), "{err}");
    let err = p.fails(&["rm", "ghost"]);
    assert!(err.contains("ghost"), "{err}");
    let missing = p.file("missing.img");
    let err = p.fails(&["import", "i", missing.to_str().unwrap()]);
    assert!(err.contains("missing.img"), "{err}");
    let tiny = p.file("tiny.img");
    std::fs::write(&tiny, [1u8; 4096]).unwrap();
    let err = p.fails(&["import", "i", tiny.to_str().unwrap(), "--parent", "base"]);
    assert!(err.contains("smaller than its parent"), "{err}");
    // The failed import left no layer behind.
    assert!(p.layers().iter().all(|l| l["name"] != "i"));
    let err = p.fails(&["export", "ghost", p.file("o").to_str().unwrap()]);
    assert!(err.contains("ghost"), "{err}");
    let err = p.fails(&["history", "ghost"]);
    assert!(err.contains("ghost"), "{err}");
    p.ok(&["rm", "kid"]);
    p.ok(&["rm", "base"]);
    assert!(p.layers().is_empty());
    p.assert_clean();
}

#[test]
fn pool_full_fails_cleanly_and_keeps_earlier_data() {
    let p = Pool::new();
    p.ok(&["init", "--max-size", "2M"]);
    let small: Vec<u8> = (0..(256u32 << 10)).map(|i| (i % 249 + 1) as u8).collect();
    let big: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 241 + 1) as u8).collect();
    let (s, b) = (p.file("small.img"), p.file("big.img"));
    std::fs::write(&s, &small).unwrap();
    std::fs::write(&b, &big).unwrap();
    p.ok(&["import", "small", s.to_str().unwrap()]);
    let err = p.fails(&["import", "big", b.to_str().unwrap()]);
    assert!(err.contains("pool full"), "{err}");
    assert!(p.layers().iter().all(|l| l["name"] != "big"));
    let out = p.file("small.out");
    p.ok(&["export", "small", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), small);
    p.assert_clean();
    // Space freed by removing a layer is usable again.
    p.ok(&["rm", "small"]);
    let mid: Vec<u8> = big[..1 << 20].to_vec();
    let m = p.file("mid.img");
    std::fs::write(&m, &mid).unwrap();
    p.ok(&["import", "mid", m.to_str().unwrap()]);
    p.assert_clean();
}

#[test]
fn removing_layers_gives_space_back_to_the_filesystem() {
    let p = Pool::new();
    p.ok(&["init"]);
    let data: Vec<u8> = (0..(16u32 << 20)).map(|i| (i % 239 + 1) as u8).collect();
    let f = p.file("d.img");
    std::fs::write(&f, &data).unwrap();
    p.ok(&["import", "d", f.to_str().unwrap()]);
    use std::os::unix::fs::MetadataExt;
    let du = || std::fs::metadata(&p.path).unwrap().blocks() * 512;
    let full = du();
    assert!(full >= 16 << 20);
    p.ok(&["rm", "d"]);
    assert!(
        du() < 1 << 20,
        "pool still occupies {} bytes after rm",
        du()
    );
    // Freed blocks are reused rather than growing the file.
    let len_before = std::fs::metadata(&p.path).unwrap().len();
    p.ok(&["import", "d2", f.to_str().unwrap()]);
    assert!(std::fs::metadata(&p.path).unwrap().len() <= len_before + (1 << 20));
    p.assert_clean();
}

/// A process holding the pool whose control socket a command cannot reach (here: a server
/// whose socket is elsewhere) is named in the error; read-only commands still work, and
/// through the right socket every command does.
#[test]
fn a_second_writer_is_told_who_holds_the_pool() {
    let p = Pool::new();
    p.ok(&["init"]);
    p.ok(&["create", "w", "--size", "1M"]);
    let sock = p.file("s.sock");
    let ctl = p.file("elsewhere.ctl");
    let mut server = Command::new(env!("CARGO_BIN_EXE_thinlayer"))
        .arg("--pool")
        .arg(&p.path)
        .arg("--control")
        .arg(&ctl)
        .args(["serve", "--no-keeper", "--socket"])
        .arg(&sock)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    support::wait_for(&ctl);
    let err = p.fails(&["create", "other", "--size", "1M"]);
    assert!(err.contains(&format!("pid {}", server.id())), "{err}");
    assert!(err.contains("serve"), "{err}");
    // Read-only commands still work while served.
    assert_eq!(p.layers().len(), 1);
    p.ok(&["df"]);
    p.ok(&["history", "w"]);
    // Through its control socket the server takes the change.
    p.ok(&[
        "--control",
        ctl.to_str().unwrap(),
        "create",
        "other",
        "--size",
        "1M",
    ]);
    // SAFETY: signalling our own child by its PID.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert!(server.wait().unwrap().success());
    assert_eq!(p.layers().len(), 2);
    p.ok(&["create", "third", "--size", "1M"]);
    p.assert_clean();
}

/// The default `serve` (with its keeper, which makes it keep a crash journal) opens a pool
/// whose checkpoint holds maps lazily: its log says the maps loaded in the background (only a
/// lazy open's loader says so; the journal used to make this open eager). A change it
/// acknowledged outlives a SIGKILL through the keeper's next server, and `check` is clean.
#[test]
fn a_plain_serve_with_its_keeper_loads_the_maps_in_the_background() {
    let p = Pool::new();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pool-v6.pool");
    std::fs::copy(fixture, &p.path).unwrap();
    // `migrate` ends on a checkpoint: its maps are ranges of the map index.
    p.ok(&["migrate", p.path.to_str().unwrap()]);
    let log = p.file("serve.log");
    let mut server = Command::new(env!("CARGO_BIN_EXE_thinlayer"))
        .arg("--pool")
        .arg(&p.path)
        .args(["serve", "--socket"])
        .arg(p.file("nbd.sock"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _kill = support::KillServing(&p.path);
    support::wait_for(&support::control_path(&p.path));
    let loaded = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("maps loaded in the background")
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while loaded() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no background load in 60 s: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (pid, keeper) = support::serving(&p.path).unwrap();
    assert!(
        keeper.is_some_and(|k| k != pid),
        "a plain serve has a keeper"
    );
    let st: serde_json::Value = serde_json::from_str(&p.ok(&["status", "--json"])).unwrap();
    assert_eq!(st["maps"]["loaded"], true, "{st}");
    assert_eq!(st["maps"]["ranges_left"], 0, "{st}");
    assert!(p.ok(&["status"]).contains("maps:         loaded"));
    p.ok(&["create", "x", "--parent", "base"]);
    // SAFETY: killing the server this test started, by the pid it reported.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    support::wait_gone(pid);
    let (next, _) = support::serving(&p.path).expect("the keeper started a server");
    assert_ne!(next, pid);
    assert!(p.layers().iter().any(|l| l["name"] == "x"));
    assert!(support::stop_serving(&p.path));
    server.wait().unwrap();
    p.assert_clean();
}

/// Reads and writes through a default `serve` (with its keeper) before its maps are loaded,
/// and a SIGKILL then: the load is held open (a debug build's test hook) far longer than the
/// test runs, so every request here comes before the completion. A write flushed and one
/// only acknowledged outlive the kill through the keeper's next server, which replays the
/// unflushed one from the crash journal and serves again before its load too (it used to
/// open eagerly to replay: its log said nothing of maps loading in the background);
/// `check --data` is clean and the export holds the writes.
#[test]
fn a_plain_serve_reads_and_writes_before_its_maps_are_loaded_and_survives_a_kill() {
    if !have("qemu-io") {
        eprintln!("SKIP: qemu-io not installed (CI installs it)");
        return;
    }
    let p = Pool::new();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pool-v6.pool");
    std::fs::copy(fixture, &p.path).unwrap();
    p.ok(&["migrate", p.path.to_str().unwrap()]);
    let log = p.file("serve.log");
    let sock = p.file("nbd.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_thinlayer"))
        .env("THINLAYER_TEST_HOLD_LOAD_MS", "600000")
        .arg("--pool")
        .arg(&p.path)
        // No background commit: the unflushed write below stays in the journal only.
        .args(["serve", "--commit-interval", "0", "--socket"])
        .arg(&sock)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _kill = support::KillServing(&p.path);
    support::wait_for(&support::control_path(&p.path));
    let uri = format!("nbd+unix:///work?socket={}", sock.display());
    let io = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let o = c.arg(&uri).output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success() && !out.contains("Pattern verification failed"),
            "qemu-io {cmds:?}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let loaded = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("maps loaded")
    };
    // `status` says the maps are loading, and how far the load is.
    let maps = || {
        let st: serde_json::Value = serde_json::from_str(&p.ok(&["status", "--json"])).unwrap();
        st["maps"].clone()
    };
    let m = maps();
    assert_eq!(m["loaded"], false, "{m}");
    assert!(m["ranges"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["ranges_left"], m["ranges"], "nothing read yet: {m}");
    assert!(p.ok(&["status"]).contains("loading in the background"));
    // "work" is a child of "base", whose block 1 is bytes of 8 (tests/fixtures/README.md).
    io(&["read -P 8 4096 4k"]);
    let m = maps();
    assert!(
        m["ranges_left"].as_u64() < m["ranges"].as_u64(),
        "the read loaded the ranges it touched: {m}"
    );
    io(&["write -P 0x5a 8192 8k", "flush", "read -P 0x5a 8192 8k"]);
    // A container's layer is made and committed, and the layers listed, before the load too.
    p.ok(&["create", "c", "--parent", "base"]);
    p.ok(&["commit", "c"]);
    let listed = p.layers();
    let c = listed.iter().find(|l| l["name"] == "c").expect("c listed");
    assert_eq!(c["writable"], false, "{c}");
    // An image is imported and a layer of the checkpoint removed before the load too (the
    // removal loads the removed layer's own ranges, not the rest).
    let image = p.file("img.raw");
    let mut content = vec![0x3c; 16384];
    content.resize(64 * 4096, 0);
    std::fs::write(&image, &content).unwrap();
    p.ok(&["import", "img", image.to_str().unwrap(), "--parent", "base"]);
    p.ok(&["rm", "app"]);
    // A write acknowledged and never flushed: qemu-io flushes as it closes the device (and
    // by default writes through, with FUA), so a write-back session stays open (its
    // commands come on its input) until the kill.
    let mut held = Command::new("qemu-io")
        .args(["-f", "raw", "-t", "writeback", &uri])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let input = held.stdin.as_mut().unwrap();
        writeln!(input, "write -P 0x6b 65536 4k").unwrap();
    }
    let pending = || {
        let out = p.ok(&["status", "--json"]);
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        st["pending_bytes"].as_u64().unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pending() == 0 {
        assert!(std::time::Instant::now() < deadline, "the write never came");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        !loaded(),
        "the load completed: the requests may have come after it"
    );
    let (pid, _) = support::serving(&p.path).unwrap();
    // SAFETY: killing the server this test started, by the pid it reported.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    support::wait_gone(pid);
    // SAFETY: killing the qemu-io this test started, by its pid (its session died with the
    // server; its flush at exit has nowhere to go).
    unsafe { libc::kill(held.id() as i32, libc::SIGKILL) };
    held.wait().unwrap();
    let (next, _) = support::serving(&p.path).expect("the keeper started a server");
    assert_ne!(next, pid);
    io(&[
        "read -P 0x5a 8192 8k",
        "read -P 0x6b 65536 4k",
        "read -P 8 4096 4k",
    ]);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let replay = text
        .lines()
        .find(|l| l.contains("replayed 1 transaction(s) of the crash journal"));
    assert!(
        replay.is_some_and(|l| l.contains("the rest of the maps load in the background")),
        "the next server did not replay into a lazy open: {text}"
    );
    assert_eq!(
        p.layers()
            .iter()
            .find(|l| l["name"] == "c")
            .map(|c| c["writable"].clone()),
        Some(serde_json::Value::Bool(false)),
        "the committed layer outlives the kill"
    );
    let names: Vec<serde_json::Value> = p.layers().iter().map(|l| l["name"].clone()).collect();
    assert!(
        names.contains(&"img".into()) && !names.contains(&"app".into()),
        "{names:?}"
    );
    assert!(support::stop_serving(&p.path));
    server.wait().unwrap();
    assert!(
        !loaded(),
        "the load completed: the requests may have come after it"
    );
    p.assert_clean();
    let out = p.file("work.raw");
    p.ok(&["export", "work", out.to_str().unwrap()]);
    let bytes = std::fs::read(&out).unwrap();
    assert!(bytes[8192..16384].iter().all(|&b| b == 0x5a));
    assert!(bytes[65536..69632].iter().all(|&b| b == 0x6b));
    p.ok(&["export", "img", out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == content,
        "the image imported before the load"
    );
}

/// A pool a previous binary made (format versions 2 to 6, tests/fixtures/README.md) is refused
/// by every command, naming its version and `thinlayer migrate`; after `migrate` its layers read
/// back byte for byte and `check --data` calls it clean.
fn an_older_pool_is_refused_by_name_until_migrated(version: u8, layers: &[&str]) -> Pool {
    let p = Pool::new();
    let fixture = format!(
        "{}/tests/fixtures/pool-v{version}.pool",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::copy(fixture, &p.path).unwrap();
    let bytes = std::fs::read(&p.path).unwrap();
    for slot in [0, 4096] {
        assert_eq!(
            bytes[slot + 12..slot + 16],
            [version, 0, 0, 0],
            "slot at {slot}"
        );
    }
    for args in [
        &["ls"][..],
        &["check"],
        &["create", "x", "--parent", "base"],
    ] {
        let err = p.fails(args);
        assert!(
            err.contains(&format!("format version {version}")) && err.contains("thinlayer migrate"),
            "{args:?}: {err}"
        );
    }
    let current = thinlayer::format::superblock::VERSION;
    let out = p.ok(&["migrate", p.path.to_str().unwrap()]);
    assert!(
        out.contains(&format!("format version {version} -> {current}")),
        "{out}"
    );
    let bytes = std::fs::read(&p.path).unwrap();
    for slot in [0, 4096] {
        assert_eq!(
            bytes[slot + 12..slot + 16],
            current.to_le_bytes(),
            "slot at {slot}"
        );
    }
    let names: Vec<String> = p
        .layers()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, layers);
    // The images the fixture was imported from.
    let base: Vec<u8> = (0..64u32)
        .flat_map(|i| {
            let b = if i % 3 == 0 { 0 } else { (i * 7 + 1) as u8 };
            std::iter::repeat_n(b, 4096)
        })
        .collect();
    let mut app = base.clone();
    app[8192..12288].fill(0xab);
    let runs: Vec<u8> = (0..64u32)
        .flat_map(|i| std::iter::repeat_n(((i * 13 + 5) % 255 + 1) as u8, 4096))
        .collect();
    let more: Vec<u8> = (0..64u32)
        .flat_map(|i| std::iter::repeat_n(((i * 17 + 3) % 255 + 1) as u8, 4096))
        .collect();
    let scat: Vec<u8> = (0..64u32)
        .flat_map(|i| {
            let b = if i % 4 == 0 {
                (i * 11 + 7) % 255 + 1
            } else {
                0
            };
            std::iter::repeat_n(b as u8, 4096)
        })
        .collect();
    let late: Vec<u8> = (0..64u32)
        .flat_map(|i| {
            let b = if i % 3 != 0 {
                (i * 19 + 11) % 255 + 1
            } else {
                0
            };
            std::iter::repeat_n(b as u8, 4096)
        })
        .collect();
    for (layer, want) in [
        ("base", &base),
        ("work", &base),
        ("app", &app),
        ("runs", &runs),
        ("more", &more),
        ("scat", &scat),
        ("late", &late),
    ] {
        if !layers.contains(&layer) {
            continue;
        }
        let out = p.file(layer);
        p.ok(&["export", layer, out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == *want, "{layer} differs");
    }
    p.assert_clean();
    let out = p.ok(&["migrate"]);
    assert!(
        out.contains(&format!("already format version {current}")),
        "{out}"
    );
    p.ok(&["create", "x", "--parent", "app"]);
    p.assert_clean();
    p
}

#[test]
fn a_version_2_pool_is_refused_by_name_until_migrated() {
    an_older_pool_is_refused_by_name_until_migrated(2, &["base", "work", "app"]);
}

/// Version 3 (before map runs), made by main at 5360685. Besides the version 2 test's checks:
/// `migrate` rewrote the maps as a checkpoint of map runs, so the checkpoint holds fewer bytes
/// than the 20 a map entry takes for each of the pool's 107 data blocks.
#[test]
fn a_version_3_pool_is_migrated_and_its_maps_rewritten_as_runs() {
    let p = an_older_pool_is_refused_by_name_until_migrated(3, &["base", "work", "app", "runs"]);
    let (checkpoint, _) = newest_checkpoint(&p);
    assert!(
        checkpoint.len() < 107 * 20,
        "checkpoint of {} bytes",
        checkpoint.len()
    );
}

/// The newest superblock's checkpoint record bytes, and its crcs in checksum pages (read as
/// FORMAT.md §5.6 says, each page's crc verified).
fn newest_checkpoint(p: &Pool) -> (Vec<u8>, Vec<u32>) {
    use thinlayer::format::checksum::{verify, Kind};
    use thinlayer::format::page::header;
    use thinlayer::format::record::{Record, RecordReader};
    use thinlayer::format::superblock::Superblock;
    let bytes = std::fs::read(&p.path).unwrap();
    let sb = [0usize, 4096]
        .iter()
        .filter_map(|&at| Superblock::decode(&bytes[at..at + 4096], at / 4096).ok())
        .max_by_key(|sb| sb.generation)
        .unwrap();
    assert!(sb.checkpoint.pages > 0, "migrate wrote no checkpoint");
    let mut page = sb.checkpoint.head as usize;
    let mut payload = vec![];
    let page_of = |n: usize| &bytes[n * 4096..(n + 1) * 4096];
    for _ in 0..sb.checkpoint.pages {
        let h = page_of(page);
        let len = header::PAYLOAD_LEN.get(h) as usize;
        payload.extend_from_slice(&h[header::LEN..header::LEN + len]);
        page = header::NEXT.get(h) as usize;
    }
    let mut r = RecordReader::new(&payload, "checkpoint");
    let mut crcs = vec![];
    while let Some(Record::ChecksumPages(pages)) = r.next_record().unwrap() {
        for n in pages {
            let h = page_of(n as usize);
            verify(Kind::ChecksumPage, h).unwrap();
            let len = header::PAYLOAD_LEN.get(h) as usize;
            crcs.extend(
                h[header::LEN..header::LEN + len]
                    .chunks(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap())),
            );
        }
    }
    (payload, crcs)
}

/// The positions a checkpoint's map runs and map singles name in its checksum stream cover
/// `0..n` once each, no gap and no overlap; returns `n`.
fn sums_tiled(checkpoint: &[u8]) -> u64 {
    use thinlayer::format::record::{Record, RecordReader};
    let mut r = RecordReader::new(checkpoint, "checkpoint");
    let mut spans = vec![];
    while let Some(rec) = r.next_record().unwrap() {
        match rec {
            Record::MapRunSums { count, sums_at, .. } => spans.push((sums_at, count as u64)),
            Record::MapSinglesSums {
                sums_at, entries, ..
            } => spans.push((sums_at, entries.len() as u64)),
            _ => {}
        }
    }
    spans.sort_unstable();
    let mut at = 0;
    for (from, n) in spans {
        assert_eq!(from, at, "crc positions not tiled");
        at += n;
    }
    at
}

/// Version 4 (map runs with their crcs inline), made by main at b6dd230 from the version-3
/// fixture by its `migrate` (so it holds a version-4 checkpoint of map runs) and one more
/// import in its log. Besides the version 2 test's checks: `migrate` wrote a checkpoint whose
/// runs keep their crcs in checksum pages: one crc there for each block of a run (the 64
/// blocks of "runs" and of "more", and base's runs of 2 between its zero blocks), and each
/// run's record names its crcs instead of carrying them.
#[test]
fn a_version_4_pool_is_migrated_and_its_crcs_moved_to_checksum_pages() {
    use thinlayer::format::record::{Record, RecordReader};
    let layers = ["base", "work", "app", "runs", "more"];
    let p = an_older_pool_is_refused_by_name_until_migrated(4, &layers);
    let (checkpoint, crcs) = newest_checkpoint(&p);
    let mut r = RecordReader::new(&checkpoint, "checkpoint");
    let mut in_runs = 0;
    while let Some(rec) = r.next_record().unwrap() {
        match rec {
            Record::MapRunSums { count, .. } => in_runs += count as u64,
            Record::MapRun { .. } => panic!("a checkpoint's run carries its crcs"),
            _ => {}
        }
    }
    assert!(in_runs >= 128, "{in_runs} blocks in runs");
    // The runs' crcs and the single blocks' (since version 6) tile the stream.
    assert_eq!(crcs.len() as u64, sums_tiled(&checkpoint));
    // The crcs are those of the blocks: "more"'s block 0 is 4096 bytes of 4.
    assert!(crcs.contains(&crc32fast::hash(&[4u8; 4096])));
}

/// Version 5 (single blocks' crcs in map records), made by main at ebb2928 from the version-4
/// fixture by its `migrate` (a version-5 checkpoint: runs as tag 10, single blocks as tag 4
/// data entries, app's changed block among them) and an import of a scattered image ("scat",
/// 16 single blocks) in its log. Besides the version 2 test's checks: `migrate` wrote a
/// checkpoint whose single data blocks are map singles records with their crcs in checksum
/// pages (app's block and scat's 16, and no data entry left in a map record), at positions
/// after the runs', each record's consecutive.
#[test]
fn a_version_5_pool_is_migrated_and_its_singles_crcs_moved_to_checksum_pages() {
    use thinlayer::format::record::{MapTarget, Record, RecordReader};
    let layers = ["base", "work", "app", "runs", "more", "scat"];
    let p = an_older_pool_is_refused_by_name_until_migrated(5, &layers);
    let (checkpoint, crcs) = newest_checkpoint(&p);
    let mut r = RecordReader::new(&checkpoint, "checkpoint");
    let (mut in_runs, mut singles) = (0, vec![]);
    while let Some(rec) = r.next_record().unwrap() {
        match rec {
            Record::MapRunSums { count, .. } => in_runs += count as u64,
            Record::MapSinglesSums {
                sums_at, entries, ..
            } => singles.push((sums_at, entries.len() as u64)),
            Record::Map { entries, .. } => assert!(
                entries
                    .iter()
                    .all(|e| !matches!(e.target, MapTarget::Data { .. })),
                "a data entry carries its crc: {entries:?}"
            ),
            _ => {}
        }
    }
    let n_singles: u64 = singles.iter().map(|s| s.1).sum();
    assert!(n_singles >= 17, "{singles:?}");
    assert_eq!(crcs.len() as u64, in_runs + n_singles);
    assert_eq!(crcs.len() as u64, sums_tiled(&checkpoint));
    // The crcs are those of the blocks: scat's block 4 is 4096 bytes of 52.
    assert!(crcs.contains(&crc32fast::hash(&[52u8; 4096])));
    assert!(crcs.contains(&crc32fast::hash(&[0xabu8; 4096])));
}

/// Version 6 (no map index: counters after each layer's maps), made by main at e5b40cc from
/// the version-5 fixture by its `migrate` (a version-6 checkpoint) and an import of an image
/// of runs of two blocks and zeros ("late") in its log. Besides the version 2 test's checks:
/// `migrate` wrote a checkpoint whose map records all come after its other records, behind a
/// map index whose ranges hold them (FORMAT.md §6.3.4), one range at least per layer with a
/// mapped block.
#[test]
fn a_version_6_pool_is_migrated_and_its_maps_indexed() {
    use thinlayer::format::record::{Record, RecordReader};
    let layers = ["base", "work", "app", "runs", "more", "scat", "late"];
    let p = an_older_pool_is_refused_by_name_until_migrated(6, &layers);
    let (checkpoint, _) = newest_checkpoint(&p);
    let mut r = RecordReader::new(&checkpoint, "checkpoint");
    let mut index = vec![];
    let mut records = vec![];
    loop {
        let at = r.position() as u64;
        match r.next_record().unwrap() {
            Some(Record::MapIndex(part)) => index.extend(part),
            Some(Record::ChecksumPages(_)) => {}
            Some(rec) => records.push((at, rec)),
            None => break,
        }
    }
    let mut walk = thinlayer::pool::index::Walk::new(&index);
    for (at, rec) in &records {
        walk.record(*at, rec).unwrap();
    }
    walk.finish().unwrap();
    let mut indexed: Vec<u32> = index.iter().map(|e| e.layer.0).collect();
    indexed.dedup();
    // "work" maps nothing of its own; every other layer has a range.
    assert_eq!(indexed.len(), layers.len() - 1, "{index:?}");
    let first_map = records
        .iter()
        .position(|(_, r)| r.map_span().is_some())
        .unwrap();
    assert!(records[first_map..]
        .iter()
        .all(|(_, r)| r.map_span().is_some()));
    assert_eq!(records[first_map].0, index[0].position());
}

#[test]
fn help_teaches_the_commands() {
    let p = Pool::new();
    let out = p.ok(&["--help"]);
    for word in [
        "init",
        "create",
        "import",
        "export",
        "serve",
        "check",
        "THINLAYER_POOL",
    ] {
        assert!(out.contains(word), "--help lacks {word}: {out}");
    }
    let out = p.ok(&["import", "--help"]);
    assert!(out.contains("--parent") && out.contains("Example"), "{out}");
}

/// A build without an optional frontend (`cargo build --no-default-features`) keeps its
/// commands and options, and each says which feature it needs, before touching anything.
#[test]
#[cfg(not(all(feature = "registry", feature = "fuse", feature = "containerd")))]
fn commands_of_features_left_out_name_the_feature() {
    let p = Pool::new();
    p.ok(&["init"]);
    let socket = p.file("nbd.sock");
    let socket = socket.to_str().unwrap();
    let files = p.file("files");
    let files = files.to_str().unwrap();
    let grpc = p.file("grpc.sock");
    let grpc = grpc.to_str().unwrap();
    let mut cases: Vec<(&str, Vec<&str>)> = Vec::new();
    if cfg!(not(feature = "registry")) {
        cases.push(("registry", vec!["push", "x", "127.0.0.1:1/x:1"]));
        cases.push(("registry", vec!["pull", "127.0.0.1:1/x:1"]));
    }
    if cfg!(not(feature = "fuse")) {
        cases.push(("fuse", vec!["serve", "--socket", socket, "--files", files]));
    }
    if cfg!(not(feature = "containerd")) {
        cases.push((
            "containerd",
            vec!["serve", "--socket", socket, "--containerd-socket", grpc],
        ));
    }
    for (feature, args) in cases {
        let err = p.fails(&args);
        let want = format!("thinlayer was built without the `{feature}` feature");
        assert!(err.contains(&want), "thinlayer {args:?}: {err}");
    }
    assert!(!p.file("nbd.sock").exists() && !p.file("files").exists());
    p.assert_clean();
}
