//! Size limits: what the kernel IR and both backends can address, checked where a size is
//! born, so that no later stage ever truncates one.
//!
//! The limits (every one comes from a backend or the IR; none is a policy):
//!
//! | what | at most | why |
//! |---|---|---|
//! | a dimension, a layer's integer argument | 2^32 − 1 ([`MAX_DIM`]) | the kernel IR's dims and loop extents are `u32` |
//! | a tensor's or parameter's elements per example | 2^32 − 1 ([`MAX_TENSOR_ELEMENTS`]) | kernels view a tensor flattened as one dim (activations, losses, squared norms) |
//! | any buffer's elements per example (im2col columns, workspaces) | 2^40 ([`MAX_EXAMPLE_ELEMENTS`]) | the verifier's bound, so that 64-bit byte offsets hold a batch factor |
//! | any buffer's elements at the compiled batch size | (2^31 − 1) · 128 ≈ 2^38 ([`MAX_BUFFER_ELEMENTS`]) | one CUDA launch: `gridDim.x` < 2^31 blocks of 128 threads, one thread per element |
//! | classes of a classification label | 2^24 ([`MAX_CLASSES`]) | labels reach the kernels as f32, exact only up to 2^24 |
//!
//! Index arithmetic is 64-bit everywhere (Cranelift `i64`, CUDA C `long long`, the
//! interpreter `i64`), so within these limits no index can wrap.
//!
//! The per-example limits are checked by `check` ([`check_layer`], and the checker itself
//! for input shapes, integer arguments and the label): a violation is a diagnostic with
//! the span of the layer or argument that makes a size too large. What depends on the
//! batch size or the plan is checked once, by [`check_buffers`], when
//! [`crate::Module::from_source`] has lowered the program for its batch size: a violation
//! is [`Error::TooLarge`], naming the buffer, its layer, its size and the largest batch
//! that fits.

use crate::diag::{Diagnostic, Span};
use crate::error::{Error, Result};
use crate::graph::{numel, Graph, Op};
use crate::lower::{Program, Role};
use crate::report::thousands;

use super::shapes::Built;

/// The largest dimension or integer argument: the kernel IR's extents are `u32`.
pub const MAX_DIM: u64 = u32::MAX as u64;

/// The most elements a tensor (activation, parameter, label) holds per example: kernels
/// view it flattened as a single dim.
pub const MAX_TENSOR_ELEMENTS: u64 = u32::MAX as u64;

/// The most elements any buffer holds per example (the verifier's bound).
pub const MAX_EXAMPLE_ELEMENTS: u64 = pdgc_codegen::verify::MAX_FIXED_ELEMS;

/// The most elements any buffer holds at the compiled batch size: what one CUDA launch
/// covers with one thread per element.
pub const MAX_BUFFER_ELEMENTS: u64 = pdgc_codegen::cuda::MAX_LAUNCH_THREADS;

/// The most classes a label has: class indices reach the kernels as f32.
pub const MAX_CLASSES: u64 = 1 << 24;

/// The note every size diagnostic carries.
pub const LIMITS_NOTE: &str = "pdgc's kernels address every dimension and every tensor's per-example elements with \
                               32 bits: each must be below 2^32 (README, \"Limits\")";

/// The diagnostic for an integer argument or declared dimension above [`MAX_DIM`].
pub fn too_large_value(what: &str, value: i64, span: Span) -> Diagnostic {
    Diagnostic::error("E0211", format!("{what} {value} is too large"), span)
        .with_label(format!("at most {MAX_DIM}"))
        .with_note(LIMITS_NOTE)
}

/// Checks the sizes a layer creates: its output, its parameters and, for a conv, the
/// im2col columns (and crb's positions) the lowering derives from it. `input` is the shape
/// of its first input; the diagnostic points at `span`, the layer.
pub(super) fn check_layer(op: &str, built: &Built, input: &[usize], span: Span) -> Result<(), Diagnostic> {
    let too_large = |what: String, count: u64, limit: u64| {
        Diagnostic::error("E0211", format!("`{op}` makes {what} too large for pdgc's kernels"), span)
            .with_label(format!("{} elements (at most {limit})", thousands(count)))
            .with_note(LIMITS_NOTE)
    };
    let out = numel(&built.shape);
    if out > MAX_TENSOR_ELEMENTS {
        return Err(too_large(format!("an output of shape {:?}", built.shape), out, MAX_TENSOR_ELEMENTS));
    }
    for (name, shape) in &built.params {
        let n = numel(shape);
        if n > MAX_TENSOR_ELEMENTS {
            return Err(too_large(format!("a {name} of shape {shape:?}"), n, MAX_TENSOR_ELEMENTS));
        }
    }
    if let Op::Index(l) = &built.op {
        // Every temporary of a layer in index notation is a tensor of its own.
        for t in l.tensors.iter().filter(|t| t.kind == crate::index_layer::LocalKind::Temp) {
            let n = numel(&t.shape);
            if n > MAX_TENSOR_ELEMENTS {
                return Err(too_large(format!("`{}` of shape {:?}", t.name, t.shape), n, MAX_TENSOR_ELEMENTS));
            }
        }
    }
    if let Op::Conv(c) = &built.op {
        // The im2col columns `[groups, (Cin/groups)·Πk, positions]` per example.
        let d = numel(&c.kernel).saturating_mul((c.in_channels / c.groups) as u64);
        if d > MAX_DIM {
            return Err(too_large("im2col columns of height (Cin/groups)·Πkernel".into(), d, MAX_DIM));
        }
        let cols = d.saturating_mul(out);
        if cols > MAX_EXAMPLE_ELEMENTS {
            return Err(too_large("im2col columns per example".into(), cols, MAX_EXAMPLE_ELEMENTS));
        }
        let crb = crate::lower::crb_positions(c, input, &built.shape);
        if let Some(&p) = crb.iter().find(|&&p| p as u64 > MAX_DIM) {
            return Err(too_large("the crb strategy's window (stride too large)".into(), p as u64, MAX_DIM));
        }
    }
    Ok(())
}

/// Checks every buffer of `program` at `batch` examples against [`MAX_EXAMPLE_ELEMENTS`]
/// and [`MAX_BUFFER_ELEMENTS`]. `name` and `source` locate the layer in the message.
pub fn check_buffers(name: &str, source: &str, graph: &Graph, program: &Program, batch: usize) -> Result<()> {
    for b in &program.buffers {
        let per_example = b.per_example_len();
        let examples = match (b.batched, b.chunk) {
            (true, Some(k)) => (batch as u128).min(u128::from(k)),
            (true, None) => batch as u128,
            (false, _) => 1,
        };
        let elements = examples * per_example as u128;
        let limit = if per_example > MAX_EXAMPLE_ELEMENTS {
            MAX_EXAMPLE_ELEMENTS
        } else if elements > MAX_BUFFER_ELEMENTS as u128 {
            MAX_BUFFER_ELEMENTS
        } else {
            continue;
        };
        let max_batch = MAX_BUFFER_ELEMENTS / per_example.max(1);
        let advice = if b.batched && limit == MAX_BUFFER_ELEMENTS && max_batch > 0 {
            format!("compile for a batch of at most {max_batch} examples (`--batch`)")
        } else {
            "make the layer smaller".to_string()
        };
        return Err(Error::TooLarge {
            buffer: b.name.clone(),
            what: describe(&b.role, graph, name, source),
            batch,
            shape: format!("{:?}", b.shape),
            elements,
            limit,
            advice,
        });
    }
    Ok(())
}

/// What a buffer holds, in words, with the layer it belongs to and where that is.
fn describe(role: &Role, graph: &Graph, name: &str, source: &str) -> String {
    let node = |id: u32| {
        let n = graph.node(crate::graph::NodeId(id));
        let what = n.layer.as_ref().map_or_else(|| format!("`{}`", n.op.name()), |l| format!("layer `{l}`"));
        format!("{what} at {name}:{}", line_col(source, n.span.start))
    };
    let param = |p: &str| {
        let layer = graph.params.iter().find(|q| q.name == p).map(|q| node(q.node.0));
        format!("`{p}` ({})", layer.unwrap_or_default())
    };
    match role {
        Role::Input(n) => format!("the input `{n}`"),
        Role::Label => "the label".into(),
        Role::Param(p) => format!("the parameter {}", param(p)),
        Role::Activation(id) => format!("the output of {}", node(*id)),
        Role::ActivationGrad(id) => format!("the gradient of the output of {}", node(*id)),
        Role::Saved(id, what) => format!("the temporary `{what}` of {}", node(*id)),
        Role::PerExampleGrad(p) => format!("the per-example gradients of {}", param(p)),
        Role::BatchGrad(p) => format!("the batch gradient of {}", param(p)),
        Role::ClippedSum(p) => format!("the clipped sum of {}", param(p)),
        Role::Workspace(w) => format!("the workspace `{w}` of the plan"),
        Role::Loss | Role::SqNormParts | Role::Norms | Role::ClipFactors | Role::ClipNorm => {
            "per-example norms and losses".into()
        }
    }
}

/// `line:col` (1-based, columns in characters) of a byte offset.
fn line_col(source: &str, offset: usize) -> String {
    let (mut line, mut col) = (1, 1);
    for (i, ch) in source.char_indices() {
        if i >= offset {
            break;
        }
        if ch == '\n' {
            (line, col) = (line + 1, 1);
        } else {
            col += 1;
        }
    }
    format!("{line}:{col}")
}
