//! The `pdgc` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use pdgc::diag::{render, Severity};
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            files,
            format,
            deny_warnings,
        } => check(&files, format, deny_warnings),
    }
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
