//! The `pdgc` command line: one subcommand per job, each a thin layer over the library's
//! stage functions.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};

use pdgc::diag::{render, Severity};
use pdgc::ops::Strategy;
use pdgc::plan::{self, DeviceProfile, Goal, PlanOptions};
use pdgc::report::check_report;

#[derive(Parser)]
#[command(name = "pdgc", version, about = "A compiler for per-example gradients (DP-SGD) of CNNs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// A pipeline stage's IR, for `--dump`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LossArg {
    CrossEntropy,
    Mse,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stage {
    Ast,
    Graph,
    Grads,
    Plan,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Batch size (examples per step).
    #[arg(long, short, default_value_t = 32)]
    batch: usize,
    /// Device profile: a built-in name (h200, h100, cpu2) or a profile JSON file.
    #[arg(long, default_value = "h200")]
    device: String,
    /// Memory budget, e.g. 8G, 512M, 1.5GiB or plain bytes (default: the device's memory).
    #[arg(long, value_parser = parse_bytes)]
    memory_budget: Option<u64>,
    /// What the per-example work is for.
    #[arg(long, value_enum, default_value_t = Goal::ClippedSum)]
    goal: Goal,
    /// Force strategies: `layer=strategy,...` (beats the cost model and `@strategy`).
    #[arg(long, value_delimiter = ',', value_parser = parse_override)]
    strategy: Vec<(String, Strategy)>,
}

/// `pdgc privacy`: one of σ or a target ε, one way to give q, one way to give T.
#[derive(clap::Args)]
#[command(group(ArgGroup::new("given").required(true).args(["noise", "epsilon"])))]
#[command(group(ArgGroup::new("rate").required(true).args(["sample_rate", "batch"])))]
#[command(group(ArgGroup::new("length").required(true).args(["steps", "epochs"])))]
struct PrivacyArgs {
    /// Noise multiplier σ (noise std / clip norm): print the ε it spends.
    #[arg(long, allow_negative_numbers = true)]
    noise: Option<f64>,
    /// Target ε: print the smallest σ that stays within it.
    #[arg(long, allow_negative_numbers = true)]
    epsilon: Option<f64>,
    /// Poisson sampling rate q: the probability that a step uses a given example.
    #[arg(long, allow_negative_numbers = true)]
    sample_rate: Option<f64>,
    /// Expected batch size B, with --dataset-size N instead of --sample-rate (q = B/N).
    #[arg(long, requires = "dataset_size")]
    batch: Option<u64>,
    /// Dataset size N (with --batch).
    #[arg(long, requires = "batch")]
    dataset_size: Option<u64>,
    /// Number of steps T.
    #[arg(long)]
    steps: Option<u64>,
    /// Number of epochs E instead of --steps (T = ceil(E/q)).
    #[arg(long, allow_negative_numbers = true)]
    epochs: Option<f64>,
    /// The δ of the (ε, δ) guarantee.
    #[arg(long, default_value_t = 1e-5, allow_negative_numbers = true)]
    delta: f64,
    /// The accountant: pld (privacy loss distributions, tight) or rdp (Rényi DP, as Opacus).
    #[arg(long, value_enum, default_value_t = AccountantArg::Pld)]
    accountant: AccountantArg,
    /// The PLD accountant's loss grid spacing h: finer is tighter and slower.
    #[arg(long, default_value_t = pdgc::pld::DEFAULT_DISCRETIZATION, allow_negative_numbers = true)]
    discretization: f64,
    /// Output format (json prints both accountants' ε).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// `--accountant`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AccountantArg {
    /// Privacy loss distributions: numerical, an upper bound within about 10⁻⁴ of the exact ε.
    Pld,
    /// Rényi DP converted to (ε, δ), exactly as Opacus' RDPAccountant.
    Rdp,
}

impl AccountantArg {
    fn accountant(self) -> pdgc::privacy::Accountant {
        match self {
            AccountantArg::Pld => pdgc::privacy::Accountant::Pld,
            AccountantArg::Rdp => pdgc::privacy::Accountant::Rdp,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Parse and shape-check .pdg files; print each model's layers, parameters and FLOPs.
    Check {
        /// The .pdg files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Treat warnings as errors.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Show the per-layer strategy plan: cost-model estimates, runner-up and why.
    Explain {
        file: PathBuf,
        #[command(flatten)]
        plan: PlanArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Also draw every strategy's estimated time per layer into this SVG file.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Print an intermediate IR instead of the table.
        #[arg(long, value_enum)]
        dump: Option<Stage>,
    },
    /// Compile a model into a module file (plan + kernels), or print a stage's IR.
    Compile {
        file: PathBuf,
        #[command(flatten)]
        plan: PlanArgs,
        /// Write the module here (e.g. net.pdgm).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Artifacts to embed in the module for inspection: plan, kernels, clif.
        #[arg(long, value_delimiter = ',', default_value = "plan,kernels")]
        emit: Vec<Emit>,
        /// Print an IR instead of (or as well as) writing a module.
        #[arg(long, value_enum)]
        dump: Option<DumpStage>,
    },
    /// Import an ONNX model (as torch.onnx.export writes it): write a .pdg file and, beside it,
    /// its weights as safetensors under their PyTorch names.
    Import {
        /// The .onnx file.
        file: PathBuf,
        /// The .pdg file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// The weights file (default: OUTPUT with the extension .safetensors).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// The loss to add: cross-entropy (the output is [K] logits; the label is a class
        /// index) or mse (the label is a real-valued target shaped like the output).
        #[arg(long, value_enum, default_value_t = LossArg::CrossEntropy)]
        loss: LossArg,
        /// Write only the .pdg file (e.g. for a weight-free export whose external data is absent).
        #[arg(long, conflicts_with = "weights")]
        no_weights: bool,
    },
    /// Write PyTorch-default initial parameters of a model as safetensors.
    Init {
        /// A .pdg file or a compiled .pdgm module.
        file: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Compute per-example gradients (and norms, losses, clipped sums) of a batch.
    Grads {
        /// A .pdg file or a compiled .pdgm module.
        file: PathBuf,
        /// Parameters (safetensors, PyTorch names).
        #[arg(long)]
        params: PathBuf,
        /// The batch (safetensors): the model's inputs by name, the label (int64/int32).
        #[arg(long)]
        batch: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Only the per-example norms and losses.
        #[arg(long)]
        norms_only: bool,
        /// Also the clipped sum Σ_n min(1, C/norm_n) g_n as `clipped_sum.NAME`.
        #[arg(long)]
        clip: Option<f32>,
        /// Force strategies: `layer=strategy,...`.
        #[arg(long, value_delimiter = ',', value_parser = parse_override)]
        strategy: Vec<(String, Strategy)>,
        /// Run on the kernel-IR interpreter instead of the JIT (slow; for checking).
        #[arg(long, conflicts_with = "device")]
        interpreter: bool,
        /// Where to run: auto (CUDA if usable, else the CPU), cpu, cuda, interpreter.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// Memory for the run's buffers, e.g. 8G (default: 90% of the available memory);
        /// a batch that needs more runs in micro-batches.
        #[arg(long, value_parser = parse_bytes)]
        memory_budget: Option<u64>,
    },
    /// Time the non-private step and every strategy's per-example step.
    Bench {
        file: PathBuf,
        #[arg(long, short, default_value_t = 128)]
        batch: usize,
        /// Runs per measurement (the median is reported).
        #[arg(long, default_value_t = 10)]
        repeats: usize,
        /// Only these forced strategies (default: all that apply).
        #[arg(long, value_delimiter = ',', value_parser = parse_strategy)]
        strategy: Vec<Strategy>,
        /// No forced strategies: only the cost model's plan.
        #[arg(long, conflicts_with = "strategy")]
        auto_only: bool,
        /// Only the non-private and the clipped-sum steps (not the forward pass, the
        /// norms-only or the per-example-gradient steps).
        #[arg(long)]
        main_steps: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Where to run: auto (CUDA if usable, else the CPU), cpu, cuda, interpreter.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Also time every kernel of the non-private step and of the auto plan's clipped
        /// sum, and print where the time goes (the 12 largest, then the rest summed; JSON
        /// output lists every kernel).
        #[arg(long)]
        profile: bool,
    },
    /// DP-SGD privacy accounting (PLD, or RDP as Opacus): ε spent by σ, or σ for a target ε.
    Privacy(PrivacyArgs),
    /// Measure this machine with the CPU backend's kernels and write a device profile
    /// (for `explain`/`compile --device FILE`).
    Calibrate {
        /// Where to write the profile JSON (default: profile-<host>.json here).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Worker threads, as a session uses them (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Small sizes, a few seconds: checks the machinery, the numbers mean little.
        #[arg(long)]
        quick: bool,
    },
    /// Train a model with DP-SGD (or without privacy, for a baseline) on Fashion-MNIST.
    Train(TrainArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SamplingKind {
    /// Each example independently with rate q (what the accountant assumes).
    Poisson,
    /// A random permutation per epoch, cut into batches of exactly --batch.
    Shuffle,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// The model (.pdg): one [1, 28, 28] input, a 10-class label.
    file: PathBuf,
    /// `fashion-mnist` (Debian's /usr/share/datasets/fashion-mnist) or `fashion-mnist:DIR`.
    #[arg(long)]
    data: String,
    /// Total epochs (an epoch is 1/q steps under Poisson sampling).
    #[arg(long, default_value_t = 10)]
    epochs: u64,
    /// Expected batch size (Poisson: q = B/N), or the exact batch with --sampling shuffle.
    #[arg(long, conflicts_with = "sample_rate")]
    batch: Option<usize>,
    /// The Poisson sampling rate q (instead of --batch).
    #[arg(long)]
    sample_rate: Option<f64>,
    /// How batches are drawn.
    #[arg(long, value_enum, default_value_t = SamplingKind::Poisson)]
    sampling: SamplingKind,
    /// Learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f32,
    /// SGD momentum (PyTorch semantics).
    #[arg(long, conflicts_with = "adam")]
    momentum: Option<f32>,
    /// Adam (β = 0.9, 0.999, ε = 1e-8) instead of SGD.
    #[arg(long)]
    adam: bool,
    /// Per-example clip norm C.
    #[arg(long)]
    clip: Option<f32>,
    /// Noise multiplier σ (the noise's std is σ·C).
    #[arg(long, conflicts_with = "epsilon")]
    noise: Option<f64>,
    /// Target ε for the whole run: σ is chosen to spend exactly this.
    #[arg(long)]
    epsilon: Option<f64>,
    /// δ of the (ε, δ) guarantee.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// The accountant for ε and --epsilon: pld or rdp (a resume must use the checkpoint's).
    #[arg(long, value_enum, default_value_t = AccountantArg::Pld)]
    accountant: AccountantArg,
    /// Seed of every random stream (default: drawn from the OS and kept in the checkpoint).
    #[arg(long)]
    seed: Option<u64>,
    /// Write a checkpoint into this directory after every epoch.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Continue the run checkpointed in this directory (same settings; --epochs may grow).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Train without clipping or noise: the non-private baseline.
    #[arg(long, conflicts_with_all = ["clip", "noise", "epsilon"])]
    non_private: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to run: auto (CUDA if usable, else the CPU), cpu, cuda, interpreter, cuda-host.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Physical batch: the logical batch is cut into micro-batches of this size.
    #[arg(long, default_value_t = 256)]
    micro_batch: usize,
}

/// `--device`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
    Interpreter,
    /// The CUDA C compiled for this CPU (checks the CUDA backend without a GPU; slow).
    CudaHost,
}

impl DeviceArg {
    fn device(self) -> pdgc::Device {
        match self {
            DeviceArg::Auto => pdgc::Device::Auto,
            DeviceArg::Cpu => pdgc::Device::Cpu,
            DeviceArg::Cuda => pdgc::Device::Cuda,
            DeviceArg::Interpreter => pdgc::Device::Interpreter,
            DeviceArg::CudaHost => pdgc::Device::CudaHost,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Emit {
    Plan,
    Kernels,
    Clif,
    /// The CUDA C module NVRTC compiles.
    Cuda,
}

/// A stage for `compile --dump`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DumpStage {
    Ast,
    Graph,
    Grads,
    Plan,
    Kernels,
    Clif,
    /// The CUDA C module (what NVRTC compiles).
    Cuda,
}

fn parse_strategy(s: &str) -> Result<Strategy, String> {
    Strategy::from_name(s.trim()).ok_or_else(|| {
        let names: Vec<&str> = Strategy::ALL.iter().map(|s| s.name()).collect();
        format!("unknown strategy `{s}` (one of {})", names.join(", "))
    })
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size (try 8G, 512M or 1000000)"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("unknown unit `{unit}` in `{s}` (use K, M, G, T, KiB, MiB or GiB)")),
    };
    if !(value > 0.0) || !value.is_finite() {
        return Err(format!("`{s}` must be a positive size"));
    }
    Ok((value * scale) as u64)
}

fn parse_override(s: &str) -> Result<(String, Strategy), String> {
    let (layer, strategy) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected LAYER=STRATEGY"))?;
    let st = Strategy::from_name(strategy.trim()).ok_or_else(|| {
        let names: Vec<&str> = Strategy::ALL.iter().map(|s| s.name()).collect();
        format!("unknown strategy `{strategy}` (one of {})", names.join(", "))
    })?;
    Ok((layer.trim().to_string(), st))
}

fn main() -> ExitCode {
    // Debug output (e.g. why `--device auto` fell back to the CPU): PDGC_LOG=debug.
    env_logger::Builder::from_env(env_logger::Env::new().filter("PDGC_LOG")).format_timestamp(None).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files, format, deny_warnings } => check(&files, format, deny_warnings),
        Command::Explain { file, plan, format, plot, dump } => {
            run(|| explain(&file, &plan, format, plot.as_deref(), dump))
        }
        Command::Compile { file, plan, output, emit, dump } => {
            run(|| compile(&file, &plan, output.as_deref(), &emit, dump))
        }
        Command::Import { file, output, weights, loss, no_weights } => {
            run(|| import(&file, &output, weights, loss, no_weights))
        }
        Command::Init { file, output, seed } => run(|| {
            let module = load_module(&file, &PlanArgs::default())?;
            module.init_params(seed).save(&output).map_err(|e| e.to_string())?;
            eprintln!("wrote {} ({} parameters)", output.display(), module.graph.param_count());
            Ok(())
        }),
        Command::Grads {
            file,
            params,
            batch,
            output,
            norms_only,
            clip,
            strategy,
            interpreter,
            device,
            memory_budget,
        } => {
            let device = if interpreter { pdgc::Device::Interpreter } else { device.device() };
            run(|| grads(&file, &params, &batch, &output, norms_only, clip, strategy, device, memory_budget))
        }
        Command::Bench { file, batch, repeats, strategy, auto_only, main_steps, threads, device, format, profile } => {
            run(|| {
                let name = file.display().to_string();
                let src = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {name}: {e}"))?;
                if batch == 0 || repeats == 0 {
                    return Err("--batch and --repeats must be at least 1".into());
                }
                let forced = match (auto_only, strategy.is_empty()) {
                    (true, _) => Some(Vec::new()),
                    (false, true) => None,
                    (false, false) => Some(strategy),
                };
                let opts = pdgc::bench::BenchOptions {
                    batch,
                    repeats,
                    forced,
                    main_steps,
                    threads,
                    device: device.device(),
                    profile,
                };
                let report = pdgc::bench::bench(&name, &src, &opts).map_err(|e| e.to_string())?;
                match format {
                    Format::Text => print!("{report}"),
                    Format::Json => println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?),
                }
                Ok(())
            })
        }
        Command::Privacy(args) => run(|| privacy(&args)),
        Command::Train(args) => run(|| train(&args)),
        Command::Calibrate { output, threads, quick } => run(|| calibrate(output, threads, quick)),
    }
}

fn calibrate(output: Option<PathBuf>, threads: Option<usize>, quick: bool) -> Result<(), String> {
    use pdgc::calibrate as cal;
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let output = output.unwrap_or_else(cal::default_output);
    let name = format!("{}-{threads}t{}", cal::host_name(), if quick { "-quick" } else { "" });
    let opts = cal::CalibrateOptions { threads, quick, name };
    cal::check_output_dir(&output).map_err(|e| e.to_string())?;
    eprintln!("calibrating {} on {threads} thread(s){}", opts.name, if quick { " (quick sizes)" } else { "" });
    let result = cal::calibrate(&opts, &mut |line| eprintln!("  {line}")).map_err(|e| e.to_string())?;
    cal::write_profile(&result.profile, &output).map_err(|e| e.to_string())?;
    print!("{}", cal::summary(&result.profile));
    println!("wrote {}", output.display());
    println!("use it: pdgc explain net.pdg --device {}", output.display());
    Ok(())
}

fn train(args: &TrainArgs) -> Result<(), String> {
    use pdgc::train::{Privacy, TrainConfig, Trainer};
    let e = |e: pdgc::Error| e.to_string();
    let dir = pdgc::data::parse_data_spec(&args.data).map_err(e)?;
    if args.micro_batch == 0 {
        return Err("--micro-batch must be at least 1".into());
    }
    let name = args.file.display().to_string();
    let src = std::fs::read_to_string(&args.file).map_err(|err| format!("cannot read {name}: {err}"))?;
    let module = pdgc::Module::from_source(&name, &src, &pdgc::CompileOptions::new(args.micro_batch)).map_err(e)?;
    let data = pdgc::data::load_fashion_mnist(&dir).map_err(e)?;
    let n = data.train.len();
    let sampling = match (args.sampling, args.batch, args.sample_rate) {
        (SamplingKind::Poisson, _, Some(rate)) => pdgc::Sampling::Poisson { rate },
        (SamplingKind::Poisson, batch, None) => {
            pdgc::Sampling::Poisson { rate: batch.unwrap_or(256) as f64 / n as f64 }
        }
        (SamplingKind::Shuffle, Some(batch), _) => pdgc::Sampling::Shuffle { batch },
        (SamplingKind::Shuffle, None, _) => return Err("--sampling shuffle needs --batch B".into()),
    };
    let optimizer = if args.adam {
        pdgc::Optimizer::adam(args.lr)
    } else {
        pdgc::Optimizer::Sgd { lr: args.lr, momentum: args.momentum.unwrap_or(0.0) }
    };
    let privacy = if args.non_private {
        Privacy::NonPrivate
    } else {
        let clip = args.clip.ok_or("--clip C is required (or --non-private for the baseline)")?;
        let noise_multiplier = match (args.noise, args.epsilon) {
            (Some(sigma), _) => sigma,
            (None, Some(eps)) => {
                sampling.validate(n).map_err(e)?;
                let accountant = args.accountant.accountant();
                let sigma = pdgc::train::noise_for_epsilon(eps, &sampling, n, args.epochs, args.delta, accountant)
                    .map_err(e)?;
                eprintln!(
                    "noise multiplier σ = {sigma:.4} spends at most ε = {eps} at δ = {:e} over {} epochs ({accountant})",
                    args.delta, args.epochs
                );
                sigma
            }
            (None, None) => return Err("--noise σ or --epsilon ε is required (or --non-private)".into()),
        };
        Privacy::Private { clip, noise_multiplier, delta: args.delta, accountant: args.accountant.accountant() }
    };
    let seed = match (args.seed, &args.resume) {
        (Some(s), _) => s,
        (None, Some(dir)) => resume_seed(dir)?,
        (None, None) => rand::random::<u64>(),
    };
    let config = TrainConfig { epochs: args.epochs, sampling, optimizer, privacy, seed, micro_batch: args.micro_batch };
    let mut trainer = match &args.resume {
        Some(dir) => Trainer::resume_on(&module, config, &data.train, dir, args.device.device()).map_err(e)?,
        None => Trainer::new_on(&module, config, &data.train, args.device.device()).map_err(e)?,
    };
    if let Some(t) = args.threads {
        trainer.set_threads(t);
    }
    eprintln!("running on {}", trainer.session().device_description());
    if let Some(why) = trainer.session().fallback_reason() {
        log::debug!("train: no CUDA ({why})");
    }
    trainer.progress = true;
    let steps = trainer.config.sampling.steps_per_epoch(n);
    eprintln!(
        "{}: {} training / {} test examples, {} steps per epoch, expected batch {:.1}, micro-batch {}{}",
        module.name,
        n,
        data.test.len(),
        steps,
        trainer.config.sampling.expected_batch(n),
        args.micro_batch,
        if trainer.epochs_done > 0 { format!(", resuming after epoch {}", trainer.epochs_done) } else { String::new() }
    );
    let summary = trainer
        .run(&data.train, &data.test, args.checkpoint.as_deref(), |r| {
            println!("{r}");
        })
        .map_err(e)?;
    println!("{summary}");
    Ok(())
}

/// The seed stored in a checkpoint's state.json (for a resume without --seed).
fn resume_seed(dir: &Path) -> Result<u64, String> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("checkpoint {}: unreadable state.json: {e}", dir.display()))?;
    v["config"]["seed"].as_u64().ok_or_else(|| format!("checkpoint {}: state.json has no seed", dir.display()))
}

impl Default for PlanArgs {
    fn default() -> Self {
        PlanArgs { batch: 32, device: "cpu2".into(), memory_budget: None, goal: Goal::ClippedSum, strategy: Vec::new() }
    }
}

/// A `.pdgm` module file, or a `.pdg` source compiled with `args`.
fn load_module(path: &Path, args: &PlanArgs) -> Result<pdgc::Module, String> {
    if path.extension().is_some_and(|e| e == "pdgm") {
        return pdgc::Module::load(path).map_err(|e| e.to_string());
    }
    let (_, graph) = front(path)?;
    let opts = plan_options(args, &graph)?;
    let src = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let options = pdgc::CompileOptions {
        batch: opts.batch,
        device: opts.device,
        memory_budget: opts.memory_budget,
        overrides: opts.overrides,
        chunk_bytes: pdgc::lower::CHUNK_BYTES,
        private_bytes: pdgc::lower::PRIVATE_COLUMN_BYTES,
    };
    pdgc::Module::from_source(&path.display().to_string(), &src, &options).map_err(|e| e.to_string())
}

fn artifacts(module: &pdgc::Module, emit: &[Emit]) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for e in emit {
        match e {
            Emit::Plan => {
                out.insert("plan".to_string(), module.plan(Goal::ClippedSum).to_string());
            }
            Emit::Kernels => {
                out.insert("kernels".to_string(), module.program.to_string());
            }
            Emit::Clif => {
                out.insert("clif".to_string(), clif_text(module)?);
            }
            Emit::Cuda => {
                out.insert("cuda".to_string(), cuda_text(module)?);
            }
        }
    }
    Ok(out)
}

fn cuda_text(module: &pdgc::Module) -> Result<String, String> {
    pdgc_codegen::cuda::render_module_for(&module.program.kernels, Some(module.options.batch as u64))
        .map(|m| m.source)
        .map_err(|e| e.to_string())
}

fn clif_text(module: &pdgc::Module) -> Result<String, String> {
    let backend = pdgc_codegen::cpu::CpuBackend::new().map_err(|e| e.to_string())?;
    let mut text = String::new();
    for k in &module.program.kernels {
        text.push_str(&backend.clif_text(k).map_err(|e| e.to_string())?);
        text.push('\n');
    }
    Ok(text)
}

fn compile(
    path: &Path,
    args: &PlanArgs,
    output: Option<&Path>,
    emit: &[Emit],
    dump: Option<DumpStage>,
) -> Result<(), String> {
    let early = match dump {
        Some(DumpStage::Ast) => Some(Stage::Ast),
        Some(DumpStage::Graph) => Some(Stage::Graph),
        Some(DumpStage::Grads) => Some(Stage::Grads),
        Some(DumpStage::Plan) if output.is_none() => Some(Stage::Plan),
        _ => None,
    };
    if let Some(stage) = early {
        return explain(path, args, Format::Text, None, Some(stage));
    }
    let mut args_batch = PlanArgs {
        batch: args.batch,
        device: args.device.clone(),
        memory_budget: args.memory_budget,
        goal: args.goal,
        strategy: args.strategy.clone(),
    };
    if args_batch.device == "h200" && output.is_some() {
        // Modules run on the CPU JIT for now: plan for this machine unless told otherwise.
        args_batch.device = "cpu2".into();
    }
    let module = load_module(path, &args_batch)?;
    match dump {
        Some(DumpStage::Plan) => print!("{}", module.plan(Goal::ClippedSum)),
        Some(DumpStage::Kernels) => print!("{}", module.program),
        Some(DumpStage::Clif) => print!("{}", clif_text(&module)?),
        Some(DumpStage::Cuda) => print!("{}", cuda_text(&module)?),
        _ => {}
    }
    if let Some(out) = output {
        module.save(out, artifacts(&module, emit)?).map_err(|e| e.to_string())?;
        eprintln!(
            "wrote {} ({} kernels, max batch {}, planned for {})",
            out.display(),
            module.program.kernels.len(),
            module.options.batch,
            module.options.device.name
        );
        eprint!("{}", planned_memory(&module));
    }
    Ok(())
}

/// The buffer plan's arena per step at the module's batch (the host memory a session holds
/// for its buffers, before any memory budget cuts the batch into micro-batches), and what
/// the step holds outside it (the caller's parameters, the results read out).
fn planned_memory(module: &pdgc::Module) -> String {
    let batch = module.options.batch as u64;
    let h = pdgc::memory::human_bytes;
    let steps: Vec<String> = pdgc::memory::planned(&module.graph, &module.program, batch)
        .into_iter()
        .map(|(kind, bytes)| {
            let outside = pdgc::memory::outside(&module.program, kind, batch, batch);
            format!("{} {} + {}", kind.name(), h(bytes), h(outside))
        })
        .collect();
    format!(
        "host memory per step at batch {}, buffers + outside them (the parameters, the results read out): {}\n",
        batch,
        steps.join(", ")
    )
}

#[allow(clippy::too_many_arguments)]
fn grads(
    file: &Path,
    params: &Path,
    batch: &Path,
    output: &Path,
    norms_only: bool,
    clip: Option<f32>,
    strategy: Vec<(String, Strategy)>,
    device: pdgc::Device,
    memory_budget: Option<u64>,
) -> Result<(), String> {
    // Read the batch first to size the module (a `.pdg` file's graph is all it takes).
    let probe = if file.extension().is_some_and(|e| e == "pdgm") {
        Some(load_module(file, &PlanArgs::default())?)
    } else {
        None
    };
    let graph = match &probe {
        Some(m) => std::sync::Arc::clone(&m.graph),
        None => std::sync::Arc::new(front(file)?.1),
    };
    let data = pdgc::Batch::load(batch, &graph).map_err(|e| e.to_string())?;
    let b = data.size().map_err(|e| e.to_string())?;
    let module = if let Some(probe) = probe {
        if b > probe.options.batch {
            return Err(pdgc::Error::BatchTooLarge { batch: b, max: probe.options.batch }.to_string());
        }
        probe
    } else {
        // An empty batch is valid (empty per-example outputs, a zero clipped sum), but a module
        // is compiled for at least one example.
        load_module(file, &PlanArgs { batch: b.max(1), device: "cpu2".into(), strategy, ..PlanArgs::default() })?
    };
    let p = pdgc::Params::load(params, &module.graph).map_err(|e| e.to_string())?;
    let mut session = module.session(device).map_err(|e| e.to_string())?;
    if let Some(bytes) = memory_budget {
        session.set_memory_budget(bytes);
    }
    eprintln!("running on {}", session.device_description());
    if let Some(why) = session.fallback_reason() {
        eprintln!("  (no CUDA: {why})");
    }
    let e = |e: pdgc::Error| e.to_string();
    // Every output's shape is known before any run, so the file is written as the runs
    // produce it: per-example gradients never need to fit in memory at once.
    let mut shapes: std::collections::BTreeMap<String, Vec<usize>> =
        [("loss".to_string(), vec![b]), ("norms".to_string(), vec![b])].into();
    for param in &module.graph.params {
        if !norms_only {
            shapes.insert(param.name.clone(), [vec![b], param.shape.clone()].concat());
        }
        if clip.is_some() {
            shapes.insert(format!("clipped_sum.{}", param.name), param.shape.clone());
        }
    }
    let mut out = pdgc::stream::StreamWriter::create(output, &shapes).map_err(e)?;
    let (micro, arena) = session
        .micro_batch(match (norms_only, clip) {
            (false, _) => pdgc::lower::EntryKind::PerExampleGrads,
            (true, Some(_)) => pdgc::lower::EntryKind::ClippedSum,
            (true, None) => pdgc::lower::EntryKind::PerExampleNorms,
        })
        .map_err(e)?;
    if micro < b {
        eprintln!(
            "running in micro-batches of {micro} ({} of buffers each; memory budget {})",
            pdgc::memory::human_bytes(arena),
            pdgc::memory::human_bytes(session.memory_budget())
        );
    }
    // The norms step computes the losses too, and the clipped-sum step both: one step gives
    // what `--norms-only` asks for.
    if let Some(c) = clip {
        let cs = session.clipped_grad_sum(&p, &data, c).map_err(e)?;
        out.write("loss", &cs.loss).map_err(e)?;
        out.write("norms", &cs.norms).map_err(e)?;
        for (name, t) in cs.sum {
            out.write(&format!("clipped_sum.{name}"), &t.data).map_err(e)?;
        }
    } else {
        let (norms, loss) = session.per_example_norms_and_loss(&p, &data).map_err(e)?;
        out.write("loss", &loss).map_err(e)?;
        out.write("norms", &norms).map_err(e)?;
    }
    if !norms_only {
        session
            .per_example_grads_each(&p, &data, |start, part| {
                for (name, t) in part {
                    out.write_rows(&name, start, &t.data)?;
                }
                Ok(())
            })
            .map_err(e)?;
    }
    out.finish().map_err(e)?;
    eprintln!("wrote {} ({} examples, {} tensors)", output.display(), b, shapes.len());
    Ok(())
}

fn privacy(args: &PrivacyArgs) -> Result<(), String> {
    let q = match (args.sample_rate, args.batch, args.dataset_size) {
        (Some(q), _, _) => q,
        (None, Some(_), Some(0)) => return Err("--dataset-size must be at least 1".into()),
        (None, Some(b), Some(n)) => b as f64 / n as f64,
        _ => return Err("give --sample-rate, or --batch with --dataset-size".into()),
    };
    let steps = match (args.steps, args.epochs) {
        (Some(t), _) => t,
        (None, Some(e)) => epochs_to_steps(e, q, args.batch.zip(args.dataset_size))?,
        (None, None) => return Err("give --steps or --epochs".into()),
    };
    let err = |e: pdgc::Error| e.to_string();
    let accountant = args.accountant.accountant();
    let sigma = match (args.noise, args.epsilon) {
        (Some(sigma), _) => sigma,
        (None, Some(target)) => accountant.noise_multiplier(target, q, steps, args.delta).map_err(err)?,
        (None, None) => return Err("give --noise or --epsilon".into()),
    };
    let pld = |sigma: f64| pdgc::pld::epsilon_with(sigma, q, steps, args.delta, args.discretization);
    let chosen = match accountant {
        pdgc::privacy::Accountant::Pld => pld(sigma),
        pdgc::privacy::Accountant::Rdp => accountant.epsilon(sigma, q, steps, args.delta),
    }
    .map_err(err)?;
    let tolerance = match accountant {
        pdgc::privacy::Accountant::Pld => format!("σ within {}", pdgc::pld::SIGMA_TOLERANCE),
        pdgc::privacy::Accountant::Rdp => format!("ε within {}", pdgc::privacy::EPSILON_TOLERANCE),
    };
    match args.format {
        Format::Text => {
            if let Some(target) = args.epsilon {
                println!("target epsilon    {target} ({tolerance})");
            }
            println!("noise multiplier  {sigma}");
            println!("sample rate       {q}");
            println!("steps             {steps}");
            println!("delta             {:e}", args.delta);
            println!("accountant        {accountant}");
            println!("epsilon           {chosen:.4}");
            if accountant == pdgc::privacy::Accountant::Rdp {
                let spent = pdgc::privacy::epsilon(sigma, q, steps, args.delta).map_err(err)?;
                println!("best RDP order    {}", spent.best_order);
            }
        }
        Format::Json => {
            // Both accountants; the one not chosen is null where it refuses the arguments
            // (RDP accepts σ = 0 and q = 0, PLD does not).
            let pld = pld(sigma).ok();
            let rdp = pdgc::privacy::epsilon(sigma, q, steps, args.delta).ok();
            let json = serde_json::json!({
                "target_epsilon": args.epsilon,
                "noise_multiplier": sigma,
                "sample_rate": q,
                "steps": steps,
                "delta": args.delta,
                "accountant": accountant.name(),
                "epsilon": chosen,
                "epsilon_pld": pld,
                "epsilon_rdp": rdp.map(|s| s.epsilon),
                "best_order": rdp.map(|s| s.best_order),
            });
            println!("{}", serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?);
        }
    }
    Ok(())
}

/// T = ceil(E/q), with E·N/B when q = B/N so that a whole number of steps stays whole.
fn epochs_to_steps(epochs: f64, q: f64, batch_of: Option<(u64, u64)>) -> Result<u64, String> {
    if !(epochs >= 0.0 && epochs.is_finite()) {
        return Err(format!("--epochs must be a finite number ≥ 0, got {epochs}"));
    }
    if !(q > 0.0 && q <= 1.0) {
        return Err(format!("--epochs needs a sample rate in (0, 1], got {q}; give --steps instead"));
    }
    let exact = match batch_of {
        Some((b, n)) => epochs * n as f64 / b as f64,
        None => epochs / q,
    };
    let steps = if (exact - exact.round()).abs() <= 1e-9 * exact.max(1.0) { exact.round() } else { exact.ceil() };
    if steps > 9.0e15 {
        return Err(format!("{epochs} epochs at sample rate {q} is too many steps ({steps})"));
    }
    Ok(steps as u64)
}

fn import(file: &Path, output: &Path, weights: Option<PathBuf>, loss: LossArg, no_weights: bool) -> Result<(), String> {
    use pdgc::import::{import_file, ImportLoss, ImportOptions};
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut name: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if !name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        name.insert_str(0, "model_");
    }
    let loss = match loss {
        LossArg::CrossEntropy => ImportLoss::CrossEntropy,
        LossArg::Mse => ImportLoss::Mse,
    };
    let imported = import_file(file, &ImportOptions { name, loss }).map_err(|e| e.to_string())?;
    let weights_path = weights.unwrap_or_else(|| output.with_extension("safetensors"));
    let tensors = match (&imported.weights, no_weights) {
        (_, true) => None,
        (Some(t), false) => Some(t),
        (None, false) => {
            return Err(format!(
                "{}: the weights are stored outside the file (external data) and that file is missing; put it \
                 beside the model, or pass --no-weights to import only the network",
                file.display()
            ))
        }
    };
    std::fs::write(output, &imported.source).map_err(|e| format!("cannot write {}: {e}", output.display()))?;
    let g = &imported.graph;
    eprintln!(
        "wrote {} (model `{}`, {} layers, {} parameters, ONNX opset {})",
        output.display(),
        g.name,
        g.nodes.len(),
        g.param_count(),
        imported.opset
    );
    if let Some(t) = tensors {
        pdgc::tensor::save_tensors(&weights_path, t, None).map_err(|e| e.to_string())?;
        eprintln!("wrote {} ({} tensors, PyTorch names)", weights_path.display(), t.len());
    }
    Ok(())
}

fn run(f: impl FnOnce() -> Result<(), String>) -> ExitCode {
    match f() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Reads and checks one file, printing its diagnostics. `Err("")` means already reported.
fn front(path: &Path) -> Result<(pdgc::syntax::ast::Model, pdgc::Graph), String> {
    let name = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| format!("cannot read {name}: {e}"))?;
    let front = pdgc::compile_front(&src);
    if !front.diagnostics.is_empty() {
        eprint!("{}", render(&name, &src, &front.diagnostics));
    }
    match (front.ast, front.graph) {
        (Some(ast), Some(graph)) => Ok((ast, graph)),
        _ => {
            let errors = front.diagnostics.iter().filter(|d| d.is_error()).count();
            Err(format!("{name}: {errors} error(s)"))
        }
    }
}

fn plan_options(args: &PlanArgs, graph: &pdgc::Graph) -> Result<PlanOptions, String> {
    let device = DeviceProfile::resolve(&args.device).map_err(|e| e.to_string())?;
    if args.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    for (layer, s) in &args.strategy {
        let node = graph
            .nodes
            .iter()
            .find(|n| n.layer.as_deref() == Some(layer))
            .ok_or_else(|| format!("--strategy: no layer named `{layer}`"))?;
        let kind = pdgc::ops::strategies(&node.op);
        if !kind.contains(s) {
            let names: Vec<&str> = kind.iter().map(|s| s.name()).collect();
            return Err(format!(
                "--strategy: `{s}` does not apply to `{layer}` ({}); use one of {}",
                node.op.name(),
                names.join(", ")
            ));
        }
        if *s == Strategy::Ghost && args.goal == Goal::Grads {
            return Err(format!(
                "--strategy: ghost computes norms only and cannot give per-example grads for `{layer}`"
            ));
        }
    }
    Ok(PlanOptions {
        batch: args.batch,
        goal: args.goal,
        device,
        memory_budget: args.memory_budget,
        overrides: args.strategy.clone(),
        chunk_bytes: pdgc::lower::CHUNK_BYTES,
        private_bytes: pdgc::lower::PRIVATE_COLUMN_BYTES,
    })
}

fn explain(
    path: &Path,
    args: &PlanArgs,
    format: Format,
    plot: Option<&Path>,
    dump: Option<Stage>,
) -> Result<(), String> {
    let (ast, graph) = front(path)?;
    match dump {
        Some(Stage::Ast) => {
            print!("{ast}");
            return Ok(());
        }
        Some(Stage::Graph) => {
            print!("{graph}");
            return Ok(());
        }
        Some(Stage::Grads) => {
            print!("{}", pdgc::grad::differentiate(&graph));
            return Ok(());
        }
        _ => {}
    }
    let opts = plan_options(args, &graph)?;
    let grads = pdgc::grad::differentiate(&graph);
    let plan = plan::plan(&graph, &grads, &opts).map_err(|e| e.to_string())?;
    if let Some(svg) = plot {
        std::fs::write(svg, pdgc::explain::render_svg(&plan))
            .map_err(|e| format!("cannot write {}: {e}", svg.display()))?;
        eprintln!("wrote {}", svg.display());
    }
    match (dump, format) {
        (Some(_), _) => print!("{plan}"),
        (None, Format::Text) => {
            print!("{}", pdgc::explain::render_text(&plan));
            print!("{}", planned_memory(&load_module(path, args)?));
        }
        (None, Format::Json) => println!("{}", pdgc::explain::render_json(&plan)),
    }
    Ok(())
}

fn check(files: &[PathBuf], format: Format, deny_warnings: bool) -> ExitCode {
    let mut failed = false;
    let mut json = Vec::new();
    for path in files {
        let name = path.display().to_string();
        let src = match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot read {name}: {e}");
                failed = true;
                continue;
            }
        };
        let front = pdgc::compile_front(&src);
        let denied = deny_warnings && front.diagnostics.iter().any(|d| d.severity == Severity::Warning);
        if !front.diagnostics.is_empty() {
            eprint!("{}", render(&name, &src, &front.diagnostics));
        }
        match (&front.graph, format) {
            (Some(g), Format::Text) if !denied => print!("{}", check_report(g)),
            (Some(g), Format::Json) if !denied => json.push(serde_json::json!({
                "file": name,
                "ok": true,
                "report": check_report(g),
                "graph": g,
                "diagnostics": front.diagnostics,
            })),
            (_, Format::Json) => json.push(serde_json::json!({
                "file": name,
                "ok": false,
                "diagnostics": front.diagnostics,
            })),
            _ => {}
        }
        if front.graph.is_none() || denied {
            failed = true;
            let errors = front.diagnostics.iter().filter(|d| d.is_error()).count();
            if format == Format::Text {
                eprintln!("{name}: {errors} error(s)");
            }
        }
    }
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
