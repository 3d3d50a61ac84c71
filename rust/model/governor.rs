//! Chooses, token by token, between decoding on the thread pool and on the calling thread.
//!
//! When another process keeps a core busy, a pool thread on that core stalls every parallel
//! loop until the scheduler runs it again, and decoding on all threads can become slower than
//! decoding on one. The governor measures instead of guessing: in every window of `PERIOD`
//! tokens, the first `PROBES` alternate between the two ways, and the faster one (by their
//! summed time) runs the rest of the window. The pool keeps the window unless the calling
//! thread is faster by a clear margin, so that noise on a quiet machine does not give up the
//! second thread. The probes cost at most `PROBES / 2` tokens in the slower way per window.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const PERIOD: u64 = 256;
const PROBES: u64 = 16;
/// The calling thread must take at most this share of the pool's time to be picked.
const SERIAL_MARGIN: f64 = 0.9;

pub(super) struct Governor {
    calls: AtomicU64,
    serial_ns: AtomicU64,
    pool_ns: AtomicU64,
    use_pool: AtomicBool,
}

/// The way one token runs, and whether its time is a probe.
#[derive(Clone, Copy)]
pub(super) struct Choice {
    pub use_pool: bool,
    probe: Option<u64>,
}

impl Governor {
    pub fn new() -> Self {
        Governor {
            calls: AtomicU64::new(0),
            serial_ns: AtomicU64::new(0),
            pool_ns: AtomicU64::new(0),
            use_pool: AtomicBool::new(true),
        }
    }

    pub fn choose(&self) -> Choice {
        let k = self.calls.fetch_add(1, Relaxed) % PERIOD;
        if k < PROBES {
            return Choice {
                use_pool: k % 2 == 1,
                probe: Some(k),
            };
        }
        Choice {
            use_pool: self.use_pool.load(Relaxed),
            probe: None,
        }
    }

    /// Records the time of a token run the way `choice` chose; the last probe of a window
    /// decides.
    pub fn record(&self, choice: Choice, elapsed: Duration) {
        let Some(k) = choice.probe else { return };
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        let sum = if choice.use_pool {
            &self.pool_ns
        } else {
            &self.serial_ns
        };
        sum.fetch_add(ns, Relaxed);
        if k == PROBES - 1 {
            let (pool, serial) = (
                self.pool_ns.swap(0, Relaxed),
                self.serial_ns.swap(0, Relaxed),
            );
            self.use_pool
                .store((serial as f64) > SERIAL_MARGIN * pool as f64, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(g: &Governor, serial_ms: u64, pool_ms: u64) -> Vec<bool> {
        (0..PERIOD)
            .map(|_| {
                let choice = g.choose();
                let ms = if choice.use_pool { pool_ms } else { serial_ms };
                g.record(choice, Duration::from_millis(ms));
                choice.use_pool
            })
            .collect()
    }

    #[test]
    fn picks_the_faster_way_after_probing_both() {
        let g = Governor::new();
        let first = window(&g, 2, 1);
        let probes = &first[..PROBES as usize];
        assert_eq!(probes.iter().filter(|&&p| p).count(), PROBES as usize / 2);
        assert!(first[PROBES as usize..].iter().all(|&p| p));
        // The pool slows down (a busy core): the next window probes and stops using it.
        let second = window(&g, 2, 5);
        assert!(second[PROBES as usize..].iter().all(|&p| !p));
        // And it comes back once the pool is faster again.
        let third = window(&g, 2, 1);
        assert!(third[PROBES as usize..].iter().all(|&p| p));
        // Serial 5% faster is within the margin: the pool stays.
        let fourth = window(&g, 95, 100);
        assert!(fourth[PROBES as usize..].iter().all(|&p| p));
    }
}
