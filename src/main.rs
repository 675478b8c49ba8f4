//! The `pdgc` command line: one subcommand per job, each a thin layer over the library's
//! stage functions.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use pdgc::diag::{render, Severity};
use pdgc::ops::Strategy;
use pdgc::plan::{self, DeviceProfile, Goal, PlanOptions};
use pdgc::report::check_report;

#[derive(Parser)]
#[command(
    name = "pdgc",
    version,
    about = "A compiler for per-example gradients (DP-SGD) of CNNs"
)]
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
    /// Run the compiler pipeline (parse, check, differentiate, plan) and print a stage's IR.
    /// Writing a loadable module arrives with the runtime.
    Compile {
        file: PathBuf,
        #[command(flatten)]
        plan: PlanArgs,
        /// The IR to print.
        #[arg(long, value_enum, default_value_t = Stage::Plan)]
        dump: Stage,
    },
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 8G, 512M or 1000000)"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{s}` (use K, M, G, T, KiB, MiB or GiB)"
            ))
        }
    };
    if !(value > 0.0) || !value.is_finite() {
        return Err(format!("`{s}` must be a positive size"));
    }
    Ok((value * scale) as u64)
}

fn parse_override(s: &str) -> Result<(String, Strategy), String> {
    let (layer, strategy) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected LAYER=STRATEGY"))?;
    let st = Strategy::from_name(strategy.trim()).ok_or_else(|| {
        let names: Vec<&str> = Strategy::ALL.iter().map(|s| s.name()).collect();
        format!(
            "unknown strategy `{strategy}` (one of {})",
            names.join(", ")
        )
    })?;
    Ok((layer.trim().to_string(), st))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            files,
            format,
            deny_warnings,
        } => check(&files, format, deny_warnings),
        Command::Explain {
            file,
            plan,
            format,
            plot,
            dump,
        } => run(|| explain(&file, &plan, format, plot.as_deref(), dump)),
        Command::Compile { file, plan, dump } => {
            run(|| explain(&file, &plan, Format::Text, None, Some(dump)))
        }
    }
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
        let kind = pdgc::ops::lookup(node.op.name())
            .map(|o| o.kind.strategies())
            .unwrap_or(&[]);
        if !kind.contains(s) {
            let names: Vec<&str> = kind.iter().map(|s| s.name()).collect();
            return Err(format!(
                "--strategy: `{s}` does not apply to `{layer}` ({}); use one of {}",
                node.op.name(),
                names.join(", ")
            ));
        }
        if *s == Strategy::Ghost && args.goal == Goal::Grads {
            return Err(format!("--strategy: ghost computes norms only and cannot give per-example grads for `{layer}`"));
        }
    }
    Ok(PlanOptions {
        batch: args.batch,
        goal: args.goal,
        device,
        memory_budget: args.memory_budget,
        overrides: args.strategy.clone(),
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
    let plan = plan::plan(&graph, &opts);
    if let Some(svg) = plot {
        std::fs::write(svg, pdgc::explain::render_svg(&plan))
            .map_err(|e| format!("cannot write {}: {e}", svg.display()))?;
        eprintln!("wrote {}", svg.display());
    }
    match (dump, format) {
        (Some(_), _) => print!("{plan}"),
        (None, Format::Text) => print!("{}", pdgc::explain::render_text(&plan)),
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
        let denied = deny_warnings
            && front
                .diagnostics
                .iter()
                .any(|d| d.severity == Severity::Warning);
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
        println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
