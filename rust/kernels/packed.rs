//! Q8_0 weights rearranged for the AVX-512 VNNI kernels.
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

use super::LANES;

/// Rows per panel: the f32 lanes of one 512-bit register.
pub const PANEL: usize = 16;

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
    let mut blocks = q.chunks_exact_mut(4);
    let mut scales = Vec::with_capacity(panels * PANEL * groups);
    {
        for p in 0..panels {
            for g in group_order(groups) {
                for k in (0..group_size).step_by(4) {
                    let col = g * group_size + k;
                    for r in p * PANEL..(p + 1) * PANEL {
                        let block = blocks.next().expect("sized by packed_len");
                        if r < rows {
                            let w = &w_q[r * cols + col..r * cols + col + 4];
                            for (b, &v) in block.iter_mut().zip(w) {
                                *b = (v as u8) ^ 0x80;
                            }
                        } else {
                            block.fill(0x80);
                        }
                    }
                }
                scales.extend((p * PANEL..(p + 1) * PANEL).map(|r| {
                    if r < rows {
                        w_scales[r * groups + g]
                    } else {
                        0.0
                    }
                }));
            }
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
}

/// Lanes in the order of the sum tree ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
pub(super) const LANE_ORDER: [usize; LANES] = [0, 4, 2, 6, 1, 5, 3, 7];

/// Groups in storage order: the groups of each lane of [`LANE_ORDER`], in increasing order.
pub(super) fn group_order(groups: usize) -> impl Iterator<Item = usize> {
    LANE_ORDER
        .into_iter()
        .flat_map(move |lane| (lane..groups).step_by(LANES))
}
