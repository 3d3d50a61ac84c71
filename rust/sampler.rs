//! Picks the next token from logits: greedy, temperature, and top-p (nucleus) sampling.

use crate::error::{Error, Result};
use crate::model::ops;

/// Sampling settings and the random generator state, which is part of what a saved session
/// restores so that a resumed run draws the same numbers.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: u64,
    probs: Vec<f32>,
    candidates: Vec<u32>,
    /// The probabilities of `candidates`, in their order.
    candidate_probs: Vec<f32>,
}

/// SplitMix64: spreads any seed, 0 included, over the whole state space of xorshift.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let z = z ^ (z >> 31);
    if z == 0 {
        0x2545_f491_4f6c_dd1d
    } else {
        z
    }
}

impl Sampler {
    /// `temperature` 0 is greedy. `top_p` keeps the smallest set of most likely tokens whose
    /// probability reaches it (1 keeps all, 0 keeps only the most likely token).
    pub fn new(vocab_size: usize, temperature: f32, top_p: f32, seed: u64) -> Result<Sampler> {
        let mut sampler = Sampler {
            temperature: 0.0,
            top_p: 1.0,
            rng: splitmix64(seed),
            probs: Vec::with_capacity(vocab_size),
            candidates: Vec::with_capacity(vocab_size),
            candidate_probs: Vec::with_capacity(vocab_size),
        };
        sampler.configure(temperature, top_p)?;
        Ok(sampler)
    }

    /// Sets both settings, or neither when one of them is invalid.
    pub fn configure(&mut self, temperature: f32, top_p: f32) -> Result<()> {
        check_temperature(temperature)?;
        check_top_p(top_p)?;
        self.temperature = temperature;
        self.top_p = top_p;
        Ok(())
    }

    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    pub fn top_p(&self) -> f32 {
        self.top_p
    }

    pub fn reseed(&mut self, seed: u64) {
        self.rng = splitmix64(seed);
    }

    /// The generator state, to be saved with a session and given back to [`Self::set_rng_state`].
    pub fn rng_state(&self) -> u64 {
        self.rng
    }

    pub fn set_rng_state(&mut self, state: u64) {
        // xorshift never leaves 0, so 0 cannot be a valid saved state.
        self.rng = if state == 0 { splitmix64(0) } else { state };
    }

    /// xorshift64*, uniform in [0, 1) with 24 bits.
    fn next_f32(&mut self) -> f32 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let bits = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        bits as f32 / (1u32 << 24) as f32
    }

    /// Samples a token id. Fails if any logit is NaN or infinite.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if !all_finite(logits) {
            let (token, &value) = logits
                .iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite())
                .expect("a logit is not finite");
            return Err(Error::NonFiniteLogits { token, value });
        }
        if self.temperature == 0.0 {
            return Ok(argmax(logits));
        }

        softmax_into(&mut self.probs, logits, 1.0 / self.temperature);

        let r = self.next_f32();
        if self.top_p >= 1.0 {
            return Ok(pick(&self.probs, r, 1.0) as u32);
        }
        let mass = nucleus(&self.probs, self.top_p, &mut self.candidates);
        let probs = &self.probs;
        self.candidate_probs.clear();
        self.candidate_probs
            .extend(self.candidates.iter().map(|&i| probs[i as usize]));
        Ok(self.candidates[pick(&self.candidate_probs, r, mass)])
    }
}

fn check_temperature(temperature: f32) -> Result<()> {
    if temperature.is_finite() && temperature >= 0.0 {
        return Ok(());
    }
    Err(Error::InvalidSetting(format!(
        "temperature {temperature} is invalid: use 0 for greedy decoding or a positive number"
    )))
}

fn check_top_p(top_p: f32) -> Result<()> {
    if (0.0..=1.0).contains(&top_p) {
        return Ok(());
    }
    Err(Error::InvalidSetting(format!(
        "top_p {top_p} is invalid: use a probability mass between 0 and 1"
    )))
}

/// Returns whether every value is finite. The loop has no early exit, so that it vectorizes.
fn all_finite(values: &[f32]) -> bool {
    values
        .iter()
        .fold(true, |finite, v| finite & (v.abs() < f32::INFINITY))
}

/// Returns the index of the first largest value of `values`, which must not contain NaN.
/// The first value equal to the maximum is the one a serial scan that keeps the first
/// strictly larger value finds (zeros of both signs compare equal in both). Blocks of 64
/// values are tested without an early exit, so that the search vectorizes.
fn argmax(values: &[f32]) -> u32 {
    let max = ops::max(values);
    let block = values
        .chunks(64)
        .position(|b| b.iter().fold(false, |found, &v| found | (v == max)))
        .unwrap_or(0);
    let offset = values[block * 64..]
        .iter()
        .position(|&v| v == max)
        .unwrap_or(0);
    (block * 64 + offset) as u32
}

/// Sets `probs` to the softmax of `logits * inv_t`, shifted by the maximum for stability.
/// `exp` is the vectorizing polynomial of the attention, so the loops run as wide as the CPU
/// allows; every width gives the same bits.
fn softmax_into(probs: &mut Vec<f32>, logits: &[f32], inv_t: f32) {
    probs.clear();
    probs.resize(logits.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512 F (checked above).
        return unsafe { softmax_avx512(probs, logits, inv_t) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked above).
        return unsafe { softmax_avx2(probs, logits, inv_t) };
    }
    softmax_body(probs, logits, inv_t)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax_avx2(probs: &mut [f32], logits: &[f32], inv_t: f32) {
    softmax_body(probs, logits, inv_t)
}

/// # Safety
/// The CPU must support AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(probs: &mut [f32], logits: &[f32], inv_t: f32) {
    softmax_body(probs, logits, inv_t)
}

#[inline(always)]
fn softmax_body(probs: &mut [f32], logits: &[f32], inv_t: f32) {
    let max = ops::max(logits);
    for (p, &v) in probs.iter_mut().zip(logits) {
        *p = ops::exp((v - max) * inv_t);
    }
    let sum = ops::sum(probs);
    for p in probs.iter_mut() {
        *p /= sum;
    }
}

/// Returns the position in `probs` (of total `mass`) where the cumulative sum first exceeds
/// `r * mass`. Blocks whose sum keeps it at or below that are skipped whole, and the block
/// where it crosses is walked value by value. A serial walk over every value would have to
/// wait on each addition in turn; the block sums vectorize. The two can differ only where
/// the target lies within rounding of a block's end.
fn pick(probs: &[f32], r: f32, mass: f32) -> usize {
    const BLOCK: usize = 64;
    let target = r * mass;
    let mut cumulative = 0.0;
    for (b, block) in probs.chunks(BLOCK).enumerate() {
        let block_sum = ops::sum(block);
        if cumulative + block_sum <= target {
            cumulative += block_sum;
            continue;
        }
        for (i, &p) in block.iter().enumerate() {
            cumulative += p;
            if target < cumulative {
                return b * BLOCK + i;
            }
        }
    }
    probs.len().saturating_sub(1) // rounding left the cumulative sum just below the target
}

/// Leaves in `candidates` the smallest set of most likely tokens whose mass reaches `top_p`
/// (at least one token) and returns that mass.
///
/// Expected linear time: a quickselect on probability that keeps track of the mass already
/// known to be inside, instead of sorting the vocabulary. With flat logits over 32,000 tokens
/// a sort costs more than the rest of a small model's decode step.
fn nucleus(probs: &[f32], top_p: f32, candidates: &mut Vec<u32>) -> f32 {
    candidates.clear();
    // A token below this cannot be needed: all other tokens together would reach top_p.
    let cutoff = (1.0 - top_p) / (probs.len().max(2) - 1) as f32;
    candidates.extend((0..probs.len() as u32).filter(|&i| probs[i as usize] >= cutoff));
    if candidates.is_empty() {
        candidates.push(argmax(probs));
        return probs[candidates[0] as usize];
    }

    // Invariant: candidates[..lo] are inside the nucleus with total `taken` < target, and the
    // boundary lies within candidates[lo..hi].
    let target = top_p;
    let (mut lo, mut hi, mut taken) = (0usize, candidates.len(), 0.0f32);
    let end = loop {
        if lo >= hi {
            break hi;
        }
        let pivot = median_of_three(probs, &candidates[lo..hi]);
        let (n_greater, n_equal) = partition3(probs, &mut candidates[lo..hi], pivot);
        let sum = |s: &[u32]| s.iter().map(|&i| probs[i as usize]).sum::<f32>();
        let mass_greater = sum(&candidates[lo..lo + n_greater]);
        let mass_equal = pivot * n_equal as f32;
        if n_greater > 0 && taken + mass_greater >= target {
            hi = lo + n_greater;
            continue;
        }
        let through_equal = taken + mass_greater + mass_equal;
        if through_equal >= target {
            // The boundary falls among tokens of equal probability: take just enough of them.
            let needed = ((target - taken - mass_greater) / pivot).ceil().max(1.0) as usize;
            break lo + n_greater + needed.min(n_equal);
        }
        if lo + n_greater + n_equal == hi {
            break hi; // float rounding left the rest just short of the target: take it all
        }
        taken = through_equal;
        lo += n_greater + n_equal;
    };
    candidates.truncate(end.max(1));
    candidates.iter().map(|&i| probs[i as usize]).sum()
}

fn median_of_three(probs: &[f32], s: &[u32]) -> f32 {
    let (a, b, c) = (
        probs[s[0] as usize],
        probs[s[s.len() / 2] as usize],
        probs[s[s.len() - 1] as usize],
    );
    a.max(b).min(a.min(b).max(c))
}

/// Reorders `s` into [greater than pivot][equal][less] and returns the first two counts.
fn partition3(probs: &[f32], s: &mut [u32], pivot: f32) -> (usize, usize) {
    let (mut lt, mut i, mut gt) = (0, 0, s.len());
    while i < gt {
        let p = probs[s[i] as usize];
        if p > pivot {
            s.swap(lt, i);
            lt += 1;
            i += 1;
        } else if p < pivot {
            gt -= 1;
            s.swap(i, gt);
        } else {
            i += 1;
        }
    }
    (lt, gt - lt)
}

#[cfg(test)]
mod tests;
