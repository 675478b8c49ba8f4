//! Compile a model, make a batch, and compute per-example gradients, norms and a clipped
//! sum — the library API in a few lines.
//!
//! Run: `cargo run --release --example per_example_grads [samples/mnist_cnn.pdg]`

use pdgc::{Batch, CompileOptions, Device, Module};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "samples/mnist_cnn.pdg".into());
    let source = std::fs::read_to_string(&path)?;
    let module = Module::from_source(&path, &source, &CompileOptions::new(32))?;
    let mut session = module.session(Device::Auto)?;

    let params = module.init_params(42); // or pdgc::Params::load(path, &module.graph)?
    let batch = Batch::random(&module.graph, 8, 7); // or pdgc::Batch::load(path, &module.graph)?

    let grads = session.per_example_grads(&params, &batch)?;
    for (name, g) in &grads {
        println!("{name:<16} {:?}", g.shape);
    }
    let norms = session.per_example_norms(&params, &batch)?;
    println!("per-example gradient norms: {norms:?}");
    let step = session.clipped_grad_sum(&params, &batch, 1.0)?;
    let total: f32 = step.sum.values().flat_map(|t| t.data.iter()).map(|x| x * x).sum::<f32>().sqrt();
    println!("clipped sum norm (≤ batch size · C = 8): {total:.4}");
    Ok(())
}
