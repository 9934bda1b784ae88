//! Big-endian fields, written and read in order: every message in this codec is a sequence of
//! these, so a field's offset is never typed, only its place in the sequence. The only place
//! the NBD code turns integers into bytes and back.

use super::MAX_STRING;

/// Appends fields to a message being built.
pub(super) trait Put {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    /// A string without a length in front (its length follows from the message's).
    fn put_bare_str(&mut self, s: &str);
    /// A string behind its u32 length.
    fn put_str(&mut self, s: &str);
}

impl Put for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_bare_str(&mut self, s: &str) {
        self.extend_from_slice(bounded(s).as_bytes());
    }
    fn put_str(&mut self, s: &str) {
        let s = bounded(s);
        self.put_u32(s.len() as u32);
        self.extend_from_slice(s.as_bytes());
    }
}

/// Fills a fixed-size header in place, field after field.
pub(super) struct Fill<'a> {
    out: &'a mut [u8],
}

impl<'a> Fill<'a> {
    pub fn new(out: &'a mut [u8]) -> Self {
        Fill { out }
    }
    fn put(&mut self, bytes: &[u8]) {
        let (head, tail) = std::mem::take(&mut self.out).split_at_mut(bytes.len());
        head.copy_from_slice(bytes);
        self.out = tail;
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.put(&v.to_be_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.put(&v.to_be_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.put(&v.to_be_bytes());
        self
    }
}

/// Defines a fixed-size message from one list of its fields, in wire order: leading magic
/// numbers, then named big-endian integers. `LEN`, `pack`, `pack_into` and `unpack` are all
/// derived from that list, so a field's place is written once, never an offset.
macro_rules! fixed_message {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(magic $mty:ident = $magic:expr,)*
            $($(#[$fmeta:meta])* pub $field:ident: $fty:ident,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $fty,)*
        }

        impl $name {
            pub const LEN: usize =
                0 $(+ std::mem::size_of::<$mty>())* $(+ std::mem::size_of::<$fty>())*;

            /// Writes the message over the first `LEN` bytes of `out`.
            pub fn pack_into(&self, out: &mut [u8]) {
                let mut _fill = $crate::nbd::proto::be::Fill::new(&mut out[..Self::LEN]);
                $(_fill.$mty($magic);)*
                $(_fill.$fty(self.$field);)*
            }

            pub fn pack(&self) -> [u8; Self::LEN] {
                let mut b = [0u8; Self::LEN];
                self.pack_into(&mut b);
                b
            }

            /// `None` when a magic number is wrong: the stream is out of step.
            pub fn unpack(b: &[u8; Self::LEN]) -> Option<$name> {
                let mut _c = $crate::nbd::proto::be::Cursor::new(b);
                $(
                    if _c.$mty()? != $magic {
                        return None;
                    }
                )*
                Some($name {
                    $($field: _c.$fty()?,)*
                })
            }
        }
    };
}
pub(super) use fixed_message;

/// Reads fields from a message, refusing to run past its end.
pub(super) struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }
    pub fn remaining(&self) -> usize {
        self.data.len()
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).map(|b| b.try_into().expect("took N bytes"))
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
    /// A u32-length-prefixed UTF-8 string of at most `MAX_STRING` bytes.
    pub fn str(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok()
    }
    /// The rest of the message as a string (one whose length is the message's remainder).
    pub fn bare_str(&mut self) -> Option<&'a str> {
        let rest = self.take(self.remaining())?;
        if rest.len() > MAX_STRING {
            return None;
        }
        std::str::from_utf8(rest).ok()
    }
    /// `value` if the message ended exactly here; trailing bytes make it malformed.
    pub fn end<T>(&self, value: T) -> Option<T> {
        self.data.is_empty().then_some(value)
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A string as the protocol allows it on the wire: at most `MAX_STRING` bytes.
pub fn bounded(s: &str) -> &str {
    truncate(s, MAX_STRING)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_stops_at_the_end() {
        let mut data = Vec::new();
        data.put_u32(10);
        data.extend_from_slice(b"abc");
        assert_eq!(Cursor::new(&data).str(), None);
        let mut c = Cursor::new(&data);
        assert_eq!(c.u16(), Some(0));
        assert_eq!(c.remaining(), 5);
        assert_eq!(c.u64(), None);
        assert_eq!(c.end(()), None);
    }

    #[test]
    fn strings_over_the_limit_are_cut_on_encode_and_refused_on_decode() {
        let long = "é".repeat(MAX_STRING);
        let mut data = Vec::new();
        data.put_str(&long);
        let mut c = Cursor::new(&data);
        let s = c.str().unwrap();
        assert!(s.len() <= MAX_STRING && s.len() > MAX_STRING - 2);
        assert!(long.starts_with(s));

        let mut data = Vec::new();
        data.put_u32(MAX_STRING as u32 + 1);
        data.resize(data.len() + MAX_STRING + 1, b'a');
        assert_eq!(Cursor::new(&data).str(), None);
        assert_eq!(Cursor::new(&data[4..]).bare_str(), None);
    }

    #[test]
    fn fields_are_big_endian_in_order() {
        let mut out = [0u8; 14];
        Fill::new(&mut out)
            .u16(0x0102)
            .u32(0x0304_0506)
            .u64(0x0708_090a_0b0c_0d0e);
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        let mut c = Cursor::new(&out);
        assert_eq!(c.u16(), Some(0x0102));
        assert_eq!(c.u32(), Some(0x0304_0506));
        assert_eq!(c.u64(), Some(0x0708_090a_0b0c_0d0e));
        assert_eq!(c.end(()), Some(()));
    }

    #[test]
    fn truncate_keeps_whole_characters() {
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
