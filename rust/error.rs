//! The crate's error type. Every variant names the value that was wrong and, where it helps,
//! what was expected, so that a message can be shown to a user as it is.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A header field outside its valid range or inconsistent with another field.
    #[error("invalid checkpoint {path}: {field} is {value}, expected {expected}")]
    InvalidHeader {
        path: PathBuf,
        field: &'static str,
        value: String,
        expected: String,
    },

    /// The file length does not match what its header implies.
    #[error("invalid checkpoint {path}: {message}")]
    InvalidLayout { path: PathBuf, message: String },

    /// A token id outside `0..vocab_size`.
    #[error("token id {token} is out of range: the model's vocab_size is {vocab_size}")]
    TokenOutOfRange { token: i64, vocab_size: usize },

    /// A plain llama2.c model has a fixed context of `seq_len` positions.
    #[error(
        "context is full: this plain llama2.c model has seq_len {seq_len} and cannot take \
         token {position}; reset the state or use a Llama2RNN memory model"
    )]
    ContextFull { seq_len: usize, position: usize },

    /// The forward pass produced NaN or infinite logits (corrupt weights, overflow).
    #[error(
        "the model produced a non-finite logit ({value}) for token {token}: the checkpoint's \
         weights are probably corrupt"
    )]
    NonFiniteLogits { token: usize, value: f32 },

    /// A saved memory that cannot be restored into this model.
    #[error("invalid memory file: {0}")]
    InvalidMemory(String),

    /// A buffer the header requires (the key/value cache of a huge seq_len, say) cannot be
    /// allocated.
    #[error(
        "cannot allocate {what}: {bytes} bytes; the checkpoint's {field} is too large for \
         this machine's memory"
    )]
    OutOfMemory {
        what: &'static str,
        field: &'static str,
        bytes: u128,
    },

    /// A setting given by the caller is out of range; the message names it.
    #[error("{0}")]
    InvalidSetting(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
