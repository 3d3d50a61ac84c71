//! The mutable state of a running model: the recurrent memory and key/value window, plus
//! scratch buffers allocated once so that the decode path never allocates.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::QuantizedVec;

/// What a model has consumed so far. For a memory model the first four fields are the whole
/// recurrent state; the scratch buffers carry nothing between tokens.
pub struct State {
    /// Tokens consumed since the state was created or reset.
    pub position: u64,
    /// (n_layers, mem_len, dim): attention outputs of the current chunk, by chunk position.
    pub mem: Vec<f32>,
    /// (n_layers, cache_rows, kv_dim). Memory models: rows 0..M hold the memory keys, rows
    /// M..2M the current chunk's. Plain models: one row per position.
    pub key_cache: Vec<f32>,
    /// Same layout as `key_cache`.
    pub value_cache: Vec<f32>,
    pub(crate) scratch: Scratch,
}

/// Buffers reused by every forward pass and memory update.
pub(crate) struct Scratch {
    pub x: Vec<f32>,       // (dim,) residual stream
    pub xb: Vec<f32>,      // (dim,)
    pub xb2: Vec<f32>,     // (dim,)
    pub hb: Vec<f32>,      // (hidden_dim,)
    pub hb2: Vec<f32>,     // (hidden_dim,)
    pub q: Vec<f32>,       // (dim,)
    pub scores: Vec<f32>,  // (cache_rows,) attention weights of one head
    pub logits: Vec<f32>,  // (vocab_size,)
    pub xq: QuantizedVec,  // quantized input of width dim
    pub hq: QuantizedVec,  // quantized input of width hidden_dim
    pub batch: BatchScratch,
}

/// Buffers for batches of up to `rows` rows (memory updates, batched prefill).
pub(crate) struct BatchScratch {
    pub rows: usize,
    pub x: Vec<f32>,   // (rows, dim) residual streams of a prefill batch
    pub q: Vec<f32>,   // (rows, dim)
    pub scores: Vec<f32>, // (rows, cache_rows) attention weights, one head at a time per row
    pub a: Vec<f32>,   // (rows, dim)
    pub b: Vec<f32>,   // (rows, dim)
    pub h1: Vec<f32>,  // (rows, hidden_dim)
    pub h3: Vec<f32>,  // (rows, hidden_dim)
    pub kv: Vec<f32>,  // (rows, kv_dim)
    pub aq: Vec<QuantizedVec>, // per row, width dim
    pub hq: Vec<QuantizedVec>, // per row, width hidden_dim
}

/// Allocates `len` zeroed floats, reporting failure instead of aborting: `seq_len` and
/// `mem_len` come from the file header and can ask for more memory than the machine has.
pub(crate) fn zeroed(len: usize, what: &str) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        Error::InvalidSetting(format!(
            "cannot allocate {what}: {len} floats ({:.1} GiB); the header's seq_len or mem_len \
             is too large for this machine",
            len as f64 * 4.0 / (1u64 << 30) as f64
        ))
    })?;
    v.resize(len, 0.0);
    Ok(v)
}

/// Rows per batch: a whole chunk for memory models (a chunk is the most that can be batched,
/// since the memory update between chunks depends on all of it).
pub(crate) fn batch_rows(c: &Config) -> usize {
    const PLAIN_MODEL_BATCH: usize = 64;
    if c.is_memory_model() {
        c.mem_len
    } else {
        c.seq_len.min(PLAIN_MODEL_BATCH)
    }
}

impl State {
    pub(crate) fn new(c: &Config, group_size: usize) -> Result<State> {
        let cache_len = c
            .n_layers
            .checked_mul(c.cache_rows())
            .and_then(|n| n.checked_mul(c.kv_dim()))
            .ok_or_else(|| Error::InvalidSetting("key/value cache size overflows".into()))?;
        let batch_rows = batch_rows(c);
        let batch = BatchScratch {
            rows: batch_rows,
            x: zeroed(batch_rows * c.dim, "batch buffers")?,
            q: zeroed(batch_rows * c.dim, "batch buffers")?,
            scores: zeroed(batch_rows * c.cache_rows(), "batch buffers")?,
            a: zeroed(batch_rows * c.dim, "batch buffers")?,
            b: zeroed(batch_rows * c.dim, "batch buffers")?,
            h1: zeroed(batch_rows * c.hidden_dim, "batch buffers")?,
            h3: zeroed(batch_rows * c.hidden_dim, "batch buffers")?,
            kv: zeroed(batch_rows * c.kv_dim(), "batch buffers")?,
            aq: (0..batch_rows).map(|_| QuantizedVec::with_capacity(c.dim, group_size)).collect(),
            hq: (0..batch_rows)
                .map(|_| QuantizedVec::with_capacity(c.hidden_dim, group_size))
                .collect(),
        };
        Ok(State {
            position: 0,
            mem: zeroed(c.n_layers * c.mem_len * c.dim, "the memory")?,
            key_cache: zeroed(cache_len, "the key cache")?,
            value_cache: zeroed(cache_len, "the value cache")?,
            scratch: Scratch {
                x: vec![0.0; c.dim],
                xb: vec![0.0; c.dim],
                xb2: vec![0.0; c.dim],
                hb: vec![0.0; c.hidden_dim],
                hb2: vec![0.0; c.hidden_dim],
                q: vec![0.0; c.dim],
                scores: zeroed(c.cache_rows(), "attention scores")?,
                logits: vec![0.0; c.vocab_size],
                xq: QuantizedVec::with_capacity(c.dim, group_size),
                hq: QuantizedVec::with_capacity(c.hidden_dim, group_size),
                batch,
            },
        })
    }

    /// Logits of the last forward pass.
    pub fn logits(&self) -> &[f32] {
        &self.scratch.logits
    }
}
