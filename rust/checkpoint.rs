//! Checkpoint formats: header parsing, validation and the byte layout of every tensor.
//!
//! Four formats are read, all little-endian:
//!
//! * Llama2RNN memory checkpoint (`Format::Llama2Rnn`): 256-byte header with u32 magic
//!   `0x616b3432`, i32 version 2, eight i32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
//!   vocab_size, seq_len, mem_len), u8 shared_classifier at offset 40, i32 group_size at offset
//!   41. Then fp32 rms_att, rms_ffn, rms_mem, rms_mff (L*dim each), ori_mem (L*M*dim), rms_final
//!   (dim); then Q8_0 tensors (all int8 values, then all fp32 scales, one tensor per layer):
//!   embedding, wq, wk, wv, wo, w1, w2, w3, aw1, aw2, aw3, and the classifier if unshared.
//! * llama2.c version 2 (`Format::Llama2cV2`): the same magic and version with seven config
//!   ints, so the flag byte and group size sit at offsets 36 and 37. fp32 rms_att, rms_ffn,
//!   rms_final, then Q8_0 embedding, wq, wk, wv, wo, w1, w2, w3, classifier if unshared.
//! * llama2.c version 1 (`Format::Llama2cV1`): magic, version 1, seven ints, the flag byte; fp32
//!   rms_att, rms_ffn, rms_final, embedding, wq, wk, wv, wo, w1, w2, w3, classifier if unshared.
//! * legacy headerless version 0 (`Format::Llama2cV0`): seven i32 (a negative vocab_size means
//!   an unshared classifier), fp32 embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3,
//!   rms_final, two unused RoPE tables of seq_len*head_size/2 floats, classifier if unshared.
//!
//! Both version 2 layouts carry the same magic and version, so they are told apart by the exact
//! file size each implies. Every header value is untrusted: ranges, divisibility and the file
//! length are checked before anything is mapped.

use std::path::Path;

use crate::config::Config;
use crate::error::{Error, Result};

pub const MAGIC: u32 = 0x616b_3432;
pub const HEADER_BYTES: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Llama2Rnn,
    Llama2cV2,
    Llama2cV1,
    Llama2cV0,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Llama2Rnn => "llama2rnn",
            Format::Llama2cV2 => "llama2c-v2",
            Format::Llama2cV1 => "llama2c-v1",
            Format::Llama2cV0 => "llama2c-v0",
        }
    }

    pub fn from_name(name: &str) -> Option<Format> {
        [
            Format::Llama2Rnn,
            Format::Llama2cV2,
            Format::Llama2cV1,
            Format::Llama2cV0,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, Format::Llama2Rnn | Format::Llama2cV2)
    }

    fn describe(self) -> &'static str {
        match self {
            Format::Llama2Rnn => "a Llama2RNN memory checkpoint",
            Format::Llama2cV2 => "a plain llama2.c version 2 (Q8_0) checkpoint",
            Format::Llama2cV1 => "a plain llama2.c version 1 (fp32) checkpoint",
            Format::Llama2cV0 => "a legacy headerless llama2.c checkpoint",
        }
    }
}

/// Where one tensor lives in the file. Offsets are in bytes from the start of the file;
/// `len` counts elements.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Region {
    F32 {
        offset: u64,
        len: usize,
    },
    Q8 {
        offset: u64,
        len: usize,
        scales_offset: u64,
    },
}

/// The regions of one tensor in every layer: they follow each other at a fixed stride, so
/// planning a file costs the same for any n_layers (a hostile header can claim billions).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PerLayer {
    first: Region,
    stride: u64,
}

impl PerLayer {
    pub fn at(&self, layer: usize) -> Region {
        let shift = self.stride * layer as u64;
        match self.first {
            Region::F32 { offset, len } => Region::F32 {
                offset: offset + shift,
                len,
            },
            Region::Q8 {
                offset,
                len,
                scales_offset,
            } => Region::Q8 {
                offset: offset + shift,
                len,
                scales_offset: scales_offset + shift,
            },
        }
    }
}

/// The byte layout of every tensor of one checkpoint.
#[derive(Debug)]
pub(crate) struct Layout {
    pub rms_att: PerLayer,
    pub rms_ffn: PerLayer,
    pub rms_final: Region,
    pub embedding: Region,
    pub wq: PerLayer,
    pub wk: PerLayer,
    pub wv: PerLayer,
    pub wo: PerLayer,
    pub w1: PerLayer,
    pub w2: PerLayer,
    pub w3: PerLayer,
    /// Present only in memory checkpoints.
    pub memory: Option<MemoryLayout>,
    /// Present only when the classifier is not shared with the embedding.
    pub wcls: Option<Region>,
    pub file_len: u64,
}

#[derive(Debug)]
pub(crate) struct MemoryLayout {
    pub rms_mem: PerLayer,
    pub rms_mff: PerLayer,
    pub ori_mem: PerLayer,
    pub aw1: PerLayer,
    pub aw2: PerLayer,
    pub aw3: PerLayer,
}

/// A parsed and validated header together with the layout it implies.
#[derive(Debug)]
pub struct Header {
    pub format: Format,
    pub config: Config,
    /// Q8_0 group size; `None` for the fp32 formats.
    pub group_size: Option<usize>,
    pub(crate) layout: Layout,
}

/// Reads and validates the header of `path`, and checks that the file length matches it.
/// `expected` rejects a valid file of another format (a plain model where a memory model is
/// required, say).
pub fn read_header(path: &Path, expected: Option<Format>) -> Result<Header> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut bytes = Vec::with_capacity(HEADER_BYTES as usize);
    file.take(HEADER_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let header = parse_header(path, &bytes, file_len)?;
    if let Some(expected) = expected {
        if expected != header.format {
            return Err(Error::InvalidLayout {
                path: path.into(),
                message: format!(
                    "the file is {}, but {} was requested",
                    header.format.describe(),
                    expected.describe()
                ),
            });
        }
    }
    Ok(header)
}

fn parse_header(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header> {
    let reader = HeaderReader { path, bytes };
    if file_len < 28 {
        return Err(Error::InvalidLayout {
            path: path.into(),
            message: format!(
                "the file is {file_len} bytes long, too short for any checkpoint header"
            ),
        });
    }
    let magic = reader.u32(0)?;
    if magic != MAGIC {
        return parse_legacy(path, &reader, magic, file_len);
    }
    let version = reader.i32(4)?;
    match version {
        1 => {
            let config = reader.config(8, false, 36)?;
            let layout = plan(path, Format::Llama2cV1, &config, None)?;
            check_len(path, Format::Llama2cV1, &layout, file_len)?;
            Ok(Header {
                format: Format::Llama2cV1,
                config,
                group_size: None,
                layout,
            })
        }
        2 => parse_version2(path, &reader, file_len),
        _ => Err(invalid(
            path,
            "version",
            version,
            "1 or 2 (llama2.c) or 2 (Llama2RNN)",
        )),
    }
}

/// Version 2 is shared by the memory and the plain Q8_0 layout: keep the one whose header is
/// valid and whose implied size equals the file's.
fn parse_version2(path: &Path, reader: &HeaderReader, file_len: u64) -> Result<Header> {
    let memory = reader
        .config(8, true, 40)
        .and_then(|c| Ok((c, reader.group_size(41)?)))
        .and_then(|(c, gs)| Ok((c, gs, plan(path, Format::Llama2Rnn, &c, Some(gs))?)));
    let plain = reader
        .config(8, false, 36)
        .and_then(|c| Ok((c, reader.group_size(37)?)))
        .and_then(|(c, gs)| Ok((c, gs, plan(path, Format::Llama2cV2, &c, Some(gs))?)));

    let mut errors = Vec::new();
    for (format, parsed) in [(Format::Llama2Rnn, memory), (Format::Llama2cV2, plain)] {
        match parsed {
            Ok((config, gs, layout)) if layout.file_len == file_len => {
                return Ok(Header {
                    format,
                    config,
                    group_size: Some(gs),
                    layout,
                });
            }
            Ok((_, _, layout)) => errors.push(format!(
                "as {} it would be {} bytes",
                format.describe(),
                layout.file_len
            )),
            Err(e) => errors.push(format!(
                "as {}: {}",
                format.describe(),
                strip_path(&e, path)
            )),
        }
    }
    Err(Error::InvalidLayout {
        path: path.into(),
        message: format!(
            "version 2 file of {file_len} bytes matches no layout ({}); the file is truncated, \
             padded or not a checkpoint",
            errors.join("; ")
        ),
    })
}

/// A file without the magic is either the headerless version 0 or not a checkpoint at all.
fn parse_legacy(path: &Path, reader: &HeaderReader, magic: u32, file_len: u64) -> Result<Header> {
    let legacy = reader.config(0, false, usize::MAX).and_then(|config| {
        let layout = plan(path, Format::Llama2cV0, &config, None)?;
        check_len(path, Format::Llama2cV0, &layout, file_len)?;
        Ok(Header {
            format: Format::Llama2cV0,
            config,
            group_size: None,
            layout,
        })
    });
    legacy.map_err(|e| Error::InvalidLayout {
        path: path.into(),
        message: format!(
            "the file does not start with the magic {MAGIC:#010x} (its first 4 bytes are \
             {magic:#010x}), and read as a legacy headerless llama2.c checkpoint: {}",
            strip_path(&e, path)
        ),
    })
}

fn check_len(path: &Path, format: Format, layout: &Layout, file_len: u64) -> Result<()> {
    if layout.file_len == file_len {
        return Ok(());
    }
    let what = if file_len < layout.file_len {
        "truncated"
    } else {
        "longer than its header implies"
    };
    Err(Error::InvalidLayout {
        path: path.into(),
        message: format!(
            "{} should be {} bytes for this config, but the file is {file_len} bytes ({what})",
            format.describe(),
            layout.file_len
        ),
    })
}

/// Returns the message of `e` without its "invalid checkpoint PATH:" prefix, for nesting in another.
fn strip_path(e: &Error, path: &Path) -> String {
    let text = e.to_string();
    let prefix = format!("invalid checkpoint {}: ", path.display());
    text.strip_prefix(&prefix)
        .map(str::to_owned)
        .unwrap_or(text)
}

fn invalid(path: &Path, field: &'static str, value: impl ToString, expected: &str) -> Error {
    Error::InvalidHeader {
        path: path.into(),
        field,
        value: value.to_string(),
        expected: expected.to_owned(),
    }
}

struct HeaderReader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
}

impl HeaderReader<'_> {
    fn array<const N: usize>(&self, offset: usize, field: &'static str) -> Result<[u8; N]> {
        self.bytes
            .get(offset..offset + N)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Error::InvalidLayout {
                path: self.path.into(),
                message: format!(
                    "the file ends inside the header ({} bytes) before the field {field}",
                    self.bytes.len()
                ),
            })
    }

    fn u32(&self, offset: usize) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(offset, "magic")?))
    }

    fn i32(&self, offset: usize) -> Result<i32> {
        Ok(i32::from_le_bytes(self.array(offset, "version")?))
    }

    fn field(&self, offset: usize, field: &'static str) -> Result<i32> {
        Ok(i32::from_le_bytes(self.array(offset, field)?))
    }

    fn group_size(&self, offset: usize) -> Result<usize> {
        let gs = i32::from_le_bytes(self.array(offset, "group_size")?);
        positive(self.path, "group_size", gs)
    }

    /// Reads the seven (or eight, with `mem_len`) config ints starting at `offset`, and the
    /// shared-classifier flag byte at `flag_offset` (`usize::MAX` for version 0, where the
    /// sign of vocab_size carries it).
    fn config(&self, offset: usize, with_mem_len: bool, flag_offset: usize) -> Result<Config> {
        let names = [
            "dim",
            "hidden_dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "seq_len",
        ];
        let mut raw = [0i32; 8];
        for (i, name) in names.iter().enumerate() {
            raw[i] = self.field(offset + 4 * i, name)?;
        }
        if with_mem_len {
            raw[7] = self.field(offset + 28, "mem_len")?;
        }
        let shared_classifier = if flag_offset == usize::MAX {
            let shared = raw[5] > 0;
            raw[5] = raw[5].checked_abs().ok_or_else(|| {
                invalid(
                    self.path,
                    "vocab_size",
                    raw[5],
                    "a nonzero integer (negative marks a separate classifier)",
                )
            })?;
            shared
        } else {
            let [flag] = self.array::<1>(flag_offset, "shared_classifier")?;
            match flag {
                0 => false,
                1 => true,
                other => return Err(invalid(self.path, "shared_classifier", other, "0 or 1")),
            }
        };
        let p = self.path;
        let config = Config {
            dim: positive(p, "dim", raw[0])?,
            hidden_dim: positive(p, "hidden_dim", raw[1])?,
            n_layers: positive(p, "n_layers", raw[2])?,
            n_heads: positive(p, "n_heads", raw[3])?,
            n_kv_heads: positive(p, "n_kv_heads", raw[4])?,
            vocab_size: positive(p, "vocab_size", raw[5])?,
            seq_len: positive(p, "seq_len", raw[6])?,
            mem_len: if with_mem_len {
                positive(p, "mem_len", raw[7])?
            } else {
                0
            },
            shared_classifier,
        };
        validate(p, &config)?;
        Ok(config)
    }
}

fn positive(path: &Path, field: &'static str, value: i32) -> Result<usize> {
    if value > 0 {
        Ok(value as usize)
    } else {
        Err(invalid(path, field, value, "a positive integer"))
    }
}

/// Checks the relations between config fields that the forward pass relies on.
pub fn validate(path: &Path, c: &Config) -> Result<()> {
    if !c.dim.is_multiple_of(c.n_heads) {
        return Err(invalid(
            path,
            "n_heads",
            c.n_heads,
            &format!("a divisor of dim {}", c.dim),
        ));
    }
    if !c.head_size().is_multiple_of(2) {
        return Err(invalid(
            path,
            "n_heads",
            c.n_heads,
            &format!(
                "a value that makes head_size = dim / n_heads even for RoPE (dim {})",
                c.dim
            ),
        ));
    }
    if !c.n_heads.is_multiple_of(c.n_kv_heads) {
        return Err(invalid(
            path,
            "n_kv_heads",
            c.n_kv_heads,
            &format!("a divisor of n_heads {}", c.n_heads),
        ));
    }
    Ok(())
}

fn check_group_size(path: &Path, c: &Config, gs: usize) -> Result<()> {
    for (name, len) in [("dim", c.dim), ("hidden_dim", c.hidden_dim)] {
        if len % gs != 0 {
            return Err(invalid(
                path,
                "group_size",
                gs,
                &format!("a divisor of {name} {len}, so that every matrix row holds whole groups"),
            ));
        }
    }
    Ok(())
}

/// Byte offsets of consecutive tensors, with every size computed in checked arithmetic so that
/// a hostile header cannot overflow into a small, plausible file length.
struct Cursor<'a> {
    path: &'a Path,
    offset: u64,
    group_size: usize,
}

impl Cursor<'_> {
    fn overflow(&self) -> Error {
        Error::InvalidLayout {
            path: self.path.into(),
            message: "the tensor sizes implied by the header overflow a 64-bit file offset; \
                      the header's dimensions are corrupt"
                .into(),
        }
    }

    fn count(&self, dims: &[usize]) -> Result<usize> {
        dims.iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| self.overflow())
    }

    fn advance(&mut self, bytes: usize) -> Result<u64> {
        let start = self.offset;
        self.offset = u64::try_from(bytes)
            .ok()
            .and_then(|b| self.offset.checked_add(b))
            .ok_or_else(|| self.overflow())?;
        Ok(start)
    }

    fn f32s(&mut self, dims: &[usize]) -> Result<Region> {
        let len = self.count(dims)?;
        let bytes = len.checked_mul(4).ok_or_else(|| self.overflow())?;
        Ok(Region::F32 {
            offset: self.advance(bytes)?,
            len,
        })
    }

    fn q8(&mut self, dims: &[usize]) -> Result<Region> {
        let len = self.count(dims)?;
        let offset = self.advance(len)?;
        let scales = (len / self.group_size)
            .checked_mul(4)
            .ok_or_else(|| self.overflow())?;
        let scales_offset = self.advance(scales)?;
        Ok(Region::Q8 {
            offset,
            len,
            scales_offset,
        })
    }

    fn tensor(&mut self, quantized: bool, dims: &[usize]) -> Result<Region> {
        if quantized {
            self.q8(dims)
        } else {
            self.f32s(dims)
        }
    }

    fn per_layer(&mut self, quantized: bool, layers: usize, dims: &[usize]) -> Result<PerLayer> {
        let start = self.offset;
        let first = self.tensor(quantized, dims)?;
        let stride = self.offset - start;
        let rest = stride
            .checked_mul(layers as u64 - 1)
            .ok_or_else(|| self.overflow())?;
        self.offset = self
            .offset
            .checked_add(rest)
            .ok_or_else(|| self.overflow())?;
        Ok(PerLayer { first, stride })
    }
}

/// Computes the layout of `format` for `config`; the result's `file_len` is the exact size.
pub(crate) fn plan(path: &Path, format: Format, c: &Config, gs: Option<usize>) -> Result<Layout> {
    if let Some(gs) = gs {
        check_group_size(path, c, gs)?;
    }
    let start = match format {
        Format::Llama2cV0 => 28,
        _ => HEADER_BYTES,
    };
    let mut cur = Cursor {
        path,
        offset: start,
        group_size: gs.unwrap_or(1),
    };
    let (l, dim, hidden, kv_dim, vocab) =
        (c.n_layers, c.dim, c.hidden_dim, c.kv_dim(), c.vocab_size);
    let q = format.is_quantized();

    if format == Format::Llama2cV0 {
        let embedding = cur.f32s(&[vocab, dim])?;
        let rms_att = cur.per_layer(false, l, &[dim])?;
        let wq = cur.per_layer(false, l, &[dim, dim])?;
        let wk = cur.per_layer(false, l, &[kv_dim, dim])?;
        let wv = cur.per_layer(false, l, &[kv_dim, dim])?;
        let wo = cur.per_layer(false, l, &[dim, dim])?;
        let rms_ffn = cur.per_layer(false, l, &[dim])?;
        let w1 = cur.per_layer(false, l, &[hidden, dim])?;
        let w2 = cur.per_layer(false, l, &[dim, hidden])?;
        let w3 = cur.per_layer(false, l, &[hidden, dim])?;
        let rms_final = cur.f32s(&[dim])?;
        cur.f32s(&[c.seq_len, c.head_size() / 2, 2])?; // freq_cis_real and freq_cis_imag, unused
        let wcls = if c.shared_classifier {
            None
        } else {
            Some(cur.f32s(&[vocab, dim])?)
        };
        return Ok(Layout {
            rms_att,
            rms_ffn,
            rms_final,
            embedding,
            wq,
            wk,
            wv,
            wo,
            w1,
            w2,
            w3,
            memory: None,
            wcls,
            file_len: cur.offset,
        });
    }

    let rms_att = cur.per_layer(false, l, &[dim])?;
    let rms_ffn = cur.per_layer(false, l, &[dim])?;
    let memory_norms = if format == Format::Llama2Rnn {
        let rms_mem = cur.per_layer(false, l, &[dim])?;
        let rms_mff = cur.per_layer(false, l, &[dim])?;
        let ori_mem = cur.per_layer(false, l, &[c.mem_len, dim])?;
        Some((rms_mem, rms_mff, ori_mem))
    } else {
        None
    };
    let rms_final = cur.f32s(&[dim])?;
    let embedding = cur.tensor(q, &[vocab, dim])?;
    let wq = cur.per_layer(q, l, &[dim, dim])?;
    let wk = cur.per_layer(q, l, &[kv_dim, dim])?;
    let wv = cur.per_layer(q, l, &[kv_dim, dim])?;
    let wo = cur.per_layer(q, l, &[dim, dim])?;
    let w1 = cur.per_layer(q, l, &[hidden, dim])?;
    let w2 = cur.per_layer(q, l, &[dim, hidden])?;
    let w3 = cur.per_layer(q, l, &[hidden, dim])?;
    let memory = match memory_norms {
        Some((rms_mem, rms_mff, ori_mem)) => Some(MemoryLayout {
            rms_mem,
            rms_mff,
            ori_mem,
            aw1: cur.per_layer(q, l, &[hidden, dim])?,
            aw2: cur.per_layer(q, l, &[dim, hidden])?,
            aw3: cur.per_layer(q, l, &[hidden, dim])?,
        }),
        None => None,
    };
    let wcls = if c.shared_classifier {
        None
    } else {
        Some(cur.tensor(q, &[vocab, dim])?)
    };
    Ok(Layout {
        rms_att,
        rms_ffn,
        rms_final,
        embedding,
        wq,
        wk,
        wv,
        wo,
        w1,
        w2,
        w3,
        memory,
        wcls,
        file_len: cur.offset,
    })
}
