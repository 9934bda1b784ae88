//! Helpers shared by the tests that run the `thinlayer` binary and its server.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_thinlayer")
}

/// Whether `tool` is on PATH (or in /usr/sbin, /sbin, where mkfs and friends live).
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "command -v {tool} || test -x /usr/sbin/{tool} || test -x /sbin/{tool}"
        ))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether this is a CI run (`CI=true`, as `.ci/run` is run): there a missing prerequisite is
/// a failure of the CI's install step, never a reason to skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Why a test of live files cannot run here: not root, no /dev/fuse, or one of `tools`
/// missing. None: it can. With CI=true a missing prerequisite fails the test instead.
pub fn missing_root_fuse(tools: &[&str]) -> Option<String> {
    let why = missing_root_fuse_here(tools);
    if let Some(why) = &why {
        assert!(!in_ci(), "CI=true and this test cannot run: {why}");
    }
    why
}

fn missing_root_fuse_here(tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (FUSE mounts and loop devices need it)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse absent".into());
    }
    tools
        .iter()
        .find(|t| !have(t))
        .map(|t| format!("{t} not installed (CI installs it)"))
}

/// Run a shell command, expect success, return stdout.
pub fn sh(cmd: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        o.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Run `thinlayer --pool POOL ARGS`, whatever the outcome.
pub fn tl_output(pool: &Path, args: &[&str]) -> std::process::Output {
    tl_output_env(pool, &[], args)
}

/// As `tl_output`, with environment variables `env` set.
pub fn tl_output_env(pool: &Path, env: &[(&str, &Path)], args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .envs(env.iter().copied())
        .arg("--pool")
        .arg(pool)
        .args(args)
        .output()
        .unwrap()
}

/// Run `thinlayer --pool POOL ARGS`, expect success, return stdout.
pub fn tl(pool: &Path, args: &[&str]) -> String {
    tl_env(pool, &[], args)
}

/// As `tl`, with environment variables `env` set.
pub fn tl_env(pool: &Path, env: &[(&str, &Path)], args: &[&str]) -> String {
    let o = tl_output_env(pool, env, args);
    assert!(
        o.status.success(),
        "thinlayer {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

pub fn wait_for(p: &Path) {
    for _ in 0..400 {
        if p.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} never appeared", p.display());
}

/// Wait until a server answers on the Unix socket `p`: a file left by a killed server is
/// there at once but refuses connections until the new server has replaced it.
pub fn wait_listening(p: &Path) {
    for _ in 0..1000 {
        if std::os::unix::net::UnixStream::connect(p).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nobody listens on {}", p.display());
}

/// Where `serve` puts a pool's control socket by default.
pub fn control_path(pool: &Path) -> PathBuf {
    let mut p = pool.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// A running `thinlayer serve` on a Unix socket. `stop` ends it as an operator would (SIGTERM:
/// commit, exit 0); dropping it kills it.
pub struct Server {
    pub child: Child,
    pub sock: PathBuf,
}

impl Server {
    pub fn start(pool: &Path, sock: &Path) -> Server {
        Server::start_logging(pool, sock, Stdio::null())
    }

    /// As `start`, with the server's stderr (one line per connection) going to `log`.
    pub fn start_logging(pool: &Path, sock: &Path, log: impl Into<Stdio>) -> Server {
        Server::start_with(pool, sock, &[], log)
    }

    /// As `start_logging`, with more `serve` arguments. Without a keeper unless `args` ask for
    /// one (`--keeper`): these servers are ended by SIGKILL (Drop, kill9), which a keeper would
    /// answer with a new server.
    pub fn start_with(pool: &Path, sock: &Path, args: &[&str], log: impl Into<Stdio>) -> Server {
        Server::start_env(pool, sock, args, log, &[])
    }

    /// As `start_with`, with environment variables `env` set for the server.
    pub fn start_env(
        pool: &Path,
        sock: &Path,
        args: &[&str],
        log: impl Into<Stdio>,
        env: &[(&str, &Path)],
    ) -> Server {
        let child = Command::new(bin())
            .envs(env.iter().copied())
            .arg("--pool")
            .arg(pool)
            .args(["serve", "--socket"])
            .arg(sock)
            .args(keeper_unless_asked(args))
            .args(args)
            .stderr(log)
            .spawn()
            .unwrap();
        // The control socket is bound last: once it answers, the server is ready.
        wait_for(sock);
        wait_listening(&control_path(pool));
        Server {
            child,
            sock: sock.to_path_buf(),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child, by its PID.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let st = self.child.wait().unwrap();
        assert!(st.success(), "serve exited with {st}");
        let _ = std::fs::remove_file(&self.sock);
        std::mem::forget(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// `--no-keeper`, unless `args` ask for the keeper: test servers are stopped by SIGKILL, and
/// only the tests of crash restarts want a keeper to answer that with a new server.
pub fn keeper_unless_asked(args: &[&str]) -> Option<&'static str> {
    (!args.contains(&"--keeper")).then_some("--no-keeper")
}

/// The processes serving a pool now, from `status`: the server's pid and its keeper's, if
/// any. After `thinlayer restart` or a crash they are no child of the test's.
pub fn serving(pool: &Path) -> Option<(i32, Option<i32>)> {
    let out = Command::new(bin())
        .arg("--pool")
        .arg(pool)
        .args(["status", "--json"])
        .output()
        .ok()?;
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let pid = st["pid"].as_i64()? as i32;
    Some((pid, st["keeper"].as_i64().map(|k| k as i32)))
}

/// Waits until `pid` has exited (a zombie counts: its parent may be gone too); fails after
/// 60 s.
pub fn wait_gone(pid: i32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} still runs after 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops what serves `pool` as an operator would: SIGTERM to the serving pid (it commits and
/// exits, and its keeper with it), waiting until both are gone. False when nothing answers.
pub fn stop_serving(pool: &Path) -> bool {
    let Some((pid, keeper)) = serving(pool) else {
        return false;
    };
    // SAFETY: signalling the server this test started, by the pid it reported.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_gone(pid);
    if let Some(k) = keeper {
        wait_gone(k);
    }
    true
}

/// Kills what serves `pool` when dropped, the keeper first (or it would start another
/// server): a test that fails after a restart leaves no server behind.
pub struct KillServing<'a>(pub &'a Path);

impl Drop for KillServing<'_> {
    fn drop(&mut self) {
        if let Some((pid, keeper)) = serving(self.0) {
            for p in keeper.into_iter().chain([pid]) {
                // SAFETY: killing a process this test's server started, by its PID.
                unsafe { libc::kill(p, libc::SIGKILL) };
                wait_gone(p);
            }
        }
    }
}

/// Waits until containerd (its socket `ctr_socket`, namespace `ns`) reaches the proxy
/// snapshotter `snapshotter` again (`ctr snapshots ls` succeeds), and says how long it took.
/// After a restart or a kill of thinlayer containerd's gRPC connection comes back by itself,
/// with back-off, and its calls meanwhile fail cleanly (`unavailable`: containerd 1.6 dials
/// with a handshake deadline as short as its back-off step, so a server still opening the
/// pool under load times it out). Fails after 30 s, with ctr's last error.
pub fn wait_snapshotter(ctr_socket: &Path, ns: &str, snapshotter: &str) {
    let since = std::time::Instant::now();
    let mut last = String::new();
    while since.elapsed() < Duration::from_secs(30) {
        let o = Command::new("ctr")
            .arg("-a")
            .arg(ctr_socket)
            .args(["-n", ns, "snapshots", "--snapshotter", snapshotter, "ls"])
            .output()
            .unwrap();
        if o.status.success() {
            eprintln!(
                "containerd reached {snapshotter} again after {} ms",
                since.elapsed().as_millis()
            );
            return;
        }
        last = String::from_utf8_lossy(&o.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("containerd did not reach {snapshotter} again in 30 s: {last}");
}

/// Clear every loop device whose backing file is under `dir` (a killed server's live files:
/// the snapshotter's devices outlive it, and the next start would clear them, but a test
/// ends there). A device with a filesystem mounted is cleared when that is unmounted.
pub fn clear_loop_devices_under(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else {
        return;
    };
    let prefix = format!("{}/", dir.display());
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return;
    };
    for e in entries.flatten() {
        let backing = std::fs::read_to_string(e.path().join("loop/backing_file"));
        if backing.is_ok_and(|b| b.starts_with(&prefix)) {
            let dev = Path::new("/dev").join(e.file_name());
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(dev)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The data ranges of a sparse file (SEEK_DATA / SEEK_HOLE).
pub fn data_ranges(f: &Path) -> Vec<(u64, u64)> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::open(f).unwrap();
    let fd = file.as_raw_fd();
    let len = file.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut at = 0i64;
    while at < len {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        out.push((data as u64, hole as u64));
        at = hole;
    }
    out
}
