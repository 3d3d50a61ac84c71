//! The memory update: memory slots become the memory keys/values of the attention window.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
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
                self.run(|| self.update_memory(state, 0..c.mem_len));
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
        let mem_len = self.config().mem_len;
        let choice = self.update_governor.choose();
        let start = Instant::now();
        self.run_on(choice.use_pool, || self.update_memory(state, 0..mem_len));
        self.update_governor.record(choice, start.elapsed());
    }

    /// Recomputes window rows `slots` of every layer from `mem[l][slots]`, as one batch per
    /// layer: `m += aw2(silu(aw1 g) * aw3 g)` with `g = rmsnorm(m, rms_mff)`, then
    /// `k, v = wk n, wv n` with `n = rmsnorm(m, rms_mem)`, and RoPE on k at the slot index.
    ///
    /// Layers and slots are independent, so on the pool the update is one fork. A few lanes,
    /// each with its own rows of scratch, take tasks of [`TASK_ROWS`] slots of one layer in
    /// layer order until none is left, and run each task on their own thread. With a fork
    /// per layer or per product, an idle thread fell asleep between forks, and waking it cost
    /// more than it gained. And when another process keeps a core busy, every join waited
    /// for a preempted thread; now only the one join does.
    pub(super) fn update_memory(&self, state: &mut State, slots: Range<usize>) {
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
        // Slots inside 0..M keep every layer's window rows apart (see the SAFETY note below).
        assert!(slots.end <= c.mem_len);
        assert!(n <= b.rows);
        let (rows, lanes) = self.update_split(n, b.rows);
        let blocks = n.div_ceil(rows);
        let tasks = c.n_layers * blocks;
        debug_assert!(lanes <= tasks);

        // Each lane gets its own rows of every batch buffer, without allocating.
        let mut parts =
            b.a.chunks_mut(rows * dim)
                .zip(b.b.chunks_mut(rows * dim))
                .zip(b.h1.chunks_mut(rows * hidden))
                .zip(b.h3.chunks_mut(rows * hidden))
                .zip(b.aq.chunks_mut(rows).zip(b.hq.chunks_mut(rows)));
        let mut scratch: [Option<Lane>; MAX_LANES] = Default::default();
        for lane in scratch.iter_mut().take(lanes) {
            let ((((a, bb), h1), h3), (aq, hq)) = parts
                .next()
                .expect("the batch buffers hold a block of rows per lane");
            *lane = Some(Lane {
                a,
                b: bb,
                h1,
                h3,
                aq,
                hq,
            });
        }

        let window = WindowRows::new(key_cache, value_cache);
        let next = AtomicUsize::new(0);
        let run_lane = |lane: &mut Option<Lane>| {
            let Some(lane) = lane else { return };
            loop {
                let task = next.fetch_add(1, Ordering::Relaxed);
                if task >= tasks {
                    break;
                }
                let (l, block) = (task / blocks, task % blocks);
                let first = slots.start + block * rows;
                let end = (first + rows).min(slots.end);
                let m = &mem[(l * c.mem_len + first) * dim..(l * c.mem_len + end) * dim];
                let at = l * c.cache_rows() * kv_dim;
                // SAFETY: each task number is handed out once, and task (l, block) alone
                // writes window rows first..end of layer l. These rows lie inside the layer's
                // rows, since end <= M <= cache_rows.
                let (keys, values) = unsafe { window.rows(at + first * kv_dim..at + end * kv_dim) };
                self.update_slots(l, first, m, lane, keys, values);
            }
        };
        if lanes > 1 {
            scratch[..lanes]
                .par_iter_mut()
                .with_max_len(1)
                .for_each(|lane| self.serially(|| run_lane(lane)));
        } else {
            run_lane(&mut scratch[0]);
        }
    }

    /// Returns the slots per task and the lanes of a memory update of `n` slots, with
    /// `scratch_rows` rows of batch buffers. On the pool, tasks have [`TASK_ROWS`] slots, or
    /// fewer so that every thread gets a lane, down to the kernel's four-input tiles. With a
    /// single lane the update runs as one task per layer, whose products split across the
    /// pool on their own.
    fn update_split(&self, n: usize, scratch_rows: usize) -> (usize, usize) {
        let whole = (n.max(1), 1);
        if !self.parallel() {
            return whole;
        }
        let rows = (scratch_rows / self.threads)
            .clamp(MIN_TASK_ROWS, TASK_ROWS)
            .min(n)
            .max(1);
        let tasks = self.config().n_layers * n.div_ceil(rows);
        let lanes = self
            .threads
            .min(MAX_LANES)
            .min(scratch_rows / rows)
            .min(tasks);
        if lanes < 2 {
            return whole;
        }
        (rows, lanes)
    }

    /// Runs the memory update of slots `first..` of layer `l`, whose memory rows are `m`,
    /// into their rows `keys` and `values` of the layer's window.
    fn update_slots(
        &self,
        l: usize,
        first: usize,
        m: &[f32],
        s: &mut Lane,
        keys: &mut [f32],
        values: &mut [f32],
    ) {
        let dim = self.config().dim;
        let layer = &self.weights.layers[l];
        let weights = layer
            .memory
            .as_ref()
            .expect("memory models have memory weights");
        let n = m.len() / dim;

        // m: the slots' memory rows, then the memory FFN on rmsnorm(m, rms_mff), added to m.
        s.a[..n * dim].copy_from_slice(m);
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
        self.matmul(keys, &layer.wk, s.b, s.aq, n);
        for (i, key) in keys.chunks_exact_mut(self.config().kv_dim()).enumerate() {
            self.rope.rotate(key, first + i);
        }
        self.matmul(values, &layer.wv, s.b, s.aq, n);
    }
}

/// The maximum slots per task of a memory update on the pool. A batch of M slots splits
/// into one task per thread and layer, of at most this many slots. Every task reads all of
/// its layer's memory weights, so smaller tasks read them more often. On 110M (5.9 MB of
/// them per layer) at 2 threads on a Xeon, tasks of 64 slots took 15.5-18.0 ms per update
/// against 19.6-21.2 with 16, and 25.0-25.8 against 31.0-33.0 on the `avx512vnni` path. On
/// toy20M both sizes measured alike. Tasks shrink to no fewer than `MIN_TASK_ROWS` slots so
/// that every thread gets a lane.
const TASK_ROWS: usize = 64;
const MIN_TASK_ROWS: usize = 4;
/// The maximum number of lanes (threads) of a memory update.
const MAX_LANES: usize = 32;

/// One lane's rows of the batch buffers.
struct Lane<'s> {
    a: &'s mut [f32],
    b: &'s mut [f32],
    h1: &'s mut [f32],
    h3: &'s mut [f32],
    aq: &'s mut [QuantizedVec],
    hq: &'s mut [QuantizedVec],
}

/// The key and value windows of all layers, handed out row range by row range to tasks that
/// each write rows no other task writes. Splitting them into slices up front would need a
/// list per update, and the update runs on the decode path, which does not allocate.
struct WindowRows<'w> {
    keys: *mut f32,
    values: *mut f32,
    len: usize,
    _windows: PhantomData<&'w mut [f32]>,
}

// SAFETY: the callers of `rows` keep the ranges apart (its contract), so tasks on different
// threads never touch the same floats.
unsafe impl Send for WindowRows<'_> {}
unsafe impl Sync for WindowRows<'_> {}

impl<'w> WindowRows<'w> {
    fn new(keys: &'w mut [f32], values: &'w mut [f32]) -> Self {
        assert_eq!(keys.len(), values.len());
        WindowRows {
            keys: keys.as_mut_ptr(),
            values: values.as_mut_ptr(),
            len: keys.len(),
            _windows: PhantomData,
        }
    }

    /// Returns floats `range` of the key window and of the value window.
    ///
    /// # Safety
    /// No two slices handed out and still in use may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(&self, range: Range<usize>) -> (&'w mut [f32], &'w mut [f32]) {
        assert!(range.start <= range.end);
        assert!(range.end <= self.len);
        let len = range.end - range.start;
        (
            std::slice::from_raw_parts_mut(self.keys.add(range.start), len),
            std::slice::from_raw_parts_mut(self.values.add(range.start), len),
        )
    }
}
