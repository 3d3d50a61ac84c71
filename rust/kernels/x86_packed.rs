//! AVX-512 VNNI kernel on packed weights (layout in `super::packed`): panels of 16 rows against
//! up to `INPUTS` activation vectors at a time.
//!
//! For each group, each input's int32 sums start at `-128 * sum(x)` and gather one `dpbusd`
//! per 64-byte block, so they finish as the exact group sums of the 16 rows. The fp32 steps
//! then follow the portable kernel lane for lane: `(sum * w_scale) * x_scale` added to the
//! accumulator of lane g % 8, and the eight lane accumulators summed in `generic::sum_lanes`
//! order, here for 16 rows at once. Results are bit-identical to `generic`.

use std::arch::x86_64::*;
use std::ops::Range;

use super::packed::{PackedQ8, LANE_ORDER, PANEL, PREFETCH_AHEAD};
use super::{QuantizedVec, LANES};

/// Prefetches the two 64-byte blocks [`PREFETCH_AHEAD`] bytes past `block`. The address may
/// lie past the weights, which a prefetch never faults on.
#[inline(always)]
pub(super) fn prefetch_two_blocks(block: *const u8) {
    let ahead = block.wrapping_add(PREFETCH_AHEAD);
    // SAFETY: a prefetch reads nothing and never faults, and SSE is part of x86-64.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64) as *const i8);
    }
}

/// Activation vectors that share each block load. Each keeps its int32 group sums, its lane
/// accumulator and up to three finished lanes in registers. At 4 inputs these fit the 32
/// vector registers, while 8 spilled to the stack and ran 5-10% slower (measured on Zen 4).
const INPUTS: usize = 4;

/// Input pointers of one tile of `B` activation vectors.
#[derive(Clone, Copy)]
struct Tile<const B: usize> {
    q: [*const i8; B],
    scales: [*const f32; B],
    sums: [*const i32; B],
    out: [*mut f32; B],
}

/// Multiplies one panel by the `B` inputs of `tile` and writes the first `valid` of its 16
/// rows.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI; `w` and `ws` must point at a whole panel of
/// `groups` groups of `gs` columns, each input must hold `groups * gs` values, `groups`
/// scales and sums, and each output `valid` writable floats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn panel<const B: usize, const GS: usize>(
    w: *const u8,
    ws: *const f32,
    groups: usize,
    gs: usize,
    tile: Tile<B>,
    valid: usize,
) {
    let gs = if GS == 0 { gs } else { GS };
    let mask: __mmask16 = if valid >= PANEL { !0 } else { (1 << valid) - 1 };
    let mut at = Cursor { w, ws };
    // SAFETY (whole body): the cursor advances through exactly one panel's blocks and scales,
    // lane after lane in storage order, and through the groups of each input, all inside what
    // the caller guarantees.
    unsafe {
        let mut lane = |l: usize| lane_sums::<B, GS>(&mut at, l, groups, gs, &tile);
        // The tree of `generic::sum_lanes`, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)),
        // written out so that each lane is added as soon as its partner is done.
        debug_assert_eq!(LANE_ORDER, [0, 4, 2, 6, 1, 5, 3, 7]);
        let l04 = add(lane(0), lane(4));
        let left = add(l04, add(lane(2), lane(6)));
        let l15 = add(lane(1), lane(5));
        let right = add(l15, add(lane(3), lane(7)));
        for (b, total) in add(left, right).into_iter().enumerate() {
            _mm512_mask_storeu_ps(tile.out[b], mask, total);
        }
    }
}

/// The position of the next group's blocks and scales in a panel.
struct Cursor {
    w: *const u8,
    ws: *const f32,
}

/// Adds two lanes' (or partial sums') accumulators input by input.
#[inline(always)]
fn add<const B: usize>(a: [__m512; B], b: [__m512; B]) -> [__m512; B] {
    // SAFETY: the kernels that call this run only where AVX-512 F is supported.
    std::array::from_fn(|i| unsafe { _mm512_add_ps(a[i], b[i]) })
}

/// Returns, per input, the accumulator of lane `lane` of the portable kernel for 16 rows:
/// `(sum * w_scale) * x_scale` added over groups `lane, lane + 8, ...` in order, starting
/// from +0.0 (which a lane with no groups keeps, as it does in `generic`).
///
/// # Safety
/// As for [`panel`], with `at` at this lane's first group.
#[inline(always)]
unsafe fn lane_sums<const B: usize, const GS: usize>(
    at: &mut Cursor,
    lane: usize,
    groups: usize,
    gs: usize,
    tile: &Tile<B>,
) -> [__m512; B] {
    let block_bytes = PANEL * 4;
    let group_bytes = gs / 4 * block_bytes;
    let mut acc = [_mm512_setzero_ps(); B];
    // SAFETY: forwarded from the caller.
    unsafe {
        for g in (lane..groups).step_by(LANES) {
            let wp = at.w;
            // Two chains of dpbusd per input (even and odd blocks), so that each waits on the
            // latency of half as many. Integer sums are exact in any order.
            let mut even: [__m512i; B] =
                std::array::from_fn(|b| _mm512_set1_epi32(-(*tile.sums[b].add(g) << 7)));
            let mut odd = [_mm512_setzero_si512(); B];
            let x: [*const i8; B] = std::array::from_fn(|b| tile.q[b].add(g * gs));
            let blocks = gs / 4;
            for k in (0..blocks - blocks % 2).step_by(2) {
                if B == 1 {
                    // One input streams the weights from memory, but a tile reads them from L2.
                    prefetch_two_blocks(wp.add(k * block_bytes));
                }
                let wv = _mm512_loadu_si512(wp.add(k * block_bytes) as *const __m512i);
                let wv2 = _mm512_loadu_si512(wp.add((k + 1) * block_bytes) as *const __m512i);
                for b in 0..B {
                    let xv = (x[b].add(4 * k) as *const i32).read_unaligned();
                    let xv2 = (x[b].add(4 * k + 4) as *const i32).read_unaligned();
                    even[b] = _mm512_dpbusd_epi32(even[b], wv, _mm512_set1_epi32(xv));
                    odd[b] = _mm512_dpbusd_epi32(odd[b], wv2, _mm512_set1_epi32(xv2));
                }
            }
            if blocks % 2 == 1 {
                let k = blocks - 1;
                let wv = _mm512_loadu_si512(wp.add(k * block_bytes) as *const __m512i);
                for b in 0..B {
                    let xv = (x[b].add(4 * k) as *const i32).read_unaligned();
                    even[b] = _mm512_dpbusd_epi32(even[b], wv, _mm512_set1_epi32(xv));
                }
            }
            let w_scale = _mm512_loadu_ps(at.ws);
            for b in 0..B {
                let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(even[b], odd[b]));
                let x_scale = _mm512_set1_ps(*tile.scales[b].add(g));
                let scaled = _mm512_mul_ps(_mm512_mul_ps(sum, w_scale), x_scale);
                acc[b] = _mm512_add_ps(acc[b], scaled);
            }
            at.w = wp.add(group_bytes);
            at.ws = at.ws.add(PANEL);
        }
    }
    acc
}

/// Multiplies the panels `panels` of `w` by every input of `xs`, `INPUTS` at a time, run of
/// panels by run (see [`PackedQ8::panel_runs`]).
///
/// # Safety
/// As for [`matmul_packed`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn panels<const GS: usize>(
    out: &mut [f32],
    stride: usize,
    w: &PackedQ8,
    panels: Range<usize>,
    xs: &[QuantizedVec],
) {
    let first_row = panels.start * PANEL;
    for run in w.panel_runs(panels) {
        // The run's first row in the outputs of each input.
        let row = run.start * PANEL - first_row;
        let mut b0 = 0;
        while b0 < xs.len() {
            let count = (xs.len() - b0).min(INPUTS);
            // SAFETY: the caller sized `out` for every input and row of these panels, and
            // each input has `cols` values and `groups` scales and sums.
            unsafe {
                macro_rules! tile {
                    ($b:literal) => {{
                        let tile = Tile::<$b> {
                            q: std::array::from_fn(|i| xs[b0 + i].q.as_ptr()),
                            scales: std::array::from_fn(|i| xs[b0 + i].scales.as_ptr()),
                            sums: std::array::from_fn(|i| xs[b0 + i].sums.as_ptr()),
                            out: std::array::from_fn(|i| {
                                out.as_mut_ptr().add((b0 + i) * stride + row)
                            }),
                        };
                        tile_panels::<$b, GS>(w, run.clone(), tile)
                    }};
                }
                match count {
                    1 => tile!(1),
                    2 => tile!(2),
                    3 => tile!(3),
                    _ => tile!(4),
                }
            }
            b0 += count;
        }
    }
}

/// Multiplies the panels `run` of `w` by the inputs of `tile`, whose outputs point at the
/// first row of the run.
///
/// # Safety
/// As for [`matmul_packed`], for the tile's inputs and outputs.
#[inline(always)]
unsafe fn tile_panels<const B: usize, const GS: usize>(
    w: &PackedQ8,
    run: Range<usize>,
    tile: Tile<B>,
) {
    let (gs, groups) = (w.group_size, w.cols / w.group_size);
    for (i, p) in run.enumerate() {
        let valid = (w.rows - p * PANEL).min(PANEL);
        // SAFETY: p < w.panels(), so both offsets are inside the packed arrays, and the
        // outputs have the run's rows.
        unsafe {
            let wp = w.bytes().as_ptr().add(p * w.panel_bytes());
            let sp = w.scales.as_ptr().add(p * w.panel_scales());
            let tile = Tile {
                out: tile.out.map(|o| o.add(i * PANEL)),
                ..tile
            };
            panel::<B, GS>(wp, sp, groups, gs, tile, valid);
        }
    }
}

/// Computes `out[b * stride + r - first] = dot(W row r, xs[b])` for the rows `r` of `panels`,
/// where `first` is the first row of the first panel.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI. Every input must have `w.cols` values
/// quantized with `w.group_size`, `panels` must lie within `w.panels()`, and `out` must hold
/// `(xs.len() - 1) * stride` plus the rows of `panels` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
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
