//! Elementwise and small vector operations of the forward pass.

pub const RMS_EPS: f32 = 1e-5;

/// `out = w * x / sqrt(mean(x^2) + 1e-5)`. The squares are summed in order, because a 1-ulp
/// change of the norm can move an activation across a Q8_0 rounding step. In a memory model
/// such a change lives on in the memory, so the sum keeps one fixed order everywhere.
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32]) {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    scale_row(out, x, w, mean_square);
}

/// Applies [`rmsnorm`] to each of the `x.len() / dim` rows of `x`, writing `out`. The rows'
/// sums run side by side, eight at a time, so that eight additions overlap instead of each
/// waiting for the last. Each row's sum still takes its squares in order, so the results are
/// the same.
pub fn rmsnorm_rows(out: &mut [f32], x: &[f32], w: &[f32]) {
    let dim = w.len();
    for (out, x) in out
        .chunks_mut(NORM_ROWS * dim)
        .zip(x.chunks(NORM_ROWS * dim))
    {
        let rows = x.len() / dim;
        let mut sums = [0.0f32; NORM_ROWS];
        sum_squares(&mut sums[..rows], x, dim);
        for (r, sum) in sums[..rows].iter().enumerate() {
            let span = r * dim..(r + 1) * dim;
            scale_row(&mut out[span.clone()], &x[span], w, sum / dim as f32);
        }
    }
}

/// Rows whose squares [`rmsnorm_rows`] sums side by side.
const NORM_ROWS: usize = 8;

/// Adds the squares of each of the `sums.len()` rows of `x` (width `dim`) to its sum, in
/// order.
fn sum_squares(sums: &mut [f32], x: &[f32], dim: usize) {
    #[cfg(target_arch = "x86_64")]
    if sums.len() == NORM_ROWS && std::arch::is_x86_feature_detected!("avx") {
        let sums: &mut [f32; NORM_ROWS] = sums.try_into().unwrap();
        // SAFETY: the CPU supports AVX (checked above), and `x` has eight rows.
        return unsafe { sum_squares8_avx(sums, x, dim) };
    }
    add_squares(sums, x, dim, 0..dim);
}

/// Adds the squares of columns `columns` of each row of `x` (width `dim`) to the row's sum,
/// one column after another.
fn add_squares(sums: &mut [f32], x: &[f32], dim: usize, columns: std::ops::Range<usize>) {
    for i in columns {
        for (r, sum) in sums.iter_mut().enumerate() {
            let v = x[r * dim + i];
            *sum += v * v;
        }
    }
}

/// Computes [`sum_squares`] for eight rows, one row per lane of a register. Each block of
/// eight columns is loaded row by row and transposed, so that one vector step adds the same
/// column's square to all eight sums. The squares of a row still go in one by one, in
/// order. The scalar loop, with the rows side by side, took about 2.3 cycles per value.
///
/// # Safety
/// The CPU must support AVX, and `x` must hold `8 * dim` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn sum_squares8_avx(sums: &mut [f32; NORM_ROWS], x: &[f32], dim: usize) {
    use std::arch::x86_64::*;
    assert!(x.len() >= NORM_ROWS * dim);
    let full = dim - dim % 8;
    // SAFETY: the sums array has eight floats.
    let mut acc = unsafe { _mm256_loadu_ps(sums.as_ptr()) };
    for c in (0..full).step_by(8) {
        // SAFETY: row r's columns c..c + 8 lie inside x (c + 8 <= dim, checked above).
        let r: [__m256; 8] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(i * dim + c)) });
        // An 8x8 transpose: column j of the block ends up in `col[j]`, row i in lane i.
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        let col = [
            _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
            _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
        ];
        for v in col {
            acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
        }
    }
    // SAFETY: as above.
    unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), acc) };
    add_squares(sums, x, dim, full..dim);
}

#[inline(always)]
fn scale_row(out: &mut [f32], x: &[f32], w: &[f32], mean_square: f32) {
    let inv = 1.0 / (mean_square + RMS_EPS).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * inv);
    }
}

/// Softmax in place, shifted by the maximum for stability. Inlined so that the attention,
/// compiled for AVX2, vectorizes it too.
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let max = max(x);
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let sum = sum(x);
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Returns the sum of `x`: eight running sums, added in `sum_lanes` order, then the values
/// past the last multiple of eight in order. Unlike a serial sum, the loop vectorizes.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    let mut sum = crate::kernels::sum_lanes(&lanes);
    for v in tail {
        sum += v;
    }
    sum
}

/// Returns the largest value of `x`, ignoring NaN (negative infinity if empty). Eight running
/// maxima let the loop vectorize. The maximum does not depend on the order, so the result is
/// the same as a serial fold's.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `e^x` within 2 ulp of `f32::exp`, in plain arithmetic that the compiler vectorizes (the
/// libm call does not): `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-6 polynomial for
/// `e^r`, and `2^n` built from its bits. Below -87 it returns 0, where `e^x` would be a
/// denormal; above 88.72 infinity. NaN gives NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HIGH is exact for the n that occur here.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LOW: f32 = -87.0;
    const HIGH: f32 = 88.722_83;
    // Selects instead of early returns, so that loops over this vectorize; NaN passes every
    // comparison as false and stays NaN.
    let xc = x.clamp(LOW, HIGH);

    let shifted = xc * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (xc - n * LN2_HIGH) - n * LN2_LOW;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e_r = p * (r * r) + r + 1.0;

    // n as an integer from the low bits of `shifted`, without a float conversion; 2^n as two
    // factors, since n can reach 128, one past the largest exponent (multiplying by powers
    // of two is exact).
    let n = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = e_r * pow2(n / 2) * pow2(n - n / 2);
    if x < LOW {
        0.0
    } else if x > HIGH {
        f32::INFINITY
    } else {
        y
    }
}

/// `a = silu(a) * b`, the SwiGLU gate.
pub fn swiglu(a: &mut [f32], b: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512 F (checked above).
        return unsafe { swiglu_avx512(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked above).
        return unsafe { swiglu_avx2(a, b) };
    }
    swiglu_body(a, b)
}

/// Runs the same loop compiled eight floats wide. Each element takes the same steps, so the
/// bits are the same.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn swiglu_avx2(a: &mut [f32], b: &[f32]) {
    swiglu_body(a, b)
}

/// As [`swiglu_avx2`], sixteen floats wide.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_avx512(a: &mut [f32], b: &[f32]) {
    swiglu_body(a, b)
}

#[inline(always)]
fn swiglu_body(a: &mut [f32], b: &[f32]) {
    for (ai, &bi) in a.iter_mut().zip(b) {
        let silu = *ai / (1.0 + exp(-*ai));
        *ai = silu * bi;
    }
}

pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (xi, &yi) in x.iter_mut().zip(y) {
        *xi += yi;
    }
}

pub use crate::kernels::dot_f32 as dot;

/// Positions with precomputed RoPE angles; later positions (plain models with a long
/// seq_len) compute theirs on the fly, so a header cannot make the table huge.
const ROPE_TABLE_POSITIONS: usize = 8192;

/// Cosines and sines of the RoPE angles `p * 10000^(-2j / head_size)` for pairs
/// `j in 0..head_size/2`, computed in f64 and stored as f32.
pub struct RopeTable {
    half: usize,
    freqs: Vec<f64>,
    cos: Vec<f32>, // (table positions, head_size / 2)
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_size: usize, positions: usize) -> RopeTable {
        let half = head_size / 2;
        let freqs: Vec<f64> = (0..half)
            .map(|j| 10000f64.powf(-((2 * j) as f64) / head_size as f64))
            .collect();
        let positions = positions.min(ROPE_TABLE_POSITIONS);
        let mut table = RopeTable {
            half,
            cos: Vec::with_capacity(positions * half),
            sin: Vec::with_capacity(positions * half),
            freqs,
        };
        for p in 0..positions {
            for j in 0..half {
                let (sin, cos) = table.angle(p, j).sin_cos();
                table.cos.push(cos as f32);
                table.sin.push(sin as f32);
            }
        }
        table
    }

    fn angle(&self, pos: usize, j: usize) -> f64 {
        pos as f64 * self.freqs[j]
    }

    /// Rotates each pair (2j, 2j+1) of every head in `x` to position `pos`.
    pub fn rotate(&self, x: &mut [f32], pos: usize) {
        let half = self.half;
        if (pos + 1) * half > self.cos.len() {
            // NOTE: allocates; only plain models past the table's positions get here.
            let (sin, cos): (Vec<f32>, Vec<f32>) = (0..half)
                .map(|j| {
                    let (s, c) = self.angle(pos, j).sin_cos();
                    (s as f32, c as f32)
                })
                .unzip();
            return rotate_pairs(x, &cos, &sin);
        }
        rotate_pairs(
            x,
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
    }
}

fn rotate_pairs(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        for j in 0..half {
            let (x0, x1) = (head[2 * j], head[2 * j + 1]);
            head[2 * j] = x0 * cos[j] - x1 * sin[j];
            head[2 * j + 1] = x0 * sin[j] + x1 * cos[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0u32;
        for i in 0..=2_000_000u32 {
            let x = -87.0 + 175.72 * i as f32 / 2_000_000.0;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(got.to_bits().abs_diff(want.to_bits()));
        }
        assert!(worst <= 2, "largest error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let reference: Vec<f64> = {
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let e: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.iter().map(|v| v / sum).collect()
        };
        softmax(&mut x);
        for (got, want) in x.iter().zip(&reference) {
            assert!(
                (*got as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12,
                "{got} {want}"
            );
        }
    }

    #[test]
    fn swiglu_paths_agree_bit_for_bit() {
        let a: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.731).sin() * 30.0).collect();
        let b: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.377).cos() * 3.0).collect();
        let mut want = a.clone();
        swiglu_body(&mut want, &b);
        let mut got = a.clone();
        swiglu(&mut got, &b);
        assert_eq!(got, want);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let mut got = a.clone();
            // SAFETY: AVX2 was detected.
            unsafe { swiglu_avx2(&mut got, &b) };
            assert_eq!(got, want);
        }
    }

    /// Blocks of eight rows (the transposed path) and a partial block, at widths with and
    /// without a tail of fewer than eight columns.
    #[test]
    fn rmsnorm_rows_match_one_row_at_a_time() {
        for (dim, rows) in [(37, 11), (288, 64), (8, 8), (7, 9), (768, 3)] {
            // Magnitudes from 1e-3 to 1e3, so that adding the squares in another order
            // changes the rounding of some sums.
            let x: Vec<f32> = (0..rows * dim)
                .map(|i| (i as f32 * 0.913).sin() * 10f32.powi((i * 5 % 7) as i32 - 3))
                .collect();
            let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 / dim as f32).collect();
            let mut got = vec![0.0; x.len()];
            rmsnorm_rows(&mut got, &x, &w);
            for (r, row) in x.chunks(dim).enumerate() {
                let mut want = vec![0.0; dim];
                rmsnorm(&mut want, row, &w);
                assert_eq!(
                    &got[r * dim..(r + 1) * dim],
                    &want[..],
                    "dim {dim}, row {r}"
                );
            }
        }
    }
}
