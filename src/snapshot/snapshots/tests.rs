//! The snapshot semantics on a pool in memory, with a stand-in for the live files that
//! records what is attached and can play a loop device that still holds a file.

use super::*;
use crate::pool::MemStorage;
use crate::volume::CreateOptions;
use std::collections::BTreeSet;
use tonic::Code;

#[derive(Default)]
struct FakeFiles {
    attached: Mutex<BTreeSet<String>>,
    /// Layers whose file a (pretend) loop device holds open: detach refuses.
    held: Mutex<BTreeSet<String>>,
    /// What the next detach reports lost.
    lost: Mutex<LostWrites>,
    /// Writes a (pretend) mounted filesystem holds in the page cache: layer, offset, bytes;
    /// `sync_mounted` writes them into the layer through `store`.
    unsynced: Mutex<Vec<(String, u64, Vec<u8>)>>,
    store: Mutex<Option<Arc<Store>>>,
}

impl Files for FakeFiles {
    fn attach(&self, layer: &str) -> crate::Result<PathBuf> {
        self.attached.lock().unwrap().insert(layer.to_string());
        Ok(PathBuf::from("/files").join(layer))
    }
    fn device(&self, layer: &str, read_only: bool) -> crate::Result<PathBuf> {
        self.attach(layer)?;
        let mode = if read_only { "ro" } else { "rw" };
        Ok(PathBuf::from("/dev/fake-loop").join(mode).join(layer))
    }
    fn detach(&self, layer: &str) -> crate::Result<LostWrites> {
        if self.held.lock().unwrap().contains(layer) {
            return Err(Error::InUse {
                message: format!("live file of {layer:?} is open"),
                holders: vec![format!("/files/{layer}")],
            });
        }
        self.attached.lock().unwrap().remove(layer);
        Ok(std::mem::take(&mut *self.lost.lock().unwrap()))
    }
    fn while_unmounted(
        &self,
        layer: &str,
        f: &mut dyn FnMut(&dyn BlockDevice) -> crate::Result<()>,
    ) -> crate::Result<bool> {
        if self.held.lock().unwrap().contains(layer)
            || !self.attached.lock().unwrap().contains(layer)
        {
            return Ok(false);
        }
        let store = self.store.lock().unwrap().clone().unwrap();
        f(&crate::volume::Volume::open(&store, layer)?)?;
        Ok(true)
    }
    fn mounted_at(&self, layer: &str) -> crate::Result<Option<PathBuf>> {
        // No filesystem is mounted in this stand-in.
        self.attach(layer)?;
        Ok(None)
    }
    fn sync_mounted(&self, layer: &str) -> crate::Result<()> {
        let store = self.store.lock().unwrap().clone().unwrap();
        let mut unsynced = self.unsynced.lock().unwrap();
        for (_, offset, data) in unsynced.iter().filter(|(l, _, _)| l == layer) {
            let v = crate::volume::Volume::open(&store, layer)?;
            crate::volume::BlockDevice::write_at(&v, *offset, data)?;
        }
        unsynced.retain(|(l, _, _)| l != layer);
        Ok(())
    }
}

struct Fixture {
    s: Snapshots,
    exports: Arc<LiveExports>,
    files: Arc<FakeFiles>,
    store: Arc<Store>,
    mem: Arc<MemStorage>,
    _dir: tempfile::TempDir,
}

fn small() -> HashMap<String, String> {
    [(SIZE_LABEL.to_string(), "64M".to_string())].into()
}

fn fixture() -> Fixture {
    let mem = Arc::new(MemStorage::new());
    let store = Arc::new(Store::create_in(mem.clone(), &CreateOptions::default()).unwrap());
    let files = Arc::new(FakeFiles::default());
    *files.store.lock().unwrap() = Some(store.clone());
    let dir = tempfile::tempdir().unwrap();
    let exports = Arc::new(LiveExports::new(store.clone(), Vec::new()));
    let s = Snapshots::new(exports.clone(), files.clone(), dir.path());
    Fixture {
        s,
        exports,
        files,
        store,
        mem,
        _dir: dir,
    }
}

fn code<T: std::fmt::Debug>(r: Result<T>) -> Code {
    r.unwrap_err().code
}

#[test]
fn unpacks_and_init_layers_are_mounted_without_barriers_and_containers_with() {
    let f = fixture();
    f.s.prepare("ns/1/extract-1 sha256:aa", "", small(), Kind::Active)
        .unwrap();
    f.s.commit("ns/2/sha256:aa", "ns/1/extract-1 sha256:aa", HashMap::new())
        .unwrap();
    // Committed once unmounted: what they write needs to be durable only from the Commit on.
    for key in ["ns/3/extract-2 sha256:bb", "ns/4/c1-init-key"] {
        let m =
            f.s.prepare(key, "ns/2/sha256:aa", HashMap::new(), Kind::Active);
        assert_eq!(m.unwrap()[0].options, ["noatime", "discard", "nobarrier"]);
        assert_eq!(
            f.s.mounts(key).unwrap()[0].options,
            ["noatime", "discard", "nobarrier"]
        );
    }
    // A container's root (its fsyncs must be durable on their own), a view.
    let m =
        f.s.prepare("ns/5/c1", "ns/2/sha256:aa", HashMap::new(), Kind::Active);
    assert_eq!(m.unwrap()[0].options, ["noatime", "discard"]);
    let m = f.s.prepare(
        "ns/6/extract-v",
        "ns/2/sha256:aa",
        HashMap::new(),
        Kind::View,
    );
    assert_eq!(m.unwrap()[0].options, ["noatime", "ro"]);
}

#[test]
fn prepare_commit_and_children_share_layers_with_their_metadata_in_the_pool() {
    let f = fixture();
    let m =
        f.s.prepare("ns/1/extract a", "", small(), Kind::Active)
            .unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "ext4");
    assert_eq!(m[0].options, ["noatime", "discard"]);
    assert_eq!(m[0].source, "/dev/fake-loop/rw/ns/1/extract a");
    let base = f.store.layer(&base::name(64 << 20)).unwrap();
    assert!(!base.writable);
    assert_eq!(base.attrs[keys::BASE], "ext4");

    let labels: HashMap<_, _> = [("containerd.io/snapshot.ref".into(), "x".into())].into();
    f.s.commit("ns/2/sha256:aa", "ns/1/extract a", labels.clone())
        .unwrap();
    assert!(
        f.files.attached.lock().unwrap().is_empty(),
        "commit detaches"
    );
    assert_eq!(code(f.s.stat("ns/1/extract a")), Code::NotFound);
    let c = f.s.stat("ns/2/sha256:aa").unwrap();
    assert_eq!(c.kind, Kind::Committed);
    assert_eq!(c.parent, "", "a base is no snapshot");
    assert_eq!(c.labels, labels);

    // A second image chain reuses the base: no second mkfs, no second base layer.
    f.s.prepare("ns/3/b", "", small(), Kind::Active).unwrap();
    f.s.prepare("ns/4/t1", "ns/2/sha256:aa", HashMap::new(), Kind::Active)
        .unwrap();
    f.s.prepare("ns/5/v", "ns/2/sha256:aa", HashMap::new(), Kind::View)
        .unwrap();
    let bases = f
        .store
        .layers()
        .into_iter()
        .filter(|l| l.attrs.contains_key(keys::BASE))
        .count();
    assert_eq!(bases, 1);
    let t1 = f.s.stat("ns/4/t1").unwrap();
    assert_eq!(
        (t1.kind, t1.parent.as_str()),
        (Kind::Active, "ns/2/sha256:aa")
    );
    assert_eq!(f.s.mounts("ns/5/v").unwrap()[0].options, ["noatime", "ro"]);
    assert_eq!(code(f.s.mounts("ns/2/sha256:aa")), Code::FailedPrecondition);

    let mut listed: Vec<_> = f.s.list().into_iter().map(|i| i.name).collect();
    listed.sort();
    assert_eq!(listed, ["ns/2/sha256:aa", "ns/3/b", "ns/4/t1", "ns/5/v"]);

    // All of it is in the pool: a reopen (as after a restart) sees the same snapshots.
    drop(f.s);
    let store = Arc::new(Store::open_in(f.mem.clone(), true).unwrap());
    let exports = Arc::new(LiveExports::new(store, Vec::new()));
    let s = Snapshots::new(
        exports,
        f.files.clone(),
        std::path::Path::new("/nonexistent"),
    );
    let t1 = s.stat("ns/4/t1").unwrap();
    assert_eq!(t1.parent, "ns/2/sha256:aa");
    assert_eq!(s.list().len(), 4);
}

#[test]
fn refusals_carry_the_codes_and_name_the_snapshot() {
    let f = fixture();
    f.s.prepare("k", "", small(), Kind::Active).unwrap();
    let e = f.s.prepare("k", "", small(), Kind::Active).unwrap_err();
    assert_eq!(e.code, Code::AlreadyExists);
    assert!(e.message.contains("\"k\""), "{}", e.message);
    assert_eq!(code(f.s.stat("nope")), Code::NotFound);
    assert_eq!(
        code(f.s.prepare("c", "k", HashMap::new(), Kind::Active)),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(f.s.prepare("c", "nope", HashMap::new(), Kind::Active)),
        Code::NotFound
    );
    let tiny: HashMap<_, _> = [(SIZE_LABEL.to_string(), "1M".to_string())].into();
    assert_eq!(
        code(f.s.prepare("c", "", tiny, Kind::Active)),
        Code::InvalidArgument
    );

    // A loop device still holding the file: commit and remove refuse, and change nothing.
    f.files.held.lock().unwrap().insert("k".into());
    let e = f.s.commit("done", "k", HashMap::new()).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition);
    assert!(e.message.starts_with("snapshot \"k\""), "{}", e.message);
    assert_eq!(code(f.s.remove("k")), Code::FailedPrecondition);
    assert_eq!(f.s.stat("k").unwrap().kind, Kind::Active);
    f.files.held.lock().unwrap().clear();

    // Writes its loop device lost (the pool full under writeback): never committed.
    *f.files.lost.lock().unwrap() = LostWrites {
        total: 3,
        no_space: 2,
    };
    let e = f.s.commit("done", "k", HashMap::new()).unwrap_err();
    assert_eq!(e.code, Code::ResourceExhausted);
    assert!(e.message.contains("3 write(s)"), "{}", e.message);
    assert_eq!(f.s.stat("k").unwrap().kind, Kind::Active);
    assert_eq!(code(f.s.stat("done")), Code::NotFound);

    f.s.commit("done", "k", HashMap::new()).unwrap();
    f.s.prepare("child", "done", HashMap::new(), Kind::Active)
        .unwrap();
    assert_eq!(code(f.s.remove("done")), Code::FailedPrecondition);
    assert_eq!(
        code(f.s.commit("x", "done", HashMap::new())),
        Code::FailedPrecondition
    );
    f.s.prepare("v", "done", HashMap::new(), Kind::View)
        .unwrap();
    assert_eq!(
        code(f.s.commit("x", "v", HashMap::new())),
        Code::FailedPrecondition
    );

    // A user's layer bearing a snapshot's name is neither found nor replaced nor listed.
    f.store.create_layer("mine", None, Some(1 << 20)).unwrap();
    assert_eq!(code(f.s.stat("mine")), Code::NotFound);
    assert_eq!(
        code(f.s.prepare("mine", "", small(), Kind::Active)),
        Code::AlreadyExists
    );
    assert!(f.s.list().iter().all(|i| i.name != "mine"));
    assert_eq!(code(f.s.remove("mine")), Code::NotFound);
    assert!(f.store.layer("mine").is_ok());
}

#[test]
fn update_changes_labels_only_and_remove_frees_the_layer() {
    let f = fixture();
    let labels: HashMap<_, _> = [("a".into(), "1".into()), ("b".into(), "2".into())].into();
    f.s.prepare(
        "k",
        "",
        {
            let mut l = small();
            l.extend(labels);
            l
        },
        Kind::Active,
    )
    .unwrap();
    let mut info = f.s.stat("k").unwrap();
    info.labels = [("a".into(), "9".into()), ("c".into(), "3".into())].into();
    let paths = vec!["labels.a".to_string(), "labels.b".to_string()];
    let got = f.s.update(info, Some(paths)).unwrap();
    let want: HashMap<String, String> =
        [("a".into(), "9".into()), (SIZE_LABEL.into(), "64M".into())].into();
    assert_eq!(got.labels, want, "a set, b dropped, c not asked for");
    assert!(got.updated_at >= got.created_at);
    let mut bad = f.s.stat("k").unwrap();
    bad.parent = "other".into();
    assert_eq!(
        code(f.s.update(bad, Some(vec!["parent".into()]))),
        Code::InvalidArgument
    );

    assert_eq!(f.s.usage("k").unwrap(), 0);
    f.s.remove("k").unwrap();
    assert_eq!(code(f.s.stat("k")), Code::NotFound);
    assert!(f.store.layer("k").is_err());
}

#[test]
fn usage_counts_what_a_mounted_filesystem_has_not_written_back_yet() {
    let f = fixture();
    f.s.prepare("k", "", small(), Kind::Active).unwrap();
    let layer = keys::layer_name("k");
    assert_eq!(f.s.usage("k").unwrap(), 0);
    // 8 blocks in the page cache of the filesystem on the layer's loop device.
    f.files
        .unsynced
        .lock()
        .unwrap()
        .push((layer.clone(), 1 << 20, vec![7; 8 * 4096]));
    assert_eq!(
        f.s.usage("k").unwrap(),
        8 * 4096,
        "counted without a sync by the writer"
    );
    assert!(f.files.unsynced.lock().unwrap().is_empty());
}

/// What a mount did to the journal of a snapshot's ext4, as the tests below write it.
#[derive(Clone, Copy, PartialEq)]
enum Unmount {
    /// Clean: the journal is empty, its superblock moved on (next sequence number, log head).
    Clean,
    /// Clean, with an error recorded in the journal's superblock (`s_errno`).
    Errored,
    /// Crashed: the journal has transactions to replay (`s_start` set).
    Crashed,
}

/// A mount's transactions in snapshot `key`'s journal log, a file's block elsewhere, and the
/// journal's superblock as `how` left it.
fn mounted_and_unmounted(f: &Fixture, key: &str, how: Unmount) {
    use crate::volume::{BlockDevice, Volume};
    let l = f.store.layer(&keys::layer_name(key)).unwrap();
    let j = base::journal_under(&f.store, &l).expect("the base recorded its journal");
    let v = Volume::open(&f.store, &l.name).unwrap();
    let (log, _) = j.log();
    v.write_at(log, &vec![1; 3 * 4096]).unwrap();
    v.write_at(0, &[2; 4096]).unwrap();
    let mut jsb = vec![0u8; j.block as usize];
    v.read_at(j.offset, &mut jsb).unwrap();
    assert!(super::super::ext4::journal_is_empty(&jsb));
    jsb[0x18..0x1C].copy_from_slice(&9u32.to_be_bytes());
    jsb[0x58..0x5C].copy_from_slice(&40u32.to_be_bytes());
    match how {
        Unmount::Clean => {}
        Unmount::Errored => jsb[0x20..0x24].copy_from_slice(&5u32.to_be_bytes()),
        Unmount::Crashed => jsb[0x1C..0x20].copy_from_slice(&5u32.to_be_bytes()),
    }
    v.write_at(j.offset, &jsb).unwrap();
}

#[test]
fn commit_sheds_a_clean_journal_and_keeps_a_journal_to_replay() {
    let f = fixture();
    for (key, how, blocks) in [
        // The file's block: the log trimmed, the journal's superblock set back to the base's.
        ("clean", Unmount::Clean, 1),
        // And the journal's superblock, which records the error.
        ("errored", Unmount::Errored, 2),
        // Everything: the log is needed.
        ("crashed", Unmount::Crashed, 5),
    ] {
        f.s.prepare(key, "", small(), Kind::Active).unwrap();
        mounted_and_unmounted(&f, key, how);
        f.s.commit(&format!("{key}-c"), key, HashMap::new())
            .unwrap();
        let name = keys::layer_name(&format!("{key}-c"));
        let size = f.store.layer(&name).unwrap().size;
        assert_eq!(size, blocks * 4096, "{key}");
    }
    // A child of a committed layer: the file's block written again as it was and the journal
    // set back to its parent's leave nothing.
    f.s.prepare("child", "clean-c", HashMap::new(), Kind::Active)
        .unwrap();
    mounted_and_unmounted(&f, "child", Unmount::Clean);
    f.s.commit("child-c", "child", HashMap::new()).unwrap();
    let size = f.store.layer(&keys::layer_name("child-c")).unwrap().size;
    assert_eq!(size, 0);
    f.store.verify_consistency().unwrap();
}

#[test]
fn a_snapshot_an_nbd_client_holds_is_neither_committed_nor_removed() {
    let f = fixture();
    f.s.prepare("k", "", small(), Kind::Active).unwrap();
    let layer = keys::layer_name("k");
    let conn = f
        .exports
        .hold(
            &layer,
            "unix client #7",
            crate::volume::exports::Holder::Nbd,
        )
        .unwrap();
    let e = f.s.commit("done", "k", HashMap::new()).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition);
    assert!(e.message.contains("unix client #7"), "{}", e.message);
    let e = f.s.remove("k").unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition);
    assert!(e.message.contains("unix client #7"), "{}", e.message);
    assert_eq!(f.s.stat("k").unwrap().kind, Kind::Active);

    // Let go: the commit goes through; the committed layer's content IDs are computed and
    // kept when first asked for.
    drop(conn);
    f.s.commit("done", "k", HashMap::new()).unwrap();
    let name = keys::layer_name("done");
    assert!(!f.store.layer(&name).unwrap().writable);
    crate::stream::content::ids(&f.store, &name).unwrap();
    let l = f.store.layer(&name).unwrap();
    assert!(crate::stream::ContentIds::of(&l).is_some(), "{:?}", l.attrs);
}

#[test]
fn usage_trims_the_dead_log_of_a_stopped_container_but_not_while_its_file_is_open() {
    use crate::volume::{BlockDevice, Volume};
    let f = fixture();
    f.s.prepare("k", "", small(), Kind::Active).unwrap();
    let l = f.store.layer(&keys::layer_name("k")).unwrap();
    let j = base::journal_under(&f.store, &l).expect("the base recorded its journal");
    // A mount's transactions in the (empty) journal's log, and a file's block elsewhere.
    let v = Volume::open(&f.store, &l.name).unwrap();
    let (log, _) = j.log();
    v.write_at(log.next_multiple_of(4096) + 4096, &vec![1; 3 * 4096])
        .unwrap();
    v.write_at(0, &[2; 4096]).unwrap();
    drop(v);
    // Mounted (a loop device has the file open): the log may be the journal's next
    // transaction's, so it stays.
    f.files.held.lock().unwrap().insert(l.name.clone());
    assert_eq!(f.s.usage("k").unwrap(), 4 * 4096);
    // Stopped: only the file's block is left.
    f.files.held.lock().unwrap().remove(&l.name);
    assert_eq!(f.s.usage("k").unwrap(), 4096);
    // A journal with something to replay keeps its log.
    f.s.prepare("d", "", small(), Kind::Active).unwrap();
    let l = f.store.layer(&keys::layer_name("d")).unwrap();
    let v = Volume::open(&f.store, &l.name).unwrap();
    v.write_at(log.next_multiple_of(4096) + 4096, &vec![1; 3 * 4096])
        .unwrap();
    let mut jsb = vec![0u8; j.block as usize];
    v.read_at(j.offset, &mut jsb).unwrap();
    jsb[28..32].copy_from_slice(&5u32.to_be_bytes());
    v.write_at(j.offset, &jsb).unwrap();
    drop(v);
    assert_eq!(f.s.usage("d").unwrap(), 4 * 4096);
}

/// A Commit whose answer containerd never got (the server killed after committing): containerd
/// still holds the active key and removes it; the committed snapshot it never heard of goes
/// with it instead of staying behind. Other missing keys stay "not found", and a committed
/// snapshot with children is kept.
#[test]
fn remove_of_a_key_whose_commit_went_unanswered_removes_what_the_commit_made() {
    let f = fixture();
    f.s.prepare("ns/a", "", small(), Kind::Active).unwrap();
    f.s.commit("ns/c", "ns/a", HashMap::new()).unwrap();
    // containerd got an error for that Commit and removes its active snapshot.
    f.s.remove("ns/a").unwrap();
    assert_eq!(code(f.s.stat("ns/c")), Code::NotFound);
    assert!(f.s.list().is_empty(), "nothing left behind");
    assert_eq!(code(f.s.remove("ns/a")), Code::NotFound);
    assert_eq!(code(f.s.remove("ns/never")), Code::NotFound);

    // With a child on it, the committed one stays (containerd knows it: it made the child).
    f.s.prepare("ns/b", "", small(), Kind::Active).unwrap();
    f.s.commit("ns/d", "ns/b", HashMap::new()).unwrap();
    f.s.prepare("ns/e", "ns/d", HashMap::new(), Kind::Active)
        .unwrap();
    assert_eq!(code(f.s.remove("ns/b")), Code::NotFound);
    assert_eq!(f.s.stat("ns/d").unwrap().kind, Kind::Committed);
}

/// A stand-in for the registry's fills: makes a remote layer of 1 MiB for every blob it is
/// asked for, or refuses all of them; records what it was asked.
struct FakeRemote {
    exports: Arc<LiveExports>,
    refuse: bool,
    asked: Mutex<Vec<(super::LayerAt, String, Option<String>)>>,
}

impl RemoteLayers for FakeRemote {
    fn create(
        &self,
        at: &super::LayerAt,
        name: &str,
        parent: Option<&str>,
        attrs: crate::volume::AttrChanges,
    ) -> crate::Result<LayerInfo> {
        let p = parent.map(str::to_string);
        self.asked
            .lock()
            .unwrap()
            .push((at.clone(), name.to_string(), p));
        if self.refuse {
            return Err(Error::InvalidInput("not a thinlayer layer".into()));
        }
        LivePool::serving(&self.exports).create_remote(name, parent, 1 << 20, attrs, &[])
    }

    fn removed(&self, _: crate::format::LayerId) {}
}

/// A fixture, its fake fills (refusing every blob if `refuse`) and snapshots that use them.
fn with_remote(refuse: bool) -> (Fixture, Arc<FakeRemote>, Snapshots) {
    let f = fixture();
    let remote = Arc::new(FakeRemote {
        exports: f.exports.clone(),
        refuse,
        asked: Mutex::new(Vec::new()),
    });
    let s = Snapshots::new(f.exports.clone(), f.files.clone(), f._dir.path())
        .with_remote(remote.clone());
    (f, remote, s)
}

fn unpack_labels(chain: &str, layer: &str) -> HashMap<String, String> {
    use crate::snapshot::remote::{IMAGE_LABEL, LAYER_LABEL, MANIFEST_LABEL};
    [
        (REF_LABEL, chain),
        (IMAGE_LABEL, "127.0.0.1:5000/acme/app:1"),
        (MANIFEST_LABEL, "sha256:m"),
        (LAYER_LABEL, layer),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[test]
fn an_unpack_naming_a_blob_gets_a_remote_committed_snapshot_and_already_exists() {
    let (f, remote, s) = with_remote(false);
    // The base layer: no parent, no ext4 base under it (the blob holds the filesystem).
    let labels = unpack_labels("sha256:c1", "sha256:l1");
    let e = s
        .prepare("ns/1/extract-1 sha256:c1", "", labels.clone(), Kind::Active)
        .unwrap_err();
    assert_eq!(e.code, Code::AlreadyExists);
    let c1 = s.stat("sha256:c1").unwrap();
    assert_eq!((c1.kind, c1.parent.as_str()), (Kind::Committed, ""));
    assert_eq!(c1.labels, labels, "containerd finds it by its labels");
    assert!(f.store.layer("sha256:c1").unwrap().remote);
    assert_eq!(code(s.stat("ns/1/extract-1 sha256:c1")), Code::NotFound);
    // The next layer over it, and a container over that.
    let e = s
        .prepare(
            "ns/2/extract-2 sha256:c2",
            "sha256:c1",
            unpack_labels("sha256:c2", "sha256:l2"),
            Kind::Active,
        )
        .unwrap_err();
    assert_eq!(e.code, Code::AlreadyExists);
    assert_eq!(s.stat("sha256:c2").unwrap().parent, "sha256:c1");
    s.prepare("ns/3/t1", "sha256:c2", HashMap::new(), Kind::Active)
        .unwrap();
    let asked = remote.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 2, "the container's Prepare names no blob");
    assert_eq!(asked[1].0.layer, "sha256:l2");
    assert_eq!(asked[1].2.as_deref(), Some("sha256:c1"));
    // Asked again (another namespace): the same snapshot, not a second layer.
    let e = s
        .prepare("ns/4/extract-3 sha256:c1", "", labels, Kind::Active)
        .unwrap_err();
    assert_eq!(e.code, Code::AlreadyExists);
    assert_eq!(remote.asked.lock().unwrap().len(), 2);
}

#[test]
fn an_unpack_the_remote_side_refuses_or_without_labels_is_prepared_as_usual() {
    let (_f, remote, s) = with_remote(true);
    let mut labels = unpack_labels("sha256:c1", "sha256:l1");
    labels.extend(small());
    s.prepare("ns/1/extract-1 sha256:c1", "", labels, Kind::Active)
        .unwrap();
    assert_eq!(remote.asked.lock().unwrap().len(), 1);
    assert_eq!(
        s.stat("ns/1/extract-1 sha256:c1").unwrap().kind,
        Kind::Active
    );
    // No labels naming the blob (ctr's pull): the remote side is not asked.
    let only_ref: HashMap<String, String> = [
        (REF_LABEL.to_string(), "sha256:c9".to_string()),
        (SIZE_LABEL.to_string(), "64M".to_string()),
    ]
    .into();
    s.prepare("ns/2/extract-2 sha256:c9", "", only_ref, Kind::Active)
        .unwrap();
    assert_eq!(remote.asked.lock().unwrap().len(), 1);
}
