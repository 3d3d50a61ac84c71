//! Q8_0 kernels on the weight shapes of the toy20M and 110M models, one benchmark per
//! supported path: `cargo bench --bench kernels`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama2rnn::kernels::{KernelPath, PackedQ8, QuantizedVec};

/// (model, matrix, rows, cols): rows = outputs, cols = inputs.
const SHAPES: &[(&str, &str, usize, usize)] = &[
    ("toy20M", "wq", 288, 288),
    ("toy20M", "w1", 768, 288),
    ("toy20M", "w2", 288, 768),
    ("toy20M", "wcls", 32000, 288),
    ("110M", "wq", 768, 768),
    ("110M", "w1", 2048, 768),
    ("110M", "w2", 768, 2048),
    ("110M", "wcls", 32000, 768),
];

/// Returns the paths with kernels of their own for one input, row-major weights and
/// quantizing. The amx path runs those of avx512vnni and differs only in batched products.
fn own_single_input_paths() -> impl Iterator<Item = KernelPath> {
    KernelPath::supported()
        .into_iter()
        .filter(|&p| p != KernelPath::Amx)
}

fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<i8> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % 255) as i8
        })
        .collect()
}

fn matvec(c: &mut Criterion) {
    let gs = 32;
    for &(model, name, rows, cols) in SHAPES {
        let w_q = pseudo_random_bytes(rows * cols, 1);
        let w_scales = vec![0.01f32; rows * cols / gs];
        let x: Vec<f32> = pseudo_random_bytes(cols, 2)
            .iter()
            .map(|&v| v as f32 / 64.0)
            .collect();
        let mut xq = QuantizedVec::with_capacity(cols, gs);
        xq.quantize_from(&x);
        let mut out = vec![0.0f32; rows];
        let mut group = c.benchmark_group(format!("matvec_q8/{model}/{name}_{rows}x{cols}"));
        group.throughput(Throughput::Bytes((rows * cols) as u64));
        for path in own_single_input_paths() {
            group.bench_function(path.name(), |b| {
                b.iter(|| {
                    path.matvec_q8(
                        black_box(&mut out),
                        black_box(&w_q),
                        &w_scales,
                        black_box(&xq),
                    )
                })
            });
            if path.packs(gs) {
                let packed = PackedQ8::new(&w_q, &w_scales, rows, cols, gs);
                let xs = std::slice::from_ref(&xq);
                group.bench_function(format!("{}_packed", path.name()), |b| {
                    b.iter(|| {
                        path.matmul_packed(black_box(&mut out), 0, &packed, 0..packed.panels(), xs)
                    })
                });
            }
        }
        group.finish();
    }
}

/// A memory update or prefill batch: 128 activation vectors against one weight matrix.
fn matmul(c: &mut Criterion) {
    let (gs, n) = (32, 128);
    // The classifier runs for one token at a time only.
    for &(model, name, rows, cols) in SHAPES.iter().filter(|s| s.1 != "wcls") {
        let w_q = pseudo_random_bytes(rows * cols, 1);
        let w_scales = vec![0.01f32; rows * cols / gs];
        let xs: Vec<QuantizedVec> = (0..n as u64)
            .map(|i| {
                let x: Vec<f32> = pseudo_random_bytes(cols, 2 + i)
                    .iter()
                    .map(|&v| v as f32 / 64.0)
                    .collect();
                let mut xq = QuantizedVec::with_capacity(cols, gs);
                xq.quantize_from(&x);
                xq
            })
            .collect();
        let mut out = vec![0.0f32; rows * n];
        let mut group = c.benchmark_group(format!("matmul_q8/{model}/{name}_{rows}x{cols}x{n}"));
        group.throughput(Throughput::Elements((rows * cols * n) as u64));
        for path in KernelPath::supported() {
            // Row-major paths run one matrix-vector product per input.
            if path != KernelPath::Amx {
                group.bench_function(path.name(), |b| {
                    b.iter(|| {
                        for (i, x) in xs.iter().enumerate() {
                            let out = &mut out[i * rows..(i + 1) * rows];
                            path.matvec_q8(black_box(out), &w_q, &w_scales, black_box(x));
                        }
                    })
                });
            }
            if path.packs(gs) {
                let packed = PackedQ8::new(&w_q, &w_scales, rows, cols, gs);
                group.bench_function(format!("{}_packed", path.name()), |b| {
                    b.iter(|| {
                        let panels = 0..packed.panels();
                        path.matmul_packed(black_box(&mut out), rows, &packed, panels, &xs)
                    })
                });
            }
        }
        group.finish();
    }
}

/// Activation quantization of 128 rows, the rows of one product of a memory update or a
/// prefill chunk, at the widths of both models (dim and hidden_dim).
fn quantize(c: &mut Criterion) {
    let (gs, n) = (32, 128);
    for (model, name, width) in [
        ("toy20M", "dim", 288),
        ("toy20M", "hidden", 768),
        ("110M", "dim", 768),
        ("110M", "hidden", 2048),
    ] {
        let x: Vec<f32> = pseudo_random_bytes(n * width, 3)
            .iter()
            .map(|&v| v as f32 / 37.0)
            .collect();
        let mut xqs: Vec<QuantizedVec> = (0..n)
            .map(|_| QuantizedVec::with_capacity(width, gs))
            .collect();
        let mut group = c.benchmark_group(format!("quantize/{model}/{name}_{width}x{n}"));
        group.throughput(Throughput::Elements((n * width) as u64));
        for path in own_single_input_paths() {
            group.bench_function(path.name(), |b| {
                b.iter(|| {
                    for (xq, row) in xqs.iter_mut().zip(x.chunks_exact(width)) {
                        path.quantize(xq, black_box(row));
                    }
                })
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = matvec, matmul, quantize
}
criterion_main!(benches);
