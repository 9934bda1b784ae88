//! SIGTERM stops a server started with `serve` on a socket path: it returns Ok after a commit
//! and removes its socket. Its own test binary, since the handler is process-wide.

mod nbd_common;

use nbd_common::*;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;
use thinlayer::listen::Stop;
use thinlayer::nbd::{serve, Listener, ServerConfig};
use thinlayer::server::install_signal_handlers;

#[test]
fn sigterm_stops_the_server_after_a_commit_and_removes_its_socket() {
    let stop = install_signal_handlers().unwrap();
    assert!(Arc::ptr_eq(&stop, &install_signal_handlers().unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("srv.sock");
    // A stale socket left by a dead server is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let catalog = Arc::new(MemCatalog::standard());
    let (c, s, p) = (catalog.clone(), stop.clone(), path.clone());
    let server =
        std::thread::spawn(move || serve(&*c, &Listener::Unix(p), &ServerConfig::default(), &s));
    let start = std::time::Instant::now();
    let mut client = loop {
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => break RawClient::go(s, "ro", false),
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("server never listened: {e}"),
        }
    };
    assert_eq!(client.read(0, 8), Ok(pattern(0, 8)));

    // SAFETY: raising a signal whose handler only sets an atomic flag and writes an eventfd.
    assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
    server.join().unwrap().expect("serve returned an error");
    assert!(stop.is_stopped());
    assert_eq!(catalog.flush_alls.load(SeqCst), 1);
    assert!(client.is_closed());
    assert!(!path.exists(), "socket file left behind");
}

#[test]
fn a_live_server_on_the_path_is_not_displaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.sock");
    let _live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let stop = Stop::new();
    let err = serve(
        &MemCatalog::standard(),
        &Listener::Unix(path.clone()),
        &ServerConfig::default(),
        &stop,
    )
    .unwrap_err();
    assert!(err.to_string().contains("another server"), "{err}");
    assert!(path.exists());
}
