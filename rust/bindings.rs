//! Python bindings: the only module that uses Python types. The Python package wraps
//! [`Engine`] in its `Model` class, which adds the tokenizer and text generation.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, TryLockError};

use numpy::PyArray1;
use pyo3::create_exception;
use pyo3::exceptions::{
    PyArithmeticError, PyFileNotFoundError, PyIsADirectoryError, PyMemoryError, PyOSError,
    PyOverflowError, PyPermissionError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::checkpoint::Format;
use crate::error::Error;
use crate::kernels::KernelPath;
use crate::memory_file::{self, SessionInfo};
use crate::model::{Options, State, Transformer, UpdateMode};
use crate::sampler::Sampler;

/// Tokens per engine call in `Engine.feed`, which runs Python's signal handlers between
/// calls, so that Ctrl-C waits for one piece instead of the whole feed. Each piece ends with
/// a run of the classifier and may split a chunk into two batches, which costs little next to
/// the products of 1,024 tokens.
const FEED_PIECE: usize = 1024;

create_exception!(
    _llama2rnn,
    CheckpointError,
    PyValueError,
    "A checkpoint file is invalid."
);
create_exception!(
    _llama2rnn,
    ContextFullError,
    PyRuntimeError,
    "A plain llama2.c model reached its seq_len."
);
create_exception!(
    _llama2rnn,
    MemoryFileError,
    PyValueError,
    "A saved memory is corrupt or belongs to another model."
);
create_exception!(
    _llama2rnn,
    NonFiniteLogitsError,
    PyArithmeticError,
    "The model produced NaN or infinite logits."
);

fn to_py(err: Error) -> PyErr {
    let message = err.to_string();
    match err {
        Error::Io { path, source } => {
            // (errno, strerror, filename), as Python's own OSErrors carry them; Rust appends
            // " (os error N)" to the system's text, which the errno already gives.
            let text = source.to_string();
            let strerror = text.split(" (os error").next().unwrap_or(&text).to_owned();
            let args = (
                source.raw_os_error().unwrap_or(0),
                strerror,
                path.display().to_string(),
            );
            match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(args),
                std::io::ErrorKind::IsADirectory => PyIsADirectoryError::new_err(args),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(args),
                _ => PyOSError::new_err(args),
            }
        }
        Error::OutOfMemory { .. } => PyMemoryError::new_err(message),
        Error::InvalidHeader { .. } | Error::InvalidLayout { .. } => {
            CheckpointError::new_err(message)
        }
        Error::ContextFull { .. } => ContextFullError::new_err(message),
        Error::NonFiniteLogits { .. } => NonFiniteLogitsError::new_err(message),
        Error::InvalidMemory(_) => MemoryFileError::new_err(message),
        Error::TokenOutOfRange { .. } | Error::InvalidSetting(_) => PyValueError::new_err(message),
    }
}

/// A loaded checkpoint with its running state and sampler.
#[pyclass(module = "llama2rnn._llama2rnn", frozen)]
pub struct Engine {
    model: Transformer,
    path: PathBuf,
    /// The running state: one call at a time (see [`Engine::session`]).
    session: Mutex<Session>,
}

struct Session {
    state: State,
    sampler: Sampler,
}

#[pymethods]
impl Engine {
    /// Maps the checkpoint at `path`. `mode` is "chunk" or "token"; `kernel` is "auto" or a
    /// name from `supported_kernels()`; `expected_format` rejects files of other formats.
    /// `governed=False` runs every decode token and memory update on the thread pool instead
    /// of letting the engine choose, for tests and measurements of the parallel paths.
    #[new]
    #[pyo3(signature = (
        path, *, threads=1, mode="chunk", kernel="auto", expected_format=None, governed=true
    ))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        threads: i64,
        mode: &str,
        kernel: &str,
        expected_format: Option<&str>,
        governed: bool,
    ) -> PyResult<Engine> {
        if !(1..=1024).contains(&threads) {
            return Err(PyValueError::new_err(format!(
                "threads {threads} is invalid: use a count between 1 and 1024"
            )));
        }
        let expected_format = match expected_format {
            None => None,
            Some(name) => Some(Format::from_name(name).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "unknown checkpoint format {name:?}: use llama2rnn, llama2c-v2, llama2c-v1 or llama2c-v0"
                ))
            })?),
        };
        let options = Options {
            mode: UpdateMode::from_name(mode).map_err(to_py)?,
            threads: threads as usize,
            kernel: KernelPath::from_name(kernel).map_err(to_py)?,
            expected_format,
            governed,
        };
        py.detach(|| {
            let model = Transformer::open(&path, &options)?;
            let state = model.new_state()?;
            let sampler = Sampler::new(model.config().vocab_size, 0.0, 1.0, 0)?;
            Ok(Engine {
                model,
                path,
                session: Mutex::new(Session { state, sampler }),
            })
        })
        .map_err(to_py)
    }

    /// Model shape and file facts as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.model.config();
        let d = PyDict::new(py);
        d.set_item("dim", c.dim)?;
        d.set_item("hidden_dim", c.hidden_dim)?;
        d.set_item("n_layers", c.n_layers)?;
        d.set_item("n_heads", c.n_heads)?;
        d.set_item("n_kv_heads", c.n_kv_heads)?;
        d.set_item("vocab_size", c.vocab_size)?;
        d.set_item("seq_len", c.seq_len)?;
        d.set_item("mem_len", c.mem_len)?;
        d.set_item("shared_classifier", c.shared_classifier)?;
        Ok(d)
    }

    #[getter]
    fn format(&self) -> &'static str {
        self.model.weights.format.name()
    }

    #[getter]
    fn group_size(&self) -> Option<usize> {
        self.model.weights.group_size
    }

    #[getter]
    fn file_size(&self) -> u64 {
        self.model.weights.file_len
    }

    #[getter]
    fn parameter_count(&self) -> u64 {
        self.model.config().parameter_count()
    }

    #[getter]
    fn kernel(&self) -> &'static str {
        self.model.kernel.name()
    }

    #[getter]
    fn threads(&self) -> usize {
        self.model.threads()
    }

    #[getter]
    fn mode(&self) -> &'static str {
        self.model.mode.name()
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Tokens consumed since load or the last reset.
    #[getter]
    fn position(&self) -> PyResult<u64> {
        Ok(self.session()?.state.position)
    }

    /// Feeds one token and returns a copy of the logits for the next one.
    fn forward<'py>(
        &self,
        py: Python<'py>,
        token: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let token = self.token_id(token)?;
        let mut session = self.session()?;
        let (model, state) = (&self.model, &mut session.state);
        py.detach(|| model.forward(state, token).map(|_| ()))
            .map_err(to_py)?;
        Ok(PyArray1::from_slice(py, session.state.logits()))
    }

    /// Returns a copy of the logits of the last token fed.
    fn logits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        Ok(PyArray1::from_slice(py, self.session()?.state.logits()))
    }

    /// Feeds tokens without returning logits, in batches of up to a chunk; the last one's
    /// logits are kept for `sample`. A plain model rejects tokens past seq_len before
    /// feeding any. Between pieces of [`FEED_PIECE`] tokens it runs Python's signal
    /// handlers, so Ctrl-C stops a long feed there, with the tokens before it consumed.
    fn feed(&self, py: Python<'_>, tokens: &Bound<'_, PyAny>) -> PyResult<()> {
        let tokens = self.token_ids(tokens)?;
        let mut session = self.session()?;
        let (model, state) = (&self.model, &mut session.state);
        model.check_room(state, tokens.len()).map_err(to_py)?;
        for piece in tokens.chunks(FEED_PIECE) {
            py.detach(|| model.feed(state, piece)).map_err(to_py)?;
            py.check_signals()?;
        }
        Ok(())
    }

    /// Feeds all tokens but the last, one at a time, and returns the negative log-likelihood
    /// (nats) of each token after the first given what came before it.
    fn score<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let tokens = self.token_ids(tokens)?;
        let mut session = self.session()?;
        let (model, state) = (&self.model, &mut session.state);
        let losses = py.detach(|| model.score(state, &tokens)).map_err(to_py)?;
        Ok(PyArray1::from_vec(py, losses))
    }

    /// Samples the next token from the logits of the last token fed.
    fn sample(&self) -> PyResult<u32> {
        let mut session = self.session()?;
        let Session { state, sampler } = &mut *session;
        if state.position == 0 {
            return Err(PyValueError::new_err(
                "no token has been fed yet: feed a prompt first",
            ));
        }
        sampler.sample(state.logits()).map_err(to_py)
    }

    /// Sets the sampling settings; `seed` (when given) restarts the random generator.
    #[pyo3(signature = (temperature, top_p, seed=None))]
    fn set_sampling(&self, temperature: f32, top_p: f32, seed: Option<u64>) -> PyResult<()> {
        let sampler = &mut self.session()?.sampler;
        sampler.configure(temperature, top_p).map_err(to_py)?;
        if let Some(seed) = seed {
            sampler.reseed(seed);
        }
        Ok(())
    }

    /// The sampler's random generator state, to save with a session.
    #[getter]
    fn rng_state(&self) -> PyResult<u64> {
        Ok(self.session()?.sampler.rng_state())
    }

    #[setter]
    fn set_rng_state(&self, state: u64) -> PyResult<()> {
        self.session()?.sampler.set_rng_state(state);
        Ok(())
    }

    /// Fingerprint of the checkpoint's weights, as stored in memory files.
    #[getter]
    fn fingerprint(&self) -> u64 {
        self.model.weights.fingerprint
    }

    /// Serializes the whole recurrent state and the sampler state as memory-file bytes.
    #[pyo3(signature = (last_token=None, saved_unix_ms=0))]
    fn save_state<'py>(
        &self,
        py: Python<'py>,
        last_token: Option<u32>,
        saved_unix_ms: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut session = self.session()?;
        let info = SessionInfo {
            rng_state: session.sampler.rng_state(),
            last_token,
            saved_unix_ms,
        };
        let (model, state) = (&self.model, &mut session.state);
        let bytes = py.detach(|| memory_file::encode(model, state, &info));
        Ok(PyBytes::new(py, &bytes))
    }

    /// Restores a state saved by `save_state` and returns its last token (or None). Raises
    /// MemoryFileError, leaving the current state as it was, for a corrupt file or one made
    /// by another model.
    fn load_state(&self, py: Python<'_>, data: &[u8]) -> PyResult<Option<u32>> {
        let mut session = self.session()?;
        let Session { state, sampler } = &mut *session;
        let model = &self.model;
        let info = py
            .detach(|| memory_file::decode(model, state, data))
            .map_err(to_py)?;
        sampler.set_rng_state(info.rng_state);
        Ok(info.last_token)
    }

    /// Returns to position 0 with the model's initial memory.
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        let mut session = self.session()?;
        let (model, state) = (&self.model, &mut session.state);
        py.detach(|| model.reset(state));
        Ok(())
    }
}

impl Engine {
    /// Takes the running state for one call. A call from a second thread while another runs
    /// (with the GIL released) raises at once: waiting here while holding the GIL would
    /// deadlock with the running call, which needs the GIL back to return.
    fn session(&self) -> PyResult<MutexGuard<'_, Session>> {
        match self.session.try_lock() {
            Ok(session) => Ok(session),
            // A panic in an earlier call reached Python as an exception. The state stays as
            // that call left it, as after any failed call.
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => Err(PyRuntimeError::new_err(
                "this model is running a call on another thread, and it takes one call at a \
                 time: use one Model per thread, or hold a lock around its calls",
            )),
        }
    }

    fn check_token(&self, token: i64) -> PyResult<u32> {
        let vocab_size = self.model.config().vocab_size;
        if token < 0 || token as u64 >= vocab_size as u64 {
            return Err(to_py(Error::TokenOutOfRange { token, vocab_size }));
        }
        Ok(token as u32)
    }

    /// Converts a Python integer to a token id of this model. Integers beyond 64 bits get the
    /// same out-of-range error as the others, not an overflow.
    fn token_id(&self, token: &Bound<'_, PyAny>) -> PyResult<u32> {
        match token.extract::<i64>() {
            Ok(id) => self.check_token(id),
            Err(e) if e.is_instance_of::<PyOverflowError>(token.py()) => {
                Err(PyValueError::new_err(format!(
                    "token id {token} is out of range: the model's vocab_size is {}",
                    self.model.config().vocab_size
                )))
            }
            Err(e) => Err(e),
        }
    }

    /// Converts an iterable of Python integers to token ids, checking each.
    fn token_ids(&self, tokens: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
        tokens
            .try_iter()?
            .map(|token| self.token_id(&token?))
            .collect()
    }
}

/// Parses the header of memory-file bytes into a dict, after checking the checksum.
#[pyfunction]
fn read_memory_header<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let h = memory_file::read_header(data).map_err(to_py)?;
    let names = [
        "dim",
        "hidden_dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "seq_len",
        "mem_len",
    ];
    let config = PyDict::new(py);
    for (name, value) in names.iter().zip(h.config) {
        config.set_item(*name, value)?;
    }
    let d = PyDict::new(py);
    d.set_item("version", h.version)?;
    d.set_item("config", config)?;
    d.set_item("format", h.format.name())?;
    d.set_item("mode", h.mode.name())?;
    d.set_item("fingerprint", h.fingerprint)?;
    d.set_item("position", h.position)?;
    d.set_item("chunk_rows", h.stored_rows)?;
    d.set_item("last_token", h.info.last_token)?;
    d.set_item("saved_unix_ms", h.info.saved_unix_ms)?;
    Ok(d)
}

/// Names of the kernel paths this CPU supports, portable first.
#[pyfunction]
fn supported_kernels() -> Vec<&'static str> {
    KernelPath::supported()
        .into_iter()
        .map(KernelPath::name)
        .collect()
}

/// Returns the kernel path picked when none is forced.
#[pyfunction]
fn detected_kernel() -> &'static str {
    KernelPath::detect().name()
}

#[pymodule]
fn _llama2rnn(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_function(wrap_pyfunction!(supported_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(detected_kernel, m)?)?;
    m.add("CheckpointError", m.py().get_type::<CheckpointError>())?;
    m.add("ContextFullError", m.py().get_type::<ContextFullError>())?;
    m.add_function(wrap_pyfunction!(read_memory_header, m)?)?;
    m.add("MemoryFileError", m.py().get_type::<MemoryFileError>())?;
    m.add(
        "NonFiniteLogitsError",
        m.py().get_type::<NonFiniteLogitsError>(),
    )?;
    Ok(())
}
