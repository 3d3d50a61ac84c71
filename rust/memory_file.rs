//! The memory file: a model's whole recurrent state as bytes, so that a run can stop and
//! continue later exactly where it was.
//!
//! Layout (little-endian), a 128-byte header, the payload, then a CRC-32 of everything before:
//!
//! | offset | field |
//! |---|---|
//! | 0 | magic `b"L2RNMEM\0"` |
//! | 8 | u32 format version (1) |
//! | 12 | u32 header length (128) |
//! | 16 | 8 x u32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, mem_len |
//! | 48 | u8 shared_classifier, u8 checkpoint format (0 llama2rnn, 1..3 llama2c v2, v1, v0), u8 update mode (0 chunk, 1 token), u8 0 |
//! | 52 | u32 group size (0 for fp32 checkpoints) |
//! | 56 | u64 fingerprint of the checkpoint's weights |
//! | 64 | u64 tokens consumed |
//! | 72 | u32 rows of the current chunk stored below (plain models: all rows so far) |
//! | 76 | u32 0 |
//! | 80 | u64 sampler random generator state |
//! | 88 | i64 last token fed, -1 for none |
//! | 96 | u64 time of saving, milliseconds since the Unix epoch |
//! | 104 | zero padding to 128 |
//!
//! Payload, all f32: memory models store `mem` (n_layers, mem_len, dim), then per layer the
//! key rows (mem_len memory rows + the stored chunk rows, kv_dim each), then the value rows
//! likewise; plain models store per layer their stored key rows, then the value rows. Last,
//! the logits of the last token (vocab_size) when at least one token was fed, so that
//! sampling continues without running that token again.

use crate::checkpoint::Format;
use crate::error::{Error, Result};
use crate::model::{State, Transformer, UpdateMode};

pub const MAGIC: &[u8; 8] = b"L2RNMEM\0";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 128;

/// Front-end data saved with the state: the sampler and the last token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    pub rng_state: u64,
    pub last_token: Option<u32>,
    pub saved_unix_ms: u64,
}

/// Header facts of a memory file, readable without the model (for listings).
#[derive(Debug, Clone)]
pub struct MemoryHeader {
    pub version: u32,
    pub config: [u32; 8],
    pub shared_classifier: bool,
    pub format: Format,
    pub mode: UpdateMode,
    pub group_size: u32,
    pub fingerprint: u64,
    pub position: u64,
    pub stored_rows: u32,
    pub info: SessionInfo,
}

const FORMATS: [Format; 4] = [
    Format::Llama2Rnn,
    Format::Llama2cV2,
    Format::Llama2cV1,
    Format::Llama2cV0,
];

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidMemory(message.into())
}

/// Rows of the current chunk (memory models) or of all positions (plain models) in `state`.
fn stored_rows(model: &Transformer, state: &State) -> usize {
    let c = model.config();
    if c.is_memory_model() {
        (state.position % c.mem_len as u64) as usize
    } else {
        state.position.min(c.seq_len as u64) as usize
    }
}

/// Serializes `state` of `model` with the front end's `info`.
pub fn encode(model: &Transformer, state: &mut State, info: &SessionInfo) -> Vec<u8> {
    model.ready_window(state);
    let state = &*state;
    let c = *model.config();
    let rows = stored_rows(model, state);
    let mut out =
        Vec::with_capacity(HEADER_BYTES + 4 * (state.mem.len() + 2 * state.key_cache.len()));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
    for v in [
        c.dim,
        c.hidden_dim,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.vocab_size,
        c.seq_len,
        c.mem_len,
    ] {
        out.extend_from_slice(&(v as u32).to_le_bytes());
    }
    let format_code = FORMATS
        .iter()
        .position(|&f| f == model.weights.format)
        .unwrap_or(0) as u8;
    let mode_code = (model.mode == UpdateMode::Token) as u8;
    out.extend_from_slice(&[c.shared_classifier as u8, format_code, mode_code, 0]);
    out.extend_from_slice(&(model.weights.group_size.unwrap_or(0) as u32).to_le_bytes());
    out.extend_from_slice(&model.weights.fingerprint.to_le_bytes());
    out.extend_from_slice(&state.position.to_le_bytes());
    out.extend_from_slice(&(rows as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&info.rng_state.to_le_bytes());
    out.extend_from_slice(&info.last_token.map_or(-1i64, |t| t as i64).to_le_bytes());
    out.extend_from_slice(&info.saved_unix_ms.to_le_bytes());
    out.resize(HEADER_BYTES, 0);

    let put = |out: &mut Vec<u8>, values: &[f32]| {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    };
    put(&mut out, &state.mem);
    let window_rows = if c.is_memory_model() {
        c.mem_len + rows
    } else {
        rows
    };
    let layer_len = c.cache_rows() * c.kv_dim();
    for cache in [&state.key_cache, &state.value_cache] {
        for l in 0..c.n_layers {
            put(
                &mut out,
                &cache[l * layer_len..l * layer_len + window_rows * c.kv_dim()],
            );
        }
    }
    if state.position > 0 {
        put(&mut out, state.logits());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Parses and checks the header and checksum of a memory file without a model.
pub fn read_header(bytes: &[u8]) -> Result<MemoryHeader> {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(invalid(
            "not a llama2rnn memory file (the magic bytes are missing)",
        ));
    }
    if bytes.len() < HEADER_BYTES + 4 {
        return Err(invalid(format!(
            "the file is truncated: {} bytes, shorter than a header",
            bytes.len()
        )));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if version != VERSION {
        return Err(invalid(format!(
            "memory format version {version} is not supported (this llama2rnn reads version {VERSION}); \
             use the llama2rnn release that wrote it"
        )));
    }
    let (body, stored) = bytes.split_at(bytes.len() - 4);
    let stored_crc = u32::from_le_bytes(stored.try_into().expect("4 bytes"));
    if crc32fast::hash(body) != stored_crc {
        return Err(invalid(
            "checksum mismatch: the file is truncated or corrupt",
        ));
    }
    let mut config = [0u32; 8];
    for (i, v) in config.iter_mut().enumerate() {
        *v = u32_at(16 + 4 * i);
    }
    let format = *FORMATS
        .get(bytes[49] as usize)
        .ok_or_else(|| invalid(format!("unknown checkpoint format code {}", bytes[49])))?;
    let mode = match bytes[50] {
        0 => UpdateMode::Chunk,
        1 => UpdateMode::Token,
        other => return Err(invalid(format!("unknown update mode code {other}"))),
    };
    let last_token = u64_at(88) as i64;
    Ok(MemoryHeader {
        version,
        config,
        shared_classifier: bytes[48] != 0,
        format,
        mode,
        group_size: u32_at(52),
        fingerprint: u64_at(56),
        position: u64_at(64),
        stored_rows: u32_at(72),
        info: SessionInfo {
            rng_state: u64_at(80),
            last_token: u32::try_from(last_token).ok(),
            saved_unix_ms: u64_at(96),
        },
    })
}

/// Restores `state` from `bytes`, which must come from the same weights and update mode.
/// `state` is left unchanged when this fails.
pub fn decode(model: &Transformer, state: &mut State, bytes: &[u8]) -> Result<SessionInfo> {
    let header = read_header(bytes)?;
    let c = *model.config();
    let expected = [
        c.dim,
        c.hidden_dim,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.vocab_size,
        c.seq_len,
        c.mem_len,
    ];
    if header
        .config
        .iter()
        .zip(expected)
        .any(|(&a, b)| a as usize != b)
    {
        return Err(invalid(format!(
            "the memory belongs to a model with config {:?} (dim, hidden_dim, n_layers, n_heads, \
             n_kv_heads, vocab_size, seq_len, mem_len), but this model has {expected:?}",
            header.config
        )));
    }
    if header.fingerprint != model.weights.fingerprint {
        return Err(invalid(
            "the memory was made by a model with the same config but other weights; load it \
             with the checkpoint that made it",
        ));
    }
    if header.mode != model.mode {
        return Err(invalid(format!(
            "the memory was built in {} update mode but the model runs in {} mode; load the \
             model with mode={:?}",
            header.mode.name(),
            model.mode.name(),
            header.mode.name()
        )));
    }
    if !c.is_memory_model() && header.position > c.seq_len as u64 {
        return Err(invalid(format!(
            "position {} is past this plain model's seq_len {}",
            header.position, c.seq_len
        )));
    }
    let rows = header.stored_rows as usize;
    let expected_rows = if c.is_memory_model() {
        (header.position % c.mem_len as u64) as usize
    } else {
        header.position.min(c.seq_len as u64) as usize
    };
    if rows != expected_rows {
        return Err(invalid(format!(
            "stored rows {rows} do not match position {}",
            header.position
        )));
    }
    let window_rows = if c.is_memory_model() {
        c.mem_len + rows
    } else {
        rows
    };
    let logits = if header.position > 0 { c.vocab_size } else { 0 };
    let floats = state.mem.len() + 2 * c.n_layers * window_rows * c.kv_dim() + logits;
    if bytes.len() != HEADER_BYTES + 4 * floats + 4 {
        return Err(invalid(format!(
            "the file is {} bytes but its header implies {}",
            bytes.len(),
            HEADER_BYTES + 4 * floats + 4
        )));
    }

    let mut values = bytes[HEADER_BYTES..bytes.len() - 4]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let mut take = |dst: &mut [f32]| {
        dst.iter_mut()
            .for_each(|d| *d = values.next().expect("length checked"))
    };
    take(&mut state.mem);
    state.window_pending = false;
    let layer_len = c.cache_rows() * c.kv_dim();
    for cache in [&mut state.key_cache, &mut state.value_cache] {
        for l in 0..c.n_layers {
            take(&mut cache[l * layer_len..l * layer_len + window_rows * c.kv_dim()]);
        }
    }
    if logits > 0 {
        take(&mut state.scratch.logits);
    } else {
        // Nothing has been fed at position 0, so there are no logits to keep.
        state.scratch.logits.fill(0.0);
    }
    state.position = header.position;
    Ok(header.info)
}
