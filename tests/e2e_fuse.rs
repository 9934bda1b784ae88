//! End to end as a user would: `thinlayer serve`, `nbdfuse` turning an export into a file,
//! `mkfs.ext4`, `mount -o loop`, files written, `fstrim`, unmount; the image is fsck-clean,
//! committed, and a container on it sees the files while its writes leave the image alone.
//! Needs root, /dev/fuse and nbdfuse (CI has all three); skips with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod support;
use support::{have, sh, tl, wait_for, Server};

fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (mount -o loop needs it)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse absent".into());
    }
    for tool in ["nbdfuse", "mkfs.ext4", "e2fsck", "fstrim", "fusermount3"] {
        if !have(tool) {
            return Some(format!("{tool} not installed (CI installs it)"));
        }
    }
    None
}

/// An export mounted as a filesystem: nbdfuse file + loop mount. Undone on drop.
struct Mounted {
    fuse_dir: PathBuf,
    mnt: PathBuf,
    nbdfuse: Child,
}

impl Mounted {
    fn new(dir: &Path, tag: &str, sock: &Path, export: &str, mkfs: bool) -> Mounted {
        let fuse_dir = dir.join(format!("fuse-{tag}"));
        let mnt = dir.join(format!("mnt-{tag}"));
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let nbdfuse = Command::new("nbdfuse")
            .arg(fuse_dir.join("disk"))
            .arg(format!("nbd+unix:///{export}?socket={}", sock.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(&fuse_dir.join("disk"));
        let disk = fuse_dir.join("disk");
        if mkfs {
            sh(&format!("mkfs.ext4 -q -F {}", disk.display()));
        }
        sh(&format!(
            "mount -o loop {} {}",
            disk.display(),
            mnt.display()
        ));
        Mounted {
            fuse_dir,
            mnt,
            nbdfuse,
        }
    }

    fn unmount(mut self) {
        self.teardown();
        std::mem::forget(self);
    }

    fn teardown(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .status();
        // nbdfuse exits once unmounted; make sure of it, by PID.
        for _ in 0..100 {
            if let Ok(Some(_)) = self.nbdfuse.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[test]
fn mkfs_mount_write_trim_commit_and_run_a_container() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("SKIP mkfs_mount_write_trim_commit_and_run_a_container: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = d.join("pool");
    let sock = d.join("s.sock");
    tl(&pool, &["init"]);
    tl(&pool, &["create", "image", "--size", "256M"]);

    let server = Server::start(&pool, &sock);
    let m = Mounted::new(d, "image", &sock, "image", true);
    std::fs::write(m.mnt.join("hello.txt"), "hello from the image\n").unwrap();
    let big: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(m.mnt.join("big.bin"), &big).unwrap();
    std::fs::write(m.mnt.join("scratch"), vec![9u8; 4 << 20]).unwrap();
    sh("sync");
    std::fs::remove_file(m.mnt.join("scratch")).unwrap();
    sh(&format!("fstrim {}", m.mnt.display()));
    m.unmount();
    server.stop();

    let img = d.join("image.raw");
    tl(&pool, &["export", "image", img.to_str().unwrap()]);
    sh(&format!("e2fsck -fn {}", img.display()));
    let image_bytes = std::fs::read(&img).unwrap();
    tl(&pool, &["commit", "image"]);
    tl(&pool, &["create", "box", "--parent", "image"]);

    let server = Server::start(&pool, &sock);
    let m = Mounted::new(d, "box", &sock, "box", false);
    assert_eq!(
        std::fs::read_to_string(m.mnt.join("hello.txt")).unwrap(),
        "hello from the image\n"
    );
    assert_eq!(std::fs::read(m.mnt.join("big.bin")).unwrap(), big);
    assert!(!m.mnt.join("scratch").exists());
    std::fs::write(m.mnt.join("hello.txt"), "changed in the container\n").unwrap();
    std::fs::write(m.mnt.join("new.txt"), "only in the container\n").unwrap();
    m.unmount();
    server.stop();

    // The image is untouched; the container holds only its own changes.
    let again = d.join("image2.raw");
    tl(&pool, &["export", "image", again.to_str().unwrap()]);
    assert!(
        std::fs::read(&again).unwrap() == image_bytes,
        "the image changed under its container"
    );
    let boxed = d.join("box.raw");
    tl(&pool, &["export", "box", boxed.to_str().unwrap()]);
    sh(&format!("e2fsck -fn {}", boxed.display()));
    let ls: serde_json::Value = serde_json::from_str(&tl(&pool, &["ls", "--json"])).unwrap();
    let size_of = |n: &str| {
        ls.as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == n)
            .unwrap()["size"]
            .as_u64()
            .unwrap()
    };
    assert!(
        size_of("box") > 0 && size_of("box") < 2 << 20,
        "container holds {}",
        size_of("box")
    );
    // The trimmed 4 MiB scratch file is not held by the image.
    assert!(
        size_of("image") < 32 << 20,
        "image holds {}",
        size_of("image")
    );
    let check = tl(&pool, &["check", "--data"]);
    assert!(check.contains("clean"), "{check}");
}
