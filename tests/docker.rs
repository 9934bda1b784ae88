//! Docker on thinlayer: a real dockerd (Debian trixie's 26.1.5, unpacked by tools/docker/fetch,
//! never installed) on Debian 12's containerd 1.6 and runc, with containerd's image store and
//! `--storage-driver thinlayer`, the snapshotter being `thinlayer serve --containerd-socket`
//! as a proxy plugin. Beside it, for the comparisons, a second dockerd of the same version on
//! containerd's own overlayfs snapshotter. The seed's walk-through: a busybox image
//! imported offline, `Dockerfile.base` and `Dockerfile` built with the classic builder and
//! with BuildKit, history, run, five idle containers, `ps -s`, `system df -v`, `diff`, push
//! and pull through a registry on 127.0.0.1, `rm` and `rmi`.
//!
//! Every daemon runs from the temp dir with its own config, socket, data and state, and is
//! stopped by PID. dockerd creates /run/docker/plugins whatever its flags say (plugin
//! discovery); the test removes that empty directory again if it was not there before. (A
//! private mount namespace would hide it, but dockerd mounts each container's root filesystem
//! itself and hands runc the path, so its mounts must be the host's.)
//! Needs root and /dev/fuse; with CI=true a missing prerequisite fails the test, otherwise it
//! skips with the reason.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

mod support;
use support::{
    data_ranges, have, serving, sh, stop_serving, tl, tl_output, wait_for, wait_gone,
    wait_snapshotter, KillServing, Server,
};

/// The seed's script, its build context and its two Dockerfiles.
const HELLO: &str = "#!/bin/sh\necho \"Hello world\"\n";
const BASE_IMAGE: &str = "acme/my-base-image:1.0";
const APP_IMAGE: &str = "acme/my-app:1.0";
/// The 1-byte write lands in the middle of this file of the `big` image.
const BIG_LEN: u64 = 64 << 20;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skip (outside CI) or fail (in CI) for a missing prerequisite.
fn unavailable(why: &str) {
    assert!(!in_ci(), "CI=true and the Docker test cannot run: {why}");
    eprintln!("skipping: {why}");
}

/// The unpacked Docker packages (tools/docker/fetch downloads them on first use), or why not.
fn docker_root() -> Result<PathBuf, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (dockerd, containerd, loop devices and FUSE need it)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse absent".into());
    }
    for tool in ["containerd", "runc", "docker-registry", "mkfs.ext4"] {
        if !have(tool) {
            return Err(format!("{tool} not installed (.ci/run installs it)"));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return Err("/bin/busybox absent (busybox-static; .ci/run installs it)".into());
    }
    let fetch = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/docker/fetch");
    let o = Command::new(&fetch).output().unwrap();
    if !o.status.success() {
        return Err(format!(
            "{} failed: {}",
            fetch.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(PathBuf::from(String::from_utf8(o.stdout).unwrap().trim()))
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

fn wait_port(host: &str) {
    for _ in 0..400 {
        if std::net::TcpStream::connect(host).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on {host}");
}

/// Debian's docker-registry on 127.0.0.1 (no auth, storage in `dir`, its access log in
/// `dir/registry.log`); its host:port.
fn registry(dir: &Path) -> (Daemon, String) {
    let port = free_port();
    let config = dir.join("registry.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("registry").display()
        ),
    )
    .unwrap();
    let log = fs::File::create(dir.join("registry.log")).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let host = format!("127.0.0.1:{port}");
    let d = Daemon(child);
    wait_port(&host);
    (d, host)
}

/// `thinlayer serve` with live files and the containerd socket.
struct Thinlayer {
    server: Option<Server>,
    pool: PathBuf,
    files: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Thinlayer {
    /// `serve` on a new pool in `dir`, with `extra` arguments (`--keeper`).
    fn start(dir: &Path, extra: &[&str]) -> Thinlayer {
        let pool = dir.join("thin.pool");
        let files = dir.join("files");
        let socket = dir.join("thin.sock");
        let log = dir.join("thin.log");
        tl(&pool, &["init"]);
        let mut args = vec![
            "--files",
            files.to_str().unwrap(),
            "--containerd-socket",
            socket.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let server = Server::start_with(
            &pool,
            &pool.with_extension("nbd"),
            &args,
            fs::File::create(&log).unwrap(),
        );
        wait_for(&socket);
        Thinlayer {
            server: Some(server),
            pool,
            files,
            socket,
            log,
        }
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

    /// Bytes the layers whose names contain `part` hold by themselves.
    fn size_of(&self, part: &str) -> u64 {
        let layers = self.layers();
        let found: Vec<&Value> = layers
            .iter()
            .filter(|(n, _)| n.contains(part))
            .map(|(_, l)| l)
            .collect();
        assert!(!found.is_empty(), "no layer named after {part}");
        found.iter().map(|l| l["size"].as_u64().unwrap()).sum()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The 4 KiB blocks of the filesystem that the layer whose name ends with `part` changed against
    /// its parent, each with the ext4 structure it belongs to, logged under `what`: both
    /// chains exported as sparse images and compared block by block where either holds data,
    /// the blocks mapped with dumpe2fs (superblock, descriptors, bitmaps, inode tables), the
    /// journal inode's extent and debugfs's icheck (a file's or directory's block). The
    /// layer's filesystem must pass `e2fsck -fn`.
    fn account(&self, what: &str, part: &str) {
        let layers = self.layers();
        let (name, l) = layers
            .iter()
            .find(|(n, _)| n.ends_with(part))
            .unwrap_or_else(|| panic!("no layer whose name ends with {part}"));
        let parent = l["parent"].as_str().expect("a parent").to_string();
        let dir = tempfile::tempdir_in(self.pool.parent().unwrap()).unwrap();
        let (mine, theirs) = (dir.path().join("layer.img"), dir.path().join("parent.img"));
        tl(&self.pool, &["export", name, mine.to_str().unwrap()]);
        tl(&self.pool, &["export", &parent, theirs.to_str().unwrap()]);
        // What the layer holds is a clean ext4 with a consistent journal, its dead log and
        // the journal's superblock taken back or not.
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&mine)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{what}: e2fsck -fn: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        let changed = changed_blocks(&mine, &theirs);
        let names = ext4_structures(&mine, &changed);
        let list: Vec<String> = changed
            .iter()
            .map(|b| format!("{b} {}", names[b]))
            .collect();
        eprintln!(
            "{what}: {} blocks changed: {}",
            changed.len(),
            list.join(", ")
        );
    }

    /// SIGTERM to the serving process (after a restart or a crash no child of ours; its
    /// keeper goes with it), then `check`.
    fn stop(&mut self) {
        assert!(
            stop_serving(&self.pool),
            "nothing serves {}",
            self.pool.display()
        );
        drop(self.server.take());
        let o = tl_output(&self.pool, &["check"]);
        assert!(
            o.status.success(),
            "thinlayer check: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for Thinlayer {
    fn drop(&mut self) {
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

/// containerd with root, state and sockets in `dir`, thinlayer as the proxy snapshotter
/// `thinlayer`, no CRI. Dropped: its shims and itself are killed by PID, its mounts detached.
struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    daemon: Option<Daemon>,
}

impl Containerd {
    fn start(dir: &Path, thinlayer: &Path) -> Containerd {
        let dir = dir.join("containerd");
        fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("c.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [proxy_plugins]\n  [proxy_plugins.thinlayer]\n    type = \"snapshot\"\n    address = \"{thin}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
            thin = thinlayer.display(),
        );
        fs::write(dir.join("config.toml"), config).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("containerd.log")).unwrap())
            .spawn()
            .unwrap();
        let c = Containerd {
            dir,
            socket,
            daemon: Some(Daemon(child)),
        };
        wait_for(&c.socket);
        c
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Shims outlive containerd by design, and a container's processes outlive a killed
        // shim: find the shims of this containerd (their command line names its socket),
        // kill each one's children (the containers' first processes), then the shim, by PID.
        let address = self.socket.display().to_string();
        for shim in processes() {
            let args = fs::read(format!("/proc/{shim}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = args.split(|b| *b == 0).collect();
            if !args
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == address.as_bytes())
            {
                continue;
            }
            for child in processes() {
                let stat = fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
                // "PID (COMM) STATE PPID ...": COMM may hold spaces, so read after its ')'.
                let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split(' ').nth(2));
                if ppid == Some(shim.to_string().as_str()) {
                    // SAFETY: a container process of a shim of this test's containerd.
                    unsafe { libc::kill(child, libc::SIGKILL) };
                }
            }
            // SAFETY: a shim of this test's containerd, by its PID.
            unsafe { libc::kill(shim, libc::SIGKILL) };
        }
        drop(self.daemon.take());
        // Containers' root filesystems, mounted by dockerd (in its data root) and the shims
        // (in containerd's state), deepest first.
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let top = self.dir.parent().unwrap();
        let ours = [
            format!("{}/", self.dir.display()),
            format!("{}/docker-", top.display()),
        ];
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| ours.iter().any(|o| m.starts_with(o.as_str())))
            .collect();
        points.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in points {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// The PIDs of every process.
fn processes() -> Vec<i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// /run/docker, which dockerd creates (with an empty `plugins` directory in it) whatever its
/// flags: removed when the last test holding a guard drops it, if it was not there before the
/// first one and is still empty. (The tests of this file run in parallel.)
struct RunDocker;

/// Whether /run/docker was there before the first guard, and how many guards are held.
static RUN_DOCKER: std::sync::Mutex<(Option<bool>, usize)> = std::sync::Mutex::new((None, 0));

impl RunDocker {
    fn note() -> RunDocker {
        let mut g = RUN_DOCKER.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 == 0 {
            g.0 = Some(Path::new("/run/docker").exists());
        }
        g.1 += 1;
        RunDocker
    }
}

impl Drop for RunDocker {
    fn drop(&mut self) {
        let mut g = RUN_DOCKER.lock().unwrap_or_else(|p| p.into_inner());
        g.1 -= 1;
        if g.1 == 0 && g.0 == Some(false) {
            let _ = fs::remove_dir("/run/docker/plugins");
            let _ = fs::remove_dir("/run/docker");
        }
    }
}

/// A dockerd on the test's containerd, with containerd's image store on `snapshotter`, its
/// own containerd namespace, data, exec root, socket and CLI config (the buildx plugin linked
/// into it).
struct Docker {
    root: PathBuf,
    dir: PathBuf,
    socket: PathBuf,
    daemon: Option<Daemon>,
}

impl Docker {
    fn start(root: &Path, dir: &Path, containerd: &Containerd, snapshotter: &str) -> Docker {
        let dir = dir.join(format!("docker-{snapshotter}"));
        let plugins = dir.join("config/cli-plugins");
        fs::create_dir_all(&plugins).unwrap();
        std::os::unix::fs::symlink(
            root.join("usr/libexec/docker/cli-plugins/docker-buildx"),
            plugins.join("docker-buildx"),
        )
        .unwrap();
        // The containerd image store (Docker >= 24) is what makes dockerd use a containerd
        // snapshotter; `storage-driver` names it. No userland proxy: there is no network.
        let config = dir.join("daemon.json");
        fs::write(
            &config,
            format!(
                r#"{{"features": {{"containerd-snapshotter": true}}, "storage-driver": "{snapshotter}", "userland-proxy": false}}"#
            ),
        )
        .unwrap();
        let socket = dir.join("docker.sock");
        let dockerd = root.join("usr/sbin/dockerd");
        let child = Command::new(&dockerd)
            .arg("--config-file")
            .arg(&config)
            .arg("--containerd")
            .arg(&containerd.socket)
            .args(["--containerd-namespace", snapshotter])
            .args([
                "--containerd-plugins-namespace",
                &format!("{snapshotter}-plugins"),
            ])
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("dockerd.log")).unwrap())
            .spawn()
            .unwrap();
        let d = Docker {
            root: root.to_path_buf(),
            dir,
            socket,
            daemon: Some(Daemon(child)),
        };
        wait_for(&d.socket);
        for _ in 0..400 {
            if d.output(&["version"]).status.success() {
                return d;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("dockerd never answered:\n{}", d.log_tail());
    }

    fn command(&self) -> Command {
        let mut c = Command::new(self.root.join("usr/bin/docker"));
        c.env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.dir.join("config"))
            .env("DOCKER_BUILDKIT", "1")
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .stdin(Stdio::null());
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Run `docker ARGS`, expect success, return stdout.
    fn docker(&self, args: &[&str]) -> String {
        let o = self.output(args);
        self.expect(args, o)
    }

    fn expect(&self, args: &[&str], o: Output) -> String {
        assert!(
            o.status.success(),
            "docker {args:?} failed: {}{}\ndockerd log tail:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log_tail()
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// `docker build` in `context` with the classic builder or BuildKit.
    fn build(&self, buildkit: bool, context: &Path, file: &str, tag: &str) -> String {
        let mut args = vec!["build", "-q", "-f", file, "-t", tag];
        if buildkit {
            // No provenance attestation: it would make the image an index for nothing here.
            args.push("--provenance=false");
        }
        args.push(".");
        let o = self
            .command()
            .env("DOCKER_BUILDKIT", if buildkit { "1" } else { "0" })
            .current_dir(context)
            .args(&args)
            .output()
            .unwrap();
        self.expect(&args, o)
    }

    /// busybox imported from the context's tar as `acme/busybox:1` (no network anywhere),
    /// then the seed's two images built with the classic builder.
    fn seed_images(&self, ctx: &Path) {
        let tar = ctx.parent().unwrap().join("busybox.tar");
        self.docker(&["import", tar.to_str().unwrap(), "acme/busybox:1"]);
        let base = dockerfile(ctx, "Dockerfile.base");
        self.build(false, ctx, &base, BASE_IMAGE);
        self.build(false, ctx, &dockerfile(ctx, "Dockerfile"), APP_IMAGE);
    }

    /// What the container's writable layer holds, in bytes, as dockerd reports it
    /// (`docker ps -s`'s SIZE, from the snapshotter's Usage).
    fn size_rw(&self, container: &str) -> u64 {
        let out = self.docker(&["inspect", "--size", "-f", "{{.SizeRw}}", container]);
        out.trim().parse().unwrap()
    }

    /// The diff IDs of an image's layers, bottom first.
    fn layers(&self, image: &str) -> Vec<String> {
        let out = self.docker(&["image", "inspect", "-f", "{{json .RootFS.Layers}}", image]);
        serde_json::from_str(&out).unwrap()
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        drop(self.daemon.take());
    }
}

/// The build context: busybox as a rootfs tar to import, the seed's script and Dockerfiles,
/// and a Dockerfile of an image with a 64 MiB file.
fn context(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    for d in ["tmp", "proc", "sys", "dev", "etc"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    // As in every distribution's image. dockerd reads them (to resolve the container's user)
    // through its own mount of the container's root before runc starts; see
    // docker_layers_cost_blocks_not_files for what that changes in an idle container.
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
    for t in [
        "sh", "cat", "echo", "dd", "sync", "true", "printf", "head", "rm", "sleep", "yes",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(t)).unwrap();
    }
    sh(&format!(
        "tar -C {} -cf {} .",
        rootfs.display(),
        dir.join("busybox.tar").display()
    ));
    let ctx = dir.join("context");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(ctx.join("hello.sh"), HELLO).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(ctx.join("hello.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    // The context holds only hello.sh; the Dockerfiles sit beside it, outside it.
    let files = dir.join("dockerfiles");
    fs::create_dir_all(&files).unwrap();
    fs::write(
        files.join("Dockerfile.base"),
        "FROM acme/busybox:1\nCOPY . /app\n",
    )
    .unwrap();
    fs::write(
        files.join("Dockerfile"),
        format!("FROM {BASE_IMAGE}\nCMD /app/hello.sh\n"),
    )
    .unwrap();
    // Not zeros (those cost no block anywhere): a repeated line.
    fs::write(
        files.join("Dockerfile.big"),
        format!("FROM acme/busybox:1\nRUN yes thinlayer-test-pattern | head -c {BIG_LEN} > /big\n"),
    )
    .unwrap();
    ctx
}

fn dockerfile(ctx: &Path, name: &str) -> String {
    ctx.parent()
        .unwrap()
        .join("dockerfiles")
        .join(name)
        .display()
        .to_string()
}

/// Containers whose SIZE `docker ps -s` reports: name -> the size column's text.
fn ps_sizes(d: &Docker) -> BTreeMap<String, String> {
    d.docker(&["ps", "-a", "-s", "--format", "{{.Names}}\t{{.Size}}"])
        .lines()
        .map(|l| {
            let (n, s) = l.split_once('\t').unwrap();
            (n.to_string(), s.to_string())
        })
        .collect()
}

/// What every test runs on: thinlayer, containerd with it as a proxy snapshotter, the build
/// context, in a temp dir. Fields drop in this order: containerd (its shims and mounts), then
/// thinlayer, then the directory.
struct Setup {
    ctd: Containerd,
    thin: Thinlayer,
    ctx: PathBuf,
    root: PathBuf,
    tmp: tempfile::TempDir,
    _run: RunDocker,
}

impl Setup {
    /// None when a prerequisite is missing outside CI (the reason is printed).
    fn start() -> Option<Setup> {
        Setup::start_serving(&["--keeper"])
    }

    /// As `start`, with more `serve` arguments.
    fn start_serving(serve_args: &[&str]) -> Option<Setup> {
        let root = match docker_root() {
            Ok(r) => r,
            Err(why) => {
                unavailable(&why);
                return None;
            }
        };
        let run = RunDocker::note();
        let tmp = tempfile::tempdir().unwrap();
        let ctx = context(tmp.path());
        let thin = Thinlayer::start(tmp.path(), serve_args);
        let ctd = Containerd::start(tmp.path(), &thin.socket);
        Some(Setup {
            ctd,
            thin,
            ctx,
            root,
            tmp,
            _run: run,
        })
    }

    fn docker(&self, snapshotter: &str) -> Docker {
        Docker::start(&self.root, self.tmp.path(), &self.ctd, snapshotter)
    }

    /// Remove every container of `dockers`, stop them and containerd, stop thinlayer (which
    /// checks the pool).
    fn finish(mut self, dockers: Vec<Docker>) {
        for d in &dockers {
            let all = d.docker(&["ps", "-aq"]);
            if !all.trim().is_empty() {
                let mut rm = vec!["rm", "-f"];
                rm.extend(all.split_whitespace());
                d.docker(&rm);
            }
        }
        drop(dockers);
        drop(self.ctd.daemon.take());
        self.thin.stop();
        assert!(!self.thin.log().contains("panicked"), "{}", self.thin.log());
    }
}

/// The seed's walk-through on thinlayer.
#[test]
fn docker_runs_the_seed_walk_through_on_thinlayer() {
    let Some(s) = Setup::start() else { return };
    let (dir, ctx) = (s.tmp.path(), s.ctx.clone());
    let (_registry, host) = registry(dir);
    let d = s.docker("thinlayer");
    let thin = &s.thin;
    let info = d.docker(&["info", "-f", "{{.Driver}}"]);
    assert_eq!(info.trim(), "thinlayer", "docker info's storage driver");

    // The base image imported, the seed's two builds with the classic builder: history
    // shows the shared layers with the same IDs.
    d.seed_images(&ctx);
    let ls = d.docker(&["image", "ls"]);
    for repo in ["acme/my-base-image", "acme/my-app", "acme/busybox"] {
        assert!(ls.contains(repo), "image ls lists {repo}:\n{ls}");
    }
    let base_history = d.docker(&["history", "-q", BASE_IMAGE]);
    let app_history = d.docker(&["history", "-q", APP_IMAGE]);
    eprintln!(
        "history {BASE_IMAGE}:\n{}\nhistory {APP_IMAGE}:\n{}",
        d.docker(&["history", BASE_IMAGE]),
        d.docker(&["history", APP_IMAGE])
    );
    let base_ids: Vec<&str> = base_history.lines().collect();
    let app_ids: Vec<&str> = app_history.lines().collect();
    assert_eq!(base_ids.len(), 2, "busybox and the COPY: {base_ids:?}");
    assert_eq!(
        app_ids[1..],
        base_ids[..],
        "the app image's history ends with the base image's IDs"
    );
    let base_layers = d.layers(BASE_IMAGE);
    assert_eq!(d.layers(APP_IMAGE), base_layers, "CMD adds no layer");

    // The same with BuildKit (the buildx plugin).
    d.build(
        true,
        &ctx,
        &dockerfile(&ctx, "Dockerfile.base"),
        "acme/my-base-image:bk",
    );
    let bk_file = dir.join("dockerfiles/Dockerfile.bk");
    fs::write(&bk_file, "FROM acme/my-base-image:bk\nCMD /app/hello.sh\n").unwrap();
    d.build(true, &ctx, bk_file.to_str().unwrap(), "acme/my-app:bk");
    let bk_layers = d.layers("acme/my-base-image:bk");
    assert_eq!(bk_layers.len(), 2);
    assert_eq!(bk_layers[0], base_layers[0], "the same busybox layer");
    assert_eq!(d.layers("acme/my-app:bk"), bk_layers);
    let out = d.docker(&["run", "--rm", "acme/my-app:bk"]);
    assert_eq!(out, "Hello world\n");

    // In the pool: busybox, the COPY of the classic build and BuildKit's COPY, each once.
    let committed: Vec<String> = thin
        .layers()
        .into_iter()
        .filter(|(_, l)| l["attrs"]["containerd.kind"] == "committed")
        .filter(|(n, _)| n.contains("/sha256:"))
        .map(|(n, _)| n)
        .collect();
    eprintln!("committed image layers: {committed:?}");
    let copy = thin.size_of(&committed_for(&base_layers[..2]));
    eprintln!(
        "the COPY layer of {} bytes: {copy} bytes in the pool",
        HELLO.len()
    );

    // Run: Hello world.
    let out = d.docker(&["run", "--rm", APP_IMAGE]);
    assert_eq!(out, "Hello world\n");

    // Five idle containers, and one that writes 8 MiB without syncing: `ps -s` shows the 8 MiB
    // at once.
    for i in 1..=5 {
        d.docker(&[
            "run",
            "-dit",
            "--name",
            &format!("idle{i}"),
            APP_IMAGE,
            "sh",
        ]);
    }
    run_writing_8mib(&d, "w8", "/eight");
    let w8 = d.size_rw("w8");
    eprintln!("docker ps -s:\n{}", d.docker(&["ps", "-s"]));
    assert!(
        w8 >= 8 << 20,
        "SIZE of a container that just wrote 8 MiB: {w8} bytes"
    );
    let sizes = ps_sizes(&d);
    for i in 1..=5 {
        let name = format!("idle{i}");
        assert!(sizes.contains_key(&name), "ps -s lists {name}: {sizes:?}");
        let size = d.size_rw(&name);
        let init = thin.size_of(&format!("{}-init", container_id(&d, &name)));
        eprintln!("{name}: writable layer {size} bytes, init layer {init} bytes");
    }
    let df = d.docker(&["system", "df", "-v"]);
    eprintln!("docker system df -v:\n{df}");
    assert!(df.contains("idle1") && df.contains("w8"), "{df}");
    let diff = d.docker(&["diff", "w8"]);
    assert!(
        diff.lines().any(|l| l == "A /eight"),
        "docker diff w8:\n{diff}"
    );

    // Push to the registry on 127.0.0.1 (dockerd talks plain HTTP to loopback registries),
    // remove the local image, pull it back, run it.
    let remote = format!("{host}/acme/my-app:1.0");
    d.docker(&["tag", APP_IMAGE, &remote]);
    d.docker(&["push", "-q", &remote]);
    d.docker(&["rmi", &remote]);
    d.docker(&["pull", "-q", &remote]);
    assert_eq!(d.layers(&remote), base_layers);
    let out = d.docker(&["run", "--rm", &remote]);
    assert_eq!(out, "Hello world\n");

    // rm and rmi: once containerd's GC ran, only the formatted ext4 bases are left.
    let all = d.docker(&["ps", "-aq"]);
    let mut rm = vec!["rm", "-f"];
    rm.extend(all.split_whitespace());
    d.docker(&rm);
    let images = d.docker(&["image", "ls", "-q"]);
    let mut rmi = vec!["rmi", "-f"];
    rmi.extend(images.split_whitespace());
    d.docker(&rmi);
    d.docker(&["builder", "prune", "-af"]);
    let mut left = Vec::new();
    for _ in 0..200 {
        left = thin
            .layers()
            .into_keys()
            .filter(|n| !n.starts_with("containerd/ext4-base/"))
            .collect();
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(left, Vec::<String>::new(), "layers left after rm and rmi");
    s.finish(vec![d]);
}

/// Blob GETs in the access log of the registry at `host` kept in `dir`, every request answered
/// so far included: (digest, status, bytes sent) of each. The log is written after the answer,
/// so a request of our own is sent first and its line waited for (lines come in order).
fn blob_gets(dir: &Path, host: &str) -> Vec<(String, u16, u64)> {
    use std::io::{Read, Write};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let mark = format!("sync-{}", now.unwrap().as_nanos());
    let mut c = std::net::TcpStream::connect(host).unwrap();
    write!(c, "GET /v2/?{mark} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    c.read_to_end(&mut Vec::new()).unwrap();
    let read = || fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while !read().contains(&mark) {
        assert!(
            std::time::Instant::now() < end,
            "the registry never logged {mark}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = read();
    log.lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .map(|l| {
            // ... "GET /v2/r/blobs/sha256:.. HTTP/1.1" 206 1048576 "" "ua"
            let digest = l
                .split("/blobs/")
                .nth(1)
                .and_then(|r| r.split([' ', '?']).next())
                .unwrap_or_default()
                .to_string();
            let rest = l.split("HTTP/1.1\" ").nth(1).unwrap_or_default();
            let mut f = rest.split(' ');
            let status = f.next().unwrap_or("0").parse().unwrap_or(0);
            let bytes = f.next().unwrap_or("0").parse().unwrap_or(0);
            (digest, status, bytes)
        })
        .collect()
}

/// Docker's pull of an image pushed by `thinlayer push`, through containerd 1.6 and the
/// thinlayer snapshotter: dockerd (its containerd image store) passes the remote-snapshot
/// labels, the snapshotter makes every layer a remote layer at once and answers Prepare with
/// ALREADY_EXISTS, so containerd's unpacker downloads no layer blob; `docker run` reads what
/// it needs by range. The registry's access log shows only ranged GETs of the layer blobs
/// (footer, index, the extents read) until the container has printed its output; the layers
/// stay remote (`--no-remote-fill`: nothing else moves). Without the lazy path the layer
/// blobs are downloaded whole and containerd's differ refuses them (the pull fails).
#[test]
fn docker_pulls_a_thinlayer_image_lazily_and_runs_it_before_its_blobs_are_down() {
    let reg_dir = tempfile::tempdir().unwrap();
    let (_registry, host) = registry(reg_dir.path());
    let Some(s) = Setup::start_serving(&["--keeper", "--no-remote-fill", "--lazy-registry", &host])
    else {
        return;
    };
    let d = s.docker("thinlayer");
    let thin = &s.thin;

    // An image on thinlayer layers: busybox imported, hello.sh copied in (classic builder);
    // its top layer pushed by thinlayer (the chain: the formatted ext4, busybox, the COPY).
    let tar = s.ctx.parent().unwrap().join("busybox.tar");
    d.docker(&["import", tar.to_str().unwrap(), "acme/busybox:1"]);
    d.build(
        false,
        &s.ctx,
        &dockerfile(&s.ctx, "Dockerfile.base"),
        BASE_IMAGE,
    );
    let top = committed_for(&d.layers(BASE_IMAGE));
    let top = thin
        .layers()
        .into_keys()
        .find(|n| n.ends_with(&top))
        .expect("the image's top layer in the pool");
    let image = format!("{host}/acme/lazy:1");
    tl(&thin.pool, &["push", &top, &image]);
    let manifest: Value = serde_json::from_str(&sh(&format!(
        "skopeo inspect --raw --tls-verify=false docker://{image}"
    )))
    .unwrap();
    let blobs: BTreeMap<String, u64> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(blobs.len(), 3, "ext4 base, busybox, COPY: {manifest}");

    // Pulled and run: the output is right.
    let before = blob_gets(reg_dir.path(), &host).len();
    d.docker(&["pull", "-q", &image]);
    let out = d.docker(&["run", "--rm", &image, "/bin/sh", "/app/hello.sh"]);
    assert_eq!(out, "Hello world\n");

    // What moved until then: ranges of the layer blobs, never a whole one.
    let gets: Vec<(String, u16, u64)> = blob_gets(reg_dir.path(), &host).split_off(before);
    eprintln!("blob GETs for the pull and the run: {gets:?}");
    for (digest, size) in &blobs {
        let mine: Vec<&(String, u16, u64)> = gets.iter().filter(|g| g.0 == *digest).collect();
        assert!(
            !mine.is_empty(),
            "layer {digest}: its footer and index are read: {gets:?}"
        );
        assert!(
            mine.iter().all(|g| g.1 == 206),
            "layer {digest} ({size} bytes): every GET is a range: {mine:?}\n{}",
            thin.log()
        );
        let moved: u64 = mine.iter().map(|g| g.2).sum();
        eprintln!("layer {digest}: {moved} of {size} bytes moved");
    }
    let moved: u64 = gets
        .iter()
        .filter(|g| blobs.contains_key(&g.0))
        .map(|g| g.2)
        .sum();
    let total: u64 = blobs.values().sum();
    assert!(
        moved < total * 3 / 4,
        "{moved} bytes of the {total} of the layer blobs moved"
    );
    let log = thin.log();
    assert_eq!(
        log.matches("made remote as layer").count(),
        3,
        "every layer made remote:\n{log}"
    );

    // In the pool: the three layers, remote, named by their chain IDs.
    let layers = thin.layers();
    let diff_ids = d.layers(&image);
    for k in 1..=diff_ids.len() {
        let name = committed_for(&diff_ids[..k]);
        let name = name.trim_start_matches('/');
        let l = layers
            .get(name)
            .unwrap_or_else(|| panic!("layer {name} in {:?}", layers.keys()));
        assert_eq!(l["remote"], true, "{name}: {l}");
        assert!(l["fetched"].as_u64().is_some(), "{name}: {l}");
    }
    s.finish(vec![d]);
}

/// What things cost in the pool, against overlayfs under the same dockerd version and
/// containerd: an idle container, the seed's COPY layer, a 1-byte change in the middle of a
/// 64 MiB file, and a deleted 8 MiB file (its blocks go back).
#[test]
fn docker_layers_cost_blocks_not_files() {
    let Some(s) = Setup::start() else { return };
    let ctx = s.ctx.clone();
    let d = s.docker("thinlayer");
    let o = s.docker("overlayfs");
    let thin = &s.thin;
    assert_eq!(o.docker(&["info", "-f", "{{.Driver}}"]).trim(), "overlayfs");
    for docker in [&d, &o] {
        docker.seed_images(&ctx);
        docker.build(
            false,
            &ctx,
            &dockerfile(&ctx, "Dockerfile.big"),
            "acme/big:1",
        );
    }

    // The COPY layer of the seed's 29-byte script: a new directory and file, both kept in
    // their inodes (inline_data), in the first block group (one flex group): the group
    // descriptors, the inode bitmap, the inode table blocks of the root and of the two new
    // inodes and the root directory's block. The journal's log is trimmed at Commit, and its
    // superblock and the filesystem's are set back to the parent's (docs/DESIGN.md §11.1).
    let layers = d.layers(BASE_IMAGE);
    let copy_layer = committed_for(&layers[..2]);
    let copy = thin.size_of(&copy_layer);
    thin.account("the COPY layer", &copy_layer);
    eprintln!("the COPY layer: {copy} bytes in the pool");
    assert!(copy <= 5 * 4096, "the COPY layer holds {copy} bytes");

    // Idle containers: the superblock (mount count and time). The kernel records where the
    // filesystem is mounted (`s_last_mounted`, a journaled transaction: 16 KiB with the
    // journal's superblock) at the first open of a file, unless the mount's path is 64 bytes
    // or longer; dockerd opens /etc/passwd through its mount under its data root first.
    for i in 1..=5 {
        let name = format!("idle{i}");
        d.docker(&["run", "-dit", "--name", &name, APP_IMAGE, "sh"]);
        o.docker(&["run", "-dit", "--name", &name, APP_IMAGE, "sh"]);
    }
    for i in 1..=5 {
        let name = format!("idle{i}");
        let (thin_rw, overlay_rw) = (d.size_rw(&name), o.size_rw(&name));
        let init = thin.size_of(&format!("{}-init", container_id(&d, &name)));
        eprintln!("{name}: thinlayer {thin_rw} bytes (its init layer {init}), overlayfs {overlay_rw} bytes");
        assert!(thin_rw <= 4096, "idle container {name}: {thin_rw} bytes");
    }
    let idle1 = container_id(&d, "idle1");
    thin.account("idle container idle1", &format!("/{idle1}"));
    thin.account("idle1's init layer", &format!("/{idle1}-init"));

    // One byte in the middle of the 64 MiB file: overlayfs copies the file up, thinlayer
    // stores the data block and the inode's block (mtime): the stopped container's journal is
    // dead, and Usage trims its log and sets both superblocks back.
    let write = format!(
        "printf x | dd of=/big bs=1 seek={} conv=notrunc 2>/dev/null",
        BIG_LEN / 2
    );
    for docker in [&d, &o] {
        docker.docker(&["run", "--name", "w1", "acme/big:1", "sh", "-c", &write]);
    }
    let (thin_w, overlay_w) = (d.size_rw("w1"), o.size_rw("w1"));
    eprintln!(
        "1-byte write in a 64 MiB file: thinlayer {thin_w} bytes, overlayfs {overlay_w} bytes"
    );
    assert!(
        overlay_w >= BIG_LEN,
        "overlayfs copies the file up: {overlay_w}"
    );
    let w1 = container_id(&d, "w1");
    thin.account("1-byte write in a 64 MiB file", &format!("/{w1}"));
    assert!(thin_w <= 2 * 4096, "thinlayer: {thin_w} bytes");

    // 8 MiB written, then deleted: ext4's discard gives the blocks back to the pool.
    run_writing_8mib(&d, "del", "/f");
    let full = d.size_rw("del");
    d.docker(&["exec", "del", "rm", "/f"]);
    // ext4 sends the discards from a work queue after the journal commit that freed the
    // blocks, not within it: Usage's sync starts them, they land a moment later.
    let mut freed = d.size_rw("del");
    for _ in 0..100 {
        if freed <= 256 << 10 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        freed = d.size_rw("del");
    }
    eprintln!("8 MiB written: {full} bytes; deleted: {freed} bytes");
    assert!(full >= 8 << 20, "{full}");
    assert!(
        freed <= 256 << 10,
        "the deleted file's blocks are freed: {freed} bytes left"
    );

    s.finish(vec![d, o]);
}

/// A container `name` that writes 8 MiB to `path` (no sync) and idles; returns once the
/// write returned.
fn run_writing_8mib(d: &Docker, name: &str, path: &str) {
    let script = format!(
        "dd if=/dev/urandom of={path} bs=1M count=8 2>/dev/null && echo written && sleep 3600"
    );
    d.docker(&["run", "-d", "--name", name, APP_IMAGE, "sh", "-c", &script]);
    wait_log(d, name, "written");
}

/// Wait until the log of `container` holds `text`.
fn wait_log(d: &Docker, container: &str, text: &str) {
    for _ in 0..400 {
        if d.docker(&["logs", container]).contains(text) {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{container} never logged {text:?}");
}

/// The full ID of a container.
fn container_id(d: &Docker, name: &str) -> String {
    d.docker(&["inspect", "-f", "{{.Id}}", name])
        .trim()
        .to_string()
}

/// The pool layer name part of the committed snapshot whose chain is `diff_ids`.
fn committed_for(diff_ids: &[String]) -> String {
    use sha2::{Digest, Sha256};
    let mut chain = diff_ids[0].clone();
    for id in &diff_ids[1..] {
        let h = Sha256::digest(format!("{chain} {id}").as_bytes());
        chain = format!("sha256:{}", hex(&h));
    }
    format!("/{chain}")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The 4 KiB blocks where `a` and `b` differ, looking only where either holds data.
fn changed_blocks(a: &Path, b: &Path) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    const B: u64 = 4096;
    let mut blocks = std::collections::BTreeSet::new();
    for f in [a, b] {
        for (start, end) in data_ranges(f) {
            blocks.extend(start / B..end.div_ceil(B));
        }
    }
    let (fa, fb) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    let (mut x, mut y) = (vec![0u8; B as usize], vec![0u8; B as usize]);
    blocks
        .into_iter()
        .filter(|blk| {
            // Past a file's end reads short: what is not there reads as zeros.
            for (f, buf) in [(&fa, &mut x), (&fb, &mut y)] {
                buf.fill(0);
                let mut at = 0;
                while at < buf.len() {
                    match f.read_at(&mut buf[at..], blk * B + at as u64).unwrap() {
                        0 => break,
                        n => at += n,
                    }
                }
            }
            x != y
        })
        .collect()
}

/// What each of `blocks` (4 KiB) is in the ext4 of `image`.
fn ext4_structures(image: &Path, blocks: &[u64]) -> BTreeMap<u64, String> {
    let dump = sh(&format!("dumpe2fs {} 2>/dev/null", image.display()));
    let mut ranges: Vec<(u64, u64, String)> = Vec::new();
    let range = |s: &str| -> (u64, u64) {
        let s = s.split_whitespace().next().unwrap().trim_end_matches(',');
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        (a.parse().unwrap(), b.parse().unwrap())
    };
    let mut group = 0u64;
    let mut per_group = 0u64;
    for line in dump.lines() {
        let t = line.trim();
        if let Some(n) = t.strip_prefix("Inodes per group:") {
            per_group = n.trim().parse().unwrap();
        }
        if let Some(rest) = t.strip_prefix("Group ") {
            group = rest.split(':').next().unwrap().parse().unwrap_or(group);
        }
        for (key, what) in [
            ("Primary superblock at ", "superblock"),
            ("Group descriptors at ", "group descriptors"),
            ("Reserved GDT blocks at ", "reserved descriptor blocks"),
            ("Block bitmap at ", "block bitmap"),
            ("Inode bitmap at ", "inode bitmap"),
            ("Inode table at ", "inode table"),
        ] {
            if let Some(i) = t.find(key) {
                let (a, b) = range(&t[i + key.len()..]);
                ranges.push((a, b, format!("{what} of group {group}")));
                if what == "inode table" {
                    ranges.last_mut().unwrap().2 = format!("inode table:{}", group * per_group);
                }
            }
        }
    }
    let journal = sh(&format!(
        "debugfs -R 'blocks <8>' {} 2>/dev/null",
        image.display()
    ));
    let jblocks: Vec<u64> = journal
        .split_whitespace()
        .filter_map(|b| b.parse().ok())
        .collect();
    let mut out = BTreeMap::new();
    let mut unknown = Vec::new();
    for &b in blocks {
        let name = if let Some((a, _, what)) = ranges.iter().find(|(a, z, _)| (a..=z).contains(&&b))
        {
            if let Some(base) = what.strip_prefix("inode table:") {
                // 16 inodes of 256 bytes a block; inode numbers start at 1.
                let first = base.parse::<u64>().unwrap() + (b - a) * 16 + 1;
                Some(format!("inode table (inodes {first}-{})", first + 15))
            } else {
                Some(what.clone())
            }
        } else if jblocks.first() == Some(&b) {
            Some("journal superblock".to_string())
        } else if jblocks.contains(&b) {
            Some("journal log".to_string())
        } else {
            None
        };
        match name {
            Some(n) => {
                out.insert(b, n);
            }
            None => unknown.push(b),
        }
    }
    if !unknown.is_empty() {
        let list: Vec<String> = unknown.iter().map(u64::to_string).collect();
        let icheck = sh(&format!(
            "debugfs -R 'icheck {}' {} 2>/dev/null",
            list.join(" "),
            image.display()
        ));
        for line in icheck.lines().skip(1) {
            let mut f = line.split_whitespace();
            if let (Some(b), Some(ino)) = (f.next(), f.next()) {
                if let Ok(b) = b.parse::<u64>() {
                    out.insert(b, format!("data of inode {ino}"));
                }
            }
        }
        for b in unknown {
            out.entry(b).or_insert_with(|| "unknown".to_string());
        }
    }
    out
}

/// Issue 17 under dockerd: a container started by `docker run -d` writes and fsyncs 64 KiB
/// files in a loop while thinlayer restarts three times and then, with its keeper, is killed
/// three times (SIGKILL of the pid `status` names). The container keeps running and writing
/// and never sees an error; `docker commit` of it, still running, works afterwards, every
/// file it had fsync'd reads back from the committed image, and `check` is clean.
#[test]
fn docker_containers_keep_writing_through_restarts_and_kills_of_thinlayer() {
    let Some(s) = Setup::start_serving(&["--keeper"]) else {
        return;
    };
    let d = s.docker("thinlayer");
    let tar = s.ctx.parent().unwrap().join("busybox.tar");
    d.docker(&["import", tar.to_str().unwrap(), "acme/busybox:1"]);
    // Each file written with fsync, then its sha256 appended to /w/log (synced); it stops
    // when /stop appears, and exits 1 at the first failed write.
    let script = "mkdir -p /w; i=0; \
        while [ ! -e /stop ]; do i=$((i+1)); \
        dd if=/dev/urandom of=/w/$i bs=64k count=1 conv=fsync 2>/dev/null || { echo \"write $i failed\"; exit 1; }; \
        sha256sum /w/$i >>/w/log || { echo \"log $i failed\"; exit 1; }; \
        sync || { echo \"sync $i failed\"; exit 1; }; \
        done; echo \"done $i\"";
    d.docker(&[
        "run",
        "-d",
        "--name",
        "writer",
        "acme/busybox:1",
        "sh",
        "-c",
        script,
    ]);
    let written = || -> usize {
        let o = d.output(&["exec", "writer", "cat", "/w/log"]);
        if !o.status.success() {
            return 0;
        }
        String::from_utf8_lossy(&o.stdout).lines().count()
    };
    let running = || d.docker(&["inspect", "-f", "{{.State.Running}}", "writer"]);
    let wait_written = |n: usize, what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while written() < n {
            assert_eq!(
                running().trim(),
                "true",
                "{what}: the container ended: {}",
                d.docker(&["logs", "writer"])
            );
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: fewer than {n} files written in 120 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_written(5, "before the events");

    let pool = &s.thin.pool;
    let mut events = Vec::new();
    for round in 0..6 {
        let (before, _) = serving(pool).expect("a server answers status");
        let new = if round < 3 {
            let out: Value = serde_json::from_str(&tl(pool, &["restart", "--json"])).unwrap();
            out["new_pid"].as_i64().unwrap() as i32
        } else {
            // SAFETY: killing the server this test started, by the PID it reported.
            unsafe { libc::kill(before, libc::SIGKILL) };
            wait_gone(before);
            // `status` waits in the control socket's backlog for the keeper's new server.
            serving(pool).expect("the keeper started a server").0
        };
        assert_ne!(before, new, "round {round}");
        let at = written();
        wait_written(at + 3, &format!("round {round}"));
        events.push((before, new, at));
    }
    eprintln!("(old pid, new pid, files written) at each restart and kill: {events:?}");
    // containerd's connection to the snapshotter was cut by each event: wait for it to come
    // back before docker asks containerd (calls in the gap fail cleanly). The container's
    // I/O never waited for it (the kernel's, through the live file).
    wait_snapshotter(&s.ctd.socket, "thinlayer", "thinlayer");

    // docker commit of the running container: containerd's differ mounts its layer a second
    // time, read-only (the snapshotter gives it a bind of the container's mount; a second
    // loop device failed with EROFS: the in-use journal needs recovery).
    d.docker(&["commit", "writer", "acme/written:1"]);
    // Stop the writer: it exits 0, having never failed a write.
    d.docker(&["exec", "writer", "sh", "-c", ": >/stop"]);
    let code = d.docker(&["wait", "writer"]);
    let logs = d.docker(&["logs", "writer"]);
    assert!(
        code.trim() == "0" && logs.starts_with("done "),
        "the container exited {code}: {logs}"
    );
    // Every file it fsync'd before the commit reads back from the committed image.
    let check = d.docker(&[
        "run",
        "--rm",
        "acme/written:1",
        "sh",
        "-c",
        "cd / && sha256sum -c /w/log",
    ]);
    let ok = check.lines().filter(|l| l.ends_with(": OK")).count();
    assert_eq!(ok, check.lines().count(), "sha256sum -c: {check}");
    assert!(ok >= 5 + 6 * 3, "{ok} files read back: {check}");
    eprintln!("{ok} files written through the events and read back");
    s.finish(vec![d]);
}
