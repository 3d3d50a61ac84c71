//! Invariants of the forward pass on every kernel path and thread count this machine supports.
//! A batched feed leaves the logits of feeding the tokens one by one, and all paths and thread
//! counts give the same bits. A state restored from a memory file goes on as if it had never
//! stopped. The Python tests check the same against a numpy reference. These also run where
//! Python does not, such as the ARM build under qemu (see README), and cover the portable path
//! end to end there.

mod common;

use common::{temp_checkpoint, write_checkpoint, MEM_LEN, VOCAB};
use llama2rnn::memory_file::{self, SessionInfo};
use llama2rnn::{KernelPath, Options, Transformer};

/// Tokens that cross two memory updates and end inside the third chunk.
fn tokens() -> Vec<u32> {
    (0..2 * MEM_LEN + 7)
        .map(|i| ((i * 7919 + 13) % VOCAB) as u32)
        .collect()
}

/// Opens the shared test checkpoint with `kernel` on `threads` threads. The governors are off,
/// so that with 2 threads every token and update runs on the pool.
fn open(name: &str, kernel: KernelPath, threads: usize) -> Transformer {
    let path = temp_checkpoint(name);
    write_checkpoint(&path);
    let options = Options {
        threads,
        kernel,
        governed: false,
        ..Options::default()
    };
    let model = Transformer::open(&path, &options).expect("valid checkpoint");
    std::fs::remove_file(&path).ok();
    model
}

fn bits(logits: &[f32]) -> Vec<u32> {
    logits.iter().map(|v| v.to_bits()).collect()
}

/// Feeds `tokens` in batches that end at `splits` and returns the logits.
fn feed_in_parts(model: &Transformer, tokens: &[u32], splits: &[usize]) -> Vec<u32> {
    let mut state = model.new_state().expect("small state");
    let mut start = 0;
    for &end in splits.iter().chain([&tokens.len()]) {
        model
            .feed(&mut state, &tokens[start..end])
            .expect("tokens in range");
        start = end;
    }
    bits(state.logits())
}

fn one_by_one(model: &Transformer, tokens: &[u32]) -> Vec<u32> {
    let mut state = model.new_state().expect("small state");
    let mut logits = Vec::new();
    for &token in tokens {
        logits = bits(model.forward(&mut state, token).expect("token in range"));
    }
    logits
}

#[test]
fn paths_and_threads_match_token_by_token() {
    let tokens = tokens();
    let reference = one_by_one(&open("reference", KernelPath::Generic, 1), &tokens);
    assert!(reference.iter().any(|&b| f32::from_bits(b) != 0.0));
    for kernel in KernelPath::supported() {
        for threads in [1, 2] {
            let model = open("paths", kernel, threads);
            let name = format!("{} at {threads} thread(s)", kernel.name());
            assert_eq!(one_by_one(&model, &tokens), reference, "{name}, one by one");
            // One feed, and feeds that split chunks unevenly and end on a chunk boundary.
            for splits in [&[][..], &[3, MEM_LEN, MEM_LEN + 1, 2 * MEM_LEN]] {
                let fed = feed_in_parts(&model, &tokens, splits);
                assert_eq!(
                    fed, reference,
                    "{name}, fed in batches ending at {splits:?}"
                );
            }
        }
    }
}

#[test]
fn restored_memory_matches_uninterrupted_run() {
    let tokens = tokens();
    let model = open("resume", KernelPath::detect(), 2);
    let whole = feed_in_parts(&model, &tokens, &[]);
    // Stops inside a chunk, at a chunk boundary, and right after one.
    for stop in [5, MEM_LEN, MEM_LEN + 1, 2 * MEM_LEN - 1] {
        let mut state = model.new_state().expect("small state");
        model
            .feed(&mut state, &tokens[..stop])
            .expect("tokens in range");
        let info = SessionInfo {
            rng_state: 7,
            last_token: Some(tokens[stop - 1]),
            saved_unix_ms: 0,
        };
        let file = memory_file::encode(&model, &mut state, &info);

        let mut restored = model.new_state().expect("small state");
        let read = memory_file::decode(&model, &mut restored, &file).expect("a valid file");
        assert_eq!(read.last_token, info.last_token);
        assert_eq!(restored.position, stop as u64);
        model
            .feed(&mut restored, &tokens[stop..])
            .expect("tokens in range");
        assert_eq!(
            bits(restored.logits()),
            whole,
            "stopped after {stop} tokens"
        );
    }
}
