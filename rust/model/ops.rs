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

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Cosines and sines of the RoPE angles `p * 10000^(-2j / head_size)` for positions
/// `0..positions` and pairs `j in 0..head_size/2`, computed in f64 and stored as f32.
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>, // (positions, head_size / 2)
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_size: usize, positions: usize) -> RopeTable {
        let half = head_size / 2;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for j in 0..half {
                let freq = 10000f64.powf(-((2 * j) as f64) / head_size as f64);
                let angle = p as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    /// Rotates each pair (2j, 2j+1) of every head in `x` to position `pos`.
    pub fn rotate(&self, x: &mut [f32], pos: usize) {
        let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
        let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
        for head in x.chunks_exact_mut(2 * self.half) {
            for j in 0..self.half {
                let (x0, x1) = (head[2 * j], head[2 * j + 1]);
                head[2 * j] = x0 * cos[j] - x1 * sin[j];
                head[2 * j + 1] = x0 * sin[j] + x1 * cos[j];
            }
        }
    }
}
