//! Fork-join for the short parallel loops of a decode step and of a batch.
//!
//! A decode step forks a few dozen times, and each half takes a few to a few hundred
//! microseconds. When the thread that forked finishes its half before the other thread
//! finishes the stolen one, rayon's `join` waits in the pool's idle loop, which yields the
//! core to any other runnable thread. If another process keeps that core busy, the yield
//! hands it a whole scheduler tick (4 ms here), and a decode step with dozens of forks takes
//! 20-200 ms instead of 0.4-6. So [`join`] first waits for the stolen half by spinning, and
//! by taking the stolen half's own forks where it can, without yielding the core, for up to
//! four times as long as its own half took. Only then does it wait the rayon way. The halves
//! of a fork differ by up to twice (one product beside two), so a stolen half that started
//! about when its own did is done by then. If it is not, its thread has lost its core, and
//! the spin still costs less than the tick a yield would.
//!
//! Batches (prefill chunks) fork the same way. With rayon's parallel iterators, a thread that
//! ran out of tasks before the others often fell asleep, and waking it when the last task
//! ended took 50-150 us on a 2-vCPU VM: a quarter of an attention step on toy20M.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Added to every spin on a stolen half, because a waking thread needs about this long to
/// start it.
const MIN_SPIN: Duration = Duration::from_micros(20);
/// A spin on a stolen half lasts up to this many times the thread's own half.
const SPIN_FACTOR: u32 = 4;

/// Runs `a` and `b`, in parallel when another pool thread steals `b`, like `rayon::join`.
pub(super) fn join<A, B, RA, RB>(a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce() -> RB + Send,
    RA: Send,
    RB: Send,
{
    let started = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    rayon::join(
        || {
            let start = Instant::now();
            let ra = a();
            // Not started: `b` is still on this thread's queue and runs here next.
            if started.load(Ordering::Acquire) {
                let limit = start.elapsed() * SPIN_FACTOR + MIN_SPIN;
                let waiting = Instant::now();
                while !done.load(Ordering::Acquire) && waiting.elapsed() < limit {
                    // Help with the stolen half's own forks where there are any to take.
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            }
            ra
        },
        || {
            started.store(true, Ordering::Release);
            // Marks `b` done also when it panics, so that `a` does not spin on it.
            let _done = SetOnDrop(&done);
            b()
        },
    )
}

/// Sets its flag when dropped, on return or unwinding.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs `f(i, chunk)` for every chunk `i` of `size` elements of `data` (the last one may be
/// shorter; an empty `data` has none), forking with [`join`].
pub(super) fn for_each_chunk<T: Send>(
    data: &mut [T],
    size: usize,
    f: &(impl Fn(usize, &mut [T]) + Sync),
) {
    fn split<T: Send>(
        data: &mut [T],
        size: usize,
        first: usize,
        f: &(impl Fn(usize, &mut [T]) + Sync),
    ) {
        let chunks = data.len().div_ceil(size);
        if chunks <= 1 {
            if chunks == 1 {
                f(first, data);
            }
            return;
        }
        let half = chunks / 2;
        let (left, right) = data.split_at_mut(half * size);
        join(
            || split(left, size, first, f),
            || split(right, size, first + half, f),
        );
    }
    split(data, size.max(1), 0, f)
}

/// Runs `f(i, a_chunk, b_chunk)` for every chunk `i` of `a` (`a_size` elements) and of `b`
/// (`b_size` elements), forking with [`join`]. `b` must have a chunk for every chunk of `a`.
pub(super) fn for_each_chunk_pair<A: Send, B: Send>(
    a: &mut [A],
    a_size: usize,
    b: &mut [B],
    b_size: usize,
    f: &(impl Fn(usize, &mut [A], &mut [B]) + Sync),
) {
    fn split<A: Send, B: Send>(
        a: &mut [A],
        b: &mut [B],
        sizes: (usize, usize),
        first: usize,
        f: &(impl Fn(usize, &mut [A], &mut [B]) + Sync),
    ) {
        let chunks = a.len().div_ceil(sizes.0);
        if chunks <= 1 {
            if chunks == 1 {
                f(first, a, b);
            }
            return;
        }
        let half = chunks / 2;
        let (a_left, a_right) = a.split_at_mut(half * sizes.0);
        let (b_left, b_right) = b.split_at_mut((half * sizes.1).min(b.len()));
        join(
            || split(a_left, b_left, sizes, first, f),
            || split(a_right, b_right, sizes, first + half, f),
        );
    }
    let sizes = (a_size.max(1), b_size.max(1));
    debug_assert!(
        b.len() + sizes.1 > a.len().div_ceil(sizes.0) * sizes.1,
        "b has no chunk for some chunk of a"
    );
    split(a, b, sizes, 0, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
    }

    #[test]
    fn every_chunk_runs_once_with_its_index() {
        let pool = pool();
        for (len, size) in [(0, 3), (1, 3), (10, 3), (12, 3), (7, 1), (5, 10)] {
            let mut data = vec![usize::MAX; len];
            pool.install(|| {
                for_each_chunk(&mut data, size, &|i, chunk| {
                    assert!(!chunk.is_empty());
                    assert!(chunk.len() <= size);
                    chunk.iter_mut().for_each(|x| *x = i);
                })
            });
            let expected: Vec<usize> = (0..len).map(|j| j / size).collect();
            assert_eq!(data, expected, "len {len}, chunk {size}");
        }
    }

    #[test]
    fn pairs_split_both_slices_alike() {
        let pool = pool();
        let (mut a, mut b) = (vec![0usize; 11], vec![0usize; 6 * 3 - 1]);
        pool.install(|| {
            for_each_chunk_pair(&mut a, 2, &mut b, 3, &|i, a, b| {
                a.iter_mut().for_each(|x| *x = i + 1);
                b.iter_mut().for_each(|x| *x = i + 1);
            })
        });
        assert_eq!(a, [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]);
        let expected: Vec<usize> = (0..17).map(|j| j / 3 + 1).collect();
        assert_eq!(b, expected);
    }

    /// A stolen half that panics at once does not leave the other half spinning for its
    /// whole limit.
    #[test]
    fn join_panic_in_stolen_half_ends_spin() {
        let pool = pool();
        let start = Instant::now();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| {
                join(
                    || std::thread::sleep(Duration::from_millis(200)),
                    || -> u8 { panic!("b failed") },
                )
            })
        }));
        assert!(caught.is_err());
        assert!(start.elapsed() < Duration::from_millis(600));
    }

    #[test]
    fn join_returns_both_results_and_their_panics() {
        let pool = pool();
        assert_eq!(pool.install(|| join(|| 1, || "b")), (1, "b"));
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| join(|| 1, || -> u8 { panic!("b failed") }))
        }));
        assert!(caught.is_err());
    }
}
