//! `pdgc bench`: measured times of the non-private batch gradient and of each strategy's
//! per-example work (grads, norms, clipped sum) on one machine, side by side, with ratios
//! to the non-private step. Medians over repeated runs after a warm-up. Beside the times:
//! the memory the buffer plan gives the step's buffers and the process's peak resident
//! memory measured while the step ran (which adds the parameters, the batch, the compiled
//! code and the results to the buffers).

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::error::Result;
use crate::lower::EntryKind;
use crate::memory::{self, human_bytes};
use crate::module::{CompileOptions, Module};
use crate::ops::Strategy;
use crate::runtime::Device;
use crate::tensor::Batch;

/// The kernels `--profile` lists one per line, the largest first; one more line sums the rest.
const PROFILE_LINES: usize = 12;

/// One column of the table: a strategy configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    /// `auto` (the cost model's plan) or a strategy forced on every layer it applies to.
    pub config: String,
    /// `None` where not timed (ghost has no per-example gradients; `main_steps`).
    pub grads_ms: Option<f64>,
    pub norms_ms: Option<f64>,
    pub clipped_sum_ms: f64,
    pub clipped_sum_memory: StepMemory,
}

/// A step's memory: the arena the buffer plan gives it, what it holds outside the arena
/// (the parameters, the results read out: [`memory::outside`]), and the process's peak
/// resident memory while it ran (`None` where the system does not report it).
#[derive(Debug, Clone, Serialize)]
pub struct StepMemory {
    pub planned_bytes: u64,
    pub outside_bytes: u64,
    pub peak_rss_bytes: Option<u64>,
}

impl std::fmt::Display for StepMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rss = self.peak_rss_bytes.map_or("-".to_string(), human_bytes);
        write!(
            f,
            "{} + {} = {} / {rss}",
            human_bytes(self.planned_bytes),
            human_bytes(self.outside_bytes),
            human_bytes(self.planned_bytes + self.outside_bytes)
        )
    }
}

/// Times `f` as [`time`] does and measures the process's peak resident memory meanwhile.
fn time_and_memory(
    repeats: usize,
    bar: &ProgressBar,
    (planned_bytes, outside_bytes): (u64, u64),
    f: impl FnMut() -> Result<()>,
) -> Result<(f64, StepMemory)> {
    let reset = memory::reset_peak_rss();
    let ms = time(repeats, bar, f)?;
    Ok((ms, StepMemory { planned_bytes, outside_bytes, peak_rss_bytes: memory::peak_rss().filter(|_| reset) }))
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub batch: usize,
    pub threads: usize,
    /// What the sessions ran on (see [`crate::Session::device_description`]).
    pub device: String,
    pub repeats: usize,
    pub nonprivate_ms: f64,
    pub nonprivate_memory: StepMemory,
    pub loss_ms: Option<f64>,
    pub columns: Vec<Column>,
    /// The plan's regret: the `auto` clipped sum's time over the fastest forced
    /// configuration's (1.0: as fast as the best uniform choice; below 1 where the plan's
    /// per-layer mix beats every one; `None` without forced columns).
    pub regret: Option<f64>,
    /// With `--profile`: per kernel, ms per step and launches per step, slowest first, of
    /// the non-private step and of the `auto` plan's clipped-sum step.
    pub profile: Vec<ProfiledStep>,
}

/// Where one step's time goes, kernel by kernel.
#[derive(Debug, Clone, Serialize)]
pub struct ProfiledStep {
    pub step: String,
    /// `(kernel, ms per step, launches per step, GFLOP/s achieved, holds a contraction)`,
    /// slowest first; the rate is 0 for kernels without arithmetic to count (copies,
    /// gathers).
    pub kernels: Vec<(String, f64, f64, f64, bool)>,
}

/// Runs `f` `repeats` times with the session's kernel profiling on.
fn profiled(
    session: &mut crate::Session,
    step: &str,
    repeats: usize,
    mut f: impl FnMut(&mut crate::Session) -> Result<()>,
) -> Result<ProfiledStep> {
    session.enable_profiling();
    for _ in 0..repeats {
        f(session)?;
    }
    let per = repeats as f64;
    let kernels = session
        .profile()
        .into_iter()
        .map(|(k, t)| {
            let rate = if t.secs > 0.0 { t.flops as f64 / t.secs / 1e9 } else { 0.0 };
            (k, t.secs * 1e3 / per, t.launches as f64 / per, rate, t.contraction)
        })
        .collect();
    Ok(ProfiledStep { step: step.to_string(), kernels })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(repeats: usize, bar: &ProgressBar, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut t = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
        bar.inc(1);
    }
    Ok(median(t))
}

/// The strategies worth a column for this model: every one that applies to some layer.
fn configs(module: &Module, only: &[Strategy]) -> Vec<Option<Strategy>> {
    let mut out = vec![None];
    for s in [Strategy::Naive, Strategy::Crb, Strategy::Unfold, Strategy::Direct, Strategy::Outer, Strategy::Ghost] {
        if !only.is_empty() && !only.contains(&s) {
            continue;
        }
        if module.plans[2].layers.iter().any(|l| l.costs.iter().any(|c| c.strategy == s)) {
            out.push(Some(s));
        }
    }
    out
}

/// What `bench` times.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub batch: usize,
    /// Timed runs per measurement (the median is reported), after one warm-up run.
    pub repeats: usize,
    /// Forced-strategy columns besides the plan's (`auto`): `None` every strategy that
    /// applies to some layer, else only these (empty: the plan alone).
    pub forced: Option<Vec<Strategy>>,
    /// Only the non-private and the clipped-sum steps: no forward-only, norms-only or
    /// per-example-gradient timings.
    pub main_steps: bool,
    pub threads: Option<usize>,
    pub device: Device,
    /// Per-kernel times of the non-private and the `auto` clipped-sum step.
    pub profile: bool,
}

/// Runs the benchmark.
pub fn bench(name: &str, source: &str, opts: &BenchOptions) -> Result<BenchReport> {
    let BenchOptions { batch, repeats, ref forced, main_steps, threads, device, profile } = *opts;
    let base = Module::from_source(name, source, &CompileOptions::new(batch))?;
    let params = base.init_params(0);
    let data = Batch::random(&base.graph, batch, 1);
    let configs = match forced {
        Some(only) if only.is_empty() => vec![None],
        Some(only) => configs(&base, only),
        None => configs(&base, &[]),
    };
    let per_config = if main_steps { 1 } else { 3 };
    let total = ((if main_steps { 1 } else { 2 }) + configs.len() * per_config) as u64 * repeats as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} runs ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut session = base.session(device)?;
    if let Some(why) = session.fallback_reason() {
        log::debug!("bench: no CUDA ({why})");
    }
    if let Some(t) = threads {
        session.set_threads(t);
    }
    bar.set_message("non-private");
    let planned = (session.micro_batch(EntryKind::BatchGrad)?.1, session.outside_bytes(EntryKind::BatchGrad, batch)?);
    let (nonprivate_ms, nonprivate_memory) =
        time_and_memory(repeats, &bar, planned, || session.batch_grad(&params, &data).map(|_| ()))?;
    bar.set_message("forward + loss");
    let loss_ms =
        if main_steps { None } else { Some(time(repeats, &bar, || session.loss(&params, &data).map(|_| ()))?) };
    let mut profiles = Vec::new();
    if profile {
        profiles.push(profiled(&mut session, "non-private batch gradient", repeats, |s| {
            s.batch_grad(&params, &data).map(|_| ())
        })?);
    }
    let description = session.device_description();
    // Its buffers would count in the other steps' peak memory.
    drop(session);
    let mut columns = Vec::new();
    for config in configs {
        let label = config.map_or("auto".to_string(), |s| s.to_string());
        let module = match config {
            None => base.clone(),
            Some(s) => {
                let mut opts = CompileOptions::new(batch);
                opts.overrides = base.plans[2]
                    .layers
                    .iter()
                    .filter(|l| l.costs.iter().any(|c| c.strategy == s))
                    .map(|l| (l.layer.clone(), s))
                    .collect();
                Module::from_source(name, source, &opts)?
            }
        };
        let mut s = module.session(device)?;
        if let Some(t) = threads {
            s.set_threads(t);
        }
        bar.set_message(format!("{label}: clipped sum"));
        let planned = (s.micro_batch(EntryKind::ClippedSum)?.1, s.outside_bytes(EntryKind::ClippedSum, batch)?);
        let (clipped_sum_ms, clipped_sum_memory) =
            time_and_memory(repeats, &bar, planned, || s.clipped_grad_sum(&params, &data, 1.0).map(|_| ()))?;
        bar.set_message(format!("{label}: norms"));
        let norms_ms = if main_steps {
            None
        } else {
            Some(time(repeats, &bar, || s.per_example_norms(&params, &data).map(|_| ()))?)
        };
        bar.set_message(format!("{label}: grads"));
        let grads_ms = if main_steps {
            None
        } else if config == Some(Strategy::Ghost) {
            bar.inc(repeats as u64);
            None
        } else {
            Some(time(repeats, &bar, || s.per_example_grads(&params, &data).map(|_| ()))?)
        };
        if profile && config.is_none() {
            profiles.push(profiled(&mut s, "auto: clipped sum", repeats, |s| {
                s.clipped_grad_sum(&params, &data, 1.0).map(|_| ())
            })?);
        }
        columns.push(Column { config: label, grads_ms, norms_ms, clipped_sum_ms, clipped_sum_memory });
    }
    bar.finish_and_clear();
    let auto = columns.iter().find(|c| c.config == "auto").map(|c| c.clipped_sum_ms);
    let best_forced = columns.iter().filter(|c| c.config != "auto").map(|c| c.clipped_sum_ms).reduce(f64::min);
    let regret = auto.zip(best_forced).map(|(a, b)| a / b);
    Ok(BenchReport {
        model: base.name.clone(),
        batch,
        threads: threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        device: description,
        repeats,
        nonprivate_ms,
        nonprivate_memory,
        loss_ms,
        columns,
        regret,
        profile: profiles,
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{}: batch {}, on {}, median of {} runs (ms; ratio to the non-private step in parentheses)",
            self.model, self.batch, self.device, self.repeats
        )?;
        writeln!(
            f,
            "  non-private batch gradient  {:>9.2}    memory (buffers + outside = planned / peak RSS): {}",
            self.nonprivate_ms, self.nonprivate_memory
        )?;
        if let Some(ms) = self.loss_ms {
            writeln!(f, "  forward + loss only         {ms:>9.2}")?;
        }
        let cell = |ms: f64| format!("{ms:.2} ({:.2}x)", ms / self.nonprivate_ms);
        let mut header = format!("  {:<10}", "config");
        for h in ["clipped sum", "norms", "grads"] {
            header.push_str(&format!(" {h:>18}"));
        }
        header.push_str("   clipped-sum memory (buffers + outside = planned / peak RSS)");
        writeln!(f, "{header}")?;
        for c in &self.columns {
            writeln!(
                f,
                "  {:<10} {:>18} {:>18} {:>18}   {}",
                c.config,
                cell(c.clipped_sum_ms),
                c.norms_ms.map_or("-".to_string(), cell),
                c.grads_ms.map_or("-".to_string(), cell),
                c.clipped_sum_memory
            )?;
        }
        if let Some(r) = self.regret {
            writeln!(f, "  regret of the plan (auto clipped sum / fastest forced column): {r:.2}x")?;
        }
        for p in &self.profile {
            let total: f64 = p.kernels.iter().map(|k| k.1).sum();
            writeln!(f, "  profile, {} ({total:.2} ms in kernels per step):", p.step)?;
            for (name, ms, launches, gflops, _) in p.kernels.iter().take(PROFILE_LINES) {
                let rate = if *gflops > 0.0 { format!("{gflops:>8.1} GFLOP/s") } else { " ".repeat(16) };
                writeln!(f, "    {ms:>9.2} ms {:>5.1}% {rate}  x{launches:<6} {name}", 100.0 * ms / total.max(1e-12))?;
            }
            if p.kernels.len() > PROFILE_LINES {
                let rest: f64 = p.kernels.iter().skip(PROFILE_LINES).map(|k| k.1).sum();
                let more = p.kernels.len() - PROFILE_LINES;
                writeln!(
                    f,
                    "    {rest:>9.2} ms {:>5.1}%  in the {more} other kernels",
                    100.0 * rest / total.max(1e-12)
                )?;
            }
        }
        Ok(())
    }
}
