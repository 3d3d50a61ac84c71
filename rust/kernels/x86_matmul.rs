//! AVX-512 VNNI matrix-matrix kernel: one weight row against several activation vectors.
//!
//! `dpbusd` multiplies unsigned by signed bytes, so each activation is shifted to
//! `x + 128` (its sign bit flipped, once per call) and the group sum corrected exactly:
//! `sum(x * w) = sum((x + 128) * w) - 128 * sum(w)`. The weight sums come from a `dpbusd` of
//! ones against `w`, shared by every activation. That takes the per-product sign fix-up of the
//! matrix-vector kernel out of the inner loop; the integer sums are exact and the float steps
//! run in the same order as `generic`, so results stay bit-identical.

use std::arch::x86_64::*;

use super::x86::{hsum_ps, load_lanes, transpose_sum};
use super::{QuantizedVec, LANES};

/// Activations handled together against each weight row.
///
/// NOTE: on the AMD EPYC (Zen 4) machine this was written on, this kernel and a loop of the
/// AVX2 matrix-vector kernel measured within noise of each other (about 0.4-0.6 ms for 128
/// inputs of 288x288, `cargo bench --bench kernels -- matmul`, another job on the second core);
/// tuning the tile needs a quiet machine.
const INPUTS: usize = 2;

/// `w` and `x` of one group (`gs` bytes, a multiple of 32): returns the partial sums of
/// `(x + 128) * w` for each input and of `w` itself, eight lanes each.
///
/// # Safety
/// The CPU must support AVX-512 VNNI and VL; `w` and every `x[b]` valid for `gs` bytes.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn group<const B: usize>(
    w: *const i8,
    x: [*const u8; B],
    gs: usize,
) -> ([__m256i; B], __m256i) {
    let ones = _mm256_set1_epi8(1);
    let mut sums = [_mm256_setzero_si256(); B];
    let mut w_sum = _mm256_setzero_si256();
    for offset in (0..gs).step_by(32) {
        // SAFETY: the caller guarantees gs readable bytes at each pointer.
        let wv = unsafe { _mm256_loadu_si256(w.add(offset) as *const __m256i) };
        w_sum = _mm256_dpbusd_epi32(w_sum, ones, wv);
        for b in 0..B {
            // SAFETY: as above.
            let xv = unsafe { _mm256_loadu_si256(x[b].add(offset) as *const __m256i) };
            sums[b] = _mm256_dpbusd_epi32(sums[b], xv, wv);
        }
    }
    (sums, w_sum)
}

/// Adds the scaled sums of `N` groups starting at group `g0` to each input's accumulator.
///
/// # Safety
/// As for [`group`]; groups `g0..g0 + N` must lie inside the row, the inputs and the scales.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn block<const B: usize, const N: usize>(
    acc: &mut [__m256; B],
    row: *const i8,
    w_scales: *const f32,
    x: [*const u8; B],
    x_scales: [*const f32; B],
    g0: usize,
    gs: usize,
) {
    let mut sums = [[_mm256_setzero_si256(); LANES]; B];
    let mut w_sums = [_mm256_setzero_si256(); LANES];
    for k in 0..N {
        let g = g0 + k;
        // SAFETY: group g lies inside the row and every input (caller's guarantee).
        let (s, w_sum) = unsafe { group::<B>(row.add(g * gs), x.map(|p| p.add(g * gs)), gs) };
        for b in 0..B {
            sums[b][k] = s[b];
        }
        w_sums[k] = w_sum;
    }
    let correction = _mm256_slli_epi32(transpose_sum(&w_sums), 7);
    // SAFETY: N scales from g0 on are readable (caller's guarantee).
    let ws = unsafe { load_lanes::<N>(w_scales.add(g0)) };
    for b in 0..B {
        let isums = _mm256_sub_epi32(transpose_sum(&sums[b]), correction);
        // SAFETY: as above.
        let xs = unsafe { load_lanes::<N>(x_scales[b].add(g0)) };
        let scaled = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isums), ws), xs);
        acc[b] = _mm256_add_ps(acc[b], scaled);
    }
}

/// Rows of `W` against `B` inputs; see [`matmul_q8_avx512vnni`].
///
/// # Safety
/// As for [`matmul_q8_avx512vnni`], with `B` inputs in `x` and `x_scales`.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows<const B: usize>(
    out: &mut [f32],
    stride: usize,
    first_input: usize,
    w_q: &[i8],
    w_scales: &[f32],
    x: [*const u8; B],
    x_scales: [*const f32; B],
    cols: usize,
    gs: usize,
) {
    let groups = cols / gs;
    let full = groups - groups % LANES;
    let n_rows = w_q.len() / cols;
    for r in 0..n_rows {
        let row = w_q[r * cols..(r + 1) * cols].as_ptr();
        let ws = w_scales[r * groups..(r + 1) * groups].as_ptr();
        let mut acc = [_mm256_setzero_ps(); B];
        // SAFETY: every block covers groups inside the row (checked by the slicing above),
        // the inputs and the scales, whose lengths the caller guarantees.
        unsafe {
            for g0 in (0..full).step_by(LANES) {
                block::<B, LANES>(&mut acc, row, ws, x, x_scales, g0, gs);
            }
            match groups - full {
                0 => {}
                1 => block::<B, 1>(&mut acc, row, ws, x, x_scales, full, gs),
                2 => block::<B, 2>(&mut acc, row, ws, x, x_scales, full, gs),
                3 => block::<B, 3>(&mut acc, row, ws, x, x_scales, full, gs),
                4 => block::<B, 4>(&mut acc, row, ws, x, x_scales, full, gs),
                5 => block::<B, 5>(&mut acc, row, ws, x, x_scales, full, gs),
                6 => block::<B, 6>(&mut acc, row, ws, x, x_scales, full, gs),
                _ => block::<B, 7>(&mut acc, row, ws, x, x_scales, full, gs),
            }
        }
        for b in 0..B {
            out[(first_input + b) * stride + r] = hsum_ps(acc[b]);
        }
    }
}

/// `out[b * stride + r] = dot(W row r, xs[b])` for every row of `w_q` and every input.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI; the group size must be a multiple of 32,
/// and `out` must hold `(xs.len() - 1) * stride + rows` values.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn matmul_q8_avx512vnni(
    out: &mut [f32],
    stride: usize,
    w_q: &[i8],
    w_scales: &[f32],
    xs: &[QuantizedVec],
    shifted: &mut Vec<u8>,
) {
    let cols = xs[0].q.len();
    let gs = xs[0].group_size;
    // x + 128 as unsigned bytes: flipping the sign bit of each int8.
    shifted.clear();
    for x in xs {
        shifted.extend(x.q.iter().map(|&v| (v as u8) ^ 0x80));
    }
    let mut b = 0;
    while b < xs.len() {
        let count = (xs.len() - b).min(INPUTS);
        let x = |i: usize| shifted[(b + i) * cols..].as_ptr();
        let s = |i: usize| xs[b + i].scales.as_ptr();
        // SAFETY: the caller guarantees the CPU features, the group size and the length of
        // `out`; each input has `cols` values and `cols / gs` scales.
        unsafe {
            if count == 2 {
                rows::<2>(
                    out,
                    stride,
                    b,
                    w_q,
                    w_scales,
                    [x(0), x(1)],
                    [s(0), s(1)],
                    cols,
                    gs,
                );
            } else {
                rows::<1>(out, stride, b, w_q, w_scales, [x(0)], [s(0)], cols, gs);
            }
        }
        b += count;
    }
}
