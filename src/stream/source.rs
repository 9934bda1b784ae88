//! Where a read-only layer's blob is known to be: the registry repositories a push put it in or
//! a pull found it in, kept as the layer attribute `registry.sources` (docs/FORMAT.md §6.5).
//! The blob's digest is the layer's content digest (docs/STREAM.md §3), so a location is only
//! `host[:port]/repository`. A push to another repository of the same registry mounts the blob
//! from one of them (`POST .../blobs/uploads/?mount=<digest>&from=<repository>`) instead of
//! uploading it again.

use super::content::ContentIds;
use crate::error::{Error, Result};
use crate::volume::{LayerInfo, Store};

pub const SOURCES_ATTR: &str = "registry.sources";
/// The registries (`host[:port]` lines) a remote layer's blob was reached at over plain HTTP
/// (a loopback registry, or `pull --lazy --plain-http`), so that its fetch resumes over plain
/// HTTP after a restart too: any other host is dialled with HTTPS.
pub const PLAIN_HTTP_ATTR: &str = "registry.plain_http";
/// Locations kept per layer: the newest; an older one is dropped (a mount from it is only an
/// optimisation, and the registry may have deleted it anyway).
pub const MAX_SOURCES: usize = 8;

/// The layer's known locations, newest first.
pub fn sources(l: &LayerInfo) -> Vec<String> {
    l.attrs
        .get(SOURCES_ATTR)
        .map(|v| {
            v.lines()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `location` (`host[:port]/repository`) is to be reached over plain HTTP for layer
/// `l`: its host is one `PLAIN_HTTP_ATTR` names.
pub fn plain_http(l: &LayerInfo, location: &str) -> bool {
    let host = location.split_once('/').map_or(location, |(h, _)| h);
    l.attrs
        .get(PLAIN_HTTP_ATTR)
        .is_some_and(|v| v.lines().any(|h| h == host))
}

/// `have` with `location` moved (or added) to the front; None when it already is first.
fn with_first(have: &[String], location: &str) -> Option<Vec<String>> {
    if have.first().map(String::as_str) == Some(location) {
        return None;
    }
    let mut v = vec![location.to_string()];
    v.extend(have.iter().filter(|s| *s != location).cloned());
    v.truncate(MAX_SOURCES);
    Some(v)
}

/// A location is `host[:port]/repository`: no blanks, nothing a line-separated list cannot hold.
fn check_location(location: &str) -> Result<()> {
    let ok = location.len() <= 512
        && location
            .split_once('/')
            .is_some_and(|(h, r)| !h.is_empty() && !r.is_empty())
        && !location
            .chars()
            .any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "{location:?} is not a registry location (host[:port]/repository)"
        )))
    }
}

/// Record that read-only layer `name`'s blob is in `location`, committed; returns its sources,
/// newest first. Nothing is written when `location` already is the newest.
pub fn record(store: &Store, name: &str, location: &str) -> Result<Vec<String>> {
    check_location(location)?;
    let l = store.layer(name)?;
    if l.writable || l.importing || ContentIds::of(&l).is_none() {
        return Err(Error::Conflict(format!(
            "layer {name:?} has no content ID (it is writable, or was committed before content IDs); it has no registry blob to record"
        )));
    }
    let have = sources(&l);
    let Some(new) = with_first(&have, location) else {
        return Ok(have);
    };
    let value = new.join("\n");
    store.set_attrs(name, &[(SOURCES_ATTR, Some(value.as_str()))])?;
    store.flush()?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_location_comes_first_once_and_old_ones_fall_off() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(with_first(&v(&["r/a"]), "r/a"), None);
        assert_eq!(
            with_first(&v(&["r/a", "r/b"]), "r/b"),
            Some(v(&["r/b", "r/a"]))
        );
        let many: Vec<String> = (0..MAX_SOURCES).map(|i| format!("r/{i}")).collect();
        let got = with_first(&many, "r/new").unwrap();
        assert_eq!(got.len(), MAX_SOURCES);
        assert_eq!(got[0], "r/new");
        assert!(!got.contains(&format!("r/{}", MAX_SOURCES - 1)));
        for bad in ["", "host", "/repo", "host/", "host/a b", "host/a\nb"] {
            assert!(check_location(bad).is_err(), "{bad:?}");
        }
        check_location("127.0.0.1:5000/acme/app").unwrap();
    }

    #[test]
    fn a_source_is_recorded_on_read_only_layers_and_survives_reopening() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pool");
        let s = Store::create(&p, &crate::volume::CreateOptions::default(), "a test").unwrap();
        s.create_layer("w", None, Some(1 << 20)).unwrap();
        let e = record(&s, "w", "r/a").unwrap_err();
        assert_eq!(e.kind(), crate::error::Kind::Conflict, "{e}");
        s.commit_layer("w").unwrap();
        super::super::content::record(&s, "w").unwrap();
        assert_eq!(record(&s, "w", "r/a").unwrap(), ["r/a"]);
        assert_eq!(record(&s, "w", "r/b").unwrap(), ["r/b", "r/a"]);
        drop(s);
        let s = Store::open(&p, "a test").unwrap();
        assert_eq!(sources(&s.layer("w").unwrap()), ["r/b", "r/a"]);
    }
}
