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
    for (t, k_row) in keys[..n * kv_dim].chunks_exact(kv_dim).enumerate() {
        for h in 0..c.n_heads {
            let k = &k_row[(h / kv_mul) * head_size..][..head_size];
            scores[h * n + t] = dot(&q[h * head_size..(h + 1) * head_size], k) * scale;
        }
    }
    for head_scores in scores.chunks_exact_mut(n) {
        softmax(head_scores);
    }
    out.fill(0.0);
    for (t, v_row) in values[..n * kv_dim].chunks_exact(kv_dim).enumerate() {
        for h in 0..c.n_heads {
            let weight = scores[h * n + t];
            let v = &v_row[(h / kv_mul) * head_size..][..head_size];
            for (o, &vi) in out[h * head_size..(h + 1) * head_size].iter_mut().zip(v) {
                *o += weight * vi;
            }
        }
    }
}
