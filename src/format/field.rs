//! One description of an on-disk structure's fields, which its encoder and its decoder both use.
//! A structure lists its fields in order with `layout!`; each field starts where the one before
//! it ends, so no offset is typed by hand, and a field's type fixes its width. The same list is
//! the table that docs/FORMAT.md prints for the structure; `format::spec`'s test holds the two
//! to each other.
//!
//! Every integer on disk is little-endian. This module is the only place that says so.

use std::marker::PhantomData;
use std::ops::Range;

/// A value stored in a fixed number of bytes (integers little-endian, byte arrays as they are).
pub trait OnDisk: Sized {
    const WIDTH: usize;
    /// `b` is exactly `WIDTH` bytes.
    fn read(b: &[u8]) -> Self;
    /// `b` is exactly `WIDTH` bytes.
    fn write(self, b: &mut [u8]);
}

macro_rules! little_endian {
    ($($t:ty),+) => {$(
        impl OnDisk for $t {
            const WIDTH: usize = std::mem::size_of::<$t>();
            fn read(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
            fn write(self, b: &mut [u8]) {
                b.copy_from_slice(&self.to_le_bytes());
            }
        }
    )+};
}
little_endian!(u8, u16, u32, u64);

impl<const N: usize> OnDisk for [u8; N] {
    const WIDTH: usize = N;
    fn read(b: &[u8]) -> Self {
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        a
    }
    fn write(self, b: &mut [u8]) {
        b.copy_from_slice(&self);
    }
}

/// A field of a structure: its offset from the structure's first byte; its type says how wide
/// it is and how it is stored.
pub struct Field<T> {
    pub at: usize,
    ty: PhantomData<fn() -> T>,
}

// Not derived: a derive would ask `T: Copy`, which `[u8; N]` fields would satisfy but the
// marker does not need.
impl<T> Clone for Field<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Field<T> {}

impl<T: OnDisk> Field<T> {
    pub const fn at(at: usize) -> Self {
        Field {
            at,
            ty: PhantomData,
        }
    }

    pub const fn width(&self) -> usize {
        T::WIDTH
    }

    /// The offset just past the field: where the next field starts.
    pub const fn end(&self) -> usize {
        self.at + T::WIDTH
    }

    pub const fn range(&self) -> Range<usize> {
        self.at..self.end()
    }

    /// The field's value in `structure` (which starts at the structure's first byte and is at
    /// least `end()` long; decoders check the length before reading fields).
    pub fn get(&self, structure: &[u8]) -> T {
        T::read(&structure[self.range()])
    }

    pub fn put(&self, structure: &mut [u8], value: T) {
        value.write(&mut structure[self.range()]);
    }

    /// Whether `other` covers the same bytes (for compile-time checks that two descriptions of
    /// one field agree).
    pub const fn same_bytes<U: OnDisk>(&self, other: &Field<U>) -> bool {
        self.at == other.at && self.end() == other.end()
    }
}

/// One row of a structure's table: the field's name as docs/FORMAT.md spells it, its offset and
/// its size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub name: &'static str,
    pub at: usize,
    pub len: usize,
}

/// Declares a module holding a structure's fields in order, each a `Field` constant starting
/// where the previous one ends; `ROWS`, the table of them; and `LEN`, where the last one ends.
///
/// ```ignore
/// layout! {
///     pub mod header {
///         CRC: u32 = "crc",
///         KIND: u32 = "kind",
///     }
/// }
/// ```
macro_rules! layout {
    (
        $(#[$meta:meta])*
        $vis:vis mod $module:ident {
            $($name:ident : $ty:ty = $doc:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis mod $module {
            use $crate::format::field::{Field, OnDisk, Row};
            $crate::format::field::layout!(@chain 0; $($name: $ty,)+);
            /// Every field in order, as the table in docs/FORMAT.md lists them.
            pub const ROWS: &[Row] = &[$(Row { name: $doc, at: $name.at, len: $name.width() }),+];
            /// Length of the fixed part: where the last field ends.
            pub const LEN: usize = 0 $(+ <$ty as OnDisk>::WIDTH)+;
        }
    };
    (@chain $at:expr; ) => {};
    (@chain $at:expr; $name:ident : $ty:ty, $($rest:tt)*) => {
        pub const $name: Field<$ty> = Field::at($at);
        $crate::format::field::layout!(@chain $name.end(); $($rest)*);
    };
}
pub(crate) use layout;

#[cfg(test)]
mod tests {
    use super::*;

    layout! {
        mod sample {
            A: u8 = "a",
            B: u32 = "b",
            C: [u8; 3] = "c",
            D: u64 = "d",
        }
    }

    #[test]
    fn fields_follow_each_other_and_store_little_endian() {
        assert_eq!(
            sample::ROWS,
            &[
                Row {
                    name: "a",
                    at: 0,
                    len: 1
                },
                Row {
                    name: "b",
                    at: 1,
                    len: 4
                },
                Row {
                    name: "c",
                    at: 5,
                    len: 3
                },
                Row {
                    name: "d",
                    at: 8,
                    len: 8
                },
            ]
        );
        assert_eq!(sample::LEN, 16);
        let mut b = [0u8; sample::LEN];
        sample::A.put(&mut b, 0xa1);
        sample::B.put(&mut b, 0x0403_0201);
        sample::C.put(&mut b, *b"xyz");
        sample::D.put(&mut b, 0x0807_0605_0403_0201);
        assert_eq!(
            b,
            *b"\xa1\x01\x02\x03\x04xyz\x01\x02\x03\x04\x05\x06\x07\x08"
        );
        assert_eq!(sample::A.get(&b), 0xa1);
        assert_eq!(sample::B.get(&b), 0x0403_0201);
        assert_eq!(sample::C.get(&b), *b"xyz");
        assert_eq!(sample::D.get(&b), 0x0807_0605_0403_0201);
        assert!(sample::B.same_bytes(&Field::<[u8; 4]>::at(1)));
        assert!(!sample::B.same_bytes(&Field::<u16>::at(1)));
    }
}
