//! Matrix products of the forward pass, split across the model's threads.

use super::{fork, Transformer};
use crate::kernels::{self, PackedQ8, QuantizedVec, PANEL};
use crate::weights::{Matrix, MatrixData};

/// Matrices smaller than this many weights run on one thread: at dim 288 a hand-off to another
/// core costs about as much as the product itself.
const PARALLEL_MIN_WEIGHTS: usize = 64 * 1024;
/// Tasks per thread, so that a thread slowed by another process sheds work to the others
/// instead of holding everyone back at the end of each product.
const TASKS_PER_THREAD: usize = 4;
const MIN_ROWS_PER_TASK: usize = 16;
/// Rows of W kept hot in cache while every input of a batch passes over them.
const ROW_BLOCK: usize = 32;

impl Transformer {
    /// Quantizes `x` into `xq` when the weights are Q8_0 (a no-op for fp32 checkpoints).
    pub(super) fn prepare(&self, x: &[f32], xq: &mut QuantizedVec) {
        if self.weights.format.is_quantized() {
            self.kernel.quantize(xq, x);
        }
    }

    /// `out = W x`, with `xq` the quantized `x` from [`Self::prepare`].
    pub(super) fn matvec(&self, out: &mut [f32], w: &Matrix, x: &[f32], xq: &QuantizedVec) {
        debug_assert_eq!(out.len(), w.rows);
        if let Some(packed) = w.packed(self.kernel) {
            self.matvec_packed(out, w, packed, xq);
            return;
        }
        if !self.parallel() || w.rows * w.cols < PARALLEL_MIN_WEIGHTS {
            self.matvec_rows(out, w, 0, x, xq);
            return;
        }
        let block = w
            .rows
            .div_ceil(self.threads * TASKS_PER_THREAD)
            .max(MIN_ROWS_PER_TASK);
        fork::for_each_chunk(out, block, &|i, out| {
            self.matvec_rows(out, w, i * block, x, xq)
        });
    }

    fn matvec_packed(&self, out: &mut [f32], w: &Matrix, packed: &PackedQ8, xq: &QuantizedVec) {
        let panels = packed.panels();
        let xs = std::slice::from_ref(xq);
        if !self.parallel() || w.rows * w.cols < PARALLEL_MIN_WEIGHTS {
            self.kernel.matmul_packed(out, 0, packed, 0..panels, xs);
            return;
        }
        let per_task = panels
            .div_ceil(self.threads * TASKS_PER_THREAD)
            .max(MIN_ROWS_PER_TASK.div_ceil(PANEL));
        fork::for_each_chunk(out, per_task * PANEL, &|i, out| {
            let first = i * per_task;
            let range = first..(first + per_task).min(panels);
            self.kernel.matmul_packed(out, 0, packed, range, xs);
        });
    }

    /// `out[b] = W x[b]` for `n` inputs: `out` is (n, rows), `x` is (n, cols).
    pub(super) fn matmul(
        &self,
        out: &mut [f32],
        w: &Matrix,
        x: &[f32],
        xq: &[QuantizedVec],
        n: usize,
    ) {
        let (rows, cols) = (w.rows, w.cols);
        debug_assert!(out.len() >= n * rows && x.len() >= n * cols && xq.len() >= n);
        let (out, x, xq) = (&mut out[..n * rows], &x[..n * cols], &xq[..n]);
        if !self.parallel() || n * rows * cols < PARALLEL_MIN_WEIGHTS {
            self.matmul_serial(out, w, x, xq);
            return;
        }
        let per_task = n.div_ceil(self.threads * TASKS_PER_THREAD).max(1);
        fork::for_each_chunk(out, per_task * rows, &|i, out| {
            let inputs = i * per_task..(i * per_task + per_task).min(n);
            let x = &x[inputs.start * cols..inputs.end * cols];
            self.matmul_serial(out, w, x, &xq[inputs]);
        });
    }

    fn matmul_serial(&self, out: &mut [f32], w: &Matrix, x: &[f32], xq: &[QuantizedVec]) {
        let (rows, cols) = (w.rows, w.cols);
        if let Some(packed) = w.packed(self.kernel) {
            let panels = 0..packed.panels();
            self.kernel.matmul_packed(out, rows, packed, panels, xq);
            return;
        }
        for start in (0..rows).step_by(ROW_BLOCK) {
            let end = (start + ROW_BLOCK).min(rows);
            for (b, xq) in xq.iter().enumerate() {
                let out = &mut out[b * rows + start..b * rows + end];
                self.matvec_rows(out, w, start, &x[b * cols..(b + 1) * cols], xq);
            }
        }
    }

    /// Rows `first_row..first_row + out.len()` of `W x` on the calling thread.
    fn matvec_rows(
        &self,
        out: &mut [f32],
        w: &Matrix,
        first_row: usize,
        x: &[f32],
        xq: &QuantizedVec,
    ) {
        let span = first_row * w.cols..(first_row + out.len()) * w.cols;
        match w.data {
            MatrixData::Q8 {
                q,
                scales,
                group_size,
            } => {
                let scale_span = span.start / group_size..span.end / group_size;
                self.kernel
                    .matvec_q8(out, &q[span], &scales[scale_span], xq);
            }
            MatrixData::F32(weights) => kernels::matvec_f32(out, &weights[span], x),
        }
    }
}
