//! AVX2 activation quantizer, bit-identical to `QuantizedVec::quantize_from`: the AVX-512
//! quantizer's steps (see `super::x86_quantize`) eight lanes wide, for CPUs without AVX-512.
//! Groups go eight at a time through one transposing reduction, and values are divided
//! eight lanes at a time and rounded by the same nudged truncation.
//!
//! A row with a NaN or an infinity takes the scalar code.

use std::arch::x86_64::*;

use super::x86_quantize::{quantize_batches, JUST_UNDER_HALF};
use super::{QuantizedVec, Q_MAX};

/// Groups per reduction: the lanes of one 256-bit vector.
const BATCH: usize = 8;

/// Quantizes `x` into `xq` as `xq.quantize_from(x)` does, for group sizes that are
/// multiples of 8.
///
/// # Safety
/// The CPU must support AVX2; `xq.group_size` must be a multiple of 8 that divides
/// `x.len()`.
#[target_feature(enable = "avx2")]
pub unsafe fn quantize(xq: &mut QuantizedVec, x: &[f32]) {
    // SAFETY: forwarded from the caller.
    unsafe { quantize_batches(xq, x, BATCH, batch) }
}

/// Quantizes the `scales.len()` (at most 8) groups of `x` into `q`, `scales` and `sums`.
/// Returns false, with the outputs unspecified, when a value is not finite.
///
/// # Safety
/// The CPU must support AVX2; `x` and `q` must hold `scales.len()` groups of `gs` values,
/// `gs` a multiple of 8, and `sums` as many values as `scales`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn batch(x: &[f32], gs: usize, q: &mut [i8], scales: &mut [f32], sums: &mut [i32]) -> bool {
    let n = scales.len();
    let sign = _mm256_set1_ps(-0.0);
    let infinity = _mm256_set1_ps(f32::INFINITY);

    // Each group's largest magnitude, lane by lane; then all eight at once.
    let mut not_finite = 0;
    let mut maxima = [_mm256_setzero_si256(); BATCH];
    for (group, max_abs) in x.chunks_exact(gs).zip(&mut maxima) {
        let mut m = _mm256_setzero_ps();
        for chunk in group.chunks_exact(8) {
            // SAFETY: the chunk has 8 floats.
            let abs = _mm256_andnot_ps(sign, unsafe { _mm256_loadu_ps(chunk.as_ptr()) });
            // NaN compares unordered, so "not less than infinity" catches it too.
            not_finite |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLT_UQ>(abs, infinity));
            m = _mm256_max_ps(m, abs);
        }
        *max_abs = _mm256_castps_si256(m);
    }
    if not_finite != 0 {
        return false;
    }
    let max_abs = _mm256_castsi256_ps(reduce_lanes(&maxima, |a, b| {
        _mm256_castps_si256(_mm256_max_ps(
            _mm256_castsi256_ps(a),
            _mm256_castsi256_ps(b),
        ))
    }));
    let scale = _mm256_div_ps(max_abs, _mm256_set1_ps(Q_MAX));
    let mut lanes = [0.0f32; BATCH];
    // SAFETY: `lanes` has eight floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), scale) };
    scales.copy_from_slice(&lanes[..n]);

    let mut group_sums = [_mm256_setzero_si256(); BATCH];
    let groups = x.chunks_exact(gs).zip(q.chunks_exact_mut(gs));
    for ((group, out), (sum, &s)) in groups.zip(group_sums.iter_mut().zip(&lanes)) {
        // All-zero groups have scale 0, and their values stay 0.
        if s == 0.0 {
            out.fill(0);
            continue;
        }
        let s = _mm256_set1_ps(s);
        for (chunk, out) in group.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
            // SAFETY: the chunk has 8 floats.
            let rounded = round_chunk(unsafe { _mm256_loadu_ps(chunk.as_ptr()) }, s);
            *sum = _mm256_add_epi32(*sum, rounded);
            // The values lie within +-127, so the saturating packs keep them. Each 128-bit
            // half then has its four values in its first four bytes.
            let words = _mm256_packs_epi32(rounded, rounded);
            let bytes = _mm256_packs_epi16(words, words);
            let both = _mm_unpacklo_epi32(
                _mm256_castsi256_si128(bytes),
                _mm256_extracti128_si256::<1>(bytes),
            );
            // SAFETY: `out` has 8 bytes.
            unsafe { _mm_storel_epi64(out.as_mut_ptr() as *mut __m128i, both) };
        }
    }
    let totals = reduce_lanes(&group_sums, |a, b| _mm256_add_epi32(a, b));
    let mut lanes = [0i32; BATCH];
    // SAFETY: `lanes` has eight values.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, totals) };
    sums.copy_from_slice(&lanes[..n]);
    true
}

/// `v / scale`, clamped to +-127 and rounded half away from zero, as 8 int32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn round_chunk(v: __m256, scale: __m256) -> __m256i {
    let (low, high) = (_mm256_set1_ps(-Q_MAX), _mm256_set1_ps(Q_MAX));
    let scaled = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(v, scale), low), high);
    // Truncating after adding just under one half, with the value's sign, rounds half away
    // from zero (see `super::x86_quantize`).
    let sign = _mm256_and_ps(scaled, _mm256_set1_ps(-0.0));
    let nudge = _mm256_or_ps(sign, _mm256_set1_ps(JUST_UNDER_HALF));
    _mm256_cvttps_epi32(_mm256_add_ps(scaled, nudge))
}

/// Reduces each of 8 vectors over its lanes with `op` (associative and commutative) and
/// returns the 8 results, vector i's in lane i: 32-bit interleaves, then 64-bit, then the
/// two 128-bit halves.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce_lanes(v: &[__m256i; BATCH], op: impl Fn(__m256i, __m256i) -> __m256i) -> __m256i {
    // Per 128-bit half: [a0 op a2, b0 op b2, a1 op a3, b1 op b3].
    let pairs: [__m256i; 4] = std::array::from_fn(|j| {
        let (a, b) = (v[2 * j], v[2 * j + 1]);
        op(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b))
    });
    // Per half: the half's result for inputs 4j..4j + 4, in order.
    let quads: [__m256i; 2] = std::array::from_fn(|j| {
        let (a, b) = (pairs[2 * j], pairs[2 * j + 1]);
        op(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b))
    });
    // Low halves of both quads, then high halves.
    op(
        _mm256_permute2x128_si256::<0x20>(quads[0], quads[1]),
        _mm256_permute2x128_si256::<0x31>(quads[0], quads[1]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nudged truncation rounds like the scalar code next to every half-integer up to
    /// 127.5, on both signs.
    #[test]
    fn rounding_matches_the_scalar_code() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut values = [0.0f32; 8];
        let mut got = [0i32; 8];
        for k in 0..128 {
            let half = (k as f32 + 0.5).to_bits();
            for start in (half - 4096..half + 4096).step_by(8) {
                for sign in [1.0f32, -1.0] {
                    for (i, v) in values.iter_mut().enumerate() {
                        *v = sign * f32::from_bits(start + i as u32);
                    }
                    // SAFETY: AVX2 was detected; both arrays have 8 lanes.
                    unsafe {
                        let one = _mm256_set1_ps(1.0);
                        let rounded = round_chunk(_mm256_loadu_ps(values.as_ptr()), one);
                        _mm256_storeu_si256(got.as_mut_ptr() as *mut __m256i, rounded);
                    }
                    for (v, g) in values.iter().zip(got) {
                        let expected = super::super::round_half_away(v.clamp(-Q_MAX, Q_MAX));
                        assert_eq!(g, expected, "{v:e}");
                    }
                }
            }
        }
    }
}
