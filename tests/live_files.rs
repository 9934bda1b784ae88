//! Live files (`serve --files DIR`, src/fuse/): attached layers as disk-image files that the
//! kernel's loop driver uses. Real server, real `mkfs.ext4`, `mount -o loop`, `losetup`,
//! `debugfs`; servers are stopped by PID. Needs root and /dev/fuse (CI has both); skips with a
//! message otherwise.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

mod support;
use support::{sh, tl, tl_output, Server};

fn missing_prerequisite() -> Option<String> {
    support::missing_root_fuse(&["mkfs.ext4", "debugfs", "e2fsck", "losetup", "blockdev"])
}

macro_rules! require_prerequisites {
    () => {
        if let Some(why) = missing_prerequisite() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

/// A server with live files in `dir/files`, its log in `dir/serve.log`. Dropped (or killed),
/// its mount is detached lazily, so a failed test leaves no dead mount behind.
struct Live {
    server: Option<Server>,
    pool: PathBuf,
    files: PathBuf,
    log: PathBuf,
}

impl Live {
    fn start(dir: &Path) -> Live {
        Live::start_args(dir, &[])
    }

    /// As `start`, with more `serve` arguments.
    fn start_args(dir: &Path, more: &[&str]) -> Live {
        let pool = dir.join("pool");
        if !pool.exists() {
            tl(&pool, &["init"]);
        }
        let files = dir.join("files");
        let log = dir.join("serve.log");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut args = vec!["--files", files.to_str().unwrap()];
        args.extend_from_slice(more);
        let server = Server::start_with(&pool, &dir.join("sock"), &args, out);
        Live {
            server: Some(server),
            pool,
            files,
            log,
        }
    }

    fn tl(&self, args: &[&str]) -> String {
        tl(&self.pool, args)
    }

    /// Run a thinlayer command that must fail; its stderr.
    fn refused(&self, args: &[&str]) -> String {
        let o = tl_output(&self.pool, args);
        assert!(!o.status.success(), "thinlayer {args:?} succeeded");
        String::from_utf8(o.stderr).unwrap()
    }

    fn attach(&self, layer: &str) -> PathBuf {
        PathBuf::from(self.tl(&["attach", layer]).trim())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM: the server commits, unmounts and exits 0.
    fn stop(mut self) {
        self.server.take().unwrap().stop();
    }

    /// SIGKILL: nothing is committed beyond what was flushed; the mount is left dead.
    fn kill9(mut self) {
        let mut s = self.server.take().unwrap();
        s.signal(libc::SIGKILL);
        s.child.wait().unwrap();
        // The dead server's sockets stay behind; without them the next start waits for its own.
        let _ = std::fs::remove_file(&s.sock);
        let _ = std::fs::remove_file(support::control_path(&self.pool));
        std::mem::forget(s);
        // Leave the dead mount for the next server to find.
        std::mem::forget(self);
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        drop(self.server.take());
        let c = std::ffi::CString::new(self.files.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; failure (nothing mounted) is fine.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn is_mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let dir = dir.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(dir))
}

/// A filesystem mounted over a loop device on a file; unmounted (and the loop device freed,
/// by autoclear) on drop.
struct LoopMount {
    mnt: PathBuf,
}

impl LoopMount {
    fn new(file: &Path, mnt: &Path) -> LoopMount {
        std::fs::create_dir_all(mnt).unwrap();
        sh(&format!(
            "mount -o loop {} {}",
            file.display(),
            mnt.display()
        ));
        LoopMount {
            mnt: mnt.to_path_buf(),
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// File `/NAME` of the ext4 image `img` (fsck-clean), read with debugfs.
fn file_in_image(img: &Path, name: &str) -> Vec<u8> {
    sh(&format!("e2fsck -fn {}", img.display()));
    let got = img.with_extension(format!("{name}.out"));
    sh(&format!(
        "debugfs -R 'dump /{name} {}' {} 2>/dev/null",
        got.display(),
        img.display()
    ));
    std::fs::read(&got).unwrap()
}

/// Deterministic, incompressible-looking bytes (no zero runs the store would skip).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed | 1)
        .collect()
}

#[test]
fn an_ext4_mounted_over_a_loop_device_on_a_live_file_keeps_its_files_in_the_layer() {
    require_prerequisites!();
    let dir = tempfile::tempdir().unwrap();
    let live = Live::start(dir.path());
    live.tl(&["create", "web", "--size", "128M"]);
    let file = live.attach("web");
    assert_eq!(file, live.files.canonicalize().unwrap().join("web"));
    assert_eq!(live.attach("web"), file, "attach is idempotent");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), 128 << 20);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    sh(&format!("mkfs.ext4 -q -F {}", file.display()));
    let payload = pattern(3 << 20, 7);
    {
        let m = LoopMount::new(&file, &dir.path().join("mnt"));
        std::fs::write(m.mnt.join("hello"), b"hello from a loop device\n").unwrap();
        std::fs::write(m.mnt.join("payload"), &payload).unwrap();
        sh("sync");
    }
    // umount has torn the loop device down; the kernel's last close of the file follows.
    live.tl(&["detach", "web"]);
    assert!(!file.exists(), "a detached layer's file vanishes");

    // The data is in the layer: an export through the server holds the same filesystem.
    let img = dir.path().join("web.img");
    live.tl(&["export", "web", img.to_str().unwrap()]);
    sh(&format!("e2fsck -fn {}", img.display()));
    let hello = sh(&format!(
        "debugfs -R 'cat /hello' {} 2>/dev/null",
        img.display()
    ));
    assert_eq!(hello, "hello from a loop device\n");
    assert!(file_in_image(&img, "payload") == payload, "payload differs");

    let files = live.files.clone();
    live.stop();
    assert!(!is_mounted(&files), "a clean stop unmounts the live files");
}

#[test]
fn a_read_only_layers_file_refuses_writes_and_gives_a_read_only_loop_device() {
    require_prerequisites!();
    let dir = tempfile::tempdir().unwrap();
    let live = Live::start(dir.path());
    live.tl(&["create", "acme/base:1.0", "--size", "16M"]);
    let data = pattern(1 << 20, 3);
    let file = live.attach("acme/base:1.0");
    assert_eq!(file.file_name().unwrap(), "acme%2Fbase:1.0");
    OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .write_all_at(&data, 4 << 20)
        .unwrap();
    live.tl(&["detach", "acme/base:1.0"]);
    live.tl(&["commit", "acme/base:1.0"]);

    let file = live.attach("acme/base:1.0");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o400);
    let e = OpenOptions::new().write(true).open(&file).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let mut back = vec![0u8; data.len()];
    File::open(&file)
        .unwrap()
        .read_exact_at(&mut back, 4 << 20)
        .unwrap();
    assert!(back == data, "a read-only file reads what was written");

    // losetup falls back to read-only on EROFS.
    let dev = sh(&format!("losetup --find --show {}", file.display()));
    let dev = dev.trim();
    let ro = sh(&format!("blockdev --getro {dev}"));
    sh(&format!("losetup -d {dev}"));
    assert_eq!(ro.trim(), "1", "{dev} over a read-only layer is read-only");
    live.stop();
}

/// The server's loop binder (`thinlayer loop-binder`, a child the server asks instead of
/// running `losetup` for each device): devices over a live file in the mode asked, errors
/// naming the file, and a new child when the old one is gone.
#[test]
fn the_loop_binder_binds_devices_over_a_live_file_in_the_mode_asked() {
    require_prerequisites!();
    use thinlayer::fuse::binder::{set_program, Binder};
    let dir = tempfile::tempdir().unwrap();
    let live = Live::start(dir.path());
    live.tl(&["create", "web-1", "--size", "16M"]);
    let file = live.attach("web-1");
    set_program(PathBuf::from(env!("CARGO_BIN_EXE_thinlayer")));
    let mut binder = Binder::default();
    let sys = |d: &str, what: &str| {
        std::fs::read_to_string(format!("/sys/block/{d}/{what}"))
            .unwrap()
            .trim()
            .to_string()
    };
    let rw = binder.bind(&file, false, true).unwrap();
    let ro = binder.bind(&file, true, false).unwrap();
    let mut made = vec![rw.path(), ro.path()];
    for (d, read_only, direct_io) in [(&rw, "0", "1"), (&ro, "1", "0")] {
        assert_eq!(
            sys(&d.name, "loop/backing_file"),
            file.display().to_string()
        );
        assert_eq!(sys(&d.name, "ro"), read_only, "{}", d.name);
        assert_eq!(sys(&d.name, "loop/dio"), direct_io, "{}", d.name);
        assert_eq!(sys(&d.name, "dev"), d.dev);
    }
    assert_ne!(rw.name, ro.name);
    let missing = live.files.join("no-such-layer");
    let e = binder.bind(&missing, false, false).unwrap_err();
    assert!(e.to_string().contains("no-such-layer"), "{e}");
    // The child is killed: the next request starts another.
    let children = sh(&format!(
        "pgrep -P {} -f '^[^ ]*thinlayer loop-binder$'",
        std::process::id()
    ));
    assert!(!children.trim().is_empty(), "the binder runs as a child");
    for pid in children.split_whitespace() {
        sh(&format!("kill -9 {pid}"));
    }
    let again = binder.bind(&file, true, true).unwrap();
    made.push(again.path());
    assert_eq!(sys(&again.name, "loop/dio"), "1");
    binder.stop();
    for d in made {
        sh(&format!("losetup -d {}", d.display()));
    }
    live.tl(&["detach", "web-1"]);
    live.stop();
}

#[test]
fn an_attached_layer_is_protected_and_its_refusals_name_the_file() {
    require_prerequisites!();
    let dir = tempfile::tempdir().unwrap();
    // Without a server there are no live files, and the error says what is needed.
    let pool = dir.path().join("pool");
    tl(&pool, &["init"]);
    tl(&pool, &["create", "web", "--size", "8M"]);
    let o = tl_output(&pool, &["attach", "web"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--files"), "{e}");

    let live = Live::start(dir.path());
    let file = live.attach("web");
    let shown = file.display().to_string();
    for args in [&["rm", "web"][..], &["commit", "web"]] {
        let e = live.refused(args);
        assert!(
            e.contains("\"web\"") && e.contains(&shown) && e.contains("detach"),
            "{args:?}: {e}"
        );
    }
    assert!(live.refused(&["attach", "nope"]).contains("nope"));

    // Open (as a loop device holds it): detach waits for the close, then refuses.
    let held = File::open(&file).unwrap();
    let e = live.refused(&["detach", "web"]);
    assert!(e.contains(&shown) && e.contains("open"), "{e}");
    drop(held);
    live.tl(&["detach", "web"]);
    let e = live.refused(&["detach", "web"]);
    assert!(e.contains("not attached"), "{e}");

    // rm --force of an attached, open layer: the file goes, its handle gets EIO.
    let file = live.attach("web");
    let held = File::open(&file).unwrap();
    live.tl(&["rm", "--force", "web"]);
    let listed: Vec<_> = std::fs::read_dir(&live.files).unwrap().collect();
    assert!(listed.is_empty(), "{listed:?}");
    let e = held.read_exact_at(&mut [0u8; 4096], 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    drop(held);
    live.stop();
}

#[test]
fn writes_fsynced_through_a_live_file_survive_kill_9() {
    require_prerequisites!();
    let dir = tempfile::tempdir().unwrap();
    // No background commits: only the fsync can make these writes durable.
    let live = Live::start_args(dir.path(), &["--commit-interval", "0"]);
    live.tl(&["create", "db", "--size", "64M"]);
    let file = live.attach("db");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let writes: Vec<(u64, Vec<u8>)> = (0..8u8)
        .map(|i| {
            (
                i as u64 * (7 << 20) + 512 * i as u64,
                pattern(4096 * (i as usize + 1), i),
            )
        })
        .collect();
    for (at, data) in &writes {
        f.write_all_at(data, *at).unwrap();
    }
    f.sync_data().unwrap();
    // One more, never synced: it may or may not survive, but must not damage the pool.
    f.write_all_at(&pattern(8192, 99), 60 << 20).unwrap();
    live.kill9();
    drop(f);

    let live = Live::start(dir.path());
    assert!(
        live.log().contains("dead live-files mount"),
        "the stale mount is reported: {}",
        live.log()
    );
    let file = live.attach("db");
    let f = File::open(&file).unwrap();
    for (at, data) in &writes {
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, *at).unwrap();
        assert!(
            back == *data,
            "fsynced write at byte {at} lost after kill -9"
        );
    }
    drop(f);
    let report = live.tl(&["check"]);
    assert!(report.contains("clean"), "{report}");
    live.stop();
}

#[test]
fn a_write_past_the_end_of_a_live_file_is_no_space_and_the_file_cannot_be_resized() {
    require_prerequisites!();
    let dir = tempfile::tempdir().unwrap();
    let live = Live::start(dir.path());
    live.tl(&["create", "small", "--size", "1M"]);
    let file = live.attach("small");
    let f = OpenOptions::new().write(true).open(&file).unwrap();
    let e = f.write_at(b"x", 1 << 20).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    // Across the end: what fits is written.
    assert_eq!(f.write_at(&[1u8; 8192], (1 << 20) - 4096).unwrap(), 4096);
    let e = f.set_len(2 << 20).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    drop(f);
    live.stop();
}

#[test]
fn a_sync_in_an_ext4_over_a_loop_device_reaches_the_pool_before_kill_9() {
    require_prerequisites!();
    let dir = tempfile::tempdir().unwrap();
    // No background commits: only the loop driver's flush, turned into an fsync of the file,
    // can make the filesystem's writes durable.
    let live = Live::start_args(dir.path(), &["--commit-interval", "0"]);
    live.tl(&["create", "web", "--size", "64M"]);
    let file = live.attach("web");
    sh(&format!("mkfs.ext4 -q -F {}", file.display()));
    let mnt = dir.path().join("mnt");
    let m = LoopMount::new(&file, &mnt);
    std::fs::write(mnt.join("note"), b"synced before the crash\n").unwrap();
    sh(&format!("sync -f {}", mnt.join("note").display()));
    live.kill9();
    // The filesystem's backing is gone: unmounting it fails its last writes, harmlessly.
    drop(m);

    let live = Live::start(dir.path());
    let file = live.attach("web");
    {
        // The kernel replays ext4's journal at mount: what `sync` committed is there.
        let _m = LoopMount::new(&file, &mnt);
        let note = std::fs::read_to_string(mnt.join("note")).unwrap();
        assert_eq!(note, "synced before the crash\n");
    }
    live.tl(&["detach", "web"]);
    let report = live.tl(&["check"]);
    assert!(report.contains("clean"), "{report}");
    live.stop();
}

/// Wait up to 10 s for `/sys/block/NAME/loop/dio` to read `want`; what it read last.
fn wait_for_dio(dev: &str, want: &str) -> String {
    let name = dev.trim().trim_start_matches("/dev/");
    let path = Path::new("/sys/block").join(name).join("loop/dio");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = std::fs::read_to_string(&path).unwrap_or_default();
        if now.trim() == want || std::time::Instant::now() > deadline {
            return now.trim().to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_buffered_loop_device_over_a_live_file_is_switched_to_direct_io_and_keeps_its_writes() {
    require_prerequisites!();
    let dir = tempfile::tempdir().unwrap();
    // No option: direct I/O is the default.
    let live = Live::start(dir.path());
    live.tl(&["create", "db", "--size", "64M"]);
    let file = live.attach("db");
    sh(&format!("mkfs.ext4 -q -F {}", file.display()));
    let mnt = dir.path().join("mnt");
    let payload = pattern(1 << 20, 9);
    {
        // `mount -o loop` sets the loop device up buffered, as containerd 1.6 does.
        let m = LoopMount::new(&file, &mnt);
        let dev = sh(&format!("findmnt -no SOURCE {}", m.mnt.display()));
        assert_eq!(
            wait_for_dio(&dev, "1"),
            "1",
            "{} over {} is still buffered; server log:\n{}",
            dev.trim(),
            file.display(),
            live.log()
        );
        assert!(
            live.log().contains(&format!(
                "live file {}: loop device {} switched to direct I/O",
                file.display(),
                dev.trim()
            )),
            "{}",
            live.log()
        );
        // Through the device in its new mode: a file written and synced reaches the layer.
        std::fs::write(m.mnt.join("payload"), &payload).unwrap();
        sh(&format!("sync -f {}", m.mnt.join("payload").display()));
    }
    live.tl(&["detach", "db"]);
    let img = dir.path().join("db.img");
    live.tl(&["export", "db", img.to_str().unwrap()]);
    assert!(file_in_image(&img, "payload") == payload, "payload differs");
    live.stop();
}
