//! The SwiGLU feed-forward over a batch of rows, shared by the layers' FFN (prefill) and the
//! memory FFN (memory update).

use super::ops::add_in_place;
use super::Transformer;
use crate::kernels::QuantizedVec;
use crate::weights::Matrix;

/// One SwiGLU feed-forward with its input norm: w1, w3 are (hidden_dim, dim), w2 (dim,
/// hidden_dim).
pub(super) struct Ffn<'w> {
    pub norm: &'w [f32],
    pub w1: &'w Matrix,
    pub w2: &'w Matrix,
    pub w3: &'w Matrix,
}

/// Scratch for [`Transformer::ffn_batch`], disjoint from the residual rows.
pub(super) struct FfnBuffers<'b> {
    pub normed: &'b mut [f32], // (rows, dim), also receives the FFN output
    pub h1: &'b mut [f32],     // (rows, hidden_dim)
    pub h3: &'b mut [f32],     // (rows, hidden_dim)
    pub aq: &'b mut [QuantizedVec],
    pub hq: &'b mut [QuantizedVec],
}

impl Transformer {
    /// Adds `w2(silu(w1 h) * w3 h)` with `h = rmsnorm(x, norm)` to each of the first `n`
    /// rows `x` of `residual`.
    pub(super) fn ffn_batch(&self, ffn: &Ffn, residual: &mut [f32], n: usize, t: FfnBuffers) {
        let (dim, hidden) = (self.config().dim, self.config().hidden_dim);
        self.norm_rows(
            &mut t.normed[..n * dim],
            &residual[..n * dim],
            ffn.norm,
            &mut t.aq[..n],
        );
        let (normed, aq) = (&*t.normed, &*t.aq);
        self.both(
            || self.matmul(t.h1, ffn.w1, normed, aq, n),
            || self.matmul(t.h3, ffn.w3, normed, aq, n),
        );
        self.gate_rows(
            &mut t.h1[..n * hidden],
            &t.h3[..n * hidden],
            hidden,
            &mut t.hq[..n],
        );
        self.matmul(t.normed, ffn.w2, t.h1, t.hq, n);
        add_in_place(&mut residual[..n * dim], &t.normed[..n * dim]);
    }
}
