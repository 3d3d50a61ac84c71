//! llama2rnn: a runtime for Llama2RNN recurrent language models.
//!
//! A Llama2RNN model is a llama2.c-style Llama transformer whose attention covers a fixed
//! window: M memory slots plus the current chunk of at most M tokens. After each chunk, the
//! chunk's attention outputs pass through a small memory FFN and become the next memory, so
//! every token costs the same compute and memory however long the input runs.
//!
//! The crate is usable from Rust alone; the `python` feature adds the PyO3 bindings.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod kernels;
pub mod memory_file;
pub mod weights;

pub use checkpoint::Format;
pub use config::Config;
pub use error::{Error, Result};
pub use kernels::KernelPath;
pub use weights::Weights;
pub mod model;
pub mod sampler;

pub use model::{Options, State, Transformer, UpdateMode};
pub use sampler::Sampler;

#[cfg(feature = "python")]
mod bindings;
