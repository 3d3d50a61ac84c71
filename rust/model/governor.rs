//! Chooses, token by token, between decoding on the thread pool and on the calling thread.
//!
//! When another process keeps a core busy, a pool thread on that core stalls every parallel
//! loop until the scheduler runs it again, and decoding on all threads can become slower than
//! decoding on one. The governor measures instead of guessing: each window of tokens starts
//! with a few probe tokens that alternate between the two ways, and the faster one (by their
//! summed time) runs the rest of the window. The pool keeps the window unless the calling
//! thread is faster by a clear margin, so that noise on a quiet machine does not give up the
//! second thread.
//!
//! A probe on a contended pool can stall for a whole scheduler time slice. So while the
//! calling thread keeps winning, each window is twice as long as the one before, up to the
//! schedule's `max_period`. That keeps the probes' cost to a few percent. The decision at
//! the end of a window's probes sets the length of that same window.
//!
//! Decode tokens and chunk memory updates have their own governors ([`DECODE`],
//! [`UPDATE`]): a memory update is a batch of M rows that splits across threads far better
//! than one token does, so the two can come out differently on the same machine.

use std::sync::Mutex;
use std::time::Duration;

/// How a governor probes: windows of `period` calls growing to `max_period` while the
/// calling thread wins, each starting with `probes` calls that alternate the two ways.
#[derive(Clone, Copy)]
pub(super) struct Schedule {
    period: u64,
    max_period: u64,
    probes: u64,
}

/// Decode tokens: a probe is one token, so a window has many.
pub(super) const DECODE: Schedule = Schedule {
    period: 256,
    max_period: 4096,
    probes: 16,
};

/// Chunk memory updates: one every M tokens and milliseconds long, so a single probe each
/// way is a clear measurement.
pub(super) const UPDATE: Schedule = Schedule {
    period: 16,
    max_period: 256,
    probes: 2,
};

/// The calling thread must take at most this share of the pool's time to be picked.
const SERIAL_MARGIN: f64 = 0.9;

pub(super) struct Governor {
    schedule: Schedule,
    window: Mutex<Window>,
}

struct Window {
    /// Tokens chosen so far in this window.
    calls: u64,
    /// Length of this window in tokens.
    period: u64,
    serial_ns: u64,
    pool_ns: u64,
    use_pool: bool,
}

/// The way one token runs, and whether its time is a probe.
#[derive(Clone, Copy)]
pub(super) struct Choice {
    pub use_pool: bool,
    probe: Option<u64>,
}

impl Governor {
    pub fn new(schedule: Schedule) -> Self {
        Governor {
            schedule,
            window: Mutex::new(Window {
                calls: 0,
                period: schedule.period,
                serial_ns: 0,
                pool_ns: 0,
                use_pool: true,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // The window has plain numbers, valid even if a holder panicked.
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn choose(&self) -> Choice {
        let mut w = self.lock();
        let k = w.calls;
        w.calls += 1;
        if w.calls >= w.period {
            w.calls = 0;
        }
        if k < self.schedule.probes {
            return Choice {
                use_pool: k % 2 == 1,
                probe: Some(k),
            };
        }
        Choice {
            use_pool: w.use_pool,
            probe: None,
        }
    }

    /// Records the time of a token that ran the way `choice` chose. The last probe of a window
    /// decides the rest of it and sets its length.
    pub fn record(&self, choice: Choice, elapsed: Duration) {
        let Some(k) = choice.probe else { return };
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        let mut w = self.lock();
        if choice.use_pool {
            w.pool_ns = w.pool_ns.saturating_add(ns);
        } else {
            w.serial_ns = w.serial_ns.saturating_add(ns);
        }
        if k == self.schedule.probes - 1 {
            w.use_pool = (w.serial_ns as f64) > SERIAL_MARGIN * w.pool_ns as f64;
            w.period = if w.use_pool {
                self.schedule.period
            } else {
                (w.period * 2).min(self.schedule.max_period)
            };
            w.serial_ns = 0;
            w.pool_ns = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `tokens` tokens with the given times per token; returns the way each one ran.
    fn run(g: &Governor, tokens: u64, serial_ms: u64, pool_ms: u64) -> Vec<bool> {
        (0..tokens)
            .map(|_| {
                let choice = g.choose();
                let ms = if choice.use_pool { pool_ms } else { serial_ms };
                g.record(choice, Duration::from_millis(ms));
                choice.use_pool
            })
            .collect()
    }

    const PERIOD: u64 = DECODE.period;
    const MAX_PERIOD: u64 = DECODE.max_period;
    const PROBES: u64 = DECODE.probes;

    fn after_probes(ways: &[bool]) -> &[bool] {
        &ways[PROBES as usize..]
    }

    #[test]
    fn picks_the_faster_way_after_probing_both() {
        let g = Governor::new(DECODE);
        let first = run(&g, PERIOD, 2, 1);
        let probes = &first[..PROBES as usize];
        assert_eq!(probes.iter().filter(|&&p| p).count(), PROBES as usize / 2);
        assert!(after_probes(&first).iter().all(|&p| p));
        // The pool slows down (a busy core): the next window probes, stops using it and
        // grows to twice the length.
        let second = run(&g, 2 * PERIOD, 2, 5);
        assert!(after_probes(&second).iter().all(|&p| !p));
        // While the calling thread keeps winning, the windows keep doubling.
        let third = run(&g, 4 * PERIOD, 2, 5);
        assert!(after_probes(&third).iter().all(|&p| !p));
        // And the pool comes back, in windows of the first length, once it is faster again.
        let fourth = run(&g, PERIOD, 2, 1);
        assert!(after_probes(&fourth).iter().all(|&p| p));
        // Serial 5% faster is within the margin: the pool stays.
        let fifth = run(&g, PERIOD, 95, 100);
        assert!(after_probes(&fifth).iter().all(|&p| p));
    }

    #[test]
    fn windows_stop_growing_at_the_limit() {
        let g = Governor::new(DECODE);
        let mut total = 0;
        while g.lock().period < MAX_PERIOD {
            let period = g.lock().period;
            run(&g, period, 1, 5);
            total += period;
            assert!(
                total < 64 * MAX_PERIOD,
                "the window never reached its limit"
            );
        }
        run(&g, MAX_PERIOD, 1, 5);
        assert_eq!(g.lock().period, MAX_PERIOD);
    }

    #[test]
    fn update_schedule_decides_after_one_probe_each_way() {
        let g = Governor::new(UPDATE);
        let ways = run(&g, UPDATE.period, 40, 60);
        assert_eq!(&ways[..2], &[false, true]);
        assert!(ways[2..].iter().all(|&p| !p));
        assert_eq!(g.lock().period, 2 * UPDATE.period);
    }
}
