//! Q8_0 weights rearranged for the packed kernels: AVX-512 VNNI, and AVX2 and AVX-VNNI, which
//! take each panel as two halves of eight rows (`super::x86_packed_avx2`).
//!
//! A panel has 16 consecutive rows. Within a panel, each group of `group_size` columns is
//! stored as `group_size / 4` blocks of 64 bytes, and block k has columns `4k..4k + 4` of
//! the group for the 16 rows, row after row. One 512-bit `dpbusd` of a block against the four
//! activation bytes of those columns, broadcast to every lane, adds four products to each
//! row's sum. Lane r always belongs to row r, so a group's int32 sums end up one per lane with
//! no horizontal reduction. One block load also serves every activation vector of a batch.
//!
//! `dpbusd` multiplies unsigned by signed bytes. The weights are stored as `w + 128` (the sign
//! bit flipped) and the activations stay signed, so each group sum carries an extra
//! `128 * sum(x)`, which the kernel subtracts exactly using the activation group sums.
//!
//! Groups are stored in the order the kernel visits them: every group of one lane of the
//! portable kernel's eight (g % 8, see `super::generic::accumulate_group`), then the next
//! lane. The lanes follow [`LANE_ORDER`], the order in which `super::generic::sum_lanes`
//! adds them, so the kernel adds each finished lane into the total without keeping all eight.
//!
//! Rows past the end of the matrix, in the last panel, have weight 0 and scale 0.

// Only the x86-64 paths run packed weights. Elsewhere the type remains, so the API is the same.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::ops::Range;

use super::LANES;

/// Rows per panel: the f32 lanes of one 512-bit register.
pub const PANEL: usize = 16;

/// How many bytes past the block it reads a kernel prefetches weights. Panels lie one after
/// another, so these are the bytes the kernel reads a few hundred nanoseconds later. One input
/// streaming weights from memory ran 12-40% faster with it on a Xeon, whose own prefetchers
/// kept too few lines in flight.
pub const PREFETCH_AHEAD: usize = 2048;

/// A Q8_0 matrix in panel order; see the module documentation.
pub struct PackedQ8 {
    pub rows: usize,
    pub cols: usize,
    pub group_size: usize,
    /// `w + 128` per weight, panel by panel.
    q: PackedBytes,
    /// The scales, `PANEL` per group, in the same panel and group order.
    pub(super) scales: Vec<f32>,
}

/// The packed weights' storage: their own buffer, or a region of one shared by a model's
/// matrices (see [`PackedQ8::pack_into`]).
enum PackedBytes {
    Owned(Vec<u8>),
    Shared(&'static [u8]),
}

impl PackedQ8 {
    /// Rearranges row-major Q8_0 weights (`rows * cols` values, one scale per `group_size`).
    /// `group_size` must divide `cols` and be a multiple of 4.
    pub fn new(w_q: &[i8], w_scales: &[f32], rows: usize, cols: usize, group_size: usize) -> Self {
        let mut q = vec![0; Self::packed_len(rows, cols)];
        let scales = pack(&mut q, w_q, w_scales, rows, cols, group_size);
        PackedQ8 {
            rows,
            cols,
            group_size,
            q: PackedBytes::Owned(q),
            scales,
        }
    }

    /// As [`Self::new`], with the packed weights written to `dst`, which must have
    /// [`Self::packed_len`] bytes and outlive the result: a model packs all its matrices
    /// into one buffer that it keeps for as long as it keeps them.
    pub fn pack_into(
        dst: &'static mut [u8],
        w_q: &[i8],
        w_scales: &[f32],
        rows: usize,
        cols: usize,
        group_size: usize,
    ) -> Self {
        assert_eq!(dst.len(), Self::packed_len(rows, cols));
        let scales = pack(dst, w_q, w_scales, rows, cols, group_size);
        PackedQ8 {
            rows,
            cols,
            group_size,
            q: PackedBytes::Shared(dst),
            scales,
        }
    }

    /// Bytes of packed weights for a matrix of this shape.
    pub fn packed_len(rows: usize, cols: usize) -> usize {
        rows.div_ceil(PANEL) * PANEL * cols
    }

    pub(super) fn bytes(&self) -> &[u8] {
        match &self.q {
            PackedBytes::Owned(q) => q,
            PackedBytes::Shared(q) => q,
        }
    }
}

/// Writes the packed weights into `q` and returns the packed scales.
fn pack(
    q: &mut [u8],
    w_q: &[i8],
    w_scales: &[f32],
    rows: usize,
    cols: usize,
    group_size: usize,
) -> Vec<f32> {
    assert!(
        group_size.is_multiple_of(4) && cols.is_multiple_of(group_size),
        "bad group size {group_size}"
    );
    assert_eq!(w_q.len(), rows * cols);
    assert_eq!(w_scales.len(), rows * cols / group_size);
    assert_eq!(q.len(), PackedQ8::packed_len(rows, cols));
    let groups = cols / group_size;
    let panels = rows.div_ceil(PANEL);
    // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid.
    let w_bytes = unsafe { std::slice::from_raw_parts(w_q.as_ptr() as *const u8, w_q.len()) };
    // Four columns of one row move as one little-endian word, their sign bits flipped; rows
    // past the end are weight 0, stored as 0x80.
    const FLIP: u32 = 0x8080_8080;
    let block_bytes = PANEL * 4;
    let group_bytes = group_size * PANEL;
    // Where each group goes within its panel.
    let mut slot = vec![0; groups];
    for (i, g) in group_order(groups).enumerate() {
        slot[g] = i;
    }
    // Rows padding the last panel keep weight 0 (0x80) and scale 0.
    q[rows * cols..].fill(0x80);
    let mut scales = vec![0.0; panels * PANEL * groups];
    // The source is read in file order, which the hardware prefetcher streams; the writes
    // scatter within the panel, which stays in cache.
    for r in 0..rows {
        let (p, lane) = (r / PANEL, r % PANEL);
        let row = &w_bytes[r * cols..(r + 1) * cols];
        let panel = &mut q[p * PANEL * cols..(p + 1) * PANEL * cols];
        for (g, group) in row.chunks_exact(group_size).enumerate() {
            let out = &mut panel[slot[g] * group_bytes..(slot[g] + 1) * group_bytes];
            for (k, word) in group.chunks_exact(4).enumerate() {
                let word = u32::from_le_bytes(word.try_into().unwrap()) ^ FLIP;
                out[k * block_bytes + 4 * lane..][..4].copy_from_slice(&word.to_le_bytes());
            }
            scales[(p * groups + slot[g]) * PANEL + lane] = w_scales[r * groups + g];
        }
    }
    scales
}

impl PackedQ8 {
    pub fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    /// Bytes of one panel's weights.
    pub(super) fn panel_bytes(&self) -> usize {
        PANEL * self.cols
    }

    /// Scales of one panel.
    pub(super) fn panel_scales(&self) -> usize {
        PANEL * (self.cols / self.group_size)
    }

    /// Splits `panels` into the runs of consecutive panels that a batch kernel multiplies in
    /// turn: every input passes over all panels of one run before the next run starts.
    ///
    /// With one panel at a time for all inputs, each panel writes 16 outputs of every input,
    /// a column of the output that touches one cache line per input. Those stores missed:
    /// on toy20M (Zen 4) the memory update's products ran 15-25% slower than with the output
    /// lines already in cache. Input by input over a run, the stores fill whole lines in
    /// order, and the run's weights are read again from L2 for each input tile.
    pub(super) fn panel_runs(&self, panels: Range<usize>) -> impl Iterator<Item = Range<usize>> {
        // A matrix without columns has empty panels, one run of them all.
        let per_run = (RUN_BYTES / self.panel_bytes().max(1)).max(1);
        let end = panels.end;
        panels
            .step_by(per_run)
            .map(move |first| first..(first + per_run).min(end))
    }
}

/// Weight bytes of a run of panels (see [`PackedQ8::panel_runs`]): half the 256 KiB L2 of
/// Intel client cores before Ice Lake (Zen 4 has 1 MiB), so that the run stays in L2 beside
/// the activations and outputs. On toy20M (Zen 4), 48 KiB runs measured slower and 256 KiB
/// alike.
const RUN_BYTES: usize = 128 * 1024;

/// Lanes in the order of the sum tree ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
pub(super) const LANE_ORDER: [usize; LANES] = [0, 4, 2, 6, 1, 5, 3, 7];

/// Groups in storage order: the groups of each lane of [`LANE_ORDER`], in increasing order.
pub(super) fn group_order(groups: usize) -> impl Iterator<Item = usize> {
    LANE_ORDER
        .into_iter()
        .flat_map(move |lane| (lane..groups).step_by(LANES))
}
