//! `pdgc train`: the training loop over a [`Dataset`] — epochs of DP-SGD (or non-private)
//! steps, evaluation, privacy accounting and checkpoints.
//!
//! An epoch is [`Sampling::steps_per_epoch`] steps; step `s` of epoch `e` draws its examples
//! and its noise from the streams `(seed, e, s)` ([`crate::dp::stream`]), so a run resumed from
//! the checkpoint written after epoch `e` continues exactly as the uninterrupted run would
//! have: same batches, same noise, same parameters, bit for bit.
//!
//! A checkpoint directory holds `params.safetensors`, `optimizer.safetensors` and
//! `state.json` (format version, model fingerprint, number of training examples, epochs
//! and steps done, the [`TrainConfig`] with the accountant among its privacy settings, and the
//! per-epoch history). A resume must use the checkpoint's accountant. Files are written under
//! temporary names and renamed, `state.json` last; the epoch count is also stored in the
//! parameters' metadata and checked on load, so a torn checkpoint is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::dp::{self, stream, DpSettings, Optimizer, OptimizerState, Purpose, Sampling, StepReport};
use crate::error::{Error, Result};
use crate::module::Module;
use crate::privacy::Accountant;
use crate::runtime::{Device, Session};
use crate::tensor::{save_tensors, Params};

/// The version of `state.json`.
pub const CHECKPOINT_FORMAT: u32 = 1;

/// Private (clipping + noise, with accounting) or the non-private baseline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Privacy {
    /// DP-SGD with clip norm C, noise multiplier σ, accounted at δ by `accountant`
    /// (checkpoints written before the choice existed were accounted with RDP).
    Private {
        clip: f32,
        noise_multiplier: f64,
        delta: f64,
        #[serde(default = "Accountant::legacy")]
        accountant: Accountant,
    },
    /// Mean gradients, no clipping, no noise: the baseline.
    NonPrivate,
}

/// Everything that determines a run's result (with the model, the data and the thread
/// count's absence of influence: kernels reduce in a fixed order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Total epochs (a resumed run may ask for more than the checkpoint's run did).
    pub epochs: u64,
    pub sampling: Sampling,
    pub optimizer: Optimizer,
    pub privacy: Privacy,
    /// Keys every random stream: parameter init, batches, noise. Whoever knows it can
    /// recompute the noise, so it is as secret as the training data.
    pub seed: u64,
    /// The physical batch the module was compiled for (micro-batch size).
    pub micro_batch: usize,
}

impl TrainConfig {
    /// Checks the settings against a training set of `n` examples.
    pub fn validate(&self, n: usize) -> Result<()> {
        self.sampling.validate(n)?;
        self.optimizer.validate()?;
        if self.epochs == 0 || self.epochs >= dp::MAX_EPOCHS {
            return Err(Error::InvalidSetting {
                name: "--epochs",
                value: self.epochs.to_string(),
                reason: format!("must be between 1 and {}", dp::MAX_EPOCHS - 1),
            });
        }
        if let Privacy::Private { clip, noise_multiplier, delta, .. } = self.privacy {
            if !(clip > 0.0 && clip.is_finite()) {
                return Err(Error::BadClipNorm(clip));
            }
            if !(noise_multiplier > 0.0 && noise_multiplier.is_finite()) {
                return Err(Error::InvalidSetting {
                    name: "--noise",
                    value: noise_multiplier.to_string(),
                    reason: "must be a positive finite number (use --non-private for no noise)".into(),
                });
            }
            if !(delta > 0.0 && delta < 1.0) {
                return Err(Error::InvalidSetting {
                    name: "--delta",
                    value: delta.to_string(),
                    reason: "must be in (0, 1)".into(),
                });
            }
        }
        Ok(())
    }

    /// The settings in which `self` and `other` differ, except `epochs`: `name: a vs b`.
    pub fn differences(&self, other: &TrainConfig) -> Vec<String> {
        let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
            (serde_json::to_value(self), serde_json::to_value(other))
        else {
            return vec!["unserializable settings".into()];
        };
        a.iter()
            .filter(|(k, v)| k.as_str() != "epochs" && b.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {v} vs {}", b.get(k).cloned().unwrap_or_default()))
            .collect()
    }
}

/// The noise multiplier σ that spends at most `target_epsilon` at `delta` over the whole
/// run, as `accountant` finds it ([`Accountant::noise_multiplier`]).
pub fn noise_for_epsilon(
    target_epsilon: f64,
    sampling: &Sampling,
    n: usize,
    epochs: u64,
    delta: f64,
    accountant: Accountant,
) -> Result<f64> {
    let steps = sampling.steps_per_epoch(n) * epochs;
    accountant.noise_multiplier(target_epsilon, sampling.rate(n), steps, delta)
}

/// What one epoch did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: u64,
    pub epochs: u64,
    /// Steps done so far in the run.
    pub steps: u64,
    /// The mean loss of the examples the epoch's steps used, each before its step.
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    /// ε spent so far at δ (None for non-private runs).
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    /// Mean logical batch size of the epoch.
    pub mean_batch: f64,
    /// Fraction of examples whose gradient was clipped.
    pub clipped_fraction: f64,
    pub seconds: f64,
}

impl std::fmt::Display for EpochReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = self.epochs.to_string().len();
        write!(
            f,
            "epoch {:>width$}/{}: test accuracy {:.2}%, test loss {:.4}, train loss {:.4}, ",
            self.epoch,
            self.epochs,
            100.0 * self.test_accuracy,
            self.test_loss,
            self.train_loss
        )?;
        match (self.epsilon, self.delta) {
            (Some(e), Some(d)) => write!(f, "ε = {e:.3} (δ = {d:e}), clipped {:.1}%", 100.0 * self.clipped_fraction)?,
            _ => write!(f, "ε = ∞ (non-private)")?,
        }
        write!(f, ", mean batch {:.1}, {:.1} s", self.mean_batch, self.seconds)
    }
}

/// The end of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub test_accuracy: f64,
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    /// The accountant that gave ε (None for non-private runs).
    pub accountant: Option<Accountant>,
    /// The RDP order that gave ε (RDP accounting only).
    pub best_order: Option<f64>,
    pub epochs: u64,
    pub steps: u64,
    /// Seconds of this process (a resumed run counts from its resume).
    pub wall_seconds: f64,
}

impl std::fmt::Display for TrainSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "final: test accuracy {:.2}%, ", 100.0 * self.test_accuracy)?;
        match (self.epsilon, self.delta, self.best_order) {
            (Some(e), Some(d), Some(o)) => write!(f, "ε = {e:.3} at δ = {d:e} (RDP order {o})")?,
            (Some(e), Some(d), None) => write!(f, "ε = {e:.3} at δ = {d:e} (PLD)")?,
            _ => write!(f, "ε = ∞ (non-private)")?,
        }
        write!(f, ", {} epochs, {} steps, wall time {:.1} s", self.epochs, self.steps, self.wall_seconds)
    }
}

#[derive(Serialize, Deserialize)]
struct State {
    format: u32,
    model: String,
    model_fingerprint: String,
    train_examples: usize,
    epochs_done: u64,
    steps_done: u64,
    config: TrainConfig,
    history: Vec<EpochReport>,
}

/// A training run in progress: the session, parameters, optimizer state and position.
pub struct Trainer<'m> {
    module: &'m Module,
    session: Session,
    pub config: TrainConfig,
    pub params: Params,
    pub opt_state: OptimizerState,
    pub epochs_done: u64,
    pub steps_done: u64,
    pub history: Vec<EpochReport>,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

impl<'m> Trainer<'m> {
    /// A fresh run: parameters initialized from the seed. `module` must be compiled with
    /// `config.micro_batch` as its batch.
    pub fn new(module: &'m Module, config: TrainConfig, train: &Dataset) -> Result<Trainer<'m>> {
        Trainer::new_on(module, config, train, Device::Cpu)
    }

    /// [`Trainer::new`] on a given device (`Device::Auto`: CUDA if usable, else the CPU).
    pub fn new_on(module: &'m Module, config: TrainConfig, train: &Dataset, device: Device) -> Result<Trainer<'m>> {
        config.validate(train.len())?;
        train.check_model(&module.graph)?;
        if module.options.batch != config.micro_batch {
            return Err(Error::Internal(format!(
                "module compiled for batch {}, config says micro-batch {}",
                module.options.batch, config.micro_batch
            )));
        }
        let session = module.session(device)?;
        Ok(Trainer {
            module,
            session,
            params: module.init_params(config.seed),
            config,
            opt_state: OptimizerState::default(),
            epochs_done: 0,
            steps_done: 0,
            history: Vec::new(),
            progress: false,
        })
    }

    /// Continues the run saved in `dir`. `config` must equal the checkpoint's, except that
    /// it may ask for more epochs; any other difference is an error that lists it.
    pub fn resume(module: &'m Module, config: TrainConfig, train: &Dataset, dir: &Path) -> Result<Trainer<'m>> {
        Trainer::resume_on(module, config, train, dir, Device::Cpu)
    }

    /// [`Trainer::resume`] on a given device. A run resumes bit for bit on the device it
    /// started on; another device may differ in the last bits of each step.
    pub fn resume_on(
        module: &'m Module,
        config: TrainConfig,
        train: &Dataset,
        dir: &Path,
        device: Device,
    ) -> Result<Trainer<'m>> {
        let mut t = Trainer::new_on(module, config, train, device)?;
        let bad = |message: String| Error::Checkpoint { path: dir.to_path_buf(), message };
        let state_path = dir.join("state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|source| Error::Read { path: state_path, source })?;
        let state: State = serde_json::from_str(&text).map_err(|e| bad(format!("unreadable state.json: {e}")))?;
        if state.format != CHECKPOINT_FORMAT {
            return Err(bad(format!("state format {}, this pdgc reads {CHECKPOINT_FORMAT}", state.format)));
        }
        if state.model_fingerprint != fingerprint(module) {
            return Err(bad(format!("made with another model or micro-batch (model `{}`)", state.model)));
        }
        if state.train_examples != train.len() {
            return Err(bad(format!(
                "made with {} training examples, this data has {}",
                state.train_examples,
                train.len()
            )));
        }
        if let (Privacy::Private { accountant: theirs, .. }, Privacy::Private { accountant: ours, .. }) =
            (state.config.privacy, t.config.privacy)
        {
            if theirs != ours {
                return Err(bad(format!(
                    "its ε was accounted with {theirs}, this run asks for {ours}; one run cannot mix \
                     accountants (resume with --accountant {theirs})"
                )));
            }
        }
        let diffs = state.config.differences(&t.config);
        if !diffs.is_empty() {
            return Err(bad(format!(
                "the settings differ from the checkpoint's (checkpoint vs this run): {}",
                diffs.join("; ")
            )));
        }
        if state.epochs_done > t.config.epochs {
            return Err(bad(format!(
                "already {} epochs done, more than --epochs {}",
                state.epochs_done, t.config.epochs
            )));
        }
        let params_path = dir.join("params.safetensors");
        t.params = Params::load(&params_path, &module.graph)?;
        let stored = read_epochs_metadata(&params_path)?;
        if stored != Some(state.epochs_done) {
            return Err(bad(format!(
                "params.safetensors is from epoch {stored:?}, state.json from epoch {} (a torn checkpoint)",
                state.epochs_done
            )));
        }
        t.opt_state = OptimizerState::load(&dir.join("optimizer.safetensors"), &t.config.optimizer, &t.params)?;
        t.epochs_done = state.epochs_done;
        t.steps_done = state.steps_done;
        t.history = state.history;
        Ok(t)
    }

    /// Sets the session's worker threads.
    pub fn set_threads(&mut self, threads: usize) {
        self.session.set_threads(threads);
    }

    /// The module's session (for evaluation by callers).
    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    /// One epoch of steps; returns the mean train loss, mean batch size and clipped fraction.
    fn epoch(&mut self, train: &Dataset) -> Result<(f64, f64, f64)> {
        let n = train.len();
        let epoch = self.epochs_done;
        let steps = self.config.sampling.steps_per_epoch(n);
        let bar = progress_bar(self.progress, steps, &format!("epoch {}/{}", epoch + 1, self.config.epochs));
        let (mut loss_sum, mut examples, mut clipped) = (0.0f64, 0usize, 0.0f64);
        for step in 0..steps {
            let indices = self.config.sampling.indices(n, self.config.seed, epoch, step);
            let batch = train.batch(&self.module.graph, &indices)?;
            let report: StepReport = match self.config.privacy {
                Privacy::Private { clip, noise_multiplier, .. } => {
                    let settings =
                        DpSettings { clip, noise_multiplier, expected_batch: self.config.sampling.expected_batch(n) };
                    let mut noise = stream(self.config.seed, Purpose::Noise, epoch, step);
                    self.session.dp_sgd_step(
                        &mut self.params,
                        &batch,
                        &settings,
                        &self.config.optimizer,
                        &mut self.opt_state,
                        &mut noise,
                    )?
                }
                Privacy::NonPrivate => {
                    self.session.sgd_step(&mut self.params, &batch, &self.config.optimizer, &mut self.opt_state)?
                }
            };
            loss_sum += report.losses.iter().map(|&l| l as f64).sum::<f64>();
            examples += report.batch_size;
            clipped += report.clipped_fraction as f64 * report.batch_size as f64;
            self.steps_done += 1;
            if let Some(l) = report.loss_mean() {
                bar.set_message(format!("loss {l:.4}"));
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        self.epochs_done += 1;
        let per = |x: f64| if examples == 0 { 0.0 } else { x / examples as f64 };
        Ok((per(loss_sum), examples as f64 / steps as f64, per(clipped)))
    }

    /// Test accuracy and mean cross-entropy of the current parameters.
    pub fn evaluate(&mut self, test: &Dataset) -> Result<(f64, f64)> {
        evaluate(&mut self.session, self.module, &self.params, test)
    }

    /// ε spent after the steps done so far, and the best RDP order (RDP accounting only).
    pub fn epsilon(&self, n: usize) -> Result<Option<(f64, Option<f64>)>> {
        match self.config.privacy {
            Privacy::Private { noise_multiplier, delta, accountant, .. } => {
                let rate = self.config.sampling.rate(n);
                match (accountant, self.steps_done) {
                    (_, 0) => Ok(Some((0.0, None))),
                    (Accountant::Pld, steps) => {
                        Ok(Some((crate::pld::epsilon(noise_multiplier, rate, steps, delta)?, None)))
                    }
                    (Accountant::Rdp, steps) => {
                        let spent = crate::privacy::epsilon(noise_multiplier, rate, steps, delta)?;
                        Ok(Some((spent.epsilon, Some(spent.best_order))))
                    }
                }
            }
            Privacy::NonPrivate => Ok(None),
        }
    }

    /// Trains the remaining epochs; after each, evaluates, accounts, calls `on_epoch` and
    /// writes a checkpoint into `checkpoint` (if given).
    pub fn run(
        &mut self,
        train: &Dataset,
        test: &Dataset,
        checkpoint: Option<&Path>,
        mut on_epoch: impl FnMut(&EpochReport),
    ) -> Result<TrainSummary> {
        let started = Instant::now();
        let delta = match self.config.privacy {
            Privacy::Private { delta, .. } => Some(delta),
            Privacy::NonPrivate => None,
        };
        while self.epochs_done < self.config.epochs {
            let t0 = Instant::now();
            let (train_loss, mean_batch, clipped_fraction) = self.epoch(train)?;
            let (test_accuracy, test_loss) = self.evaluate(test)?;
            let report = EpochReport {
                epoch: self.epochs_done,
                epochs: self.config.epochs,
                steps: self.steps_done,
                train_loss,
                test_loss,
                test_accuracy,
                epsilon: self.epsilon(train.len())?.map(|(e, _)| e),
                delta,
                mean_batch,
                clipped_fraction,
                seconds: t0.elapsed().as_secs_f64(),
            };
            on_epoch(&report);
            self.history.push(report);
            if let Some(dir) = checkpoint {
                self.save_checkpoint(dir, train.len())?;
            }
        }
        let (test_accuracy, _) = match self.history.last() {
            Some(r) => (r.test_accuracy, r.test_loss),
            None => self.evaluate(test)?,
        };
        let spent = self.epsilon(train.len())?;
        Ok(TrainSummary {
            test_accuracy,
            epsilon: spent.map(|(e, _)| e),
            delta,
            accountant: match self.config.privacy {
                Privacy::Private { accountant, .. } => Some(accountant),
                Privacy::NonPrivate => None,
            },
            best_order: spent.and_then(|(_, o)| o),
            epochs: self.epochs_done,
            steps: self.steps_done,
            wall_seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Writes the checkpoint (see the module doc) into `dir`, creating it.
    pub fn save_checkpoint(&self, dir: &Path, train_examples: usize) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Write { path: dir.to_path_buf(), source })?;
        let tmp = |name: &str| dir.join(format!(".{name}.tmp"));
        let mut meta = BTreeMap::new();
        meta.insert("epochs_done".to_string(), self.epochs_done.to_string());
        save_tensors(&tmp("params.safetensors"), &self.params.tensors, Some(meta))?;
        self.opt_state.save(&tmp("optimizer.safetensors"), &self.config.optimizer)?;
        let state = State {
            format: CHECKPOINT_FORMAT,
            model: self.module.name.clone(),
            model_fingerprint: fingerprint(self.module),
            train_examples,
            epochs_done: self.epochs_done,
            steps_done: self.steps_done,
            config: self.config.clone(),
            history: self.history.clone(),
        };
        let json = serde_json::to_string_pretty(&state).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(tmp("state.json"), json).map_err(|source| Error::Write { path: tmp("state.json"), source })?;
        for name in ["params.safetensors", "optimizer.safetensors", "state.json"] {
            let to: PathBuf = dir.join(name);
            std::fs::rename(tmp(name), &to).map_err(|source| Error::Write { path: to, source })?;
        }
        Ok(())
    }
}

fn fingerprint(module: &Module) -> String {
    format!("{:016x}", module.fingerprint())
}

fn read_epochs_metadata(path: &Path) -> Result<Option<u64>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Safetensors { path: path.to_path_buf(), message: e.to_string() })?;
    Ok(header.metadata().as_ref().and_then(|m| m.get("epochs_done")).and_then(|s| s.parse().ok()))
}

fn progress_bar(show: bool, len: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} steps ({elapsed}, eta {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    if !show || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

/// Accuracy and mean cross-entropy over a dataset, from the logits, in micro-batches.
pub fn evaluate(session: &mut Session, module: &Module, params: &Params, data: &Dataset) -> Result<(f64, f64)> {
    let (mut correct, mut loss) = (0usize, 0.0f64);
    let mut start = 0;
    let indices: Vec<usize> = (0..data.len()).collect();
    while start < data.len() {
        let end = (start + session.max_batch()).min(data.len());
        let batch = data.batch(&module.graph, &indices[start..end])?;
        let logits = session.forward(params, &batch)?;
        let classes = logits.shape[1..].iter().product::<usize>();
        for (row, &label) in logits.data.chunks_exact(classes).zip(&data.labels[start..end]) {
            let (best, _) =
                row.iter().enumerate().fold((0, f32::NEG_INFINITY), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
            correct += (best as i64 == label) as usize;
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            loss += lse - row[label as usize] as f64;
        }
        start = end;
    }
    let n = data.len().max(1) as f64;
    Ok((correct as f64 / n, loss / n))
}
