//! docs/FORMAT.md is the spec; the `layout!` tables in this folder are the code's one
//! description of the same fields, and `checksum` says where each crc sits. These tests read
//! the spec's tables and hold the code to them, so neither can change without the other.

use super::checksum::{self, Kind};
use super::field::Row;
use super::{page, record, superblock};

fn spec() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMAT.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The body rows (cells trimmed, backticks dropped) of the `index`th table under the first
/// heading that starts with `heading`.
fn table(spec: &str, heading: &str, index: usize) -> Vec<Vec<String>> {
    let mut in_section = false;
    let mut tables: Vec<Vec<Vec<String>>> = Vec::new();
    let mut in_table = false;
    for line in spec.lines() {
        if line.starts_with('#') {
            if in_section {
                break;
            }
            in_section = line.starts_with(heading);
            continue;
        }
        if !in_section {
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        if !in_table {
            in_table = true;
            tables.push(Vec::new());
        }
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().replace('`', ""))
            .collect();
        tables.last_mut().unwrap().push(cells);
    }
    let t = tables
        .into_iter()
        .nth(index)
        .unwrap_or_else(|| panic!("FORMAT.md: no table {index} under {heading:?}"));
    // Drop the header row and the |---| row under it.
    t.into_iter().skip(2).collect()
}

/// Checks one structure's fixed fields against its table (columns offset, size, field): the
/// spec's rows inside the fixed part are the code's rows, and whatever the spec lists next
/// starts where the fixed part ends.
fn check_structure(heading: &str, index: usize, rows: &[Row], len: usize) {
    let spec = spec();
    let mut documented = Vec::new();
    let mut after = None;
    for cells in table(&spec, heading, index) {
        let Ok(at) = cells[0].parse::<usize>() else {
            continue; // an offset that depends on a count or a length
        };
        if at >= len {
            after.get_or_insert(at);
            continue;
        }
        let size: usize = cells[1]
            .parse()
            .unwrap_or_else(|_| panic!("{heading}: field {} has no fixed size", cells[2]));
        documented.push((cells[2].clone(), at, size));
    }
    let code: Vec<(String, usize, usize)> = rows
        .iter()
        .map(|r| (r.name.to_string(), r.at, r.len))
        .collect();
    assert_eq!(
        code, documented,
        "FORMAT.md {heading} table {index} and the code differ"
    );
    if let Some(at) = after {
        assert_eq!(
            at, len,
            "{heading}: the spec's next part does not start at {len}"
        );
    }
}

#[test]
fn superblock_fields_are_the_spec_table() {
    use superblock::fields;
    check_structure("## 3. Superblock", 0, fields::ROWS, fields::LEN);
}

#[test]
fn the_spec_names_the_current_version() {
    let rows = table(&spec(), "## 3. Superblock", 0);
    let version = rows.iter().find(|c| c[2] == "version").unwrap();
    let want = format!("Format version, {}.", superblock::VERSION);
    assert!(version[3].starts_with(&want), "{:?}", version[3]);
    let versions = table(&spec(), "## 11. ", 0);
    let last = versions.last().unwrap();
    assert_eq!(last[0], superblock::VERSION.to_string());
    assert_eq!(last[2], "Current.");
}

#[test]
fn page_header_fields_are_the_spec_table() {
    use page::header;
    check_structure("## 4. Metadata page", 0, header::ROWS, header::LEN);
}

#[test]
fn record_fields_are_the_spec_tables() {
    use record::*;
    check_structure("### 6.1 ", 0, layer_create::ROWS, layer_create::LEN);
    check_structure("### 6.2 ", 0, layer_state::ROWS, layer_state::LEN);
    check_structure("### 6.3 ", 0, map::ROWS, map::LEN);
    check_structure("### 6.3 ", 1, map_entry::ROWS, map_entry::LEN);
    check_structure("#### 6.3.1 ", 0, map_run::ROWS, map_run::LEN);
    check_structure("#### 6.3.2 ", 0, checksum_pages::ROWS, checksum_pages::LEN);
    check_structure("#### 6.3.2 ", 1, map_run_sums::ROWS, map_run_sums::LEN);
    check_structure(
        "#### 6.3.3 ",
        0,
        map_singles_sums::ROWS,
        map_singles_sums::LEN,
    );
    check_structure("#### 6.3.4 ", 0, map_index::ROWS, map_index::LEN);
    check_structure(
        "#### 6.3.4 ",
        1,
        map_index_entry::ROWS,
        map_index_entry::LEN,
    );
    check_structure("#### 6.3.3 ", 1, map_single::ROWS, map_single::LEN);
    check_structure("### 6.4 ", 0, layer_counters::ROWS, layer_counters::LEN);
    check_structure("### 6.5 ", 0, layer_attr::ROWS, layer_attr::LEN);
    check_structure("### 6.6 ", 0, layer_rename::ROWS, layer_rename::LEN);
}

#[test]
fn crash_journal_entry_is_the_spec_table() {
    use crate::format::journal::entry;
    check_structure("## 10. ", 1, entry::ROWS, entry::LEN);
}

/// "bytes A..B" somewhere in `cell`.
fn byte_range(cell: &str) -> (usize, usize) {
    let rest = &cell[cell.find("bytes ").unwrap_or_else(|| panic!("{cell:?}")) + 6..];
    let end = rest.find(' ').unwrap_or(rest.len());
    let (a, b) = rest[..end].split_once("..").unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

#[test]
fn checksum_positions_are_the_spec_table() {
    let spec = spec();
    let rows = table(&spec, "## 8. Checksums", 0);
    for (name, kind) in [
        ("Superblock", Kind::Superblock),
        ("Checkpoint page", Kind::CheckpointPage),
        ("Log page", Kind::LogPage),
        ("Checksum page", Kind::ChecksumPage),
    ] {
        let cells = rows
            .iter()
            .find(|c| c[0] == name)
            .unwrap_or_else(|| panic!("FORMAT.md §8 has no row {name:?}"));
        let salt = u32::from_str_radix(cells[1].trim_start_matches("0x"), 16).unwrap();
        assert_eq!(salt, kind as u32, "{name}: salt");
        let covered = kind.covered();
        assert_eq!(
            byte_range(&cells[3]),
            (covered.start, covered.end),
            "{name}"
        );
        let crc = checksum::CRC.range();
        assert_eq!(byte_range(&cells[4]), (crc.start, crc.end), "{name}");
    }
}
