//! Row-wise steps of a batch (norms, the SwiGLU gate, activation quantization), split across
//! the model's threads in blocks of rows. Each row's arithmetic is that of the single-row
//! functions, so the split does not change any result.

use rayon::prelude::*;

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
        let block = |((out, x), xq): ((&mut [f32], &[f32]), &mut [QuantizedVec])| {
            rmsnorm_rows(out, x, w);
            for (row, q) in out.chunks_exact(dim).zip(xq) {
                self.prepare(row, q);
            }
        };
        if self.parallel() {
            out.par_chunks_mut(BLOCK * dim)
                .zip(x.par_chunks(BLOCK * dim))
                .zip(xq.par_chunks_mut(BLOCK))
                .for_each(block);
        } else {
            block(((out, x), xq));
        }
    }

    /// `a = silu(a) * b` for each row of width `width`, each quantized into `aq`.
    pub(super) fn gate_rows(
        &self,
        a: &mut [f32],
        b: &[f32],
        width: usize,
        aq: &mut [QuantizedVec],
    ) {
        let block = |((a, b), aq): ((&mut [f32], &[f32]), &mut [QuantizedVec])| {
            for ((a, b), q) in a.chunks_exact_mut(width).zip(b.chunks_exact(width)).zip(aq) {
                swiglu(a, b);
                self.prepare(a, q);
            }
        };
        if self.parallel() {
            a.par_chunks_mut(BLOCK * width)
                .zip(b.par_chunks(BLOCK * width))
                .zip(aq.par_chunks_mut(BLOCK))
                .for_each(block);
        } else {
            block(((a, b), aq));
        }
    }

    /// Quantizes each row of `x` (width `width`) into `xq`.
    pub(super) fn quantize_rows(&self, x: &[f32], width: usize, xq: &mut [QuantizedVec]) {
        let block = |(x, xq): (&[f32], &mut [QuantizedVec])| {
            for (row, q) in x.chunks_exact(width).zip(xq) {
                self.prepare(row, q);
            }
        };
        if self.parallel() {
            x.par_chunks(BLOCK * width)
                .zip(xq.par_chunks_mut(BLOCK))
                .for_each(block);
        } else {
            block((x, xq));
        }
    }
}
