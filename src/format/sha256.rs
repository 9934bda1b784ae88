//! SHA-256 whose state can be written down and taken up again at a 64-byte boundary (its
//! *midstate*: the eight state words, big-endian). A version-2 send stream's footer holds the
//! midstate of every byte before its index (docs/STREAM.md §5), so a reader holding only the
//! index and the footer can finish the hash of the whole blob and compare it with the digest
//! the manifest names. The compression function is sha2's; only the buffering is ours.

use sha2::block_api::compress256;

const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

#[derive(Clone)]
pub struct Sha256 {
    state: [u32; 8],
    /// Bytes hashed, including those in `buf`.
    len: u64,
    buf: [u8; 64],
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::new()
    }
}

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256 {
            state: IV,
            len: 0,
            buf: [0; 64],
        }
    }

    /// Resume after `len` bytes (a multiple of 64) whose midstate is `mid`.
    pub fn resume(mid: &[u8; 32], len: u64) -> Option<Sha256> {
        if !len.is_multiple_of(64) {
            return None;
        }
        let mut state = [0u32; 8];
        for (w, b) in state.iter_mut().zip(mid.chunks_exact(4)) {
            *w = u32::from_be_bytes(b.try_into().unwrap());
        }
        Some(Sha256 {
            state,
            len,
            buf: [0; 64],
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The state after the bytes so far, if they fill whole 64-byte blocks.
    pub fn midstate(&self) -> Option<[u8; 32]> {
        if !self.len.is_multiple_of(64) {
            return None;
        }
        let mut out = [0u8; 32];
        for (b, w) in out.chunks_exact_mut(4).zip(self.state) {
            b.copy_from_slice(&w.to_be_bytes());
        }
        Some(out)
    }

    pub fn update(&mut self, mut data: &[u8]) {
        let have = (self.len % 64) as usize;
        self.len += data.len() as u64;
        if have > 0 {
            let n = (64 - have).min(data.len());
            self.buf[have..have + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            if have + n < 64 {
                return;
            }
            compress256(&mut self.state, &[self.buf]);
        }
        let (blocks, rest) = data.as_chunks::<64>();
        compress256(&mut self.state, blocks);
        self.buf[..rest.len()].copy_from_slice(rest);
    }

    pub fn finalize(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        let mut pad = [0u8; 72];
        pad[0] = 0x80;
        let have = (self.len % 64) as usize;
        // The 0x80, zeros, and the length end the last block.
        let n = if have < 56 { 56 - have } else { 120 - have };
        pad[n..n + 8].copy_from_slice(&bits.to_be_bytes());
        let len = self.len;
        self.update(&pad[..n + 8]);
        debug_assert!(self.len.is_multiple_of(64), "{len}");
        self.midstate().expect("padded to a whole block")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::Digest as _;

    proptest! {
        #[test]
        fn equals_sha2_and_resumes_at_any_block_boundary(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            cuts in proptest::collection::vec(0usize..600, 0..5),
        ) {
            let want: [u8; 32] = sha2::Sha256::digest(&data).into();
            let mut h = Sha256::new();
            let mut at = 0;
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort();
            for c in cuts {
                h.update(&data[at..c]);
                at = c;
            }
            h.update(&data[at..]);
            prop_assert_eq!(h.finalize(), want);
            // Resumed from the midstate at the last whole block.
            let k = data.len() / 64 * 64;
            let mut first = Sha256::new();
            first.update(&data[..k]);
            let mut r = Sha256::resume(&first.midstate().unwrap(), k as u64).unwrap();
            r.update(&data[k..]);
            prop_assert_eq!(r.finalize(), want);
        }
    }
}
