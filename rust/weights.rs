//! Read-only model weights, borrowed from a memory-mapped checkpoint.

use std::path::Path;
use std::sync::OnceLock;

use memmap2::{Mmap, MmapMut};
use rayon::prelude::*;

use crate::checkpoint::{self, Format, Header, Region};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::{KernelPath, PackedQ8};

#[cfg(target_endian = "big")]
compile_error!("checkpoints are little-endian and are mapped without conversion");

/// A weight matrix of shape (rows, cols), row-major: `x @ W.T` maps cols inputs to rows outputs.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: MatrixData,
    /// The Q8_0 weights in the layout of the packed kernels, set by [`Weights::pack`] when the
    /// kernel path packs them.
    packed: OnceLock<PackedQ8>,
    /// Whether nothing reads the row-major weights once they are packed. Then their pages
    /// can leave the resident set; a classifier that shares the embedding table keeps them.
    release_after_packing: bool,
}

impl Clone for Matrix {
    fn clone(&self) -> Self {
        Matrix::new(self.rows, self.cols, self.data)
    }
}

#[derive(Clone, Copy)]
pub enum MatrixData {
    /// Q8_0: `q` contains rows*cols int8 values, `scales` one fp32 per `group_size` values.
    Q8 {
        q: &'static [i8],
        scales: &'static [f32],
        group_size: usize,
    },
    F32(&'static [f32]),
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: MatrixData) -> Self {
        Matrix {
            rows,
            cols,
            data,
            packed: OnceLock::new(),
            release_after_packing: true,
        }
    }

    fn packs(&self, kernel: KernelPath) -> bool {
        matches!(self.data, MatrixData::Q8 { group_size, .. } if kernel.packs(group_size))
    }

    /// Packs this Q8_0 matrix into `slot` (see [`Weights::pack`]).
    fn pack_into(&self, slot: &'static mut [u8]) {
        if let MatrixData::Q8 {
            q,
            scales,
            group_size,
        } = self.data
        {
            let packed = PackedQ8::pack_into(slot, q, scales, self.rows, self.cols, group_size);
            if self.packed.set(packed).is_ok() && self.release_after_packing {
                release_pages(q);
            }
        }
    }

    /// Returns the packed weights when `kernel` runs this matrix packed. [`Weights::pack`]
    /// made them when the model was opened; a path that does not pack gets None, and so
    /// runs the row-major weights.
    pub fn packed(&self, kernel: KernelPath) -> Option<&PackedQ8> {
        self.packed.get().filter(|_| self.packs(kernel))
    }

    /// Writes row `row` as fp32 into `out` (`cols` values), dequantizing Q8_0.
    pub fn read_row(&self, row: usize, out: &mut [f32]) {
        let range = row * self.cols..(row + 1) * self.cols;
        match self.data {
            MatrixData::F32(w) => out.copy_from_slice(&w[range]),
            MatrixData::Q8 {
                q,
                scales,
                group_size,
            } => {
                for (i, (o, &v)) in out.iter_mut().zip(&q[range.clone()]).enumerate() {
                    *o = v as f32 * scales[(range.start + i) / group_size];
                }
            }
        }
    }
}

/// Drops the mapped pages that lie wholly inside `bytes` from the resident set once their
/// packed copy exists, so that a packed model does not hold its weights twice. The file stays
/// in the page cache and a later read maps the page back in.
fn release_pages(bytes: &[i8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        let start = (bytes.as_ptr() as usize).next_multiple_of(page);
        let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
        if end > start {
            // SAFETY: every Q8_0 matrix borrows from the read-only file mapping (`Slicer`
            // copies only misaligned fp32 arrays), and dropping pages of a file mapping only
            // makes the next read fetch them from the file again. The advice is a hint, so
            // its result is ignored.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(unix))]
    let _ = bytes;
}

/// Requests huge pages for `bytes` (untouched anonymous memory) where transparent huge pages
/// are enabled on request. The advice is a hint, so its result is ignored.
fn advise_huge_pages(bytes: &mut [u8]) {
    #[cfg(target_os = "linux")]
    // SAFETY: the range is memory this process owns. The advice changes how the kernel backs
    // the pages, not their contents.
    unsafe {
        libc::madvise(
            bytes.as_mut_ptr() as *mut libc::c_void,
            bytes.len(),
            libc::MADV_HUGEPAGE,
        )
    };
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

/// Weights of one layer. Shapes are (rows, cols) = (out, in).
pub struct LayerWeights {
    pub rms_att: &'static [f32], // (dim,)
    pub rms_ffn: &'static [f32], // (dim,)
    pub wq: Matrix,              // (dim, dim)
    pub wk: Matrix,              // (kv_dim, dim)
    pub wv: Matrix,              // (kv_dim, dim)
    pub wo: Matrix,              // (dim, dim)
    pub w1: Matrix,              // (hidden_dim, dim)
    pub w2: Matrix,              // (dim, hidden_dim)
    pub w3: Matrix,              // (hidden_dim, dim)
    pub memory: Option<MemoryWeights>,
}

/// The memory weights of one layer: the memory FFN, its norms and the initial memory.
pub struct MemoryWeights {
    pub rms_mff: &'static [f32], // (dim,) norm before the memory FFN
    pub rms_mem: &'static [f32], // (dim,) norm before the memory keys/values
    pub ori_mem: &'static [f32], // (mem_len, dim) learned initial memory
    pub aw1: Matrix,             // (hidden_dim, dim)
    pub aw2: Matrix,             // (dim, hidden_dim)
    pub aw3: Matrix,             // (hidden_dim, dim)
}

/// All weights of a checkpoint.
///
/// The slices borrow from `map` (or from `owned`, for fp32 arrays that the file does not align
/// to 4 bytes) and are given the `'static` lifetime so that the struct can own its map.
/// SAFETY: the mapped and the boxed memory never move and live exactly as long as this struct;
/// the fields are `pub(crate)` slices that the crate only uses through `&self` borrows of it.
pub struct Weights {
    pub format: Format,
    pub config: Config,
    pub group_size: Option<usize>,
    pub(crate) embedding: Matrix, // (vocab_size, dim)
    pub(crate) layers: Vec<LayerWeights>,
    pub(crate) rms_final: &'static [f32], // (dim,)
    pub(crate) wcls: Matrix,              // (vocab_size, dim), the embedding when shared
    pub file_len: u64,
    /// Identifies these weights in saved memories; see [`fingerprint`].
    pub fingerprint: u64,
    _owned: Vec<Box<[f32]>>,
    _map: Mmap,
    /// The mapping that [`Weights::pack`] packed the matrices into; they borrow from it.
    _packed: Option<MmapMut>,
}

impl Weights {
    /// Maps the checkpoint at `path` after validating its header and length.
    pub fn open(path: &Path, expected: Option<Format>) -> Result<Weights> {
        let header = checkpoint::read_header(path, expected)?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only. As with every mmap loader, a checkpoint modified by
        // another process while it is mapped gives undefined results; checkpoints are not
        // written in place by this crate.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if map.len() as u64 != header.layout.file_len {
            return Err(Error::InvalidLayout {
                path: path.into(),
                message: format!(
                    "the file changed size while it was opened ({} bytes, expected {})",
                    map.len(),
                    header.layout.file_len
                ),
            });
        }
        let fingerprint = fingerprint(&map);
        Ok(build(header, map, fingerprint))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Returns the matrices that multiply activations (all but the embedding table).
    fn matrices(&self) -> impl Iterator<Item = &Matrix> {
        let layers = self.layers.iter().flat_map(|l| {
            let memory = l.memory.iter().flat_map(|m| [&m.aw1, &m.aw2, &m.aw3]);
            [&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3]
                .into_iter()
                .chain(memory)
        });
        layers.chain([&self.wcls])
    }

    /// Packs every Q8_0 matrix for `kernel` into one buffer, once; does nothing when the
    /// path does not pack. The buffer starts on a 2 MiB boundary and requests huge pages,
    /// because a decode token streams all of it. On 4 KiB pages the TLB misses cost the 110M
    /// shape about a fifth of its decode speed (`benches/RESULTS.md`). Inside a thread pool
    /// the matrices are packed in parallel.
    pub(crate) fn pack(&mut self, kernel: KernelPath) -> Result<()> {
        const HUGE_PAGE: usize = 2 << 20;
        if self._packed.is_some() {
            return Ok(());
        }
        let todo: Vec<&Matrix> = self.matrices().filter(|m| m.packs(kernel)).collect();
        let lens: Vec<usize> = todo
            .iter()
            .map(|m| PackedQ8::packed_len(m.rows, m.cols))
            .collect();
        let total: usize = lens.iter().sum();
        if total == 0 {
            return Ok(());
        }

        let mut map = MmapMut::map_anon(total + HUGE_PAGE).map_err(|_| Error::OutOfMemory {
            what: "packed weights",
            field: "dimensions",
            bytes: (total + HUGE_PAGE) as u128,
        })?;
        let base = map.as_mut_ptr();
        let offset = (base as usize).next_multiple_of(HUGE_PAGE) - base as usize;
        // SAFETY: `offset + total` bytes fit the map. `_packed` keeps the map for as long as
        // the matrices that borrow from it, and moving the map does not move its memory.
        let mut rest: &'static mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(base.add(offset), total) };
        advise_huge_pages(rest);

        let mut slots = Vec::with_capacity(lens.len());
        for len in lens {
            let (slot, tail) = rest.split_at_mut(len);
            slots.push(slot);
            rest = tail;
        }
        let pack = |(m, slot): (&&Matrix, &'static mut [u8])| m.pack_into(slot);
        if rayon::current_thread_index().is_some() {
            todo.par_iter().zip(slots).for_each(pack);
        } else {
            todo.iter().zip(slots).for_each(pack);
        }
        self._packed = Some(map);
        Ok(())
    }
}

/// FNV-1a over the header, the length and 256 samples of 256 bytes spread over the file.
///
/// NOTE: a sample, not a hash of every byte, so that opening a large model stays cheap. Two
/// checkpoints that differ only between the samples get the same fingerprint; trained or
/// random weights differ nearly everywhere, so in practice any other model is detected.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    const SAMPLES: usize = 256;
    const SAMPLE_BYTES: usize = 256;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |data: &[u8]| {
        for &b in data {
            hash = (hash ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(&(bytes.len() as u64).to_le_bytes());
    eat(&bytes[..bytes.len().min(checkpoint::HEADER_BYTES as usize)]);
    let stride = (bytes.len() / SAMPLES).max(1);
    for start in (0..bytes.len()).step_by(stride).take(SAMPLES) {
        eat(&bytes[start..(start + SAMPLE_BYTES).min(bytes.len())]);
    }
    hash
}

fn build(header: Header, map: Mmap, fingerprint: u64) -> Weights {
    let Header {
        format,
        config,
        group_size,
        layout,
    } = header;
    let mut slicer = Slicer {
        base: map.as_ptr(),
        owned: Vec::new(),
        group_size: group_size.unwrap_or(1),
    };
    let (dim, hidden, kv_dim) = (config.dim, config.hidden_dim, config.kv_dim());

    let mut layers = Vec::with_capacity(config.n_layers);
    for l in 0..config.n_layers {
        let memory = layout.memory.as_ref().map(|m| MemoryWeights {
            rms_mff: slicer.f32s(m.rms_mff.at(l)),
            rms_mem: slicer.f32s(m.rms_mem.at(l)),
            ori_mem: slicer.f32s(m.ori_mem.at(l)),
            aw1: slicer.matrix(m.aw1.at(l), hidden, dim),
            aw2: slicer.matrix(m.aw2.at(l), dim, hidden),
            aw3: slicer.matrix(m.aw3.at(l), hidden, dim),
        });
        layers.push(LayerWeights {
            rms_att: slicer.f32s(layout.rms_att.at(l)),
            rms_ffn: slicer.f32s(layout.rms_ffn.at(l)),
            wq: slicer.matrix(layout.wq.at(l), dim, dim),
            wk: slicer.matrix(layout.wk.at(l), kv_dim, dim),
            wv: slicer.matrix(layout.wv.at(l), kv_dim, dim),
            wo: slicer.matrix(layout.wo.at(l), dim, dim),
            w1: slicer.matrix(layout.w1.at(l), hidden, dim),
            w2: slicer.matrix(layout.w2.at(l), dim, hidden),
            w3: slicer.matrix(layout.w3.at(l), hidden, dim),
            memory,
        });
    }
    let embedding = slicer.matrix(layout.embedding, config.vocab_size, dim);
    let wcls = match layout.wcls {
        Some(region) => slicer.matrix(region, config.vocab_size, dim),
        // Embedding rows are read token by token for the whole run, so the shared table
        // stays resident rather than coming back page by page.
        None => Matrix {
            release_after_packing: false,
            ..embedding.clone()
        },
    };
    Weights {
        format,
        config,
        group_size,
        embedding,
        layers,
        rms_final: slicer.f32s(layout.rms_final),
        wcls,
        file_len: layout.file_len,
        fingerprint,
        _owned: slicer.owned,
        _map: map,
        _packed: None,
    }
}

/// Turns validated regions into slices of the map.
struct Slicer {
    base: *const u8,
    owned: Vec<Box<[f32]>>,
    group_size: usize,
}

impl Slicer {
    /// fp32 values at `offset`, borrowed when 4-byte aligned and copied otherwise (Q8_0 scales
    /// follow int8 arrays of any length, so they can start at any byte).
    fn f32_at(&mut self, offset: u64, len: usize) -> &'static [f32] {
        // SAFETY: `checkpoint::plan` computed every region inside the file length, which
        // `Weights::open` checked against the map's length.
        let ptr = unsafe { self.base.add(offset as usize) };
        if (ptr as usize).is_multiple_of(std::mem::align_of::<f32>()) {
            // SAFETY: in bounds (above), aligned (checked), and any bit pattern is a valid f32.
            return unsafe { std::slice::from_raw_parts(ptr as *const f32, len) };
        }
        // SAFETY: in bounds (above); read as bytes, so alignment does not matter.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len * 4) };
        let values: Box<[f32]> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // SAFETY: the box is kept in `owned` for the lifetime of the weights and never moved
        // out; moving the Box itself does not move its heap allocation.
        let slice = unsafe { std::slice::from_raw_parts(values.as_ptr(), len) };
        self.owned.push(values);
        slice
    }

    fn f32s(&mut self, region: Region) -> &'static [f32] {
        match region {
            Region::F32 { offset, len } => self.f32_at(offset, len),
            Region::Q8 { .. } => unreachable!("norm weights and ori_mem are fp32 in every format"),
        }
    }

    fn matrix(&mut self, region: Region, rows: usize, cols: usize) -> Matrix {
        let data = match region {
            Region::F32 { offset, len } => MatrixData::F32(self.f32_at(offset, len)),
            Region::Q8 {
                offset,
                len,
                scales_offset,
            } => {
                // SAFETY: in bounds as above; i8 has alignment 1.
                let q = unsafe {
                    std::slice::from_raw_parts(self.base.add(offset as usize) as *const i8, len)
                };
                let scales = self.f32_at(scales_offset, len / self.group_size);
                MatrixData::Q8 {
                    q,
                    scales,
                    group_size: self.group_size,
                }
            }
        };
        Matrix::new(rows, cols, data)
    }
}
