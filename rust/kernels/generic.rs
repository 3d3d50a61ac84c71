//! Portable kernels: the reference every SIMD path must match bit for bit.

use super::QuantizedVec;

pub fn matvec_q8(out: &mut [f32], w_q: &[i8], w_scales: &[f32], x: &QuantizedVec) {
    let cols = x.q.len();
    let gs = x.group_size;
    let groups = cols / gs;
    for (r, o) in out.iter_mut().enumerate() {
        let row = &w_q[r * cols..(r + 1) * cols];
        let row_scales = &w_scales[r * groups..(r + 1) * groups];
        let mut sum = 0.0f32;
        for g in 0..groups {
            let span = g * gs..(g + 1) * gs;
            let isum: i32 = row[span.clone()]
                .iter()
                .zip(&x.q[span])
                .map(|(&w, &a)| w as i32 * a as i32)
                .sum();
            sum += (isum as f32 * row_scales[g]) * x.scales[g];
        }
        *o = sum;
    }
}

pub fn matvec_f32(out: &mut [f32], w: &[f32], x: &[f32]) {
    let cols = x.len();
    for (o, row) in out.iter_mut().zip(w.chunks_exact(cols)) {
        // Eight independent partial sums let the compiler vectorize the loop.
        let mut acc = [0.0f32; 8];
        let mut chunks = row.chunks_exact(8).zip(x.chunks_exact(8));
        for (wc, xc) in &mut chunks {
            for i in 0..8 {
                acc[i] += wc[i] * xc[i];
            }
        }
        let tail = cols - cols % 8;
        let mut sum: f32 = acc.iter().sum();
        for i in tail..cols {
            sum += row[i] * x[i];
        }
        *o = sum;
    }
}
