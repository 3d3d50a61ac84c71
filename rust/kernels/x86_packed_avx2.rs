//! 256-bit kernels on packed weights (layout in `super::packed`), for CPUs without AVX-512: a
//! panel's 16 rows in two halves of eight, one input at a time.
//!
//! A 64-byte block contains four columns of the 16 rows, row after row, so its first 32 bytes
//! are rows 0-7 and the rest rows 8-15. Each half block adds four products to each of its
//! eight rows' int32 sums, one row per 32-bit lane, in one of two ways:
//! - AVX2 ([`Maddubs`]): the stored bytes are `w + 128`, and flipping the sign bit back gives
//!   `w`. `maddubs` multiplies `|w|` (unsigned) by `x * sign(w)` and adds adjacent pairs into
//!   16 bits, which cannot saturate (2 * 128 * 127 < 32767), and `madd` adds the two pairs of
//!   each row into its lane.
//! - AVX-VNNI ([`Dpbusd`], Intel cores since Alder Lake, which lack AVX-512): one `dpbusd` of
//!   the stored `w + 128` by `x`, with the sums starting at `-128 * sum(x)`, as in
//!   `super::x86_packed`.
//!
//! So each row's group sum stays in its own lane, and the fp32 steps follow the portable
//! kernel lane for lane, as in `super::x86_packed`. Results are bit-identical to `generic`.

use std::arch::x86_64::*;
use std::marker::PhantomData;
use std::ops::Range;

use super::packed::{PackedQ8, LANE_ORDER, PANEL};
use super::x86_packed::prefetch_two_blocks;
use super::{QuantizedVec, LANES};

/// Rows 0-7 and rows 8-15 of a panel.
type Halves = [__m256; 2];

/// One way to add the products of a half block (four columns of eight rows) to its rows'
/// int32 sums. The functions are always inlined into a kernel compiled with the features
/// they need.
trait HalfBlock {
    /// Returns the sums' starting value for a group whose activation bytes add up to `sum_x`.
    unsafe fn start(sum_x: i32) -> __m256i;
    /// Adds the products of the half block's stored bytes `w + 128` and the four activation
    /// bytes `x`, which sit in every lane.
    unsafe fn add(sum: __m256i, stored: __m256i, x: __m256i) -> __m256i;
}

/// AVX2: `maddubs` and `madd` on `|w|` and `x * sign(w)`. Activations are never -128 (the
/// quantizer's range is +-127), which `sign` could not negate.
struct Maddubs;

impl HalfBlock for Maddubs {
    #[inline(always)]
    unsafe fn start(_sum_x: i32) -> __m256i {
        // SAFETY: AVX2, which every caller's kernel has.
        unsafe { _mm256_setzero_si256() }
    }

    #[inline(always)]
    unsafe fn add(sum: __m256i, stored: __m256i, x: __m256i) -> __m256i {
        // SAFETY: AVX2, as above.
        unsafe {
            let w = _mm256_xor_si256(stored, _mm256_set1_epi8(i8::MIN));
            let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
            _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }
}

/// `dpbusd` on the stored bytes, in the encoding `E` picks.
struct Dpbusd<E>(PhantomData<E>);

/// The VEX encoding (AVX-VNNI), which the CPUs of this path support.
struct Vex;

/// The EVEX encoding of AVX-512 VNNI with 256-bit vectors: the same operation, which this
/// project's test machines can run, so that the kernel's steps are tested there.
#[cfg(test)]
struct Evex;

/// An encoding of the 256-bit `dpbusd` instruction.
trait DpbusdEncoding {
    unsafe fn dpbusd(sum: __m256i, unsigned: __m256i, signed: __m256i) -> __m256i;
}

impl DpbusdEncoding for Vex {
    #[inline(always)]
    unsafe fn dpbusd(sum: __m256i, unsigned: __m256i, signed: __m256i) -> __m256i {
        // SAFETY: AVX-VNNI, which the kernel this is inlined into has.
        unsafe { _mm256_dpbusd_avx_epi32(sum, unsigned, signed) }
    }
}

#[cfg(test)]
impl DpbusdEncoding for Evex {
    #[inline(always)]
    unsafe fn dpbusd(sum: __m256i, unsigned: __m256i, signed: __m256i) -> __m256i {
        // SAFETY: AVX-512 VNNI and VL, which the kernel this is inlined into has.
        unsafe { _mm256_dpbusd_epi32(sum, unsigned, signed) }
    }
}

impl<E: DpbusdEncoding> HalfBlock for Dpbusd<E> {
    #[inline(always)]
    unsafe fn start(sum_x: i32) -> __m256i {
        // SAFETY: AVX, which every caller's kernel has.
        unsafe { _mm256_set1_epi32(-(sum_x << 7)) }
    }

    #[inline(always)]
    unsafe fn add(sum: __m256i, stored: __m256i, x: __m256i) -> __m256i {
        // SAFETY: forwarded from the caller.
        unsafe { E::dpbusd(sum, stored, x) }
    }
}

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
    unsafe { matmul::<Maddubs>(out, stride, w, panel_range, xs) }
}

/// As [`matmul_packed`] with AVX-VNNI.
///
/// # Safety
/// As for [`matmul_packed`], and the CPU must support AVX-VNNI.
/// The tests run it where the CPU has AVX-VNNI (as a Xeon with AVX-512 and AMX does), and
/// its steps with the EVEX encoding of the same instruction ([`matmul_packed_evex`]) on
/// CPUs with AVX-512 VNNI only.
#[target_feature(enable = "avx2,avxvnni")]
pub unsafe fn matmul_packed_vnni(
    out: &mut [f32],
    stride: usize,
    w: &PackedQ8,
    panel_range: Range<usize>,
    xs: &[QuantizedVec],
) {
    // SAFETY: forwarded from the caller.
    unsafe { matmul::<Dpbusd<Vex>>(out, stride, w, panel_range, xs) }
}

/// [`matmul_packed_vnni`] with the instruction's AVX-512 encoding, for the tests.
///
/// # Safety
/// As for [`matmul_packed`], and the CPU must support AVX-512 VNNI and VL.
#[cfg(test)]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
pub unsafe fn matmul_packed_evex(
    out: &mut [f32],
    stride: usize,
    w: &PackedQ8,
    panel_range: Range<usize>,
    xs: &[QuantizedVec],
) {
    // SAFETY: forwarded from the caller.
    unsafe { matmul::<Dpbusd<Evex>>(out, stride, w, panel_range, xs) }
}

/// # Safety
/// As for the kernel this is inlined into.
#[inline(always)]
unsafe fn matmul<D: HalfBlock>(
    out: &mut [f32],
    stride: usize,
    w: &PackedQ8,
    panel_range: Range<usize>,
    xs: &[QuantizedVec],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match w.group_size {
            32 => panels::<D, 32>(out, stride, w, panel_range, xs),
            64 => panels::<D, 64>(out, stride, w, panel_range, xs),
            _ => panels::<D, 0>(out, stride, w, panel_range, xs),
        }
    }
}

/// Runs the panels of `panels` against every input, one input at a time, run of panels by
/// run (see [`PackedQ8::panel_runs`]).
///
/// # Safety
/// As for [`matmul_packed`].
#[inline(always)]
unsafe fn panels<D: HalfBlock, const GS: usize>(
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
                // pointers cover one whole panel, and `x` has `groups * gs` values,
                // `groups` scales and `groups` sums (the caller's guarantee).
                let [low, high] = unsafe {
                    let wp = w.bytes().as_ptr().add(p * w.panel_bytes());
                    let sp = w.scales.as_ptr().add(p * w.panel_scales());
                    panel::<D, GS>(wp, sp, groups, gs, x)
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
/// `w` and `ws` must point at a whole panel of `groups` groups of `gs` columns, and `x` must
/// hold `groups * gs` values, `groups` scales and `groups` sums.
#[inline(always)]
unsafe fn panel<D: HalfBlock, const GS: usize>(
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
        let mut lane = |l: usize| lane_sums::<D, GS>(&mut at, l, groups, gs, x);
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
unsafe fn lane_sums<D: HalfBlock, const GS: usize>(
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
        let mut acc = [_mm256_setzero_ps(); 2];
        for g in (lane..groups).step_by(LANES) {
            let xp = x.q.as_ptr().add(g * gs);
            // The four activation bytes of block k's columns, as one i32.
            let column_bytes = |k: usize| (xp.add(4 * k) as *const i32).read_unaligned();
            // Two chains per half (even and odd blocks), so that each step waits on the
            // latency of half as many before it. Integer sums are exact in any order. Named
            // variables, not arrays picked per block, keep the chains in registers whether
            // or not the compiler unrolls the loop.
            let start = D::start(*x.sums.get_unchecked(g));
            let (mut even_low, mut even_high) = (start, start);
            let (mut odd_low, mut odd_high) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            let blocks = gs / 4;
            for k in (0..blocks - blocks % 2).step_by(2) {
                let block = at.w.add(k * block_bytes);
                prefetch_two_blocks(block);
                let (x_even, x_odd) = (
                    _mm256_set1_epi32(column_bytes(k)),
                    _mm256_set1_epi32(column_bytes(k + 1)),
                );
                let next = block.add(block_bytes);
                even_low = D::add(even_low, _mm256_loadu_si256(block as *const _), x_even);
                even_high = D::add(
                    even_high,
                    _mm256_loadu_si256(block.add(32) as *const _),
                    x_even,
                );
                odd_low = D::add(odd_low, _mm256_loadu_si256(next as *const _), x_odd);
                odd_high = D::add(
                    odd_high,
                    _mm256_loadu_si256(next.add(32) as *const _),
                    x_odd,
                );
            }
            if blocks % 2 == 1 {
                let block = at.w.add((blocks - 1) * block_bytes);
                let x_even = _mm256_set1_epi32(column_bytes(blocks - 1));
                even_low = D::add(even_low, _mm256_loadu_si256(block as *const _), x_even);
                even_high = D::add(
                    even_high,
                    _mm256_loadu_si256(block.add(32) as *const _),
                    x_even,
                );
            }
            let sums = [
                _mm256_add_epi32(even_low, odd_low),
                _mm256_add_epi32(even_high, odd_high),
            ];
            let x_scale = _mm256_set1_ps(*x.scales.get_unchecked(g));
            for (h, sum) in sums.into_iter().enumerate() {
                let w_scale = _mm256_loadu_ps(at.ws.add(8 * h));
                let scaled =
                    _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sum), w_scale), x_scale);
                acc[h] = _mm256_add_ps(acc[h], scaled);
            }
            at.w = at.w.add(group_bytes);
            at.ws = at.ws.add(PANEL);
        }
        acc
    }
}
