//! The generated code of containerd's snapshots API (src/snapshot/api/) is what prost and tonic
//! make of the .proto files beside it: regenerate it with protox, a protobuf compiler written in
//! Rust (so no protoc is needed, here or in the build), and compare byte for byte.
//!
//! After changing a .proto file or the generator versions, `tools/regen-snapshot-api` writes the
//! new code (this test with THINLAYER_REGENERATE=1).

use std::path::{Path, PathBuf};

/// The .proto files compiled, relative to the include root `src/snapshot/api/proto`.
const PROTOS: &[&str] = &[
    "github.com/containerd/containerd/api/types/mount.proto",
    "github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
];

/// The files the generators write, one per protobuf package.
const GENERATED: &[&str] = &["containerd.types.rs", "containerd.services.snapshots.v1.rs"];

fn api_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/snapshot/api")
}

/// Generate the API into `out`: the server side only (thinlayer is never a snapshots client).
fn generate(out: &Path) {
    let include = api_dir().join("proto");
    let fds = protox::compile(PROTOS, [&include]).expect("protox compiles the .proto files");
    let fds_path = out.join("snapshots.fds");
    std::fs::write(&fds_path, prost::Message::encode_to_vec(&fds)).unwrap();
    let mut config = prost_build::Config::new();
    config.file_descriptor_set_path(&fds_path).skip_protoc_run();
    tonic_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(out)
        .compile_with_config(config, PROTOS, &[include])
        .expect("prost and tonic generate the API");
}

#[test]
fn committed_snapshots_api_is_what_the_protos_generate() {
    let tmp = tempfile::tempdir().unwrap();
    generate(tmp.path());
    let regenerate = std::env::var_os("THINLAYER_REGENERATE").is_some();
    let mut stale = Vec::new();
    for name in GENERATED {
        let fresh = std::fs::read_to_string(tmp.path().join(name)).unwrap();
        let committed_path = api_dir().join(name);
        if regenerate {
            std::fs::write(&committed_path, &fresh).unwrap();
            continue;
        }
        let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
        if committed != fresh {
            stale.push(committed_path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "generated code differs from the .proto files: {stale:?}; run tools/regen-snapshot-api"
    );
}
