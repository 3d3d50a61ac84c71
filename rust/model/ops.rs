//! Elementwise and small vector operations of the forward pass.

pub const RMS_EPS: f32 = 1e-5;

/// `out = w * x / sqrt(mean(x^2) + 1e-5)`.
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32]) {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_square + RMS_EPS).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * inv);
    }
}

/// Softmax in place, shifted by the maximum for stability.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// `a = silu(a) * b`, the SwiGLU gate.
pub fn swiglu(a: &mut [f32], b: &[f32]) {
    for (ai, &bi) in a.iter_mut().zip(b) {
        let silu = *ai / (1.0 + (-*ai).exp());
        *ai = silu * bi;
    }
}

pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (xi, &yi) in x.iter_mut().zip(y) {
        *xi += yi;
    }
}

pub use crate::kernels::dot_f32 as dot;

/// Positions with precomputed RoPE angles; later positions (plain models with a long
/// seq_len) compute theirs on the fly, so a header cannot make the table huge.
const ROPE_TABLE_POSITIONS: usize = 8192;

/// Cosines and sines of the RoPE angles `p * 10000^(-2j / head_size)` for pairs
/// `j in 0..head_size/2`, computed in f64 and stored as f32.
pub struct RopeTable {
    half: usize,
    freqs: Vec<f64>,
    cos: Vec<f32>, // (table positions, head_size / 2)
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_size: usize, positions: usize) -> RopeTable {
        let half = head_size / 2;
        let freqs: Vec<f64> = (0..half)
            .map(|j| 10000f64.powf(-((2 * j) as f64) / head_size as f64))
            .collect();
        let positions = positions.min(ROPE_TABLE_POSITIONS);
        let mut table = RopeTable {
            half,
            cos: Vec::with_capacity(positions * half),
            sin: Vec::with_capacity(positions * half),
            freqs,
        };
        for p in 0..positions {
            for j in 0..half {
                let (sin, cos) = table.angle(p, j).sin_cos();
                table.cos.push(cos as f32);
                table.sin.push(sin as f32);
            }
        }
        table
    }

    fn angle(&self, pos: usize, j: usize) -> f64 {
        pos as f64 * self.freqs[j]
    }

    /// Rotates each pair (2j, 2j+1) of every head in `x` to position `pos`.
    pub fn rotate(&self, x: &mut [f32], pos: usize) {
        let half = self.half;
        if (pos + 1) * half > self.cos.len() {
            // NOTE: allocates; only plain models past the table's positions get here.
            let (sin, cos): (Vec<f32>, Vec<f32>) = (0..half)
                .map(|j| {
                    let (s, c) = self.angle(pos, j).sin_cos();
                    (s as f32, c as f32)
                })
                .unzip();
            return rotate_pairs(x, &cos, &sin);
        }
        rotate_pairs(
            x,
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
    }
}

fn rotate_pairs(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        for j in 0..half {
            let (x0, x1) = (head[2 * j], head[2 * j + 1]);
            head[2 * j] = x0 * cos[j] - x1 * sin[j];
            head[2 * j + 1] = x0 * sin[j] + x1 * cos[j];
        }
    }
}
