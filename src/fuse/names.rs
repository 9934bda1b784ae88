//! Layer names as file names. A layer name may hold `/` (`acme/base:1.0`) and may be `.` or
//! `..`; a file name may not. `/`, `%` and a name made only of dots are percent-encoded, so
//! the mapping is one-to-one and a user can read the layer off the file name. An encoding
//! longer than a file name may be (255 bytes) falls back to `%id-N`, which no encoding of a
//! name can produce (an encoded `%` is always followed by two hex digits).

use crate::format::LayerId;

/// The longest file name Linux accepts.
const NAME_MAX: usize = 255;

/// The file name under which layer `name` (id `id`) appears.
pub fn file_name(name: &str, id: LayerId) -> String {
    let mut out = String::with_capacity(name.len());
    if name.chars().all(|c| c == '.') {
        out.extend(std::iter::repeat_n("%2E", name.len()));
    } else {
        for c in name.chars() {
            match c {
                '/' => out.push_str("%2F"),
                '%' => out.push_str("%25"),
                c => out.push(c),
            }
        }
    }
    if out.len() > NAME_MAX {
        return format!("%id-{}", id.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_become_readable_file_names() {
        assert_eq!(file_name("acme/base:1.0", LayerId(3)), "acme%2Fbase:1.0");
        assert_eq!(file_name("web-1", LayerId(3)), "web-1");
        assert_eq!(file_name("50%", LayerId(3)), "50%25");
        assert_eq!(file_name("..", LayerId(3)), "%2E%2E");
        assert_eq!(file_name(".", LayerId(3)), "%2E");
        assert_eq!(file_name("a.b", LayerId(3)), "a.b");
    }

    #[test]
    fn distinct_names_get_distinct_files() {
        let names = ["a/b", "a%2Fb", "a%b", "%2E", ".", "a_b"];
        let files: std::collections::HashSet<String> =
            names.iter().map(|n| file_name(n, LayerId(1))).collect();
        assert_eq!(files.len(), names.len());
    }

    #[test]
    fn a_name_too_long_once_encoded_falls_back_to_its_id() {
        let long = "a/".repeat(100); // 200 bytes, 400 encoded
        let f = file_name(&long, LayerId(42));
        assert_eq!(f, "%id-42");
        assert!(f.len() <= NAME_MAX);
        // A name made of no characters that encode keeps its 255 bytes.
        assert_eq!(file_name(&"x".repeat(255), LayerId(1)).len(), 255);
    }
}
