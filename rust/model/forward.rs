//! The forward pass of one token.

use std::time::Instant;

use super::attention::{attention, attention_parts};
use super::ops::{add_in_place, rmsnorm, swiglu};
use super::{State, Transformer, UpdateMode};
use crate::error::{Error, Result};

impl Transformer {
    /// Feeds `token` and returns the logits for the next one. A memory model runs its memory
    /// update when the token completes a chunk (chunk mode) or after every token (token mode).
    pub fn forward<'s>(&self, state: &'s mut State, token: u32) -> Result<&'s [f32]> {
        let c = *self.config();
        if token as usize >= c.vocab_size {
            return Err(Error::TokenOutOfRange {
                token: token as i64,
                vocab_size: c.vocab_size,
            });
        }
        self.ready_window(state);
        // Window row of this token's key/value, which is also its RoPE position.
        let chunk_pos = if c.is_memory_model() {
            (state.position % c.mem_len as u64) as usize
        } else {
            0
        };
        let row = if c.is_memory_model() {
            c.mem_len + chunk_pos
        } else if state.position < c.seq_len as u64 {
            state.position as usize
        } else {
            return Err(Error::ContextFull {
                seq_len: c.seq_len,
                position: state.position as usize,
            });
        };

        let choice = self.governor.choose();
        let start = Instant::now();
        self.run_on(choice.use_pool, || {
            self.forward_layers(state, token, row, chunk_pos)
        });
        self.governor.record(choice, start.elapsed());
        state.position += 1;

        if c.is_memory_model() {
            match self.mode {
                UpdateMode::Chunk if chunk_pos == c.mem_len - 1 => self.update_chunk(state),
                UpdateMode::Token => self.run_on(choice.use_pool, || {
                    self.update_memory(state, chunk_pos..chunk_pos + 1)
                }),
                UpdateMode::Chunk => {}
            }
        }
        Ok(&state.scratch.logits)
    }

    fn forward_layers(&self, state: &mut State, token: u32, row: usize, chunk_pos: usize) {
        let c = *self.config();
        let (dim, kv_dim) = (c.dim, c.kv_dim());
        let rows = c.cache_rows();
        let State {
            mem,
            key_cache,
            value_cache,
            scratch: s,
            ..
        } = state;

        // Token embedding (a Q8_0 table is dequantized one row at a time).
        self.weights.embedding.read_row(token as usize, &mut s.x);

        for (l, layer) in self.weights.layers.iter().enumerate() {
            let layer_cache = l * rows * kv_dim;
            let kv_row = layer_cache + row * kv_dim..layer_cache + (row + 1) * kv_dim;

            // Attention rmsnorm, then q, k, v; k and v go straight into the cache row.
            rmsnorm(&mut s.xb, &s.x, layer.rms_att);
            self.prepare(&s.xb, &mut s.xq);
            let (k_row, v_row) = (
                &mut key_cache[kv_row.clone()],
                &mut value_cache[kv_row.clone()],
            );
            self.both(
                || self.matvec(&mut s.q, &layer.wq, &s.xb, &s.xq),
                || {
                    self.both(
                        || self.matvec(k_row, &layer.wk, &s.xb, &s.xq),
                        || self.matvec(v_row, &layer.wv, &s.xb, &s.xq),
                    )
                },
            );

            // RoPE at the window row: M + chunk position, or the absolute position.
            self.rope.rotate(&mut s.q, row);
            self.rope.rotate(&mut key_cache[kv_row], row);

            // Multi-head attention over window rows 0..=row; the heads fill xb.
            let layer_rows = layer_cache..layer_cache + rows * kv_dim;
            let (keys, values) = (&key_cache[layer_rows.clone()], &value_cache[layer_rows]);
            self.attend(&s.q, keys, values, row, &mut s.xb, &mut s.scores);

            // The attention output (before wo) becomes this chunk position's memory.
            if c.is_memory_model() {
                let slot = (l * c.mem_len + chunk_pos) * dim;
                mem[slot..slot + dim].copy_from_slice(&s.xb);
            }

            // Output projection and residual.
            self.prepare(&s.xb, &mut s.xq);
            self.matvec(&mut s.xb2, &layer.wo, &s.xb, &s.xq);
            add_in_place(&mut s.x, &s.xb2);

            // SwiGLU feed-forward and residual.
            rmsnorm(&mut s.xb, &s.x, layer.rms_ffn);
            self.prepare(&s.xb, &mut s.xq);
            self.both(
                || self.matvec(&mut s.hb, &layer.w1, &s.xb, &s.xq),
                || self.matvec(&mut s.hb2, &layer.w3, &s.xb, &s.xq),
            );
            swiglu(&mut s.hb, &s.hb2);
            self.prepare(&s.hb, &mut s.hq);
            self.matvec(&mut s.xb, &layer.w2, &s.hb, &s.hq);
            add_in_place(&mut s.x, &s.xb);
        }

        // Final rmsnorm and classifier.
        rmsnorm(&mut s.xb, &s.x, self.weights.rms_final);
        self.prepare(&s.xb, &mut s.xq);
        self.matvec(&mut s.logits, &self.weights.wcls, &s.xb, &s.xq);
    }
}

/// Key floats a token's attention reads before its heads split across the pool. Below it, a
/// fork is estimated to cost about what it saves: toy20M's largest window (74K floats) takes
/// about 12 us per layer on one thread.
const PARALLEL_ATTENTION_MIN: usize = 96 * 1024;

impl Transformer {
    /// Runs one token's attention over window rows `0..=row`, into `out` (dim). On the pool,
    /// a long enough window splits its heads into one part per thread. Between tokens the
    /// weights stream through the caches and evict the window, and one thread reads it back
    /// from memory at well under the bandwidth, so two threads reading at once finish
    /// sooner.
    fn attend(
        &self,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        row: usize,
        out: &mut [f32],
        scores: &mut [f32],
    ) {
        let c = self.config();
        let n = row + 1;
        if !self.parallel() || n * c.kv_dim() < PARALLEL_ATTENTION_MIN {
            attention(q, keys, values, row, c, 0..c.n_heads, out, scores);
            return;
        }
        attention_parts(q, keys, values, row, c, self.threads, out, scores);
    }
}

impl Transformer {
    /// Feeds `tokens[..n-1]` one at a time and returns, for each, the negative
    /// log-likelihood in nats of the token that follows it. The last token is not fed.
    pub fn score(&self, state: &mut State, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut losses = Vec::with_capacity(tokens.len().saturating_sub(1));
        for pair in tokens.windows(2) {
            let logits = self.forward(state, pair[0])?;
            if pair[1] as usize >= logits.len() {
                return Err(Error::TokenOutOfRange {
                    token: pair[1] as i64,
                    vocab_size: logits.len(),
                });
            }
            losses.push(negative_log_likelihood(logits, pair[1] as usize));
        }
        Ok(losses)
    }
}

/// `logsumexp(logits) - logits[target]`, summed in f64.
fn negative_log_likelihood(logits: &[f32], target: usize) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    (max + sum.ln() - logits[target] as f64) as f32
}
