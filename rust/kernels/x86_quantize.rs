//! AVX-512 activation quantizer, bit-identical to `QuantizedVec::quantize_from`. The scale
//! comes from the same scalar division, and each value is divided by it in a SIMD lane (IEEE
//! division is exact in every lane). The quotient is clamped and rounded half away from zero
//! from its truncated value and the exact remainder. A group with a NaN or an infinity takes
//! the scalar code.

use std::arch::x86_64::*;

use super::{QuantizedVec, Q_MAX};

/// Quantizes one group of `x.len()` values (a multiple of 16) into `q`, returning its scale
/// and the sum of its int8 values, or None when the group is not all finite.
///
/// # Safety
/// The CPU must support AVX-512 F and BW; `q` must have `x.len()` values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn group(x: &[f32], q: &mut [i8]) -> Option<(f32, i32)> {
    let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
    let mut max_abs = _mm512_setzero_ps();
    let mut finite = true;
    for chunk in x.chunks_exact(16) {
        // SAFETY: the chunk has 16 floats.
        let v = unsafe { _mm512_loadu_ps(chunk.as_ptr()) };
        // v - v is 0 for finite values and NaN otherwise, which compares unordered.
        finite &= _mm512_cmp_ps_mask::<_CMP_ORD_Q>(_mm512_sub_ps(v, v), v) == 0xffff;
        let abs = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_mask));
        max_abs = _mm512_max_ps(max_abs, abs);
    }
    if !finite {
        return None;
    }

    let scale = _mm512_reduce_max_ps(max_abs) / Q_MAX;
    if scale <= 0.0 {
        q.fill(0);
        return Some((scale, 0));
    }

    let scale_v = _mm512_set1_ps(scale);
    let (low, high) = (_mm512_set1_ps(-Q_MAX), _mm512_set1_ps(Q_MAX));
    let (half, minus_half) = (_mm512_set1_ps(0.5), _mm512_set1_ps(-0.5));
    let ones = _mm512_set1_epi32(1);
    let mut sum = _mm512_setzero_si512();
    for (chunk, out) in x.chunks_exact(16).zip(q.chunks_exact_mut(16)) {
        // SAFETY: the chunk has 16 floats.
        let v = unsafe { _mm512_loadu_ps(chunk.as_ptr()) };
        let scaled = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(v, scale_v), low), high);
        let truncated = _mm512_cvttps_epi32(scaled);
        let fraction = _mm512_sub_ps(scaled, _mm512_cvtepi32_ps(truncated));
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(fraction, half);
        let down = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(fraction, minus_half);
        let rounded = _mm512_mask_sub_epi32(
            _mm512_mask_add_epi32(truncated, up, truncated, ones),
            down,
            truncated,
            ones,
        );
        sum = _mm512_add_epi32(sum, rounded);
        // SAFETY: `out` has 16 bytes.
        unsafe {
            _mm_storeu_si128(
                out.as_mut_ptr() as *mut __m128i,
                _mm512_cvtepi32_epi8(rounded),
            )
        };
    }
    Some((scale, _mm512_reduce_add_epi32(sum)))
}

/// Quantizes `x` into `xq` as `xq.quantize_from(x)` does, for group sizes that are
/// multiples of 16.
///
/// # Safety
/// The CPU must support AVX-512 F and BW; `xq.group_size` must be a multiple of 16 that
/// divides `x.len()`.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize(xq: &mut QuantizedVec, x: &[f32]) {
    let gs = xq.group_size;
    xq.q.resize(x.len(), 0);
    xq.scales.clear();
    xq.sums.clear();
    for (group_x, group_q) in x.chunks_exact(gs).zip(xq.q.chunks_exact_mut(gs)) {
        // SAFETY: the caller guarantees the CPU features; the chunks have gs values.
        match unsafe { group(group_x, group_q) } {
            Some((scale, sum)) => {
                xq.scales.push(scale);
                xq.sums.push(sum);
            }
            None => {
                let (scale, sum) = super::quantize_group(group_x, group_q);
                xq.scales.push(scale);
                xq.sums.push(sum);
            }
        }
    }
}
