//! Row-wise steps of a batch (norms, the SwiGLU gate, activation quantization), split across
//! the model's threads in blocks of rows. Each row's arithmetic is that of the single-row
//! functions, so the split does not change any result.

use super::ops::{rmsnorm_rows, swiglu};
use super::Transformer;
use crate::kernels::QuantizedVec;

/// Rows per task: enough that a hand-off costs little next to the work, and a multiple of the
/// eight rows that `rmsnorm_rows` sums side by side.
const BLOCK: usize = 16;

impl Transformer {
    /// `out` = rmsnorm of each row of `x` with weights `w`, quantized into `xq` (one per row).
    pub(super) fn norm_rows(&self, out: &mut [f32], x: &[f32], w: &[f32], xq: &mut [QuantizedVec]) {
        let dim = w.len();
        self.for_each_chunk_pair((out, BLOCK * dim), (xq, BLOCK), &|i, out, xq| {
            let first = i * BLOCK * dim;
            rmsnorm_rows(out, &x[first..first + out.len()], w);
            for (row, q) in out.chunks_exact(dim).zip(xq) {
                self.prepare(row, q);
            }
        });
    }

    /// `a = silu(a) * b` for each row of width `width`, each quantized into `aq`.
    pub(super) fn gate_rows(
        &self,
        a: &mut [f32],
        b: &[f32],
        width: usize,
        aq: &mut [QuantizedVec],
    ) {
        self.for_each_chunk_pair((a, BLOCK * width), (aq, BLOCK), &|i, a, aq| {
            let b = &b[i * BLOCK * width..];
            for ((a, b), q) in a.chunks_exact_mut(width).zip(b.chunks_exact(width)).zip(aq) {
                swiglu(a, b);
                self.prepare(a, q);
            }
        });
    }

    /// Quantizes each row of `x` (width `width`) into `xq`.
    pub(super) fn quantize_rows(&self, x: &[f32], width: usize, xq: &mut [QuantizedVec]) {
        self.for_each_chunk(xq, BLOCK, &|i, xq| {
            let x = &x[i * BLOCK * width..];
            for (row, q) in x.chunks_exact(width).zip(xq) {
                self.prepare(row, q);
            }
        });
    }
}
