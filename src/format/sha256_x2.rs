//! Two SHA-256 compressions in one pass, interleaved block by block.
//!
//! A send stream hashes each data byte twice: into the digest of the whole stream and into its
//! extent's sha256 in the version-2 index (`stream::index`). Each hash is one chain of
//! dependent `sha256rnds2` instructions, so a single chain leaves the SHA unit idle most of
//! its latency; two independent chains fed alternately fill it: on this project's build
//! machine (AMD EPYC, SHA-NI) both chains take 0.66x the time of sha2's `compress256` on one
//! after the other (`cargo bench --bench sha256`; docs/BENCHMARKS.md, "Import and export:
//! both hashes in one pass").
//!
//! The rounds are the x86 SHA extensions' recipe (as in sha2's `x86_sha` backend, which
//! compresses one chain); only the interleaving is ours. Without SHA-NI, or off x86-64, the
//! two chains go through sha2's `compress256` one after the other. A property test holds both
//! paths equal to sha2.

use sha2::block_api::compress256;

/// Compress `a_blocks` into `a` and `b_blocks` into `b`. The two run side by side for as many
/// blocks as both have; the longer one finishes alone.
pub fn compress2(a: &mut [u32; 8], a_blocks: &[[u8; 64]], b: &mut [u32; 8], b_blocks: &[[u8; 64]]) {
    let n = a_blocks.len().min(b_blocks.len());
    #[cfg(target_arch = "x86_64")]
    if n > 0 && shani::available() {
        // SAFETY: the CPU has the features `interleaved` is compiled for (checked just above).
        unsafe { shani::interleaved(a, &a_blocks[..n], b, &b_blocks[..n]) };
        compress256(a, &a_blocks[n..]);
        compress256(b, &b_blocks[n..]);
        return;
    }
    let _ = n;
    compress256(a, a_blocks);
    compress256(b, b_blocks);
}

#[cfg(target_arch = "x86_64")]
mod shani {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("sha")
            && is_x86_feature_detected!("sse4.1")
            && is_x86_feature_detected!("ssse3")
    }

    /// The round constants, four to a group of rounds.
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// The state as `sha256rnds2` takes it: words a, b, e, f in one register, c, d, g, h in
    /// the other.
    #[derive(Clone, Copy)]
    struct State {
        abef: __m128i,
        cdgh: __m128i,
    }

    #[inline(always)]
    unsafe fn load(s: &[u32; 8]) -> State {
        let p: *const __m128i = s.as_ptr().cast();
        let dcba = _mm_loadu_si128(p);
        let hgfe = _mm_loadu_si128(p.add(1));
        let cdab = _mm_shuffle_epi32(dcba, 0xB1);
        let efgh = _mm_shuffle_epi32(hgfe, 0x1B);
        State {
            abef: _mm_alignr_epi8(cdab, efgh, 8),
            cdgh: _mm_blend_epi16(efgh, cdab, 0xF0),
        }
    }

    #[inline(always)]
    unsafe fn store(s: &mut [u32; 8], x: State) {
        let feba = _mm_shuffle_epi32(x.abef, 0x1B);
        let dchg = _mm_shuffle_epi32(x.cdgh, 0xB1);
        let p: *mut __m128i = s.as_mut_ptr().cast();
        _mm_storeu_si128(p, _mm_blend_epi16(feba, dchg, 0xF0));
        _mm_storeu_si128(p.add(1), _mm_alignr_epi8(dchg, feba, 8));
    }

    /// A block's sixteen message words, big-endian, four to a register.
    #[inline(always)]
    unsafe fn words(block: &[u8; 64]) -> [__m128i; 4] {
        let p: *const __m128i = block.as_ptr().cast();
        let swap = _mm_set_epi64x(0x0C0D_0E0F_0809_0A0B, 0x0405_0607_0001_0203);
        [0, 1, 2, 3].map(|i| _mm_shuffle_epi8(_mm_loadu_si128(p.add(i)), swap))
    }

    /// Rounds 4g..4g+3 with message words `w`.
    #[inline(always)]
    unsafe fn rounds4(x: &mut State, w: __m128i, g: usize) {
        let t = _mm_add_epi32(w, _mm_loadu_si128(K.as_ptr().add(4 * g).cast()));
        x.cdgh = _mm_sha256rnds2_epu32(x.cdgh, x.abef, t);
        x.abef = _mm_sha256rnds2_epu32(x.abef, x.cdgh, _mm_shuffle_epi32(t, 0x0E));
    }

    /// The next four message words from the last sixteen (`w0` the oldest).
    #[inline(always)]
    unsafe fn schedule(w0: __m128i, w1: __m128i, w2: __m128i, w3: __m128i) -> __m128i {
        let t = _mm_add_epi32(_mm_sha256msg1_epu32(w0, w1), _mm_alignr_epi8(w3, w2, 4));
        _mm_sha256msg2_epu32(t, w3)
    }

    /// Both chains, block by block; `a_blocks` and `b_blocks` are equally long. Written out
    /// (no arrays indexed in loops) so the sixteen message registers stay registers.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub unsafe fn interleaved(
        a: &mut [u32; 8],
        a_blocks: &[[u8; 64]],
        b: &mut [u32; 8],
        b_blocks: &[[u8; 64]],
    ) {
        debug_assert_eq!(a_blocks.len(), b_blocks.len());
        let (mut x, mut y) = (load(a), load(b));
        for (p, q) in a_blocks.iter().zip(b_blocks) {
            let (x0, y0) = (x, y);
            let [mut a0, mut a1, mut a2, mut a3] = words(p);
            let [mut b0, mut b1, mut b2, mut b3] = words(q);
            rounds4(&mut x, a0, 0);
            rounds4(&mut y, b0, 0);
            rounds4(&mut x, a1, 1);
            rounds4(&mut y, b1, 1);
            rounds4(&mut x, a2, 2);
            rounds4(&mut y, b2, 2);
            rounds4(&mut x, a3, 3);
            rounds4(&mut y, b3, 3);
            let mut g = 4;
            while g < 16 {
                a0 = schedule(a0, a1, a2, a3);
                b0 = schedule(b0, b1, b2, b3);
                rounds4(&mut x, a0, g);
                rounds4(&mut y, b0, g);
                a1 = schedule(a1, a2, a3, a0);
                b1 = schedule(b1, b2, b3, b0);
                rounds4(&mut x, a1, g + 1);
                rounds4(&mut y, b1, g + 1);
                a2 = schedule(a2, a3, a0, a1);
                b2 = schedule(b2, b3, b0, b1);
                rounds4(&mut x, a2, g + 2);
                rounds4(&mut y, b2, g + 2);
                a3 = schedule(a3, a0, a1, a2);
                b3 = schedule(b3, b0, b1, b2);
                rounds4(&mut x, a3, g + 3);
                rounds4(&mut y, b3, g + 3);
                g += 4;
            }
            x.abef = _mm_add_epi32(x.abef, x0.abef);
            x.cdgh = _mm_add_epi32(x.cdgh, x0.cdgh);
            y.abef = _mm_add_epi32(y.abef, y0.abef);
            y.cdgh = _mm_add_epi32(y.cdgh, y0.cdgh);
        }
        store(a, x);
        store(b, y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const IV: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];

    proptest! {
        #[test]
        fn equals_sha2_one_chain_after_the_other(
            data in proptest::collection::vec(any::<u8>(), 0..2048),
            a_from in 0usize..200,
            b_from in 0usize..200,
            a_state in any::<[u32; 8]>(),
        ) {
            // Two chains over overlapping, differently aligned parts of the same bytes (as the
            // stream and an extent hash them), one from the IV, one from any state.
            let blocks = |from: usize| data.get(from.min(data.len())..).unwrap_or(&[]).as_chunks::<64>().0;
            let (ab, bb) = (blocks(a_from), blocks(b_from));
            let (mut a, mut b) = (a_state, IV);
            compress2(&mut a, ab, &mut b, bb);
            let (mut wa, mut wb) = (a_state, IV);
            compress256(&mut wa, ab);
            compress256(&mut wb, bb);
            prop_assert_eq!(a, wa);
            prop_assert_eq!(b, wb);
        }
    }
}
