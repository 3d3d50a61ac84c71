//! The decode path allocates nothing: a counting global allocator watches `forward` and the
//! sampler over several chunks, memory updates included.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;

use common::{temp_checkpoint, write_checkpoint, MEM_LEN, VOCAB};
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

#[test]
fn decode_allocates_nothing() {
    COUNTING.with(|c| c.set(true));
    let path = temp_checkpoint("alloc");
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
