//! thinlayer as containerd's snapshotter (src/snapshot/): a real containerd 1.6 with runc,
//! pulling two images from a real registry on 127.0.0.1 and running containers on thinlayer
//! layers. Images are built offline with umoci from busybox-static and pushed with skopeo.
//! Every daemon runs from a temp dir with its own config and is stopped by PID. One
//! containerd serves several checks, so the suite stays quick. Needs root, /dev/fuse and the
//! tools `.ci/run` installs; skips with a message otherwise.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod support;
use support::{
    control_path, have, serving, sh, stop_serving, tl, tl_output, wait_for, wait_gone, KillServing,
    Server,
};

/// containerd's namespace for this run's containers: runc keeps its state under
/// /run/containerd/runc/NAMESPACE/ID whichever containerd started it, so a constant name
/// collides with a concurrent run of these tests and with what a killed run left
/// ("container with given ID already exists"). One per test process.
fn ns() -> &'static str {
    static NS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NS.get_or_init(|| format!("testns-{}", std::process::id()))
}
/// Where the 1-byte write lands: the middle of the app image's 64 MiB file.
const BIG: &str = "/app/big";
const BIG_LEN: u64 = 64 << 20;

/// Why these tests cannot run here; with CI=true a missing prerequisite fails instead.
fn missing_prerequisite() -> Option<String> {
    let why = missing_prerequisite_here();
    if let Some(why) = &why {
        assert!(!support::in_ci(), "CI=true and this test cannot run: {why}");
    }
    why
}

fn missing_prerequisite_here() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (containerd, loop devices and FUSE need it)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse absent".into());
    }
    for tool in [
        "containerd",
        "ctr",
        "runc",
        "docker-registry",
        "skopeo",
        "umoci",
        "mkfs.ext4",
    ] {
        if !have(tool) {
            return Some(format!("{tool} not installed (.ci/run installs it)"));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox absent (busybox-static; .ci/run installs it)".into());
    }
    None
}

/// A process we started, killed by its PID when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A registry on 127.0.0.1 (no auth, storage in `dir`) holding `test/base:1` and `test/app:1`:
/// busybox, then a layer adding /app/hello.sh and a 64 MiB file.
fn registry_with_images(dir: &Path) -> (Daemon, String) {
    let oci = dir.join("oci");
    let o = |s: &str| format!("{}:{s}", oci.display());
    sh(&format!("umoci init --layout {}", oci.display()));
    sh(&format!("umoci new --image {}", o("base")));
    let b1 = dir.join("b1");
    sh(&format!(
        "umoci unpack --image {} {}",
        o("base"),
        b1.display()
    ));
    let root = b1.join("rootfs");
    for d in ["bin", "tmp", "proc", "sys", "dev", "etc"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for t in [
        "sh", "cat", "echo", "dd", "sync", "true", "printf", "head", "stat",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(t)).unwrap();
    }
    sh(&format!(
        "umoci repack --image {} {}",
        o("base"),
        b1.display()
    ));
    sh(&format!(
        "umoci config --image {} --config.cmd /bin/sh",
        o("base")
    ));
    let b2 = dir.join("b2");
    sh(&format!(
        "umoci unpack --image {} {}",
        o("base"),
        b2.display()
    ));
    let app = b2.join("rootfs/app");
    fs::create_dir_all(&app).unwrap();
    fs::write(
        app.join("hello.sh"),
        "#!/bin/sh\necho hello from thinlayer\n",
    )
    .unwrap();
    // Not zeros (those cost no block anywhere) and compressible, so the push is quick.
    let line = b"thinlayer test pattern, 32 bytes";
    let big: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(BIG_LEN as usize)
        .collect();
    fs::write(app.join("big"), big).unwrap();
    sh(&format!(
        "umoci repack --image {} {}",
        o("app"),
        b2.display()
    ));

    let port = free_port();
    let config = dir.join("registry.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("registry").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("registry.log")).unwrap())
        .spawn()
        .unwrap();
    let registry = Daemon(child);
    let host = format!("127.0.0.1:{port}");
    for _ in 0..200 {
        if std::net::TcpStream::connect(&host).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    for image in ["base", "app"] {
        sh(&format!(
            "skopeo copy --quiet --dest-tls-verify=false oci:{} docker://{host}/test/{image}:1",
            o(image)
        ));
    }
    (registry, host)
}

/// `thinlayer serve` with live files and the containerd socket; its mount is detached lazily
/// when dropped, so a failed test leaves no dead mount behind.
struct Thinlayer {
    server: Option<Server>,
    /// More `serve` arguments (`--keeper`).
    serve_args: Vec<String>,
    pool: PathBuf,
    files: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Thinlayer {
    fn start(dir: &Path, name: &str) -> Thinlayer {
        Thinlayer::start_init(dir, name, &[])
    }

    /// As `start`, with more `init` arguments (`--max-size`).
    fn start_init(dir: &Path, name: &str, init: &[&str]) -> Thinlayer {
        let pool = dir.join(format!("{name}.pool"));
        let files = dir.join(format!("{name}.files"));
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        tl(&pool, &[&["init"], init].concat());
        let mut t = Thinlayer {
            server: None,
            serve_args: Vec::new(),
            pool,
            files,
            socket,
            log,
        };
        t.restart();
        t
    }

    fn restart(&mut self) {
        assert!(self.server.is_none());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut args = vec![
            "--files",
            self.files.to_str().unwrap(),
            "--containerd-socket",
            self.socket.to_str().unwrap(),
        ];
        args.extend(self.serve_args.iter().map(String::as_str));
        let nbd = self.pool.with_extension("nbd");
        self.server = Some(Server::start_with(&self.pool, &nbd, &args, log));
        wait_for(&self.socket);
    }

    fn stop(&mut self) {
        self.server.take().unwrap().stop();
    }

    fn kill9(&mut self) {
        let s = self.server.take().unwrap();
        s.signal(libc::SIGKILL);
        drop(s);
        // A killed server leaves its socket files; gone, they cannot pass for a restarted
        // server being ready (the new one replaces stale ones itself).
        let nbd = self.pool.with_extension("nbd");
        for stale in [&self.socket, &nbd, &control_path(&self.pool)] {
            let _ = fs::remove_file(stale);
        }
        support::clear_loop_devices_under(&self.files);
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.files)
            .stderr(Stdio::null())
            .status();
    }

    /// `thinlayer ls --json`, by layer name.
    fn layers(&self) -> BTreeMap<String, Value> {
        let v: Value = serde_json::from_str(&tl(&self.pool, &["ls", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| (l["name"].as_str().unwrap().to_string(), l.clone()))
            .collect()
    }

    /// The active snapshots' layers left once containerd's garbage collection had some
    /// seconds to remove them (it runs soon after a removal, not at once).
    fn active_after_gc(&self) -> Vec<String> {
        let active = || -> Vec<String> {
            let layers = self.layers().into_values();
            let active = layers.filter(|l| l["attrs"]["containerd.kind"] == "active");
            active
                .map(|l| l["name"].as_str().unwrap().to_string())
                .collect()
        };
        for _ in 0..300 {
            let left = active();
            if left.is_empty() {
                return left;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        active()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait (a few seconds at most) until containerd is writing a layer: an active snapshot
    /// holding more than 1 MiB. False if that was never seen.
    fn wait_applying(&self) -> bool {
        for _ in 0..600 {
            if self.layers().values().any(|l| {
                l["attrs"]["containerd.kind"] == "active" && l["size"].as_u64().unwrap() > 1 << 20
            }) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The snapshots thinlayer holds for containerd in this run's namespace (`ns`): kind by containerd's own
    /// key (its first word), the `NAMESPACE/N/` prefix of the key it gave the snapshotter taken off.
    fn snapshots(&self) -> BTreeMap<String, String> {
        let prefix = format!("{}/", ns());
        self.layers()
            .into_values()
            .filter_map(|l| {
                let key = l["attrs"]["containerd.key"].as_str()?;
                let (_, name) = key.strip_prefix(&prefix)?.split_once('/')?;
                // An extract key is `extract-NANOS-RAND CHAINID`; `ctr snapshots ls` pads
                // its columns with spaces, so only the first word can be compared with it.
                let name = name.split(' ').next().unwrap();
                let kind = l["attrs"]["containerd.kind"].as_str().unwrap_or("?");
                Some((name.to_string(), kind.to_string()))
            })
            .collect()
    }
}

impl Drop for Thinlayer {
    fn drop(&mut self) {
        // After a restart or a kill the serving process (and a keeper) are not the child.
        drop(KillServing(&self.pool));
        drop(self.server.take());
        support::clear_loop_devices_under(&self.files);
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.files)
            .stderr(Stdio::null())
            .status();
    }
}

/// containerd with root, state and sockets in `dir`, the proxy snapshotters `plugins` (name,
/// socket), and no CRI. Dropped: its shims and itself are killed by PID, its mounts detached.
struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    daemon: Option<Daemon>,
}

impl Containerd {
    fn start(dir: &Path, plugins: &[(&str, &Path)]) -> Containerd {
        let dir = dir.join("containerd");
        fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("c.sock");
        let mut config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [proxy_plugins]\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
        );
        for (name, path) in plugins {
            config += &format!(
                "  [proxy_plugins.{name}]\n    type = \"snapshot\"\n    address = \"{}\"\n",
                path.display()
            );
        }
        fs::write(dir.join("config.toml"), config).unwrap();
        let mut c = Containerd {
            dir,
            socket,
            daemon: None,
        };
        c.restart();
        c
    }

    /// Start the daemon on the same config, root and state (again, after `kill9`).
    fn restart(&mut self) {
        assert!(self.daemon.is_none());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(Daemon(child));
        wait_for(&self.socket);
        // A killed daemon leaves its socket file behind: ready is when it answers.
        for _ in 0..200 {
            if self.ctr_output(&["version"]).status.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGKILL the daemon by its PID (Child::kill), shims and mounts left as they are.
    fn kill9(&mut self) {
        drop(self.daemon.take().unwrap());
    }

    fn ctr_output(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", ns()])
            .args(args)
            .output()
            .unwrap()
    }

    /// `ctr run` of `sh -c SCRIPT` in a container `id` of `image` on the thinlayer snapshotter,
    /// in the background, its output piped.
    fn run_background(&self, image: &str, id: &str, script: &str) -> Child {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args([
                "-n",
                ns(),
                "run",
                "--cgroup",
                "",
                "--snapshotter",
                "thinlayer",
            ])
            .args([image, id, "/bin/sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Run `ctr ARGS`, expect success, return stdout.
    fn ctr(&self, args: &[&str]) -> String {
        let o = self.ctr_output(args);
        assert!(
            o.status.success(),
            "ctr {args:?} failed: {}{}\ncontainerd log tail:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log_tail()
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn pull(&self, snapshotter: &str, image: &str) -> std::process::Output {
        self.ctr_output(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            image,
        ])
    }

    /// `ctr image pull` of `image` onto `snapshotter`, in the background.
    fn pull_background(&self, snapshotter: &str, image: &str) -> Child {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", ns(), "image", "pull", "--plain-http"])
            .args(["--snapshotter", snapshotter, image])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `ctr snapshots ls` on `snapshotter`: kind by key.
    fn snapshots(&self, snapshotter: &str) -> BTreeMap<String, String> {
        let out = self.ctr(&["snapshots", "--snapshotter", snapshotter, "ls"]);
        // KEY PARENT KIND, where PARENT may be empty: the key is first and the kind last.
        out.lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0].to_string(), f[f.len() - 1].to_lowercase())
            })
            .collect()
    }

    /// `ctr run` (without --rm: the snapshot stays for measuring), expect success, stdout.
    fn run(&self, snapshotter: &str, image: &str, id: &str, script: &str) -> String {
        self.ctr(&[
            "run",
            "--cgroup",
            "",
            "--snapshotter",
            snapshotter,
            image,
            id,
            "/bin/sh",
            "-c",
            script,
        ])
    }

    /// After a restart of `snapshotter`'s server: containerd's connection to it comes back
    /// on its own; wait for that.
    fn wait_reconnected(&self, snapshotter: &str) {
        support::wait_snapshotter(&self.socket, ns(), snapshotter);
    }

    /// Bytes each snapshot holds by itself, as `ctr snapshots usage -b` says.
    fn usage(&self, snapshotter: &str) -> BTreeMap<String, u64> {
        let out = self.ctr(&["snapshots", "--snapshotter", snapshotter, "usage", "-b"]);
        out.lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0].to_string(), f[1].parse().unwrap())
            })
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Shims outlive containerd by design, and a container outlives a killed shim, its
        // state kept by runc: each container of this containerd is deleted through runc (by
        // its id, in this run's namespace: killed, its state removed), then each shim is
        // stopped by the PID it recorded.
        let tasks = self
            .dir
            .join("state/io.containerd.runtime.v2.task")
            .join(ns());
        let runc_root = format!("/run/containerd/runc/{}", ns());
        for task in fs::read_dir(&tasks).into_iter().flatten().flatten() {
            let _ = Command::new("runc")
                .args(["--root", &runc_root, "delete", "--force"])
                .arg(task.file_name())
                .stderr(Stdio::null())
                .status();
            if let Ok(pid) = fs::read_to_string(task.path().join("shim.pid")) {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    // SAFETY: signalling a shim this test's containerd started, by its PID.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // A shim whose task containerd already dropped (its container exited) waits for a
        // shutdown that a failed test never sends: found by the address it was started with.
        let address = self.socket.display().to_string();
        for pid in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = pid.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let args = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = args.split(|b| *b == 0).collect();
            if args
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == address.as_bytes())
            {
                // SAFETY: a shim of this test's containerd, by its PID.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // Empty once every test of this run has deleted its containers.
        let _ = fs::remove_dir(&runc_root);
        drop(self.daemon.take());
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let ours = self.dir.display().to_string();
        for m in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
            if m.starts_with(&ours) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
}

fn size_of(layers: &BTreeMap<String, Value>, name: &str) -> u64 {
    layers[name]["size"].as_u64().unwrap()
}

/// The layer whose containerd key is `NAMESPACE/N/id` for container (or snapshot) `id`.
fn layer_of<'a>(layers: &'a BTreeMap<String, Value>, id: &str) -> &'a Value {
    let suffix = format!("/{id}");
    let found: Vec<_> = layers
        .values()
        .filter(|l| {
            l["attrs"]["containerd.key"]
                .as_str()
                .is_some_and(|k| k.starts_with(ns()) && k.ends_with(&suffix))
        })
        .collect();
    assert_eq!(found.len(), 1, "one layer for snapshot {id}: {found:?}");
    found[0]
}

fn check_clean(pool: &Path) {
    let o = tl_output(pool, &["check"]);
    assert!(
        o.status.success(),
        "thinlayer check: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The happy path and its measurements, on one containerd: pull both images, run a
/// container that prints a file of the app layer, five idle containers of size about 0, the
/// 1-byte write in the 64 MiB file against overlayfs, and a restart of thinlayer after which
/// containerd runs the image again without pulling.
#[test]
fn containerd_pulls_and_runs_containers_on_thinlayer_snapshots() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipping: {why}");
        return;
    }
    // Its 1-byte write runs `sync`.
    let _syncs = GLOBAL_SYNCS.read().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (_registry, host) = registry_with_images(dir.path());
    let mut thin = Thinlayer::start(dir.path(), "thin");
    let ctd = Containerd::start(dir.path(), &[("thinlayer", &thin.socket)]);
    let base = format!("{host}/test/base:1");
    let app = format!("{host}/test/app:1");

    // Pull both: the app image's first layer is the base image's, stored once.
    for image in [&base, &app] {
        let o = ctd.pull("thinlayer", image);
        assert!(
            o.status.success(),
            "pull {image}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            ctd.log_tail()
        );
    }
    let layers = thin.layers();
    let committed: Vec<&String> = layers
        .keys()
        .filter(|n| layers[*n]["attrs"]["containerd.kind"] == "committed")
        .collect();
    assert_eq!(
        committed.len(),
        2,
        "two image layers, the shared one once: {committed:?}"
    );
    for n in &committed {
        assert!(
            n.starts_with(&format!("{}/", ns())) && n.contains("/sha256:"),
            "readable name {n:?}"
        );
    }
    let app_layer = committed
        .iter()
        .find(|n| size_of(&layers, n) >= BIG_LEN)
        .expect("the app layer holds the 64 MiB file");
    let app_virtual = layers[*app_layer]["virtual_size"].as_u64().unwrap();

    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--cgroup",
        "",
        "--snapshotter",
        "thinlayer",
        &app,
        "t1",
        "/bin/sh",
        "-c",
        "cat /app/hello.sh; echo ok",
    ]);
    assert_eq!(out, "#!/bin/sh\necho hello from thinlayer\nok\n");

    // Five idle containers: five layers of about nothing over the image's virtual size, and
    // containerd's usage agrees with thinlayer's counters exactly.
    for i in 1..=5 {
        ctd.run("thinlayer", &app, &format!("c{i}"), "true");
    }
    // Usage first: for a stopped container it trims the journal's dead log (what `ls` then
    // shows too).
    let usage = ctd.usage("thinlayer");
    let layers = thin.layers();
    for i in 1..=5 {
        let id = format!("c{i}");
        let l = layer_of(&layers, &id);
        let size = l["size"].as_u64().unwrap();
        assert!(
            size <= 256 << 10,
            "container {id}: {size} bytes, expected about 0"
        );
        assert_eq!(l["virtual_size"].as_u64().unwrap(), app_virtual + size);
        assert_eq!(usage[&id], size, "ctr snapshots usage of {id}");
        eprintln!("container {id}: layer {:?}, size {size} bytes", l["name"]);
    }

    // One byte in the middle of the 64 MiB file: a block for thinlayer, a copy-up of the
    // whole file for overlayfs. Each is measured against an idle container of its own kind.
    let write = format!(
        "printf x | dd of={BIG} bs=1 seek={} conv=notrunc 2>/dev/null; sync",
        BIG_LEN / 2
    );
    let o = ctd.pull("overlayfs", &app);
    assert!(
        o.status.success(),
        "pull on overlayfs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    ctd.run("overlayfs", &app, "o-idle", "true");
    ctd.run("overlayfs", &app, "o-write", &write);
    ctd.run("thinlayer", &app, "w1", &write);

    let thin_usage = ctd.usage("thinlayer");
    let overlay_usage = ctd.usage("overlayfs");
    let thin_growth = thin_usage["w1"].saturating_sub(thin_usage["c1"]);
    let overlay_growth = overlay_usage["o-write"].saturating_sub(overlay_usage["o-idle"]);
    eprintln!(
        "1-byte write in a 64 MiB file: thinlayer snapshot +{thin_growth} bytes, overlayfs +{overlay_growth} bytes"
    );
    assert!(
        overlay_growth >= BIG_LEN,
        "overlayfs copies the whole file up"
    );
    assert!(
        thin_growth <= 16 * 4096,
        "thinlayer stores the written block and a few of ext4's metadata blocks, not the file: +{thin_growth}"
    );

    // Restart thinlayer with every container stopped: containerd still sees its snapshots,
    // an existing container starts again (Mounts attaches its file anew) and the image runs
    // without a pull.
    let before = ctd.ctr(&["snapshots", "--snapshotter", "thinlayer", "ls"]);
    thin.stop();
    check_clean(&thin.pool);
    thin.restart();
    ctd.wait_reconnected("thinlayer");
    assert_eq!(
        ctd.ctr(&["snapshots", "--snapshotter", "thinlayer", "ls"]),
        before
    );
    ctd.ctr(&["task", "start", "c1"]);
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--cgroup",
        "",
        "--snapshotter",
        "thinlayer",
        &app,
        "t2",
        "/bin/sh",
        "-c",
        "cat /app/hello.sh",
    ]);
    assert_eq!(out, "#!/bin/sh\necho hello from thinlayer\n");

    // Removing the containers removes their layers; the image layers stay.
    for id in ["c1", "c2", "c3", "c4", "c5", "w1"] {
        ctd.ctr(&["container", "rm", id]);
    }
    assert_eq!(
        thin.active_after_gc(),
        Vec::<String>::new(),
        "no active snapshot left"
    );
    assert_eq!(
        thin.layers().len(),
        3,
        "the base and the two image layers stay"
    );
    thin.stop();
    check_clean(&thin.pool);
    assert!(!thin.log().contains("panicked"), "{}", thin.log());
}

/// A real NBD client (libnbd, from the system's Python) holding export `layer` of `thin`,
/// writable, until dropped (killed by PID).
fn nbd_client_holding(thin: &Thinlayer, layer: &str) -> Daemon {
    let uri = thin.server.as_ref().unwrap().uri(layer);
    let mut client = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import nbd, sys, time\n\
             h = nbd.NBD()\n\
             h.connect_uri(sys.argv[1])\n\
             print('connected', flush=True)\n\
             time.sleep(600)\n",
            &uri,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(client.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "connected\n", "the NBD client of {layer:?} connected");
    Daemon(client)
}

/// The layer of containerd's snapshot `name` (its key ends with `/name`).
fn snapshot_layer(thin: &Thinlayer, name: &str) -> Option<Value> {
    let suffix = format!("/{name}");
    thin.layers().into_values().find(|l| {
        l["attrs"]["containerd.key"]
            .as_str()
            .is_some_and(|k| k.ends_with(&suffix))
    })
}

/// The live pool's rules hold for containerd as for `thinlayer rm` and `commit`: while a real
/// NBD client has a snapshot's layer open, containerd's Commit is refused with
/// FailedPrecondition naming the connection, and its Remove (which containerd's garbage
/// collector sends after `ctr snapshots rm`) is refused the same way, the layer kept. Once
/// the client lets go, the commit goes through and the committed layer has its content ID.
#[test]
fn containerd_cannot_remove_or_commit_a_layer_an_nbd_client_holds() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipping: {why}");
        return;
    }
    let has_libnbd = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_libnbd {
        assert!(
            !support::in_ci(),
            "CI=true and /usr/bin/python3 has no nbd module (python3-libnbd)"
        );
        eprintln!("skipping: /usr/bin/python3 has no nbd module (python3-libnbd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let thin = Thinlayer::start(dir.path(), "held");
    let ctd = Containerd::start(dir.path(), &[("thinlayer", &thin.socket)]);
    let snap = |args: &[&str]| {
        let all = [&["snapshots", "--snapshotter", "thinlayer"][..], args].concat();
        ctd.ctr_output(&all)
    };
    let refused_naming_the_connection =
        |e: &str| e.contains("in use by 1 NBD connection") && e.contains("unix client #");

    // Commit while held: refused, nothing changed.
    assert!(snap(&["prepare", "held"]).status.success());
    let layer = snapshot_layer(&thin, "held").expect("the prepared snapshot's layer");
    let layer = layer["name"].as_str().unwrap().to_string();
    let client = nbd_client_holding(&thin, &layer);
    let o = snap(&["commit", "sealed", "held"]);
    assert!(!o.status.success(), "commit of a held layer went through");
    let e = stderr_of(&o);
    assert!(
        e.contains("failed precondition") && refused_naming_the_connection(&e),
        "{e}"
    );
    let l = &thin.layers()[&layer];
    assert_eq!(l["attrs"]["containerd.kind"], "active", "nothing changed");
    assert_eq!(l["writable"], true);

    // The client gone, containerd commits, and the committed layer has its content ID.
    drop(client);
    assert!(
        eventually(|| snap(&["commit", "sealed", "held"]).status.success()),
        "commit after the client left: {}",
        ctd.log_tail()
    );
    let sealed = snapshot_layer(&thin, "sealed").expect("the committed snapshot's layer");
    assert!(
        sealed["attrs"]["content.digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{sealed}"
    );

    // Remove while held: containerd forgets the snapshot at once, and its garbage collector's
    // Remove is refused (FailedPrecondition, "failed precondition" in its log), the layer kept.
    assert!(snap(&["prepare", "held2", "sealed"]).status.success());
    let layer2 = snapshot_layer(&thin, "held2").expect("the second snapshot's layer");
    let layer2 = layer2["name"].as_str().unwrap().to_string();
    let client = nbd_client_holding(&thin, &layer2);
    assert!(snap(&["rm", "held2"]).status.success());
    let log = || fs::read_to_string(ctd.dir.join("containerd.log")).unwrap_or_default();
    assert!(
        eventually(|| log().lines().any(|l| {
            l.contains("failed to remove snapshot")
                && l.contains("failed precondition")
                && refused_naming_the_connection(l)
        })),
        "no refused Remove in containerd's log: {}",
        ctd.log_tail()
    );
    assert!(
        thin.layers().contains_key(&layer2),
        "the held layer is kept"
    );
    drop(client);
    check_clean(&thin.pool);
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The failure cases, each on its own pool behind one containerd: thinlayer killed while
/// containerd applies a layer, a pool too full for a formatted base (ResourceExhausted
/// reaches ctr, naming the snapshot), and a pool that fills up during an apply. Each leaves
/// `check` clean and nothing half-made, and the pool works again afterwards.
#[test]
fn failures_leave_nothing_half_made_and_reach_ctr_as_clear_statuses() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_registry, host) = registry_with_images(dir.path());
    let mut kill = Thinlayer::start(dir.path(), "kill");
    let tiny = Thinlayer::start_init(dir.path(), "tiny", &["--max-size", "2M"]);
    let full = Thinlayer::start_init(dir.path(), "full", &["--max-size", "40M"]);
    let ctd = Containerd::start(
        dir.path(),
        &[
            ("kill", &kill.socket),
            ("tiny", &tiny.socket),
            ("full", &full.socket),
        ],
    );
    let base = format!("{host}/test/base:1");
    let app = format!("{host}/test/app:1");

    // thinlayer killed while the app layer's 64 MiB are being written.
    let o = ctd.pull("kill", &base);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let mut pull = ctd.pull_background("kill", &app);
    assert!(kill.wait_applying(), "the apply never started writing");
    kill.kill9();
    let st = pull.wait().unwrap();
    assert!(
        !st.success(),
        "the pull cannot succeed without its snapshotter"
    );
    kill.restart();
    check_clean(&kill.pool);
    ctd.wait_reconnected("kill");
    // containerd pulls again; its garbage collector removes the extract snapshot the kill
    // left (containerd had forgotten it), and the image runs.
    let o = ctd.pull("kill", &app);
    assert!(
        o.status.success(),
        "pull after the restart: {}",
        stderr_of(&o)
    );
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--cgroup",
        "",
        "--snapshotter",
        "kill",
        &app,
        "k1",
        "/bin/cat",
        "/app/hello.sh",
    ]);
    assert_eq!(out, "#!/bin/sh\necho hello from thinlayer\n");
    let left = kill.active_after_gc();
    assert_eq!(
        left,
        Vec::<String>::new(),
        "containerd's GC removed what the kill left"
    );
    check_clean(&kill.pool);

    // A pool with no room for the formatted base: the snapshotter answers ResourceExhausted
    // naming the snapshot (containerd 1.6's error conversion knows no such code and shows
    // "unknown" after the message), and no half-made base is left.
    let o = ctd.pull("tiny", &base);
    assert!(!o.status.success());
    let e = stderr_of(&o);
    assert!(
        e.contains("pool full") && e.contains(&format!("snapshot \"{}/", ns())),
        "{e}"
    );
    assert!(tiny.layers().is_empty(), "{:?}", tiny.layers().keys());
    check_clean(&tiny.pool);

    // A pool that fills up while the 64 MiB layer is applied: the pull fails, containerd
    // removes its extract snapshot, the pool is consistent and serves the base image still.
    let o = ctd.pull("full", &base);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let o = ctd.pull("full", &app);
    assert!(!o.status.success(), "64 MiB cannot fit in a 40 MiB pool");
    let e = stderr_of(&o);
    // Two outcomes, by timing. Usually the apply's writes sit in the page cache until the
    // unmount writes them back, and Commit refuses the snapshot naming the lost writes. On a
    // slow (loaded) machine the apply outlasts ext4's 5-second journal commit, whose write
    // fails first: ext4 aborts its journal and the rest of the apply meets a read-only
    // filesystem. Then the server's log names the live file and the full pool.
    if e.contains("read-only file system") {
        let log = full.log();
        assert!(
            log.contains("extract-") && log.contains("pool full"),
            "an apply cut short by a failed write: the log names it\n{e}\n{log}"
        );
    } else {
        assert!(
            e.contains("with the pool full") && e.contains("not committed"),
            "{e}"
        );
    }
    let left = full.active_after_gc();
    assert_eq!(left, Vec::<String>::new(), "the failed extract is removed");
    check_clean(&full.pool);
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--cgroup",
        "",
        "--snapshotter",
        "full",
        &base,
        "f1",
        "/bin/echo",
        "still ok",
    ]);
    assert_eq!(out, "still ok\n");
    for t in [&kill, &tiny, &full] {
        assert!(!t.log().contains("panicked"), "{}", t.log());
    }
}

/// Until `cond` holds or about ten seconds passed (containerd's garbage collection runs soon
/// after a removal or a start, not at once); whether it held.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// containerd SIGKILLed while it writes the app image's 64 MiB layer into a thinlayer
/// snapshot, and its `ctr` client with it; containerd restarted on the same root and state.
/// Nothing half-made passes for committed, `check` stays clean, what containerd lists is
/// exactly what thinlayer holds, a second pull completes and runs, and once the images and
/// the pull's leases are gone containerd's GC leaves no snapshot in the pool.
#[test]
fn containerd_killed_mid_pull_leaves_nothing_half_made() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_registry, host) = registry_with_images(dir.path());
    let thin = Thinlayer::start(dir.path(), "thin");
    let mut ctd = Containerd::start(dir.path(), &[("thinlayer", &thin.socket)]);
    let base = format!("{host}/test/base:1");
    let app = format!("{host}/test/app:1");
    let o = ctd.pull("thinlayer", &base);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let base_only = thin.snapshots();
    assert_eq!(
        base_only.values().collect::<Vec<_>>(),
        ["committed"],
        "the base image is one committed layer: {base_only:?}"
    );

    let mut pull = ctd.pull_background("thinlayer", &app);
    let applying = thin.wait_applying();
    ctd.kill9();
    // SIGKILL by PID; it may have ended on its own already (if the pull won the race).
    let _ = pull.kill();
    let pulled = pull.wait().unwrap().success();
    // Which case the timing gave; the invariants below hold in both.
    eprintln!("containerd killed: mid-apply {applying}, pull had completed {pulled}");
    assert!(
        applying || pulled,
        "neither an apply nor a finished pull was seen"
    );
    check_clean(&thin.pool);
    let after_kill = thin.snapshots();
    let committed = after_kill.values().filter(|k| *k == "committed").count();
    if applying && !pulled {
        // The app layer's extract is still an active snapshot: not committed under its
        // chain ID, nothing besides the base layer committed.
        assert_eq!(
            committed, 1,
            "only the base layer committed: {after_kill:?}"
        );
        assert!(
            after_kill
                .iter()
                .any(|(k, kind)| kind == "active" && k.starts_with("extract-")),
            "the interrupted extract is still active: {after_kill:?}"
        );
    }

    ctd.restart();
    ctd.wait_reconnected("thinlayer");
    // containerd's view after the restart is thinlayer's, snapshot for snapshot and kind for
    // kind (its start-up GC may first remove snapshots it never recorded).
    assert!(
        eventually(|| ctd.snapshots("thinlayer") == thin.snapshots()),
        "containerd lists {:?}, thinlayer holds {:?}",
        ctd.snapshots("thinlayer"),
        thin.snapshots()
    );
    let listed = ctd.snapshots("thinlayer");
    if applying && !pulled {
        assert_eq!(
            listed.values().filter(|k| *k == "committed").count(),
            1,
            "containerd sees no half-made layer as committed: {listed:?}"
        );
    }

    // The pull again: it completes, and the image runs.
    let o = ctd.pull("thinlayer", &app);
    assert!(
        o.status.success(),
        "pull after the restart: {}\n{}",
        stderr_of(&o),
        ctd.log_tail()
    );
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--cgroup",
        "",
        "--snapshotter",
        "thinlayer",
        &app,
        "r1",
        "/bin/sh",
        "-c",
        "cat /app/hello.sh; echo ok",
    ]);
    assert_eq!(out, "#!/bin/sh\necho hello from thinlayer\nok\n");
    check_clean(&thin.pool);

    // The app image removed: what is left is what containerd still references (the base
    // image and the killed pull's extract, kept by that pull's lease), and nothing else.
    ctd.ctr(&["image", "rm", "--sync", &app]);
    assert!(
        eventually(|| ctd.snapshots("thinlayer") == thin.snapshots()),
        "after removing the app image containerd lists {:?}, thinlayer holds {:?}",
        ctd.snapshots("thinlayer"),
        thin.snapshots()
    );
    // The leases (the killed pull's among them) and the base image removed: containerd
    // references nothing, and its GC leaves no snapshot of it in the pool.
    let leases = ctd.ctr(&["leases", "ls", "-q"]);
    for lease in leases.split_whitespace() {
        ctd.ctr(&["leases", "rm", "--sync", lease]);
    }
    ctd.ctr(&["image", "rm", "--sync", &base]);
    assert!(
        eventually(|| thin.snapshots().is_empty()),
        "containerd's GC left {:?} in the pool",
        thin.snapshots()
    );
    assert_eq!(ctd.snapshots("thinlayer"), BTreeMap::new());
    check_clean(&thin.pool);
    assert!(!thin.log().contains("panicked"), "{}", thin.log());
}

/// The pid serving the pool now (it changes with every `thinlayer restart`).
fn serving_pid(pool: &Path) -> i32 {
    serving(pool).expect("a server answers status").0
}

/// Issue 17: a container under containerd writes and fsyncs 64 KiB files in a loop while
/// thinlayer restarts three times; meanwhile another client keeps asking the snapshotter to
/// prepare, commit and remove snapshots. The container never sees an error and keeps
/// writing; every call in the gap either succeeds or fails, leaving no snapshot half-made
/// (containerd's list and thinlayer's layers agree); Prepare, Commit and Remove work after;
/// every file the container fsync'd reads back from its snapshot; `check --data` is clean.
#[test]
fn a_container_keeps_writing_through_restarts_and_snapshot_calls_in_the_gap_leave_nothing_half_made(
) {
    through_events(Event::Restart);
}

/// The same with `serve --keeper` and SIGKILL of the serving pid `status` names, three
/// times: the keeper starts the next server, which replays the crash journal.
#[test]
fn a_container_keeps_writing_through_kills_of_the_server_with_a_keeper() {
    through_events(Event::Kill);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    Restart,
    Kill,
}

fn through_events(event: Event) {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipping: {why}");
        return;
    }
    // Its writer runs `sync`.
    let _syncs = GLOBAL_SYNCS.read().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (_registry, host) = registry_with_images(dir.path());
    let mut thin = Thinlayer::start(dir.path(), "thin");
    if event == Event::Kill {
        // Started again with a keeper.
        thin.stop();
        thin.serve_args = vec!["--keeper".into()];
        thin.restart();
    }
    let ctd = Containerd::start(dir.path(), &[("thinlayer", &thin.socket)]);
    let base = format!("{host}/test/base:1");
    let o = ctd.pull("thinlayer", &base);
    assert!(o.status.success(), "pull: {}", stderr_of(&o));
    let parent = ctd
        .snapshots("thinlayer")
        .into_iter()
        .find(|(_, kind)| kind == "committed")
        .expect("the base image's layer")
        .0;

    // The writer: each file written with fsync, then its sha256 appended to /w/log (synced);
    // it stops when /stop appears, and exits 1 at the first failed write.
    let script = "busybox mkdir -p /w; i=0; \
        while [ ! -e /stop ]; do i=$((i+1)); \
        dd if=/dev/urandom of=/w/$i bs=64k count=1 conv=fsync 2>/dev/null || { echo \"write $i failed\"; exit 1; }; \
        busybox sha256sum /w/$i >>/w/log || { echo \"log $i failed\"; exit 1; }; \
        sync || { echo \"sync $i failed\"; exit 1; }; \
        done; echo \"done $i\"";
    // runc's state is per namespace and id, across containerds: an id of its own.
    let id = format!("writer-{event:?}").to_lowercase();
    let id = id.as_str();
    let mut writer = ctd.run_background(&base, id, script);
    let written = |tag: &str| -> usize {
        let o = ctd.ctr_output(&[
            "task",
            "exec",
            "--exec-id",
            tag,
            id,
            "busybox",
            "cat",
            "/w/log",
        ]);
        if !o.status.success() {
            eprintln!("exec {tag}: {}", stderr_of(&o).trim());
            return 0;
        }
        String::from_utf8_lossy(&o.stdout).lines().count()
    };
    let mut n = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while written(&format!("w{n}")) < 5 {
        n += 1;
        if let Some(st) = writer.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(writer.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!(
                "the container ended before writing: {st}: {err}\n{}",
                ctd.log_tail()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the container wrote nothing in 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Three restarts, with snapshot calls from another client all along.
    let done = std::sync::atomic::AtomicBool::new(false);
    let gap_results = std::sync::Mutex::new(Vec::<(String, bool)>::new());
    let mut pids = Vec::new();
    let mut counts = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut k = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                k += 1;
                let (active, committed) = (format!("gap-a{k}"), format!("gap-c{k}"));
                let call = |args: &[&str]| {
                    let mut all = vec!["snapshots", "--snapshotter", "thinlayer"];
                    all.extend(args);
                    let o = ctd.ctr_output(&all);
                    let line = format!("{args:?}: {}", stderr_of(&o).trim());
                    gap_results.lock().unwrap().push((line, o.status.success()));
                    o.status.success()
                };
                // Prepare, commit, remove; whatever failed is removed by what exists.
                if call(&["prepare", &active, &parent]) {
                    if call(&["commit", &committed, &active]) {
                        call(&["rm", &committed]);
                    } else {
                        call(&["rm", &active]);
                    }
                }
            }
        });
        struct Done<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let _done = Done(&done);
        for round in 0..3 {
            let before = serving_pid(&thin.pool);
            let new = match event {
                Event::Restart => {
                    let out: Value =
                        serde_json::from_str(&tl(&thin.pool, &["restart", "--json"])).unwrap();
                    out["new_pid"].as_i64().unwrap() as i32
                }
                Event::Kill => {
                    // SAFETY: killing the server this test started, by the PID it reported.
                    unsafe { libc::kill(before, libc::SIGKILL) };
                    wait_gone(before);
                    // `status` waits in the control socket's backlog for the next server.
                    serving_pid(&thin.pool)
                }
            };
            assert_ne!(before, new, "round {round}");
            pids.push((before, new));
            // The container goes on writing under the new server.
            let at = written(&format!("r{round}a"));
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut tries = 0;
            while written(&format!("r{round}b{tries}")) < at + 3 {
                tries += 1;
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: the container stopped writing after the restart"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            counts.push(at);
        }
    });
    let gap = gap_results.into_inner().unwrap();
    let failed: Vec<&String> = gap.iter().filter(|(_, ok)| !ok).map(|(l, _)| l).collect();
    eprintln!(
        "restarts {pids:?}; files written at each: {counts:?}; {} snapshot calls meanwhile, {} failed: {failed:#?}",
        gap.len(),
        failed.len()
    );
    // containerd's connection to the snapshotter was cut by each event: wait for it to
    // come back before asking containerd (calls in the gap fail cleanly).
    ctd.wait_reconnected("thinlayer");
    // A call whose answer an event cut off may have been done by thinlayer while containerd
    // counts it failed (a Prepare), and a removal may have reached only containerd's records
    // (its garbage collection's Remove failing in the gap). containerd removes from a
    // snapshotter what its records lack at its next garbage collection, which a removal
    // starts: one now, after the last event, rather than whenever the gap calls last made one.
    let snap = |args: &[&str]| {
        ctd.ctr(&[&["snapshots", "--snapshotter", "thinlayer"], args].concat());
    };
    snap(&["prepare", "gc-after-the-events", &parent]);
    snap(&["rm", "gc-after-the-events"]);
    // Nothing half-made: what containerd lists is what thinlayer holds, gap snapshots included.
    assert!(
        eventually(|| ctd.snapshots("thinlayer") == thin.snapshots()),
        "containerd {:?}\nthinlayer {:?}\nthinlayer's log:\n{}\ncontainerd's log:\n{}",
        ctd.snapshots("thinlayer"),
        thin.snapshots(),
        thin.log(),
        ctd.log_tail()
    );
    // Prepare, Commit and Remove after the restarts.
    for args in [
        vec!["prepare", "after-a", parent.as_str()],
        vec!["commit", "after-c", "after-a"],
        vec!["rm", "after-c"],
    ] {
        let mut all = vec!["snapshots", "--snapshotter", "thinlayer"];
        all.extend(&args);
        ctd.ctr(&all);
    }
    assert!(!ctd.snapshots("thinlayer").contains_key("after-c"));

    // Stop the writer: it exits 0, having never failed a write.
    ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "stop",
        id,
        "busybox",
        "touch",
        "/stop",
    ]);
    let out = writer.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("done "),
        "the container: {} {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Every file it fsync'd reads back from its snapshot, mounted afresh on the host.
    let mnt = dir.path().join("readback");
    fs::create_dir_all(&mnt).unwrap();
    let mount = ctd.ctr(&[
        "snapshots",
        "--snapshotter",
        "thinlayer",
        "mounts",
        mnt.to_str().unwrap(),
        id,
    ]);
    sh(&mount);
    let log = fs::read_to_string(mnt.join("w/log")).unwrap();
    let mut files = 0;
    for line in log.lines() {
        let (sha, path) = line.split_once("  ").unwrap();
        let host_path = mnt.join(path.trim_start_matches('/'));
        let got = sh(&format!("sha256sum {}", host_path.display()));
        assert_eq!(
            got.split(' ').next().unwrap(),
            sha,
            "{path} after the restarts"
        );
        files += 1;
    }
    sh(&format!("umount {}", mnt.display()));
    eprintln!("{files} files written and read back");
    assert!(files >= 5 + 3 * 3);
    ctd.ctr(&["container", "rm", id]);

    // Stop the serving process (the last restart's); its keeper goes with it. Then the pool
    // is clean.
    assert!(stop_serving(&thin.pool), "nothing serves the pool");
    drop(thin.server.take());
    let check = tl(&thin.pool, &["check", "--data"]);
    assert!(check.contains("clean"), "check --data: {check}");
    assert!(!thin.log().contains("panicked"), "{}", thin.log());
}

/// Tests whose containers run `sync` (which syncs every filesystem on the machine) hold this
/// for reading; the test that needs a container's unsynced data to stay unsynced until it asks
/// for a sync holds it for writing. (A fresh-clone CI run saw no syncfs in flight at all: a
/// concurrent test's writer, which runs `sync` in a loop, had written the data back first.)
static GLOBAL_SYNCS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// The processes in `syncfs` right now among `pid` and its children: (pid, tid) pairs.
fn in_syncfs(pid: i32) -> Vec<(i32, i32)> {
    let mut pids = vec![pid];
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // "PID (comm) STATE PPID ..."
        let ppid = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.split(' ').nth(1))
            .and_then(|v| v.parse::<i32>().ok());
        if ppid == Some(pid) {
            pids.push(p);
        }
    }
    let mut found = Vec::new();
    for p in pids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let syscall = fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
            if syscall.split(' ').next() == Some(&libc::SYS_syncfs.to_string()) {
                found.push((p, t.file_name().to_string_lossy().parse().unwrap_or(0)));
            }
        }
    }
    found
}

/// `docker ps -s` (Usage) syncs a running container's filesystem, whose writes are requests
/// to the server's own FUSE session. A server killed while one of its threads waits in that
/// `syncfs` could never finish dying, and its keeper would wait for it forever: the sync runs
/// in the server's binder child instead (src/fuse/binder.rs). Seen here: the sync of 128 MiB
/// a container left in its page cache is in a child, not in the server; the server is
/// killed in the middle of it; the keeper's next server takes over, the sync completes, the
/// container runs on and Usage counts its file.
#[test]
fn a_kill_while_usage_syncs_a_containers_filesystem_does_not_stop_the_next_server() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipping: {why}");
        return;
    }
    let _no_syncs = GLOBAL_SYNCS.write().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (_registry, host) = registry_with_images(dir.path());
    let mut thin = Thinlayer::start(dir.path(), "thin");
    thin.stop();
    thin.serve_args = vec!["--keeper".into()];
    thin.restart();
    let ctd = Containerd::start(dir.path(), &[("thinlayer", &thin.socket)]);
    let base = format!("{host}/test/base:1");
    let o = ctd.pull("thinlayer", &base);
    assert!(o.status.success(), "pull: {}", stderr_of(&o));

    let id = "syncer";
    let mut container = ctd.run_background(
        &base,
        id,
        "busybox dd if=/dev/urandom of=/big bs=1M count=128 2>/dev/null && echo written; \
         busybox sleep 600",
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(container.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "written\n", "{}", ctd.log_tail());

    let server = serving_pid(&thin.pool);
    let usage = Command::new("ctr")
        .arg("-a")
        .arg(&ctd.socket)
        .args([
            "-n",
            ns(),
            "snapshots",
            "--snapshotter",
            "thinlayer",
            "usage",
            id,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let syncing = loop {
        let found = in_syncfs(server);
        if !found.is_empty() {
            break found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no syncfs seen in 30 s\n{}",
            thin.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(
        syncing.iter().all(|&(p, _)| p != server),
        "the server itself is in syncfs (pid, tid): {syncing:?}"
    );
    eprintln!("server {server}; in syncfs (pid, tid): {syncing:?}");
    // SAFETY: killing the server this test started, by the PID it reported.
    unsafe { libc::kill(server, libc::SIGKILL) };
    wait_gone(server);
    let next = serving_pid(&thin.pool);
    assert_ne!(next, server);
    let usage = usage.wait_with_output().unwrap();
    eprintln!("the usage call cut by the kill: {}", usage.status);
    ctd.wait_reconnected("thinlayer");
    let bytes = ctd.usage("thinlayer")[id];
    assert!(bytes >= 128 << 20, "usage after the kill: {bytes}");
    assert!(
        container.try_wait().unwrap().is_none(),
        "the container ran on through the kill"
    );
    ctd.ctr(&["task", "kill", "-s", "KILL", id]);
    let _ = container.wait();
    ctd.ctr(&["container", "rm", id]);
    assert!(stop_serving(&thin.pool), "nothing serves the pool");
    drop(thin.server.take());
    check_clean(&thin.pool);
    assert!(!thin.log().contains("panicked"), "{}", thin.log());
}

/// `ctr snapshots mounts` of `key`: the mount's source (after `-t TYPE`).
fn mount_source(ctd: &Containerd, key: &str) -> String {
    let out = ctd.ctr(&[
        "snapshots",
        "--snapshotter",
        "thinlayer",
        "mounts",
        "/mnt",
        key,
    ]);
    // "mount -t ext4 /dev/loop5 /mnt -o noatime,discard"
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(&words[..3], ["mount", "-t", "ext4"], "{out}");
    words[3].to_string()
}

/// `/sys/block/NAME/...` of `/dev/NAME`, trimmed; None once the device is unbound.
fn loop_attr(device: &str, attr: &str) -> Option<String> {
    let name = device.strip_prefix("/dev/").unwrap();
    fs::read_to_string(format!("/sys/block/{name}/{attr}"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The loop device `device` is bound to a file under `files` (not autoclear), or none.
fn bound_under(device: &str, files: &Path) -> bool {
    loop_attr(device, "loop/backing_file")
        .is_some_and(|b| b.starts_with(files.canonicalize().unwrap().to_str().unwrap()))
}

#[test]
fn the_snapshotter_binds_one_loop_device_per_snapshot_and_clears_it_when_done() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut thin = Thinlayer::start(dir.path(), "thin");
    let ctd = Containerd::start(dir.path(), &[("thinlayer", &thin.socket)]);
    let snap = |args: &[&str]| {
        ctd.ctr_output(&[&["snapshots", "--snapshotter", "thinlayer"], args].concat())
    };
    let files = thin.files.clone();

    // Prepare answers a block device the snapshotter bound over the snapshot's live file
    // (containerd then sets up no loop device of its own); every Mounts answers the same.
    assert!(snap(&["prepare", "a"]).status.success());
    let a = mount_source(&ctd, "a");
    assert!(a.starts_with("/dev/loop"), "{a}");
    assert!(bound_under(&a, &files), "{a} over a live file");
    assert_eq!(loop_attr(&a, "loop/autoclear").as_deref(), Some("0"));
    assert_eq!(loop_attr(&a, "ro").as_deref(), Some("0"));
    assert_eq!(mount_source(&ctd, "a"), a, "one device per snapshot");

    // Mounted, its commit is refused and leaves the device alone; unmounted, the commit
    // clears it, and what was written is in the committed layer.
    let m = dir.path().join("m");
    fs::create_dir_all(&m).unwrap();
    sh(&format!("mount -t ext4 -o noatime {a} {}", m.display()));
    fs::write(m.join("hello"), b"hello from a\n").unwrap();
    let o = snap(&["commit", "c1", "a"]);
    assert!(!o.status.success(), "commit of a mounted snapshot");
    assert!(bound_under(&a, &files), "a refused commit keeps the device");
    // Unmounted lazily with a file still open (as a copy of a mount in another namespace
    // holds on), the filesystem lets go of the device only when the file closes, after
    // `umount` returned: Commit waits a moment for it rather than refuse.
    let held = fs::File::open(m.join("hello")).unwrap();
    sh(&format!("umount -l {}", m.display()));
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
    });
    let o = snap(&["commit", "c1", "a"]);
    closer.join().unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(!bound_under(&a, &files), "commit clears {a}");

    // A view is served from a read-only device, cleared by its removal.
    assert!(snap(&["view", "v", "c1"]).status.success());
    let v = mount_source(&ctd, "v");
    assert_eq!(loop_attr(&v, "ro").as_deref(), Some("1"));
    sh(&format!("mount -t ext4 -o ro {v} {}", m.display()));
    assert_eq!(fs::read(m.join("hello")).unwrap(), b"hello from a\n");
    sh(&format!("umount {}", m.display()));
    // containerd removes a snapshot from the snapshotter in its garbage collection, soon
    // after `rm`.
    assert!(snap(&["rm", "v"]).status.success());
    assert!(eventually(|| !bound_under(&v, &files)), "remove clears {v}");

    // A stop clears the devices nothing has mounted.
    assert!(snap(&["prepare", "b", "c1"]).status.success());
    let b = mount_source(&ctd, "b");
    thin.stop();
    assert!(!bound_under(&b, &files), "stop clears {b}");

    // A killed server leaves its devices over a dead mount; the next server clears them.
    thin.restart();
    ctd.wait_reconnected("thinlayer");
    let b = mount_source(&ctd, "b");
    assert!(bound_under(&b, &files));
    let s = thin.server.take().unwrap();
    s.signal(libc::SIGKILL);
    drop(s);
    for stale in [
        &thin.socket,
        &thin.pool.with_extension("nbd"),
        &control_path(&thin.pool),
    ] {
        let _ = fs::remove_file(stale);
    }
    assert!(
        loop_attr(&b, "loop/backing_file").is_some(),
        "outlives the kill"
    );
    thin.restart();
    assert!(
        loop_attr(&b, "loop/backing_file").is_none(),
        "{b} cleared at the next start: {}",
        thin.log()
    );
    ctd.wait_reconnected("thinlayer");
    let b2 = mount_source(&ctd, "b");
    assert!(bound_under(&b2, &files), "a new one for b");
    assert!(snap(&["rm", "b"]).status.success());
    assert!(eventually(|| !bound_under(&b2, &files)));
    thin.stop();
    check_clean(&thin.pool);
}
