//! `thinlayer restart` and `thinlayer status` (issue 17): the serving process is replaced while
//! a container's filesystem (ext4 on a loop device over a live file) writes and fsyncs, with
//! no I/O error, and the old process serves on when the new one cannot take over. Real
//! server, loop devices and e2fsck; servers are stopped by PID (the one `status` names).
//! Needs root and /dev/fuse (CI has both); skips with a message otherwise.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod support;
use support::{bin, sh, tl, tl_output, wait_for, wait_gone, KillServing};

fn missing_prerequisite() -> Option<String> {
    support::missing_root_fuse(&["mkfs.ext4", "e2fsck", "losetup", "setpriv", "prlimit"])
}

macro_rules! require_prerequisites {
    () => {
        if let Some(why) = missing_prerequisite() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

/// A pool served with live files; the serving process changes with every restart, so it is
/// found through `status` and stopped by that PID.
struct Served {
    dir: PathBuf,
    pool: PathBuf,
    files: PathBuf,
    log: PathBuf,
    /// The process this test started (the first server), to reap.
    first: Option<Child>,
}

impl Served {
    fn start(dir: &Path) -> Served {
        Self::start_with(dir, &[])
    }

    /// `serve --files DIR EXTRA...` (`--keeper`).
    fn start_with(dir: &Path, extra: &[&str]) -> Served {
        Self::start_binary(Path::new(bin()), dir, extra)
    }

    /// The server started from `binary` (what the keeper and `restart` run again).
    fn start_binary(binary: &Path, dir: &Path, extra: &[&str]) -> Served {
        let pool = dir.join("pool");
        tl(&pool, &["init"]);
        let files = dir.join("files");
        let log = dir.join("serve.log");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let first = Command::new(binary)
            .arg("--pool")
            .arg(&pool)
            .args(["serve", "--files"])
            .arg(&files)
            .args(support::keeper_unless_asked(extra))
            .args(extra)
            .stderr(out)
            .spawn()
            .unwrap();
        wait_for(&support::control_path(&pool));
        Served {
            dir: dir.to_path_buf(),
            pool,
            files,
            log,
            first: Some(first),
        }
    }

    fn tl(&self, args: &[&str]) -> String {
        tl(&self.pool, args)
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.tl(&["status", "--json"])).unwrap()
    }

    fn pid(&self) -> i32 {
        self.status()["pid"].as_i64().unwrap() as i32
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `thinlayer restart ARGS`: its stdout, and the old and new pids it names.
    fn restart(&self, args: &[&str]) -> (i32, i32) {
        let mut all = vec!["restart", "--json"];
        all.extend_from_slice(args);
        let out: serde_json::Value = serde_json::from_str(&self.tl(&all)).unwrap();
        (
            out["old_pid"].as_i64().unwrap() as i32,
            out["new_pid"].as_i64().unwrap() as i32,
        )
    }

    /// SIGKILL of the serving process (the keeper starts the next one); returns the next
    /// one's pid, from `status` (which waits in the control socket's backlog meanwhile).
    fn crash(&self) -> i32 {
        let pid = self.pid();
        // SAFETY: killing the server this test started, by the PID it reported.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_gone(pid);
        let new = self.pid();
        assert_ne!(new, pid, "status still names the killed server");
        new
    }

    /// SIGTERM to the serving process, and wait for it (and its keeper, if any) to be gone.
    fn stop(mut self) {
        let st = self.status();
        let pid = st["pid"].as_i64().unwrap() as i32;
        // SAFETY: signalling the server by the PID it reported.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        wait_gone(pid);
        if let Some(k) = st["keeper"].as_i64() {
            wait_gone(k as i32);
        }
        if let Some(mut c) = self.first.take() {
            c.wait().unwrap();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        drop(KillServing(&self.pool));
        if let Some(mut c) = self.first.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let c = std::ffi::CString::new(self.files.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; failure (nothing mounted) is fine.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = &self.dir;
    }
}

/// ext4 over a loop device over a live file; unmounted on drop.
struct Ext4 {
    mnt: PathBuf,
    dev: String,
}

impl Ext4 {
    fn new(s: &Served, layer: &str) -> Ext4 {
        let file = s.tl(&["attach", layer]).trim().to_string();
        let dev = sh(&format!("losetup --find --show {file}"))
            .trim()
            .to_string();
        sh(&format!("mkfs.ext4 -q {dev}"));
        let mnt = s.dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        sh(&format!("mount {dev} {}", mnt.display()));
        Ext4 { mnt, dev }
    }

    fn is_read_write(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let m = self.mnt.to_str().unwrap();
        mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(m))
            .is_some_and(|l| l.split(' ').nth(3).unwrap().split(',').any(|o| o == "rw"))
    }

    /// Unmount, then `e2fsck -fn` on the loop device: the filesystem must be clean.
    fn unmount_and_fsck(self) {
        sh(&format!("umount {}", self.mnt.display()));
        let o = Command::new("e2fsck")
            .args(["-fn", &self.dev])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "e2fsck -fn {}: {}{}",
            self.dev,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        sh(&format!("losetup -d {}", self.dev));
        std::mem::forget(self);
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn block(seed: u64) -> Vec<u8> {
    (0..64 * 1024u64)
        .map(|i| (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(0x9e37_79b9)).to_le_bytes()[3] | 1)
        .collect()
}

/// A container's writer: 64 KiB written and fsync'd into one of 32 files, round and round,
/// counting failures and remembering what each file last held once fsync'd.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Vec<String>)>,
    synced: Arc<Mutex<BTreeMap<PathBuf, u64>>>,
}

impl Writer {
    fn start(dir: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let synced = Arc::new(Mutex::new(BTreeMap::new()));
        let (st, sy, dir) = (stop.clone(), synced.clone(), dir.to_path_buf());
        let thread = std::thread::spawn(move || {
            let (mut n, mut errors) = (0u64, Vec::new());
            while !st.load(Ordering::SeqCst) {
                let path = dir.join(format!("w{}", n % 32));
                let r = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .and_then(|mut f| {
                        f.write_all(&block(n))?;
                        f.sync_all()
                    });
                match r {
                    Ok(()) => {
                        sy.lock().unwrap().insert(path, n);
                    }
                    Err(e) => errors.push(format!("{}: {e}", path.display())),
                }
                n += 1;
            }
            (n, errors)
        });
        Writer {
            stop,
            thread,
            synced,
        }
    }

    /// Stop; every write must have succeeded and every file must read back what was synced.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let (n, errors) = self.thread.join().unwrap();
        assert!(
            errors.is_empty(),
            "{} write/fsync errors: {errors:?}",
            errors.len()
        );
        for (path, seed) in self.synced.lock().unwrap().iter() {
            let got = std::fs::read(path).unwrap();
            assert!(
                got == block(*seed),
                "{} does not read back as written",
                path.display()
            );
        }
        n
    }
}

const PG: &str = "/usr/lib/postgresql/15/bin";

/// PostgreSQL with its data directory in `dir` (on the container's filesystem), run as
/// `nobody`, listening only on a Unix socket in `sock`. Stopped (immediate) on drop.
struct Postgres {
    data: PathBuf,
    sock: PathBuf,
}

impl Postgres {
    /// None when PostgreSQL 15 is not installed (CI installs it).
    fn start(dir: &Path, sock: &Path) -> Option<Postgres> {
        if !Path::new(PG).join("pgbench").exists() {
            assert!(
                !support::in_ci(),
                "CI=true and PostgreSQL 15 is not installed ({PG}/pgbench)"
            );
            eprintln!("PostgreSQL 15 not installed: the pgbench part is skipped");
            return None;
        }
        let data = dir.join("pg");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(sock).unwrap();
        sh(&format!(
            "chown 65534:65534 {} {} && chmod 700 {}",
            data.display(),
            sock.display(),
            data.display()
        ));
        let pg = Postgres {
            data,
            sock: sock.to_path_buf(),
        };
        pg.run(&format!(
            "{PG}/initdb -A trust -U postgres -D {}",
            pg.data.display()
        ));
        pg.run(&format!(
            "{PG}/pg_ctl -D {} -w -l {}/log -o \"-c listen_addresses= -k {}\" start",
            pg.data.display(),
            pg.sock.display(),
            pg.sock.display()
        ));
        pg.run(&format!("{PG}/pgbench -q -i -s 4 {}", pg.conn()));
        Some(pg)
    }

    fn conn(&self) -> String {
        format!("-h {} -U postgres postgres", self.sock.display())
    }

    /// A shell command as `nobody`.
    fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            cmd,
        ]);
        c
    }

    fn run(&self, cmd: &str) -> String {
        let o = self.command(cmd).output().unwrap();
        assert!(
            o.status.success(),
            "`{cmd}`: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// pgbench for `seconds` on a thread: its output, or why it failed.
    fn bench(&self, seconds: u32) -> std::thread::JoinHandle<Result<String, String>> {
        let mut c = self.command(&format!("{PG}/pgbench -c 4 -T {seconds} {}", self.conn()));
        std::thread::spawn(move || {
            let o = c.output().map_err(|e| e.to_string())?;
            let out = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            if o.status.success() && !out.contains("error") {
                Ok(out)
            } else {
                Err(out)
            }
        })
    }

    fn stop(self) {
        self.run(&format!(
            "{PG}/pg_ctl -D {} -w -m fast stop",
            self.data.display()
        ));
        std::mem::forget(self);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command(&format!(
                "{PG}/pg_ctl -D {} -m immediate stop",
                self.data.display()
            ))
            .output();
    }
}

/// A served pool with one container: layer c1 of `size`, ext4 mounted, a writer running.
fn container(size: &str) -> (tempfile::TempDir, Served, Ext4, Writer) {
    container_with(size, &[])
}

fn container_with(size: &str, extra: &[&str]) -> (tempfile::TempDir, Served, Ext4, Writer) {
    let d = tempfile::tempdir().unwrap();
    let s = Served::start_with(d.path(), extra);
    s.tl(&["create", "c1", "--size", size]);
    let fs = Ext4::new(&s, "c1");
    let writer = Writer::start(&fs.mnt);
    (d, s, fs, writer)
}

/// The end of every scenario: no write failed, every fsync'd file reads back, the
/// filesystem is read-write and fsck-clean, and so is the pool once the server stops.
/// Returns the number of writes.
fn finish(s: Served, fs: Ext4, writer: Writer) -> u64 {
    let writes = writer.finish();
    assert!(fs.is_read_write(), "the filesystem went read-only");
    fs.unmount_and_fsck();
    s.tl(&["detach", "c1"]);
    let pool = s.pool.clone();
    s.stop();
    let out = tl(&pool, &["check", "--data"]);
    assert!(out.contains("clean"), "check --data: {out}");
    writes
}

/// PostgreSQL on the container's filesystem with pgbench running for `seconds` (None when
/// PostgreSQL is not installed outside CI).
fn pgbench(
    d: &tempfile::TempDir,
    fs: &Ext4,
    seconds: u32,
) -> Option<(Postgres, std::thread::JoinHandle<Result<String, String>>)> {
    // nobody (PostgreSQL) must reach its directories below the test's.
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&fs.mnt, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pg = Postgres::start(&fs.mnt, &d.path().join("pgsock"))?;
    let bench = pg.bench(seconds);
    Some((pg, bench))
}

/// pgbench finished without a failed transaction; PostgreSQL stops cleanly.
fn pgbench_done(pg: Option<(Postgres, std::thread::JoinHandle<Result<String, String>>)>) {
    if let Some((pg, bench)) = pg {
        let out = bench
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("pgbench failed: {e}"));
        assert!(out.contains("number of failed transactions: 0"), "{out}");
        pg.stop();
    }
}

/// An executable shell script.
fn script(path: &Path, body: String) -> PathBuf {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}

/// Three restarts under pgbench and the writer, the loop device left buffered
/// (`serve --no-loop-direct-io`): one request in flight at a time.
#[test]
fn a_container_filesystem_writes_through_three_restarts_without_an_error() {
    require_prerequisites!();
    let (d, s, fs, writer) = container_with("512M", &["--no-loop-direct-io"]);
    let pg = pgbench(&d, &fs, 6);
    std::thread::sleep(Duration::from_millis(500));
    let mut pid = s.pid();
    for round in 0..3 {
        let (old, new) = s.restart(&[]);
        assert_eq!(old, pid, "round {round}: restart names the old server");
        assert_ne!(new, old);
        wait_gone(old);
        assert_eq!(s.pid(), new, "round {round}: status names the new server");
        pid = new;
        std::thread::sleep(Duration::from_millis(1000));
    }
    pgbench_done(pg);
    let st = s.status();
    assert_eq!(st["generation"], 4, "{st}");
    assert_eq!(st["files"].as_array().unwrap().len(), 1, "{st}");
    let writes = finish(s, fs, writer);
    assert!(writes > 10, "only {writes} writes in the whole run");
}

/// The same workload on a loop device in direct-I/O mode (the server's default), through
/// ten restarts: many FUSE requests are in flight, so a restart often finds the old
/// process's session threads taking one from the kernel; killed by its exit mid-copy, such a
/// thread fails the request with EIO (PostgreSQL PANICs on the failed fdatasync) unless the
/// threads stopped reading before the exit (src/fuse/leave.rs).
#[test]
fn a_direct_io_loop_device_writes_through_ten_restarts_without_an_error() {
    require_prerequisites!();
    let (d, s, fs, writer) = container("512M");
    // The server switches the loop device on its first I/O; the filesystem's has happened.
    let dio = format!("/sys/block/{}/loop/dio", fs.dev.trim_start_matches("/dev/"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&dio).unwrap().trim() != "1" {
        assert!(Instant::now() < deadline, "{dio} never read 1");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pg = pgbench(&d, &fs, 16);
    std::thread::sleep(Duration::from_millis(500));
    for round in 0..10 {
        let (old, new) = s.restart(&[]);
        assert_ne!(new, old, "round {round}");
        wait_gone(old);
        std::thread::sleep(Duration::from_millis(700));
    }
    pgbench_done(pg);
    assert_eq!(std::fs::read_to_string(&dio).unwrap().trim(), "1");
    let writes = finish(s, fs, writer);
    assert!(writes > 10, "only {writes} writes in the whole run");
}

/// The same container workload with a keeper: three graceful restarts and three SIGKILLs of
/// the serving process, alternating, the loop device buffered. The keeper starts a new server
/// after each kill, which replays the crash journal and has the kernel resend what the dead
/// one had read.
#[test]
fn a_container_filesystem_writes_through_three_kills_of_the_server_without_an_error() {
    require_prerequisites!();
    restarts_and_kills(&["--keeper", "--no-loop-direct-io"]);
}

/// The same on a loop device in direct-I/O mode (the default): the graceful restarts are
/// covered by the old process's threads stopping to read (src/fuse/leave.rs); a kill is not,
/// and shows here whether it fails requests in flight.
#[test]
fn a_direct_io_loop_device_writes_through_three_kills_of_the_server_without_an_error() {
    require_prerequisites!();
    restarts_and_kills(&["--keeper"]);
}

/// Three graceful restarts and three SIGKILLs, alternating, under pgbench and the writer.
fn restarts_and_kills(extra: &[&str]) {
    let (d, s, fs, writer) = container_with("512M", extra);
    let pg = pgbench(&d, &fs, 10);
    std::thread::sleep(Duration::from_millis(500));
    let keeper = s.status()["keeper"]
        .as_i64()
        .expect("status names the keeper");
    for round in 0..3 {
        let (old, new) = s.restart(&[]);
        assert_ne!(new, old);
        wait_gone(old);
        std::thread::sleep(Duration::from_millis(700));
        let next = s.crash();
        assert_eq!(s.status()["keeper"].as_i64(), Some(keeper), "round {round}");
        assert_ne!(next, new);
        std::thread::sleep(Duration::from_millis(700));
    }
    pgbench_done(pg);
    let log = s.log();
    assert_eq!(
        log.matches("without stopping; starting a new one").count(),
        3,
        "{log}"
    );
    let writes = finish(s, fs, writer);
    assert!(writes > 10, "only {writes} writes in the whole run");
    // The keeper stopped with the server: no process is left.
    assert!(
        !Path::new(&format!("/proc/{keeper}")).exists() || {
            let st = std::fs::read_to_string(format!("/proc/{keeper}/stat")).unwrap_or_default();
            st.rsplit(") ").next().is_some_and(|s| s.starts_with('Z'))
        }
    );
}

/// Layer c1 (16 MiB) attached, its live file's path and the file opened read-write.
fn live_file(s: &Served) -> (String, std::fs::File) {
    s.tl(&["create", "c1", "--size", "16M"]);
    let file = s.tl(&["attach", "c1"]).trim().to_string();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    (file, f)
}

/// The case the crash journal exists for: a write acknowledged but not yet committed when
/// the server is killed, then flushed through the next server. The flush must make that
/// write durable, so the data must still be there: without the journal (its replay
/// disabled) the new server knows nothing of the write, its flush commits nothing, and the
/// read below returns the old bytes.
#[test]
fn a_write_acknowledged_before_a_kill_and_flushed_after_it_is_durable() {
    require_prerequisites!();
    let d = tempfile::tempdir().unwrap();
    // No background commits: the write stays in the open transaction until the flush.
    let s = Served::start_with(d.path(), &["--keeper", "--commit-interval", "0"]);
    let (_, f) = live_file(&s);
    f.write_all_at(&block(1), 1 << 20).unwrap();
    f.sync_all().unwrap();
    f.write_all_at(&block(2), 1 << 20).unwrap();
    f.write_all_at(&block(3), 4 << 20).unwrap();
    s.crash();
    // The keeper's table had the open handle: the new server refuses to detach the file.
    let o = tl_output(&s.pool, &["detach", "c1"]);
    assert!(
        !o.status.success(),
        "detach of an open file succeeded after the crash"
    );
    f.sync_all().unwrap();
    let mut got = vec![0u8; 64 << 10];
    f.read_exact_at(&mut got, 1 << 20).unwrap();
    assert!(
        got == block(2),
        "the write before the kill is gone after the flush"
    );
    f.read_exact_at(&mut got, 4 << 20).unwrap();
    assert!(
        got == block(3),
        "the write before the kill is gone after the flush"
    );
    assert!(
        s.log()
            .contains("replayed 1 transaction(s) of the crash journal"),
        "{}",
        s.log()
    );
    drop(f);
    s.tl(&["detach", "c1"]);
    let pool = s.pool.clone();
    s.stop();
    let out = tl(&pool, &["check", "--data"]);
    assert!(out.contains("clean"), "check --data: {out}");
}

/// A crash loop: the server is killed and the binary the keeper starts dies at once, again
/// and again. The keeper waits longer and longer between starts (1, 2, 4 s), saying so, and
/// does not spin; once the binary works again the next start takes over.
#[test]
fn a_crash_loop_backs_off_and_recovers_when_the_binary_works_again() {
    require_prerequisites!();
    let d = tempfile::tempdir().unwrap();
    let copy = d.path().join("thinlayer");
    std::fs::copy(bin(), &copy).unwrap();
    let s = Served::start_binary(&copy, d.path(), &["--keeper"]);
    let (_, f) = live_file(&s);
    f.write_all_at(&block(1), 0).unwrap();
    // The binary on disk now dies at once (renamed over: the running one keeps its inode).
    let kept = d.path().join("thinlayer.real");
    std::fs::rename(&copy, &kept).unwrap();
    script(&d.path().join("broken"), "exit 3".to_string());
    std::fs::rename(d.path().join("broken"), &copy).unwrap();
    let pid = s.pid();
    // SAFETY: killing the server this test started, by the PID it reported.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.log().matches("crash loop").count() < 2 {
        assert!(Instant::now() < deadline, "no back-off: {}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Two failed starts so far (at once, then 1 s later), the next one 2 s after that: the
    // keeper does not spin.
    let log = s.log();
    let failed = log.matches("did not take over").count();
    assert!((2..=3).contains(&failed), "{failed} failed starts: {log}");
    assert!(log.contains("waiting 2 s before the next"), "{log}");
    std::fs::rename(&kept, &copy).unwrap();
    let new = s.pid();
    assert_ne!(new, pid);
    let mut got = vec![0u8; 64 << 10];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == block(1), "the write before the kill is gone");
    drop(f);
    s.tl(&["detach", "c1"]);
    s.stop();
}

/// Without its keeper a server is mortal again: kill the keeper, then the server. The
/// live file's I/O then fails (the FUSE connection is gone), cleanly: an error, not wrong
/// data; the pool holds what was flushed and `check --data` is clean.
#[test]
fn with_the_keeper_killed_a_kill_of_the_server_fails_io_cleanly() {
    require_prerequisites!();
    let d = tempfile::tempdir().unwrap();
    let mut s = Served::start_with(d.path(), &["--keeper"]);
    let (file, f) = live_file(&s);
    f.write_all_at(&block(1), 0).unwrap();
    f.sync_all().unwrap();
    let st = s.status();
    let (pid, keeper) = (
        st["pid"].as_i64().unwrap() as i32,
        st["keeper"].as_i64().unwrap() as i32,
    );
    // SAFETY: killing the keeper and the server this test started, by their PIDs.
    unsafe { libc::kill(keeper, libc::SIGKILL) };
    wait_gone(keeper);
    // The server notices when it next tells the keeper something (an open or release).
    drop(f);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    assert_eq!(
        s.status()["keeper"],
        serde_json::Value::Null,
        "status still names a dead keeper"
    );
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid);
    let e = f.write_all_at(&block(2), 0).and_then(|()| f.sync_all());
    assert!(e.is_err(), "I/O through a dead server succeeded");
    drop(f);
    if let Some(mut c) = s.first.take() {
        let _ = c.wait();
    }
    let c = std::ffi::CString::new(s.files.to_str().unwrap()).unwrap();
    // SAFETY: a valid path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    let out = tl(&s.pool, &["check", "--data"]);
    assert!(out.contains("clean"), "check --data: {out}");
    let mut got = vec![0u8; 64 << 10];
    let export = d.path().join("c1.img");
    tl(&s.pool, &["export", "c1", export.to_str().unwrap()]);
    std::fs::File::open(&export)
        .unwrap()
        .read_exact_at(&mut got, 0)
        .unwrap();
    assert!(got == block(1), "the flushed write is not in the pool");
}

#[test]
fn a_restart_that_cannot_start_leaves_the_old_server_serving() {
    require_prerequisites!();
    let (d, s, fs, writer) = container("64M");
    let pid = s.pid();
    // A binary that exits at once.
    let o = tl_output(&s.pool, &["restart", "--binary", "/bin/false"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/bin/false") && err.contains("serves on"),
        "{err}"
    );
    // One that starts, says hello, takes the state and then cannot open what it is given
    // (too few descriptors): the old server has let go of the pool by then and takes it back.
    let starved = script(
        &d.path().join("starved"),
        format!("exec prlimit --nofile=7 {} \"$@\"", bin()),
    );
    let o = tl_output(&s.pool, &["restart", "--binary", starved.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("did not take over") && err.contains("serves on"),
        "{err}"
    );
    assert_eq!(s.pid(), pid, "the old server no longer answers");
    // It serves: the writer goes on, and so do management requests.
    std::thread::sleep(Duration::from_millis(300));
    s.tl(&["create", "c2", "--size", "1M"]);
    finish(s, fs, writer);
}

#[test]
fn an_upgrade_runs_the_given_binary_and_a_second_restart_at_once_is_refused() {
    require_prerequisites!();
    let (d, s, fs, writer) = container("64M");
    // The "new version": another copy of the binary, started through a wrapper that says it
    // runs and then waits for the test, so the second restart lands while the first one is
    // surely under way (the server takes the restart slot before it starts the binary), on a
    // loaded machine as on an idle one. The wait is bounded, far inside the hello timeout.
    let copy = d.path().join("thinlayer-next");
    std::fs::copy(bin(), &copy).unwrap();
    let started = d.path().join("next-started");
    let go = d.path().join("next-go");
    let slow = script(
        &d.path().join("slow-next"),
        format!(
            "touch {started}\ni=0\nwhile [ ! -e {go} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\nexec {} \"$@\"",
            copy.display(),
            started = started.display(),
            go = go.display()
        ),
    );
    let first = Command::new(bin())
        .arg("--pool")
        .arg(&s.pool)
        .args(["restart", "--json", "--binary", slow.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first restart never started its binary"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = tl_output(&s.pool, &["restart"]);
    std::fs::write(&go, b"").unwrap();
    assert!(!second.status.success(), "two restarts at once both ran");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already under way"), "{err}");
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    wait_gone(out["old_pid"].as_i64().unwrap() as i32);
    let st = s.status();
    assert_eq!(st["binary"], slow.to_str().unwrap(), "{st}");
    // A later plain restart runs the binary serving now, the upgraded one.
    let (old, new) = s.restart(&[]);
    wait_gone(old);
    let exe = std::fs::read_link(format!("/proc/{new}/exe")).unwrap();
    assert_eq!(exe, copy.canonicalize().unwrap());
    finish(s, fs, writer);
}

#[test]
fn a_restart_asked_by_another_user_is_refused() {
    require_prerequisites!();
    let d = tempfile::tempdir().unwrap();
    // The other user must reach the socket's directory to be refused by the socket itself.
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Served::start(d.path());
    let pid = s.pid();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", bin()])
        .arg("--pool")
        .arg(&s.pool)
        .arg("restart")
        .output()
        .unwrap();
    assert!(!o.status.success(), "another uid restarted the server");
    assert_eq!(s.pid(), pid);
    assert!(!s.log().contains("handed over"), "{}", s.log());
    s.stop();
}

/// The old process accepts nothing once it has begun handing over (its accept loops are
/// held before the gate closes; the listening sockets stay open in the new one, so a client
/// that connects meanwhile waits in the backlog). Before, it went on accepting until it
/// exited, 100 ms after the `restart` reply: such a client got the old pid's answer or saw
/// its connection closed. Here a client asks `status` in a loop through three restarts:
/// every call is answered, and every one made after `restart` returned is answered by the new
/// process, up to the moment the old one is gone.
#[test]
fn once_a_restart_has_answered_only_the_new_server_accepts_and_no_client_is_refused() {
    require_prerequisites!();
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(dir.path());
    let status = |s: &Served| -> Result<i32, String> {
        let o = Command::new(bin())
            .arg("--pool")
            .arg(&s.pool)
            .args(["status", "--json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|_| {
            format!(
                "exit {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )
        })?;
        v["pid"]
            .as_i64()
            .map(|p| p as i32)
            .ok_or_else(|| format!("no pid in {v}"))
    };
    let done = AtomicBool::new(false);
    let failures = Mutex::new(Vec::<String>::new());
    let answered = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                match status(&s) {
                    Ok(_) => answered.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        failures.lock().unwrap().push(e);
                        0
                    }
                };
            }
        });
        // Set however the rounds end (a failed assertion too), or the scope would wait for
        // the looping client forever.
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _done = Done(&done);
        for round in 0..3 {
            let (old, new) = s.restart(&[]);
            // Until the old process is gone (and once after), every new connection is the
            // new process's.
            let mut asked = 0;
            loop {
                let gone = !Path::new(&format!("/proc/{old}")).exists()
                    || std::fs::read_to_string(format!("/proc/{old}/stat"))
                        .unwrap_or_default()
                        .rsplit(") ")
                        .next()
                        .is_some_and(|st| st.starts_with('Z'));
                let pid = status(&s).unwrap_or_else(|e| panic!("round {round}: status: {e}"));
                asked += 1;
                assert_eq!(
                    pid, new,
                    "round {round}: status after `restart` returned was answered by pid {pid}, \
                     not the new server {new} (the old one is {old}; call {asked})"
                );
                if gone {
                    break;
                }
            }
            eprintln!("round {round}: {asked} status call(s) until pid {old} was gone");
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of the looping client's calls failed: {failures:?}",
        failures.len()
    );
    eprintln!(
        "{} status calls answered through 3 restarts",
        answered.load(Ordering::SeqCst)
    );
    s.stop();
}

/// qemu's NBD client with `reconnect-delay` carries on through restarts: its connection ends
/// with the old process, it connects to the new one, and the requests the old one never
/// answered are sent again. qemu-io writes and flushes 64 KiB blocks, each with its own
/// pattern, while the server restarts twice: no request fails, and every block reads back.
#[test]
fn qemus_nbd_client_with_reconnect_delay_writes_through_two_restarts() {
    require_prerequisites!();
    if Command::new("qemu-io").arg("--version").output().is_err() {
        assert!(
            !support::in_ci(),
            "qemu-io is missing (CI installs qemu-utils)"
        );
        eprintln!("skipping: no qemu-io");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(dir.path());
    const BLOCKS: u64 = 600;
    s.tl(&["create", "vol", "--size", &format!("{}", BLOCKS * 65536)]);
    let mut cmds = Vec::new();
    for i in 0..BLOCKS {
        cmds.push("-c".to_string());
        cmds.push(format!("write -P {} {} 64k", i % 251, i * 65536));
        cmds.push("-c".to_string());
        cmds.push("flush".to_string());
        cmds.push("-c".to_string());
        cmds.push("sleep 10".to_string());
    }
    let sock = format!("{}.sock", s.pool.display());
    let opts =
        format!("driver=nbd,server.type=unix,server.path={sock},export=vol,reconnect-delay=30");
    let qemu = Command::new("qemu-io")
        .args(["--image-opts", &opts])
        .args(&cmds)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once some blocks are in, restart twice while qemu-io goes on writing.
    let written = || -> u64 {
        let ls: serde_json::Value = serde_json::from_str(&s.tl(&["ls", "--json"])).unwrap();
        ls.as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "vol")
            .unwrap()["size"]
            .as_u64()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while written() < 4 * 65536 {
        assert!(Instant::now() < deadline, "qemu-io wrote nothing in 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut pids = Vec::new();
    for _ in 0..2 {
        pids.push(s.restart(&[]));
    }
    let before_end = written();
    let out = qemu.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        before_end < BLOCKS * 65536,
        "qemu-io had written everything before the restarts were done: make it write longer"
    );
    assert!(
        out.status.success(),
        "qemu-io: {}\n{stdout}\n{stderr}",
        out.status
    );
    let failed: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains("failed") || l.contains("error") || l.contains("Error"))
        .collect();
    assert!(failed.is_empty(), "qemu-io reported: {failed:?}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("wrote 65536/65536"))
            .count() as u64,
        BLOCKS,
        "{stdout}"
    );
    // Every block reads back with its pattern (through the server, after the restarts).
    let exported = dir.path().join("vol.raw");
    s.tl(&["export", "vol", exported.to_str().unwrap()]);
    let data = std::fs::read(&exported).unwrap();
    for i in 0..BLOCKS {
        let block = &data[(i * 65536) as usize..((i + 1) * 65536) as usize];
        assert!(
            block.iter().all(|&b| b == (i % 251) as u8),
            "block {i} reads back wrong after the restarts ({pids:?})"
        );
    }
    let check = s.tl(&["check", "--data"]);
    assert!(check.contains("clean"), "check --data: {check}");
    eprintln!("qemu-io wrote {BLOCKS} blocks through restarts {pids:?}");
    s.stop();
}

/// `thinlayer --pool POOL serve --socket SOCK`, its stderr discarded.
fn spawn_serve(pool: &Path, sock: &Path) -> std::process::Child {
    Command::new(bin())
        .arg("--pool")
        .arg(pool)
        .args(["serve", "--socket"])
        .arg(sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A SIGTERM sent the moment the server's first socket appears (a supervisor stopping what it
/// just started) stops it cleanly: exit 0, its keeper gone, no socket or pool lock left. Before
/// the handlers were installed first, a SIGTERM in the window between the first bind and the
/// handlers killed the server by the signal, leaving its sockets behind (seen in
/// tests/containerd.rs, which stops a server right after its start).
#[test]
fn a_sigterm_as_soon_as_the_first_socket_appears_stops_the_server_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let pool = d.path().join("pool");
    tl(&pool, &["init"]);
    for round in 0..5 {
        let sock = d.path().join(format!("nbd-{round}.sock"));
        let mut server = spawn_serve(&pool, &sock);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(std::time::Instant::now() < deadline, "no socket in 30 s");
            std::thread::sleep(Duration::from_micros(100));
        }
        // SAFETY: signalling the server this test started, by its PID.
        unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
        let st = server.wait().unwrap();
        assert!(st.success(), "round {round}: serve exited with {st}");
        assert!(!sock.exists(), "round {round}: the socket stayed");
        // The pool is free again: a command opens it directly.
        tl(&pool, &["ls"]);
    }
}

/// Plain `serve`, no keeper flag: it has a keeper (status names a live pid other than the
/// server's), and a SIGTERM to the server stops both.
#[test]
fn a_plain_serve_has_a_keeper_and_a_sigterm_stops_both() {
    let d = tempfile::tempdir().unwrap();
    let pool = d.path().join("pool");
    tl(&pool, &["init"]);
    let sock = d.path().join("nbd.sock");
    let mut server = spawn_serve(&pool, &sock);
    wait_for(&support::control_path(&pool));
    let st: serde_json::Value = serde_json::from_str(&tl(&pool, &["status", "--json"])).unwrap();
    let pid = st["pid"].as_i64().unwrap() as i32;
    let keeper = st["keeper"].as_i64().map(|k| k as i32);
    // SAFETY: signalling the processes this test started, by the PIDs status reported.
    let stop = |sig| unsafe {
        if let Some(k) = keeper {
            if sig == libc::SIGKILL {
                libc::kill(k, sig);
            }
        }
        libc::kill(pid, sig);
    };
    let Some(k) = keeper.filter(|&k| k != pid && Path::new(&format!("/proc/{k}")).exists()) else {
        stop(libc::SIGKILL);
        let _ = server.wait();
        panic!("plain serve runs without a live keeper: {st}");
    };
    stop(libc::SIGTERM);
    assert!(server.wait().unwrap().success());
    wait_gone(k);
}

/// `serve --map-cache` bounds the cache of checksum pages the maps' paged runs take their crcs
/// from: `status` shows the budget, and the server a restart starts keeps it (it is in the
/// state handed over) rather than falling back to the default.
#[test]
fn the_map_cache_budget_is_shown_and_kept_through_a_restart() {
    require_prerequisites!();
    let d = tempfile::tempdir().unwrap();
    let s = Served::start_with(d.path(), &["--map-cache", "3M"]);
    let budget = |s: &Served| s.status()["map_cache"]["budget"].as_u64().unwrap();
    assert_eq!(budget(&s), 3 << 20);
    let (old, new) = s.restart(&[]);
    assert_ne!(old, new);
    assert_eq!(budget(&s), 3 << 20, "after a restart");
    s.stop();
}
