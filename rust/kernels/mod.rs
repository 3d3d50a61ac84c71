//! Matrix-vector kernels: Q8_0 weights times Q8_0-quantized activations, and plain fp32.
//!
//! Activations are quantized per group exactly as the weights are (symmetric, scale =
//! max|x| / 127, ties rounded away from zero), products are summed in int32 per group, and
//! each group's sum is scaled in fp32 as `(sum * w_scale) * x_scale`. Group g adds into lane
//! g % 8 of eight partial sums, which are added in a fixed tree at the end of the row: the
//! order a SIMD path computes in, written out in `generic`. Integer sums are exact and the
//! float steps run in the same order on every path, so every path returns bit-identical
//! results to the portable one. The one exception is a NaN result, whose sign and payload
//! the hardware picks.
//!
//! Paths: `generic` (portable Rust, what runs on ARM and other targets), `avx2`, `avxvnni`
//! (AVX2 with the 256-bit VNNI instructions of Intel cores that lack AVX-512), `avx512vnni`
//! (AVX-512 BW + VNNI), and `amx`: `avx512vnni` with the batched products on AMX tiles (Intel
//! Xeons since Sapphire Rapids, on Linux). The path is picked at run time from what the CPU
//! reports, or forced with [`KernelPath::from_name`] (the `LLAMA2RNN_KERNEL` environment
//! variable in the front ends).

mod generic;
mod packed;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_packed;
#[cfg(target_arch = "x86_64")]
mod x86_packed_amx;
#[cfg(target_arch = "x86_64")]
mod x86_packed_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_quantize;
#[cfg(target_arch = "x86_64")]
mod x86_quantize_avx2;

use std::ops::Range;

pub use packed::{PackedQ8, PANEL};

use crate::error::{Error, Result};

/// Returns how many of `inputs` inputs the `amx` path multiplies on tiles; the rest run the
/// AVX-512 kernel. A tile takes 16 inputs, padded with zeros. A tile of 2 to 8 inputs took
/// about as long as one of 16, 1.3-2.3x longer than the AVX-512 kernel, while at 16 inputs
/// the tiles ran 1.2-1.3x faster (Xeon, toy20M and 110M shapes). So a last tile of fewer than
/// 10 inputs is left to the AVX-512 kernel.
#[cfg(target_arch = "x86_64")]
fn amx_inputs(inputs: usize) -> usize {
    const TILE: usize = 16;
    const MIN_LAST_TILE: usize = 10;
    if inputs % TILE >= MIN_LAST_TILE {
        inputs
    } else {
        inputs - inputs % TILE
    }
}

/// Partial sums per row: one 256-bit register of f32.
pub const LANES: usize = 8;

/// Largest magnitude of a quantized value; -128 is never produced.
pub const Q_MAX: f32 = 127.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    Generic,
    Avx2,
    AvxVnni,
    Avx512Vnni,
    Amx,
}

impl KernelPath {
    pub const ALL: [KernelPath; 5] = [
        KernelPath::Generic,
        KernelPath::Avx2,
        KernelPath::AvxVnni,
        KernelPath::Avx512Vnni,
        KernelPath::Amx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Generic => "generic",
            KernelPath::Avx2 => "avx2",
            KernelPath::AvxVnni => "avxvnni",
            KernelPath::Avx512Vnni => "avx512vnni",
            KernelPath::Amx => "amx",
        }
    }

    /// Returns whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            KernelPath::Generic => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            KernelPath::AvxVnni => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni")
            }
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            KernelPath::Amx => KernelPath::Avx512Vnni.is_supported() && x86_packed_amx::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Panics unless this CPU runs the path, so that no SIMD kernel runs where its instructions
    /// are missing. [`Self::detect`] and [`Self::from_name`] return only supported paths, but
    /// the variants themselves are public.
    #[inline]
    fn check_supported(self) {
        assert!(
            self.is_supported(),
            "kernel path {} is not supported by this CPU",
            self.name()
        );
    }

    /// Returns the fastest path this CPU supports.
    pub fn detect() -> KernelPath {
        [
            KernelPath::Amx,
            KernelPath::Avx512Vnni,
            KernelPath::AvxVnni,
            KernelPath::Avx2,
        ]
        .into_iter()
        .find(|p| p.is_supported())
        .unwrap_or(KernelPath::Generic)
    }

    /// Returns all paths this CPU supports, portable first.
    pub fn supported() -> Vec<KernelPath> {
        Self::ALL.into_iter().filter(|p| p.is_supported()).collect()
    }

    /// Parses a path name ("auto" detects); rejects names this CPU cannot run.
    pub fn from_name(name: &str) -> Result<KernelPath> {
        if name == "auto" {
            return Ok(Self::detect());
        }
        let path = Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                Error::InvalidSetting(format!(
                    "unknown kernel path {name:?}: use auto, generic, avx2, avxvnni, avx512vnni or amx"
                ))
            })?;
        if !path.is_supported() {
            let names: Vec<_> = Self::supported().iter().map(|p| p.name()).collect();
            return Err(Error::InvalidSetting(format!(
                "kernel path {name:?} is not supported by this CPU; supported: {}",
                names.join(", ")
            )));
        }
        Ok(path)
    }

    /// `out[r] = dot(w row r, x)` for the `out.len()` rows whose int8 values start at `w_q`
    /// (row-major, `cols` per row) and whose scales start at `w_scales`.
    pub fn matvec_q8(self, out: &mut [f32], w_q: &[i8], w_scales: &[f32], x: &QuantizedVec) {
        let cols = x.q.len();
        debug_assert_eq!(w_q.len(), out.len() * cols);
        debug_assert_eq!(w_scales.len() * x.group_size, w_q.len());
        debug_assert!(!x.q.contains(&i8::MIN), "activations lie in -127..=127");
        self.check_supported();
        match self {
            KernelPath::Generic => generic::matvec_q8(out, w_q, w_scales, x),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `check_supported` passed above.
            KernelPath::Avx2 | KernelPath::AvxVnni => unsafe {
                x86::matvec_q8_avx2(out, w_q, w_scales, x)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            KernelPath::Avx512Vnni | KernelPath::Amx => unsafe {
                x86::matvec_q8_avx512vnni(out, w_q, w_scales, x)
            },
            #[cfg(not(target_arch = "x86_64"))]
            _ => generic::matvec_q8(out, w_q, w_scales, x),
        }
    }
}

impl KernelPath {
    /// Returns whether this path runs on [`PackedQ8`] weights of this group size rather than
    /// on the row-major ones.
    pub fn packs(self, group_size: usize) -> bool {
        matches!(
            self,
            KernelPath::Amx | KernelPath::Avx512Vnni | KernelPath::AvxVnni | KernelPath::Avx2
        ) && group_size.is_multiple_of(4)
    }

    /// Computes `out[b * stride + r - first] = dot(w row r, xs[b])` for every row `r` of the panels in
    /// `panels` and every input, where `first = panels.start * PANEL`. Only for paths that
    /// [`packs`](Self::packs) the weights' group size.
    pub fn matmul_packed(
        self,
        out: &mut [f32],
        stride: usize,
        w: &PackedQ8,
        panels: Range<usize>,
        xs: &[QuantizedVec],
    ) {
        assert!(
            self.packs(w.group_size),
            "{} does not run packed weights",
            self.name()
        );
        self.check_supported();
        assert!(
            panels.start <= panels.end && panels.end <= w.panels(),
            "panels out of range"
        );
        let rows = (panels.end * PANEL)
            .min(w.rows)
            .saturating_sub(panels.start * PANEL);
        if xs.is_empty() || rows == 0 {
            return;
        }
        assert!(
            out.len() >= (xs.len() - 1) * stride + rows,
            "matmul output too short"
        );
        assert!(
            xs.len() == 1 || stride >= rows,
            "matmul outputs of different inputs overlap"
        );
        let groups = w.cols / w.group_size;
        for x in xs {
            assert!(
                x.q.len() == w.cols
                    && x.group_size == w.group_size
                    && x.scales.len() == groups
                    && x.sums.len() == groups,
                "input shape mismatch"
            );
            debug_assert!(!x.q.contains(&i8::MIN), "activations lie in -127..=127");
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `packs` is true, so this is an x86 path, and `check_supported` passed. The
        // shapes and lengths were asserted above.
        unsafe {
            match self {
                KernelPath::Amx if w.group_size <= x86_packed_amx::MAX_GROUP => {
                    let on_tiles = amx_inputs(xs.len());
                    let (tiled, rest) = xs.split_at(on_tiles);
                    if !tiled.is_empty() {
                        x86_packed_amx::matmul_packed(out, stride, w, panels.clone(), tiled);
                    }
                    if !rest.is_empty() {
                        let out = &mut out[on_tiles * stride..];
                        x86_packed::matmul_packed(out, stride, w, panels, rest)
                    }
                }
                KernelPath::Avx512Vnni | KernelPath::Amx => {
                    x86_packed::matmul_packed(out, stride, w, panels, xs)
                }
                KernelPath::AvxVnni => {
                    x86_packed_avx2::matmul_packed_vnni(out, stride, w, panels, xs)
                }
                _ => x86_packed_avx2::matmul_packed(out, stride, w, panels, xs),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("only x86-64 paths pack weights")
    }
}

/// `out[r] = dot(w row r, x)` for fp32 weights (llama2.c versions 0 and 1).
pub fn matvec_f32(out: &mut [f32], w: &[f32], x: &[f32]) {
    generic::matvec_f32(out, w, x)
}

pub use generic::{dot_f32, sum_lanes};

/// An activation vector quantized to Q8_0.
#[derive(Debug, Clone, Default)]
pub struct QuantizedVec {
    /// The int8 values, in -127..=127 as the quantizer makes them: the AVX2 kernels negate
    /// activations with `sign`, which cannot negate -128.
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    /// The sum of each group's int8 values, for the correction of the packed kernels.
    pub sums: Vec<i32>,
    pub group_size: usize,
}

impl QuantizedVec {
    pub fn with_capacity(len: usize, group_size: usize) -> Self {
        QuantizedVec {
            q: Vec::with_capacity(len),
            scales: Vec::with_capacity(len / group_size.max(1)),
            sums: Vec::with_capacity(len / group_size.max(1)),
            group_size,
        }
    }

    /// Quantizes `x` in place of the previous contents, reusing the buffers.
    pub fn quantize_from(&mut self, x: &[f32]) {
        let gs = self.group_size;
        debug_assert!(gs > 0 && x.len().is_multiple_of(gs));
        self.q.resize(x.len(), 0);
        self.scales.clear();
        self.sums.clear();
        for (group_x, group_q) in x.chunks_exact(gs).zip(self.q.chunks_exact_mut(gs)) {
            let (scale, sum) = quantize_group(group_x, group_q);
            self.scales.push(scale);
            self.sums.push(sum);
        }
    }
}

/// Quantizes one group into `q`; returns its scale and the sum of its int8 values.
fn quantize_group(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let max_abs = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    // f32::max skips NaN: a NaN scale keeps a NaN or infinity in the input visible in the
    // output instead of quantizing it to 0.
    let finite = x.iter().all(|v| v.is_finite());
    let scale = if finite { max_abs / Q_MAX } else { f32::NAN };
    if scale.is_nan() || scale <= 0.0 {
        q.fill(0);
        return (scale, 0);
    }
    let mut sum = 0;
    for (o, &v) in q.iter_mut().zip(x) {
        // Multiplying by the reciprocal can differ from dividing in the last bit, so divide,
        // as the weight quantizer does.
        *o = round_half_away((v / scale).clamp(-Q_MAX, Q_MAX)) as i8;
        sum += *o as i32;
    }
    (scale, sum)
}

impl KernelPath {
    /// Quantizes `x` into `xq` as [`QuantizedVec::quantize_from`] does, with SIMD where the
    /// path has it.
    pub fn quantize(self, xq: &mut QuantizedVec, x: &[f32]) {
        let gs = xq.group_size;
        if gs == 0 || !x.len().is_multiple_of(gs) {
            return xq.quantize_from(x);
        }
        self.check_supported();
        // SAFETY (both arms): `check_supported` passed (AVX-512 F and BW, or AVX2), and the
        // group size is checked in the arm's guard.
        match self {
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Vnni | KernelPath::Amx if gs.is_multiple_of(16) => unsafe {
                x86_quantize::quantize(xq, x)
            },
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 | KernelPath::AvxVnni if gs.is_multiple_of(8) => unsafe {
                x86_quantize_avx2::quantize(xq, x)
            },
            _ => xq.quantize_from(x),
        }
    }
}

/// Rounds half away from zero, as `f32::round` does, without its libm call (the portable
/// x86-64 target has no rounding instruction). `v` must lie within the i32 range; the
/// quantizer clamps to +-127 first. `v - trunc(v)` is exact, so the tie test is too.
#[inline]
fn round_half_away(v: f32) -> i32 {
    let truncated = v as i32;
    let fraction = v - truncated as f32;
    if fraction >= 0.5 {
        truncated + 1
    } else if fraction <= -0.5 {
        truncated - 1
    } else {
        truncated
    }
}

#[cfg(test)]
mod tests;
