//! Multi-head attention of queries over the rows of a key/value window.
//!
//! The portable code below defines the arithmetic: a score is `dot(q, k) * scale` with the
//! eight-lane sums of `kernels::dot_f32`, each head's scores go through `softmax`, and each
//! output starts at zero and adds `weight * value` row after row. The x86 kernels in
//! `attention_x86` follow the same steps and return the same bits.

use std::ops::Range;

use super::fork;
use super::ops::{dot, softmax};
use crate::config::Config;

#[cfg(target_arch = "x86_64")]
use super::attention_x86 as x86;

/// Queries per tile of [`attention_tile`]: a tile reads each key and value row once for all
/// its queries while the row is in the first-level cache.
pub(super) const TILE: usize = 4;

/// Computes attention heads `heads` of one query `q` (dim) over window rows `0..=row`, written to
/// `out` (`heads.len() * head_size`, the heads' part of the output). `scores` must have at
/// least `heads.len() * (row + 1)` values of scratch. Heads are independent, so any split of
/// them gives the bits of all heads at once.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    row: usize,
    c: &Config,
    heads: Range<usize>,
    out: &mut [f32],
    scores: &mut [f32],
) {
    assert!(heads.end <= c.n_heads);
    assert!(out.len() >= heads.len() * c.head_size());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked above).
        return unsafe { attention_avx2(q, keys, values, row, c, heads, out, scores) };
    }
    attention_body(q, keys, values, row, c, heads, out, scores)
}

/// Runs [`attention`] for all heads in `parts` runs of consecutive heads, in parallel. Each
/// run writes its heads' part of `out` and of `scores`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_parts(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    row: usize,
    c: &Config,
    parts: usize,
    out: &mut [f32],
    scores: &mut [f32],
) {
    let (n, head_size) = (row + 1, c.head_size());
    let per_part = c.n_heads.div_ceil(parts.clamp(1, c.n_heads));
    let (out, scores) = (&mut out[..c.dim], &mut scores[..c.n_heads * n]);
    fork::for_each_chunk_pair(
        out,
        per_part * head_size,
        scores,
        per_part * n,
        &|i, out, scores| {
            let heads = i * per_part..((i + 1) * per_part).min(c.n_heads);
            attention(q, keys, values, row, c, heads, out, scores);
        },
    );
}

/// Attention of `TILE` consecutive queries, query `j` (`queries[j * dim..]`) at window row
/// `row + j`, so that it attends to rows `0..=row + j`. Query `j` writes `out[j * dim..]` and uses
/// `scores[j * scores_stride..]`, which must hold `n_heads * (row + j + 1)` values. The
/// results are those of [`attention`] for each query.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_tile(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    row: usize,
    c: &Config,
    out: &mut [f32],
    scores: &mut [f32],
    scores_stride: usize,
) {
    let dim = c.dim;
    assert!(queries.len() >= TILE * dim);
    assert!(out.len() >= TILE * dim);
    assert!(scores.len() >= (TILE - 1) * scores_stride + c.n_heads * (row + TILE));
    #[cfg(target_arch = "x86_64")]
    if x86::tile_supported(c) {
        assert!(keys.len() >= (row + TILE) * c.kv_dim());
        assert!(values.len() >= (row + TILE) * c.kv_dim());
        // SAFETY: the CPU features were checked and the slices contain what the tile reads.
        return unsafe {
            x86::attention_tile(queries, keys, values, row, c, out, scores, scores_stride)
        };
    }
    for j in 0..TILE {
        attention(
            &queries[j * dim..(j + 1) * dim],
            keys,
            values,
            row + j,
            c,
            0..c.n_heads,
            &mut out[j * dim..(j + 1) * dim],
            &mut scores[j * scores_stride..],
        );
    }
}

/// Runs the same code compiled for AVX2, which vectorizes the dot products and the weighted sums
/// eight floats wide. Without FMA and with the same lane order it returns the same bits.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn attention_avx2(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    row: usize,
    c: &Config,
    heads: Range<usize>,
    out: &mut [f32],
    scores: &mut [f32],
) {
    attention_body(q, keys, values, row, c, heads, out, scores)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attention_body(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    row: usize,
    c: &Config,
    heads: Range<usize>,
    out: &mut [f32],
    scores: &mut [f32],
) {
    let n = row + 1;
    // One row of scores per head; the window is walked front to back, each key and value
    // row read once for all heads.
    let scores = &mut scores[..heads.len() * n];
    fill_scores(q, keys, 0, n, c, heads.clone(), scores);
    for head_scores in scores.chunks_exact_mut(n) {
        softmax(head_scores);
    }
    #[cfg(target_arch = "x86_64")]
    if x86::weighted_values(out, scores, n, values, c, heads.clone()) {
        return;
    }
    weighted_values(out, scores, n, values, c, heads);
}

/// Fills the scores of rows `from..n` of heads `heads`: `scores[(h - heads.start) * n + t]`.
#[inline(always)]
pub(super) fn fill_scores(
    q: &[f32],
    keys: &[f32],
    from: usize,
    n: usize,
    c: &Config,
    heads: Range<usize>,
    scores: &mut [f32],
) {
    let (head_size, kv_dim, kv_mul) = (c.head_size(), c.kv_dim(), c.kv_mul());
    let scale = 1.0 / (head_size as f32).sqrt();
    // Only the x86-64 block below advances `t` before the row loop.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut t = from;
    #[cfg(target_arch = "x86_64")]
    if head_size % 8 == 0 && std::arch::is_x86_feature_detected!("avx2") {
        while t + 8 <= n {
            for (i, h) in heads.clone().enumerate() {
                let q = &q[h * head_size..(h + 1) * head_size];
                let k = &keys[t * kv_dim + (h / kv_mul) * head_size..(t + 7) * kv_dim + kv_dim];
                let out = &mut scores[i * n + t..i * n + t + 8];
                // SAFETY: AVX2 was detected; `k` covers the head's slice of rows t..t + 8.
                unsafe { x86::scores8(q, k, kv_dim, scale, out) };
            }
            t += 8;
        }
    }
    for (t, k_row) in keys[..n * kv_dim].chunks_exact(kv_dim).enumerate().skip(t) {
        for (i, h) in heads.clone().enumerate() {
            let k = &k_row[(h / kv_mul) * head_size..][..head_size];
            scores[i * n + t] = dot(&q[h * head_size..(h + 1) * head_size], k) * scale;
        }
    }
}

/// Sets `out` to the score-weighted sums of value rows `0..n` of heads `heads`, each output
/// adding its rows in window order.
#[inline(always)]
fn weighted_values(
    out: &mut [f32],
    scores: &[f32],
    n: usize,
    values: &[f32],
    c: &Config,
    heads: Range<usize>,
) {
    let (head_size, kv_dim, kv_mul) = (c.head_size(), c.kv_dim(), c.kv_mul());
    out[..heads.len() * head_size].fill(0.0);
    // Only the x86-64 block below advances `t` before the row loop.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    if head_size % 8 == 0 && std::arch::is_x86_feature_detected!("avx2") {
        while t + 8 <= n {
            for (i, h) in heads.clone().enumerate() {
                let weights = &scores[i * n + t..i * n + t + 8];
                let v = &values[t * kv_dim + (h / kv_mul) * head_size..(t + 7) * kv_dim + kv_dim];
                let out = &mut out[i * head_size..(i + 1) * head_size];
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
        for (i, h) in heads.clone().enumerate() {
            let weight = scores[i * n + t];
            let v = &v_row[(h / kv_mul) * head_size..][..head_size];
            for (o, &vi) in out[i * head_size..(i + 1) * head_size].iter_mut().zip(v) {
                *o += weight * vi;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heads split into parts give the bits of all heads at once, GQA groups split included.
    #[test]
    fn head_parts_match_all_heads() {
        let value = |i: usize| ((i * 6037 % 1000) as f32 / 250.0 - 2.0).powi(3);
        for (head_size, n_heads, n_kv_heads) in [(64, 12, 12), (48, 6, 2), (24, 5, 5)] {
            let c = Config::attention_only(head_size, n_heads, n_kv_heads, 64);
            let keys: Vec<f32> = (0..c.seq_len * c.kv_dim()).map(|i| value(i + 1)).collect();
            let values: Vec<f32> = (0..c.seq_len * c.kv_dim()).map(|i| value(i + 2)).collect();
            let q: Vec<f32> = (0..c.dim).map(|i| value(i + 3)).collect();
            for row in [0, 9, 63] {
                let mut scores = vec![0.0; n_heads * c.seq_len];
                let mut want = vec![0.0; c.dim];
                let all = 0..n_heads;
                attention(&q, &keys, &values, row, &c, all, &mut want, &mut scores);
                for parts in [2, 3, n_heads, n_heads + 1] {
                    let mut got = vec![f32::NAN; c.dim];
                    attention_parts(&q, &keys, &values, row, &c, parts, &mut got, &mut scores);
                    assert_eq!(got, want, "head size {head_size}, row {row}, {parts} parts");
                }
            }
        }
    }

    /// A tile gives each query the bits of its own attention, for head sizes the tile kernels
    /// take and one they leave to the fallback, at rows inside and across 8-row blocks.
    #[test]
    fn tiles_match_one_query_at_a_time() {
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 300.0 - 1.6).powi(3);
        for (head_size, n_heads, n_kv_heads) in [(48, 6, 6), (64, 4, 2), (128, 2, 2), (24, 3, 3)] {
            let c = Config::attention_only(head_size, n_heads, n_kv_heads, 64);
            let (dim, rows) = (c.dim, c.seq_len);
            let keys: Vec<f32> = (0..rows * c.kv_dim()).map(|i| value(i + 1)).collect();
            let values: Vec<f32> = (0..rows * c.kv_dim()).map(|i| value(i + 2)).collect();
            let queries: Vec<f32> = (0..TILE * dim).map(|i| value(i + 3)).collect();
            let stride = n_heads * rows;
            for row in [0, 5, 7, 8, 21, rows - TILE] {
                let mut got = vec![f32::NAN; TILE * dim];
                let mut scores = vec![0.0; TILE * stride];
                attention_tile(
                    &queries,
                    &keys,
                    &values,
                    row,
                    &c,
                    &mut got,
                    &mut scores,
                    stride,
                );
                for j in 0..TILE {
                    let mut want = vec![0.0; dim];
                    let q = &queries[j * dim..(j + 1) * dim];
                    let all = 0..n_heads;
                    attention(q, &keys, &values, row + j, &c, all, &mut want, &mut scores);
                    assert_eq!(
                        &got[j * dim..(j + 1) * dim],
                        &want[..],
                        "head size {head_size}, row {row} + {j}"
                    );
                }
            }
        }
    }
}
