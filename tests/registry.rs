//! Push and pull through a real OCI registry: Debian's docker-registry 2.8, started here on
//! 127.0.0.1 with a temp config and storage, its access log counting blob transfers, stopped
//! by PID. Two pools play two hosts.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use support::{have, sh, tl, Server};

const REGISTRY: &str = "/usr/bin/docker-registry";

struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
    dir: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        // Owned at once, so a registry that never listens is still stopped by Drop.
        let r = Registry {
            child,
            port,
            log,
            dir: dir.to_path_buf(),
        };
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return r;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("the registry never listened on port {port}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// Access-log lines for `method` on blob `digest` of any repository: a finished upload
    /// is a PUT carrying `digest=`, a download a GET of the blob.
    fn count(&self, method: &str, digest: &str) -> usize {
        let enc = digest.replace(':', "%3A");
        self.log()
            .lines()
            .filter(|l| l.contains(&format!("\"{method} /v2/")))
            .filter(|l| match method {
                "PUT" => {
                    l.contains(&format!("digest={enc}")) || l.contains(&format!("digest={digest}"))
                }
                _ => l.contains(&format!("/blobs/{digest}")),
            })
            .count()
    }
}

impl Registry {
    /// Cross-repository mounts of `digest` into `repo` (`POST .../blobs/uploads/?mount=`).
    fn mounts(&self, repo: &str, digest: &str) -> usize {
        let enc = digest.replace(':', "%3A");
        self.log()
            .lines()
            .filter(|l| l.contains(&format!("\"POST /v2/{repo}/blobs/uploads/?")))
            .filter(|l| {
                l.contains(&format!("mount={enc}")) || l.contains(&format!("mount={digest}"))
            })
            .count()
    }

    /// Blob GETs answered with 206 (a range).
    fn ranged_gets(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .filter(|l| l.contains("\" 206 "))
            .count()
    }

    /// Chunk uploads (PATCH) of any blob.
    fn count_patch(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"PATCH /v2/"))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // By PID: the registry we started, and no other.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw image: `size` bytes, 4 KiB blocks filled with `fill(block)` (0 = a hole).
fn image(path: &Path, size: u64, fill: impl Fn(u64) -> u8) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut buf = vec![0u8; 4096];
    for b in 0..size / 4096 {
        let v = fill(b);
        if v != 0 {
            buf.fill(v);
            std::os::unix::fs::FileExt::write_all_at(&f, &buf, b * 4096).unwrap();
        }
    }
    f.flush().unwrap();
}

fn ids(pool: &Path, name: &str) -> (String, String) {
    let v: serde_json::Value =
        serde_json::from_str(&tl(pool, &["history", name, "--json"])).unwrap();
    let a = &v[0]["attrs"];
    (
        a["content.digest"].as_str().unwrap().to_string(),
        a["content.chain_id"].as_str().unwrap().to_string(),
    )
}

fn export(pool: &Path, name: &str, to: &Path) -> Vec<u8> {
    tl(pool, &["export", name, to.to_str().unwrap()]);
    std::fs::read(to).unwrap()
}

fn clean(pool: &Path) {
    let r = tl(pool, &["check", "--data"]);
    assert!(r.contains(": clean"), "{r}");
}

fn fails(pool: &Path, args: &[&str]) -> String {
    let o = Command::new(support::bin())
        .arg("--pool")
        .arg(pool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "thinlayer {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every layer of image `reference` read by HTTP Range requests alone: footer, index, each
/// extent verified; the extents over the parent's image give the layer's exported image. Then
/// one byte flipped in the registry's stored blob: the extent holding it is refused.
fn ranged_reads(reg: &Registry, reference: &str, names: &[(&str, &Path)], d: &Path) {
    use thinlayer::registry::{client, pull::image_layers, range, Options};
    let c = client::Registry::open(reference, &Options::default()).unwrap();
    let layers = image_layers(&c).unwrap();
    assert_eq!(layers.len(), names.len());
    let mut img: Vec<u8> = Vec::new();
    let before = reg.ranged_gets();
    let mut reads = 0;
    let mut last = None;
    for (desc, (name, pool)) in layers.iter().zip(names) {
        let blob = range::open(&c, desc).unwrap();
        reads += 2;
        img.resize(blob.header.disk_size as usize, 0);
        for e in &blob.entries {
            let r = e.offset as usize..(e.offset + e.length) as usize;
            if e.is_whiteout() {
                img[r].fill(0);
            } else {
                img[r].copy_from_slice(&range::read(&c, desc, &blob, e).unwrap());
                reads += 1;
            }
        }
        assert_eq!(img, export(pool, name, &d.join("ranged.img")), "{name}");
        last = Some((desc.clone(), blob));
    }
    assert_eq!(
        reg.ranged_gets() - before,
        reads,
        "one 206 answer per footer, index and extent"
    );
    // A byte of the top layer's first extent flipped where the registry keeps the blob.
    let (desc, blob) = last.unwrap();
    let e = blob.entries.iter().find(|e| !e.is_whiteout()).unwrap();
    let hex = &desc.digest[7..];
    let path = reg.dir.join(format!(
        "storage/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    bad[(e.blob_offset + e.length / 2) as usize] ^= 0x40;
    std::fs::write(&path, &bad).unwrap();
    let err = range::read(&c, &desc, &blob, e).unwrap_err();
    assert_eq!(err.kind(), thinlayer::error::Kind::Corrupt, "{err}");
    assert!(
        err.to_string().contains("does not match its sha256"),
        "{err}"
    );
    std::fs::write(&path, &good).unwrap();
    range::read(&c, &desc, &blob, e).unwrap();
}

#[test]
fn a_chain_travels_between_two_pools_and_a_child_moves_only_its_own_blob() {
    if !Path::new(REGISTRY).exists() {
        panic!("{REGISTRY} is missing: apt-get install docker-registry (.ci/run does)");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reg = Registry::start(d);
    let (a, b) = (d.join("a.pool"), d.join("b.pool"));
    tl(&a, &["init"]);
    tl(&b, &["init"]);
    // base: 8 MiB with data and holes; app: 12 MiB, some blocks changed, some zeroed, more data.
    image(&d.join("base.img"), 8 << 20, |b| {
        if b % 3 == 0 {
            (b % 251) as u8 + 1
        } else {
            0
        }
    });
    image(&d.join("app.img"), 12 << 20, |b| match b {
        0..=9 => 0,             // whiteouts over base data
        10..=99 => 0xaa,        // changed
        _ if b >= 2048 => 0xbb, // past the base's end
        _ if b % 3 == 0 => (b % 251) as u8 + 1,
        _ => 0,
    });
    tl(
        &a,
        &["import", "base", d.join("base.img").to_str().unwrap()],
    );
    tl(
        &a,
        &[
            "import",
            "app",
            d.join("app.img").to_str().unwrap(),
            "--parent",
            "base",
        ],
    );
    let r1 = format!("127.0.0.1:{}/travel/app:1", reg.port);
    let o = support::tl_output(&a, &["push", "app", &r1, "--progress"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("2 layer(s) uploaded"), "{out}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.lines()
            .any(|l| l.starts_with("push base: ") && l.contains("(100%)")),
        "{err}"
    );
    let out = tl(&b, &["pull", &r1, "app"]);
    assert!(out.contains("2 layer(s) downloaded"), "{out}");
    assert_eq!(
        export(&a, "app", &d.join("x.img")),
        export(&b, "app", &d.join("y.img"))
    );
    assert_eq!(
        ids(&a, "app"),
        ids(&b, "app"),
        "content IDs differ between the pools"
    );
    let (base_digest, base_chain) = ids(&a, "base");
    ranged_reads(&reg, &r1, &[("base", &a), ("app", &a)], d);
    let base_in_b = tl(&b, &["history", "app"]);
    assert!(
        base_in_b.contains(&base_chain),
        "the base is named by its chain ID: {base_in_b}"
    );
    clean(&a);
    clean(&b);

    // A generic tool reads the manifest.
    if have("skopeo") {
        let i = sh(&format!("skopeo inspect --tls-verify=false docker://{r1}"));
        assert!(
            i.contains(&base_digest) && i.contains("org.thinlayer.block-size"),
            "{i}"
        );
        let raw = sh(&format!(
            "skopeo inspect --raw --tls-verify=false docker://{r1}"
        ));
        assert!(raw.contains("application/vnd.thinlayer.layer.v1"), "{raw}");
    }

    // A child of the pushed image, pushed from a live server: only its blob is uploaded.
    image(&d.join("app2.img"), 12 << 20, |b| match b {
        0..=9 => 0,
        10..=99 => 0xaa,
        100 => 0xcc, // one block changed
        _ if b >= 2048 => 0xbb,
        _ if b % 3 == 0 => (b % 251) as u8 + 1,
        _ => 0,
    });
    tl(
        &a,
        &[
            "import",
            "app2",
            d.join("app2.img").to_str().unwrap(),
            "--parent",
            "app",
        ],
    );
    let (app_digest, _) = ids(&a, "app");
    let (app2_digest, _) = ids(&a, "app2");
    let before = |digest: &str| (reg.count("PUT", digest), reg.count("GET", digest));
    let (b0, a0, c0) = (
        before(&base_digest),
        before(&app_digest),
        before(&app2_digest),
    );
    let server_a = Server::start(&a, &d.join("a.sock"));
    // To a new repository: the parent and base went to travel/app, so they are mounted from
    // there (a POST, no bytes) and only the child's blob is uploaded, in one PUT.
    let r2 = format!("127.0.0.1:{}/other/app:2", reg.port);
    let out = tl(&a, &["push", "app2", &r2, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["uploaded"], serde_json::json!([app2_digest]), "{out}");
    assert_eq!(
        v["mounted"],
        serde_json::json!([base_digest, app_digest]),
        "{out}"
    );
    assert_eq!(v["skipped"], serde_json::json!([]), "{out}");
    assert_eq!(reg.count("PUT", &base_digest), b0.0, "base uploaded again");
    assert_eq!(reg.count("PUT", &app_digest), a0.0, "app uploaded again");
    assert_eq!(
        reg.count("PUT", &app2_digest),
        c0.0 + 1,
        "the child's blob is uploaded once"
    );
    assert_eq!(reg.mounts("other/app", &base_digest), 1);
    assert_eq!(reg.mounts("other/app", &app_digest), 1);
    assert_eq!(
        reg.count_patch(),
        0,
        "blobs of known size go up in one PUT, not in PATCHed chunks"
    );
    // Back to the first repository: two blobs are there already, the child is mounted from
    // where it just went; progress lines go to stderr though it is not a terminal.
    let r3 = format!("127.0.0.1:{}/travel/app:3", reg.port);
    let o = support::tl_output(&a, &["push", "app2", &r3, "--progress"]);
    assert!(o.status.success());
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        out.contains("0 layer(s) uploaded")
            && out.contains("1 mounted")
            && out.contains("2 already there"),
        "{out}"
    );
    assert_eq!(reg.count("PUT", &app2_digest), c0.0 + 1);
    assert!(!err.contains("push app2:"), "a mount moves no bytes: {err}");
    server_a.stop();
    let hist: serde_json::Value =
        serde_json::from_str(&tl(&a, &["history", "app2", "--json"])).unwrap();
    let sources = hist[0]["attrs"]["registry.sources"].as_str().unwrap();
    let here = format!("127.0.0.1:{}", reg.port);
    assert_eq!(
        sources,
        format!("{here}/travel/app\n{here}/other/app"),
        "newest first"
    );

    // Pulled into the second pool through its live server: only the child's blob comes down.
    let server_b = Server::start(&b, &d.join("b.sock"));
    let o = support::tl_output(&b, &["pull", &r2, "app2", "--progress"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("1 layer(s) downloaded") && out.contains("2 already in the pool"),
        "{out}"
    );
    // Not a terminal: whole lines, each with the bytes, the total and a rate.
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err.lines().last().unwrap_or_default();
    assert!(
        line.starts_with("pull app2: ") && line.contains("(100%)") && line.ends_with("/s"),
        "{err}"
    );
    assert_eq!(
        reg.count("GET", &base_digest),
        b0.1,
        "base downloaded again"
    );
    assert_eq!(reg.count("GET", &app_digest), a0.1, "app downloaded again");
    assert_eq!(reg.count("GET", &app2_digest), c0.1 + 1);
    assert_eq!(ids(&a, "app2"), ids(&b, "app2"));
    server_b.stop();
    assert_eq!(
        export(&a, "app2", &d.join("x.img")),
        export(&b, "app2", &d.join("y.img"))
    );
    clean(&a);
    clean(&b);

    // A missing image and an unreachable registry: clear errors naming the reference.
    let missing = format!("127.0.0.1:{}/travel/nope:1", reg.port);
    let e = fails(&b, &["pull", &missing]);
    assert!(e.contains(&missing), "{e}");
    let before = tl(&b, &["ls", "--json"]);
    drop(reg);
    let e = fails(&b, &["pull", &r1, "again"]);
    assert!(e.contains(&r1), "{e}");
    assert_eq!(
        tl(&b, &["ls", "--json"]),
        before,
        "a failed pull changed the pool"
    );
}

#[test]
fn a_version_1_blob_pushes_and_pulls_whole_and_is_not_readable_by_range() {
    use thinlayer::format::stream::{Header, VERSION_1};
    use thinlayer::registry::{client, pull::image_layers, range, Options};
    use thinlayer::stream::encode::Encoder;
    if !Path::new(REGISTRY).exists() {
        panic!("{REGISTRY} is missing: apt-get install docker-registry (.ci/run does)");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reg = Registry::start(d);
    let (a, b) = (d.join("a.pool"), d.join("b.pool"));
    tl(&a, &["init"]);
    tl(&b, &["init"]);
    // A stream as thinlayer wrote them before version 2 (no index), received into pool a.
    let header = Header {
        version: VERSION_1,
        flags: 0,
        block_size: 4096,
        disk_size: 4 << 20,
        parent_chain_id: [0; 32],
    };
    let mut v1 = Vec::new();
    let mut e = Encoder::new(&mut v1, &header).unwrap();
    e.data(8192, &[0x11; 3 * 4096]).unwrap();
    e.data(1 << 20, &[0x22; 4096]).unwrap();
    e.finish().unwrap();
    std::fs::write(d.join("old.tls"), &v1).unwrap();
    let o = Command::new(support::bin())
        .arg("--pool")
        .arg(&a)
        .args(["receive", "old"])
        .stdin(std::fs::File::open(d.join("old.tls")).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = format!("127.0.0.1:{}/old/img:1", reg.port);
    tl(&a, &["push", "old", &r]);
    // The blob is the version-1 stream itself, and pulls whole.
    let c = client::Registry::open(&r, &Options::default()).unwrap();
    let layers = image_layers(&c).unwrap();
    let want = thinlayer::stream::Digest::sha256(&v1).to_string();
    assert_eq!(layers[0].digest, want);
    let e = range::open(&c, &layers[0]).unwrap_err();
    assert_eq!(e.kind(), thinlayer::error::Kind::InvalidInput, "{e}");
    let out = tl(&b, &["pull", &r, "old"]);
    assert!(out.contains("1 layer(s) downloaded"), "{out}");
    assert_eq!(
        export(&a, "old", &d.join("x.img")),
        export(&b, "old", &d.join("y.img"))
    );
    assert_eq!(ids(&a, "old"), ids(&b, "old"));
    clean(&b);
}
