//! A snapshot's layer attributes and containerd's view of them (`Info`): kind, labels and
//! times are written with the layer change and read back from `LayerInfo.attrs`.

use super::api::{Info, Kind};
use super::keys;
use crate::volume::LayerInfo;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Active => "active",
        Kind::View => "view",
        Kind::Committed => "committed",
        Kind::Unknown => "unknown",
    }
}

fn parse_kind(s: &str) -> Kind {
    match s {
        "active" => Kind::Active,
        "view" => Kind::View,
        "committed" => Kind::Committed,
        _ => Kind::Unknown,
    }
}

pub fn time_value(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

fn parse_time(s: &str) -> Option<SystemTime> {
    let (secs, nanos) = s.split_once('.')?;
    let d = Duration::new(secs.parse().ok()?, nanos.parse().ok()?);
    UNIX_EPOCH.checked_add(d)
}

pub fn labels_value(labels: &HashMap<String, String>) -> String {
    // Sorted, so the same labels are always the same bytes.
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    serde_json::to_string(&sorted).expect("string maps serialize")
}

fn parse_labels(s: &str) -> HashMap<String, String> {
    serde_json::from_str(s).unwrap_or_default()
}

/// Whether `l` is the layer of snapshot `key` (not merely a layer with its name).
pub fn is_snapshot(l: &LayerInfo, key: &str) -> bool {
    l.attrs.get(keys::KEY).map(String::as_str) == Some(key)
}

pub fn kind(l: &LayerInfo) -> Kind {
    l.attrs
        .get(keys::KIND)
        .map_or(Kind::Unknown, |k| parse_kind(k))
}

/// containerd's view of snapshot layer `l`; `parent_key` is its parent snapshot's key ("" on
/// a base).
pub fn info(l: &LayerInfo, parent_key: String) -> Info {
    let time = |k: &str| l.attrs.get(k).and_then(|v| parse_time(v));
    let created = time(keys::CREATED).unwrap_or(UNIX_EPOCH);
    Info {
        kind: kind(l),
        name: l.attrs.get(keys::KEY).cloned().unwrap_or_default(),
        parent: parent_key,
        labels: l
            .attrs
            .get(keys::LABELS)
            .map(|v| parse_labels(v))
            .unwrap_or_default(),
        created_at: created,
        updated_at: time(keys::UPDATED).unwrap_or(created),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_labels_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(parse_time(&time_value(t)), Some(t));
        assert_eq!(parse_time("junk"), None);
        let labels: HashMap<String, String> =
            [("b".into(), "2".into()), ("a".into(), "1".into())].into();
        assert_eq!(labels_value(&labels), r#"{"a":"1","b":"2"}"#);
        assert_eq!(parse_labels(&labels_value(&labels)), labels);
        for k in [Kind::Active, Kind::View, Kind::Committed] {
            assert_eq!(parse_kind(kind_name(&k)), k);
        }
    }
}
