use super::*;

/// The nucleus by the definition: sort descending and take the shortest prefix reaching p.
fn nucleus_by_sorting(probs: &[f32], top_p: f32) -> Vec<u32> {
    let mut order: Vec<u32> = (0..probs.len() as u32).collect();
    order.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]));
    let mut mass = 0.0;
    let mut out = Vec::new();
    for i in order {
        out.push(i);
        mass += probs[i as usize];
        if mass >= top_p {
            break;
        }
    }
    out
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let e: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

#[test]
fn nucleus_matches_sorting_definition() {
    let mut rng = Sampler::new(1, 1.0, 1.0, 3).unwrap();
    for case in 0..200 {
        let n = 1 + case * 7 % 500;
        let spread = [0.1f32, 1.0, 5.0][case % 3];
        let logits: Vec<f32> = (0..n).map(|_| rng.next_f32() * spread).collect();
        let probs = softmax(&logits);
        for &p in &[0.0f32, 0.1, 0.5, 0.9, 0.99] {
            let mut got = Vec::new();
            nucleus(&probs, p, &mut got);
            let expected = nucleus_by_sorting(&probs, p);
            assert_eq!(got.len(), expected.len(), "n {n} top_p {p}");
            let mut got_sorted = got.clone();
            got_sorted.sort();
            let mut expected_sorted = expected.clone();
            expected_sorted.sort();
            // Ties at the boundary may pick different tokens of equal probability.
            let got_min = got
                .iter()
                .map(|&i| probs[i as usize])
                .fold(f32::INFINITY, f32::min);
            let expected_min = expected
                .iter()
                .map(|&i| probs[i as usize])
                .fold(f32::INFINITY, f32::min);
            assert_eq!(got_min, expected_min, "n {n} top_p {p}");
        }
    }
}

#[test]
fn nucleus_handles_flat_and_tied_distributions() {
    let probs = vec![1.0 / 32000.0; 32000];
    let mut got = Vec::new();
    let mass = nucleus(&probs, 0.9, &mut got);
    assert_eq!(got.len(), 28800);
    assert!((mass - 0.9).abs() < 1e-3);
    nucleus(&probs, 0.0, &mut got);
    assert_eq!(got.len(), 1);
}

#[test]
fn greedy_picks_first_maximum() {
    let mut s = Sampler::new(4, 0.0, 0.9, 0).unwrap();
    assert_eq!(s.sample(&[0.5, 2.0, 2.0, -1.0]).unwrap(), 1);
}

#[test]
fn same_seed_same_samples() {
    let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
    for &top_p in &[1.0f32, 0.9, 0.0] {
        let mut a = Sampler::new(100, 1.0, top_p, 0).unwrap();
        let mut b = Sampler::new(100, 1.0, top_p, 0).unwrap();
        let xs: Vec<u32> = (0..50).map(|_| a.sample(&logits).unwrap()).collect();
        let ys: Vec<u32> = (0..50).map(|_| b.sample(&logits).unwrap()).collect();
        assert_eq!(xs, ys);
    }
    let mut c = Sampler::new(100, 1.0, 1.0, 1).unwrap();
    let mut d = Sampler::new(100, 1.0, 1.0, 0).unwrap();
    let xs: Vec<u32> = (0..50).map(|_| c.sample(&logits).unwrap()).collect();
    let ys: Vec<u32> = (0..50).map(|_| d.sample(&logits).unwrap()).collect();
    assert_ne!(xs, ys, "seeds 0 and 1 must give different streams");
}

#[test]
fn top_p_zero_is_argmax() {
    let logits = [0.1, 3.0, 2.9, -4.0];
    let mut s = Sampler::new(4, 1.0, 0.0, 9).unwrap();
    for _ in 0..100 {
        assert_eq!(s.sample(&logits).unwrap(), 1);
    }
}

#[test]
fn sampling_follows_distribution() {
    let logits = [0.0f32, (2.0f32).ln(), (7.0f32).ln()]; // probabilities 0.1, 0.2, 0.7
    let mut s = Sampler::new(3, 1.0, 1.0, 5).unwrap();
    let mut counts = [0usize; 3];
    for _ in 0..20000 {
        counts[s.sample(&logits).unwrap() as usize] += 1;
    }
    let freq: Vec<f64> = counts.iter().map(|&c| c as f64 / 20000.0).collect();
    for (f, p) in freq.iter().zip([0.1, 0.2, 0.7]) {
        assert!((f - p).abs() < 0.02, "{freq:?}");
    }
}

#[test]
fn rejects_nan_logits_and_bad_settings() {
    let mut s = Sampler::new(3, 1.0, 0.9, 0).unwrap();
    let err = s.sample(&[0.0, f32::NAN, 1.0]).unwrap_err().to_string();
    assert!(err.contains("token 1"), "{err}");
    assert!(Sampler::new(3, -1.0, 0.9, 0).is_err());
    assert!(Sampler::new(3, f32::NAN, 0.9, 0).is_err());
    assert!(Sampler::new(3, 1.0, 1.5, 0).is_err());
    assert!(Sampler::new(3, 1.0, -0.1, 0).is_err());
}

/// Returns the index a serial scan finds: the first value larger than every earlier one.
fn argmax_by_scan(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn argmax_matches_serial_scan() {
    let mut rng = Sampler::new(1, 1.0, 1.0, 11).unwrap();
    // Lengths around the 64-value blocks; values from a few levels, so that ties are common.
    for n in [1, 2, 63, 64, 65, 127, 128, 129, 1000, 32000] {
        for levels in [2.0f32, 50.0, 1e6] {
            let values: Vec<f32> = (0..n)
                .map(|_| (rng.next_f32() * levels).floor() - levels / 2.0)
                .collect();
            assert_eq!(
                argmax(&values),
                argmax_by_scan(&values),
                "n {n}, levels {levels}"
            );
        }
        // The maximum only at the last position, and zeros of both signs tied at the top.
        let mut values = vec![-1.0f32; n];
        values[n - 1] = 0.5;
        assert_eq!(argmax(&values), (n - 1) as u32);
        values[n - 1] = 0.0;
        values[n / 2] = -0.0;
        assert_eq!(
            argmax(&values),
            argmax_by_scan(&values),
            "signed zeros, n {n}"
        );
    }
}

#[test]
fn finite_check_finds_every_position() {
    for n in [1, 7, 8, 9, 100, 32000] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, n / 2, n - 1] {
                let mut values = vec![1.0f32; n];
                values[at] = bad;
                assert!(!all_finite(&values), "{bad} at {at} of {n}");
            }
        }
        assert!(all_finite(&vec![f32::MAX; n]));
    }
}

#[test]
fn softmax_widths_give_the_same_bits() {
    let logits: Vec<f32> = (0..32003)
        .map(|i| (i as f32 * 0.731).sin() * 20.0)
        .collect();
    for inv_t in [1.0f32, 0.3, 50.0] {
        let mut dispatched = Vec::new();
        softmax_into(&mut dispatched, &logits, inv_t);
        let mut plain = vec![0.0; logits.len()];
        softmax_body(&mut plain, &logits, inv_t);
        assert_eq!(dispatched, plain, "inv_t {inv_t}");
        let total: f32 = plain.iter().sum();
        assert!((total - 1.0).abs() < 1e-3, "sum {total}");
    }
}

#[test]
fn pick_brackets_the_target() {
    let mut rng = Sampler::new(1, 1.0, 1.0, 21).unwrap();
    for n in [1, 63, 64, 65, 1000, 32000] {
        for spread in [0.1f32, 3.0] {
            let logits: Vec<f32> = (0..n).map(|_| rng.next_f32() * spread).collect();
            let probs = softmax(&logits);
            // Exact cumulative sums: f32 sums of 32,000 values drift by more than 1e-5.
            let cumulative: Vec<f64> = probs
                .iter()
                .scan(0.0f64, |c, &p| {
                    *c += p as f64;
                    Some(*c)
                })
                .collect();
            for _ in 0..200 {
                let r = rng.next_f32();
                let (i, target) = (pick(&probs, r, 1.0), r as f64);
                let before = if i == 0 { 0.0 } else { cumulative[i - 1] };
                assert!(before <= target + 1e-5, "n {n}, r {r}: {before} before {i}");
                assert!(
                    cumulative[i] > target - 1e-5,
                    "n {n}, r {r}: {} at {i}",
                    cumulative[i]
                );
            }
            // A target past the total (rounding) takes the last value.
            assert_eq!(pick(&probs, 1.0, 2.0), n - 1);
        }
    }
}
