use super::*;

/// A small deterministic generator, so kernel tests need no extra crate.
struct Lcg(u64);

impl Lcg {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    fn int8(&mut self) -> i8 {
        self.next_u32() as u8 as i8
    }

    fn unit(&mut self) -> f32 {
        self.next_u32() as f32 / u32::MAX as f32 * 2.0 - 1.0
    }
}

fn random_case(
    rng: &mut Lcg,
    rows: usize,
    cols: usize,
    gs: usize,
) -> (Vec<i8>, Vec<f32>, QuantizedVec) {
    // Full int8 range for the weights, -128 included: the SIMD sign trick must handle it.
    let w_q: Vec<i8> = (0..rows * cols).map(|_| rng.int8()).collect();
    let w_s: Vec<f32> = (0..rows * cols / gs)
        .map(|_| rng.unit().abs() * 0.01 + 1e-4)
        .collect();
    let x: Vec<f32> = (0..cols).map(|_| rng.unit() * 3.0).collect();
    let mut xq = QuantizedVec::with_capacity(cols, gs);
    xq.quantize_from(&x);
    (w_q, w_s, xq)
}

#[test]
fn quantize_rounds_ties_away_from_zero() {
    // max |x| = 127 gives scale 1, so x / scale is exact and 0.5 steps are true ties.
    let x = [127.0, 0.5, -0.5, 1.5, -2.5, 0.49, -126.5, 0.0];
    let mut q = QuantizedVec::with_capacity(8, 8);
    q.quantize_from(&x);
    assert_eq!(q.scales, vec![1.0]);
    assert_eq!(q.q, vec![127, 1, -1, 2, -3, 0, -127, 0]);
}

#[test]
fn quantize_zero_group_gives_zero_scale() {
    let mut q = QuantizedVec::with_capacity(8, 4);
    q.quantize_from(&[0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 0.0, 0.0]);
    assert_eq!(q.scales[0], 0.0);
    assert_eq!(&q.q[..4], &[0, 0, 0, 0]);
    assert_eq!(q.q[5], -127);
}

#[test]
fn generic_matches_f32_dot_product() {
    let mut rng = Lcg(7);
    let (rows, cols, gs) = (5, 96, 32);
    let (w_q, w_s, xq) = random_case(&mut rng, rows, cols, gs);
    let mut out = vec![0.0; rows];
    KernelPath::Generic.matvec_q8(&mut out, &w_q, &w_s, &xq);
    for r in 0..rows {
        let expected: f64 = (0..cols)
            .map(|c| {
                let w = w_q[r * cols + c] as f64 * w_s[(r * cols + c) / gs] as f64;
                let a = xq.q[c] as f64 * xq.scales[c / gs] as f64;
                w * a
            })
            .sum();
        let tolerance = 1e-5 * expected.abs().max(1.0);
        assert!(
            (out[r] as f64 - expected).abs() < tolerance,
            "row {r}: {} vs {expected}",
            out[r]
        );
    }
}

#[test]
fn every_supported_path_matches_generic_bit_for_bit() {
    let mut rng = Lcg(42);
    // Group sizes that take the 64-byte, 32-byte and scalar branches; column counts that
    // span one group and several.
    for &(rows, cols, gs) in &[
        (3, 64, 64),
        (7, 288, 32),
        (4, 768, 64),
        (5, 96, 32),
        (6, 48, 16),
        (2, 45, 5),
        (9, 128, 128),
        (3, 608, 32),
        (2, 1216, 64),
        (2, 2048, 128),
        (4, 256, 32),
    ] {
        let (w_q, w_s, xq) = random_case(&mut rng, rows, cols, gs);
        let mut expected = vec![0.0; rows];
        KernelPath::Generic.matvec_q8(&mut expected, &w_q, &w_s, &xq);
        for path in KernelPath::supported() {
            let mut out = vec![0.0; rows];
            path.matvec_q8(&mut out, &w_q, &w_s, &xq);
            let same = out
                .iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{} differs from generic for {rows}x{cols} gs {gs}",
                path.name()
            );
        }
    }
}

#[test]
fn extreme_weights_do_not_saturate() {
    // All weights -128 and activations +-127: the largest products the SIMD paths must carry.
    let (rows, cols, gs) = (2, 64, 32);
    let w_q = vec![-128i8; rows * cols];
    let w_s = vec![1.0f32; rows * cols / gs];
    let xq = QuantizedVec {
        q: (0..cols)
            .map(|i| if i % 2 == 0 { 127 } else { -127 })
            .collect(),
        scales: vec![1.0; 2],
        sums: vec![0; 2],
        group_size: gs,
    };
    let xq_pos = QuantizedVec {
        q: vec![127; cols],
        sums: vec![127 * gs as i32; 2],
        ..xq.clone()
    };
    for path in KernelPath::supported() {
        let mut out = vec![0.0; rows];
        path.matvec_q8(&mut out, &w_q, &w_s, &xq);
        assert_eq!(out, vec![0.0; rows], "{}", path.name());
        path.matvec_q8(&mut out, &w_q, &w_s, &xq_pos);
        assert_eq!(out, vec![-128.0 * 127.0 * 64.0; rows], "{}", path.name());
    }
    let packed = PackedQ8::new(&w_q, &w_s, rows, cols, gs);
    let xs = [xq.clone(), xq_pos.clone()];
    for (name, kernel) in packed_kernels() {
        let mut out = vec![0.0; 2 * rows];
        kernel(&mut out, rows, &packed, 0..1, &xs);
        assert_eq!(out[..rows], vec![0.0; rows], "{name}");
        assert_eq!(out[rows..], vec![-128.0 * 127.0 * 64.0; rows], "{name}");
    }
}

#[test]
fn from_name_rejects_unknown_path() {
    let err = KernelPath::from_name("neon9000").unwrap_err().to_string();
    assert!(err.contains("neon9000"), "{err}");
    assert_eq!(
        KernelPath::from_name("generic").unwrap(),
        KernelPath::Generic
    );
}

#[test]
fn round_half_away_matches_f32_round() {
    let mut rng = Lcg(11);
    let special = [
        0.5f32,
        -0.5,
        1.5,
        -1.5,
        0.49999997,
        -0.49999997,
        126.5,
        -126.5,
        127.0,
        0.0,
        -0.0,
    ];
    let random = (0..100_000).map(|_| rng.unit() * 127.0);
    for v in special.into_iter().chain(random) {
        assert_eq!(round_half_away(v), v.round() as i32, "{v}");
    }
}

#[test]
fn quantize_sums_each_group() {
    let mut rng = Lcg(5);
    let x: Vec<f32> = (0..96).map(|_| rng.unit()).collect();
    let mut q = QuantizedVec::with_capacity(96, 32);
    q.quantize_from(&x);
    let expected: Vec<i32> =
        q.q.chunks(32)
            .map(|g| g.iter().map(|&v| v as i32).sum())
            .collect();
    assert_eq!(q.sums, expected);
}

#[test]
fn every_path_quantizes_like_the_scalar_code() {
    let mut rng = Lcg(21);
    let mut cases: Vec<Vec<f32>> = (0..200)
        .map(|i| (0..96).map(|_| rng.unit() * (i as f32 + 0.5)).collect())
        .collect();
    // Exact ties (max 127 gives scale 1), zeros, denormals, huge values, NaN and infinity.
    let mut ties: Vec<f32> = (0..32).map(|i| i as f32 - 15.5).collect();
    ties[0] = 127.0;
    cases.push([ties.clone(), ties.clone(), ties].concat());
    cases.push(vec![0.0; 96]);
    cases.push((0..96).map(|i| f32::from_bits(i as u32 + 1)).collect());
    cases.push(
        (0..96)
            .map(|i| 3.0e38 * if i % 2 == 0 { 1.0 } else { -0.7 })
            .collect(),
    );
    for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x: Vec<f32> = (0..96).map(|_| rng.unit()).collect();
        x[40] = special;
        cases.push(x);
    }
    for gs in [16, 32, 96] {
        for x in &cases {
            let mut expected = QuantizedVec::with_capacity(96, gs);
            expected.quantize_from(x);
            for path in KernelPath::supported() {
                let mut got = QuantizedVec::with_capacity(96, gs);
                path.quantize(&mut got, x);
                let scales_same = got
                    .scales
                    .iter()
                    .zip(&expected.scales)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(scales_same, "{} scales for {x:?}", path.name());
                assert_eq!(got.q, expected.q, "{} values for {x:?}", path.name());
                assert_eq!(got.sums, expected.sums, "{} sums", path.name());
            }
        }
    }
}

/// Rows of more than 16 groups, which the AVX-512 quantizer takes sixteen at a time (and the
/// AVX2 one eight): full and partial batches, all-zero groups between others, a tie, and a
/// NaN in a later batch.
#[test]
fn quantize_long_rows_matches_scalar() {
    let mut rng = Lcg(22);
    for (len, gs) in [
        (592, 16),
        (1024, 32),
        (2048, 32),
        (768, 64),
        (288, 32),
        (600, 24),
        (136, 8),
    ] {
        let mut x: Vec<f32> = (0..len).map(|i| rng.unit() * (1 + i % 7) as f32).collect();
        let mut cases = vec![x.clone()];
        for g in (3..len / gs).step_by(5) {
            x[g * gs..(g + 1) * gs].fill(0.0);
        }
        x[len - 1] = 127.0;
        x[len - 2] = 15.5;
        cases.push(x.clone());
        x[len - gs / 2] = f32::NAN;
        cases.push(x);
        for x in &cases {
            let mut expected = QuantizedVec::with_capacity(len, gs);
            expected.quantize_from(x);
            for path in KernelPath::supported() {
                let mut got = QuantizedVec::with_capacity(len, gs);
                path.quantize(&mut got, x);
                let bits = |v: &[f32]| v.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
                let name = path.name();
                assert_eq!(
                    bits(&got.scales),
                    bits(&expected.scales),
                    "{name} {len}/{gs}"
                );
                assert_eq!(got.q, expected.q, "{name} values, {len}/{gs}");
                assert_eq!(got.sums, expected.sums, "{name} sums, {len}/{gs}");
            }
        }
    }
}

/// A packed kernel: `out`, `stride`, weights, panels, inputs.
type PackedKernel = Box<dyn Fn(&mut [f32], usize, &PackedQ8, Range<usize>, &[QuantizedVec])>;

/// Returns every packed kernel this CPU runs, by name. These are the kernels of the paths that
/// pack, and the AVX-VNNI kernel with the AVX-512 encoding of `dpbusd`, which CPUs without
/// AVX-VNNI run. The AMX kernel is also run alone, for the input counts its path leaves to
/// the AVX-512 kernel.
fn packed_kernels() -> Vec<(String, PackedKernel)> {
    // Only the x86 kernels below are added to the list.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut kernels: Vec<(String, PackedKernel)> = KernelPath::supported()
        .into_iter()
        .filter(|p| p.packs(32))
        .map(|path| {
            let kernel: PackedKernel = Box::new(move |out, stride, w, panels, xs| {
                path.matmul_packed(out, stride, w, panels, xs)
            });
            (path.name().to_string(), kernel)
        })
        .collect();
    #[cfg(target_arch = "x86_64")]
    if KernelPath::Avx512Vnni.is_supported() {
        let kernel: PackedKernel = Box::new(|out, stride, w, panels, xs| {
            // SAFETY: AVX-512 VNNI and VL (and AVX2) are supported; the test sizes `out` and
            // the inputs for the weights, as `matmul_packed` asserts.
            unsafe { x86_packed_avx2::matmul_packed_evex(out, stride, w, panels, xs) }
        });
        kernels.push(("avxvnni steps (EVEX)".to_string(), kernel));
    }
    #[cfg(target_arch = "x86_64")]
    if KernelPath::Amx.is_supported() {
        let kernel: PackedKernel = Box::new(|out, stride, w, panels, xs| {
            if w.group_size > x86_packed_amx::MAX_GROUP {
                return KernelPath::Amx.matmul_packed(out, stride, w, panels, xs);
            }
            // SAFETY: AMX and AVX-512 are supported, the group fits a tile row, and the test
            // sizes `out` and the inputs for the weights, as `matmul_packed` asserts.
            unsafe { x86_packed_amx::matmul_packed(out, stride, w, panels, xs) }
        });
        kernels.push(("amx tiles for every input count".to_string(), kernel));
    }
    kernels
}

#[test]
fn packed_matmul_matches_generic_matvec_bit_for_bit() {
    let kernels = packed_kernels();
    if kernels.is_empty() {
        eprintln!("no packed path on this CPU; the portable kernel is tested alone");
        return;
    }
    let mut rng = Lcg(99);
    // Rows that leave the last panel partly empty. 1 to 64 groups cover lanes with no groups and
    // several rounds of lanes. The group sizes cover both specialized widths and the general one.
    // Input counts cover full and partial tiles (4 inputs for the AVX-512 kernel, 16 for AMX,
    // which leaves a last tile of fewer than 10 inputs to the AVX-512 kernel).
    for &(rows, cols, gs) in &[
        (5, 288, 32),
        (16, 32, 32),
        (17, 96, 32),
        (40, 768, 64),
        (33, 544, 32),
        (3, 48, 16),
        (20, 96, 96),
        (48, 2048, 32),
        // Several runs of panels (four 32 KiB panels each), the last one short.
        (150, 2048, 32),
        // An odd number of 4-column blocks per group.
        (7, 60, 12),
        (9, 40, 20),
        (18, 8, 4),
    ] {
        let (w_q, w_s, _) = random_case(&mut rng, rows, cols, gs);
        let packed = PackedQ8::new(&w_q, &w_s, rows, cols, gs);
        for n in [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 19, 30, 37] {
            let xs: Vec<QuantizedVec> = (0..n)
                .map(|_| {
                    let x: Vec<f32> = (0..cols).map(|_| rng.unit() * 2.0).collect();
                    let mut xq = QuantizedVec::with_capacity(cols, gs);
                    xq.quantize_from(&x);
                    xq
                })
                .collect();
            let stride = rows + 3; // the output rows of one input need not be contiguous
            let mut expected = vec![0.0f32; n * stride];
            for (b, x) in xs.iter().enumerate() {
                let out = &mut expected[b * stride..b * stride + rows];
                KernelPath::Generic.matvec_q8(out, &w_q, &w_s, x);
            }
            for (name, kernel) in &kernels {
                let mut out = vec![0.0f32; n * stride];
                kernel(&mut out, stride, &packed, 0..packed.panels(), &xs);
                let same = out
                    .iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{name} differs for {rows}x{cols} gs {gs}, {n} inputs");

                // A range of panels writes only its own rows, starting at the first of them:
                // the ranges after the first panel and before the last, which with 2048
                // columns start or end inside a run of panels.
                let panels = packed.panels();
                for range in [1..panels, 0..panels - 1, 1..panels - 1] {
                    if range.is_empty() {
                        continue;
                    }
                    let first = range.start * PANEL;
                    let end = (range.end * PANEL).min(rows);
                    let mut part = vec![f32::NAN; (n - 1) * stride + end - first];
                    kernel(&mut part, stride, &packed, range.clone(), &xs);
                    for (i, got) in part.iter().enumerate() {
                        let (b, r) = (i / stride, first + i % stride);
                        if r < end {
                            let want = expected[b * stride + r];
                            assert_eq!(got.to_bits(), want.to_bits(), "{name} {range:?}, row {r}");
                        } else {
                            assert!(got.is_nan(), "{name} {range:?} wrote between inputs");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn packed_zero_columns_give_zero_rows() {
    let packed = PackedQ8::new(&[], &[], 5, 0, 4);
    let x = QuantizedVec {
        group_size: 4,
        ..QuantizedVec::default()
    };
    for (name, kernel) in packed_kernels() {
        let mut out = vec![f32::NAN; 5];
        kernel(&mut out, 5, &packed, 0..1, std::slice::from_ref(&x));
        assert_eq!(out, vec![0.0; 5], "{name}");
    }
}

/// Returns the first path that packs weights of group size 32, or `None` (with a line on
/// stderr) where the CPU has none.
fn any_packed_path() -> Option<KernelPath> {
    let path = KernelPath::supported().into_iter().find(|p| p.packs(32));
    if path.is_none() {
        eprintln!("no packed path on this CPU");
    }
    path
}

/// Runs `call`, which must panic, and returns its panic message.
fn rejection_message(call: impl FnOnce() + std::panic::UnwindSafe) -> &'static str {
    let payload = std::panic::catch_unwind(call).expect_err("the call must be rejected");
    payload
        .downcast_ref::<&str>()
        .copied()
        .expect("a panic with a fixed message")
}

#[test]
fn packed_inputs_without_their_scales_are_rejected() {
    let Some(path) = any_packed_path() else {
        return;
    };
    let mut rng = Lcg(5);
    let (w_q, w_s, x) = random_case(&mut rng, 16, 64, 32);
    let packed = PackedQ8::new(&w_q, &w_s, 16, 64, 32);
    let short_scales = QuantizedVec {
        scales: vec![1.0],
        ..x.clone()
    };
    let short_sums = QuantizedVec {
        sums: vec![],
        ..x.clone()
    };
    for bad in [short_scales, short_sums] {
        let message = rejection_message(|| {
            let mut out = vec![0.0; 16];
            path.matmul_packed(&mut out, 16, &packed, 0..1, &[bad]);
        });
        assert_eq!(message, "input shape mismatch");
    }
}

#[test]
fn packed_overlapping_outputs_are_rejected() {
    let Some(path) = any_packed_path() else {
        return;
    };
    let mut rng = Lcg(6);
    let (w_q, w_s, x) = random_case(&mut rng, 16, 64, 32);
    let packed = PackedQ8::new(&w_q, &w_s, 16, 64, 32);
    // A stride of 8 is shorter than the 16 rows, so the two inputs' outputs would overlap.
    let message = rejection_message(|| {
        let mut out = vec![0.0; 32];
        path.matmul_packed(&mut out, 8, &packed, 0..1, &[x.clone(), x.clone()]);
    });
    assert_eq!(message, "matmul outputs of different inputs overlap");
}

#[test]
fn unsupported_paths_panic_instead_of_running() {
    for path in KernelPath::ALL.into_iter().filter(|p| !p.is_supported()) {
        let x = QuantizedVec {
            q: vec![1; 32],
            scales: vec![1.0],
            sums: vec![32],
            group_size: 32,
        };
        let result = std::panic::catch_unwind(|| {
            let mut out = [0.0f32; 1];
            path.matvec_q8(&mut out, &[1; 32], &[1.0], &x);
        });
        assert!(result.is_err(), "{} ran on a CPU without it", path.name());
    }
}
