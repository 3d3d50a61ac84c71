//! The decode path allocates nothing: a counting global allocator watches `forward` and the
//! sampler over several chunks, memory updates included.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use llama2rnn::{Options, Sampler, Transformer};

struct CountingAllocator;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the thread under test only: the test harness allocates on its own threads.
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn count() {
    if COUNTING.with(|c| c.get()) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const DIM: usize = 64;
const HIDDEN: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const VOCAB: usize = 300;
const SEQ_LEN: usize = 64;
/// A memory update multiplies 16 rows: one whole AMX tile where the `amx` path runs, whose
/// working memory the first update allocates, before the count starts.
const MEM_LEN: usize = 16;
const GROUP_SIZE: usize = 32;

/// Writes a Llama2RNN memory checkpoint with pseudo-random weights.
fn write_checkpoint(path: &std::path::Path) {
    let mut state = 1u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
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
    let mut f32s = |out: &mut Vec<u8>, n: usize, base: f32| {
        for _ in 0..n {
            let v = base + (next() % 1000) as f32 / 5000.0 - 0.1;
            out.extend_from_slice(&v.to_le_bytes());
        }
    };
    for _ in 0..4 {
        f32s(&mut out, LAYERS * DIM, 1.0); // rms_att, rms_ffn, rms_mem, rms_mff
    }
    f32s(&mut out, LAYERS * MEM_LEN * DIM, 0.0); // ori_mem
    f32s(&mut out, DIM, 1.0); // rms_final
    let kv_dim = DIM / HEADS * KV_HEADS;
    let q8 = |out: &mut Vec<u8>, n: usize| {
        out.extend((0..n).map(|i| ((i * 37 + 11) % 255) as u8));
        for _ in 0..n / GROUP_SIZE {
            out.extend_from_slice(&0.002f32.to_le_bytes());
        }
    };
    q8(&mut out, VOCAB * DIM);
    for size in [DIM * DIM, kv_dim * DIM, kv_dim * DIM, DIM * DIM] {
        (0..LAYERS).for_each(|_| q8(&mut out, size)); // wq, wk, wv, wo
    }
    for _ in 0..6 {
        (0..LAYERS).for_each(|_| q8(&mut out, DIM * HIDDEN)); // w1, w2, w3, aw1, aw2, aw3
    }
    std::fs::write(path, out).expect("the temp folder is writable");
}

#[test]
fn decode_allocates_nothing() {
    COUNTING.with(|c| c.set(true));
    let path = std::env::temp_dir().join(format!("llama2rnn-alloc-{}.bin", std::process::id()));
    write_checkpoint(&path);
    let model = Transformer::open(&path, &Options::default()).expect("valid checkpoint");
    let mut state = model.new_state().expect("small state");
    let mut sampler = Sampler::new(VOCAB, 1.0, 0.9, 7).expect("valid settings");
    let mut token = 1;
    for _ in 0..MEM_LEN + 3 {
        let logits = model.forward(&mut state, token).expect("token in range");
        token = sampler.sample(logits).expect("finite logits");
    }

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    assert!(before > 0, "the counting allocator saw the setup allocate");
    for _ in 0..5 * MEM_LEN {
        let logits = model.forward(&mut state, token).expect("token in range");
        token = sampler.sample(logits).expect("finite logits");
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    std::fs::remove_file(&path).ok();
    assert_eq!(
        allocations, 0,
        "forward and sample allocated {allocations} times"
    );
}
