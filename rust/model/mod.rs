//! The transformer: weights, kernel path and threads, and the forward pass over a [`State`].

mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_x86;
mod ffn;
mod fork;
mod forward;
mod governor;
mod matmul;
mod memory;
pub mod ops;
mod prefill;
mod rows;
pub mod state;

use std::cell::Cell;
use std::path::Path;
use std::sync::OnceLock;

use crate::checkpoint::Format;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::KernelPath;
use crate::weights::Weights;
use governor::Governor;
use ops::RopeTable;
pub use state::State;

/// When the memory keys/values are recomputed from the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateMode {
    /// After every M tokens, for all M slots at once: how the models are trained (default).
    Chunk,
    /// After every token, for the slot that token just wrote (experimental).
    Token,
}

impl UpdateMode {
    pub fn name(self) -> &'static str {
        match self {
            UpdateMode::Chunk => "chunk",
            UpdateMode::Token => "token",
        }
    }

    pub fn from_name(name: &str) -> Result<UpdateMode> {
        match name {
            "chunk" => Ok(UpdateMode::Chunk),
            "token" => Ok(UpdateMode::Token),
            _ => Err(Error::InvalidSetting(format!(
                "unknown memory update mode {name:?}: use \"chunk\" or \"token\""
            ))),
        }
    }
}

/// Settings chosen when a model is loaded.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: UpdateMode,
    /// Worker threads; 1 runs everything on the calling thread.
    pub threads: usize,
    pub kernel: KernelPath,
    /// Reject a checkpoint of any other format.
    pub expected_format: Option<Format>,
    /// Whether the governors choose between the pool and the calling thread call by call
    /// (the default). Off, every decode token and memory update runs on the pool, so that tests
    /// and measurements can pin the parallel paths.
    pub governed: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: UpdateMode::Chunk,
            threads: 1,
            kernel: KernelPath::detect(),
            expected_format: None,
            governed: true,
        }
    }
}

/// A loaded model. It is immutable and can serve several [`State`]s.
pub struct Transformer {
    pub weights: Weights,
    pub mode: UpdateMode,
    pub kernel: KernelPath,
    threads: usize,
    pool: Option<rayon::ThreadPool>,
    /// The process that started the pool. A child made by fork() has none of its threads,
    /// so there the model runs on the calling thread.
    pool_pid: u32,
    /// Chooses the pool or the calling thread for decode tokens, and for chunk updates.
    governor: Governor,
    update_governor: Governor,
    /// The memory rows' keys and values made from the initial memory, per layer (n_layers, 2,
    /// M, kv_dim): computed by the first state that needs them, copied by the others.
    initial_window: OnceLock<Vec<f32>>,
    rope: RopeTable,
}

impl Transformer {
    pub fn open(path: &Path, options: &Options) -> Result<Transformer> {
        let mut weights = Weights::open(path, options.expected_format)?;
        if options.mode == UpdateMode::Token && !weights.config.is_memory_model() {
            return Err(Error::InvalidSetting(
                "token update mode needs a Llama2RNN memory model; this is a plain llama2.c model"
                    .into(),
            ));
        }
        let threads = options.threads.max(1);
        let pool = if threads > 1 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("llama2rnn-{i}"))
                .build()
                .map_err(|e| {
                    Error::InvalidSetting(format!("cannot start {threads} threads: {e}"))
                })?;
            Some(pool)
        } else {
            None
        };
        match &pool {
            Some(pool) => pool.install(|| weights.pack(options.kernel))?,
            None => weights.pack(options.kernel)?,
        }
        let c = weights.config;
        Ok(Transformer {
            rope: RopeTable::new(c.head_size(), c.cache_rows()),
            weights,
            mode: options.mode,
            kernel: options.kernel,
            threads,
            pool,
            pool_pid: std::process::id(),
            governor: Governor::new(governor::DECODE, options.governed),
            update_governor: Governor::new(governor::UPDATE, options.governed),
            initial_window: OnceLock::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.weights.config
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Creates a fresh state at position 0 with the initial memory (see [`Self::reset`]).
    pub fn new_state(&self) -> Result<State> {
        let mut state = State::new(self.config(), self.weights.group_size.unwrap_or(1))?;
        self.reset(&mut state);
        Ok(state)
    }

    /// Returns `state` to the start: position 0 and, for memory models, the initial memory.
    /// Its memory keys and values are made on first use (see [`Self::ready_window`]), so that
    /// opening a model and resetting cost no memory update.
    pub fn reset(&self, state: &mut State) {
        state.position = 0;
        state.scratch.logits.fill(0.0);
        let c = *self.config();
        if !c.is_memory_model() {
            return;
        }
        for (l, layer) in self.weights.layers.iter().enumerate() {
            let memory = layer
                .memory
                .as_ref()
                .expect("memory models have memory weights");
            let span = l * c.mem_len * c.dim..(l + 1) * c.mem_len * c.dim;
            state.mem[span].copy_from_slice(memory.ori_mem);
        }
        state.window_pending = true;
    }

    /// Runs `f` on the thread pool, so that the parallel loops inside it need no hand-off
    /// per matrix.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.run_on(true, f)
    }

    /// Runs `f` on the thread pool when `use_pool` is set and the pool's threads run in this
    /// process, else on the calling thread, where every loop runs serially (see
    /// [`Self::parallel`]).
    fn run_on<R: Send>(&self, use_pool: bool, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) if use_pool && std::process::id() == self.pool_pid => pool.install(f),
            _ => f(),
        }
    }

    /// Runs `a` and `b`, in parallel where loops may split: products of one input share one
    /// fork instead of one each, which at dim 288 costs about as much as a product.
    fn both<A: Send, B: Send>(
        &self,
        a: impl FnOnce() -> A + Send,
        b: impl FnOnce() -> B + Send,
    ) -> (A, B) {
        if self.parallel() {
            fork::join(a, b)
        } else {
            (a(), b())
        }
    }

    /// Runs `f(i, chunk)` for every chunk `i` of `size` elements of `data`: forked with
    /// [`fork::join`] where loops may split, else in order on this thread.
    fn for_each_chunk<T: Send>(
        &self,
        data: &mut [T],
        size: usize,
        f: &(impl Fn(usize, &mut [T]) + Sync),
    ) {
        if self.parallel() {
            fork::for_each_chunk(data, size, f);
        } else {
            data.chunks_mut(size.max(1))
                .enumerate()
                .for_each(|(i, chunk)| f(i, chunk));
        }
    }

    /// As [`Self::for_each_chunk`] for chunks of two slices taken side by side.
    fn for_each_chunk_pair<A: Send, B: Send>(
        &self,
        a: (&mut [A], usize),
        b: (&mut [B], usize),
        f: &(impl Fn(usize, &mut [A], &mut [B]) + Sync),
    ) {
        let ((a, a_size), (b, b_size)) = (a, b);
        if self.parallel() {
            fork::for_each_chunk_pair(a, a_size, b, b_size, f);
        } else {
            a.chunks_mut(a_size.max(1))
                .zip(b.chunks_mut(b_size.max(1)))
                .enumerate()
                .for_each(|(i, (a, b))| f(i, a, b));
        }
    }

    /// Returns whether loops may split across threads, which is only on a thread of this
    /// model's pool and outside [`Self::serially`]. Work the governor keeps on the calling
    /// thread then never reaches another pool, even when the caller is itself a thread of
    /// some other rayon pool.
    fn parallel(&self) -> bool {
        !SERIAL.get()
            && self
                .pool
                .as_ref()
                .is_some_and(|pool| pool.current_thread_index().is_some())
    }

    /// Runs `f` with every loop inside it on the current thread, for work that is already one
    /// of several parallel tasks.
    fn serially<R>(&self, f: impl FnOnce() -> R) -> R {
        /// Restores the flag also when `f` panics, so the thread does not stay serial.
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                SERIAL.set(self.0);
            }
        }
        let _restore = Restore(SERIAL.replace(true));
        f()
    }
}

thread_local! {
    /// Set while the current thread runs a task of a parallel loop (see
    /// [`Transformer::serially`]).
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}
