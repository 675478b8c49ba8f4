//! What `pdgc explain` prints: the plan as a per-layer table a person reads (strategy,
//! FLOPs, bytes, memory, estimated time, runner-up and why), the JSON for tools (with the
//! fastDP/private_vision rule beside ours), and an SVG chart of every strategy's
//! estimated time per layer.

use std::fmt::Write as _;

use serde::Serialize;

use crate::ops::Strategy;
use crate::plan::{LayerPlan, Plan};
use crate::report::{secs, si};

/// The text table.
pub fn render_text(plan: &Plan) -> String {
    let header =
        ["layer", "op", "T", "p·d", "strategy", "FLOPs", "bytes", "memory", "est. time", "runner-up", "fastDP"];
    let rows: Vec<Vec<String>> = plan
        .layers
        .iter()
        .map(|l| {
            let c = l.chosen_cost();
            let mark = if l.overridden {
                "*"
            } else if l.budget_forced {
                "†"
            } else {
                ""
            };
            let runner = l.runner_up().map_or("-".to_string(), |r| format!("{} {}", r.strategy, secs(r.seconds)));
            vec![
                l.layer.clone(),
                l.op.to_string(),
                l.dims.t.to_string(),
                si(l.dims.p * l.dims.d),
                format!("{}{mark}", l.chosen),
                si(c.flops),
                format!("{}B", si(c.bytes)),
                format!("{}B", si(c.held + c.workspace)),
                secs(c.seconds),
                runner,
                fastdp(l).to_string(),
            ]
        })
        .collect();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: batch {} on {} (goal: {}, memory budget {}B)",
        plan.model,
        plan.batch,
        plan.device,
        plan.goal,
        si(plan.memory_budget)
    );
    let line = |out: &mut String, r: &[String]| {
        let mut s = String::from(" ");
        for (i, (c, w)) in r.iter().zip(&width).enumerate() {
            let pad = w - c.chars().count();
            if (2..=3).contains(&i) || (5..=8).contains(&i) {
                s.push_str(&format!(" {}{c}", " ".repeat(pad)));
            } else {
                s.push_str(&format!(" {c}{}", " ".repeat(pad)));
            }
        }
        let _ = writeln!(out, "{}", s.trim_end());
    };
    line(&mut out, &header.map(String::from));
    for r in &rows {
        line(&mut out, r);
    }
    let _ = writeln!(out, "\nwhy:");
    for l in &plan.layers {
        let _ = writeln!(out, "  {:<w$}  {}", l.layer, l.why, w = width[0]);
    }
    if plan.layers.iter().any(|l| l.overridden) {
        let _ = writeln!(out, "  (* = forced by @strategy or --strategy)");
    }
    if plan.layers.iter().any(|l| l.budget_forced) {
        let _ = writeln!(out, "  († = a slower strategy chosen to fit the memory budget)");
    }
    for n in &plan.notes {
        let _ = writeln!(out, "note: {n}");
    }
    let t = &plan.totals;
    let _ = writeln!(
        out,
        "\ntotal: private step {} vs non-private {} ({:.2}x); peak memory {}B vs {}B",
        secs(t.private_seconds),
        secs(t.nonprivate_seconds),
        t.ratio,
        si(t.peak_memory),
        si(t.nonprivate_memory)
    );
    if plan.micro_batch < plan.batch {
        let _ = writeln!(
            out,
            "       (as {} micro-batches of {})",
            plan.batch.div_ceil(plan.micro_batch),
            plan.micro_batch
        );
    }
    out
}

fn fastdp(l: &LayerPlan) -> &'static str {
    if matches!(l.dims.kind, crate::plan::LayerKind::Norm | crate::plan::LayerKind::Index) {
        "-"
    } else if l.fastdp_ghost {
        "ghost"
    } else {
        "materialize"
    }
}

#[derive(Serialize)]
struct Comparison<'a> {
    layer: &'a str,
    ours: Strategy,
    /// What the fastDP / private_vision rule (ghost iff 2T² ≤ p·d) picks.
    fastdp: &'static str,
    agree: bool,
    two_t_squared: u64,
    p_times_d: u64,
}

#[derive(Serialize)]
struct Json<'a> {
    plan: &'a Plan,
    fastdp_comparison: Vec<Comparison<'a>>,
}

/// The JSON for tools: the whole plan, and ours against the fastDP rule per layer.
pub fn render_json(plan: &Plan) -> String {
    let fastdp_comparison = plan
        .layers
        .iter()
        .filter(|l| !matches!(l.dims.kind, crate::plan::LayerKind::Norm | crate::plan::LayerKind::Index))
        .map(|l| {
            let rule = fastdp(l);
            let ours_ghost = l.chosen == Strategy::Ghost;
            Comparison {
                layer: &l.layer,
                ours: l.chosen,
                fastdp: rule,
                agree: ours_ghost == l.fastdp_ghost,
                two_t_squared: 2 * l.dims.t * l.dims.t,
                p_times_d: l.dims.p * l.dims.d,
            }
        })
        .collect();
    serde_json::to_string_pretty(&Json { plan, fastdp_comparison })
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

const COLORS: [(Strategy, &str); 6] = [
    (Strategy::Naive, "#9e9e9e"),
    (Strategy::Crb, "#e08214"),
    (Strategy::Unfold, "#4575b4"),
    (Strategy::Direct, "#1a9850"),
    (Strategy::Outer, "#66bd63"),
    (Strategy::Ghost, "#b2182b"),
];

fn color(s: Strategy) -> &'static str {
    COLORS.iter().find(|(k, _)| *k == s).map_or("#000", |(_, c)| c)
}

/// An SVG chart: per layer, one horizontal bar per strategy (log-scale estimated time),
/// the chosen one outlined.
pub fn render_svg(plan: &Plan) -> String {
    let bar = 11.0;
    let label_w = 170.0;
    let plot_w = 560.0;
    let row_gap = 8.0;
    let times: Vec<f64> = plan.layers.iter().flat_map(|l| l.costs.iter().map(|c| c.seconds)).collect();
    let lo = times.iter().copied().fold(f64::INFINITY, f64::min).max(1e-9).log10().floor();
    let hi = times.iter().copied().fold(0.0, f64::max).max(1e-9).log10().ceil().max(lo + 1.0);
    let x = |s: f64| label_w + (s.max(1e-9).log10() - lo) / (hi - lo) * plot_w;
    let top = 50.0;
    let mut y = top;
    let mut body = String::new();
    for l in &plan.layers {
        let h = l.costs.len() as f64 * bar;
        let _ = writeln!(
            body,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{} ({})</text>"#,
            label_w - 6.0,
            y + h / 2.0 + 4.0,
            xml(&l.layer),
            l.op
        );
        for (i, c) in l.costs.iter().enumerate() {
            let chosen = c.strategy == l.chosen;
            let stroke = if chosen { r##" stroke="#000" stroke-width="1.5""## } else { "" };
            let _ = writeln!(
                body,
                r#"<rect x="{label_w:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"{stroke}><title>{}: {} {}</title></rect>"#,
                y + i as f64 * bar,
                (x(c.seconds) - label_w).max(1.0),
                bar - 1.0,
                color(c.strategy),
                xml(&l.layer),
                c.strategy,
                secs(c.seconds)
            );
        }
        y += h + row_gap;
    }
    let height = y + 40.0;
    let width = label_w + plot_w + 30.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="10" y="18" font-size="14" font-weight="bold">{}: estimated time per strategy (batch {}, {}, goal {})</text>"#,
        xml(&plan.model),
        plan.batch,
        xml(&plan.device),
        plan.goal
    );
    let mut lx = 10.0;
    for (s, c) in COLORS {
        let _ = writeln!(
            svg,
            r#"<rect x="{lx:.0}" y="28" width="10" height="10" fill="{c}"/><text x="{:.0}" y="37" font-size="11">{s}</text>"#,
            lx + 13.0
        );
        lx += 75.0;
    }
    let _ = writeln!(svg, r#"<text x="{lx:.0}" y="37" font-size="11">(outlined = chosen)</text>"#);
    svg.push_str(&body);
    let mut e = lo;
    while e <= hi {
        let gx = x(10f64.powf(e));
        let _ = writeln!(
            svg,
            r##"<line x1="{gx:.1}" y1="{top:.0}" x2="{gx:.1}" y2="{:.1}" stroke="#ccc"/><text x="{gx:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"##,
            y,
            y + 14.0,
            secs(10f64.powf(e))
        );
        e += 1.0;
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
