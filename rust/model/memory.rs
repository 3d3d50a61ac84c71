//! The memory update: memory slots become the memory keys/values of the attention window.

use std::ops::Range;
use std::time::Instant;

use super::ffn::{Ffn, FfnBuffers};
use super::{State, Transformer};

impl Transformer {
    /// Makes the memory rows of the key/value window those of the initial memory when a reset
    /// left them pending. The first state to need them runs the update; later ones copy it.
    pub(crate) fn ready_window(&self, state: &mut State) {
        if !state.window_pending {
            return;
        }
        let c = *self.config();
        let rows = c.mem_len * c.kv_dim();
        let layer = c.cache_rows() * c.kv_dim();
        match self.initial_window.get() {
            Some(window) => {
                for (l, kv) in window.chunks_exact(2 * rows).enumerate() {
                    state.key_cache[l * layer..l * layer + rows].copy_from_slice(&kv[..rows]);
                    state.value_cache[l * layer..l * layer + rows].copy_from_slice(&kv[rows..]);
                }
            }
            None => {
                self.run(|| {
                    for l in 0..c.n_layers {
                        self.update_memory(state, l, 0..c.mem_len);
                    }
                });
                let mut window = Vec::with_capacity(2 * c.n_layers * rows);
                for l in 0..c.n_layers {
                    window.extend_from_slice(&state.key_cache[l * layer..l * layer + rows]);
                    window.extend_from_slice(&state.value_cache[l * layer..l * layer + rows]);
                }
                // Another state may have set it meanwhile, to the same values.
                let _ = self.initial_window.set(window);
            }
        }
        state.window_pending = false;
    }

    /// Recomputes every layer's memory keys and values after a full chunk, on the pool or on
    /// the calling thread as the update governor chooses.
    pub(super) fn update_chunk(&self, state: &mut State) {
        let layers = self.config().n_layers;
        let mem_len = self.config().mem_len;
        let choice = self.update_governor.choose();
        let start = Instant::now();
        self.run_on(choice.use_pool, || {
            for l in 0..layers {
                self.update_memory(state, l, 0..mem_len);
            }
        });
        self.update_governor.record(choice, start.elapsed());
    }

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
        self.norm_rows(
            &mut b.b[..n * dim],
            &b.a[..n * dim],
            weights.rms_mem,
            &mut b.aq[..n],
        );
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
