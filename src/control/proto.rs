//! The messages after the hello. A client sends one `Request` at a time; the server answers
//! with zero or more `Progress` frames and then exactly one `Reply` or `Error`. Enums are
//! externally tagged in snake_case: `{"create": {"name": "web", ...}}`, `"ls"`.

use crate::check::CheckReport;
use crate::error::{Error, Kind};
use crate::format::ids::LayerId;
use crate::image::{ExportStats, ImportStats};
use crate::stream::{ReceiveStats, SendStats};
use crate::volume::{LayerInfo, PoolUsage};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Create {
        name: String,
        #[serde(default)]
        parent: Option<String>,
        #[serde(default)]
        size: Option<u64>,
    },
    Commit {
        name: String,
    },
    Remove {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// Carries one descriptor: the source image, opened read-only by the client.
    Import {
        name: String,
        #[serde(default)]
        parent: Option<String>,
        /// How the client names the file (its path), for messages only: never opened.
        #[serde(default)]
        label: Option<String>,
    },
    /// Carries one descriptor: the destination, opened write-only (created, truncated).
    Export {
        name: String,
        /// How the client names the file (its path), for messages only: never opened.
        #[serde(default)]
        label: Option<String>,
    },
    Ls,
    History {
        name: String,
    },
    Df,
    Check {
        #[serde(default)]
        data: bool,
    },
    Status,
    /// Replace the serving process with a new one running `binary` (default: the server's
    /// own binary, read again from disk), handing over the live files and the listening
    /// sockets; `thinlayer restart`.
    Restart {
        #[serde(default)]
        binary: Option<String>,
    },
    /// Attach a layer as a live file (`serve --files`).
    Attach {
        name: String,
    },
    Detach {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// Carries one descriptor: where the stream goes, open for writing (a pipe, a file).
    Send {
        name: String,
        /// The ancestor the diff is over (default: the layer's parent).
        #[serde(default)]
        from: Option<String>,
        #[serde(default)]
        label: Option<String>,
    },
    /// Carries one descriptor: the stream, open for reading (a pipe, a file).
    Receive {
        name: String,
        #[serde(default)]
        parent: Option<String>,
        /// Refuse the stream unless its sha256 is this (`sha256:<hex>`; a pull's blob digest).
        #[serde(default)]
        digest: Option<String>,
        #[serde(default)]
        label: Option<String>,
    },
    /// Note that read-only layer `name`'s blob is in `location` (`host[:port]/repository` of a
    /// registry): a push or pull just put it there or found it there. A later push to another
    /// repository of that registry mounts the blob from there instead of uploading it.
    RecordSource {
        name: String,
        location: String,
    },
    /// `pull --lazy`: the server reaches the registry itself (with its own user's docker
    /// credentials), makes the image's layers remote at once and fetches their data in the
    /// background and on demand (DESIGN.md §13). Blobs of stream version 1 pull whole.
    PullLazy {
        reference: String,
        /// The top layer's name (default: `reference` as written).
        #[serde(default)]
        name: Option<String>,
        /// Plain HTTP to a registry that is not on loopback.
        #[serde(default)]
        plain_http: bool,
    },
}

impl Request {
    /// Descriptors the request must carry, and what each is for (for the refusal message).
    pub fn fds_expected(&self) -> Option<&'static str> {
        match self {
            Request::Import { .. } => Some("the source image, open for reading"),
            Request::Export { .. } => Some("the destination file, open for writing"),
            Request::Send { .. } => Some("where the stream goes, open for writing"),
            Request::Receive { .. } => Some("the stream, open for reading"),
            _ => None,
        }
    }
}

/// A request as the server's log shows it: the command line it stands for.
impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Create { name, parent, size } => {
                write!(f, "create {name:?}")?;
                if let Some(p) = parent {
                    write!(f, " --parent {p:?}")?;
                }
                if let Some(s) = size {
                    write!(f, " --size {s}")?;
                }
                Ok(())
            }
            Request::Commit { name } => write!(f, "commit {name:?}"),
            Request::Remove { name, force } => {
                write!(f, "rm {name:?}{}", if *force { " --force" } else { "" })
            }
            Request::Import { name, parent, .. } => {
                write!(f, "import {name:?} from a passed file")?;
                match parent {
                    Some(p) => write!(f, " --parent {p:?}"),
                    None => Ok(()),
                }
            }
            Request::Export { name, .. } => write!(f, "export {name:?} to a passed file"),
            Request::Ls => f.write_str("ls"),
            Request::History { name } => write!(f, "history {name:?}"),
            Request::Df => f.write_str("df"),
            Request::Check { data } => f.write_str(if *data { "check --data" } else { "check" }),
            Request::Status => f.write_str("status"),
            Request::Restart { binary } => match binary {
                Some(b) => write!(f, "restart --binary {b:?}"),
                None => f.write_str("restart"),
            },
            Request::Attach { name } => write!(f, "attach {name:?}"),
            Request::Detach { name, force } => {
                write!(f, "detach {name:?}{}", if *force { " --force" } else { "" })
            }
            Request::Send { name, from, .. } => {
                write!(f, "send {name:?} to a passed file")?;
                match from {
                    Some(a) => write!(f, " --from {a:?}"),
                    None => Ok(()),
                }
            }
            Request::Receive { name, parent, .. } => {
                write!(f, "receive {name:?} from a passed file")?;
                match parent {
                    Some(p) => write!(f, " --parent {p:?}"),
                    None => Ok(()),
                }
            }
            Request::RecordSource { name, location } => {
                write!(f, "record-source {name:?} {location:?}")
            }
            Request::PullLazy {
                reference,
                name,
                plain_http,
            } => {
                write!(f, "pull --lazy {reference:?}")?;
                if let Some(n) = name {
                    write!(f, " {n:?}")?;
                }
                if *plain_http {
                    f.write_str(" --plain-http")?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// create
    Layer(#[serde(with = "wire_layer")] LayerInfo),
    /// ls, history
    Layers(#[serde(with = "wire_layers")] Vec<LayerInfo>),
    /// df
    Usage(PoolUsage),
    Check(CheckReport),
    Imported {
        #[serde(with = "wire_layer")]
        layer: LayerInfo,
        stats: ImportStats,
    },
    Exported {
        stats: ExportStats,
    },
    /// `freed`: the pool bytes the layer alone held, which `rm` prints.
    Removed {
        name: String,
        freed: u64,
    },
    Committed {
        name: String,
    },
    Status(Box<Status>),
    /// restart: the new process serves. `held_ms`: how long I/O waited at the gate, from
    /// closing it in the old process to the new one's first request served.
    Restarted {
        old_pid: u32,
        new_pid: u32,
        binary: String,
        held_ms: u64,
    },
    /// attach: the file a loop device can use.
    Attached {
        name: String,
        path: String,
        writable: bool,
    },
    Detached {
        name: String,
    },
    Sent {
        stats: SendStats,
    },
    Received {
        #[serde(with = "wire_layer")]
        layer: LayerInfo,
        stats: ReceiveStats,
    },
    /// record_source: the layer's sources, newest first.
    SourceRecorded {
        name: String,
        sources: Vec<String>,
    },
    /// pull_lazy: blob digests by what became of them, as `pull --json` shows them.
    Pulled(Pulled),
}

/// What a pull did: the top layer's name, and the image's blobs by what became of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulled {
    /// The layer the image's top became (or already was).
    pub name: String,
    /// Made remote: fetched on demand and in the background (`pull --lazy`).
    #[serde(default)]
    pub lazy: Vec<String>,
    /// Downloaded whole before the reply (every blob of a plain pull; of a lazy pull, blobs of
    /// stream version 1, which cannot be read by range).
    pub downloaded: Vec<String>,
    /// Already in the pool.
    pub skipped: Vec<String>,
    pub bytes_downloaded: u64,
}

/// What `status` shows about a running server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub pool: String,
    /// "thinlayer X.Y.Z"
    pub server: String,
    /// RFC 3339.
    pub started: String,
    /// The layers exported over NBD.
    pub exports: Vec<String>,
    /// Where NBD clients connect, e.g. "unix socket /var/lib/thinlayer/pool.sock".
    pub listen: Vec<String>,
    /// Open NBD connections.
    pub connections: Vec<ConnectionInfo>,
    /// Writes not yet committed, in bytes.
    pub pending_bytes: u64,
    /// The keeper process that restarts the server after a crash (`serve --keeper`).
    #[serde(default)]
    pub keeper: Option<u32>,
    /// The binary serving, as `restart` runs it again by default.
    #[serde(default)]
    pub binary: String,
    /// The control socket.
    #[serde(default)]
    pub control: String,
    /// The live-files directory (`serve --files`) and the attached files in it.
    #[serde(default)]
    pub files_dir: Option<String>,
    #[serde(default)]
    pub files: Vec<String>,
    /// containerd's snapshots socket (`serve --containerd-socket`).
    #[serde(default)]
    pub containerd: Option<String>,
    /// How many processes served this pool since `serve` was started (1 + restarts).
    #[serde(default)]
    pub generation: u64,
    /// Remote layers being fetched (`pull --lazy`), and their last errors.
    #[serde(default)]
    pub fills: Vec<FillStatus>,
    /// The checksum page cache (`serve --map-cache`): bytes held, its budget, and lookups
    /// that found their page / read it, since the last checkpoint.
    #[serde(default)]
    pub map_cache: MapCacheStatus,
    /// The maps' background load after a lazy open (DESIGN §12 item 3).
    #[serde(default)]
    pub maps: MapsStatus,
}

/// Where a lazily opened pool's maps stand, as `status` shows them: a large pool's load runs
/// for seconds after the server answers (reads and writes load the ranges they touch first).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapsStatus {
    /// Every map is loaded and the allocator rebuilt from them (an eager open, or the load
    /// done). False from a server too old to say.
    pub loaded: bool,
    /// Ranges of the checkpoint's map index, and how many are not loaded yet.
    pub ranges: u64,
    pub ranges_left: u64,
    /// The load stopped on a damaged range (named in the server's log and by `check`):
    /// changes are refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
}

/// The checksum page cache as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapCacheStatus {
    pub bytes: u64,
    pub budget: u64,
    pub hits: u64,
    pub misses: u64,
}

/// One remote layer's background fetch, as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillStatus {
    pub layer: String,
    /// `host[:port]/repository` it is fetched from.
    pub registry: String,
    /// Bytes of data the layer holds, and its blob's data bytes in all.
    pub fetched: u64,
    pub total: u64,
    /// Ranged requests made by this process.
    pub requests: u64,
    /// "fetching", "waiting" (for the registry, after an error), "on demand" (no background
    /// fetch: `serve --no-remote-fill`) or "opening" (its blob's index not read yet).
    pub state: String,
    /// The last error, if the last attempt failed.
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub client: String,
    pub export: String,
    pub writable: bool,
    /// RFC 3339.
    pub since: String,
}

/// Everything the server sends after the hello.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerFrame {
    Progress { done: u64, total: u64 },
    Reply(Reply),
    Error(WireError),
}

/// A `crate::Error` on the wire. `message` is always the whole text the CLI prints, so a
/// client in any language can show it; an Io error also carries its context and raw errno,
/// from which the same `Error::Io` is rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// Of `in_use`: who holds the layer (NBD connection names, live file paths).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<String>,
}

/// Every kind the wire knows and its name there, in the order of `crate::Error`'s variants:
/// the one place kinds cross the socket.
pub const KINDS: [(Kind, &str); 12] = [
    (Kind::Io, "io"),
    (Kind::InvalidInput, "invalid"),
    (Kind::NotFound, "not_found"),
    (Kind::AlreadyExists, "already_exists"),
    (Kind::Conflict, "conflict"),
    (Kind::InUse, "in_use"),
    (Kind::Busy, "busy"),
    (Kind::NoSpace, "no_space"),
    (Kind::ReadOnly, "read_only"),
    (Kind::Corrupt, "corrupt"),
    (Kind::Unavailable, "unavailable"),
    (Kind::Internal, "internal"),
];

/// The wire name of `kind`.
pub fn kind_name(kind: Kind) -> &'static str {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, n)| *n)
        .expect("KINDS lists every kind")
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> WireError {
        let (context, errno) = match e {
            Error::Io { context, source } => (Some(context.clone()), source.raw_os_error()),
            _ => (None, None),
        };
        let holders = match e {
            Error::InUse { holders, .. } => holders.clone(),
            _ => Vec::new(),
        };
        WireError {
            kind: kind_name(e.kind()).into(),
            message: e.to_string(),
            context,
            errno,
            holders,
        }
    }
}

impl WireError {
    /// The same variant with the same text (and holders). An io error that was not an OS
    /// error (an unexpected end of file, say) keeps its text, rebuilt as `io::Error::other`.
    pub fn into_error(self) -> Error {
        let m = self.message;
        // A kind from a newer server is shown as `invalid`: the text still says what happened.
        let kind = KINDS
            .iter()
            .find(|(_, n)| *n == self.kind)
            .map_or(Kind::InvalidInput, |(k, _)| *k);
        match kind {
            Kind::Io => {
                let context = self.context.unwrap_or_default();
                let source = match self.errno {
                    Some(n) => io::Error::from_raw_os_error(n),
                    None => {
                        let rest = m.strip_prefix(&format!("{context}: ")).unwrap_or(&m);
                        io::Error::other(rest.to_string())
                    }
                };
                Error::Io { context, source }
            }
            Kind::InUse => Error::InUse {
                message: m,
                holders: self.holders,
            },
            k => Error::new(k, m),
        }
    }
}

/// `LayerInfo` as JSON output shows it, plus the fields that output skips (`id`,
/// `children`), so a reply through the server is the same value as a direct open.
mod wire_layer {
    use super::*;
    use serde::{Deserializer, Serializer};

    #[derive(Serialize)]
    pub(super) struct Out<'a> {
        #[serde(flatten)]
        info: &'a LayerInfo,
        id: u32,
        children: &'a [String],
    }

    #[derive(Deserialize)]
    pub(super) struct In {
        #[serde(flatten)]
        info: LayerInfo,
        id: u32,
        #[serde(default)]
        children: Vec<String>,
    }

    impl<'a> From<&'a LayerInfo> for Out<'a> {
        fn from(info: &'a LayerInfo) -> Self {
            Out {
                info,
                id: info.id.0,
                children: &info.children,
            }
        }
    }

    impl From<In> for LayerInfo {
        fn from(w: In) -> LayerInfo {
            LayerInfo {
                id: LayerId(w.id),
                children: w.children,
                ..w.info
            }
        }
    }

    pub fn serialize<S: Serializer>(info: &LayerInfo, s: S) -> Result<S::Ok, S::Error> {
        Out::from(info).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<LayerInfo, D::Error> {
        In::deserialize(d).map(LayerInfo::from)
    }
}

mod wire_layers {
    use super::wire_layer::{In, Out};
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[LayerInfo], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(Out::from))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<LayerInfo>, D::Error> {
        let v = Vec::<In>::deserialize(d)?;
        Ok(v.into_iter().map(LayerInfo::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, id: u32) -> LayerInfo {
        LayerInfo {
            name: name.into(),
            parent: Some("acme/base:1.0".into()),
            writable: true,
            size: 4096,
            virtual_size: 1 << 20,
            disk_size: 1 << 30,
            created: "2026-01-02T03:04:05Z".into(),
            importing: false,
            remote: false,
            fetched: None,
            attrs: [("containerd.key".to_string(), "default/1/c".to_string())].into(),
            id: LayerId(id),
            children: vec!["child-a".into(), "child-b".into()],
        }
    }

    fn roundtrip<T: Serialize + serde::de::DeserializeOwned>(x: &T) -> T {
        let frame = super::super::wire::encode(x).unwrap();
        super::super::wire::decode(&frame[4..]).unwrap()
    }

    #[test]
    fn every_request_survives_the_wire() {
        let all = [
            Request::Create {
                name: "web".into(),
                parent: Some("base".into()),
                size: Some(10 << 30),
            },
            Request::Create {
                name: "scratch".into(),
                parent: None,
                size: None,
            },
            Request::Commit { name: "web".into() },
            Request::Remove {
                name: "web".into(),
                force: true,
            },
            Request::Import {
                name: "acme/app:2".into(),
                parent: Some("acme/base:1.0".into()),
                label: Some("app.img".into()),
            },
            Request::Export {
                name: "web".into(),
                label: None,
            },
            Request::Ls,
            Request::History { name: "web".into() },
            Request::Df,
            Request::Check { data: true },
            Request::Status,
            Request::Restart {
                binary: Some("/usr/bin/thinlayer".into()),
            },
            Request::Attach { name: "web".into() },
            Request::Detach {
                name: "web".into(),
                force: true,
            },
            Request::PullLazy {
                reference: "reg.example:5000/acme/app:2".into(),
                name: Some("app".into()),
                plain_http: false,
            },
        ];
        for r in all {
            assert_eq!(roundtrip(&r), r);
        }
    }

    #[test]
    fn requests_have_the_documented_shape() {
        let v = serde_json::to_value(Request::Create {
            name: "web".into(),
            parent: None,
            size: Some(4096),
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"create": {"name": "web", "parent": null, "size": 4096}})
        );
        assert_eq!(serde_json::to_value(Request::Ls).unwrap(), "ls");
        // Optional fields may be left out.
        let r: Request = serde_json::from_str(r#"{"remove":{"name":"x"}}"#).unwrap();
        assert_eq!(
            r,
            Request::Remove {
                name: "x".into(),
                force: false
            }
        );
    }

    #[test]
    fn the_requests_in_docs_control_md_are_requests() {
        // The request table: second column of each row, inside backticks.
        let doc = include_str!("../../docs/CONTROL.md");
        let mut n = 0;
        for row in doc.lines().filter(|l| l.starts_with("| ")) {
            let Some(cell) = row.split(" | ").nth(1) else {
                continue;
            };
            let Some(json) = cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')) else {
                continue;
            };
            if json.starts_with('{') || json.starts_with('"') {
                let r: Request =
                    serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
                // Written in full: decoding drops nothing, encoding adds nothing.
                let v: serde_json::Value = serde_json::from_str(json).unwrap();
                assert_eq!(serde_json::to_value(&r).unwrap(), v, "{json}");
                n += 1;
            }
        }
        assert_eq!(n, 16, "one row per request, and a base create");
    }

    #[test]
    fn layer_replies_keep_the_fields_json_output_skips() {
        let l = layer("web", 7);
        match roundtrip(&Reply::Layer(l.clone())) {
            Reply::Layer(got) => assert_eq!(got, l),
            other => panic!("{other:?}"),
        }
        let ls = vec![layer("a", 1), layer("b", 2)];
        match roundtrip(&Reply::Layers(ls.clone())) {
            Reply::Layers(got) => assert_eq!(got, ls),
            other => panic!("{other:?}"),
        }
        // What `ls --json` prints from the received value is what a direct open prints.
        let Reply::Layers(got) = roundtrip(&Reply::Layers(ls.clone())) else {
            unreachable!()
        };
        assert_eq!(
            serde_json::to_string(&got).unwrap(),
            serde_json::to_string(&ls).unwrap()
        );
    }

    #[test]
    fn every_reply_and_frame_survives_the_wire() {
        let usage = PoolUsage {
            path: Some("/pool".into()),
            block_size: 4096,
            layers: 3,
            file_size: 1 << 30,
            file_allocated: 1 << 20,
            allocated: 1 << 20,
            data_bytes: 900_000,
            metadata_bytes: 100_000,
            free_under_cap: None,
            max_size: Some(1 << 40),
            remote_layers: 1,
            remote_fetched: 1 << 20,
            virtual_total: 3 << 20,
            sharing_saves: 2 << 20,
            loading: true,
        };
        let status = Status {
            pid: 42,
            pool: "/pool".into(),
            server: "thinlayer 0.1.0".into(),
            started: "2026-01-02T03:04:05Z".into(),
            exports: vec!["web".into()],
            listen: vec!["unix socket /pool.sock".into()],
            connections: vec![ConnectionInfo {
                client: "unix client #1".into(),
                export: "web".into(),
                writable: true,
                since: "2026-01-02T03:04:06Z".into(),
            }],
            pending_bytes: 8192,
            keeper: Some(41),
            binary: "/usr/bin/thinlayer".into(),
            control: "/pool.ctl".into(),
            files_dir: Some("/pool.files".into()),
            files: vec!["/pool.files/web".into()],
            containerd: None,
            generation: 2,
            fills: vec![FillStatus {
                layer: "acme/app:2".into(),
                registry: "reg.example:5000/acme/app".into(),
                fetched: 1 << 20,
                total: 8 << 20,
                requests: 3,
                state: "waiting".into(),
                error: Some("connection refused".into()),
            }],
            map_cache: MapCacheStatus {
                bytes: 4 << 20,
                budget: 64 << 20,
                hits: 900,
                misses: 100,
            },
            maps: MapsStatus {
                loaded: false,
                ranges: 48213,
                ranges_left: 30977,
                stopped: true,
            },
        };
        let all = vec![
            ServerFrame::Progress { done: 5, total: 10 },
            ServerFrame::Reply(Reply::Layer(layer("web", 3))),
            ServerFrame::Reply(Reply::Layers(vec![layer("a", 1)])),
            ServerFrame::Reply(Reply::Usage(usage)),
            ServerFrame::Reply(Reply::Check(CheckReport {
                faults: vec![crate::fault::Fault::new(
                    crate::fault::What::Checksum {
                        stored: 1,
                        computed: 2,
                    },
                    crate::fault::Where::layer(LayerId(3), "web"),
                )],
                notes: vec![crate::fault::Fault::new(
                    crate::fault::What::BadSlot {
                        reason: "superblock slot 1: bad checksum".into(),
                        other_slot_good: true,
                    },
                    crate::fault::Where::default(),
                )],
                generation: 9,
                layers: 2,
                data_blocks: 100,
                verified_blocks: 100,
            })),
            ServerFrame::Reply(Reply::Imported {
                layer: layer("app", 4),
                stats: ImportStats {
                    bytes_read: 1,
                    bytes_changed: 2,
                    bytes_skipped_holes: 3,
                },
            }),
            ServerFrame::Reply(Reply::Exported {
                stats: ExportStats {
                    size: 10,
                    bytes_written: 4,
                },
            }),
            ServerFrame::Reply(Reply::Removed {
                name: "web".into(),
                freed: 4096,
            }),
            ServerFrame::Reply(Reply::Committed { name: "web".into() }),
            ServerFrame::Reply(Reply::Status(Box::new(status))),
            ServerFrame::Reply(Reply::Restarted {
                old_pid: 1,
                new_pid: 2,
                binary: "/usr/bin/thinlayer".into(),
                held_ms: 30,
            }),
            ServerFrame::Reply(Reply::Attached {
                name: "web".into(),
                path: "/run/thinlayer/files/web".into(),
                writable: true,
            }),
            ServerFrame::Reply(Reply::Detached { name: "web".into() }),
            ServerFrame::Reply(Reply::Pulled(Pulled {
                name: "app".into(),
                lazy: vec!["sha256:aa".into()],
                downloaded: vec!["sha256:bb".into()],
                skipped: vec![],
                bytes_downloaded: 4096,
            })),
            ServerFrame::Error(WireError::from(&Error::NotFound("no layer".into()))),
        ];
        for f in &all {
            // Encoding what was decoded gives the same bytes: nothing lost either way.
            let json = serde_json::to_value(f).unwrap();
            assert_eq!(serde_json::to_value(roundtrip(f)).unwrap(), json, "{f:?}");
        }
    }

    fn one_of_each() -> Vec<Error> {
        vec![
            Error::io(
                "opening pool /p",
                io::Error::from_raw_os_error(libc::ENOENT),
            ),
            Error::InvalidInput("invalid size \"x\"".into()),
            Error::NotFound("no layer \"web\"".into()),
            Error::AlreadyExists("a layer named \"web\" already exists".into()),
            Error::Conflict("layer \"web\" has children".into()),
            Error::InUse {
                message: "layer \"web\" is in use by 1 NBD connection(s)".into(),
                holders: vec!["unix client 3".into()],
            },
            Error::Busy("pool /p is in use by pid 9".into()),
            Error::NoSpace("pool /p is full".into()),
            Error::ReadOnly("layer \"base\" (id 1) is read-only".into()),
            Error::Corrupt("page 7: bad checksum".into()),
            Error::Unavailable("no server is running for pool /p".into()),
            Error::Internal("the containerd server: the thread panicked".into()),
        ]
    }

    #[test]
    fn every_error_comes_back_as_the_same_variant_with_the_same_text() {
        let samples = one_of_each();
        let kinds: Vec<Kind> = samples.iter().map(|e| e.kind()).collect();
        assert_eq!(kinds, Kind::ALL, "one sample per kind, in order");
        let names: Vec<String> = samples.iter().map(|e| WireError::from(e).kind).collect();
        let want: Vec<&str> = KINDS.iter().map(|(_, n)| *n).collect();
        assert_eq!(names, want);
        for e in samples {
            let back = roundtrip(&WireError::from(&e)).into_error();
            assert_eq!(back.kind(), e.kind(), "{e}");
            assert_eq!(back.to_string(), e.to_string());
            assert_eq!(back.errno(), e.errno(), "{e}");
            if let (Error::InUse { holders: a, .. }, Error::InUse { holders: b, .. }) = (&back, &e)
            {
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn docs_control_md_lists_every_error_kind() {
        let doc = include_str!("../../docs/CONTROL.md");
        for (_, name) in KINDS {
            let row = format!("| `{name}` |");
            assert!(doc.contains(&row), "docs/CONTROL.md has no row for {name}");
        }
    }

    #[test]
    fn io_errors_keep_their_errno_and_their_text_without_one() {
        let full = Error::io("pool /p", io::Error::from_raw_os_error(libc::ENOSPC));
        let w = WireError::from(&full);
        assert_eq!(w.errno, Some(libc::ENOSPC));
        assert_eq!(w.context.as_deref(), Some("pool /p"));
        let back = w.into_error();
        assert_eq!(back.errno(), libc::ENOSPC);
        let Error::Io { source, .. } = &back else {
            panic!("{back:?}")
        };
        assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));

        let eof = Error::io(
            "reading image a.img at byte 4096",
            io::Error::from(io::ErrorKind::UnexpectedEof),
        );
        let back = roundtrip(&WireError::from(&eof)).into_error();
        assert!(matches!(back, Error::Io { .. }));
        assert_eq!(back.to_string(), eof.to_string());
    }

    #[test]
    fn an_unknown_kind_from_a_newer_server_still_shows_its_text() {
        let w = WireError {
            kind: "quota".into(),
            message: "over quota".into(),
            context: None,
            errno: None,
            holders: Vec::new(),
        };
        let e = w.into_error();
        assert!(matches!(&e, Error::InvalidInput(m) if m == "over quota"));
    }

    #[test]
    fn the_log_shows_a_request_as_its_command_line() {
        let r = Request::Create {
            name: "web".into(),
            parent: Some("base".into()),
            size: None,
        };
        assert_eq!(r.to_string(), r#"create "web" --parent "base""#);
        let r = Request::Import {
            name: "a".into(),
            parent: None,
            label: Some("/home/me/a.img".into()),
        };
        assert_eq!(r.to_string(), r#"import "a" from a passed file"#);
    }
}
