//! The memory update: memory slots become the memory keys/values of the attention window.

use std::ops::Range;

use super::ffn::{Ffn, FfnBuffers};
use super::ops::rmsnorm;
use super::{State, Transformer};

impl Transformer {
    /// Recomputes window rows `slots` of layer `l` from `mem[l][slots]`, as one batch:
    /// `m += aw2(silu(aw1 g) * aw3 g)` with `g = rmsnorm(m, rms_mff)`, then
    /// `k, v = wk n, wv n` with `n = rmsnorm(m, rms_mem)`, and RoPE on k at the slot index.
    pub(super) fn update_memory(&self, state: &mut State, l: usize, slots: Range<usize>) {
        let c = *self.config();
        let (dim, kv_dim) = (c.dim, c.kv_dim());
        let layer = &self.weights.layers[l];
        let weights = layer
            .memory
            .as_ref()
            .expect("memory models have memory weights");
        let n = slots.len();
        let State {
            mem,
            key_cache,
            value_cache,
            scratch,
            ..
        } = state;
        let b = &mut scratch.batch;
        debug_assert!(n <= b.rows);

        // m: the slots' memory rows.
        let first = (l * c.mem_len + slots.start) * dim;
        b.a[..n * dim].copy_from_slice(&mem[first..first + n * dim]);

        // Memory FFN on rmsnorm(m, rms_mff), added to m.
        let ffn = Ffn {
            norm: weights.rms_mff,
            w1: &weights.aw1,
            w2: &weights.aw2,
            w3: &weights.aw3,
        };
        let buffers = FfnBuffers {
            normed: &mut b.b,
            h1: &mut b.h1,
            h3: &mut b.h3,
            aq: &mut b.aq,
            hq: &mut b.hq,
        };
        self.ffn_batch(&ffn, &mut b.a, n, buffers);

        // n = rmsnorm(m, rms_mem), then keys and values through the layer's own wk and wv.
        for i in 0..n {
            rmsnorm(
                &mut b.b[i * dim..(i + 1) * dim],
                &b.a[i * dim..(i + 1) * dim],
                weights.rms_mem,
            );
            self.prepare(&b.b[i * dim..(i + 1) * dim], &mut b.aq[i]);
        }
        let rows = l * c.cache_rows() * kv_dim + slots.start * kv_dim..;
        let window = rows.start..rows.start + n * kv_dim;
        self.matmul(&mut b.kv, &layer.wk, &b.b, &b.aq, n);
        key_cache[window.clone()].copy_from_slice(&b.kv[..n * kv_dim]);
        for (i, slot) in slots.enumerate() {
            self.rope.rotate(
                &mut key_cache[window.start + i * kv_dim..window.start + (i + 1) * kv_dim],
                slot,
            );
        }
        self.matmul(&mut value_cache[window], &layer.wv, &b.b, &b.aq, n);
    }
}
