//! `pdgc._pdgc`: the native part of the `pdgc` Python package. It owns the Python classes
//! (`Module`, `Session`, `Optimizer`, `Generator` and the result records), the `compile`
//! function, the privacy functions that `pdgc.privacy` wraps, and the exceptions; the work
//! itself is the `pdgc` crate's. Arrays come in and go out through [`arrays`].

mod arrays;
mod errors;

use std::path::{Path, PathBuf};

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use pdgc::dp::{stream, Purpose};
use pdgc::graph::Op;
use pdgc::ops::Strategy;
use pdgc::plan::{DeviceProfile, Goal};
use pdgc::{CompileOptions, Device, DpSettings, OptimizerState};

use crate::arrays::{to_dict, vec_to_numpy, Arrays};
use crate::errors::{to_py, LayoutError};

fn setting(name: &'static str, value: &str, reason: String) -> PyErr {
    to_py(pdgc::Error::InvalidSetting { name, value: value.to_string(), reason })
}

fn parse_device(name: &str) -> PyResult<Device> {
    Ok(match name {
        "auto" => Device::Auto,
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda,
        "interpreter" => Device::Interpreter,
        "cuda-host" => Device::CudaHost,
        _ => return Err(setting("device", name, "one of auto, cpu, cuda, interpreter, cuda-host".into())),
    })
}

fn parse_goal(name: &str) -> PyResult<Goal> {
    Ok(match name {
        "clipped_sum" | "clipped-sum" => Goal::ClippedSum,
        "grads" => Goal::Grads,
        "norms" => Goal::Norms,
        _ => return Err(setting("goal", name, "one of clipped_sum, grads, norms".into())),
    })
}

fn goal_name(goal: Goal) -> &'static str {
    match goal {
        Goal::ClippedSum => "clipped_sum",
        Goal::Grads => "grads",
        Goal::Norms => "norms",
    }
}

/// Compiles a `.pdg` model (a path or the source text) or loads a compiled `.pdgm` module.
///
/// Args:
///     path_or_source: a path (`str` or `os.PathLike`) to a `.pdg` or `.pdgm` file, or the
///         `.pdg` source itself (a `str` containing `{`).
///     batch: the largest batch a session accepts (and the batch it is planned for);
///         default 32. A `.pdgm` module keeps the batch it was compiled for.
///     goal: the work the caller mostly does (`"clipped_sum"`, `"grads"` or `"norms"`). All
///         three are compiled; this is the plan that `Module.plan()` shows by default.
///     device: where sessions run by default: `"auto"` (CUDA if usable, else the CPU),
///         `"cpu"`, `"cuda"`, `"interpreter"` (slow, exact) or `"cuda-host"` (testing).
///     profile: the device profile the plan is made for (`"cpu2"`, `"h100"`, `"h200"`);
///         default `"h200"` for `device="cuda"`, else `"cpu2"`.
///     memory_budget: the plan's memory budget in bytes (default: the profile's memory).
///     strategy: per-layer strategy overrides, e.g. `{"conv1": "unfold"}`.
///
/// Raises:
///     SourceError: the source has errors (the message holds the diagnostics).
///     FileError: the file cannot be read, or a `.pdgm` file is damaged or stale.
///     SettingError: an invalid batch, goal, device, profile or strategy.
#[pyfunction]
#[pyo3(signature = (path_or_source, *, batch=None, goal="clipped_sum", device="auto", profile=None, memory_budget=None, strategy=None))]
#[allow(clippy::too_many_arguments)]
fn compile(
    path_or_source: &Bound<'_, PyAny>,
    batch: Option<usize>,
    goal: &str,
    device: &str,
    profile: Option<&str>,
    memory_budget: Option<u64>,
    strategy: Option<std::collections::BTreeMap<String, String>>,
) -> PyResult<Module> {
    let goal = parse_goal(goal)?;
    let device = parse_device(device)?;
    let text: Option<String> = path_or_source.extract::<String>().ok().filter(|s| s.contains('{'));
    let (name, source) = match text {
        Some(src) => ("<source>".to_string(), src),
        None => {
            let path: PathBuf = path_or_source.extract()?;
            if path.extension().is_some_and(|e| e == "pdgm") {
                let inner = pdgc::Module::load(&path).map_err(to_py)?;
                if let Some(b) = batch.filter(|&b| b != inner.options.batch) {
                    return Err(setting(
                        "batch",
                        &b.to_string(),
                        format!(
                            "{} was compiled for batch {}: recompile the source",
                            path.display(),
                            inner.options.batch
                        ),
                    ));
                }
                return Ok(Module { inner, goal, device });
            }
            let src = std::fs::read_to_string(&path)
                .map_err(|source| to_py(pdgc::Error::Read { path: path.clone(), source }))?;
            (path.display().to_string(), src)
        }
    };
    let profile_name = profile.unwrap_or(if device == Device::Cuda { "h200" } else { "cpu2" });
    let profile = DeviceProfile::builtin(profile_name)
        .ok_or_else(|| setting("profile", profile_name, "one of cpu2, h100, h200".into()))?;
    let mut overrides = Vec::new();
    for (layer, s) in strategy.unwrap_or_default() {
        let st = Strategy::from_name(&s).ok_or_else(|| {
            let names: Vec<&str> = Strategy::ALL.iter().map(|s| s.name()).collect();
            setting("strategy", &s, format!("unknown strategy for `{layer}` (one of {})", names.join(", ")))
        })?;
        overrides.push((layer, st));
    }
    let options = CompileOptions {
        batch: batch.unwrap_or(32),
        device: profile,
        memory_budget,
        overrides,
        chunk_bytes: pdgc::lower::CHUNK_BYTES,
        private_bytes: pdgc::lower::PRIVATE_COLUMN_BYTES,
    };
    let inner = pdgc::Module::from_source(&name, &source, &options).map_err(to_py)?;
    Ok(Module { inner, goal, device })
}

/// A compiled model: every kernel of its three goals, verified. Make one with
/// `pdgc.compile`; run it through `Module.session()`.
#[pyclass(module = "pdgc", frozen)]
struct Module {
    inner: pdgc::Module,
    goal: Goal,
    device: Device,
}

#[pymethods]
impl Module {
    /// A session: the program loaded on a device with buffers for `max_batch` examples.
    ///
    /// Args:
    ///     device: `"auto"`, `"cpu"`, `"cuda"`, `"interpreter"` or `"cuda-host"`; default:
    ///         the module's (see `pdgc.compile`).
    ///     threads: CPU worker threads (default: all cores).
    ///     seed: seeds the session's noise generator for `dp_sgd_step` (default: fresh
    ///         operating-system entropy, which is what a private run wants).
    ///
    /// Raises:
    ///     DeviceError: `device="cuda"` without a usable GPU, or a backend failure.
    #[pyo3(signature = (device=None, *, threads=None, seed=None))]
    fn session(&self, device: Option<&str>, threads: Option<usize>, seed: Option<u64>) -> PyResult<Session> {
        let device = device.map(parse_device).transpose()?.unwrap_or(self.device);
        let mut inner = self.inner.session(device).map_err(to_py)?;
        let threads = match threads {
            Some(0) => return Err(setting("threads", "0", "must be at least 1".into())),
            Some(t) => t,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        inner.set_threads(threads);
        Ok(Session {
            inner,
            graph: std::sync::Arc::clone(&self.inner.graph),
            threads,
            noise: Generator::from_seed(seed),
        })
    }

    /// The model's name (`model NAME { ... }`).
    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }

    /// The largest batch a session of this module accepts.
    #[getter]
    fn max_batch(&self) -> usize {
        self.inner.options.batch
    }

    /// The parameters' names (PyTorch `state_dict` names) and shapes, in order.
    #[getter]
    fn params<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for p in &self.inner.graph.params {
            d.set_item(&p.name, PyTuple::new(py, &p.shape)?)?;
        }
        Ok(d)
    }

    /// The model inputs' names and per-example shapes (a batch adds a leading `B`).
    #[getter]
    fn inputs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for node in self.inner.graph.inputs() {
            if let Op::Input { name } = &node.op {
                d.set_item(name, PyTuple::new(py, &node.shape)?)?;
            }
        }
        Ok(d)
    }

    /// The label's name: the batch holds it as int64/int32 class indices `[B]` or a float32
    /// target `[B, ...]`.
    #[getter]
    fn label(&self) -> &str {
        self.inner.graph.label.name()
    }

    /// PyTorch-default initial parameters (kaiming-uniform weights and biases, norm weights 1
    /// and biases 0), drawn from a ChaCha20 stream seeded by `seed`.
    #[pyo3(signature = (seed=0))]
    fn init_params<'py>(&self, py: Python<'py>, seed: u64) -> PyResult<Bound<'py, PyDict>> {
        to_dict(py, self.inner.init_params(seed).tensors)
    }

    /// The plan (one strategy per layer, with costs) for `goal`, default the module's goal,
    /// as `pdgc explain` prints it.
    #[pyo3(signature = (goal=None))]
    fn plan(&self, goal: Option<&str>) -> PyResult<String> {
        let goal = goal.map(parse_goal).transpose()?.unwrap_or(self.goal);
        Ok(self.inner.plan(goal).to_string())
    }

    /// The goal given to `pdgc.compile`.
    #[getter]
    fn goal(&self) -> &'static str {
        goal_name(self.goal)
    }

    /// Writes the module as a `.pdgm` file (as `pdgc compile -o` does).
    fn save(&self, path: PathBuf) -> PyResult<()> {
        self.inner.save(Path::new(&path), Default::default()).map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!(
            "<pdgc.Module {} max_batch={} params={} planned for {}>",
            self.inner.name,
            self.inner.options.batch,
            self.inner.graph.params.len(),
            self.inner.options.device.name
        )
    }
}

/// A seeded random stream (ChaCha20) for DP-SGD noise. The same seed gives the same noise.
#[pyclass(module = "pdgc")]
struct Generator {
    rng: ChaCha20Rng,
}

impl Generator {
    fn from_seed(seed: Option<u64>) -> ChaCha20Rng {
        match seed {
            Some(s) => stream(s, Purpose::Noise, 0, 0),
            None => ChaCha20Rng::from_rng(&mut rand::rng()),
        }
    }
}

#[pymethods]
impl Generator {
    /// A generator from `seed`, or from fresh operating-system entropy when `seed` is None.
    /// A seeded generator draws the stream `pdgc train --seed SEED` uses for its first step.
    #[new]
    #[pyo3(signature = (seed=None))]
    fn new(seed: Option<u64>) -> Generator {
        Generator { rng: Generator::from_seed(seed) }
    }
}

/// An optimizer with PyTorch's semantics and its running state (step count, momentum or
/// Adam buffers), updated by each `Session.dp_sgd_step`. Make one with `Optimizer.sgd` or
/// `Optimizer.adam`; use one optimizer per set of parameters.
#[pyclass(module = "pdgc")]
struct Optimizer {
    kind: pdgc::Optimizer,
    state: OptimizerState,
}

#[pymethods]
impl Optimizer {
    /// `torch.optim.SGD(lr=lr, momentum=momentum)` (no dampening, Nesterov or weight decay).
    #[staticmethod]
    #[pyo3(signature = (lr, momentum=0.0))]
    fn sgd(lr: f32, momentum: f32) -> PyResult<Optimizer> {
        let kind = pdgc::Optimizer::Sgd { lr, momentum };
        kind.validate().map_err(to_py)?;
        Ok(Optimizer { kind, state: OptimizerState::default() })
    }

    /// `torch.optim.Adam(lr=lr, betas=(beta1, beta2), eps=eps)` (no weight decay, no amsgrad).
    #[staticmethod]
    #[pyo3(signature = (lr, beta1=0.9, beta2=0.999, eps=1e-8))]
    fn adam(lr: f32, beta1: f32, beta2: f32, eps: f32) -> PyResult<Optimizer> {
        let kind = pdgc::Optimizer::Adam { lr, beta1, beta2, eps };
        kind.validate().map_err(to_py)?;
        Ok(Optimizer { kind, state: OptimizerState::default() })
    }

    /// The number of steps taken.
    #[getter]
    fn steps(&self) -> u64 {
        self.state.step
    }

    /// The optimizer's buffers (`momentum_buffer.NAME`, or `exp_avg.NAME` and
    /// `exp_avg_sq.NAME`), copied.
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        to_dict(py, self.state.buffers.clone())
    }

    fn __repr__(&self) -> String {
        format!("<pdgc.Optimizer {:?}, {} steps>", self.kind, self.state.step)
    }
}

/// What `Session.clipped_grad_sum` returns: `sum` (parameter name → `Σ_n min(1,
/// C/(‖g_n‖+1e-6)) g_n`), `norms` (`‖g_n‖`, `[B]`) and `loss` (per-example losses, `[B]`).
#[pyclass(module = "pdgc", frozen, get_all)]
struct ClippedSum {
    sum: Py<PyDict>,
    norms: Py<PyArray1<f32>>,
    loss: Py<PyArray1<f32>>,
}

/// What `Session.dp_sgd_step` returns: the logical batch's size, each example's loss and
/// gradient norm before the update, and the fraction of examples that were clipped.
#[pyclass(module = "pdgc", frozen, get_all)]
struct StepReport {
    batch_size: usize,
    losses: Py<PyArray1<f32>>,
    norms: Py<PyArray1<f32>>,
    clipped_fraction: f32,
}

/// A module loaded on a device. Every method takes `params` (a `dict[str, array]` with
/// every parameter by name) and `batch` (a `dict[str, array]` with each model input `[B,
/// ...]` float32 and the label: int64 or int32 classes `[B]`, or a float32 target), checks
/// them as `pdgc grads` checks its files, and returns NumPy arrays. An empty batch (`B = 0`)
/// gives empty per-example results and zero sums. A session is used from the thread that
/// made it.
#[pyclass(module = "pdgc", unsendable)]
struct Session {
    inner: pdgc::Session,
    graph: std::sync::Arc<pdgc::Graph>,
    threads: usize,
    noise: ChaCha20Rng,
}

impl Session {
    fn inputs(&self, params: &Bound<'_, PyAny>, batch: &Bound<'_, PyAny>) -> PyResult<(pdgc::Params, pdgc::Batch)> {
        let p = Arrays::from_dict("params", params)?.params(&self.graph)?;
        let b = Arrays::from_dict("batch", batch)?.batch(&self.graph)?;
        Ok((p, b))
    }
}

impl Session {
    /// `clipped_grad_sum`, and the seconds of its Rust API call.
    fn clipped_sum<'py>(
        &mut self,
        py: Python<'py>,
        params: &Bound<'py, PyAny>,
        batch: &Bound<'py, PyAny>,
        clip: f32,
    ) -> PyResult<(ClippedSum, f64)> {
        let (p, b) = self.inputs(params, batch)?;
        let started = std::time::Instant::now();
        let cs = self.inner.clipped_grad_sum(&p, &b, clip).map_err(to_py)?;
        let seconds = started.elapsed().as_secs_f64();
        let out = ClippedSum {
            sum: to_dict(py, cs.sum)?.unbind(),
            norms: vec_to_numpy(py, cs.norms).unbind(),
            loss: vec_to_numpy(py, cs.loss).unbind(),
        };
        Ok((out, seconds))
    }
}

#[pymethods]
impl Session {
    /// Per-example losses, `[B]` float32.
    fn loss<'py>(
        &mut self,
        py: Python<'py>,
        params: &Bound<'py, PyAny>,
        batch: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let (p, b) = self.inputs(params, batch)?;
        Ok(vec_to_numpy(py, self.inner.loss(&p, &b).map_err(to_py)?))
    }

    /// The network's output (logits or prediction), `[B, ...]` float32.
    fn forward<'py>(
        &mut self,
        py: Python<'py>,
        params: &Bound<'py, PyAny>,
        batch: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let (p, b) = self.inputs(params, batch)?;
        arrays::to_numpy(py, self.inner.forward(&p, &b).map_err(to_py)?)
    }

    /// Each example's gradient of its own loss: parameter name → `[B, *shape]` float32.
    fn per_example_grads<'py>(
        &mut self,
        py: Python<'py>,
        params: &Bound<'py, PyAny>,
        batch: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (p, b) = self.inputs(params, batch)?;
        to_dict(py, self.inner.per_example_grads(&p, &b).map_err(to_py)?)
    }

    /// Each example's gradient norm over all parameters, `‖g_n‖`, `[B]` float32.
    fn per_example_norms<'py>(
        &mut self,
        py: Python<'py>,
        params: &Bound<'py, PyAny>,
        batch: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let (p, b) = self.inputs(params, batch)?;
        Ok(vec_to_numpy(py, self.inner.per_example_norms(&p, &b).map_err(to_py)?))
    }

    /// The DP-SGD clipped sum `Σ_n min(1, C/(‖g_n‖+1e-6)) g_n` with the norms and losses it
    /// saw (a `ClippedSum`). `clip` is C > 0. No noise is added (see `dp_sgd_step`).
    fn clipped_grad_sum<'py>(
        &mut self,
        py: Python<'py>,
        params: &Bound<'py, PyAny>,
        batch: &Bound<'py, PyAny>,
        clip: f32,
    ) -> PyResult<ClippedSum> {
        Ok(self.clipped_sum(py, params, batch, clip)?.0)
    }

    /// The ordinary (non-private) gradient of the summed loss `Σ_n loss_n`: parameter name →
    /// `[*shape]` float32.
    fn batch_grad<'py>(
        &mut self,
        py: Python<'py>,
        params: &Bound<'py, PyAny>,
        batch: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (p, b) = self.inputs(params, batch)?;
        to_dict(py, self.inner.batch_grad(&p, &b).map_err(to_py)?)
    }

    /// One DP-SGD step that updates the parameter arrays in place:
    /// `params ← optimizer(params, (Σ_n min(1, C/(‖g_n‖+1e-6)) g_n + N(0, σ²C²I)) /
    /// expected_batch)`.
    ///
    /// The batch may be larger than `max_batch` (it is cut into micro-batches) or empty (a
    /// noise-only step, as Poisson sampling requires). `expected_batch` is `q·N` under
    /// Poisson sampling (`B` for fixed-size batches): dividing by the actual size would leak
    /// it. The parameter arrays must be writable float32 NumPy arrays (or objects whose
    /// `__array__` returns a view, as a PyTorch CPU tensor's does; an object that hands out a
    /// copy would not see the update).
    ///
    /// Args:
    ///     clip: the per-example clip norm C > 0.
    ///     noise_multiplier: σ ≥ 0 (the noise's standard deviation is σ·C).
    ///     expected_batch: the divisor, > 0.
    ///     optimizer: an `Optimizer`, whose state the step advances.
    ///     generator: the noise's `Generator` (default: the session's own).
    ///
    /// Returns a `StepReport`. On any error the parameters are unchanged.
    #[pyo3(signature = (params, batch, *, clip, noise_multiplier, expected_batch, optimizer, generator=None))]
    #[allow(clippy::too_many_arguments)]
    fn dp_sgd_step<'py>(
        &mut self,
        py: Python<'py>,
        params: &Bound<'py, PyAny>,
        batch: &Bound<'py, PyAny>,
        clip: f32,
        noise_multiplier: f64,
        expected_batch: f64,
        mut optimizer: PyRefMut<'py, Optimizer>,
        generator: Option<PyRefMut<'py, Generator>>,
    ) -> PyResult<StepReport> {
        let arrays = Arrays::from_dict("params", params)?;
        let mut p = arrays.params(&self.graph)?;
        let b = Arrays::from_dict("batch", batch)?.batch(&self.graph)?;
        // Every array must be writable before anything changes.
        let mut targets = Vec::with_capacity(p.tensors.len());
        for name in p.tensors.keys() {
            let array = arrays.get(name).ok_or_else(|| errors::InternalError::new_err(format!("`{name}` vanished")))?;
            let typed = array.cast::<PyArrayDyn<f32>>().map_err(|e| errors::InternalError::new_err(e.to_string()))?;
            let rw = typed.try_readwrite().map_err(|e| {
                LayoutError::new_err(format!(
                    "params: tensor `{name}` cannot be updated in place ({e}): pass writable arrays"
                ))
            })?;
            targets.push((name.clone(), rw));
        }
        let dp = DpSettings { clip, noise_multiplier, expected_batch };
        let opt = &mut *optimizer;
        let mut generator = generator;
        let rng = match generator.as_mut() {
            Some(g) => &mut g.rng,
            None => &mut self.noise,
        };
        let report = self.inner.dp_sgd_step(&mut p, &b, &dp, &opt.kind, &mut opt.state, rng).map_err(to_py)?;
        for (name, mut rw) in targets {
            let updated = p.tensors.get(&name).ok_or_else(|| errors::InternalError::new_err(format!("no `{name}`")))?;
            rw.as_slice_mut().map_err(|e| LayoutError::new_err(e.to_string()))?.copy_from_slice(&updated.data);
        }
        Ok(StepReport {
            batch_size: report.batch_size,
            losses: vec_to_numpy(py, report.losses).unbind(),
            norms: vec_to_numpy(py, report.norms).unbind(),
            clipped_fraction: report.clipped_fraction,
        })
    }

    /// `clipped_grad_sum` that also returns the seconds its Rust API call took:
    /// `(result, seconds)`. The rest of the call's time is what the Python path adds
    /// (`python/bench/clipped_sum_timing.py` measures it this way).
    fn _timed_clipped_grad_sum<'py>(
        &mut self,
        py: Python<'py>,
        params: &Bound<'py, PyAny>,
        batch: &Bound<'py, PyAny>,
        clip: f32,
    ) -> PyResult<(ClippedSum, f64)> {
        self.clipped_sum(py, params, batch, clip)
    }

    /// What the session runs on, e.g. `cpu (2 threads)` or `cuda (NVIDIA H200, sm_90)`.
    #[getter]
    fn device(&self) -> String {
        self.inner.device_description()
    }

    /// Why a `device="auto"` session runs on the CPU rather than CUDA (None if it did not
    /// fall back).
    #[getter]
    fn fallback_reason(&self) -> Option<&str> {
        self.inner.fallback_reason()
    }

    /// The largest batch one call takes (`dp_sgd_step` cuts larger ones into micro-batches).
    #[getter]
    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }

    /// CPU worker threads.
    #[getter]
    fn get_threads(&self) -> usize {
        self.threads
    }

    #[setter]
    fn set_threads(&mut self, threads: usize) -> PyResult<()> {
        if threads == 0 {
            return Err(setting("threads", "0", "must be at least 1".into()));
        }
        self.threads = threads;
        self.inner.set_threads(threads);
        Ok(())
    }

    /// Bytes of host memory the session's buffers may take (default: 90% of the memory the
    /// machine had available when the session started). A call that needs more runs its
    /// batch in micro-batches; the results are the same up to f32 rounding.
    #[getter]
    fn get_memory_budget(&self) -> u64 {
        self.inner.memory_budget()
    }

    #[setter]
    fn set_memory_budget(&mut self, bytes: u64) {
        self.inner.set_memory_budget(bytes);
    }

    fn __repr__(&self) -> String {
        format!("<pdgc.Session {} on {}>", self.graph.name, self.inner.device_description())
    }
}

/// ε spent after `steps` steps (RDP accountant); returns `(epsilon, best_order)`.
#[pyfunction]
fn _rdp_epsilon(noise_multiplier: f64, sample_rate: f64, steps: u64, delta: f64) -> PyResult<(f64, f64)> {
    let spent = pdgc::privacy::epsilon(noise_multiplier, sample_rate, steps, delta).map_err(to_py)?;
    Ok((spent.epsilon, spent.best_order))
}

/// The smallest σ whose ε after `steps` steps is ≤ `target_epsilon` (RDP accountant).
#[pyfunction]
fn _rdp_noise_multiplier(
    target_epsilon: f64,
    sample_rate: f64,
    steps: u64,
    delta: f64,
    tolerance: f64,
) -> PyResult<f64> {
    pdgc::privacy::noise_multiplier_within(target_epsilon, sample_rate, steps, delta, tolerance).map_err(to_py)
}

/// ε spent after `steps` steps (PLD accountant, an upper bound).
#[pyfunction]
fn _pld_epsilon(noise_multiplier: f64, sample_rate: f64, steps: u64, delta: f64) -> PyResult<f64> {
    pdgc::pld::epsilon(noise_multiplier, sample_rate, steps, delta).map_err(to_py)
}

/// The smallest σ (to 0.001) whose PLD ε after `steps` steps is ≤ `target_epsilon`.
#[pyfunction]
fn _pld_noise_multiplier(target_epsilon: f64, sample_rate: f64, steps: u64, delta: f64) -> PyResult<f64> {
    pdgc::pld::noise_multiplier(target_epsilon, sample_rate, steps, delta).map_err(to_py)
}

#[pymodule]
fn _pdgc(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add_function(wrap_pyfunction!(_rdp_epsilon, m)?)?;
    m.add_function(wrap_pyfunction!(_rdp_noise_multiplier, m)?)?;
    m.add_function(wrap_pyfunction!(_pld_epsilon, m)?)?;
    m.add_function(wrap_pyfunction!(_pld_noise_multiplier, m)?)?;
    m.add_class::<Module>()?;
    m.add_class::<Session>()?;
    m.add_class::<Optimizer>()?;
    m.add_class::<Generator>()?;
    m.add_class::<ClippedSum>()?;
    m.add_class::<StepReport>()?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
