//! AVX-512 activation quantizer, bit-identical to `QuantizedVec::quantize_from`.
//!
//! Groups go sixteen at a time. The largest magnitude of each group stays in a vector until
//! all sixteen are known, and one transposing reduction leaves group i's maximum in lane i.
//! The sixteen scales then come from one vector division (IEEE division is exact in every
//! lane, so they equal the scalar `max / 127`). The int8 sums of the groups come out of the
//! same reduction. Reducing one group at a time took a chain of shuffles per group.
//!
//! Each value is divided by its group's scale and clamped to +-127. Rounding half away from
//! zero is truncation after adding 0.5 - 2^-25 with the value's sign. Where the sum is
//! inexact it rounds to the nearest float, and within +-127.5 that never crosses an integer
//! the exact sum would not reach. A value exactly at a half still reaches the next integer,
//! because its sum lies 2^-25 below it and rounds up to it. Adding 0.5 itself would fail
//! at 0.5 - 2^-25, whose sum is a tie that rounds up to 1. The tests check the floats around
//! every half and from 0.25 to 1 against the scalar rounding, and an ignored one every float
//! up to 128.
//!
//! A row with a NaN or an infinity takes the scalar code.

use std::arch::x86_64::*;

use super::{QuantizedVec, Q_MAX};

/// The float just below 0.5, 0.5 - 2^-25.
pub(super) const JUST_UNDER_HALF: f32 = 0.499_999_97;

/// Groups per reduction: the lanes of one 512-bit vector.
const BATCH: usize = 16;

/// Quantizes `x` into `xq` as `xq.quantize_from(x)` does, for group sizes that are
/// multiples of 16.
///
/// # Safety
/// The CPU must support AVX-512 F and BW; `xq.group_size` must be a multiple of 16 that
/// divides `x.len()`.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize(xq: &mut QuantizedVec, x: &[f32]) {
    // SAFETY: forwarded from the caller.
    unsafe { quantize_batches(xq, x, BATCH, batch) }
}

/// A quantizer of a few whole groups at a time: `(x, group_size, q, scales, sums)`, one
/// scale and one sum per group, returning false when a value is not finite.
pub(super) type Batch = unsafe fn(&[f32], usize, &mut [i8], &mut [f32], &mut [i32]) -> bool;

/// Quantizes `x` into `xq` with `batch`, `per_batch` groups at a time, and starts over with
/// the scalar code when a batch finds a value that is not finite.
///
/// # Safety
/// The CPU must support what `batch` needs, and `xq.group_size` must divide `x.len()` and
/// suit `batch`.
pub(super) unsafe fn quantize_batches(
    xq: &mut QuantizedVec,
    x: &[f32],
    per_batch: usize,
    batch: Batch,
) {
    let gs = xq.group_size;
    let groups = x.len() / gs;
    xq.q.resize(x.len(), 0);
    xq.scales.resize(groups, 0.0);
    xq.sums.resize(groups, 0);
    for first in (0..groups).step_by(per_batch) {
        let n = (groups - first).min(per_batch);
        let span = first * gs..(first + n) * gs;
        // SAFETY: forwarded from the caller, and `span` covers `n` whole groups.
        let finite = unsafe {
            batch(
                &x[span.clone()],
                gs,
                &mut xq.q[span],
                &mut xq.scales[first..first + n],
                &mut xq.sums[first..first + n],
            )
        };
        if !finite {
            xq.quantize_from(x);
            return;
        }
    }
}

/// Quantizes the `scales.len()` (at most 16) groups of `x` into `q`, `scales` and `sums`.
/// Returns false, with the outputs unspecified, when a value is not finite.
///
/// # Safety
/// The CPU must support AVX-512 F and BW; `x` and `q` must hold `scales.len()` groups of
/// `gs` values, `gs` a multiple of 16, and `sums` as many values as `scales`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn batch(x: &[f32], gs: usize, q: &mut [i8], scales: &mut [f32], sums: &mut [i32]) -> bool {
    let n = scales.len();
    let lanes: __mmask16 = if n >= BATCH { !0 } else { (1 << n) - 1 };

    // Each group's largest magnitude, lane by lane; then all sixteen at once.
    let infinity = _mm512_set1_ps(f32::INFINITY);
    let mut not_finite: __mmask16 = 0;
    let mut maxima = [_mm512_setzero_si512(); BATCH];
    for (group, max_abs) in x.chunks_exact(gs).zip(&mut maxima) {
        let mut m = _mm512_setzero_ps();
        for chunk in group.chunks_exact(16) {
            // SAFETY: the chunk has 16 floats.
            let abs = _mm512_abs_ps(unsafe { _mm512_loadu_ps(chunk.as_ptr()) });
            // NaN compares unordered, so "not less than infinity" catches it too.
            not_finite |= _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(abs, infinity);
            m = _mm512_max_ps(m, abs);
        }
        *max_abs = _mm512_castps_si512(m);
    }
    if not_finite != 0 {
        return false;
    }
    let max_abs = _mm512_castsi512_ps(reduce_lanes(&maxima, |a, b| {
        _mm512_castps_si512(_mm512_max_ps(
            _mm512_castsi512_ps(a),
            _mm512_castsi512_ps(b),
        ))
    }));
    let scale = _mm512_div_ps(max_abs, _mm512_set1_ps(Q_MAX));
    // SAFETY: `scales` has `n` floats, the lanes of the mask.
    unsafe { _mm512_mask_storeu_ps(scales.as_mut_ptr(), lanes, scale) };
    // All-zero groups have scale 0, and their values stay 0.
    let zero_scale = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(scale, _mm512_setzero_ps());

    let mut group_sums = [_mm512_setzero_si512(); BATCH];
    let groups = x.chunks_exact(gs).zip(q.chunks_exact_mut(gs));
    for (i, ((group, out), sum)) in groups.zip(&mut group_sums).enumerate() {
        if zero_scale & (1 << i) != 0 {
            out.fill(0);
            continue;
        }
        let scale = _mm512_set1_ps(scales[i]);
        for (chunk, out) in group.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
            // SAFETY: the chunk has 16 floats.
            let rounded = round_chunk(unsafe { _mm512_loadu_ps(chunk.as_ptr()) }, scale);
            *sum = _mm512_add_epi32(*sum, rounded);
            // SAFETY: `out` has 16 bytes.
            unsafe {
                _mm_storeu_si128(
                    out.as_mut_ptr() as *mut __m128i,
                    _mm512_cvtepi32_epi8(rounded),
                )
            };
        }
    }
    let totals = reduce_lanes(&group_sums, |a, b| _mm512_add_epi32(a, b));
    // SAFETY: `sums` has `n` values, the lanes of the mask.
    unsafe { _mm512_mask_storeu_epi32(sums.as_mut_ptr(), lanes, totals) };
    true
}

/// `v / scale`, clamped to +-127 and rounded half away from zero, as 16 int32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn round_chunk(v: __m512, scale: __m512) -> __m512i {
    let (low, high) = (_mm512_set1_ps(-Q_MAX), _mm512_set1_ps(Q_MAX));
    let scaled = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(v, scale), low), high);
    // Truncating after adding just under one half, with the value's sign, rounds half away
    // from zero (see the module documentation).
    let sign = _mm512_set1_epi32(i32::MIN);
    let nudge = _mm512_castsi512_ps(_mm512_ternarylogic_epi32::<0xEA>(
        _mm512_castps_si512(scaled),
        sign,
        _mm512_castps_si512(_mm512_set1_ps(JUST_UNDER_HALF)),
    ));
    _mm512_cvttps_epi32(_mm512_add_ps(scaled, nudge))
}

/// Reduces each of 16 vectors over its lanes with `op` (associative and commutative, such
/// as max or integer addition) and returns the 16 results, vector i's in lane i. Each level
/// halves the vectors and pairs the partial results of two inputs in one register: 32-bit
/// interleaves, then 64-bit, then 128-bit blocks twice.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn reduce_lanes(v: &[__m512i; BATCH], op: impl Fn(__m512i, __m512i) -> __m512i) -> __m512i {
    // Per 128-bit block: [a0 op a2, b0 op b2, a1 op a3, b1 op b3].
    let pairs: [__m512i; 8] = std::array::from_fn(|j| {
        let (a, b) = (v[2 * j], v[2 * j + 1]);
        op(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b))
    });
    // Per block: the block's result for inputs 4j..4j + 4, in order.
    let quads: [__m512i; 4] = std::array::from_fn(|j| {
        let (a, b) = (pairs[2 * j], pairs[2 * j + 1]);
        op(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
    });
    // Blocks 0 and 1 of a pair of quads combined, then blocks 2 and 3, for each quad.
    let halves: [__m512i; 2] = std::array::from_fn(|j| {
        let (a, b) = (quads[2 * j], quads[2 * j + 1]);
        op(
            _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b),
        )
    });
    let (a, b) = (halves[0], halves[1]);
    op(
        _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the rounding of `round_chunk` (at scale 1) against the scalar rounding for
    /// every float whose bits lie in `bits`, and for its negation.
    fn check_rounding(bits: std::ops::Range<u32>) {
        let mut values = [0.0f32; 16];
        let mut got = [0i32; 16];
        for start in bits.step_by(16) {
            for sign in [1.0f32, -1.0] {
                for (i, v) in values.iter_mut().enumerate() {
                    *v = sign * f32::from_bits(start + i as u32);
                }
                // SAFETY: the callers checked the CPU features; both arrays have 16 lanes.
                unsafe {
                    let one = _mm512_set1_ps(1.0);
                    let rounded = round_chunk(_mm512_loadu_ps(values.as_ptr()), one);
                    _mm512_storeu_si512(got.as_mut_ptr() as *mut __m512i, rounded);
                }
                for (v, g) in values.iter().zip(got) {
                    let expected = super::super::round_half_away(v.clamp(-Q_MAX, Q_MAX));
                    assert_eq!(g, expected, "{v:e}");
                }
            }
        }
    }

    /// The nudged truncation rounds like the scalar code next to every half-integer up to
    /// 127.5, where an inexact addition would show, and for every float from 0.25 to 1.
    #[test]
    fn rounding_matches_the_scalar_code() {
        assert_eq!(JUST_UNDER_HALF.to_bits(), 0.5f32.to_bits() - 1);
        if !std::arch::is_x86_feature_detected!("avx512bw") {
            return;
        }
        for k in 0..128 {
            let half = (k as f32 + 0.5).to_bits();
            check_rounding(half - 4096..half + 4096);
        }
        check_rounding(0.25f32.to_bits()..1.0f32.to_bits());
    }

    /// Checks every float up to 128 (about 2.2 billion values with both signs): run with
    /// `cargo test --release -- --ignored` after a change to the rounding.
    #[test]
    #[ignore]
    fn rounding_matches_the_scalar_code_everywhere() {
        if !std::arch::is_x86_feature_detected!("avx512bw") {
            return;
        }
        check_rounding(0..128.0f32.to_bits());
    }
}
