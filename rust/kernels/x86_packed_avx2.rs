//! AVX2 kernel on packed weights (layout in `super::packed`), for CPUs without AVX-512: a
//! panel's 16 rows in two 256-bit halves of eight, one input at a time.
//!
//! A 64-byte block contains four columns of the 16 rows, row after row, so its first 32 bytes
//! are rows 0-7 and the rest rows 8-15. The stored bytes are `w + 128`; flipping the sign bit
//! back gives `w`. `maddubs` multiplies `|w|` (unsigned) by `x * sign(w)` and adds adjacent
//! pairs into 16 bits, which cannot saturate (2 * 128 * 127 < 32767), and `madd` adds the two
//! pairs of each row into its 32-bit lane. So each row's group sum stays in its own lane, and
//! the fp32 steps follow the portable kernel lane for lane, as in `super::x86_packed`.
//! Results are bit-identical to `generic`.

use std::arch::x86_64::*;
use std::ops::Range;

use super::packed::{PackedQ8, LANE_ORDER, PANEL};
use super::{QuantizedVec, LANES};

/// Rows 0-7 and rows 8-15 of a panel.
type Halves = [__m256; 2];

/// Computes `out[b * stride + r - first] = dot(W row r, xs[b])` for the rows `r` of `panels`,
/// where `first` is the first row of the first panel.
///
/// # Safety
/// The CPU must support AVX2. Every input must have `w.cols` values quantized with
/// `w.group_size`, `panels` must lie within `w.panels()`, and `out` must hold
/// `(xs.len() - 1) * stride` plus the rows of `panels` values.
#[target_feature(enable = "avx2")]
pub unsafe fn matmul_packed(
    out: &mut [f32],
    stride: usize,
    w: &PackedQ8,
    panel_range: Range<usize>,
    xs: &[QuantizedVec],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match w.group_size {
            32 => panels::<32>(out, stride, w, panel_range, xs),
            64 => panels::<64>(out, stride, w, panel_range, xs),
            _ => panels::<0>(out, stride, w, panel_range, xs),
        }
    }
}

/// Runs the panels of `panels` against every input, one input at a time, run of panels by
/// run (see [`PackedQ8::panel_runs`]).
///
/// # Safety
/// As for [`matmul_packed`].
#[target_feature(enable = "avx2")]
unsafe fn panels<const GS: usize>(
    out: &mut [f32],
    stride: usize,
    w: &PackedQ8,
    panels: Range<usize>,
    xs: &[QuantizedVec],
) {
    let (gs, groups) = (w.group_size, w.cols / w.group_size);
    let first_row = panels.start * PANEL;
    for run in w.panel_runs(panels) {
        for (b, x) in xs.iter().enumerate() {
            for p in run.clone() {
                let valid = (w.rows - p * PANEL).min(PANEL);
                // SAFETY: p < w.panels(), so both offsets are inside the packed arrays; the
                // pointers cover one whole panel, and `x` has `groups * gs` values and
                // `groups` scales (the caller's guarantee).
                let [low, high] = unsafe {
                    let wp = w.bytes().as_ptr().add(p * w.panel_bytes());
                    let sp = w.scales.as_ptr().add(p * w.panel_scales());
                    panel::<GS>(wp, sp, groups, gs, x)
                };
                let mut rows = [0.0f32; PANEL];
                // SAFETY: `rows` has 16 floats.
                unsafe {
                    _mm256_storeu_ps(rows.as_mut_ptr(), low);
                    _mm256_storeu_ps(rows.as_mut_ptr().add(8), high);
                }
                let at = b * stride + p * PANEL - first_row;
                out[at..at + valid].copy_from_slice(&rows[..valid]);
            }
        }
    }
}

/// Multiplies one panel by one input: the 16 rows' results.
///
/// # Safety
/// The CPU must support AVX2; `w` and `ws` must point at a whole panel of `groups` groups of
/// `gs` columns, and `x` must hold `groups * gs` values and `groups` scales.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn panel<const GS: usize>(
    w: *const u8,
    ws: *const f32,
    groups: usize,
    gs: usize,
    x: &QuantizedVec,
) -> Halves {
    let gs = if GS == 0 { gs } else { GS };
    let mut at = Cursor { w, ws };
    // SAFETY (whole body): the cursor advances through exactly one panel's blocks and scales,
    // lane after lane in storage order, all inside what the caller guarantees.
    unsafe {
        let mut lane = |l: usize| lane_sums::<GS>(&mut at, l, groups, gs, x);
        // The tree of `generic::sum_lanes`, in the storage order of the lanes.
        debug_assert_eq!(LANE_ORDER, [0, 4, 2, 6, 1, 5, 3, 7]);
        let l04 = add(lane(0), lane(4));
        let left = add(l04, add(lane(2), lane(6)));
        let l15 = add(lane(1), lane(5));
        let right = add(l15, add(lane(3), lane(7)));
        add(left, right)
    }
}

/// The position of the next group's blocks and scales in a panel.
struct Cursor {
    w: *const u8,
    ws: *const f32,
}

/// Adds two lanes' (or partial sums') accumulators half by half.
#[inline(always)]
fn add(a: Halves, b: Halves) -> Halves {
    // SAFETY: the kernels that call this run only where AVX2 is supported.
    unsafe { [_mm256_add_ps(a[0], b[0]), _mm256_add_ps(a[1], b[1])] }
}

/// Returns lane `lane` of the portable kernel for the 16 rows: `(sum * w_scale) * x_scale`
/// added over groups `lane, lane + 8, ...` in order, starting from +0.0.
///
/// # Safety
/// As for [`panel`], with `at` at this lane's first group.
#[inline(always)]
unsafe fn lane_sums<const GS: usize>(
    at: &mut Cursor,
    lane: usize,
    groups: usize,
    gs: usize,
    x: &QuantizedVec,
) -> Halves {
    let block_bytes = PANEL * 4;
    let group_bytes = gs / 4 * block_bytes;
    // SAFETY: forwarded from the caller.
    unsafe {
        let sign_bit = _mm256_set1_epi8(i8::MIN);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 2];
        for g in (lane..groups).step_by(LANES) {
            let xp = x.q.as_ptr().add(g * gs);
            let mut sums = [_mm256_setzero_si256(); 2];
            for k in 0..gs / 4 {
                // The four activation bytes of this block's columns, in every row's lane.
                let xv = _mm256_set1_epi32((xp.add(4 * k) as *const i32).read_unaligned());
                for (h, sum) in sums.iter_mut().enumerate() {
                    let stored = _mm256_loadu_si256(at.w.add(k * block_bytes + 32 * h) as *const _);
                    let wv = _mm256_xor_si256(stored, sign_bit);
                    let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                }
            }
            let x_scale = _mm256_set1_ps(*x.scales.get_unchecked(g));
            for (h, (acc, sum)) in acc.iter_mut().zip(sums).enumerate() {
                let w_scale = _mm256_loadu_ps(at.ws.add(8 * h));
                let scaled =
                    _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sum), w_scale), x_scale);
                *acc = _mm256_add_ps(*acc, scaled);
            }
            at.w = at.w.add(group_bytes);
            at.ws = at.ws.add(PANEL);
        }
        acc
    }
}
