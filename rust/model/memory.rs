//! The memory update: memory slots become the memory keys/values of the attention window.

use std::ops::Range;
use std::time::Instant;

use rayon::prelude::*;

use super::ffn::{Ffn, FfnBuffers};
use super::{State, Transformer};
use crate::kernels::QuantizedVec;

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
    ///
    /// Slots are independent, so on the pool each thread takes blocks of slots through the
    /// whole layer: one fork per layer instead of one per product. Between many small forks
    /// an idle thread falls asleep, and waking it again cost more than the update's products
    /// gained from it.
    pub(super) fn update_memory(&self, state: &mut State, l: usize, slots: Range<usize>) {
        let c = *self.config();
        let (dim, kv_dim, hidden) = (c.dim, c.kv_dim(), c.hidden_dim);
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
        let first = (l * c.mem_len + slots.start) * dim;
        let window = l * c.cache_rows() * kv_dim + slots.start * kv_dim;
        let rows = if self.parallel() {
            n.div_ceil(MAX_BLOCKS).max(MIN_BLOCK_ROWS)
        } else {
            n.max(1)
        };
        // Split every buffer into the same blocks of rows, without allocating.
        let mut blocks: [Option<SlotBlock>; MAX_BLOCKS] = Default::default();
        let mut parts = mem[first..first + n * dim]
            .chunks(rows * dim)
            .zip(b.a.chunks_mut(rows * dim))
            .zip(b.b.chunks_mut(rows * dim))
            .zip(b.h1.chunks_mut(rows * hidden))
            .zip(b.h3.chunks_mut(rows * hidden))
            .zip(b.kv.chunks_mut(rows * kv_dim))
            .zip(b.aq.chunks_mut(rows).zip(b.hq.chunks_mut(rows)))
            .zip(key_cache[window..window + n * kv_dim].chunks_mut(rows * kv_dim))
            .zip(value_cache[window..window + n * kv_dim].chunks_mut(rows * kv_dim));
        for (i, slot) in blocks.iter_mut().enumerate() {
            let Some(((((((((m, a), bb), h1), h3), kv), (aq, hq)), keys), values)) = parts.next()
            else {
                break;
            };
            *slot = Some(SlotBlock {
                first_slot: slots.start + i * rows,
                m,
                a,
                b: bb,
                h1,
                h3,
                kv,
                aq,
                hq,
                keys,
                values,
            });
        }
        debug_assert!(parts.next().is_none(), "more blocks than MAX_BLOCKS");
        let run = |block: &mut Option<SlotBlock>| {
            if let Some(block) = block {
                self.update_slots(l, block);
            }
        };
        // One block (a single slot in token mode) needs no fork.
        if self.parallel() && n > rows {
            blocks.par_iter_mut().for_each(run);
        } else {
            blocks.iter_mut().for_each(run);
        }
    }

    /// Runs the memory update of one block of slots of layer `l`.
    fn update_slots(&self, l: usize, s: &mut SlotBlock) {
        let c = *self.config();
        let (dim, kv_dim) = (c.dim, c.kv_dim());
        let layer = &self.weights.layers[l];
        let weights = layer
            .memory
            .as_ref()
            .expect("memory models have memory weights");
        let n = s.m.len() / dim;

        // m: the slots' memory rows, then the memory FFN on rmsnorm(m, rms_mff), added to m.
        s.a[..n * dim].copy_from_slice(s.m);
        let ffn = Ffn {
            norm: weights.rms_mff,
            w1: &weights.aw1,
            w2: &weights.aw2,
            w3: &weights.aw3,
        };
        let buffers = FfnBuffers {
            normed: s.b,
            h1: s.h1,
            h3: s.h3,
            aq: s.aq,
            hq: s.hq,
        };
        self.ffn_batch(&ffn, s.a, n, buffers);

        // n = rmsnorm(m, rms_mem), then keys and values through the layer's own wk and wv.
        self.norm_rows(
            &mut s.b[..n * dim],
            &s.a[..n * dim],
            weights.rms_mem,
            &mut s.aq[..n],
        );
        self.matmul(s.kv, &layer.wk, s.b, s.aq, n);
        s.keys.copy_from_slice(&s.kv[..n * kv_dim]);
        for (i, key) in s.keys.chunks_exact_mut(kv_dim).enumerate() {
            self.rope.rotate(key, s.first_slot + i);
        }
        self.matmul(s.values, &layer.wv, s.b, s.aq, n);
    }
}

/// Blocks of slots a memory update splits into on the pool, and the fewest rows per block,
/// so that each block's products still fill the kernel's input tiles.
const MAX_BLOCKS: usize = 8;
const MIN_BLOCK_ROWS: usize = 16;

/// One block of slots of a memory update: its memory rows, its rows of the batch buffers and
/// its rows of the layer's key/value window.
struct SlotBlock<'s> {
    first_slot: usize,
    m: &'s [f32],
    a: &'s mut [f32],
    b: &'s mut [f32],
    h1: &'s mut [f32],
    h3: &'s mut [f32],
    kv: &'s mut [f32],
    aq: &'s mut [QuantizedVec],
    hq: &'s mut [QuantizedVec],
    keys: &'s mut [f32],
    values: &'s mut [f32],
}
