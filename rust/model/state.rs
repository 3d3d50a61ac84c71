//! The mutable state of a running model: the recurrent memory and key/value window, plus
//! scratch buffers allocated once so that the decode path never allocates.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::QuantizedVec;

/// The running state of a model. For a memory model the first four fields are the whole
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
    /// Set by a reset: the memory rows of the caches still have to be made from the initial
    /// memory (`Transformer::ready_window`) before anything reads them.
    pub(crate) window_pending: bool,
    pub(crate) scratch: Scratch,
}

/// Buffers reused by every forward pass and memory update.
pub(crate) struct Scratch {
    pub x: Vec<f32>,      // (dim,) residual stream
    pub xb: Vec<f32>,     // (dim,)
    pub xb2: Vec<f32>,    // (dim,)
    pub hb: Vec<f32>,     // (hidden_dim,)
    pub hb2: Vec<f32>,    // (hidden_dim,)
    pub q: Vec<f32>,      // (dim,)
    pub scores: Vec<f32>, // (n_heads, cache_rows) attention weights
    pub logits: Vec<f32>, // (vocab_size,)
    pub xq: QuantizedVec, // quantized input of width dim
    pub hq: QuantizedVec, // quantized input of width hidden_dim
    pub batch: BatchScratch,
}

/// Buffers for batches of up to `rows` rows (memory updates, batched prefill).
pub(crate) struct BatchScratch {
    pub rows: usize,
    pub x: Vec<f32>,           // (rows, dim) residual streams of a prefill batch
    pub q: Vec<f32>,           // (rows, dim)
    pub scores: Vec<f32>,      // (rows, n_heads, cache_rows) attention weights
    pub a: Vec<f32>,           // (rows, dim)
    pub b: Vec<f32>,           // (rows, dim)
    pub h1: Vec<f32>,          // (rows, hidden_dim)
    pub h3: Vec<f32>,          // (rows, hidden_dim)
    pub aq: Vec<QuantizedVec>, // per row, width dim
    pub hq: Vec<QuantizedVec>, // per row, width hidden_dim
}

/// Allocates `len` zeroed floats, reporting failure instead of aborting: `seq_len` and
/// `mem_len` come from the file header and can ask for more memory than the machine has.
/// The memory comes zeroed from the allocator, so pages are only touched when used.
pub(crate) fn zeroed(len: usize, what: &'static str) -> Result<Vec<f32>> {
    let error = || Error::OutOfMemory {
        what,
        field: "seq_len or mem_len",
        bytes: len as u128 * 4,
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(len).map_err(|_| error())?;
    // SAFETY: the layout has a nonzero size (len > 0).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut f32;
    if ptr.is_null() {
        return Err(error());
    }
    // SAFETY: ptr was allocated by the global allocator with the layout of `len` f32, all
    // zero bytes are a valid f32 (0.0), and capacity equals the allocated length.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
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
            .ok_or(Error::OutOfMemory {
                what: "the key/value cache",
                field: "seq_len",
                bytes: c.n_layers as u128 * c.cache_rows() as u128 * c.kv_dim() as u128 * 4,
            })?;
        let batch_rows = batch_rows(c);
        let batch = BatchScratch {
            rows: batch_rows,
            x: zeroed(batch_rows * c.dim, "batch buffers")?,
            q: zeroed(batch_rows * c.dim, "batch buffers")?,
            scores: zeroed(
                (batch_rows * c.n_heads).saturating_mul(c.cache_rows()),
                "batch buffers",
            )?,
            a: zeroed(batch_rows * c.dim, "batch buffers")?,
            b: zeroed(batch_rows * c.dim, "batch buffers")?,
            h1: zeroed(batch_rows * c.hidden_dim, "batch buffers")?,
            h3: zeroed(batch_rows * c.hidden_dim, "batch buffers")?,
            aq: (0..batch_rows)
                .map(|_| QuantizedVec::with_capacity(c.dim, group_size))
                .collect(),
            hq: (0..batch_rows)
                .map(|_| QuantizedVec::with_capacity(c.hidden_dim, group_size))
                .collect(),
        };
        Ok(State {
            position: 0,
            mem: zeroed(c.n_layers * c.mem_len * c.dim, "the memory")?,
            key_cache: zeroed(cache_len, "the key cache")?,
            value_cache: zeroed(cache_len, "the value cache")?,
            window_pending: false,
            scratch: Scratch {
                x: vec![0.0; c.dim],
                xb: vec![0.0; c.dim],
                xb2: vec![0.0; c.dim],
                hb: vec![0.0; c.hidden_dim],
                hb2: vec![0.0; c.hidden_dim],
                q: vec![0.0; c.dim],
                scores: zeroed(c.n_heads.saturating_mul(c.cache_rows()), "attention scores")?,
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
