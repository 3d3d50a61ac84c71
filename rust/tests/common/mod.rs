//! A small Llama2RNN checkpoint with pseudo-random weights, shared by the integration tests.

// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const DIM: usize = 64;
pub const HIDDEN: usize = 128;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
/// Fewer key/value heads than query heads, so that grouped-query attention runs too.
pub const KV_HEADS: usize = 2;
pub const VOCAB: usize = 300;
pub const SEQ_LEN: usize = 64;
/// A memory update multiplies 16 rows: one whole AMX tile where the `amx` path runs.
pub const MEM_LEN: usize = 16;
pub const GROUP_SIZE: usize = 32;

/// Returns a path in the temp folder for a checkpoint of this test process named `name`.
pub fn temp_checkpoint(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("llama2rnn-{name}-{}.bin", std::process::id()))
}

/// A linear congruential generator: the same weights on every run and machine.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// Appends `n` fp32 values in `base - 0.1..base + 0.1`.
    fn f32s(&mut self, out: &mut Vec<u8>, n: usize, base: f32) {
        for _ in 0..n {
            let v = base + (self.next() % 1000) as f32 / 5000.0 - 0.1;
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// Appends a Q8_0 tensor of `n` values: int8 values in -127..=127, then one scale per
    /// group, each matrix and group different.
    fn q8(&mut self, out: &mut Vec<u8>, n: usize) {
        out.extend((0..n).map(|_| ((self.next() % 255) as i32 - 127) as i8 as u8));
        for _ in 0..n / GROUP_SIZE {
            let scale = 0.001 + (self.next() % 1000) as f32 / 500_000.0;
            out.extend_from_slice(&scale.to_le_bytes());
        }
    }
}

/// Writes a Llama2RNN memory checkpoint with pseudo-random weights.
pub fn write_checkpoint(path: &Path) {
    let mut rng = Lcg(1);
    let mut out = Vec::new();
    out.extend_from_slice(&0x616b_3432u32.to_le_bytes());
    out.extend_from_slice(&2i32.to_le_bytes());
    for v in [
        DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ_LEN, MEM_LEN,
    ] {
        out.extend_from_slice(&(v as i32).to_le_bytes());
    }
    out.push(1); // shared classifier
    out.extend_from_slice(&(GROUP_SIZE as i32).to_le_bytes());
    out.resize(256, 0);
    for _ in 0..4 {
        rng.f32s(&mut out, LAYERS * DIM, 1.0); // rms_att, rms_ffn, rms_mem, rms_mff
    }
    rng.f32s(&mut out, LAYERS * MEM_LEN * DIM, 0.0); // ori_mem
    rng.f32s(&mut out, DIM, 1.0); // rms_final
    let kv_dim = DIM / HEADS * KV_HEADS;
    rng.q8(&mut out, VOCAB * DIM); // embedding, also the classifier
    for size in [DIM * DIM, kv_dim * DIM, kv_dim * DIM, DIM * DIM] {
        (0..LAYERS).for_each(|_| rng.q8(&mut out, size)); // wq, wk, wv, wo
    }
    for _ in 0..6 {
        (0..LAYERS).for_each(|_| rng.q8(&mut out, DIM * HIDDEN)); // w1, w2, w3, aw1, aw2, aw3
    }
    std::fs::write(path, out).expect("the temp folder is writable");
}
