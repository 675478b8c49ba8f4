//! Differentiation and planning over `samples/`: snapshots of the GradGraph and of the
//! Plan at B = 1, 32 and 256 for every sample, and the textbook choices the cost model
//! must make, each asserted with its reason.

use std::path::Path;

use pdgc::grad::differentiate;
use pdgc::ops::Strategy;
use pdgc::plan::{plan, DeviceProfile, Goal, LayerPlan, Plan, PlanOptions};
use pdgc::{compile_front, Graph};

fn graph_of_source(src: &str) -> Graph {
    let front = compile_front(src);
    let text = pdgc::diag::render("test.pdg", src, &front.diagnostics);
    front.graph.unwrap_or_else(|| panic!("test model must check:\n{text}"))
}

fn sample(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples").join(format!("{name}.pdg"));
    std::fs::read_to_string(path).expect("sample exists")
}

fn plan_at(g: &Graph, batch: usize, device: DeviceProfile) -> Plan {
    plan_with(g, &PlanOptions::new(batch, device))
}

fn plan_with(g: &Graph, opts: &PlanOptions) -> Plan {
    plan(g, &differentiate(g), opts).expect("every sample lowers")
}

fn layer<'a>(p: &'a Plan, name: &str) -> &'a LayerPlan {
    p.layers.iter().find(|l| l.layer == name).unwrap_or_else(|| panic!("no layer {name}"))
}

#[test]
fn grads_and_plans_of_every_sample_are_snapshotted() {
    insta::glob!("../samples", "*.pdg", |path| {
        let g = graph_of_source(&std::fs::read_to_string(path).expect("readable"));
        insta::assert_snapshot!("grads", differentiate(&g).to_string());
        for batch in [1, 32, 256] {
            insta::assert_snapshot!(format!("plan_b{batch}"), plan_at(&g, batch, DeviceProfile::h200()).to_string());
        }
    });
}

#[test]
fn every_parameter_gets_one_per_example_gradient() {
    for name in ["mnist_cnn", "resnet18_gn", "regression_mlp_ln", "depthwise_separable", "conv1d_net"] {
        let g = graph_of_source(&sample(name));
        let grads = differentiate(&g);
        let mut derived: Vec<&str> =
            grads.steps.iter().flat_map(|s| s.param_grads.iter().map(|p| p.param.as_str())).collect();
        derived.sort();
        let mut params: Vec<&str> = g.params.iter().map(|p| p.name.as_str()).collect();
        params.sort();
        assert_eq!(derived, params, "{name}");
        for s in &grads.steps {
            for pg in &s.param_grads {
                assert_eq!(pg.eq.lhs.index[0].as_var(), Some("n"), "{name}: {} keeps the batch index", pg.param);
            }
        }
    }
}

#[test]
fn the_first_layer_needs_no_input_gradient() {
    let g = graph_of_source(&sample("mnist_cnn"));
    let grads = differentiate(&g);
    let first = grads.steps.last().expect("steps");
    assert_eq!(first.title.split(':').next(), Some("conv1"));
    assert!(first.input_grads.is_empty(), "nothing before conv1 has parameters");
    assert_eq!(
        first.param_grads[0].eq.to_string(),
        "dW[n,co,ci,kh,kw] = Σ_{oh,ow} dY[n,co,oh,ow] · X[n,ci,oh·2+kh−3,ow·2+kw−3]"
    );
}

/// A grouped conv reads its tensors as (group, channel) views, so the group `g` is a free
/// index of both factors of every product: no term mixes two groups.
#[test]
fn grouped_convs_read_their_tensors_by_group() {
    let g = graph_of_source(&sample("depthwise_separable"));
    let grads = differentiate(&g);
    let dw2 = grads.steps.iter().find(|s| s.title.starts_with("dw2:")).expect("dw2");
    assert_eq!(
        dw2.param_grads[0].eq.to_string(),
        "dW[n,g,co,ci,kh,kw] = Σ_{oh,ow} dY[n,g,co,oh,ow] · X[n,g,ci,oh·2+kh−1,ow·2+kw−1]"
    );
    assert!(dw2.bindings.contains(&"X = %6 [64, 32, 32] as [64, 1, 32, 32]".to_string()), "{:?}", dw2.bindings);
    assert!(dw2.bindings.contains(&"W = dw2.weight [64, 1, 3, 3] as [64, 1, 1, 3, 3]".to_string()));
}

/// ResNet-18's last stage at 128x128 input has T = 4·4 = 16 output positions and
/// p·d = 512·512·9 ≈ 2.4M: Gram matrices are tiny, materializing B·P floats is not.
#[test]
fn resnet18_last_stage_picks_ghost_at_batch_256() {
    let src = sample("resnet18_gn").replace("[3, 224, 224]", "[3, 128, 128]");
    let g = graph_of_source(&src);
    let p = plan_at(&g, 256, DeviceProfile::h200());
    for name in ["layer4_0_conv2", "layer4_1_conv1", "layer4_1_conv2"] {
        let l = layer(&p, name);
        assert_eq!((l.dims.t, l.dims.p * l.dims.d), (16, 2_359_296), "{name}");
        assert_eq!(l.chosen, Strategy::Ghost, "{name}: {}", l.why);
        // The reason: every materializing strategy moves the B·P per-example grads.
        let runner = l.runner_up().expect("runner-up");
        assert!(runner.bytes > 4 * 256 * l.dims.p * l.dims.d, "{name}: {}", l.why);
        assert!(l.why.contains("traffic") || l.why.contains("FLOP"), "{}", l.why);
    }
}

/// A first conv on a 32x32 input (T = 1024, p·d = 64·27 = 1728): Gram matrices of
/// 1024² entries dwarf the 1728-entry per-example gradient, so it materializes.
#[test]
fn a_first_conv_on_32x32_materializes() {
    let g = graph_of_source(
        "model m { input x: [3, 32, 32]; label y: classes(10); \
         h = relu(conv1: conv2d(x, 64, 3, padding=1)); \
         logits = fc: linear(global_avg_pool(h), 10); loss cross_entropy(logits, y); }",
    );
    for batch in [32, 256] {
        for device in [DeviceProfile::h200(), DeviceProfile::cpu2()] {
            let p = plan_at(&g, batch, device);
            let l = layer(&p, "conv1");
            assert_eq!((l.dims.t, l.dims.p * l.dims.d), (1024, 1728));
            assert_ne!(l.chosen, Strategy::Ghost, "{}", l.why);
            assert!(!l.fastdp_ghost, "fastDP's rule agrees: 2T² = 2M > p·d");
            let ghost = l.costs.iter().find(|c| c.strategy == Strategy::Ghost).expect("ghost is a candidate");
            assert!(ghost.flops > 10 * l.chosen_cost().flops, "Gram matrices over T=1024 cost more");
        }
    }
}

#[test]
fn a_tight_memory_budget_splits_the_batch_before_it_changes_strategies() {
    let g = graph_of_source(&sample("cifar_cnn"));
    let free = plan_at(&g, 256, DeviceProfile::h200());
    assert!(free.layers.iter().all(|l| !l.budget_forced));
    assert_eq!(free.micro_batch, 256);

    // Halfway between the non-private footprint and the unconstrained peak: the batch runs
    // in micro-batches with the fastest strategies at that size, and the plan says so.
    let budget = free.totals.nonprivate_memory + (free.totals.peak_memory - free.totals.nonprivate_memory) / 2;
    let mut opts = PlanOptions::new(256, DeviceProfile::h200());
    opts.memory_budget = Some(budget);
    let tight = plan_with(&g, &opts);
    assert!(tight.totals.peak_memory <= budget);
    assert!(tight.micro_batch < 256 && tight.micro_batch > 1, "{}", tight.micro_batch);
    let fastest = plan_at(&g, tight.micro_batch, DeviceProfile::h200());
    for l in &tight.layers {
        assert!(!l.budget_forced, "{}: {}", l.layer, l.why);
        assert_eq!(l.chosen, layer(&fastest, &l.layer).chosen, "{}", l.layer);
    }
    assert!(tight.notes.iter().any(|n| n.contains("micro-batches")), "{:?}", tight.notes);

    // Below one example with the fastest strategies: only now do layers switch to leaner
    // ones, at micro-batch 1.
    let one = plan_at(&g, 1, DeviceProfile::h200());
    let budget = one.totals.nonprivate_memory + (one.totals.peak_memory - one.totals.nonprivate_memory) / 2;
    opts.memory_budget = Some(budget);
    let lean = plan_with(&g, &opts);
    assert_eq!(lean.micro_batch, 1);
    assert!(lean.totals.peak_memory <= budget);
    let switched: Vec<&LayerPlan> = lean.layers.iter().filter(|l| l.budget_forced).collect();
    assert!(!switched.is_empty());
    for l in &switched {
        assert_ne!(l.chosen, layer(&one, &l.layer).chosen);
        assert!(l.why.starts_with("memory:"), "{}", l.why);
    }
    assert!(lean.totals.private_seconds >= 256.0 * one.totals.private_seconds * 0.999);

    // Below even the leanest plan of one example: planned anyway, and said.
    opts.memory_budget = Some(one.totals.nonprivate_memory / 2);
    let over = plan_with(&g, &opts);
    assert_eq!(over.micro_batch, 1);
    assert!(over.notes.iter().any(|n| n.contains("even one example")), "{:?}", over.notes);
}

#[test]
fn overrides_win_and_are_marked() {
    let g = graph_of_source(&sample("depthwise_separable"));
    let p = plan_at(&g, 32, DeviceProfile::h200());
    let pw2 = layer(&p, "pw2");
    assert_eq!((pw2.chosen, pw2.overridden), (Strategy::Ghost, true));
    assert!(pw2.why.starts_with("override"));
    let mut opts = PlanOptions::new(32, DeviceProfile::h200());
    opts.overrides = vec![("stem".into(), Strategy::Crb)];
    let p = plan_with(&g, &opts);
    assert_eq!((layer(&p, "stem").chosen, layer(&p, "stem").overridden), (Strategy::Crb, true));
}

#[test]
fn the_grads_goal_never_picks_ghost() {
    let src = sample("resnet18_gn").replace("[3, 224, 224]", "[3, 128, 128]");
    let g = graph_of_source(&src);
    let mut opts = PlanOptions::new(256, DeviceProfile::h200());
    opts.goal = Goal::Grads;
    let p = plan_with(&g, &opts);
    assert!(p
        .layers
        .iter()
        .all(|l| l.chosen != Strategy::Ghost && l.costs.iter().all(|c| c.strategy != Strategy::Ghost)));
}

#[test]
fn planning_is_deterministic() {
    let g = graph_of_source(&sample("resnet18_gn"));
    let a = plan_at(&g, 64, DeviceProfile::cpu2());
    let b = plan_at(&g, 64, DeviceProfile::cpu2());
    assert_eq!(a, b);
    assert_eq!(pdgc::explain::render_json(&a), pdgc::explain::render_json(&b));
}

#[test]
fn explain_json_puts_the_fastdp_rule_beside_ours() {
    let g = graph_of_source(&sample("cifar_cnn"));
    let p = plan_at(&g, 256, DeviceProfile::h200());
    let v: serde_json::Value = serde_json::from_str(&pdgc::explain::render_json(&p)).expect("valid JSON");
    let cmp = v["fastdp_comparison"].as_array().expect("array");
    assert_eq!(cmp.len(), 8);
    for row in cmp {
        let ghost_by_rule = row["two_t_squared"].as_u64() <= row["p_times_d"].as_u64();
        assert_eq!(row["fastdp"] == "ghost", ghost_by_rule);
        assert_eq!(row["agree"], (row["ours"] == "ghost") == ghost_by_rule);
    }
    // The ratio is of the two steps' estimates (the private step may run layers on faster
    // kernels than the non-private step's im2col GEMMs, so it is not always above 1).
    let totals = &v["plan"]["totals"];
    let ratio = totals["ratio"].as_f64().expect("ratio");
    assert!(ratio > 0.0 && ratio.is_finite());
    let (private, nonprivate) = (totals["private_seconds"].as_f64(), totals["nonprivate_seconds"].as_f64());
    assert!((private.expect("private") / nonprivate.expect("non-private") - ratio).abs() < 1e-9);
}
