//! One DP-SGD step (clip, sum, noise, SGD update) of a model on a random batch, under the
//! default memory budget (this machine's available memory) or a given one: shows the
//! micro-batch the session chose, the step's wall time and the process's peak RSS. The
//! memory check for large models (VGG16 at B = 64 on a 23 GiB machine).
//!
//! Run: `cargo run --release --example dp_step [MODEL.pdg] [BATCH] [THREADS] [BUDGET_BYTES]`
//! (defaults: samples/mnist_cnn.pdg 64 2, the default budget).

use std::time::Instant;

use pdgc::lower::EntryKind;
use pdgc::memory::{human_bytes, peak_rss};
use pdgc::{Batch, CompileOptions, Device, DpSettings, Module, Optimizer, OptimizerState};
use rand::SeedableRng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "samples/mnist_cnn.pdg".into());
    let batch: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let threads: usize = args.next().map_or(Ok(2), |s| s.parse())?;
    let budget: Option<u64> = args.next().map(|s| s.parse()).transpose()?;
    let source = std::fs::read_to_string(&path)?;
    let module = Module::from_source(&path, &source, &CompileOptions::new(batch))?;
    let mut session = module.session(Device::Cpu)?;
    session.set_threads(threads);
    if let Some(bytes) = budget {
        session.set_memory_budget(bytes);
    }
    let (micro, bytes) = session.micro_batch(EntryKind::ClippedSum)?;
    println!(
        "{path} B={batch}: memory budget {}, clipped-sum runs of {micro} examples ({} of buffers each)",
        human_bytes(session.memory_budget()),
        human_bytes(bytes)
    );
    let mut params = module.init_params(0);
    let data = Batch::random(&module.graph, batch, 1);
    let dp = DpSettings { clip: 1.0, noise_multiplier: 1.0, expected_batch: batch as f64 };
    let optimizer = Optimizer::Sgd { lr: 0.01, momentum: 0.0 };
    let mut state = OptimizerState::default();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0);
    let start = Instant::now();
    let report = session.dp_sgd_step(&mut params, &data, &dp, &optimizer, &mut state, &mut rng)?;
    let seconds = start.elapsed().as_secs_f64();
    let mean_loss = report.losses.iter().map(|&l| f64::from(l)).sum::<f64>() / report.losses.len().max(1) as f64;
    println!(
        "one DP-SGD step: {seconds:.1} s, mean loss {mean_loss:.4}, {:.0}% of examples clipped, peak RSS {}",
        100.0 * report.clipped_fraction,
        peak_rss().map_or_else(|| "unknown".into(), human_bytes)
    );
    Ok(())
}
