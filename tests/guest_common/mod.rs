//! The guest of tests/guest.rs: a Debian kernel under QEMU (tools/guest/run), whose console the
//! test reads line by line as it comes, and a control socket to step the guest along.
//!
//! Guests run one at a time: each uses two emulated CPUs, and the machine has two cores.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a guest may take to reach a step (boot included); emulation on a loaded machine is
/// slow, and a hung guest should still end the test.
const STEP_TIMEOUT: Duration = Duration::from_secs(400);

static ONE_GUEST_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Retries taken so far by this test binary: boots again, attaches again.
static RETRIES: AtomicUsize = AtomicUsize::new(0);

/// Count a retry and say so where every run shows it: straight to stderr, which the test
/// harness does not capture (`eprintln!` output of a passing test is hidden), so a CI log
/// shows each retry of a test that passed in the end.
pub fn note_retry(what: &str) -> usize {
    let n = RETRIES.fetch_add(1, Ordering::Relaxed) + 1;
    let line = format!("guest tests: retry #{n}: {what}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    n
}

/// A guest script's own retries: the `RETRY ...` lines `tools/guest/lib.sh` prints.
fn note_guest_retries(console: &Console) {
    for line in console
        .lines
        .iter()
        .filter_map(|l| l.strip_prefix("RETRY "))
    {
        note_retry(line.trim_end());
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether the guest tests must run: in CI a missing prerequisite is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Builds (or finds cached) the guest and returns the lock that lets this test boot one, or
/// `None` when something is missing here (the message names it). In CI a missing piece panics.
pub fn guest_or_skip(host_tools: &[&str]) -> Option<MutexGuard<'static, ()>> {
    let missing = missing_prerequisite(host_tools);
    if let Some(what) = missing {
        assert!(!in_ci(), "guest tests cannot run in CI: {what}");
        eprintln!("SKIP: {what}");
        return None;
    }
    Some(lock(&ONE_GUEST_AT_A_TIME))
}

fn missing_prerequisite(host_tools: &[&str]) -> Option<String> {
    for tool in host_tools {
        if !crate::support::have(tool) {
            return Some(format!(
                "{tool} is not installed on the host (.ci/run installs it)"
            ));
        }
    }
    let build = repo().join("tools/guest/build");
    let o = Command::new(&build).output().unwrap();
    match o.status.code() {
        Some(0) => None,
        // tools/guest/build exits 3 when something it needs is not there.
        Some(3) => Some(format!(
            "the guest cannot be built here: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        _ => panic!(
            "tools/guest/build failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What to give the guest.
#[derive(Default)]
pub struct Boot<'a> {
    /// The `thinlayer serve` socket and how many virtio-serial ports reach it.
    pub socket: Option<(&'a Path, usize)>,
    /// The `thinlayer serve` socket reached over the guest's network (lib.sh: nbd_net).
    pub net_socket: Option<&'a Path>,
    pub disks: Vec<(&'a str, &'a Path)>,
    pub smp: Option<usize>,
}

#[derive(Default)]
struct Console {
    lines: Vec<String>,
    ended: bool,
}

/// A running guest.
pub struct Guest {
    child: Child,
    console: Arc<(Mutex<Console>, Condvar)>,
    pidfile: PathBuf,
    control: PathBuf,
    control_stream: Option<UnixStream>,
}

impl Guest {
    /// Boots a guest in `dir` that runs `script` (busybox sh, with `. /lib/guest.sh` available).
    pub fn boot(dir: &Path, tag: &str, script: &str, how: &Boot) -> Guest {
        let script_file = dir.join(format!("{tag}.sh"));
        std::fs::write(&script_file, script).unwrap();
        let pidfile = dir.join(format!("{tag}.qemu.pid"));
        let control = dir.join(format!("{tag}.control"));
        let mut cmd = Command::new(repo().join("tools/guest/run"));
        cmd.arg("--pidfile").arg(&pidfile);
        cmd.arg("--control").arg(&control);
        if let Some((sock, ports)) = how.socket {
            cmd.arg("--socket").arg(sock);
            cmd.arg("--ports").arg(ports.to_string());
        }
        if let Some(sock) = how.net_socket {
            cmd.arg("--net-socket").arg(sock);
        }
        for (name, file) in &how.disks {
            cmd.arg("--disk").arg(format!("{name}={}", file.display()));
        }
        if let Some(n) = how.smp {
            cmd.arg("--smp").arg(n.to_string());
        }
        cmd.arg(&script_file);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let console = Arc::new((Mutex::new(Console::default()), Condvar::new()));
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let console = console.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    lock(&console.0).lines.push(line);
                    console.1.notify_all();
                }
                lock(&console.0).ended = true;
                console.1.notify_all();
            });
        }
        Guest {
            child,
            console,
            pidfile,
            control,
            control_stream: None,
        }
    }

    /// Everything the guest printed so far (console and the runner's messages).
    pub fn output(&self) -> String {
        lock(&self.console.0).lines.join("\n")
    }

    /// Waits until the guest script announces `step NAME`.
    pub fn wait_step(&self, name: &str) {
        let want = format!("STEP {name}");
        let deadline = Instant::now() + STEP_TIMEOUT;
        let (lock, cv) = &*self.console;
        let mut c = self::lock(lock);
        loop {
            if c.lines.iter().any(|l| l.trim_end() == want) {
                return;
            }
            let failed = c.lines.iter().any(|l| l.starts_with("GUEST FAIL"));
            if c.ended || failed || Instant::now() > deadline {
                let why = if failed {
                    "the guest script failed"
                } else if c.ended {
                    "the guest ended"
                } else {
                    "timed out"
                };
                let console = c.lines.join("\n");
                drop(c); // not poisoned for the console readers
                panic!("waiting for step {name}: {why}; console:\n{console}");
            }
            c = cv
                .wait_timeout(c, Duration::from_millis(500))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets a guest blocked in `wait_host WORD` go on.
    pub fn tell(&mut self, word: &str) {
        if self.control_stream.is_none() {
            let mut stream = None;
            for _ in 0..600 {
                if let Ok(s) = UnixStream::connect(&self.control) {
                    stream = Some(s);
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            self.control_stream = Some(
                stream.unwrap_or_else(|| panic!("no control socket {}", self.control.display())),
            );
        }
        let s = self.control_stream.as_mut().unwrap();
        s.write_all(format!("{word}\n").as_bytes()).unwrap();
    }

    /// Cuts the guest's power: SIGKILL to QEMU, by the PID it wrote. The runner then exits.
    pub fn kill(mut self) -> String {
        let pid: i32 = std::fs::read_to_string(&self.pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill(2) on the PID our own QEMU wrote to its pidfile.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let _ = self.child.wait();
        self.wait_output_end();
        self.output()
    }

    /// Waits for the guest to power off; panics, with the console, unless its script exited 0.
    /// Returns the console.
    pub fn succeed(mut self) -> String {
        let st = self.child.wait().unwrap();
        self.wait_output_end();
        let out = self.output();
        assert!(st.success(), "guest exited with {st}; console:\n{out}");
        out
    }

    /// Waits until the console has ended, and counts the retries the script reports.
    fn wait_output_end(&self) {
        let (lock, cv) = &*self.console;
        let mut c = self::lock(lock);
        while !c.ended {
            c = cv
                .wait_timeout(c, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        note_guest_retries(&c);
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // A test that panicked leaves its guest running: stop it, by PID.
        if let Ok(None) = self.child.try_wait() {
            if let Some(pid) = std::fs::read_to_string(&self.pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) on our own QEMU's PID.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `report NAME VALUE` lines of a console; indexing a name the guest never reported panics
/// with the console.
pub struct Reports {
    values: HashMap<String, String>,
    console: String,
}

impl Reports {
    pub fn get(&self, name: &str) -> Option<&String> {
        self.values.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = (&String, &String)> {
        self.values.iter()
    }
}

impl std::ops::Index<&str> for Reports {
    type Output = String;
    fn index(&self, name: &str) -> &String {
        self.values
            .get(name)
            .unwrap_or_else(|| panic!("the guest reported no {name}; console:\n{}", self.console))
    }
}

pub fn reports(console: &str) -> Reports {
    let values = console
        .lines()
        .filter_map(|l| l.strip_prefix("REPORT "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_end().to_string()))
        .collect();
    Reports {
        values,
        console: console.to_string(),
    }
}
