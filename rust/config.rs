//! Model hyperparameters as read from a checkpoint header.

/// The shape of a model. `mem_len` is 0 for a plain llama2.c model, which uses ordinary causal
/// attention over `seq_len` positions instead of memory attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub dim: usize,
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    /// Training sequence length. Memory models run past it; plain models stop there.
    pub seq_len: usize,
    /// M: memory slots per layer, and the chunk length.
    pub mem_len: usize,
    pub shared_classifier: bool,
}

impl Config {
    pub fn head_size(&self) -> usize {
        self.dim / self.n_heads
    }

    pub fn kv_dim(&self) -> usize {
        self.head_size() * self.n_kv_heads
    }

    /// Query heads per key/value head (grouped-query attention).
    pub fn kv_mul(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    pub fn is_memory_model(&self) -> bool {
        self.mem_len > 0
    }

    /// Rows of the per-layer key/value cache: the 2M-row window of a memory model (M memory
    /// rows, then the current chunk), or all `seq_len` positions of a plain model.
    pub fn cache_rows(&self) -> usize {
        if self.is_memory_model() {
            2 * self.mem_len
        } else {
            self.seq_len
        }
    }

    /// Number of weights, counting a shared classifier once.
    pub fn parameter_count(&self) -> u64 {
        let (dim, hidden, layers) = (
            self.dim as u64,
            self.hidden_dim as u64,
            self.n_layers as u64,
        );
        let kv_dim = self.kv_dim() as u64;
        let vocab = self.vocab_size as u64;
        let attention = 2 * dim * dim + 2 * dim * kv_dim;
        let ffn = 3 * dim * hidden;
        let mut per_layer = attention + ffn + 2 * dim;
        let mut total = vocab * dim + dim;
        if self.is_memory_model() {
            per_layer += ffn + 2 * dim + self.mem_len as u64 * dim;
        }
        total += layers * per_layer;
        if !self.shared_classifier {
            total += vocab * dim;
        }
        total
    }
}

#[cfg(test)]
impl Config {
    /// A one-layer plain model with `n_heads` query heads of `head_size`, for tests of the
    /// attention alone: the other sizes are 1.
    pub fn attention_only(
        head_size: usize,
        n_heads: usize,
        n_kv_heads: usize,
        seq_len: usize,
    ) -> Config {
        Config {
            dim: head_size * n_heads,
            hidden_dim: 1,
            n_layers: 1,
            n_heads,
            n_kv_heads,
            vocab_size: 1,
            seq_len,
            mem_len: 0,
            shared_classifier: true,
        }
    }
}
