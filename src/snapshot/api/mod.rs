//! containerd's snapshots API (`containerd.services.snapshots.v1`, with `containerd.types` for
//! `Mount`): the message types and the server trait prost 0.11 and tonic 0.9 generated from the
//! .proto files in `proto/` (see `proto/README.md` for where they came from). The generated
//! files are committed, so building needs no protobuf compiler; tests/snapshot_api.rs
//! regenerates them with protox and fails if they differ (`tools/regen-snapshot-api` rewrites
//! them).
//!
//! Beside them, `Info`: a snapshot's description with real times, as `snapshots.rs` works with
//! it, and its conversion to and from the wire's.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub mod types {
    include!("containerd.types.rs");
}

pub mod services {
    pub mod snapshots {
        pub mod v1 {
            // The module path mirrors the protobuf package, so the generated
            // `super::super::super::types::Mount` names `api::types::Mount`.
            include!("containerd.services.snapshots.v1.rs");
        }
    }
}

pub use services::snapshots::v1::Kind;
pub use types::Mount;

use services::snapshots::v1 as wire;

/// A snapshot as containerd sees it (Stat, Update, List).
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub kind: Kind,
    pub name: String,
    pub parent: String,
    pub labels: HashMap<String, String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A wire time as a `SystemTime`; times before 1970 or out of range read as the epoch (the
/// snapshotter never keeps such times, and Update does not write them).
fn system_time(t: Option<prost_types::Timestamp>) -> SystemTime {
    t.and_then(|t| {
        let secs = u64::try_from(t.seconds).ok()?;
        let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
        UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
    })
    .unwrap_or(UNIX_EPOCH)
}

impl From<Info> for wire::Info {
    fn from(i: Info) -> wire::Info {
        wire::Info {
            name: i.name,
            parent: i.parent,
            kind: i.kind as i32,
            created_at: Some(timestamp(i.created_at)),
            updated_at: Some(timestamp(i.updated_at)),
            labels: i.labels,
        }
    }
}

impl From<wire::Info> for Info {
    fn from(i: wire::Info) -> Info {
        Info {
            kind: Kind::from_i32(i.kind).unwrap_or(Kind::Unknown),
            name: i.name,
            parent: i.parent,
            labels: i.labels,
            created_at: system_time(i.created_at),
            updated_at: system_time(i.updated_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_round_trips_through_the_wire_type() {
        let info = Info {
            kind: Kind::Committed,
            name: "ns/3/sha256:ab".into(),
            parent: "ns/2/sha256:cd".into(),
            labels: [("a".to_string(), "1".to_string())].into(),
            created_at: UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            updated_at: UNIX_EPOCH + Duration::new(1_700_000_001, 999_999_999),
        };
        let on_wire = wire::Info::from(info.clone());
        assert_eq!(on_wire.kind, 3);
        let bytes = prost::Message::encode_to_vec(&on_wire);
        let back: wire::Info = prost::Message::decode(bytes.as_slice()).unwrap();
        assert_eq!(Info::from(back), info);
    }

    #[test]
    fn bad_wire_kinds_and_times_read_as_unknown_and_the_epoch() {
        let i = Info::from(wire::Info {
            kind: 42,
            created_at: Some(prost_types::Timestamp {
                seconds: -5,
                nanos: 0,
            }),
            updated_at: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 2_000_000_000,
            }),
            ..Default::default()
        });
        assert_eq!(i.kind, Kind::Unknown);
        assert_eq!(i.created_at, UNIX_EPOCH);
        assert_eq!(i.updated_at, UNIX_EPOCH);
    }
}
