//! The memory update: memory slots become the memory keys/values of the attention window.

use std::ops::Range;

use super::ops::{add_in_place, rmsnorm, swiglu};
use super::{State, Transformer};

impl Transformer {
    /// Recomputes window rows `slots` of layer `l` from `mem[l][slots]`, as one batch:
    /// `m += aw2(silu(aw1 g) * aw3 g)` with `g = rmsnorm(m, rms_mff)`, then
    /// `k, v = wk n, wv n` with `n = rmsnorm(m, rms_mem)`, and RoPE on k at the slot index.
    pub(super) fn update_memory(&self, state: &mut State, l: usize, slots: Range<usize>) {
        let c = *self.config();
        let (dim, hidden, kv_dim) = (c.dim, c.hidden_dim, c.kv_dim());
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
        for i in 0..n {
            rmsnorm(
                &mut b.b[i * dim..(i + 1) * dim],
                &b.a[i * dim..(i + 1) * dim],
                weights.rms_mff,
            );
            self.prepare(&b.b[i * dim..(i + 1) * dim], &mut b.aq[i]);
        }
        self.matmul(&mut b.h1, &weights.aw1, &b.b, &b.aq, n);
        self.matmul(&mut b.h3, &weights.aw3, &b.b, &b.aq, n);
        for i in 0..n {
            let span = i * hidden..(i + 1) * hidden;
            swiglu(&mut b.h1[span.clone()], &b.h3[span.clone()]);
            self.prepare(&b.h1[span], &mut b.hq[i]);
        }
        self.matmul(&mut b.b, &weights.aw2, &b.h1, &b.hq, n);
        add_in_place(&mut b.a[..n * dim], &b.b[..n * dim]);

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
