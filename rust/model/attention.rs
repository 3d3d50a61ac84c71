//! Multi-head attention of one query over the rows of a key/value window.

use super::ops::{dot, softmax};
use crate::config::Config;

/// Multi-head attention of one query over window rows `0..=row`, written to `out` (dim).
/// `scores` must have at least `n_heads * (row + 1)` values of scratch.
pub(super) fn attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    row: usize,
    c: &Config,
    out: &mut [f32],
    scores: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked above).
        return unsafe { attention_avx2(q, keys, values, row, c, out, scores) };
    }
    attention_body(q, keys, values, row, c, out, scores)
}

/// Runs the same code compiled for AVX2, which vectorizes the dot products and the weighted sums
/// eight floats wide. Without FMA and with the same lane order it returns the same bits.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attention_avx2(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    row: usize,
    c: &Config,
    out: &mut [f32],
    scores: &mut [f32],
) {
    attention_body(q, keys, values, row, c, out, scores)
}

#[inline(always)]
fn attention_body(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    row: usize,
    c: &Config,
    out: &mut [f32],
    scores: &mut [f32],
) {
    let (head_size, kv_dim, kv_mul) = (c.head_size(), c.kv_dim(), c.kv_mul());
    let scale = 1.0 / (head_size as f32).sqrt();
    let n = row + 1;
    // One row of scores per head; the window is walked front to back, each key and value
    // row read once for all heads.
    let scores = &mut scores[..c.n_heads * n];
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    if head_size % 8 == 0 && std::arch::is_x86_feature_detected!("avx2") {
        while t + 8 <= n {
            for h in 0..c.n_heads {
                let q = &q[h * head_size..(h + 1) * head_size];
                let k = &keys[t * kv_dim + (h / kv_mul) * head_size..(t + 7) * kv_dim + kv_dim];
                // SAFETY: AVX2 was detected; `k` covers the head's slice of rows t..t + 8.
                unsafe { x86::scores8(q, k, kv_dim, scale, &mut scores[h * n + t..h * n + t + 8]) };
            }
            t += 8;
        }
    }
    for (t, k_row) in keys[..n * kv_dim].chunks_exact(kv_dim).enumerate().skip(t) {
        for h in 0..c.n_heads {
            let k = &k_row[(h / kv_mul) * head_size..][..head_size];
            scores[h * n + t] = dot(&q[h * head_size..(h + 1) * head_size], k) * scale;
        }
    }
    for head_scores in scores.chunks_exact_mut(n) {
        softmax(head_scores);
    }
    // Each output adds its weighted values in window order.
    out.fill(0.0);
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    if head_size % 8 == 0 && std::arch::is_x86_feature_detected!("avx2") {
        while t + 8 <= n {
            for h in 0..c.n_heads {
                let weights = &scores[h * n + t..h * n + t + 8];
                let v = &values[t * kv_dim + (h / kv_mul) * head_size..(t + 7) * kv_dim + kv_dim];
                let out = &mut out[h * head_size..(h + 1) * head_size];
                // SAFETY: AVX2 was detected; `v` covers the head's slice of rows t..t + 8.
                unsafe { x86::add_values8(out, weights, v, kv_dim) };
            }
            t += 8;
        }
    }
    for (t, v_row) in values[..n * kv_dim]
        .chunks_exact(kv_dim)
        .enumerate()
        .skip(t)
    {
        for h in 0..c.n_heads {
            let weight = scores[h * n + t];
            let v = &v_row[(h / kv_mul) * head_size..][..head_size];
            for (o, &vi) in out[h * head_size..(h + 1) * head_size].iter_mut().zip(v) {
                *o += weight * vi;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Computes `out[j] = dot(q, k row j) * scale` for 8 rows `stride` floats apart, with the sums
    /// of `kernels::dot_f32`: lane i of each row's sum takes the products at offsets
    /// i mod 8 in order, and the lanes are added in `sum_lanes` order. Eight rows at once
    /// let one transpose replace eight horizontal sums.
    ///
    /// # Safety
    /// The CPU must support AVX2; `q.len()` must be a multiple of 8 and `k` must hold
    /// `7 * stride + q.len()` floats.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scores8(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
        debug_assert!(
            q.len().is_multiple_of(8) && k.len() >= 7 * stride + q.len() && out.len() == 8
        );
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..q.len()).step_by(8) {
            // SAFETY: c + 8 <= q.len(), and row j's slice ends inside k (caller's guarantee).
            unsafe {
                let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                for (j, a) in acc.iter_mut().enumerate() {
                    let kv = _mm256_loadu_ps(k.as_ptr().add(j * stride + c));
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(qv, kv));
                }
            }
        }

        // Per row, a = (l0 + l4, l1 + l5, l2 + l6, l3 + l7), then (a0 + a2) + (a1 + a3).
        let halves = |x: __m256, y: __m256| {
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(x, y),
                _mm256_permute2f128_ps::<0x31>(x, y),
            )
        };
        let (a01, a23) = (halves(acc[0], acc[1]), halves(acc[2], acc[3]));
        let (a45, a67) = (halves(acc[4], acc[5]), halves(acc[6], acc[7]));
        // Within each 128-bit lane: (a0 + a2, a1 + a3) of two rows.
        let pair = |x: __m256, y: __m256| {
            _mm256_add_ps(
                _mm256_shuffle_ps::<0b01_00_01_00>(x, y),
                _mm256_shuffle_ps::<0b11_10_11_10>(x, y),
            )
        };
        // Rows in lanes: 0, 2, 4, 6 | 1, 3, 5, 7.
        let sums = _mm256_hadd_ps(pair(a01, a23), pair(a45, a67));
        let ordered = _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: out has 8 floats.
        unsafe {
            _mm256_storeu_ps(
                out.as_mut_ptr(),
                _mm256_mul_ps(ordered, _mm256_set1_ps(scale)),
            )
        };
    }

    /// Adds `weights[j] * v row j` to `out` for 8 rows `stride` floats apart, in row order, each
    /// output kept in a register across the rows.
    ///
    /// # Safety
    /// The CPU must support AVX2; `out.len()` must be a multiple of 8 and `v` must hold
    /// `7 * stride + out.len()` floats.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn add_values8(out: &mut [f32], weights: &[f32], v: &[f32], stride: usize) {
        debug_assert!(out.len().is_multiple_of(8) && v.len() >= 7 * stride + out.len());
        let w: [__m256; 8] = std::array::from_fn(|j| _mm256_set1_ps(weights[j]));
        for c in (0..out.len()).step_by(8) {
            // SAFETY: c + 8 <= out.len(), and row j's slice ends inside v (caller's guarantee).
            unsafe {
                let mut o = _mm256_loadu_ps(out.as_ptr().add(c));
                for (j, wj) in w.iter().enumerate() {
                    let vj = _mm256_loadu_ps(v.as_ptr().add(j * stride + c));
                    o = _mm256_add_ps(o, _mm256_mul_ps(*wj, vj));
                }
                _mm256_storeu_ps(out.as_mut_ptr().add(c), o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn eight_row_blocks_match_row_loops() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let (head_size, stride) = (48, 80);
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 300.0 - 1.6).powi(3);
        let q: Vec<f32> = (0..head_size).map(value).collect();
        let k: Vec<f32> = (0..8 * stride).map(|i| value(i + 17)).collect();
        let mut out = [0.0f32; 8];
        // SAFETY: AVX2 was detected; k has 8 rows of `stride` floats.
        unsafe { super::x86::scores8(&q, &k, stride, 0.3, &mut out) };
        for (j, got) in out.iter().enumerate() {
            let want = super::dot(&q, &k[j * stride..j * stride + head_size]) * 0.3;
            assert_eq!(got.to_bits(), want.to_bits(), "row {j}: {got} vs {want}");
        }

        let weights: Vec<f32> = (0..8).map(|j| value(j + 3)).collect();
        let mut got: Vec<f32> = (0..head_size).map(|i| value(i + 5)).collect();
        let mut want = got.clone();
        // SAFETY: as above.
        unsafe { super::x86::add_values8(&mut got, &weights, &k, stride) };
        for (j, &w) in weights.iter().enumerate() {
            for (o, &v) in want.iter_mut().zip(&k[j * stride..j * stride + head_size]) {
                *o += w * v;
            }
        }
        assert_eq!(got, want);
    }
}
