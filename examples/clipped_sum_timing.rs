//! Times `Session::clipped_grad_sum` through the Rust API: the baseline that the Python
//! package's overhead is measured against (`python/bench/clipped_sum_timing.py` times the
//! same call from Python). Prints the median of the timed calls.
//!
//! Run: `cargo run --release --example clipped_sum_timing [MODEL.pdg] [BATCH] [THREADS] [CALLS]`
//! (defaults: samples/mnist_cnn.pdg 128 2 30).

use std::time::Instant;

use pdgc::{Batch, CompileOptions, Device, Module};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "samples/mnist_cnn.pdg".into());
    let batch: usize = args.next().map_or(Ok(128), |s| s.parse())?;
    let threads: usize = args.next().map_or(Ok(2), |s| s.parse())?;
    let calls: usize = args.next().map_or(Ok(30), |s| s.parse())?;
    let source = std::fs::read_to_string(&path)?;
    let module = Module::from_source(&path, &source, &CompileOptions::new(batch))?;
    let mut session = module.session(Device::Cpu)?;
    session.set_threads(threads);
    let params = module.init_params(0);
    let data = Batch::random(&module.graph, batch, 1);
    for _ in 0..3 {
        session.clipped_grad_sum(&params, &data, 1.0)?; // Warm-up.
    }
    let mut times: Vec<f64> = (0..calls)
        .map(|_| {
            let t = Instant::now();
            session.clipped_grad_sum(&params, &data, 1.0).map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    println!(
        "rust clipped_grad_sum {path} B={batch} threads={threads}: median {:.3} ms over {calls} calls",
        times[calls / 2] * 1e3
    );
    Ok(())
}
