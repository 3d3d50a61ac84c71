//! Portable kernels: the reference every SIMD path must match bit for bit.

use super::{QuantizedVec, LANES};

/// Sums eight lane partial sums in the tree order of a 256-bit horizontal add:
/// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
#[inline(always)]
pub fn sum_lanes(l: &[f32; LANES]) -> f32 {
    let half = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (half[0] + half[2]) + (half[1] + half[3])
}

/// Adds group `g`'s scaled integer sum to its lane: the step every path shares, so that all
/// paths round identically.
#[inline(always)]
pub fn accumulate_group(lanes: &mut [f32; LANES], g: usize, isum: i32, w_scale: f32, x_scale: f32) {
    lanes[g % LANES] += (isum as f32 * w_scale) * x_scale;
}

pub fn isum(w: &[i8], x: &[i8]) -> i32 {
    w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// Sums the int8 products of one group of a size fixed at compile time, so that the compiler
/// unrolls and vectorizes the loop. On x86-64 with SSE2 alone the kernel then ran 2.5x
/// faster than with a length known only at run time.
/// NOTE: the ARM code this compiles to has not been inspected (no ARM toolchain here).
#[inline(always)]
fn isum_fixed<const N: usize>(w: &[i8], x: &[i8]) -> i32 {
    let (w, x): (&[i8; N], &[i8; N]) = (w.try_into().unwrap(), x.try_into().unwrap());
    w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum()
}

pub fn matvec_q8(out: &mut [f32], w_q: &[i8], w_scales: &[f32], x: &QuantizedVec) {
    match x.group_size {
        32 => matvec_q8_groups(out, w_q, w_scales, x, isum_fixed::<32>),
        64 => matvec_q8_groups(out, w_q, w_scales, x, isum_fixed::<64>),
        _ => matvec_q8_groups(out, w_q, w_scales, x, isum),
    }
}

#[inline(always)]
fn matvec_q8_groups(
    out: &mut [f32],
    w_q: &[i8],
    w_scales: &[f32],
    x: &QuantizedVec,
    isum: impl Fn(&[i8], &[i8]) -> i32,
) {
    let cols = x.q.len();
    let gs = x.group_size;
    let groups = cols / gs;
    for (r, o) in out.iter_mut().enumerate() {
        let row = &w_q[r * cols..(r + 1) * cols];
        let row_scales = &w_scales[r * groups..(r + 1) * groups];
        let mut lanes = [0.0f32; LANES];
        for (g, (&w_scale, &x_scale)) in row_scales.iter().zip(&x.scales).enumerate() {
            let span = g * gs..(g + 1) * gs;
            let sum = isum(&row[span.clone()], &x.q[span]);
            accumulate_group(&mut lanes, g, sum, w_scale, x_scale);
        }
        *o = sum_lanes(&lanes);
    }
}

pub fn matvec_f32(out: &mut [f32], w: &[f32], x: &[f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(x.len())) {
        *o = dot_f32(row, x);
    }
}

/// Dot product with eight independent partial sums, which lets the compiler vectorize it.
/// Always inlined, so that it vectorizes as wide as the function it is inlined into.
#[inline(always)]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; LANES];
    let (a_main, a_tail) = a[..n].split_at(n - n % LANES);
    let (b_main, b_tail) = b[..n].split_at(n - n % LANES);
    for (ac, bc) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        // Fixed-size arrays let the compiler keep the eight sums in one register.
        let (ac, bc): (&[f32; LANES], &[f32; LANES]) =
            (ac.try_into().unwrap(), bc.try_into().unwrap());
        for i in 0..LANES {
            acc[i] += ac[i] * bc[i];
        }
    }
    let mut sum = sum_lanes(&acc);
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}
