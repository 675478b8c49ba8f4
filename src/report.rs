//! What `pdgc check` prints: a per-layer table (name, op, output shape, params, FLOPs) with
//! totals, or the same as JSON for tools.

use serde::Serialize;

use crate::graph::{numel, Graph, Op};

#[derive(Debug, Serialize)]
pub struct LayerRow {
    pub id: u32,
    pub name: String,
    pub op: String,
    pub shape: Vec<usize>,
    pub params: u64,
    pub flops: u64,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub model: String,
    pub layers: Vec<LayerRow>,
    pub parameters: Vec<ParamRow>,
    pub total_params: u64,
    pub total_flops: u64,
}

#[derive(Debug, Serialize)]
pub struct ParamRow {
    pub name: String,
    pub shape: Vec<usize>,
}

pub fn check_report(g: &Graph) -> CheckReport {
    let layers = g
        .nodes
        .iter()
        .map(|n| LayerRow {
            id: n.id.0,
            name: match (&n.layer, &n.op) {
                (Some(l), _) => l.clone(),
                (None, Op::Input { name }) => name.clone(),
                (None, _) => String::new(),
            },
            op: n.op.name().to_string(),
            shape: n.shape.clone(),
            params: g.params_of(n.id).map(|p| numel(&p.shape)).sum(),
            flops: n.flops,
        })
        .collect();
    CheckReport {
        model: g.name.clone(),
        layers,
        parameters: g.params.iter().map(|p| ParamRow { name: p.name.clone(), shape: p.shape.clone() }).collect(),
        total_params: g.param_count(),
        total_flops: g.flops(),
    }
}

/// Groups digits by thousands: 61100840 -> "61,100,840".
pub fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds in the unit that reads best: `1.20 s`, `3.40 ms`, `56.0 µs`.
pub fn secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

/// FLOPs with an SI suffix: 1.23 GFLOP.
pub fn si(v: u64) -> String {
    let (scale, unit) = match v {
        0..1_000 => return format!("{v}"),
        1_000..1_000_000 => (1e3, "K"),
        1_000_000..1_000_000_000 => (1e6, "M"),
        1_000_000_000..1_000_000_000_000 => (1e9, "G"),
        _ => (1e12, "T"),
    };
    format!("{:.2}{unit}", v as f64 / scale)
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shape = |s: &[usize]| format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "));
        let rows: Vec<[String; 5]> = self
            .layers
            .iter()
            .map(|l| {
                let params = if l.params == 0 { "-".to_string() } else { thousands(l.params) };
                [l.name.clone(), l.op.clone(), shape(&l.shape), params, si(l.flops)]
            })
            .collect();
        let header = ["layer", "op", "output (per example)", "params", "FLOPs"];
        let mut width = header.map(str::len);
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        writeln!(f, "model {}", self.model)?;
        let line = |f: &mut std::fmt::Formatter<'_>, r: &[String; 5]| {
            writeln!(
                f,
                "  {:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {:>w4$}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                w0 = width[0],
                w1 = width[1],
                w2 = width[2],
                w3 = width[3],
                w4 = width[4]
            )
        };
        line(f, &header.map(String::from))?;
        for r in &rows {
            line(f, r)?;
        }
        writeln!(
            f,
            "  total: {} parameters in {} tensors, {} FLOPs per example (forward)",
            thousands(self.total_params),
            self.parameters.len(),
            si(self.total_flops)
        )
    }
}
