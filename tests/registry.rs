//! Push and pull through a real OCI registry: Debian's docker-registry 2.8, started here on
//! 127.0.0.1 with a temp config and storage, its access log counting blob transfers, stopped
//! by PID. Two pools play two hosts. One registry asks for bearer tokens (`auth: token`) from
//! a token server the test runs on 127.0.0.1.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use support::{have, sh, tl, tl_env, Server};

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
        Registry::start_on(dir, port)
    }

    /// A registry on `port` over the storage in `dir` (again, after `stop`: same blobs, and
    /// its access log goes on in the same file).
    fn start_on(dir: &Path, port: u16) -> Registry {
        Registry::start_configured(dir, port, "")
    }

    /// As `start_on`, with `more` (YAML sections, e.g. `auth:`) in its configuration.
    fn start_configured(dir: &Path, port: u16, more: &str) -> Registry {
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n{more}",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
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

/// base.img: 8 MiB with data and holes; app.img: 12 MiB, some blocks changed, some zeroed,
/// more data.
fn base_and_app_images(d: &Path) {
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
    base_and_app_images(d);
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
        assert!(
            raw.contains("application/vnd.oci.image.layer.thinlayer.v1"),
            "{raw}"
        );
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
    // `pull --lazy` cannot read it by range: it is downloaded whole, and says so.
    let c = d.join("c.pool");
    tl(&c, &["init"]);
    let server = Server::start(&c, &d.join("c.sock"));
    let out = tl(&c, &["pull", "--lazy", &r, "old"]);
    assert!(
        out.contains("0 layer(s) remote") && out.contains("1 downloaded whole"),
        "{out}"
    );
    let l = layer_json(&c, "old");
    assert!(l.get("remote").is_none(), "{l}");
    server.stop();
    assert_eq!(
        export(&a, "old", &d.join("x.img")),
        export(&c, "old", &d.join("z.img"))
    );
    clean(&c);
}

// ---- pull --lazy (issue 20): remote layers through a live server ----------------------------

impl Registry {
    /// Blob GETs in the access log, from line `from` on: (status, bytes sent) of each.
    fn blob_gets(&self, from: usize) -> Vec<(u16, u64)> {
        self.sync();
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .skip(from)
            .map(|l| {
                // ... "GET /v2/r/blobs/sha256:.. HTTP/1.1" 206 1048576 "" "ua"
                let rest = l.split("HTTP/1.1\" ").nth(1).unwrap_or_default();
                let mut f = rest.split(' ');
                let status = f.next().unwrap_or("0").parse().unwrap_or(0);
                let bytes = f.next().unwrap_or("0").parse().unwrap_or(0);
                (status, bytes)
            })
            .collect()
    }

    /// Waits until the access log holds every request answered so far: it is written after
    /// the answer, so a request of our own is sent and its line waited for (lines come in
    /// order).
    fn sync(&self) {
        use std::io::Read;
        let mark = format!(
            "sync-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let mut c = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(c, "GET /v2/?{mark} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).unwrap();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !self.log().contains(&mark) {
            assert!(
                std::time::Instant::now() < end,
                "the registry never logged {mark}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Stop it (by PID); `start_on` the same port brings it back with the same blobs.
    fn stop(mut self) -> (PathBuf, u16) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let back = (self.dir.clone(), self.port);
        std::mem::forget(self);
        back
    }

    /// Where the registry keeps blob `digest`.
    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.dir.join(format!(
            "storage/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }
}

/// Pool `a` with base (8 MiB) and app (12 MiB) over it, pushed to `reference`. Returns the
/// image's index entries per layer (base first), as a reader by range sees them.
fn publish_app(
    d: &Path,
    a: &Path,
    reference: &str,
) -> Vec<(String, Vec<thinlayer::format::stream::Entry>)> {
    use thinlayer::registry::{client, pull::image_layers, range, Options};
    tl(a, &["init"]);
    base_and_app_images(d);
    tl(a, &["import", "base", d.join("base.img").to_str().unwrap()]);
    let app = d.join("app.img");
    tl(
        a,
        &["import", "app", app.to_str().unwrap(), "--parent", "base"],
    );
    tl(a, &["push", "app", reference]);
    let c = client::Registry::open(reference, &Options::default()).unwrap();
    image_layers(&c)
        .unwrap()
        .iter()
        .map(|desc| (desc.digest.clone(), range::open(&c, desc).unwrap().entries))
        .collect()
}

/// Bytes read, shown by their length and first byte (not all of them) when a test fails.
#[derive(PartialEq)]
struct Bytes(Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes starting {:?}", self.0.len(), self.0.first())
    }
}

impl PartialEq<Vec<u8>> for Bytes {
    fn eq(&self, o: &Vec<u8>) -> bool {
        &self.0 == o
    }
}

impl PartialEq<&[u8]> for Bytes {
    fn eq(&self, o: &&[u8]) -> bool {
        self.0 == *o
    }
}

/// `len` bytes at `offset` of `export`, read through NBD (libnbd's Python binding), or the
/// errno the read failed with.
fn nbd_read(server: &Server, export: &str, offset: u64, len: usize) -> Result<Bytes, String> {
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    sys.stdout.buffer.write(h.pread(int(sys.argv[3]), int(sys.argv[2])))
except nbd.Error as e:
    print('ERRNO', e.errno, e.string, file=sys.stderr)
    sys.exit(3)
"#;
    let o = Command::new("/usr/bin/python3")
        .args([
            "-c",
            script,
            &server.uri(export),
            &offset.to_string(),
            &len.to_string(),
        ])
        .output()
        .unwrap();
    match o.status.code() {
        Some(0) => Ok(Bytes(o.stdout)),
        Some(3) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
        _ => panic!("nbd read: {}", String::from_utf8_lossy(&o.stderr)),
    }
}

fn ls_json(pool: &Path) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&tl(pool, &["ls", "--json"])).unwrap();
    v.as_array().unwrap().clone()
}

fn layer_json(pool: &Path, name: &str) -> serde_json::Value {
    ls_json(pool)
        .into_iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no layer {name}"))
}

/// Waits (by condition) until no layer of `pool` is remote; fails after 120 s.
fn wait_all_local(pool: &Path) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while ls_json(pool).iter().any(|l| l["remote"] == true) {
        assert!(
            std::time::Instant::now() < end,
            "the fill never finished: {:?}",
            ls_json(pool)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A registry holding image `r1` (base and app, pushed from pool `a`) and an empty pool `b`
/// to pull it into.
struct Published {
    dir: tempfile::TempDir,
    reg: Registry,
    a: PathBuf,
    b: PathBuf,
    r1: String,
    /// The image's index entries per layer, base first.
    index: Vec<(String, Vec<thinlayer::format::stream::Entry>)>,
}

/// `serve` on `pool` with `args`, on `pool.sock`, its log in `pool.log`.
fn serve_logged(pool: &Path, args: &[&str]) -> (Server, PathBuf) {
    let (log, sock) = (pool.with_extension("log"), pool.with_extension("sock"));
    let out = std::fs::File::create(&log).unwrap();
    (Server::start_with(pool, &sock, args, out), log)
}

fn published() -> Published {
    for t in [REGISTRY, "/usr/bin/python3"] {
        if !Path::new(t).exists() {
            panic!("{t} is missing (.ci/run installs docker-registry and python3-libnbd)");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reg = Registry::start(d);
    let (a, b) = (d.join("a.pool"), d.join("b.pool"));
    let r1 = format!("127.0.0.1:{}/lazy/app:1", reg.port);
    let index = publish_app(d, &a, &r1);
    tl(&b, &["init"]);
    Published {
        dir,
        reg,
        a,
        b,
        r1,
        index,
    }
}

#[test]
fn a_lazy_pull_answers_at_once_moves_one_extent_per_read_and_resumes_after_a_kill() {
    let p = published();
    let (d, reg, a, b, r1) = (p.dir.path(), &p.reg, &p.a, &p.b, &p.r1);
    let data: Vec<u64> = p
        .index
        .iter()
        .flat_map(|(_, es)| es.iter().filter(|e| !e.is_whiteout()).map(|e| e.length))
        .collect();
    // Only what is read is fetched while this server runs.
    let (server, _) = serve_logged(b, &["--no-remote-fill"]);
    let g0 = reg.blob_gets(0).len();
    let out = tl(b, &["pull", "--lazy", r1, "app"]);
    assert!(
        out.contains("2 layer(s) remote") && out.contains("0 downloaded whole"),
        "{out}"
    );
    // The pull read each blob's footer and index (two ranges each) and no data.
    let gets = reg.blob_gets(g0);
    assert_eq!(gets.len(), 4, "{gets:?}");
    assert!(gets.iter().all(|&(st, _)| st == 206), "{gets:?}");
    let moved: u64 = gets.iter().map(|g| g.1).sum();
    assert!(moved < 64 << 10, "the pull moved {moved} bytes");
    let app = layer_json(b, "app");
    assert_eq!(app["remote"], true, "{app}");
    assert_eq!(app["fetched"], 0, "{app}");
    let st: serde_json::Value = serde_json::from_str(&tl(b, &["status", "--json"])).unwrap();
    assert_eq!(st["fills"].as_array().unwrap().len(), 2, "{st}");
    assert_eq!(st["fills"][0]["state"], "on demand", "{st}");

    // One 4 KiB read of app's own data moves one extent at most; one of base's data (which
    // app does not list) moves one of base's.
    let want_app = std::fs::read(d.join("app.img")).unwrap();
    let g1 = reg.blob_gets(0).len();
    let at = 50 * 4096;
    assert_eq!(
        nbd_read(&server, "app", at, 4096).unwrap(),
        &want_app[at as usize..][..4096]
    );
    let gets = reg.blob_gets(g1);
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert!(gets[0].0 == 206 && gets[0].1 <= 1 << 20, "{gets:?}");
    let at = 300 * 4096;
    assert_eq!(
        nbd_read(&server, "app", at, 4096).unwrap(),
        &want_app[at as usize..][..4096]
    );
    // Whiteouts need no fetch: zeros over base's data.
    assert_eq!(nbd_read(&server, "app", 0, 4096).unwrap(), vec![0; 4096]);
    let gets = reg.blob_gets(g1);
    assert_eq!(gets.len(), 2, "{gets:?}");
    let fetched_before: u64 = gets.iter().map(|g| g.1).sum();
    assert!(layer_json(b, "app")["fetched"].as_u64().unwrap() > 0);
    // A remote layer's unfetched blocks are no fault; a check commits first, so what was
    // fetched is committed when the server is killed.
    clean(b);
    let df: serde_json::Value = serde_json::from_str(&tl(b, &["df", "--json"])).unwrap();
    assert_eq!(df["remote_layers"], 2, "{df}");
    assert_eq!(df["remote_fetched"], df["data_bytes"], "{df}");
    server.signal(libc::SIGKILL);
    drop(server);

    // A new server resumes: it opens each blob again (footer and index) and fetches only
    // the extents not stored before the kill.
    let g2 = reg.blob_gets(0).len();
    let (server, _) = serve_logged(b, &[]);
    wait_all_local(b);
    let gets = reg.blob_gets(g2);
    assert!(
        gets.iter().all(|&(st, _)| st == 206),
        "a GET not answered with a range"
    );
    assert_eq!(gets.len(), 4 + data.len() - 2, "extents fetched twice");
    // The footers and indexes are what the pull read (`moved`).
    let total: u64 = data.iter().sum();
    let after: u64 = gets.iter().map(|g| g.1).sum::<u64>() - moved;
    assert_eq!(
        after,
        total - fetched_before,
        "bytes fetched after the restart"
    );
    let app = layer_json(b, "app");
    assert!(
        app.get("remote").is_none() && app.get("fetched").is_none(),
        "{app}"
    );
    server.stop();
    assert_eq!(
        export(a, "app", &d.join("x.img")),
        export(b, "app", &d.join("y.img"))
    );
    assert_eq!(ids(a, "app"), ids(b, "app"));
    clean(b);
}

#[test]
fn a_lazy_read_waits_out_a_registry_outage_and_never_serves_a_flipped_byte() {
    let Published {
        dir,
        reg,
        b,
        r1,
        index,
        ..
    } = published();
    let d = dir.path();
    let (server, log_b) = serve_logged(&b, &["--no-remote-fill", "--remote-timeout", "2"]);
    tl(&b, &["pull", "--lazy", &r1, "app"]);
    let want = std::fs::read(d.join("app.img")).unwrap();
    let want_at = |at: u64| want[at as usize..][..4096].to_vec();

    // The registry stops: a read of an unfetched block fails with EIO after the timeout, and
    // the log names the layer, the extent and the registry's error.
    let (rdir, port) = reg.stop();
    let t = std::time::Instant::now();
    let e = nbd_read(&server, "app", 60 * 4096, 4096).unwrap_err();
    assert!(e.contains("ERRNO EIO"), "{e}");
    assert!(
        t.elapsed() >= std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    let log = std::fs::read_to_string(&log_b).unwrap();
    assert!(
        log.lines().any(|l| l.contains("layer \"app\"")
            && l.contains("disk byte")
            && l.contains(&format!("127.0.0.1:{port}"))),
        "{log}"
    );
    // Back: the same read works.
    let reg = Registry::start_on(&rdir, port);
    assert_eq!(
        nbd_read(&server, "app", 60 * 4096, 4096).unwrap(),
        want_at(60 * 4096)
    );

    // A byte flipped in the registry's copy of app's blob, in the extent of block 2048
    // (0xbb past base's end): EIO, never the wrong bytes, and nothing stored.
    let (app_digest, entries) = &index[1];
    let at = 2048 * 4096;
    let e = entries
        .iter()
        .find(|e| !e.is_whiteout() && e.offset <= at && at < e.offset + e.length)
        .unwrap();
    let path = reg.blob_path(app_digest);
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    bad[(e.blob_offset + e.length / 2) as usize] ^= 0x40;
    std::fs::write(&path, &bad).unwrap();
    let err = nbd_read(&server, "app", at, 4096).unwrap_err();
    assert!(err.contains("ERRNO EIO"), "{err}");
    let log = std::fs::read_to_string(&log_b).unwrap();
    assert!(log.contains("does not match its sha256"), "{log}");
    std::fs::write(&path, &good).unwrap();
    assert_eq!(nbd_read(&server, "app", at, 4096).unwrap(), want_at(at));

    // A server started while the registry is down cannot open the blobs again: a read waits
    // for that (up to the timeout) instead of failing at once, and gets the right bytes once
    // the registry is back.
    let (rdir, port) = reg.stop();
    server.signal(libc::SIGKILL);
    drop(server);
    let (server, log_b) = serve_logged(&b, &["--no-remote-fill", "--remote-timeout", "60"]);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(&log_b)
        .unwrap()
        .contains("failed, trying again")
    {
        assert!(std::time::Instant::now() < end, "the blob was never tried");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let at = 303 * 4096; // base's, not fetched yet
    let reader = std::thread::scope(|s| {
        let r = s.spawn(|| nbd_read(&server, "app", at, 4096));
        let reg = Registry::start_on(&rdir, port);
        (r.join().unwrap(), reg)
    });
    let (got, reg) = reader;
    assert_eq!(got.unwrap(), want_at(at));
    // rm of a remote layer ends its fetch.
    let fills = |b: &Path| {
        let st: serde_json::Value = serde_json::from_str(&tl(b, &["status", "--json"])).unwrap();
        let f = st["fills"].as_array().unwrap().iter();
        f.map(|f| f["layer"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(fills(&b).contains(&"app".to_string()), "{:?}", fills(&b));
    tl(&b, &["rm", "app"]);
    assert!(!fills(&b).contains(&"app".to_string()), "{:?}", fills(&b));
    server.stop();
    clean(&b);
    drop(reg);
}

// ---- bearer tokens (issue 20: "bearer tokens renewed when they expire") ---------------------

/// distribution's leeway on a token's `exp` (registry/auth/token/token.go, `Leeway`): the
/// registry takes a token until `exp` + 60 s.
const LEEWAY: u64 = 60;
/// How long the registry takes a token after it is issued: its `exp` is set back by the
/// leeway, so a test sees tokens expire in seconds.
const TOKEN_LIFE: u64 = 2;
const USER: (&str, &str) = ("alice", "s3cret");

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A token server (distribution's token spec) on 127.0.0.1: it grants any scope asked to
/// `USER` (HTTP Basic; anyone else gets 401) as RS256 JWTs signed with the `openssl` CLI,
/// whose self-signed certificate goes in each token's `x5c` and in the registry's
/// `rootcertbundle`. It keeps each token's `exp`.
struct Tokens {
    port: u16,
    dir: PathBuf,
    issued: std::sync::Arc<std::sync::Mutex<Vec<(String, u64)>>>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tokens {
    fn start(dir: &Path) -> Tokens {
        sh(&format!(
            "cd {} && openssl req -x509 -newkey rsa:2048 -nodes -keyout token.key -out token.pem \
             -days 1 -subj /CN=thinlayer-test-tokens 2>/dev/null && \
             openssl x509 -in token.pem -outform DER -out token.der",
            dir.display()
        ));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut t = Tokens {
            port,
            dir: dir.to_path_buf(),
            issued: Default::default(),
            refused: Default::default(),
            stop: Default::default(),
            thread: None,
        };
        let (d, issued, refused, stop) = (
            t.dir.clone(),
            t.issued.clone(),
            t.refused.clone(),
            t.stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            for c in l.incoming() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = c else { continue };
                if !Tokens::answer(&d, c, &issued) {
                    refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        t.thread = Some(thread);
        t
    }

    /// The registry's `auth:` section for these tokens.
    fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: thinlayer-registry\n    \
             issuer: thinlayer-test\n    rootcertbundle: {}\n",
            self.port,
            self.dir.join("token.pem").display()
        )
    }

    fn count(&self) -> usize {
        self.issued.lock().unwrap().len()
    }

    /// Answer one request: a token for `USER`, kept with its `exp` in `issued` before it is
    /// sent; else 401 and false.
    fn answer(
        dir: &Path,
        mut c: std::net::TcpStream,
        issued: &std::sync::Mutex<Vec<(String, u64)>>,
    ) -> bool {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        use base64::Engine as _;
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(c.try_clone().unwrap());
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            // Connected and gone (Drop's wake-up): not a request.
            return true;
        }
        let target = line.split(' ').nth(1).unwrap_or_default().to_string();
        let mut authorized = false;
        let basic = format!(
            "basic {}",
            STANDARD.encode(format!("{}:{}", USER.0, USER.1))
        );
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("authorization") {
                    authorized = v.trim().eq_ignore_ascii_case(&basic);
                }
            }
        }
        if !authorized {
            let body = "{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}";
            write!(
                c,
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .ok(); // a client that went away needs no answer
            return false;
        }
        // scope=repository:NAME:ACTIONS, form-encoded.
        let access: Vec<serde_json::Value> = target
            .split_once('?')
            .map_or("", |(_, q)| q)
            .split('&')
            .filter_map(|kv| kv.strip_prefix("scope="))
            .filter_map(|s| {
                let s = percent_decode(s);
                let (kind_name, actions) = s.rsplit_once(':')?;
                let (kind, name) = kind_name.split_once(':')?;
                Some(serde_json::json!({
                    "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()
                }))
            })
            .collect();
        let now = unix_now() as u64;
        let exp = now - LEEWAY + TOKEN_LIFE;
        let cert = STANDARD.encode(std::fs::read(dir.join("token.der")).unwrap());
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [cert]});
        let claims = serde_json::json!({
            "iss": "thinlayer-test", "sub": USER.0, "aud": "thinlayer-registry",
            "exp": exp, "nbf": now - 1, "iat": now, "jti": format!("{now}-{}", unix_now()),
            "access": access,
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut p = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(dir.join("token.key"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin
            .take()
            .unwrap()
            .write_all(signed.as_bytes())
            .unwrap();
        let o = p.wait_with_output().unwrap();
        assert!(o.status.success(), "openssl dgst -sign failed");
        let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(o.stdout));
        let body = serde_json::json!({"token": token, "expires_in": TOKEN_LIFE}).to_string();
        issued.lock().unwrap().push((token, exp));
        write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .ok(); // a client that went away needs no answer
        true
    }

    /// A token for `scope`, asked as a client would (with `USER`'s password).
    fn ask(&self, scope: &str) -> (String, u64) {
        use base64::Engine as _;
        use std::io::Read;
        let mut c = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", USER.0, USER.1));
        write!(
            c,
            "GET /token?service=thinlayer-registry&scope={scope} HTTP/1.0\r\nAuthorization: Basic {basic}\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let token = v["token"].as_str().unwrap().to_string();
        let exp = self
            .issued
            .lock()
            .unwrap()
            .iter()
            .find(|(t, _)| *t == token)
            .unwrap()
            .1;
        (token, exp)
    }
}

impl Drop for Tokens {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(h, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// The status the registry answers a ranged GET of `digest` in `repo` with, sent with bearer
/// token `token`.
fn blob_status(reg: &Registry, repo: &str, digest: &str, token: &str) -> u16 {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(("127.0.0.1", reg.port)).unwrap();
    write!(
        c,
        "GET /v2/{repo}/blobs/{digest} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nRange: bytes=0-0\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).unwrap();
    let head = String::from_utf8_lossy(&answer[..answer.len().min(64)]).into_owned();
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_lazy_layer_reads_on_after_its_bearer_token_expired() {
    for t in [REGISTRY, "/usr/bin/python3", "/usr/bin/openssl"] {
        if !Path::new(t).exists() {
            panic!("{t} is missing (.ci/run installs docker-registry, python3-libnbd, openssl)");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tokens = Tokens::start(d);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let reg = Registry::start_configured(d, port, &tokens.registry_config());
    // The credentials the CLI and the server find: USER's password for this registry only,
    // which the client trades for tokens.
    let config = d.join("docker");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(
        config.join("config.json"),
        format!(
            r#"{{"auths": {{"127.0.0.1:{port}": {{"username": "{}", "password": "{}"}}}}}}"#,
            USER.0, USER.1
        ),
    )
    .unwrap();
    let env = [("DOCKER_CONFIG", config.as_path())];
    let (a, b) = (d.join("a.pool"), d.join("b.pool"));
    let r1 = format!("127.0.0.1:{port}/lazy/app:1");
    tl(&a, &["init"]);
    base_and_app_images(d);
    tl(
        &a,
        &["import", "base", d.join("base.img").to_str().unwrap()],
    );
    let app = d.join("app.img");
    tl(
        &a,
        &["import", "app", app.to_str().unwrap(), "--parent", "base"],
    );
    tl_env(&a, &env, &["push", "app", &r1]);
    let (digest, _) = ids(&a, "app");
    let want = std::fs::read(&app).unwrap();
    let block = |n: usize| &want[n * 4096..][..4096];

    tl(&b, &["init"]);
    let (sock, log) = (b.with_extension("sock"), b.with_extension("log"));
    let serve = |log: &Path| {
        let args = ["--no-remote-fill", "--remote-timeout", "5"];
        let out = std::fs::File::create(log).unwrap();
        Server::start_env(&b, &sock, &args, out, &env)
    };
    let server = serve(&log);
    let out = tl(&b, &["pull", "--lazy", &r1, "app"]);
    assert!(out.contains("2 layer(s) remote"), "{out}");
    assert_eq!(
        nbd_read(&server, "app", 50 * 4096, 4096).unwrap(),
        block(50)
    );

    // The registry refuses a token once its time is up (so the reads below cannot have
    // used an old one): one asked now works, and no longer after its expiry. Every token
    // the server got before it has expired by then too.
    let (token, exp) = tokens.ask("repository:lazy/app:pull");
    assert_eq!(blob_status(&reg, "lazy/app", &digest, &token), 206);
    let over = (exp + LEEWAY + 1) as f64;
    while unix_now() < over {
        std::thread::sleep(std::time::Duration::from_secs_f64(over - unix_now()));
    }
    assert_eq!(blob_status(&reg, "lazy/app", &digest, &token), 401);

    // A read of an unfetched block: the server's client gets a new token and reads on.
    let before = tokens.count();
    assert_eq!(
        nbd_read(&server, "app", 2100 * 4096, 4096).unwrap(),
        block(2100)
    );
    assert!(tokens.count() > before, "no new token was asked for");
    // After a restart, the fetch resumes with the credentials of the server's user.
    server.stop();
    let server = serve(&b.with_extension("log2"));
    assert_eq!(
        nbd_read(&server, "app", 2900 * 4096, 4096).unwrap(),
        block(2900)
    );
    server.stop();
    // Every blob request carried a token the registry took: the only blob GETs it refused
    // are the test's own with the expired token, and nobody was refused a token.
    reg.sync();
    let refused: Vec<String> = reg
        .log()
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .filter(|l| l.contains("HTTP/1.0\" 401") || l.contains("HTTP/1.1\" 401"))
        .map(str::to_string)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert_eq!(tokens.refused.load(std::sync::atomic::Ordering::SeqCst), 0);
    clean(&b);
}
