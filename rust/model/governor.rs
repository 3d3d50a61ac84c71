//! Chooses, call by call, between running on the thread pool and on the calling thread.
//!
//! When another process keeps a core busy, a pool thread on that core now and then loses a
//! whole scheduler time slice, and every parallel loop waits for it. Most tokens still take
//! their usual time, but a few take several milliseconds, so decoding on all threads can
//! end up slower than on one. The governor measures instead of guessing. Each window of
//! calls starts with a few probes that alternate between the two ways. The rest of the
//! window runs one way, and every call's time is kept.
//!
//! Rare stalls hide from a few probes, so the pool is judged by all of its calls in the
//! previous window, stalls included, or by its probes where they are slower. It keeps
//! running unless the calling thread's probes are faster by a clear margin. Once the calling
//! thread runs the windows, the pool comes back only when its probes are faster by that
//! margin. The margin on both sides keeps noise on a quiet machine from giving up the second
//! thread, and keeps a busy machine from flipping back to the pool on a few lucky probes.
//!
//! A probe on a contended pool can stall for a whole time slice. So while the calling thread
//! keeps winning, each window is twice as long as the one before, up to the schedule's
//! `max_period`, which keeps the probes' cost to a few percent. The decision at the end of a
//! window's probes sets the length of that same window, except in the first window, which
//! stays short so that a pool that stalls is found out soon after a model is opened.
//!
//! Decode tokens and chunk memory updates have their own governors ([`DECODE`],
//! [`UPDATE`]). A memory update is a batch of M rows that splits across threads far better
//! than one token does, so the two can come out differently on the same machine.

use std::sync::Mutex;
use std::time::Duration;

/// A governor's probing plan: a first window of `first_period` calls, then windows of
/// `period` calls growing to `max_period` while the calling thread wins, each starting with
/// `probes` calls that alternate the two ways. The first window is short because its probes
/// are all there is to judge the pool by until it ends.
#[derive(Clone, Copy)]
pub(super) struct Schedule {
    first_period: u64,
    period: u64,
    max_period: u64,
    probes: u64,
    /// The calling thread takes over when its time is at most this share of the pool's.
    leave_pool: f64,
}

/// Decode tokens: a probe is one token, so a window has many.
pub(super) const DECODE: Schedule = Schedule {
    first_period: 64,
    period: 256,
    max_period: 4096,
    probes: 16,
    leave_pool: MARGIN,
};

/// Chunk memory updates: one every M tokens and milliseconds long, so a single probe each
/// way is a clear measurement. An update on the pool runs 1.5-2x faster on a quiet machine,
/// but a pool that has sat idle through serial decode tokens can be slow on its first
/// update. So the calling thread takes updates over only when clearly faster.
pub(super) const UPDATE: Schedule = Schedule {
    first_period: 4,
    period: 16,
    max_period: 256,
    probes: 2,
    leave_pool: 0.6,
};

/// The pool must take at most this share of the calling thread's time to take over, and for
/// decode tokens the other way round too.
const MARGIN: f64 = 0.9;

pub(super) struct Governor {
    schedule: Schedule,
    /// False puts every call on the pool, unmeasured.
    enabled: bool,
    window: Mutex<Window>,
}

/// Summed times of some calls.
#[derive(Clone, Copy, Default)]
struct Times {
    ns: u64,
    calls: u64,
}

impl Times {
    fn add(&mut self, ns: u64) {
        self.ns = self.ns.saturating_add(ns);
        self.calls += 1;
    }

    fn mean(self) -> f64 {
        self.ns as f64 / self.calls.max(1) as f64
    }
}

struct Window {
    /// Calls chosen so far in this window.
    calls: u64,
    /// Length of this window in calls.
    period: u64,
    /// The way of the calls after the probes.
    use_pool: bool,
    /// This window's probes, on the calling thread and on the pool.
    serial: Times,
    pool: Times,
    /// This window's calls after the probes.
    rest: Times,
    /// The previous window's way and the times of all its calls that ran on the pool, or
    /// None before the first window ends.
    previous: Option<(bool, Times)>,
}

/// The way one call runs, and whether its time is a probe.
#[derive(Clone, Copy)]
pub(super) struct Choice {
    pub use_pool: bool,
    probe: Option<u64>,
}

impl Governor {
    /// Makes a governor that chooses when `enabled`, and otherwise sends every call to the
    /// pool.
    pub fn new(schedule: Schedule, enabled: bool) -> Self {
        Governor {
            schedule,
            enabled,
            window: Mutex::new(Window {
                calls: 0,
                period: schedule.first_period,
                use_pool: true,
                serial: Times::default(),
                pool: Times::default(),
                rest: Times::default(),
                previous: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // The window has plain numbers, valid even if a holder panicked.
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn choose(&self) -> Choice {
        if !self.enabled {
            return Choice {
                use_pool: true,
                probe: None,
            };
        }
        let mut w = self.lock();
        if w.calls == w.period {
            // A new window: keep what the pool did in the one that ends.
            let mut pool = w.pool;
            if w.use_pool {
                pool.ns = pool.ns.saturating_add(w.rest.ns);
                pool.calls += w.rest.calls;
            }
            w.previous = Some((w.use_pool, pool));
            (w.calls, w.serial, w.pool, w.rest) =
                (0, Times::default(), Times::default(), Times::default());
        }
        let k = w.calls;
        w.calls += 1;
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

    /// Records the time of a call that ran the way `choice` chose. The last probe of a
    /// window decides the rest of it and sets its length.
    pub fn record(&self, choice: Choice, elapsed: Duration) {
        if !self.enabled {
            return;
        }
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        let mut w = self.lock();
        let Some(k) = choice.probe else {
            w.rest.add(ns);
            return;
        };
        if choice.use_pool {
            w.pool.add(ns);
        } else {
            w.serial.add(ns);
        }
        if k == self.schedule.probes - 1 {
            let serial = w.serial.mean();
            w.use_pool = match w.previous {
                // The pool ran the last window: judge it by all of that window's calls, or by
                // its probes if they are slower (the machine just got busier).
                Some((true, previous)) => {
                    serial > self.schedule.leave_pool * previous.mean().max(w.pool.mean())
                }
                // The calling thread ran it: the pool must win its probes by the margin.
                Some((false, _)) => w.pool.mean() < MARGIN * serial,
                None => serial > self.schedule.leave_pool * w.pool.mean(),
            };
            if w.previous.is_some() {
                w.period = if w.use_pool {
                    self.schedule.period
                } else {
                    (w.period * 2).min(self.schedule.max_period)
                };
            }
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

    const FIRST: u64 = DECODE.first_period;
    const PERIOD: u64 = DECODE.period;
    const MAX_PERIOD: u64 = DECODE.max_period;
    const PROBES: u64 = DECODE.probes;

    fn after_probes(ways: &[bool]) -> &[bool] {
        &ways[PROBES as usize..]
    }

    /// Runs one whole window, whose length is known once its probes are done.
    fn window(g: &Governor, serial_ms: u64, pool_ms: u64) -> Vec<bool> {
        let mut ways = run(g, g.schedule.probes, serial_ms, pool_ms);
        let rest = g.lock().period - g.schedule.probes;
        ways.extend(run(g, rest, serial_ms, pool_ms));
        ways
    }

    #[test]
    fn picks_the_faster_way_after_probing_both() {
        let g = Governor::new(DECODE, true);
        let first = window(&g, 2, 1);
        assert_eq!(first.len() as u64, FIRST);
        let probes = &first[..PROBES as usize];
        assert_eq!(probes.iter().filter(|&&p| p).count(), PROBES as usize / 2);
        assert!(after_probes(&first).iter().all(|&p| p));
        // The pool slows down (a busy core): the next window probes, stops using it and
        // grows to twice the length.
        let second = window(&g, 2, 5);
        assert!(after_probes(&second).iter().all(|&p| !p));
        assert_eq!(second.len() as u64, 2 * FIRST);
        // While the calling thread keeps winning, the windows keep doubling.
        let third = window(&g, 2, 5);
        assert!(after_probes(&third).iter().all(|&p| !p));
        assert_eq!(third.len() as u64, 4 * FIRST);
        // And the pool comes back, in windows of the usual length, once it is clearly faster.
        let fourth = window(&g, 2, 1);
        assert!(after_probes(&fourth).iter().all(|&p| p));
        assert_eq!(fourth.len() as u64, PERIOD);
        // Serial 5% faster is within the margin: the pool stays.
        let fifth = window(&g, 95, 100);
        assert!(after_probes(&fifth).iter().all(|&p| p));
    }

    #[test]
    fn windows_stop_growing_at_the_limit() {
        let g = Governor::new(DECODE, true);
        let mut total = 0;
        while g.lock().period < MAX_PERIOD {
            total += window(&g, 1, 5).len() as u64;
            assert!(
                total < 64 * MAX_PERIOD,
                "the window never reached its limit"
            );
        }
        assert_eq!(window(&g, 1, 5).len() as u64, MAX_PERIOD);
    }

    #[test]
    fn updates_leave_pool_only_when_clearly_slower() {
        let g = Governor::new(UPDATE, true);
        // One probe each way; the calling thread a third faster is not enough.
        assert_eq!(window(&g, 40, 60), [false, true, true, true]);
        // Twice as fast is.
        let second = window(&g, 30, 60);
        assert_eq!(&second[..4], [false, true, false, false]);
        assert_eq!(second.len() as u64, 2 * UPDATE.first_period);
    }

    /// Switched off, every call goes to the pool, however slow the pool is.
    #[test]
    fn switched_off_always_uses_the_pool() {
        let g = Governor::new(DECODE, false);
        assert!(run(&g, 3 * FIRST, 1, 50).iter().all(|&p| p));
    }

    /// A busy core: the pool's probes match the calling thread's, but one in ten of its
    /// other tokens stalls for a time slice. The governor leaves the pool after the first
    /// window and does not come back on probes that only tie.
    #[test]
    fn leaves_a_pool_that_stalls_between_probes() {
        let g = Governor::new(DECODE, true);
        let mut ways = Vec::new();
        for i in 0..20 * MAX_PERIOD {
            let choice = g.choose();
            let stall = choice.use_pool && choice.probe.is_none() && i % 10 == 0;
            let ms = if stall { 20 } else { 1 };
            g.record(choice, Duration::from_millis(ms));
            ways.push(choice.use_pool && choice.probe.is_none());
        }
        assert!(after_probes(&ways[..FIRST as usize]).iter().all(|&p| p));
        assert!(ways[FIRST as usize..].iter().all(|&p| !p));
    }
}
