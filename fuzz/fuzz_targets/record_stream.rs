//! A record stream from arbitrary bytes: the reader returns records or an error naming the
//! byte, never panics or allocates by a claimed count. Whatever decodes is replayed into a
//! catalogue (which validates references); a catalogue that accepts the stream must write a
//! checkpoint (its runs' crcs kept apart, as for checksum pages) that replays to the same
//! catalogue.
#![no_main]
use libfuzzer_sys::fuzz_target;
use thinlayer::format::record::{RecordReader, RecordWriter};
use thinlayer::layer::Catalog;

fn summary(c: &Catalog) -> Vec<String> {
    c.layers()
        .map(|l| {
            let mut map: Vec<_> = l.map.iter().collect();
            map.sort_by_key(|(vb, _)| *vb);
            format!(
                "{:?} {:?} {:?} {} {} {} {} {:?}",
                l.id,
                l.name,
                l.parent,
                l.disk_size,
                l.created_secs,
                l.created_nanos,
                l.writable,
                map
            )
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut r = RecordReader::new(data, "fuzz");
    let mut catalog = Catalog::new();
    let mut all_applied = true;
    loop {
        match r.next_record() {
            Ok(Some(rec)) => {
                if catalog.apply(rec).is_err() {
                    all_applied = false;
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                assert!(matches!(e, thinlayer::Error::Corrupt(_)), "{e}");
                all_applied = false;
                break;
            }
        }
    }
    if all_applied {
        // As a checkpoint commit writes it: map runs name their crcs in the checksum stream.
        let mut w = RecordWriter::for_checkpoint();
        // Replayed records carry their crcs: none is paged.
        catalog
            .encode_checkpoint(&mut w, &mut |at| panic!("paged crc {at} in a replayed catalogue"))
            .expect("a catalogue of known crcs encodes");
        let mut again = Catalog::new();
        let mut r = RecordReader::new(&w.buf, "checkpoint");
        while let Some(rec) = r.next_record().expect("a written checkpoint decodes") {
            let rec = rec.resolve(w.sums()).expect("a written run's crcs are there");
            again.apply(rec).expect("a written checkpoint replays");
        }
        assert_eq!(summary(&again), summary(&catalog));
    }
});
