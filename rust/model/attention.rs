//! Multi-head attention of one query over the rows of a key/value window.

use super::ops::{dot, softmax};
use crate::config::Config;

/// Multi-head attention of one query over window rows `0..=row`, written to `out` (dim).
/// `scores` must have at least `row + 1` values of scratch.
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
    let (head_size, kv_dim) = (c.head_size(), c.kv_dim());
    let scale = 1.0 / (head_size as f32).sqrt();
    for h in 0..c.n_heads {
        let q = &q[h * head_size..(h + 1) * head_size];
        let kv_offset = (h / c.kv_mul()) * head_size;
        let scores = &mut scores[..=row];
        for (t, score) in scores.iter_mut().enumerate() {
            let k = t * kv_dim + kv_offset;
            *score = dot(q, &keys[k..k + head_size]) * scale;
        }
        softmax(scores);
        let out = &mut out[h * head_size..(h + 1) * head_size];
        out.fill(0.0);
        for (t, &weight) in scores.iter().enumerate() {
            let v = t * kv_dim + kv_offset;
            for (o, &vi) in out.iter_mut().zip(&values[v..v + head_size]) {
                *o += weight * vi;
            }
        }
    }
}
