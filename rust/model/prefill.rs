//! Batched prefill: tokens known in advance go through each layer together, so every weight
//! matrix is read once per batch instead of once per token.

use super::attention::{attention, attention_tile, TILE};
use super::ffn::{Ffn, FfnBuffers};
use super::ops::{add_in_place, rmsnorm};
use super::state::batch_rows;
use super::{State, Transformer, UpdateMode};
use crate::error::{Error, Result};

impl Transformer {
    /// Feeds `tokens` in order, as `forward` would one by one, and leaves the logits of the
    /// last one. Memory models batch up to the end of each chunk; token update mode changes
    /// the memory after every token, so it runs token by token.
    pub fn feed(&self, state: &mut State, tokens: &[u32]) -> Result<()> {
        let c = *self.config();
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::TokenOutOfRange {
                token: token as i64,
                vocab_size: c.vocab_size,
            });
        }
        self.check_room(state, tokens.len())?;
        self.ready_window(state);
        let mut rest = tokens;
        while !rest.is_empty() {
            let n = if self.mode == UpdateMode::Token {
                1
            } else if c.is_memory_model() {
                let chunk_pos = (state.position % c.mem_len as u64) as usize;
                rest.len().min(c.mem_len - chunk_pos)
            } else {
                rest.len().min(batch_rows(&c))
            };
            let (batch, tail) = rest.split_at(n);
            if n == 1 {
                self.forward(state, batch[0])?;
            } else {
                // Only the last batch's logits are left to the caller.
                self.forward_batch(state, batch, tail.is_empty());
            }
            rest = tail;
        }
        Ok(())
    }

    /// Returns an error if a plain model has no room for `tokens` more tokens in its
    /// context. Memory models always have room.
    pub fn check_room(&self, state: &State, tokens: usize) -> Result<()> {
        let c = self.config();
        if !c.is_memory_model() && state.position + tokens as u64 > c.seq_len as u64 {
            return Err(Error::ContextFull {
                seq_len: c.seq_len,
                position: (state.position as usize).saturating_add(tokens),
            });
        }
        Ok(())
    }

    /// Runs `tokens`, which all fall in the current chunk (or fit the context of a plain
    /// model), through the layers as one batch, then the memory update if the chunk is done.
    /// Runs the classifier on the last token only if `logits` is set.
    fn forward_batch(&self, state: &mut State, tokens: &[u32], logits: bool) {
        let c = *self.config();
        let (first_row, chunk_pos) = if c.is_memory_model() {
            let chunk_pos = (state.position % c.mem_len as u64) as usize;
            (c.mem_len + chunk_pos, chunk_pos)
        } else {
            (state.position as usize, 0)
        };
        self.run(|| {
            self.forward_batch_layers(state, tokens, first_row, chunk_pos);
            if logits {
                self.batch_logits(state, tokens.len());
            }
        });
        state.position += tokens.len() as u64;
        if c.is_memory_model() && chunk_pos + tokens.len() == c.mem_len {
            self.update_chunk(state);
        }
    }

    fn forward_batch_layers(
        &self,
        state: &mut State,
        tokens: &[u32],
        first_row: usize,
        chunk_pos: usize,
    ) {
        let c = *self.config();
        let (dim, kv_dim) = (c.dim, c.kv_dim());
        let n = tokens.len();
        let rows = c.cache_rows();
        let State {
            mem,
            key_cache,
            value_cache,
            scratch,
            ..
        } = state;
        let b = &mut scratch.batch;

        // Token embeddings, one row per token.
        for (i, &token) in tokens.iter().enumerate() {
            self.weights
                .embedding
                .read_row(token as usize, &mut b.x[i * dim..(i + 1) * dim]);
        }

        for (l, layer) in self.weights.layers.iter().enumerate() {
            let layer_cache = l * rows * kv_dim;
            let window = layer_cache + first_row * kv_dim..layer_cache + (first_row + n) * kv_dim;

            // Attention rmsnorm, then q, k, v for the whole batch; k and v go into the cache.
            self.norm_rows(
                &mut b.a[..n * dim],
                &b.x[..n * dim],
                layer.rms_att,
                &mut b.aq[..n],
            );
            let (k_rows, v_rows) = (
                &mut key_cache[window.clone()],
                &mut value_cache[window.clone()],
            );
            self.both(
                || self.matmul(&mut b.q, &layer.wq, &b.a, &b.aq, n),
                || {
                    self.both(
                        || self.matmul(k_rows, &layer.wk, &b.a, &b.aq, n),
                        || self.matmul(v_rows, &layer.wv, &b.a, &b.aq, n),
                    )
                },
            );

            // RoPE, each token at its own window row.
            for i in 0..n {
                self.rope
                    .rotate(&mut b.q[i * dim..(i + 1) * dim], first_row + i);
                let k = window.start + i * kv_dim;
                self.rope
                    .rotate(&mut key_cache[k..k + kv_dim], first_row + i);
            }

            // Causal attention: token i attends to window rows 0..=first_row + i. Tokens are
            // independent here, so tiles of TILE tokens run in parallel, each writing its rows
            // of b.a. A tile reads each window row once for all its tokens.
            let keys = &key_cache[layer_cache..layer_cache + rows * kv_dim];
            let values = &value_cache[layer_cache..layer_cache + rows * kv_dim];
            let (queries, stride) = (&b.q, c.n_heads * rows);
            let attend = |k: usize, out: &mut [f32], scores: &mut [f32]| {
                let first = k * TILE;
                if out.len() == TILE * dim {
                    let q = &queries[first * dim..(first + TILE) * dim];
                    attention_tile(q, keys, values, first_row + first, &c, out, scores, stride);
                    return;
                }
                // The last, partial tile: one token at a time.
                for (j, (out, scores)) in out
                    .chunks_mut(dim)
                    .zip(scores.chunks_mut(stride))
                    .enumerate()
                {
                    let q = &queries[(first + j) * dim..(first + j + 1) * dim];
                    let (row, all) = (first_row + first + j, 0..c.n_heads);
                    attention(q, keys, values, row, &c, all, out, scores);
                }
            };
            let tiles = (&mut b.a[..n * dim], TILE * dim);
            self.for_each_chunk_pair(tiles, (&mut b.scores[..], TILE * stride), &attend);

            // The attention outputs become this chunk's memory rows.
            if c.is_memory_model() {
                let slot = (l * c.mem_len + chunk_pos) * dim;
                mem[slot..slot + n * dim].copy_from_slice(&b.a[..n * dim]);
            }

            // Output projection and residual.
            self.quantize_rows(&b.a[..n * dim], dim, &mut b.aq[..n]);
            self.matmul(&mut b.b, &layer.wo, &b.a, &b.aq, n);
            add_in_place(&mut b.x[..n * dim], &b.b[..n * dim]);

            // SwiGLU feed-forward and residual.
            let ffn = Ffn {
                norm: layer.rms_ffn,
                w1: &layer.w1,
                w2: &layer.w2,
                w3: &layer.w3,
            };
            let buffers = FfnBuffers {
                normed: &mut b.a,
                h1: &mut b.h1,
                h3: &mut b.h3,
                aq: &mut b.aq,
                hq: &mut b.hq,
            };
            self.ffn_batch(&ffn, &mut b.x, n, buffers);
        }
    }

    /// Sets the logits from the last of the `n` rows of a batch: nothing reads the others.
    fn batch_logits(&self, state: &mut State, n: usize) {
        let dim = self.config().dim;
        let s = &mut state.scratch;
        let last = &s.batch.x[(n - 1) * dim..n * dim];
        rmsnorm(&mut s.xb, last, self.weights.rms_final);
        self.prepare(&s.xb, &mut s.xq);
        self.matvec(&mut s.logits, &self.weights.wcls, &s.xb, &s.xq);
    }
}
