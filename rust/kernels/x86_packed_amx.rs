//! AMX kernel on packed weights (layout in `super::packed`), for batches of inputs.
//!
//! A 64-byte block of a panel holds four columns of 16 rows, row after row: one row of an AMX
//! B tile in its VNNI layout. So one group of a panel (`group_size / 4` blocks) is a whole B
//! tile as it lies in memory, and `tdpbsud` multiplies it by an A tile of the same group of
//! 16 inputs (signed bytes against the stored unsigned `w + 128`). The result is a C tile of
//! exact int32 sums, 16 inputs by 16 rows, each `128 * sum(x)` above the group's sum. The
//! AVX-512 steps then subtract that and scale the sums as the other kernels do. Each group adds
//! `(sum * w_scale) * x_scale` to the accumulator of lane g % 8, and the lanes are summed in
//! `generic::sum_lanes` order. Results are bit-identical to `generic`.
//!
//! A C tile takes one group only, since each group has its own scales. So every group's sums go
//! through memory to the AVX-512 steps: about eight vector instructions per input and panel,
//! for 512 products. Those steps, not the tile products, bound the kernel. On a Xeon it ran
//! 128 inputs 1.0-1.3x as fast as the AVX-512 kernel, and 110M prefill 1.25x.
//!
//! The tile instructions are written as inline assembly: their intrinsics are not stable Rust.
//! Linux lets a process use the tile registers only after it requests them (`arch_prctl`),
//! which [`available`] does once.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use super::packed::{PackedQ8, LANE_ORDER, PANEL};
use super::QuantizedVec;

/// Inputs of an A tile: its 16 rows.
const TILE_INPUTS: usize = PANEL;

/// The largest group a tile product takes at once: an A tile row has 64 bytes.
pub const MAX_GROUP: usize = 64;

/// Returns whether the CPU has AMX-INT8 and the kernel lets this process use the tile
/// registers, asking for them the first time.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| cpu_has_amx_int8() && request_tile_data())
}

fn cpu_has_amx_int8() -> bool {
    // CPUID leaf 7, EDX bit 24: AMX-TILE; bit 25: AMX-INT8.
    __get_cpuid_max(0).0 >= 7 && __cpuid_count(7, 0).edx >> 24 & 0b11 == 0b11
}

#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: the request takes two integers and changes only which register state the kernel
    // saves for this process. Kernels without AMX support refuse it with an error code.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    // NOTE: only the Linux request for the tile registers is written. On other systems the
    // `amx` path is not offered.
    false
}

/// The tile configuration that `ldtilecfg` reads (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile register.
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Tile registers: C tiles 0-3 (input tile i, panel p in tile `2i + p`), A tiles 4-5 (one per
/// input tile), B tiles 6-7 (one per panel). Each A row is a group of one input and each B
/// tile a group of one panel.
fn tile_config(group_size: usize) -> TileConfig {
    let mut config = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for c in 0..4 {
        config.rows[c] = PANEL as u8;
        config.colsb[c] = (PANEL * 4) as u16;
    }
    for a in 4..6 {
        config.rows[a] = TILE_INPUTS as u8;
        config.colsb[a] = group_size as u16;
    }
    for b in 6..8 {
        config.rows[b] = (group_size / 4) as u8;
        config.colsb[b] = (PANEL * 4) as u16;
    }
    config
}

/// 16 by 16 values, one 512-bit row per input.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([f32; PANEL * TILE_INPUTS]);

/// A thread's working memory: the inputs gathered into tile order, and the blocks the C tiles
/// go through. Kept between calls, so that a batch allocates only the first time.
#[derive(Default)]
struct Scratch {
    /// Input b's values at row b, `cols` bytes apart. Padding rows are zero.
    x: Vec<i8>,
    /// `128 * sum(x)` of group g of input b at `g * padded + b`.
    corrections: Vec<i32>,
    /// The scale of group g of input b at `g * padded + b`.
    x_scales: Vec<f32>,
    /// Per C tile: two blocks of stored int32 sums (for alternate groups), the lane being
    /// summed, and three partial sums of the lane tree.
    blocks: Vec<Block>,
}

/// Blocks per C tile in [`Scratch::blocks`].
const BLOCKS_PER_TILE: usize = 6;
const SUMS: [usize; 2] = [0, 1];
const LANE: usize = 2;
const TREE: [usize; 3] = [3, 4, 5];

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

impl Scratch {
    /// Copies the inputs into tile order, padded to whole A tiles, and returns the padded
    /// count.
    fn gather(&mut self, xs: &[QuantizedVec], cols: usize, groups: usize) -> usize {
        let padded = xs.len().div_ceil(TILE_INPUTS) * TILE_INPUTS;
        self.x.clear();
        self.x.resize(padded * cols, 0);
        self.corrections.clear();
        self.corrections.resize(padded * groups, 0);
        self.x_scales.clear();
        self.x_scales.resize(padded * groups, 0.0);
        for (b, x) in xs.iter().enumerate() {
            self.x[b * cols..(b + 1) * cols].copy_from_slice(&x.q);
            for g in 0..groups {
                self.corrections[g * padded + b] = x.sums[g] << 7;
                self.x_scales[g * padded + b] = x.scales[g];
            }
        }
        if self.blocks.is_empty() {
            self.blocks = vec![Block([0.0; PANEL * TILE_INPUTS]); 4 * BLOCKS_PER_TILE];
        }
        padded
    }
}

/// Computes `out[b * stride + r - first] = dot(W row r, xs[b])` for the rows `r` of `panels`,
/// where `first` is the first row of the first panel.
///
/// # Safety
/// [`available`] must have returned true, and the CPU must support AVX-512 F and BW. Every
/// input must have `w.cols` values quantized with `w.group_size`, which must be at most
/// [`MAX_GROUP`]; `panels` must lie within `w.panels()`, and `out` must hold
/// `(xs.len() - 1) * stride` plus the rows of `panels` values.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn matmul_packed(
    out: &mut [f32],
    stride: usize,
    w: &PackedQ8,
    panels: Range<usize>,
    xs: &[QuantizedVec],
) {
    debug_assert!(w.group_size <= MAX_GROUP && w.group_size.is_multiple_of(4));
    let groups = w.cols / w.group_size;
    SCRATCH.with_borrow_mut(|scratch| {
        let padded = scratch.gather(xs, w.cols, groups);
        let config = tile_config(w.group_size);
        // SAFETY: the tile registers are ours (`available`), and the config is a valid palette
        // 1 layout. Every block below reads and writes inside the gathered inputs, the panels'
        // weights and scales, the scratch blocks and the rows of `out` the caller sized.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly, preserves_flags));
            let first_row = panels.start * PANEL;
            for run in w.panel_runs(panels) {
                for i0 in (0..padded).step_by(2 * TILE_INPUTS) {
                    let two_tiles = padded - i0 > TILE_INPUTS;
                    let mut p = run.start;
                    while p < run.end {
                        let two_panels = run.end - p > 1;
                        let at = TileBlock {
                            w,
                            panel: p,
                            first_input: i0,
                            inputs: xs.len(),
                            padded,
                        };
                        let row = p * PANEL - first_row;
                        let out = out.as_mut_ptr().add(row);
                        match (two_tiles, two_panels) {
                            (true, true) => at.multiply::<2, 2>(scratch, out, stride),
                            (true, false) => at.multiply::<2, 1>(scratch, out, stride),
                            (false, true) => at.multiply::<1, 2>(scratch, out, stride),
                            (false, false) => at.multiply::<1, 1>(scratch, out, stride),
                        }
                        p += if two_panels { 2 } else { 1 };
                    }
                }
            }
            asm!("tilerelease", options(nostack, nomem, preserves_flags));
        }
    });
}

/// Up to two input tiles by two panels: the C tiles one pass over the groups fills.
struct TileBlock<'a> {
    w: &'a PackedQ8,
    panel: usize,
    first_input: usize,
    /// Inputs before padding, and after.
    inputs: usize,
    padded: usize,
}

/// One group of a panel, in the order the kernel visits them (storage order).
#[derive(Clone)]
struct Visit {
    /// The group's index in a row, and its position in the panel.
    g: usize,
    slot: usize,
    /// The position of its lane in [`LANE_ORDER`].
    step: usize,
    /// Whether it is the first group of its lane.
    first: bool,
    /// The steps whose lanes are complete once this group is added: its own if it is the
    /// lane's last group, and the lanes without groups that follow it.
    ends: Range<usize>,
}

/// Lists the groups of a row of `groups` groups in storage order.
fn visits(groups: usize) -> impl Iterator<Item = Visit> {
    let lane_groups = move |step: usize| (LANE_ORDER[step]..groups).step_by(super::LANES);
    let next_with_groups = move |step: usize| {
        (step + 1..LANE_ORDER.len())
            .find(|&s| LANE_ORDER[s] < groups)
            .unwrap_or(LANE_ORDER.len())
    };
    let mut slot = 0;
    (0..LANE_ORDER.len())
        .flat_map(move |step| {
            let count = lane_groups(step).len();
            lane_groups(step).enumerate().map(move |(j, g)| {
                let ends = if j + 1 == count {
                    step..next_with_groups(step)
                } else {
                    0..0
                };
                (g, step, j == 0, ends)
            })
        })
        .map(move |(g, step, first, ends)| {
            slot += 1;
            Visit {
                g,
                slot: slot - 1,
                step,
                first,
                ends,
            }
        })
}

/// Returns the block a lane's sums go into. The first lane of each pair in the tree sums
/// straight into its tree block, the second into [`LANE`].
fn lane_target(step: usize) -> usize {
    match step {
        0 => TREE[0],
        2 | 4 => TREE[1],
        6 => TREE[2],
        _ => LANE,
    }
}

impl TileBlock<'_> {
    /// Multiplies `NP` panels by `NI` input tiles and writes their outputs, `out` pointing at
    /// the first panel's first row of input 0.
    ///
    /// The tile products of each group are issued before the AVX-512 steps of the group
    /// before it, whose sums are in the other of two sums blocks. On a Xeon this ran 0-20%
    /// faster than finishing each group before the next. Still, the tile products and the
    /// AVX-512 steps took about as long as the two apart. Without the AVX-512 steps, the
    /// products of 128 inputs ran at 360-415 GMAC/s, and with them at 200-230.
    ///
    /// # Safety
    /// As for [`matmul_packed`], with the tile configuration loaded.
    #[inline(always)]
    unsafe fn multiply<const NI: usize, const NP: usize>(
        &self,
        scratch: &mut Scratch,
        out: *mut f32,
        stride: usize,
    ) {
        let w = self.w;
        let tiles = Tiles::<NI, NP> {
            at: self,
            weights: std::array::from_fn(|p| {
                w.bytes()[(self.panel + p) * w.panel_bytes()..].as_ptr()
            }),
            scales: std::array::from_fn(|p| {
                w.scales[(self.panel + p) * w.panel_scales()..].as_ptr()
            }),
            valid: std::array::from_fn(|i| {
                let first = self.first_input + i * TILE_INPUTS;
                self.inputs.saturating_sub(first).min(TILE_INPUTS)
            }),
            blocks: scratch.blocks.as_mut_ptr() as *mut f32,
            x: scratch.x.as_ptr(),
            corrections: scratch.corrections.as_ptr(),
            x_scales: scratch.x_scales.as_ptr(),
        };
        // SAFETY: forwarded from the caller, and `visits` runs through the panel's groups.
        unsafe {
            let mut pending: Option<Visit> = None;
            for v in visits(w.cols / w.group_size) {
                tiles.issue(&v);
                if let Some(before) = pending.take() {
                    tiles.finish(&before);
                }
                tile_store_all::<NI, NP>(tiles.sums(&v));
                pending = Some(v);
            }
            if let Some(last) = pending {
                tiles.finish(&last);
            }
            tiles.store(out, stride);
        }
    }
}

/// The pointers of one [`TileBlock`]: `NI` input tiles by `NP` panels.
///
/// Methods, not closures: `multiply` has no target features of its own (it is inlined into
/// `matmul_packed`), so closures inside it compiled without AVX-512 and called each step.
struct Tiles<'a, const NI: usize, const NP: usize> {
    at: &'a TileBlock<'a>,
    weights: [*const u8; NP],
    scales: [*const f32; NP],
    /// Inputs of each A tile that exist: their sums are scaled, the padding's are not.
    valid: [usize; NI],
    /// [`Scratch::blocks`] and the gathered inputs.
    blocks: *mut f32,
    x: *const i8,
    corrections: *const i32,
    x_scales: *const f32,
}

impl<const NI: usize, const NP: usize> Tiles<'_, NI, NP> {
    /// Returns block `role` (a sums block, [`LANE`] or a [`TREE`] block) of C tile (i, p).
    #[inline(always)]
    fn block(&self, i: usize, p: usize, role: usize) -> *mut f32 {
        let index = (2 * i + p) * BLOCKS_PER_TILE + role;
        // SAFETY: 4 C tiles of BLOCKS_PER_TILE blocks each were allocated by `gather`.
        unsafe { self.blocks.add(index * PANEL * TILE_INPUTS) }
    }

    /// Returns the sums blocks of group `v`'s C tiles.
    #[inline(always)]
    fn sums(&self, v: &Visit) -> [[*mut i32; 2]; 2] {
        let sums = SUMS[v.slot % 2];
        [0, 1].map(|i| [0, 1].map(|p| self.block(i, p, sums) as *mut i32))
    }

    /// Runs the tile products of group `v`, leaving the sums in the C tiles.
    ///
    /// # Safety
    /// As for [`TileBlock::multiply`].
    #[inline(always)]
    unsafe fn issue(&self, v: &Visit) {
        let (gs, cols) = (self.at.w.group_size, self.at.w.cols);
        // SAFETY: forwarded from the caller.
        unsafe {
            let x = [0, 1].map(|i| {
                let first = self.at.first_input + i.min(NI - 1) * TILE_INPUTS;
                self.x.add(first * cols + v.g * gs)
            });
            let w = [0, 1].map(|p| self.weights[p.min(NP - 1)].add(v.slot * gs * PANEL));
            tile_products::<NI, NP>(x, cols, w);
        }
    }

    /// Scales group `v`'s sums into its lane and adds the lanes it completes into the tree.
    ///
    /// # Safety
    /// As for [`TileBlock::multiply`], after [`Self::issue`] of `v`.
    #[inline(always)]
    unsafe fn finish(&self, v: &Visit) {
        let sums = self.sums(v);
        // SAFETY: forwarded from the caller.
        unsafe {
            let mut w_scale = [_mm512_setzero_ps(); NP];
            for (p, scale) in w_scale.iter_mut().enumerate() {
                *scale = _mm512_loadu_ps(self.scales[p].add(v.slot * PANEL));
            }
            for (i, tile_sums) in sums.iter().take(NI).enumerate() {
                let at = v.g * self.at.padded + self.at.first_input + i * TILE_INPUTS;
                let rows = ScaleRows::<NP> {
                    sums: std::array::from_fn(|p| tile_sums[p] as *const i32),
                    dst: std::array::from_fn(|p| self.block(i, p, lane_target(v.step))),
                    w_scale,
                    corrections: self.corrections.add(at),
                    x_scales: self.x_scales.add(at),
                };
                rows.run(v.first, self.valid[i]);
            }
            for step in v.ends.clone() {
                for i in 0..NI {
                    for p in 0..NP {
                        if step != v.step {
                            // A lane with no groups is +0.0, as in `generic`.
                            fill_zero(self.block(i, p, lane_target(step)), self.valid[i]);
                        }
                        self.sum_tree(step, i, p);
                    }
                }
            }
        }
    }

    /// Adds the completed lane of `step` into the tree of C tile (i, p). The tree is that of
    /// `generic::sum_lanes`, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), with
    /// operands in the same order.
    ///
    /// # Safety
    /// AVX-512 F.
    #[inline(always)]
    unsafe fn sum_tree(&self, step: usize, i: usize, p: usize) {
        debug_assert_eq!(LANE_ORDER, [0, 4, 2, 6, 1, 5, 3, 7]);
        let pairs: &[(usize, usize)] = match step {
            1 => &[(TREE[0], LANE)],
            3 => &[(TREE[1], LANE), (TREE[0], TREE[1])],
            5 => &[(TREE[1], LANE)],
            7 => &[(TREE[2], LANE), (TREE[1], TREE[2]), (TREE[0], TREE[1])],
            _ => &[],
        };
        for &(dst, src) in pairs {
            // SAFETY: forwarded from the caller, and every block has 16 rows.
            unsafe { add_into(self.block(i, p, dst), self.block(i, p, src), self.valid[i]) };
        }
    }

    /// Writes the totals of the valid rows and inputs, `out` pointing at the first panel's
    /// first row of input 0.
    ///
    /// # Safety
    /// AVX-512 F; `out` must hold those rows of every input, `stride` apart.
    #[inline(always)]
    unsafe fn store(&self, out: *mut f32, stride: usize) {
        let w = self.at.w;
        let rows = (w.rows - self.at.panel * PANEL).min(NP * PANEL);
        let no_groups = w.cols / w.group_size == 0;
        for i in 0..NI {
            for p in 0..NP {
                let valid_rows = rows.saturating_sub(p * PANEL).min(PANEL);
                let mask: __mmask16 = (1u32 << valid_rows).wrapping_sub(1) as __mmask16;
                let total = self.block(i, p, TREE[0]);
                for m in 0..self.valid[i] {
                    let b = self.at.first_input + i * TILE_INPUTS + m;
                    // SAFETY: forwarded from the caller.
                    unsafe {
                        // With no groups the tree was never written, and every row is 0.
                        let row = if no_groups {
                            _mm512_setzero_ps()
                        } else {
                            _mm512_load_ps(total.add(m * PANEL))
                        };
                        _mm512_mask_storeu_ps(out.add(b * stride + p * PANEL), mask, row);
                    }
                }
            }
        }
    }
}

/// The AVX-512 steps of one group for one input tile and `NP` panels.
struct ScaleRows<const NP: usize> {
    /// Each panel's stored C tile: 16 int32 sums per input.
    sums: [*const i32; NP],
    /// Each panel's accumulator block.
    dst: [*mut f32; NP],
    w_scale: [__m512; NP],
    /// The group's `128 * sum(x)` and scale, one per input.
    corrections: *const i32,
    x_scales: *const f32,
}

impl<const NP: usize> ScaleRows<NP> {
    /// Adds `((sum - correction) * w_scale) * x_scale` into the accumulators for the first
    /// `inputs` inputs, or stores `0.0 + that` when `first`.
    ///
    /// # Safety
    /// AVX-512 F; the pointers must have `inputs` rows.
    #[inline(always)]
    unsafe fn run(&self, first: bool, inputs: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            // A constant count lets the compiler unroll the whole tile.
            match (first, inputs == TILE_INPUTS) {
                (true, true) => self.rows::<true>(TILE_INPUTS),
                (true, false) => self.rows::<true>(inputs),
                (false, true) => self.rows::<false>(TILE_INPUTS),
                (false, false) => self.rows::<false>(inputs),
            }
        }
    }

    #[inline(always)]
    unsafe fn rows<const FIRST: bool>(&self, inputs: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            for m in 0..inputs {
                let correction = _mm512_set1_epi32(*self.corrections.add(m));
                let x_scale = _mm512_set1_ps(*self.x_scales.add(m));
                for p in 0..NP {
                    let raw = _mm512_load_si512(self.sums[p].add(m * PANEL) as *const __m512i);
                    let sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(raw, correction));
                    let scaled = _mm512_mul_ps(_mm512_mul_ps(sum, self.w_scale[p]), x_scale);
                    let row = self.dst[p].add(m * PANEL);
                    let acc = if FIRST {
                        _mm512_setzero_ps()
                    } else {
                        _mm512_load_ps(row)
                    };
                    _mm512_store_ps(row, _mm512_add_ps(acc, scaled));
                }
            }
        }
    }
}

/// `dst += src` for the first `inputs` rows of two blocks.
///
/// # Safety
/// AVX-512 F; both blocks must have `inputs` rows.
#[inline(always)]
unsafe fn add_into(dst: *mut f32, src: *const f32, inputs: usize) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for m in 0..inputs {
            let (d, s) = (dst.add(m * PANEL), src.add(m * PANEL));
            _mm512_store_ps(d, _mm512_add_ps(_mm512_load_ps(d), _mm512_load_ps(s)));
        }
    }
}

/// # Safety
/// AVX-512 F; the block must have `inputs` rows.
#[inline(always)]
unsafe fn fill_zero(dst: *mut f32, inputs: usize) {
    for m in 0..inputs {
        // SAFETY: forwarded from the caller.
        unsafe { _mm512_store_ps(dst.add(m * PANEL), _mm512_setzero_ps()) };
    }
}

/// Bytes per row of a B and a C tile.
const TILE_ROW: usize = 64;

/// Loads a tile register from rows `stride` bytes apart.
macro_rules! tile_load {
    ($tmm:literal, $at:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $tmm, ", [{at} + {stride}*1]"), at = in(reg) $at,
            stride = in(reg) $stride, options(nostack, readonly, preserves_flags))
    };
}

/// Zeroes C tile `c` and adds the products of A tile `a` and B tile `b` to it.
macro_rules! tile_product {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!("tilezero tmm", $c),
            concat!("tdpbsud tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nostack, preserves_flags)
        )
    };
}

/// Stores C tile `c` into a block of 16 rows of 64 bytes.
macro_rules! tile_store {
    ($c:literal, $at:expr) => {
        asm!(concat!("tilestored [{at} + {stride}*1], tmm", $c), at = in(reg) $at,
            stride = in(reg) TILE_ROW, options(nostack, preserves_flags))
    };
}

/// Runs one group's tile products: loads the A tiles of `NI` input tiles (rows `x_stride`
/// bytes apart) and the B tiles of `NP` panels, and multiplies them into C tile (i, p) for
/// input tile i and panel p. Only the first `NI` and `NP` of each array are used.
///
/// # Safety
/// The tile configuration must be loaded, and the pointers must hold the tiles it describes.
#[inline(always)]
unsafe fn tile_products<const NI: usize, const NP: usize>(
    x: [*const i8; 2],
    x_stride: usize,
    w: [*const u8; 2],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        tile_load!(6, w[0], TILE_ROW);
        tile_load!(4, x[0], x_stride);
        tile_product!(0, 4, 6);
        if NI == 2 {
            tile_load!(5, x[1], x_stride);
            tile_product!(2, 5, 6);
        }
        if NP == 2 {
            tile_load!(7, w[1], TILE_ROW);
            tile_product!(1, 4, 7);
            if NI == 2 {
                tile_product!(3, 5, 7);
            }
        }
    }
}

/// Stores C tile (i, p) at `c[i][p]`, for the first `NI` and `NP`.
///
/// # Safety
/// The tile configuration must be loaded, and each pointer must have room for a C tile.
#[inline(always)]
unsafe fn tile_store_all<const NI: usize, const NP: usize>(c: [[*mut i32; 2]; 2]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        tile_store!(0, c[0][0]);
        if NI == 2 {
            tile_store!(2, c[1][0]);
        }
        if NP == 2 {
            tile_store!(1, c[0][1]);
            if NI == 2 {
                tile_store!(3, c[1][1]);
            }
        }
    }
}
