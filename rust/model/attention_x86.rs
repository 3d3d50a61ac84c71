//! x86 kernels of the attention, each giving the bits of the portable loops in `attention`.

use std::arch::x86_64::*;
use std::ops::Range;

use super::attention::{fill_scores, TILE};
use super::ops::softmax;
use crate::config::Config;

/// Computes `out[j] = dot(q, k row j) * scale` for 8 rows `stride` floats apart, with the sums
/// of `kernels::dot_f32`: lane i of each row's sum takes the products at offsets i mod 8 in
/// order, and the lanes are added in `sum_lanes` order. Eight rows at once let one transpose
/// replace eight horizontal sums.
///
/// # Safety
/// The CPU must support AVX2; `q.len()` must be a multiple of 8 and `k` must hold
/// `7 * stride + q.len()` floats.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn scores8(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    debug_assert!(q.len().is_multiple_of(8) && k.len() >= 7 * stride + q.len() && out.len() == 8);
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
    // SAFETY: out has 8 floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), reduce8(acc, scale)) };
}

/// As [`scores8`] for two queries against the same 8 rows, each key load serving both.
///
/// # Safety
/// The CPU must support AVX2, AVX-512 F and VL (for the 32 registers); as for [`scores8`]
/// with `qa.len() == qb.len()`.
#[target_feature(enable = "avx2,avx512f,avx512vl")]
unsafe fn scores8x2(
    qa: &[f32],
    qb: &[f32],
    k: &[f32],
    stride: usize,
    scale: f32,
    out_a: &mut [f32],
    out_b: &mut [f32],
) {
    debug_assert!(qa.len() == qb.len() && k.len() >= 7 * stride + qa.len());
    debug_assert!(out_a.len() == 8 && out_b.len() == 8);
    let (mut a, mut b) = ([_mm256_setzero_ps(); 8], [_mm256_setzero_ps(); 8]);
    for c in (0..qa.len()).step_by(8) {
        // SAFETY: as in `scores8`.
        unsafe {
            let (qav, qbv) = (
                _mm256_loadu_ps(qa.as_ptr().add(c)),
                _mm256_loadu_ps(qb.as_ptr().add(c)),
            );
            for j in 0..8 {
                let kv = _mm256_loadu_ps(k.as_ptr().add(j * stride + c));
                a[j] = _mm256_add_ps(a[j], _mm256_mul_ps(qav, kv));
                b[j] = _mm256_add_ps(b[j], _mm256_mul_ps(qbv, kv));
            }
        }
    }
    // SAFETY: both outputs have 8 floats.
    unsafe {
        _mm256_storeu_ps(out_a.as_mut_ptr(), reduce8(a, scale));
        _mm256_storeu_ps(out_b.as_mut_ptr(), reduce8(b, scale));
    }
}

/// Sums the eight lanes of each of 8 rows' accumulators in `sum_lanes` order and scales them:
/// per row, a = (l0 + l4, l1 + l5, l2 + l6, l3 + l7), then (a0 + a2) + (a1 + a3).
#[inline(always)]
fn reduce8(acc: [__m256; 8], scale: f32) -> __m256 {
    // SAFETY (whole body): register-only AVX intrinsics, called from AVX2 functions.
    unsafe {
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
        _mm256_mul_ps(ordered, _mm256_set1_ps(scale))
    }
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

/// Registers per head in the AVX-512 value sums, when the head size is one they support.
fn zmm_per_head(c: &Config) -> Option<usize> {
    match c.head_size() {
        16 | 32 | 48 | 64 | 128 => Some(c.head_size() / 16),
        _ => None,
    }
}

/// Sets `out` to the score-weighted sums of value rows `0..n` of heads `heads` with AVX-512
/// when the CPU has it and the head size suits it, returning whether it did. `out` and
/// `scores` hold those heads only. The sums stay in registers for the whole window instead of
/// being reloaded every eight rows, which made the row loops wait on the add latency.
pub(super) fn weighted_values(
    out: &mut [f32],
    scores: &[f32],
    n: usize,
    values: &[f32],
    c: &Config,
    heads: Range<usize>,
) -> bool {
    if !std::arch::is_x86_feature_detected!("avx512f") {
        return false;
    }
    let Some(z) = zmm_per_head(c) else {
        return false;
    };
    let count = heads.len();
    assert!(heads.end <= c.n_heads);
    assert!(out.len() >= count * c.head_size());
    assert!(scores.len() >= count * n);
    assert!(values.len() >= n * c.kv_dim());
    let query = Query {
        out: out.as_mut_ptr(),
        scores: scores.as_ptr(),
        n,
    };
    // Several heads per pass over the rows, because each row's slice of them is contiguous
    // and each row's adds then have many independent sums to go to. Eight-register heads
    // take two per pass, the others six.
    let wide = if z == 8 { 2 } else { 6 };
    let mut i = 0;
    while i < count {
        let p = if count - i >= wide { wide } else { 1 };
        let block = Heads {
            first: i,
            window: heads.start + i,
        };
        // SAFETY: AVX-512 F was detected, heads i..i + p exist, and the slices hold what
        // `value_block` reads and writes (asserted above).
        unsafe {
            match (z, p) {
                (1, 6) => value_block::<1, 1, 6>([query], values, c, block),
                (2, 6) => value_block::<2, 1, 6>([query], values, c, block),
                (3, 6) => value_block::<3, 1, 6>([query], values, c, block),
                (4, 6) => value_block::<4, 1, 6>([query], values, c, block),
                (8, 2) => value_block::<8, 1, 2>([query], values, c, block),
                (1, _) => value_block::<1, 1, 1>([query], values, c, block),
                (2, _) => value_block::<2, 1, 1>([query], values, c, block),
                (3, _) => value_block::<3, 1, 1>([query], values, c, block),
                (4, _) => value_block::<4, 1, 1>([query], values, c, block),
                _ => value_block::<8, 1, 1>([query], values, c, block),
            }
        }
        i += p;
    }
    true
}

/// The first head of a value block: its index in the queries' outputs and scores, and the
/// head of the model it is, which picks the value columns.
#[derive(Clone, Copy)]
struct Heads {
    first: usize,
    window: usize,
}

/// One query of a value block: its output row, its scores (`n_heads` rows of `n`) and its
/// number of window rows `n`.
#[derive(Clone, Copy)]
struct Query {
    out: *mut f32,
    scores: *const f32,
    n: usize,
}

/// Writes `P` heads of the weighted value sums of `Q` queries, `Z` registers per head. The
/// block's first head is model head `heads.window` and sits at `heads.first` in the queries'
/// outputs and scores. Rows up to the smallest `n` are loaded once for all queries. Each
/// query then adds its own remaining rows, so every output still adds its rows in window
/// order.
///
/// # Safety
/// The CPU must support AVX-512 F. The head size must be `16 * Z`, and `heads.window + P <=
/// n_heads`. Each query's `out` must hold `(heads.first + P) * head_size` floats and its
/// `scores` `(heads.first + P) * n`. `values` must hold `n * kv_dim` floats for the largest
/// `n`.
// Index loops over the register tile read more plainly than iterator chains here.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
unsafe fn value_block<const Z: usize, const Q: usize, const P: usize>(
    queries: [Query; Q],
    values: &[f32],
    c: &Config,
    heads: Heads,
) {
    let (head_size, kv_dim, kv_mul) = (c.head_size(), c.kv_dim(), c.kv_mul());
    debug_assert_eq!(head_size, 16 * Z);
    let first = heads.first;
    let shared = queries.iter().map(|q| q.n).min().unwrap_or(0);
    let mut acc = [[[_mm512_setzero_ps(); Z]; P]; Q];
    let rows: [*const f32; P] =
        std::array::from_fn(|p| values[((heads.window + p) / kv_mul) * head_size..].as_ptr());
    // SAFETY (whole body): t stays below each query's n, so weights are inside its scores and
    // the rows inside `values`. Outputs are inside each query's `(heads.first + P) *
    // head_size` floats.
    unsafe {
        let weight =
            |q: &Query, p: usize, t: usize| _mm512_set1_ps(*q.scores.add((first + p) * q.n + t));
        for t in 0..shared {
            let w: [[__m512; P]; Q] =
                std::array::from_fn(|j| std::array::from_fn(|p| weight(&queries[j], p, t)));
            for (p, row) in rows.iter().enumerate() {
                let row = row.add(t * kv_dim);
                for z in 0..Z {
                    let v = _mm512_loadu_ps(row.add(16 * z));
                    for j in 0..Q {
                        acc[j][p][z] = _mm512_add_ps(acc[j][p][z], _mm512_mul_ps(w[j][p], v));
                    }
                }
            }
        }
        for (j, q) in queries.iter().enumerate() {
            for t in shared..q.n {
                for (p, row) in rows.iter().enumerate() {
                    let (w, row) = (weight(q, p, t), row.add(t * kv_dim));
                    for z in 0..Z {
                        let v = _mm512_loadu_ps(row.add(16 * z));
                        acc[j][p][z] = _mm512_add_ps(acc[j][p][z], _mm512_mul_ps(w, v));
                    }
                }
            }
            for p in 0..P {
                let out = q.out.add((first + p) * head_size);
                for z in 0..Z {
                    _mm512_storeu_ps(out.add(16 * z), acc[j][p][z]);
                }
            }
        }
    }
}

const _: () = assert!(
    TILE.is_multiple_of(2),
    "score blocks go two queries at a time"
);

/// Returns whether [`attention_tile`] runs on this CPU and head size.
pub(super) fn tile_supported(c: &Config) -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && zmm_per_head(c).is_some()
}

/// `super::attention_tile` on x86: the score blocks every query needs are computed two queries
/// per key load, each query's remaining rows and softmax as for one query, and the value sums
/// of all queries in one pass over the value rows.
///
/// # Safety
/// [`tile_supported`] must hold; the slices must be as `super::attention_tile` asserts.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,avx512f,avx512vl")]
pub(super) unsafe fn attention_tile(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    row: usize,
    c: &Config,
    out: &mut [f32],
    scores: &mut [f32],
    scores_stride: usize,
) {
    let (dim, head_size, kv_dim, kv_mul) = (c.dim, c.head_size(), c.kv_dim(), c.kv_mul());
    let scale = 1.0 / (head_size as f32).sqrt();
    let n: [usize; TILE] = std::array::from_fn(|j| row + j + 1);
    let q = |j: usize, h: usize| &queries[j * dim + h * head_size..j * dim + (h + 1) * head_size];
    let shared_blocks = n[0] / 8 * 8;
    for t in (0..shared_blocks).step_by(8) {
        for h in 0..c.n_heads {
            let k = &keys[t * kv_dim + (h / kv_mul) * head_size..(t + 7) * kv_dim + kv_dim];
            for j in (0..TILE).step_by(2) {
                let (a, b) = scores[j * scores_stride..].split_at_mut(scores_stride);
                let out_a = &mut a[h * n[j] + t..h * n[j] + t + 8];
                let out_b = &mut b[h * n[j + 1] + t..h * n[j + 1] + t + 8];
                // SAFETY: the CPU features hold; `k` covers the head's slice of rows t..t + 8.
                unsafe { scores8x2(q(j, h), q(j + 1, h), k, kv_dim, scale, out_a, out_b) };
            }
        }
    }
    for j in 0..TILE {
        let scores = &mut scores[j * scores_stride..j * scores_stride + c.n_heads * n[j]];
        fill_scores(
            &queries[j * dim..(j + 1) * dim],
            keys,
            shared_blocks,
            n[j],
            c,
            0..c.n_heads,
            scores,
        );
        for head_scores in scores.chunks_exact_mut(n[j]) {
            softmax(head_scores);
        }
    }

    let query = |j: usize| Query {
        out: out[j * dim..].as_mut_ptr(),
        scores: scores[j * scores_stride..].as_ptr(),
        n: n[j],
    };
    let tile: [Query; TILE] = std::array::from_fn(query);
    for h in 0..c.n_heads {
        let h = Heads {
            first: h,
            window: h,
        };
        // SAFETY: the CPU features hold, the head size is 16 * Z, and every query's output,
        // scores and rows are inside the slices (the caller's guarantee).
        unsafe {
            match head_size / 16 {
                1 => value_block::<1, TILE, 1>(tile, values, c, h),
                2 => value_block::<2, TILE, 1>(tile, values, c, h),
                3 => value_block::<3, TILE, 1>(tile, values, c, h),
                4 => value_block::<4, TILE, 1>(tile, values, c, h),
                _ => {
                    // Eight registers per head: two queries at a time keep the sums in registers.
                    value_block::<8, 2, 1>([tile[0], tile[1]], values, c, h);
                    value_block::<8, 2, 1>([tile[2], tile[3]], values, c, h);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dot_f32 as dot;

    fn value(i: usize) -> f32 {
        ((i * 7919 % 1000) as f32 / 300.0 - 1.6).powi(3)
    }

    #[test]
    fn eight_row_blocks_match_row_loops() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let (head_size, stride) = (48, 80);
        let q: Vec<f32> = (0..head_size).map(value).collect();
        let k: Vec<f32> = (0..8 * stride).map(|i| value(i + 17)).collect();
        let mut out = [0.0f32; 8];
        // SAFETY: AVX2 was detected; k has 8 rows of `stride` floats.
        unsafe { scores8(&q, &k, stride, 0.3, &mut out) };
        for (j, got) in out.iter().enumerate() {
            let want = dot(&q, &k[j * stride..j * stride + head_size]) * 0.3;
            assert_eq!(got.to_bits(), want.to_bits(), "row {j}: {got} vs {want}");
        }
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            let qb: Vec<f32> = (0..head_size).map(|i| value(i + 5)).collect();
            let (mut a, mut b) = ([0.0f32; 8], [0.0f32; 8]);
            // SAFETY: the features were detected; as above.
            unsafe { scores8x2(&q, &qb, &k, stride, 0.3, &mut a, &mut b) };
            assert_eq!(a, out);
            for (j, got) in b.iter().enumerate() {
                let want = dot(&qb, &k[j * stride..j * stride + head_size]) * 0.3;
                assert_eq!(got.to_bits(), want.to_bits(), "second query, row {j}");
            }
        }

        let weights: Vec<f32> = (0..8).map(|j| value(j + 3)).collect();
        let mut got: Vec<f32> = (0..head_size).map(|i| value(i + 5)).collect();
        let mut want = got.clone();
        // SAFETY: AVX2 was detected; k has 8 rows of `stride` floats.
        unsafe { add_values8(&mut got, &weights, &k, stride) };
        for (j, &w) in weights.iter().enumerate() {
            for (o, &v) in want.iter_mut().zip(&k[j * stride..j * stride + head_size]) {
                *o += w * v;
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn avx512_value_sums_match_row_loops() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        // (head size, query heads, key/value heads): passes of six heads and of two, single
        // heads left over, and GQA.
        for (head_size, n_heads, n_kv_heads) in [
            (16, 3, 3),
            (32, 8, 4),
            (48, 6, 6),
            (64, 5, 5),
            (64, 13, 13),
            (128, 3, 1),
        ] {
            let c = Config::attention_only(head_size, n_heads, n_kv_heads, 64);
            for n in [1, 7, 37] {
                let scores: Vec<f32> = (0..n_heads * n).map(|i| value(i + 3).abs()).collect();
                let values: Vec<f32> = (0..n * c.kv_dim()).map(|i| value(i + 11)).collect();
                let mut want = vec![0.0f32; c.dim];
                for t in 0..n {
                    for h in 0..n_heads {
                        let v =
                            &values[t * c.kv_dim() + (h / c.kv_mul()) * head_size..][..head_size];
                        for (o, &vi) in want[h * head_size..][..head_size].iter_mut().zip(v) {
                            *o += scores[h * n + t] * vi;
                        }
                    }
                }
                // All heads at once, and in two parts that split GQA groups and passes.
                for split in [0, 1, n_heads / 2] {
                    let mut got = vec![f32::NAN; c.dim];
                    let (low, high) = got.split_at_mut(split * head_size);
                    let (low_scores, high_scores) = scores.split_at(split * n);
                    assert!(weighted_values(low, low_scores, n, &values, &c, 0..split));
                    let rest = split..n_heads;
                    assert!(weighted_values(high, high_scores, n, &values, &c, rest));
                    assert_eq!(got, want, "head size {head_size}, {n} rows, split {split}");
                }
            }
        }
    }
}
