//! x86-64 kernels (AVX2, AVX-512 VNNI). Each returns exactly what `generic` returns: only the
//! int8 products and their int32 group sums are vectorized; the fp32 scaling of each group
//! runs in the same order as the portable kernel.
//!
//! Both use the same sign trick: `|w|` is an unsigned byte (128 for w = -128) and `x * sign(w)`
//! a signed one, so `maddubs`/`dpbusd` multiply them exactly. That needs `x != -128`, which
//! the activation quantizer guarantees (|q| <= 127); weights may hold any int8.

use std::arch::x86_64::*;

use super::QuantizedVec;

/// Sum of the eight int32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_i32x8(v: __m256i) -> i32 {
    let lo = _mm256_castsi256_si128(v);
    let hi = _mm256_extracti128_si256(v, 1);
    let s = _mm_add_epi32(lo, hi);
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

fn isum_scalar(w: &[i8], x: &[i8]) -> i32 {
    w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// Runs `group_sum` over every group of every row and accumulates the scaled sums.
#[inline(always)]
fn matvec_with(
    out: &mut [f32],
    w_q: &[i8],
    w_scales: &[f32],
    x: &QuantizedVec,
    group_sum: impl Fn(&[i8], &[i8]) -> i32,
) {
    let cols = x.q.len();
    let gs = x.group_size;
    let groups = cols / gs;
    for (r, o) in out.iter_mut().enumerate() {
        let row = &w_q[r * cols..(r + 1) * cols];
        let row_scales = &w_scales[r * groups..(r + 1) * groups];
        let mut sum = 0.0f32;
        for g in 0..groups {
            let isum = group_sum(&row[g * gs..(g + 1) * gs], &x.q[g * gs..(g + 1) * gs]);
            sum += (isum as f32 * row_scales[g]) * x.scales[g];
        }
        *o = sum;
    }
}

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn matvec_q8_avx2(out: &mut [f32], w_q: &[i8], w_scales: &[f32], x: &QuantizedVec) {
    if x.group_size % 32 != 0 {
        return matvec_with(out, w_q, w_scales, x, isum_scalar);
    }
    matvec_with(out, w_q, w_scales, x, |w, a| {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_si256();
        for (wb, ab) in w.chunks_exact(32).zip(a.chunks_exact(32)) {
            // SAFETY: both chunks are exactly 32 bytes; loadu has no alignment requirement.
            let (wv, av) = unsafe {
                (
                    _mm256_loadu_si256(wb.as_ptr() as *const __m256i),
                    _mm256_loadu_si256(ab.as_ptr() as *const __m256i),
                )
            };
            let w_abs = _mm256_abs_epi8(wv);
            let a_signed = _mm256_sign_epi8(av, wv);
            // Pairs of u8*i8 products fit i16: 2 * 128 * 127 < 32767, so no saturation.
            let pairs = _mm256_maddubs_epi16(w_abs, a_signed);
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
        }
        hsum_i32x8(acc)
    })
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
    if x.group_size % 64 == 0 {
        matvec_with(out, w_q, w_scales, x, |w, a| {
            let zero = _mm512_setzero_si512();
            let mut acc = _mm512_setzero_si512();
            for (wb, ab) in w.chunks_exact(64).zip(a.chunks_exact(64)) {
                // SAFETY: both chunks are exactly 64 bytes; loadu has no alignment requirement.
                let (wv, av) = unsafe {
                    (
                        _mm512_loadu_si512(wb.as_ptr() as *const __m512i),
                        _mm512_loadu_si512(ab.as_ptr() as *const __m512i),
                    )
                };
                let negative = _mm512_movepi8_mask(wv);
                let a_signed = _mm512_mask_sub_epi8(av, negative, zero, av);
                acc = _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(wv), a_signed);
            }
            _mm512_reduce_add_epi32(acc)
        })
    } else if x.group_size % 32 == 0 {
        matvec_with(out, w_q, w_scales, x, |w, a| {
            let mut acc = _mm256_setzero_si256();
            for (wb, ab) in w.chunks_exact(32).zip(a.chunks_exact(32)) {
                // SAFETY: both chunks are exactly 32 bytes; loadu has no alignment requirement.
                let (wv, av) = unsafe {
                    (
                        _mm256_loadu_si256(wb.as_ptr() as *const __m256i),
                        _mm256_loadu_si256(ab.as_ptr() as *const __m256i),
                    )
                };
                let a_signed = _mm256_sign_epi8(av, wv);
                acc = _mm256_dpbusd_epi32(acc, _mm256_abs_epi8(wv), a_signed);
            }
            hsum_i32x8(acc)
        })
    } else {
        matvec_with(out, w_q, w_scales, x, isum_scalar)
    }
}
