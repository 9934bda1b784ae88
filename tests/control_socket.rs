//! The control socket end to end, in-process: `serve_control` with a toy handler on a socket
//! in a temp dir, real clients over it — the library `Client`, a raw client speaking the
//! codec, and this test binary re-run as uid 65534 for the peer-uid rule.

use serde_json::json;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use thinlayer::control::{
    serve_control, wire, Client, ControlSocket, Peer, Reply, Request, Status, VERSION,
};
use thinlayer::format::LayerId;
use thinlayer::image::{ExportStats, ImportStats};
use thinlayer::listen::Stop;
use thinlayer::log::Log;
use thinlayer::{Error, LayerInfo, Result};

const NOBODY: u32 = 65534;
/// Set in the environment of this binary re-run as another uid: the socket to call.
const CHILD_SOCKET: &str = "THINLAYER_TEST_CONTROL_CHILD_SOCKET";

fn layer(name: &str) -> LayerInfo {
    LayerInfo {
        name: name.into(),
        parent: None,
        writable: true,
        size: 0,
        virtual_size: 0,
        disk_size: 1 << 20,
        created: "2026-01-02T03:04:05Z".into(),
        importing: false,
        remote: false,
        fetched: None,
        attrs: Default::default(),
        id: LayerId(5),
        children: vec![],
    }
}

/// What the toy handler saw: each call's peer and request.
type Calls = Arc<Mutex<Vec<(Peer, Request)>>>;

/// A stand-in for the pool service: answers from fixed data, reads and writes passed files.
fn toy(
    calls: &Calls,
    peer: &Peer,
    req: Request,
    fds: Vec<OwnedFd>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Reply> {
    calls.lock().unwrap().push((*peer, req.clone()));
    match req {
        Request::Create { name, .. } if name == "taken" => Err(Error::AlreadyExists(format!(
            "layer {name:?} already exists"
        ))),
        Request::Create { name, .. } => Ok(Reply::Layer(layer(&name))),
        Request::Ls => Ok(Reply::Layers(vec![layer("a"), layer("b")])),
        Request::Remove { name, .. } => Err(Error::NotFound(format!("no layer {name:?}"))),
        Request::Df => Err(Error::io(
            "growing pool /p",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        )),
        Request::Import { name, .. } => {
            let mut f = fs::File::from(fds.into_iter().next().unwrap());
            let total = f.metadata().unwrap().len();
            let (mut buf, mut done) = ([0u8; 1024], 0u64);
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                done += n as u64;
                progress(done, total);
            }
            let stats = ImportStats {
                bytes_read: done,
                ..Default::default()
            };
            Ok(Reply::Imported {
                layer: layer(&name),
                stats,
            })
        }
        Request::Export { name, .. } => {
            let mut f = fs::File::from(fds.into_iter().next().unwrap());
            f.write_all(format!("bytes of {name}").as_bytes()).unwrap();
            Ok(Reply::Exported {
                stats: ExportStats {
                    size: 10,
                    bytes_written: 10,
                },
            })
        }
        _ => Ok(Reply::Status(Box::new(Status {
            pid: std::process::id(),
            ..Default::default()
        }))),
    }
}

/// `serve_control` on a thread; dropping it stops it by its flag and waits.
struct Running {
    path: PathBuf,
    calls: Calls,
    stop: Arc<Stop>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Running {
    fn start(path: &Path) -> Running {
        let socket = ControlSocket::bind(path, Path::new("/pools/test")).unwrap();
        let calls = Calls::default();
        let stop = Arc::new(Stop::new());
        let (c, s) = (calls.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let handler = move |p: &Peer, r, f, pr: &mut dyn FnMut(u64, u64)| toy(&c, p, r, f, pr);
            serve_control(socket, &handler, &s, &Log::to(|_, _| {}))
        });
        Running {
            path: path.to_path_buf(),
            calls,
            stop,
            thread: Some(thread),
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.path)
            .unwrap()
            .expect("a server is there")
    }

    fn stop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap().unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn no_progress() -> impl FnMut(u64, u64) {
    |_, _| panic!("no progress expected")
}

#[test]
fn the_socket_is_owner_only_and_answers_requests() {
    let d = tempfile::tempdir().unwrap();
    let srv = Running::start(&d.path().join("pool.ctl"));
    let m = fs::symlink_metadata(&srv.path).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.mode() & 0o777, 0o600);

    let mut c = srv.client();
    assert_eq!(c.server().version, VERSION);
    assert_eq!(c.server().pool.as_deref(), Some("/pools/test"));
    let req = Request::Create {
        name: "web".into(),
        parent: None,
        size: Some(1 << 20),
    };
    match c.call(&req, &[], &mut no_progress()).unwrap() {
        Reply::Layer(l) => assert_eq!(l, layer("web")),
        r => panic!("{r:?}"),
    }
    // More requests on the same connection, one after another.
    match c.call(&Request::Ls, &[], &mut no_progress()).unwrap() {
        Reply::Layers(v) => assert_eq!(v, [layer("a"), layer("b")]),
        r => panic!("{r:?}"),
    }
    let calls = srv.calls.lock().unwrap();
    assert_eq!(calls.len(), 2);
    let (peer, first) = &calls[0];
    assert_eq!(first, &req);
    assert_eq!(
        peer.pid as u32,
        std::process::id(),
        "the handler sees who asked"
    );
    // SAFETY: geteuid has no preconditions.
    assert_eq!(peer.uid, unsafe { libc::geteuid() });
}

#[test]
fn errors_come_back_as_the_variant_and_text_the_handler_returned() {
    let d = tempfile::tempdir().unwrap();
    let srv = Running::start(&d.path().join("pool.ctl"));
    let mut c = srv.client();
    let create = |name: &str| Request::Create {
        name: name.into(),
        parent: None,
        size: None,
    };
    let e = c
        .call(&create("taken"), &[], &mut no_progress())
        .unwrap_err();
    assert!(matches!(&e, Error::AlreadyExists(m) if m == "layer \"taken\" already exists"));
    let rm = Request::Remove {
        name: "gone".into(),
        force: false,
    };
    let e = c.call(&rm, &[], &mut no_progress()).unwrap_err();
    assert!(matches!(&e, Error::NotFound(_)));
    assert_eq!(e.to_string(), "no layer \"gone\"");
    let e = c.call(&Request::Df, &[], &mut no_progress()).unwrap_err();
    let Error::Io { context, source } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(context, "growing pool /p");
    assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
    // An error does not end the connection.
    assert!(c.call(&create("ok"), &[], &mut no_progress()).is_ok());
}

#[test]
fn files_cross_by_descriptor_with_progress() {
    let d = tempfile::tempdir().unwrap();
    let srv = Running::start(&d.path().join("pool.ctl"));
    let mut c = srv.client();

    let image = d.path().join("image.raw");
    fs::write(&image, vec![7u8; 10_000]).unwrap();
    let src = fs::File::open(&image).unwrap();
    let import = Request::Import {
        name: "app".into(),
        parent: None,
        label: None,
    };
    let mut seen = Vec::new();
    let r = c
        .call(&import, &[src.as_fd()], &mut |d, t| seen.push((d, t)))
        .unwrap();
    match r {
        Reply::Imported { layer: l, stats } => {
            assert_eq!(l.name, "app");
            assert_eq!(stats.bytes_read, 10_000, "the server read our open file");
        }
        r => panic!("{r:?}"),
    }
    // Throttled, but the last one always arrives.
    assert_eq!(seen.last(), Some(&(10_000, 10_000)));
    assert!(
        seen.len() < 10,
        "{} progress frames for 10 reads",
        seen.len()
    );

    let out = d.path().join("out.raw");
    let dst = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&out)
        .unwrap();
    let export = Request::Export {
        name: "web".into(),
        label: None,
    };
    let r = c.call(&export, &[dst.as_fd()], &mut |_, _| {}).unwrap();
    assert!(matches!(r, Reply::Exported { .. }));
    assert_eq!(fs::read(&out).unwrap(), b"bytes of web");
}

#[test]
fn descriptors_are_checked_at_the_edge() {
    let d = tempfile::tempdir().unwrap();
    let srv = Running::start(&d.path().join("pool.ctl"));
    let mut c = srv.client();
    let import = Request::Import {
        name: "app".into(),
        parent: None,
        label: None,
    };
    let e = c.call(&import, &[], &mut no_progress()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "import \"app\" from a passed file: needs one file descriptor (the source image, open for reading); it came with 0"
    );
    let f = fs::File::create(d.path().join("w")).unwrap(); // write-only
    let e = c
        .call(&import, &[f.as_fd()], &mut no_progress())
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)));
    assert!(
        e.to_string()
            .contains("is not the source image, open for reading"),
        "{e}"
    );
    let e = c
        .call(&Request::Ls, &[f.as_fd()], &mut no_progress())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "ls: takes no file descriptors; it came with 1"
    );
    assert!(
        srv.calls.lock().unwrap().is_empty(),
        "the handler saw none of them"
    );
}

#[test]
fn a_second_server_on_a_live_path_is_busy() {
    let d = tempfile::tempdir().unwrap();
    let srv = Running::start(&d.path().join("pool.ctl"));
    let e = ControlSocket::bind(&srv.path, Path::new("/other"))
        .err()
        .unwrap();
    assert!(matches!(e, Error::Busy(_)), "{e}");
    let m = e.to_string();
    assert!(m.contains(&srv.path.display().to_string()), "{m}");
    assert!(m.contains(&format!("pid {}", std::process::id())), "{m}");
    // The first server is untouched.
    let mut c = srv.client();
    assert!(c.call(&Request::Status, &[], &mut no_progress()).is_ok());
}

#[test]
fn a_stale_socket_is_no_server_and_is_replaced() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("pool.ctl");
    assert!(
        Client::connect(&path).unwrap().is_none(),
        "no file: no server"
    );
    drop(UnixListener::bind(&path).unwrap()); // what a killed server leaves
    assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    assert!(
        Client::connect(&path).unwrap().is_none(),
        "stale: no server"
    );
    let srv = Running::start(&path);
    let mut c = srv.client();
    assert!(c.call(&Request::Status, &[], &mut no_progress()).is_ok());
}

#[test]
fn stop_removes_the_socket_and_returns_with_a_client_still_connected() {
    let d = tempfile::tempdir().unwrap();
    let mut srv = Running::start(&d.path().join("pool.ctl"));
    let mut idle = srv.client();
    srv.stop();
    assert!(!srv.path.exists());
    let e = idle
        .call(&Request::Ls, &[], &mut no_progress())
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("closed the connection before answering ls"),
        "{e}"
    );
    assert!(Client::connect(&srv.path).unwrap().is_none());
}

/// A raw client: the server answers a hello of another version with its own, then closes.
#[test]
fn a_client_of_another_version_gets_the_servers_hello_and_a_close() {
    let d = tempfile::tempdir().unwrap();
    let srv = Running::start(&d.path().join("pool.ctl"));
    let s = UnixStream::connect(&srv.path).unwrap();
    let hello = json!({"hello": {"version": VERSION + 1, "client": "thinlayer 9.0.0"}});
    wire::send(&s, &wire::encode(&hello).unwrap(), &[]).unwrap();
    let (body, _) = wire::recv(&s, wire::MAX_REPLY).unwrap().unwrap();
    let v: serde_json::Value = wire::decode(&body).unwrap();
    assert_eq!(v["hello"]["version"], VERSION);
    assert_eq!(v["hello"]["pool"], "/pools/test");
    assert!(wire::recv(&s, wire::MAX_REPLY).unwrap().is_none(), "closed");
}

#[test]
fn an_oversize_request_gets_an_error_frame_and_a_close() {
    let d = tempfile::tempdir().unwrap();
    let srv = Running::start(&d.path().join("pool.ctl"));
    let s = UnixStream::connect(&srv.path).unwrap();
    let hello = json!({"hello": {"version": VERSION}});
    wire::send(&s, &wire::encode(&hello).unwrap(), &[]).unwrap();
    wire::recv(&s, wire::MAX_REPLY).unwrap().unwrap();
    (&s).write_all(&((wire::MAX_REQUEST + 1) as u32).to_le_bytes())
        .unwrap();
    let (body, _) = wire::recv(&s, wire::MAX_REPLY).unwrap().unwrap();
    let v: serde_json::Value = wire::decode(&body).unwrap();
    assert_eq!(v["error"]["kind"], "invalid");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("over the limit of 1048576 bytes"), "{m}");
    assert!(wire::recv(&s, wire::MAX_REPLY).unwrap().is_none(), "closed");
}

/// This binary, re-run as uid 65534, calls `status` on the socket in CHILD_SOCKET and prints
/// the outcome; without that variable it is an ordinary (empty) test.
#[test]
fn child_client_as_another_uid() {
    let Some(path) = std::env::var_os(CHILD_SOCKET) else {
        return;
    };
    let outcome = Client::connect(Path::new(&path)).and_then(|c| {
        let mut c = c.expect("a server is there");
        c.call(&Request::Status, &[], &mut |_, _| {})
    });
    match outcome {
        Ok(_) => println!("RESULT ok"),
        Err(e) => println!("RESULT {e:?} / {e}"),
    }
}

fn call_as_nobody(socket: &Path) -> String {
    let o = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_client_as_another_uid", "--nocapture"])
        .env(CHILD_SOCKET, socket)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    out.lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "child printed no result: {out}{}",
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .to_string()
}

#[test]
fn another_uid_is_refused_by_the_file_mode_and_by_the_peer_check() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a client as uid {NOBODY}");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let srv = Running::start(&d.path().join("pool.ctl"));

    // 0600: the kernel refuses the connect; the client says who may not and whose it is.
    let r = call_as_nobody(&srv.path);
    let want = format!(
        "uid {NOBODY} may not use the control socket {} (owned by uid 0): Permission denied (os error 13)",
        srv.path.display()
    );
    assert!(r.ends_with(&want), "{r}");

    // Were the mode ever wider, SO_PEERCRED still keeps the socket its owner's (and root's).
    fs::set_permissions(&srv.path, fs::Permissions::from_mode(0o666)).unwrap();
    let r = call_as_nobody(&srv.path);
    let want = format!(
        "Io {{ context: \"uid {NOBODY} may not use the control socket of pool /pools/test (owned by uid 0)\", source: Os {{ code: 13"
    );
    assert!(r.starts_with(&want), "{r}");
    assert!(
        srv.calls.lock().unwrap().is_empty(),
        "no request of theirs ran"
    );

    // Root and the owner (here the same) still get in.
    let mut c = srv.client();
    assert!(c.call(&Request::Status, &[], &mut no_progress()).is_ok());
}
