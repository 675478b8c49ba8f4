//! pdgc: a compiler for per-example gradients.
//!
//! The pipeline, one function per stage (see README.md, "Architecture"):
//!
//! ```text
//! .pdg text ─parse─▶ AST ─check─▶ Graph
//! ```
//!
//! [`compile_front`] runs the stages in order and stops after the first one that reports
//! an error, returning every diagnostic collected so far.

pub mod activation;
pub mod bench;
pub mod calibrate;
pub mod check;
pub mod data;
pub mod diag;
pub mod dp;
pub mod error;
pub mod explain;
pub mod grad;
pub mod graph;
pub mod import;
pub mod index_layer;
pub mod lower;
pub mod memory;
pub mod module;
pub mod ops;
pub mod plan;
pub mod pld;
pub mod privacy;
pub mod reference;
pub mod report;
pub mod runtime;
pub mod stream;
pub mod syntax;
pub mod tensor;
pub mod train;

pub use diag::{Diagnostic, Severity, Span};
pub use dp::{DpSettings, Optimizer, OptimizerState, Sampling, StepReport};
pub use error::{Error, Result};
pub use graph::Graph;
pub use module::{CompileOptions, Module};
pub use runtime::{ClippedSum, Device, Session};
pub use tensor::{Batch, Labels, Params, Tensor, TensorMap};

/// The front end's result: the graph if the source is valid, and all diagnostics
/// (warnings included even when the graph was built).
#[derive(Debug)]
pub struct FrontEnd {
    pub ast: Option<syntax::ast::Model>,
    pub graph: Option<Graph>,
    pub diagnostics: Vec<Diagnostic>,
}

/// parse → check.
pub fn compile_front(src: &str) -> FrontEnd {
    let (ast, mut diagnostics) = syntax::parse(src);
    // A file with syntax errors is not checked: its salvaged AST lacks the statements that
    // failed to parse, so checking it would only report their consequences.
    let graph = match &ast {
        Some(model) if !diag::has_errors(&diagnostics) => {
            let (graph, more) = check::check(model);
            diagnostics.extend(more);
            graph
        }
        _ => None,
    };
    diagnostics.sort_by_key(|d| (d.span().start, d.span().end));
    FrontEnd { ast, graph, diagnostics }
}
