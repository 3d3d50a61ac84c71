//! x86-64 kernels (AVX2, AVX-512 VNNI). Each returns exactly what `generic` returns: the int8
//! products and their int32 group sums are exact, and the fp32 scaling runs lane for lane in
//! the order `generic::accumulate_group` and `generic::sum_lanes` define.
//!
//! Both paths use the same sign trick: `|w|` is an unsigned byte (128 for w = -128) and
//! `x * sign(w)` a signed one, so `maddubs`/`dpbusd` multiply them exactly. That needs
//! `x != -128`, which the activation quantizer guarantees (|q| <= 127); weights may hold any
//! int8.

use std::arch::x86_64::*;

use super::{QuantizedVec, LANES};

/// Sums the eight lanes in the order of `generic::sum_lanes`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half)); // h0 + h2, h1 + h3
    _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 0b01)))
}

/// Lane k of the result is the sum of the lanes of `v[k]`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn transpose_sum(v: &[__m256i; LANES]) -> __m256i {
    let s01 = _mm256_hadd_epi32(v[0], v[1]);
    let s23 = _mm256_hadd_epi32(v[2], v[3]);
    let s45 = _mm256_hadd_epi32(v[4], v[5]);
    let s67 = _mm256_hadd_epi32(v[6], v[7]);
    let t0 = _mm256_hadd_epi32(s01, s23); // low halves of a..d, then high halves of a..d
    let t1 = _mm256_hadd_epi32(s45, s67); // the same for e..h
    let low = _mm256_permute2x128_si256(t0, t1, 0x20);
    let high = _mm256_permute2x128_si256(t0, t1, 0x31);
    _mm256_add_epi32(low, high)
}

/// Partial int32 sums (eight lanes) of one group with AVX2: `maddubs` makes i16 pairs, which
/// cannot saturate here (2 * 128 * 127 < 32767), and `madd` widens them to i32.
///
/// # Safety
/// `w` and `x` must be valid for `gs` bytes, `gs` a multiple of 32.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn group_avx2(w: *const i8, x: *const i8, gs: usize) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_si256();
    for offset in (0..gs).step_by(32) {
        // SAFETY: the caller guarantees gs readable bytes; loadu needs no alignment.
        let (wv, xv) = unsafe {
            (
                _mm256_loadu_si256(w.add(offset) as *const __m256i),
                _mm256_loadu_si256(x.add(offset) as *const __m256i),
            )
        };
        let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
    }
    acc
}

/// Partial int32 sums (eight lanes) of one group with AVX-512 VNNI: 64 bytes per `dpbusd`
/// where the group allows it, 32 otherwise.
///
/// # Safety
/// As for [`group_avx2`].
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn group_vnni(w: *const i8, x: *const i8, gs: usize) -> __m256i {
    let mut offset = 0;
    let mut acc = _mm256_setzero_si256();
    if gs >= 64 {
        let zero = _mm512_setzero_si512();
        let mut wide = _mm512_setzero_si512();
        while offset + 64 <= gs {
            // SAFETY: as above.
            let (wv, xv) = unsafe {
                (
                    _mm512_loadu_si512(w.add(offset) as *const __m512i),
                    _mm512_loadu_si512(x.add(offset) as *const __m512i),
                )
            };
            let x_signed = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), zero, xv);
            wide = _mm512_dpbusd_epi32(wide, _mm512_abs_epi8(wv), x_signed);
            offset += 64;
        }
        acc = _mm256_add_epi32(
            _mm512_castsi512_si256(wide),
            _mm512_extracti64x4_epi64(wide, 1),
        );
    }
    while offset < gs {
        // SAFETY: as above.
        let (wv, xv) = unsafe {
            (
                _mm256_loadu_si256(w.add(offset) as *const __m256i),
                _mm256_loadu_si256(x.add(offset) as *const __m256i),
            )
        };
        acc = _mm256_dpbusd_epi32(acc, _mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
        offset += 32;
    }
    acc
}

/// Loads `N` consecutive f32 from `p` into lanes 0..N and zeros the rest.
///
/// # Safety
/// `p` must be valid for `N` reads.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn load_lanes<const N: usize>(p: *const f32) -> __m256 {
    if N == LANES {
        // SAFETY: the caller guarantees eight readable floats.
        return unsafe { _mm256_loadu_ps(p) };
    }
    let lane = |k: i32| if (k as usize) < N { -1 } else { 0 };
    let mask = _mm256_setr_epi32(
        lane(0),
        lane(1),
        lane(2),
        lane(3),
        lane(4),
        lane(5),
        lane(6),
        lane(7),
    );
    // SAFETY: masked-off lanes are not read, so only N floats need to be valid.
    unsafe { _mm256_maskload_ps(p, mask) }
}

/// The row loop shared by both paths: blocks of eight groups, their sums transposed into one
/// vector so that lane k holds group g0 + k, scaled and added to the lane accumulators. The
/// last block may hold fewer groups; its absent lanes add +0.0, which leaves every lane
/// unchanged (a lane starts at +0.0 and so can never be -0.0).
macro_rules! matvec_rows {
    ($name:ident, $block:ident, $features:literal, $group:ident) => {
        /// Scaled sums of `N` groups (lanes 0..N; the rest are zero).
        ///
        /// # Safety
        /// The CPU must support the target features; `w` and `x` must hold `N * gs` bytes and
        /// `ws` and `xs` `N` scales.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $block<const N: usize>(
            w: *const i8,
            x: *const i8,
            ws: *const f32,
            xs: *const f32,
            gs: usize,
        ) -> __m256 {
            let mut sums = [_mm256_setzero_si256(); LANES];
            for (k, sum) in sums.iter_mut().enumerate().take(N) {
                // SAFETY: group k of the block is inside both arrays (caller's guarantee).
                *sum = unsafe { $group(w.add(k * gs), x.add(k * gs), gs) };
            }
            let isums = _mm256_cvtepi32_ps(transpose_sum(&sums));
            // SAFETY: N scales are readable at both pointers (caller's guarantee).
            let (ws, xs) = unsafe { (load_lanes::<N>(ws), load_lanes::<N>(xs)) };
            _mm256_mul_ps(_mm256_mul_ps(isums, ws), xs)
        }

        /// `GS` is the group size when known at compile time (so the group loop unrolls),
        /// or 0 to read it from `x`.
        ///
        /// # Safety
        /// The CPU must support the target features; `x.group_size` a multiple of 32.
        #[target_feature(enable = $features)]
        unsafe fn $name<const GS: usize>(
            out: &mut [f32],
            w_q: &[i8],
            w_scales: &[f32],
            x: &QuantizedVec,
        ) {
            let cols = x.q.len();
            let gs = if GS == 0 { x.group_size } else { GS };
            let groups = cols / gs;
            let full = groups - groups % LANES;
            let (xq, xs) = (x.q.as_ptr(), x.scales.as_ptr());
            for (r, o) in out.iter_mut().enumerate() {
                let row = w_q[r * cols..(r + 1) * cols].as_ptr();
                let ws = w_scales[r * groups..(r + 1) * groups].as_ptr();
                let mut acc = _mm256_setzero_ps();
                // SAFETY: every block below covers groups inside the row, x.q and both
                // scale slices, whose lengths the slicing above checked.
                unsafe {
                    for g0 in (0..full).step_by(LANES) {
                        let (w, q) = (row.add(g0 * gs), xq.add(g0 * gs));
                        let sum = $block::<LANES>(w, q, ws.add(g0), xs.add(g0), gs);
                        acc = _mm256_add_ps(acc, sum);
                    }
                    let (w, q, ws, xs) = (
                        row.add(full * gs),
                        xq.add(full * gs),
                        ws.add(full),
                        xs.add(full),
                    );
                    let tail = match groups - full {
                        0 => _mm256_setzero_ps(),
                        1 => $block::<1>(w, q, ws, xs, gs),
                        2 => $block::<2>(w, q, ws, xs, gs),
                        3 => $block::<3>(w, q, ws, xs, gs),
                        4 => $block::<4>(w, q, ws, xs, gs),
                        5 => $block::<5>(w, q, ws, xs, gs),
                        6 => $block::<6>(w, q, ws, xs, gs),
                        _ => $block::<7>(w, q, ws, xs, gs),
                    };
                    acc = _mm256_add_ps(acc, tail);
                }
                *o = hsum_ps(acc);
            }
        }
    };
}

matvec_rows!(matvec_q8_avx2_rows, block_avx2, "avx2", group_avx2);
matvec_rows!(
    matvec_q8_vnni_rows,
    block_vnni,
    "avx2,avx512f,avx512bw,avx512vl,avx512vnni",
    group_vnni
);

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn matvec_q8_avx2(out: &mut [f32], w_q: &[i8], w_scales: &[f32], x: &QuantizedVec) {
    // SAFETY: the caller guarantees AVX2; each branch has a group size that is a multiple
    // of 32.
    unsafe {
        match x.group_size {
            32 => matvec_q8_avx2_rows::<32>(out, w_q, w_scales, x),
            64 => matvec_q8_avx2_rows::<64>(out, w_q, w_scales, x),
            gs if gs % 32 == 0 => matvec_q8_avx2_rows::<0>(out, w_q, w_scales, x),
            _ => super::generic::matvec_q8(out, w_q, w_scales, x),
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn matvec_q8_avx512vnni(
    out: &mut [f32],
    w_q: &[i8],
    w_scales: &[f32],
    x: &QuantizedVec,
) {
    // SAFETY: the caller guarantees the features; each branch has a group size that is a
    // multiple of 32.
    unsafe {
        match x.group_size {
            32 => matvec_q8_vnni_rows::<32>(out, w_q, w_scales, x),
            64 => matvec_q8_vnni_rows::<64>(out, w_q, w_scales, x),
            gs if gs % 32 == 0 => matvec_q8_vnni_rows::<0>(out, w_q, w_scales, x),
            _ => super::generic::matvec_q8(out, w_q, w_scales, x),
        }
    }
}
