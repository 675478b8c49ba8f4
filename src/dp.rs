//! DP-SGD: one private step on a session, the batch samplers, the optimizers and the
//! seeded random streams they draw from.
//!
//! A step ([`Session::dp_sgd_step`]) is, for a logical batch `S` (any size, empty included):
//!
//! ```text
//! g̃ = ( Σ_{n∈S} min(1, C/(‖g_n‖+1e-6)) g_n  +  N(0, σ²C² I) ) / B_expected
//! params ← optimizer(params, g̃)
//! ```
//!
//! The clipped sum comes from the session's kernels ([`Session::clipped_grad_sum`]); a
//! logical batch larger than the session's compiled batch is cut into micro-batches whose
//! sums are added, and an empty batch contributes zeros, so the noise is still added
//! (an empty Poisson batch is a valid step of the mechanism). Noise is drawn once per step
//! and coordinate, in f64 (rand_distr's ziggurat `StandardNormal` on a ChaCha20 stream), then
//! added to the f32 sum. `B_expected` is `q·N` under Poisson sampling and `B` for fixed-size
//! batches: dividing by the *actual* size would make the update depend on the batch size,
//! which the privacy analysis does not cover.
//!
//! Invariants:
//! * Every random draw comes from [`stream`]: a ChaCha20 stream keyed by the seed and
//!   numbered by (purpose, epoch, step), so any step of a run can be recomputed without
//!   replaying the ones before it (which makes resuming exact).
//! * Noise is never skipped when `noise_multiplier > 0`, whatever the batch.
//! * The optimizers follow PyTorch's `torch.optim.SGD` (momentum, no dampening, no
//!   Nesterov, no weight decay) and `torch.optim.Adam` (no weight decay, no amsgrad).

use std::collections::BTreeMap;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::runtime::Session;
use crate::tensor::{save_tensors, Batch, Labels, Params, Tensor, TensorMap};

/// What a random stream is used for; part of its number, so streams never overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Which examples a Poisson step takes.
    Sample = 1,
    /// The permutation of an epoch under fixed-size sampling.
    Shuffle = 2,
    /// The Gaussian noise of a step.
    Noise = 3,
}

/// Largest epoch and step numbers [`stream`] can tell apart.
pub const MAX_EPOCHS: u64 = 1 << 24;
pub const MAX_STEPS_PER_EPOCH: u64 = 1 << 32;

/// The random stream for (seed, purpose, epoch, step): ChaCha20 keyed by the seed (expanded
/// to 256 bits by `SeedableRng::seed_from_u64`), with the 64-bit stream number
/// `purpose << 56 | epoch << 32 | step`. Epochs must be below [`MAX_EPOCHS`] and steps below
/// [`MAX_STEPS_PER_EPOCH`] (larger ones wrap around and reuse streams; the training loop
/// refuses settings that would get there).
pub fn stream(seed: u64, purpose: Purpose, epoch: u64, step: u64) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream((purpose as u64) << 56 | (epoch % MAX_EPOCHS) << 32 | (step % MAX_STEPS_PER_EPOCH));
    rng
}

/// How the examples of a step are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Each example independently with probability `rate` (the sampling the accountant
    /// assumes). Batch sizes vary; empty batches happen and are valid steps.
    Poisson { rate: f64 },
    /// A fresh random permutation per epoch cut into batches of exactly `batch` examples;
    /// the `N mod batch` examples left over are not used in that epoch.
    Shuffle { batch: usize },
}

impl Sampling {
    /// The sampling rate `q` the accountant is given (`batch / N` for fixed-size batches, an
    /// approximation: see README, "What the noise does and does not protect").
    pub fn rate(&self, n: usize) -> f64 {
        match *self {
            Sampling::Poisson { rate } => rate,
            Sampling::Shuffle { batch } => batch as f64 / n as f64,
        }
    }

    /// The expected logical batch size: `q·N` or `B`. The private gradient is divided by it.
    pub fn expected_batch(&self, n: usize) -> f64 {
        match *self {
            Sampling::Poisson { rate } => rate * n as f64,
            Sampling::Shuffle { batch } => batch as f64,
        }
    }

    /// Steps in one epoch: `round(1/q)` for Poisson (one pass in expectation), `⌊N/B⌋` for
    /// fixed-size batches.
    pub fn steps_per_epoch(&self, n: usize) -> u64 {
        match *self {
            Sampling::Poisson { rate } => (1.0 / rate).round().max(1.0) as u64,
            Sampling::Shuffle { batch } => (n / batch) as u64,
        }
    }

    /// Checks the settings against a dataset of `n` examples.
    pub fn validate(&self, n: usize) -> Result<()> {
        match *self {
            Sampling::Poisson { rate } if !(rate > 0.0 && rate <= 1.0) => Err(Error::InvalidSetting {
                name: "--sample-rate",
                value: rate.to_string(),
                reason: "must be in (0, 1]".into(),
            }),
            Sampling::Shuffle { batch } if batch == 0 || batch > n => Err(Error::InvalidSetting {
                name: "--batch",
                value: batch.to_string(),
                reason: format!("must be between 1 and the {n} training examples"),
            }),
            _ if self.steps_per_epoch(n) >= MAX_STEPS_PER_EPOCH => Err(Error::InvalidSetting {
                name: "--sample-rate",
                value: self.rate(n).to_string(),
                reason: "gives too many steps per epoch".into(),
            }),
            _ => Ok(()),
        }
    }

    /// The example indices of step `step` of `epoch`, for a dataset of `n` examples.
    pub fn indices(&self, n: usize, seed: u64, epoch: u64, step: u64) -> Vec<usize> {
        match *self {
            Sampling::Poisson { rate } => poisson_sample(n, rate, &mut stream(seed, Purpose::Sample, epoch, step)),
            Sampling::Shuffle { batch } => {
                let mut order: Vec<usize> = (0..n).collect();
                order.shuffle(&mut stream(seed, Purpose::Shuffle, epoch, 0));
                let start = (step as usize * batch).min(n);
                order[start..(start + batch).min(n)].to_vec()
            }
        }
    }
}

/// Poisson sampling: each of `0..n` independently with probability `rate`, in order.
pub fn poisson_sample(n: usize, rate: f64, rng: &mut ChaCha20Rng) -> Vec<usize> {
    (0..n).filter(|_| rng.random::<f64>() < rate).collect()
}

/// The privacy settings of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSettings {
    /// The per-example clip norm C.
    pub clip: f32,
    /// σ: the noise's standard deviation is σ·C (0 turns the noise off, for testing).
    pub noise_multiplier: f64,
    /// The divisor: `q·N` (Poisson) or `B` (fixed-size); see [`Sampling::expected_batch`].
    pub expected_batch: f64,
}

impl DpSettings {
    fn validate(&self) -> Result<()> {
        if !(self.clip > 0.0 && self.clip.is_finite()) {
            return Err(Error::BadClipNorm(self.clip));
        }
        if !(self.noise_multiplier >= 0.0 && self.noise_multiplier.is_finite()) {
            return Err(Error::InvalidSetting {
                name: "noise multiplier",
                value: self.noise_multiplier.to_string(),
                reason: "must be a finite number ≥ 0".into(),
            });
        }
        if !(self.expected_batch > 0.0 && self.expected_batch.is_finite()) {
            return Err(Error::InvalidSetting {
                name: "expected batch size",
                value: self.expected_batch.to_string(),
                reason: "must be positive".into(),
            });
        }
        Ok(())
    }
}

/// The optimizer, with PyTorch's semantics (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// `buf ← μ·buf + g` (`buf ← g` on the first step), `p ← p − lr·buf`; μ = 0 is plain SGD.
    Sgd { lr: f32, momentum: f32 },
    /// `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`,
    /// `p ← p − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + ε)`.
    Adam { lr: f32, beta1: f32, beta2: f32, eps: f32 },
}

/// The optimizer's running state: the step count and its buffers by name
/// (`momentum_buffer.NAME`, or `exp_avg.NAME` and `exp_avg_sq.NAME`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OptimizerState {
    pub step: u64,
    pub buffers: TensorMap,
}

impl Optimizer {
    /// Adam with PyTorch's defaults β = (0.9, 0.999), ε = 1e-8.
    pub fn adam(lr: f32) -> Optimizer {
        Optimizer::Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |name: &'static str, value: f32, reason: &str| {
            Err(Error::InvalidSetting { name, value: value.to_string(), reason: reason.into() })
        };
        match *self {
            Optimizer::Sgd { lr, .. } | Optimizer::Adam { lr, .. } if !(lr > 0.0 && lr.is_finite()) => {
                bad("--lr", lr, "must be a positive finite number")
            }
            Optimizer::Sgd { momentum, .. } if !(0.0..1.0).contains(&momentum) => {
                bad("--momentum", momentum, "must be in [0, 1)")
            }
            Optimizer::Adam { beta1, beta2, .. } if !((0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2)) => {
                bad("Adam betas", beta1.max(beta2), "must be in [0, 1)")
            }
            Optimizer::Adam { eps, .. } if eps.is_nan() || eps <= 0.0 => bad("Adam eps", eps, "must be positive"),
            _ => Ok(()),
        }
    }

    /// One update of `params` with the gradient `grad` (same names and shapes).
    pub fn apply(&self, state: &mut OptimizerState, params: &mut Params, grad: &TensorMap) -> Result<()> {
        state.step += 1;
        for (name, p) in params.tensors.iter_mut() {
            let g = grad.get(name).ok_or_else(|| Error::Internal(format!("no gradient for parameter `{name}`")))?;
            if g.shape != p.shape {
                return Err(Error::Internal(format!(
                    "gradient of `{name}` has shape {:?}, not {:?}",
                    g.shape, p.shape
                )));
            }
            match *self {
                Optimizer::Sgd { lr, momentum: 0.0 } => {
                    for (x, &d) in p.data.iter_mut().zip(&g.data) {
                        *x -= lr * d;
                    }
                }
                Optimizer::Sgd { lr, momentum } => {
                    let buf = state
                        .buffers
                        .entry(format!("momentum_buffer.{name}"))
                        .or_insert_with(|| Tensor::new(g.shape.clone(), g.data.clone()));
                    if state.step > 1 {
                        for (b, &d) in buf.data.iter_mut().zip(&g.data) {
                            *b = momentum * *b + d;
                        }
                    }
                    for (x, &b) in p.data.iter_mut().zip(&buf.data) {
                        *x -= lr * b;
                    }
                }
                Optimizer::Adam { lr, beta1, beta2, eps } => {
                    let t = state.step as i32;
                    let bias1 = 1.0 - (beta1 as f64).powi(t);
                    let bias2_sqrt = (1.0 - (beta2 as f64).powi(t)).sqrt();
                    let step_size = (lr as f64 / bias1) as f32;
                    let zeros = || Tensor::zeros(g.shape.clone());
                    let m = state.buffers.entry(format!("exp_avg.{name}")).or_insert_with(zeros);
                    for (m, &d) in m.data.iter_mut().zip(&g.data) {
                        *m = beta1 * *m + (1.0 - beta1) * d;
                    }
                    let m = m.data.clone();
                    let v = state.buffers.entry(format!("exp_avg_sq.{name}")).or_insert_with(zeros);
                    for (v, &d) in v.data.iter_mut().zip(&g.data) {
                        *v = beta2 * *v + (1.0 - beta2) * d * d;
                    }
                    for ((x, &m), &v) in p.data.iter_mut().zip(&m).zip(&v.data) {
                        let denom = v.sqrt() / bias2_sqrt as f32 + eps;
                        *x -= step_size * m / denom;
                    }
                }
            }
        }
        Ok(())
    }
}

impl OptimizerState {
    /// Writes the buffers as safetensors, with the step count and the optimizer (JSON) as
    /// metadata.
    pub fn save(&self, path: &Path, optimizer: &Optimizer) -> Result<()> {
        let mut meta = BTreeMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert(
            "optimizer".to_string(),
            serde_json::to_string(optimizer).map_err(|e| Error::Internal(e.to_string()))?,
        );
        save_tensors(path, &self.buffers, Some(meta))
    }

    /// Reads what [`save`](Self::save) wrote and checks it against the optimizer and the
    /// parameters (every buffer names a parameter and has its shape).
    pub fn load(path: &Path, optimizer: &Optimizer, params: &Params) -> Result<OptimizerState> {
        let bad = |message: String| Error::Checkpoint { path: path.to_path_buf(), message };
        let bytes = std::fs::read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Safetensors { path: path.to_path_buf(), message: e.to_string() })?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::Safetensors { path: path.to_path_buf(), message: e.to_string() })?;
        let meta = header.metadata().clone().unwrap_or_default();
        let step: u64 = meta
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no `step` in the optimizer state's metadata".into()))?;
        let saved: Optimizer = meta
            .get("optimizer")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("no `optimizer` in the optimizer state's metadata".into()))?;
        if saved != *optimizer {
            return Err(bad(format!("the state belongs to {saved:?}, this run uses {optimizer:?}")));
        }
        let mut buffers = TensorMap::new();
        for (name, view) in st.tensors() {
            let param = name.split_once('.').map(|(_, p)| p).unwrap_or("");
            let Some(p) = params.get(param) else {
                return Err(bad(format!("buffer `{name}` names no parameter of the model")));
            };
            if view.dtype() != Dtype::F32 || view.shape() != p.shape.as_slice() {
                return Err(bad(format!(
                    "buffer `{name}` is {:?} {:?}, the parameter is F32 {:?}",
                    view.dtype(),
                    view.shape(),
                    p.shape
                )));
            }
            let data = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            buffers.insert(name, Tensor::new(p.shape.clone(), data));
        }
        Ok(OptimizerState { step, buffers })
    }
}

/// What one step saw.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepReport {
    /// Examples in the logical batch (0 for an empty Poisson batch).
    pub batch_size: usize,
    /// Each example's loss before the update.
    pub losses: Vec<f32>,
    /// Each example's gradient norm before clipping (empty for non-private steps).
    pub norms: Vec<f32>,
    /// The fraction of examples whose gradient was scaled down (norm > C).
    pub clipped_fraction: f32,
}

impl StepReport {
    /// The mean loss of the batch, `None` when it was empty.
    pub fn loss_mean(&self) -> Option<f32> {
        (!self.losses.is_empty())
            .then(|| (self.losses.iter().map(|&l| l as f64).sum::<f64>() / self.losses.len() as f64) as f32)
    }
}

/// The number of examples of a batch, which may be zero, without checking that the inputs
/// agree (see [`Batch::size`]).
pub fn batch_len(batch: &Batch) -> usize {
    match &batch.labels {
        Labels::Classes(v) => v.len(),
        Labels::Target(t) => t.shape[0],
    }
}

fn zeros_like(params: &Params) -> TensorMap {
    params.tensors.iter().map(|(k, t)| (k.clone(), Tensor::zeros(t.shape.clone()))).collect()
}

/// Adds `N(0, std²)` to every coordinate (drawn in f64, in parameter-name order) and divides
/// by `divisor`.
pub fn add_noise_and_scale(sum: &mut TensorMap, std: f64, divisor: f64, rng: &mut ChaCha20Rng) {
    for t in sum.values_mut() {
        for x in t.data.iter_mut() {
            let z: f64 = if std > 0.0 { StandardNormal.sample(rng) } else { 0.0 };
            *x = ((*x as f64 + std * z) / divisor) as f32;
        }
    }
}

impl Session {
    /// `Σ_n min(1, C/(‖g_n‖+1e-6)) g_n` over a batch of any size: cut into micro-batches of
    /// the session's compiled batch, summed; an empty batch gives zeros.
    pub fn clipped_grad_sum_chunked(&mut self, params: &Params, batch: &Batch, clip: f32) -> Result<crate::ClippedSum> {
        if !(clip > 0.0 && clip.is_finite()) {
            return Err(Error::BadClipNorm(clip));
        }
        let n = batch_len(batch);
        let mut out =
            crate::ClippedSum { sum: zeros_like(params), norms: Vec::with_capacity(n), loss: Vec::with_capacity(n) };
        let mut start = 0;
        while start < n {
            let end = (start + self.max_batch()).min(n);
            let part = if start == 0 && end == n {
                self.clipped_grad_sum(params, batch, clip)?
            } else {
                self.clipped_grad_sum(params, &batch.slice(start, end), clip)?
            };
            crate::tensor::add_into(&mut out.sum, &part.sum)?;
            out.norms.extend(part.norms);
            out.loss.extend(part.loss);
            start = end;
        }
        Ok(out)
    }

    /// One DP-SGD step on `params` (see the module doc): clip, sum, add noise from
    /// `noise_rng`, divide by the expected batch size, update with `optimizer`.
    pub fn dp_sgd_step(
        &mut self,
        params: &mut Params,
        batch: &Batch,
        dp: &DpSettings,
        optimizer: &Optimizer,
        state: &mut OptimizerState,
        noise_rng: &mut ChaCha20Rng,
    ) -> Result<StepReport> {
        dp.validate()?;
        let cs = self.clipped_grad_sum_chunked(params, batch, dp.clip)?;
        let mut grad = cs.sum;
        add_noise_and_scale(&mut grad, dp.noise_multiplier * dp.clip as f64, dp.expected_batch, noise_rng);
        optimizer.apply(state, params, &grad)?;
        let clipped = cs.norms.iter().filter(|&&n| n > dp.clip).count();
        Ok(StepReport {
            batch_size: cs.norms.len(),
            clipped_fraction: if cs.norms.is_empty() { 0.0 } else { clipped as f32 / cs.norms.len() as f32 },
            losses: cs.loss,
            norms: cs.norms,
        })
    }

    /// One ordinary (non-private) step: the mean gradient of the batch, no clipping, no
    /// noise; an empty batch leaves everything unchanged. The baseline for `--non-private`.
    pub fn sgd_step(
        &mut self,
        params: &mut Params,
        batch: &Batch,
        optimizer: &Optimizer,
        state: &mut OptimizerState,
    ) -> Result<StepReport> {
        let n = batch_len(batch);
        if n == 0 {
            return Ok(StepReport::default());
        }
        let mut grad = zeros_like(params);
        let mut losses = Vec::with_capacity(n);
        let mut start = 0;
        while start < n {
            let end = (start + self.max_batch()).min(n);
            let part = batch.slice(start, end);
            let (g, loss) = self.batch_grad_and_loss(params, &part)?;
            crate::tensor::add_into(&mut grad, &g)?;
            losses.extend(loss);
            start = end;
        }
        for t in grad.values_mut() {
            for x in t.data.iter_mut() {
                *x /= n as f32;
            }
        }
        optimizer.apply(state, params, &grad)?;
        Ok(StepReport { batch_size: n, losses, norms: Vec::new(), clipped_fraction: 0.0 })
    }
}
