//! Front-end tests over `samples/`: snapshots of every stage (AST, Graph, check report)
//! for every valid sample, and of every rendered diagnostic for `samples/errors/`; layers
//! written in index notation (`samples/depthwise_index.pdg`, `samples/gated_bilinear.pdg` and
//! `tests/data/models/index_*.pdg`), instantiated exactly.
//!
//! Re-bless with `INSTA_UPDATE=always cargo test --test front` (or `cargo insta review`).

use std::fmt::Write;
use std::path::Path;

use pdgc::grad::{Access, Expr, Func, Index, Term};
use pdgc::graph::{Activation, Op};
use pdgc::index_layer::{IndexLayer, IndexStmt, IndexTerm, LocalKind, LocalTensor};
use pdgc::{compile_front, diag::render, report::check_report, Severity};

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn display_name(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    path.strip_prefix(root).unwrap_or(path).display().to_string()
}

#[test]
fn every_sample_checks_and_its_stages_are_snapshotted() {
    insta::glob!("../samples", "*.pdg", |path| {
        let src = read(path);
        let front = compile_front(&src);
        let rendered = render(&display_name(path), &src, &front.diagnostics);
        assert!(front.diagnostics.is_empty(), "{} should check cleanly:\n{rendered}", path.display());
        let ast = front.ast.expect("a valid sample parses");
        let graph = front.graph.expect("a valid sample checks");
        insta::assert_snapshot!("ast", ast.to_string());
        insta::assert_snapshot!("graph", graph.to_string());
        insta::assert_snapshot!("check", check_report(&graph).to_string());
    });
}

/// The diagnostic code each error sample must produce (all of them, in source order).
const EXPECTED: &[(&str, &[&str])] = &[
    ("add_shape_mismatch", &["E0207"]),
    ("argument_type", &["E0114"]),
    ("bad_group_norm", &["E0208"]),
    ("bad_strategy", &["E0132"]),
    ("batch_norm", &["E0101"]),
    ("conv_in_channels", &["E0201"]),
    ("duplicate_argument", &["E0112"]),
    ("duplicate_input", &["E0104"]),
    ("duplicate_layer_name", &["E0122"]),
    ("groups_not_divisible", &["E0203"]),
    ("index_bad_signature", &["E0142"]),
    ("index_batch_index", &["E0147"]),
    ("index_builtin_name", &["E0140"]),
    ("index_duplicate_definition", &["E0141"]),
    ("index_empty_layer", &["E0145"]),
    ("index_input_mismatch", &["E0157"]),
    ("index_lhs_not_plain", &["E0146"]),
    ("index_name_twice", &["E0143"]),
    ("index_nested_sum", &["E0151"]),
    ("index_not_a_value", &["E0156"]),
    ("index_not_affine", &["E0150"]),
    ("index_out_of_bounds", &["E0159"]),
    ("index_param_shifted", &["E0154"]),
    ("index_range_not_derived", &["E0158"]),
    ("index_read_before_definition", &["E0148"]),
    ("index_sum_over_lhs", &["E0152"]),
    ("index_syntax_error", &["E0005", "E0005", "E0005"]),
    ("index_unbound", &["E0153"]),
    ("index_unknown_size", &["E0144"]),
    ("index_unused_layer", &["W0003"]),
    ("index_unused_param", &["E0155"]),
    ("index_wrong_index_count", &["E0149"]),
    ("kernel_too_large", &["E0205"]),
    ("label_classes_mismatch", &["E0303"]),
    ("linear_in_features", &["E0202"]),
    ("loss_label_kind", &["E0304"]),
    ("missing_argument", &["E0113"]),
    ("multiple_errors", &["E0110", "E0100", "E0103"]),
    ("named_parameterless_layer", &["E0121"]),
    ("no_input", &["E0310", "E0305"]),
    ("no_loss", &["E0300"]),
    ("nonpositive_output", &["E0206"]),
    ("out_not_divisible_by_groups", &["E0204"]),
    ("syntax_error", &["E0007"]),
    ("too_large", &["E0211"]),
    ("two_losses", &["E0301"]),
    ("unknown_argument", &["E0110"]),
    ("unknown_layer", &["E0100"]),
    ("unknown_name", &["E0103"]),
    ("unknown_strategy", &["E0131"]),
    ("unnamed_parameterized_layer", &["E0120"]),
    ("unused_binding", &["W0001"]),
    ("wrong_rank", &["E0200"]),
];

#[test]
fn every_error_sample_fails_with_its_diagnostic() {
    insta::glob!("../samples/errors", "*.pdg", |path| {
        let stem = path.file_stem().and_then(|s| s.to_str()).expect("utf-8 file name");
        let (_, expected) = EXPECTED
            .iter()
            .find(|(name, _)| *name == stem)
            .unwrap_or_else(|| panic!("samples/errors/{stem}.pdg has no entry in EXPECTED"));
        let src = read(path);
        let front = compile_front(&src);
        let codes: Vec<&str> = front.diagnostics.iter().map(|d| d.code).collect();
        assert_eq!(&codes, expected, "{stem}: wrong diagnostics");
        let only_warnings = front.diagnostics.iter().all(|d| d.severity == Severity::Warning);
        assert_eq!(front.graph.is_some(), only_warnings, "{stem}: a graph is built iff there is no error");
        insta::assert_snapshot!(render(&display_name(path), &src, &front.diagnostics));
    });
}

#[test]
fn every_error_sample_is_listed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/errors");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("samples/errors exists")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.path().file_stem().and_then(|s| s.to_str()).map(String::from))
        .collect();
    on_disk.sort();
    let listed: Vec<String> = EXPECTED.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(on_disk, listed);
}

fn graph_of(sample: &str) -> pdgc::Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples").join(format!("{sample}.pdg"));
    compile_front(&read(&path)).graph.expect("sample checks")
}

#[test]
fn parameter_totals_match_torchvision() {
    // torchvision's published parameter counts; ResNet-18's GroupNorm has BatchNorm's
    // affine parameter count, so the total is unchanged.
    assert_eq!(graph_of("alexnet").param_count(), 61_100_840);
    assert_eq!(graph_of("vgg16").param_count(), 138_357_544);
    assert_eq!(graph_of("resnet18_gn").param_count(), 11_689_512);
    // Papernot et al. 2020's MNIST CNN.
    assert_eq!(graph_of("mnist_cnn").param_count(), 26_010);
}

#[test]
fn parameters_use_pytorch_names_and_layouts() {
    let g = graph_of("mnist_cnn");
    let params: Vec<(String, Vec<usize>)> = g.params.iter().map(|p| (p.name.clone(), p.shape.clone())).collect();
    assert_eq!(
        params,
        vec![
            ("conv1.weight".into(), vec![16, 1, 8, 8]),
            ("conv1.bias".into(), vec![16]),
            ("conv2.weight".into(), vec![32, 16, 4, 4]),
            ("conv2.bias".into(), vec![32]),
            ("fc1.weight".into(), vec![32, 512]),
            ("fc1.bias".into(), vec![32]),
            ("fc2.weight".into(), vec![10, 32]),
            ("fc2.bias".into(), vec![10]),
        ]
    );
}

/// Checks a one-conv model whose conv (or pool) is `layer`, returning the graph's text or
/// the diagnostics' codes and messages.
fn padded(layer: &str) -> Result<String, Vec<String>> {
    let src = format!(
        "model m {{ input x: [2, 9, 8]; label y: classes(3); \
         h = {layer}; logits = fc: linear(flatten(h), 3); loss cross_entropy(logits, y); }}"
    );
    let front = compile_front(&src);
    match front.graph {
        Some(g) => Ok(g.to_string()),
        None => Err(front.diagnostics.iter().map(|d| format!("{} {}", d.code, d.message)).collect()),
    }
}

#[test]
fn per_side_padding_sets_the_output_size() {
    // PyTorch's padding="same" with a 4x2 kernel: 1 + 2 rows, 0 + 1 columns keep 9 x 8.
    let g = padded("c: conv2d(x, 4, kernel=(4, 2), padding=((1, 2), (0, 1)))").expect("checks");
    assert!(g.contains("padding=(1,2)x(0,1) dilation=1x1 groups=1 bias=true (%0) -> [4, 9, 8]"), "{g}");
    // A pool padded after the input only: (9 + 1 - 2) / 2 + 1 = 5 rows, (8 - 2) / 2 + 1 = 4 columns.
    let g = padded("maxpool2d(x, 2, padding=((0, 1), (0, 0)))").expect("checks");
    assert!(g.contains("padding=(0,1)x(0,0) (%0) -> [2, 5, 4]"), "{g}");
    // Symmetric pairs print as plain sizes, as before.
    let g = padded("c: conv2d(x, 4, 3, padding=((1, 1), (1, 1)))").expect("checks");
    assert!(g.contains("padding=1x1 dilation"), "{g}");
}

#[test]
fn malformed_per_side_padding_is_an_error() {
    for (layer, expected) in [
        ("c: conv2d(x, 4, 3, padding=((1, 2),))", "E0115 `padding` of `conv2d` needs 2 (lo, hi) pairs, found 1"),
        ("c: conv2d(x, 4, 3, padding=((1, 2, 3), (0, 1)))", "E0114 a padding pair holds exactly two integers"),
        ("c: conv2d(x, 4, 3, padding=((1, 2), 1))", "E0114 a tuple of pairs holds only `(lo, hi)` pairs"),
        ("c: conv2d(x, 4, 3, padding=((-1, 2), (0, 1)))", "E0116 `padding` of `conv2d` must be non-negative"),
        (
            "c: conv2d(x, 4, kernel=((1, 2), (0, 1)))",
            "E0114 `kernel` of `conv2d` expects an integer or a tuple of integers",
        ),
        ("maxpool2d(x, 2, padding=((0, 2), (0, 0)))", "E0210 `maxpool2d` padding 2 is more than half its kernel 2"),
        (
            "c: conv2d(x, 4, 12, padding=((0, 2), (0, 0)))",
            "E0205 `conv2d` kernel 12 is larger than its padded input 11 (= 9 + 0 + 2)",
        ),
    ] {
        let errors = padded(layer).expect_err(layer);
        assert_eq!(errors, vec![expected.to_string()], "{layer}");
    }
}

/// Every layer in index notation of a graph as instantiated: its tensors, then each
/// statement with its terms and the range of every variable.
fn index_layers(g: &pdgc::Graph) -> String {
    let mut out = String::new();
    for n in &g.nodes {
        let Op::Index(l) = &n.op else { continue };
        writeln!(out, "{} {}: {}", n.id, n.layer.as_deref().unwrap_or("-"), l.def).unwrap();
        for t in &l.tensors {
            writeln!(out, "  {:?} {} {:?} padding {:?}", t.kind, t.name, t.shape, t.padding).unwrap();
        }
        for s in &l.stmts {
            let terms: Vec<String> =
                s.terms.iter().map(|t| format!("[{}]", Expr::sum(t.sum.clone(), t.body.clone()))).collect();
            writeln!(out, "  {}[{}] = {}", s.lhs, s.vars.join(","), terms.join(" + ")).unwrap();
            let ranges: Vec<String> = s.ranges.iter().map(|(v, r)| format!("{v}<{r}")).collect();
            writeln!(out, "    ranges {}", ranges.join(" ")).unwrap();
        }
    }
    out
}

#[test]
fn every_index_sample_checks_and_its_stages_are_snapshotted() {
    insta::glob!("data/models", "index_*.pdg", |path| {
        let src = read(path);
        let front = compile_front(&src);
        let rendered = render(&display_name(path), &src, &front.diagnostics);
        assert!(front.diagnostics.is_empty(), "{} should check cleanly:\n{rendered}", path.display());
        let ast = front.ast.expect("a valid sample parses");
        let graph = front.graph.expect("a valid sample checks");
        assert!(graph.nodes.iter().any(|n| matches!(n.op, Op::Index(_))), "{} has no index layer", path.display());
        insta::assert_snapshot!("index_ast", ast.to_string());
        insta::assert_snapshot!("index_graph", format!("{graph}\n{}", index_layers(&graph)));
        insta::assert_snapshot!("index_check", check_report(&graph).to_string());
    });
}

/// Checks a model with input `x` of `shape`, the layer definitions `defs` and the binding
/// `h = CALL;` whose result feeds a linear classifier; the graph or the diagnostics.
fn index_model(shape: &str, defs: &str, call: &str) -> Result<pdgc::Graph, Vec<String>> {
    let src = format!(
        "model m {{ input x: {shape}; input z: [8]; label y: classes(3);\n{defs}\n\
         h = {call}; logits = fc: linear(flatten(h), 3); loss cross_entropy(logits, y); _z = z; }}"
    );
    let front = compile_front(&src);
    let errors: Vec<String> =
        front.diagnostics.iter().filter(|d| d.is_error()).map(|d| format!("{} {}", d.code, d.message)).collect();
    front.graph.ok_or(errors)
}

fn only_index_layer(g: &pdgc::Graph) -> &IndexLayer {
    let mut layers = g.nodes.iter().filter_map(|n| if let Op::Index(l) = &n.op { Some(l) } else { None });
    let l = layers.next().expect("an index layer");
    assert!(layers.next().is_none(), "one index layer");
    l
}

const DEPTHWISE3: &str = "layer depthwise3(x: [C, H, W] pad (0, 1, 1)) {
    param weight: [C, 3, 3];
    param bias: [C];
    y[c, h, w] = sum(i, j: weight[c, i, j] * x[c, h + i - 1, w + j - 1]) + bias[c];
}";

const DEPTHWISE3_S2: &str = "layer depthwise3_s2(x: [C, H, W] pad (0, 1, 1)) {
    param weight: [C, 3, 3];
    y[c, h, w] = sum(i, j: weight[c, i, j] * x[c, 2*h + i - 1, 2*w + j - 1]);
}";

#[test]
fn depthwise_ranges_follow_the_padding_and_the_stride() {
    let g = index_model("[32, 16, 16]", DEPTHWISE3, "dw: depthwise3(x)").expect("checks");
    let l = only_index_layer(&g);
    let s = l.output();
    assert_eq!(s.ranges, vec![("c", 32), ("h", 16), ("w", 16), ("i", 3), ("j", 3)]);
    let node = g.nodes.iter().find(|n| n.layer.as_deref() == Some("dw")).expect("dw");
    assert_eq!(node.shape, vec![32, 16, 16]);
    // 2 FLOPs per point of each term: the 3x3 window, then the bias.
    assert_eq!(node.flops, 2 * 32 * 16 * 16 * 9 + 2 * 32 * 16 * 16);
    assert_eq!(node.flops, l.flops());
    let kinds: Vec<_> =
        l.tensors.iter().map(|t| (t.name.as_str(), t.kind, t.shape.clone(), t.padding.clone())).collect();
    assert_eq!(
        kinds,
        vec![
            ("x", LocalKind::Input(0), vec![32, 16, 16], vec![(0, 0), (1, 1), (1, 1)]),
            ("weight", LocalKind::Param, vec![32, 3, 3], vec![(0, 0); 3]),
            ("bias", LocalKind::Param, vec![32], vec![(0, 0)]),
            ("y", LocalKind::Temp, vec![32, 16, 16], vec![(0, 0); 3]),
        ]
    );
    let params: Vec<(&str, &[usize])> = g.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
    assert_eq!(params[..2], [("dw.weight", &[32, 3, 3][..]), ("dw.bias", &[32][..])]);
    // The window term, then the bias term.
    let terms: Vec<String> = s.terms.iter().map(|t| Expr::sum(t.sum.clone(), t.body.clone()).to_string()).collect();
    assert_eq!(terms, vec!["Σ_{i,j} weight[c,i,j] · x[c,h+i−1,w+j−1]", "bias[c]"]);

    // Stride 2 on 16 x 16 with one zero on each side: 8 x 8 (and 16 x 16 on 32 x 32).
    let g = index_model("[4, 16, 16]", DEPTHWISE3_S2, "dw: depthwise3_s2(x)").expect("checks");
    assert_eq!(only_index_layer(&g).output().ranges, vec![("c", 4), ("h", 8), ("w", 8), ("i", 3), ("j", 3)]);
    let g = index_model("[4, 32, 32]", DEPTHWISE3_S2, "dw: depthwise3_s2(x)").expect("checks");
    assert_eq!(only_index_layer(&g).output().ranges, vec![("c", 4), ("h", 16), ("w", 16), ("i", 3), ("j", 3)]);
}

#[test]
fn the_gated_layer_instantiates_into_the_expected_index_layer() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/models/index_gated_mlp.pdg");
    let g = compile_front(&read(&path)).graph.expect("checks");
    let layers: Vec<&IndexLayer> =
        g.nodes.iter().filter_map(|n| if let Op::Index(l) = &n.op { Some(&**l) } else { None }).collect();
    assert_eq!(layers.len(), 2);
    let t = |name: &str, kind, shape: Vec<usize>| LocalTensor {
        name: name.into(),
        kind,
        padding: vec![(0, 0); shape.len()],
        shape,
    };
    let read = |tensor: &str, vars: &[&'static str]| Expr::Read(Access::new(tensor, vars));
    let matvec = |w: &str| IndexTerm { sum: vec!["i"], body: Expr::Mul(vec![read(w, &["o", "i"]), read("x", &["i"])]) };
    let stmt = |lhs: &str, terms, ranges| IndexStmt { lhs: lhs.into(), vars: vec!["o"], terms, ranges };
    let expected = IndexLayer {
        def: "gated".into(),
        tensors: vec![
            t("x", LocalKind::Input(0), vec![64]),
            t("wv", LocalKind::Param, vec![32, 64]),
            t("wg", LocalKind::Param, vec![32, 64]),
            t("v", LocalKind::Temp, vec![32]),
            t("g", LocalKind::Temp, vec![32]),
            t("y", LocalKind::Temp, vec![32]),
        ],
        stmts: vec![
            stmt("v", vec![matvec("wv")], vec![("o", 32), ("i", 64)]),
            stmt("g", vec![matvec("wg")], vec![("o", 32), ("i", 64)]),
            stmt(
                "y",
                vec![IndexTerm {
                    sum: vec![],
                    body: Expr::Mul(vec![
                        read("v", &["o"]),
                        Expr::Apply(Func::Activation(Activation::Sigmoid), vec![read("g", &["o"])]),
                    ]),
                }],
                vec![("o", 32)],
            ),
        ],
    };
    assert_eq!(layers[0], &expected);
    // The second call binds `O` by keyword and `I` from its input.
    assert_eq!(layers[1].tensor("wv").expect("wv").shape, vec![10, 32]);
    assert_eq!(layers[1].output().ranges, vec![("o", 10)]);
    let params: Vec<(&str, &[usize])> = g.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
    assert_eq!(
        params,
        vec![("g1.wv", &[32, 64][..]), ("g1.wg", &[32, 64][..]), ("g2.wv", &[10, 32][..]), ("g2.wg", &[10, 32][..])]
    );
    let last = g.node(g.loss.input());
    assert_eq!(
        (last.layer.as_deref(), last.shape.as_slice(), last.flops),
        (Some("g2"), &[10][..], 2 * 2 * 320 + 2 * 10)
    );
}

#[test]
fn sums_are_whole_terms_and_minus_is_a_product_with_minus_one() {
    let defs = "layer f(x: [I]) {
        param a: [I];
        param w: [I, I];
        y[o] = a[o] - sum(k: w[o, k] * x[k]) + 2.0 * x[o] / a[o];
        z[o] = -y[o] + exp(-x[o]);
        u[o] = -(z[o] + sum(k: w[o, k] * z[k]));
    }";
    let g = index_model("[6]", defs, "l: f(x)").expect("checks");
    let l = only_index_layer(&g);
    let read = |t: &str, v: &'static str| Expr::Read(Access::new(t, &[v]));
    let y = &l.stmts[0];
    // The pieces that are not sums form one term, where the first of them stands.
    assert_eq!(y.terms.len(), 2);
    assert_eq!(y.terms[0].sum, Vec::<&str>::new());
    assert_eq!(
        y.terms[0].body,
        Expr::Add(vec![read("a", "o"), Expr::div(Expr::Mul(vec![Expr::Num(2.0), read("x", "o")]), read("a", "o")),])
    );
    assert_eq!(y.terms[1].sum, vec!["k"]);
    assert_eq!(
        y.terms[1].body,
        Expr::Mul(vec![Expr::Num(-1.0), Expr::Read(Access::new("w", &["o", "k"])), read("x", "k")])
    );
    assert_eq!(y.ranges, vec![("o", 6), ("k", 6)]);
    let z = &l.stmts[1];
    assert_eq!(
        z.terms[0].body,
        Expr::Add(vec![
            Expr::Mul(vec![Expr::Num(-1.0), read("y", "o")]),
            Expr::Apply(Func::Exp, vec![Expr::Mul(vec![Expr::Num(-1.0), read("x", "o")])]),
        ])
    );
    // A negated sum is a term too: `-(a + Σ b)` is `-a` and `Σ -b`.
    let u = &l.stmts[2];
    assert_eq!(u.terms[0].body, Expr::Mul(vec![Expr::Num(-1.0), read("z", "o")]));
    assert_eq!(u.terms[1].sum, vec!["k"]);
    assert_eq!(
        u.terms[1].body,
        Expr::Mul(vec![Expr::Num(-1.0), Expr::Read(Access::new("w", &["o", "k"])), read("z", "k")])
    );
}

#[test]
fn affine_indices_are_normalized_and_give_ranges() {
    // `h*2 + 1 - h + (i - 1)` is `h + i`: i takes k's size 3, then h the 10 - 3 + 1 = 8
    // positions of a valid window; a constant index is an offset.
    let defs = "layer f(x: [L], K) {
        param k: [K];
        y[h, i] = x[h*2 + 1 - h + (i - 1)] * k[i] * x[3];
    }";
    let g = index_model("[10]", defs, "l: f(x, 3)").expect("checks");
    let s = only_index_layer(&g).output();
    let term = |var, coef| Term { var, coef, div: 1 };
    let x_at = |terms, offset| Expr::Read(Access { tensor: "x".into(), index: vec![Index { terms, offset }] });
    assert_eq!(
        s.terms[0].body,
        Expr::Mul(vec![
            x_at(vec![term("h", 1), term("i", 1)], 0),
            Expr::Read(Access::new("k", &["i"])),
            x_at(vec![], 3)
        ])
    );
    assert_eq!(s.ranges, vec![("h", 8), ("i", 3)]);
    assert_eq!(g.node(g.loss.input()).inputs.len(), 1);
}

/// The errors (code and message) of [`index_model`], which must fail.
fn index_errors(shape: &str, defs: &str, call: &str) -> Vec<String> {
    match index_model(shape, defs, call) {
        Ok(g) => panic!("`{call}` should not check:\n{g}"),
        Err(e) => e,
    }
}

const DENSE: &str = "layer dense(x: [I], O) { param w: [O, I]; y[o] = sum(i: w[o, i] * x[i]); }";
const DOUBLE: &str = "layer double(x: [I]) { y[i] = 2 * x[i]; }";

#[test]
fn index_layer_calls_bind_like_built_in_layers() {
    // Positional, keyword, a layer used above its definition, strategies naive and direct.
    for call in ["fc0: dense(x, 5)", "fc0: dense(x, O=5)", "fc0: dense(O=5, x=x)", "@strategy(direct) fc0: dense(x, 5)"]
    {
        let g = index_model("[7]", DENSE, call).unwrap_or_else(|e| panic!("{call}: {e:?}"));
        assert_eq!(g.params[0].name, "fc0.w");
        assert_eq!(g.params[0].shape, vec![5, 7]);
    }
    let g = index_model("[7]", DENSE, "@strategy(naive) fc0: dense(x, 5)").expect("checks");
    assert_eq!(g.nodes[2].strategy, Some(pdgc::ops::Strategy::Naive));
    // `dense` reads no window: `unfold` would be `direct`'s kernels.
    assert_eq!(pdgc::ops::strategies(&g.nodes[2].op), pdgc::ops::PLAIN_INDEX_STRATEGIES);
    let g = index_model("[7]", DOUBLE, "double(x)").expect("a layer without params takes no name");
    assert!(pdgc::ops::strategies(&g.nodes[2].op).is_empty());

    for (defs, call, expected) in [
        (DENSE, "dense(x, 5)", "E0120 this `dense` layer has parameters and needs a name"),
        (DOUBLE, "d: double(x)", "E0121 `double` has no parameters, so it takes no name"),
        (DENSE, "fc0: dense(x)", "E0113 `dense` needs the argument `O`"),
        (DENSE, "fc0: dense(x, 5, 6)", "E0111 too many arguments to `dense`"),
        (DENSE, "fc0: dense(x, O=5, out=5)", "E0110 `dense` has no argument `out`"),
        (DENSE, "fc0: dense(x, 5, O=6)", "E0112 argument `O` of `dense` is given twice"),
        (DENSE, "fc0: dense(5, 5)", "E0114 `x` of `dense` expects a tensor"),
        (DENSE, "fc0: dense(x, 2.5)", "E0114 `O` of `dense` expects an integer"),
        (DENSE, "fc0: dense(x, 0)", "E0116 `O` of `dense` must be positive"),
        (DENSE, "fc0: dense(x, 4294967296)", "E0211 `O` 4294967296 is too large"),
        (DENSE, "fc0: dense(z, 5)", "E0157 `x` of `dense` has 1 dims ([I]) but this tensor has shape [2, 7]"),
        (DENSE, "@strategy(crb) fc0: dense(x, 5)", "E0132 strategy `crb` does not apply to `dense`"),
        (DOUBLE, "@strategy(naive) double(x)", "E0132 strategy `naive` does not apply to `double`"),
    ] {
        // `(z` stands for an input of the wrong rank.
        let errors = if call.contains("(z") {
            index_errors("[2, 7]", defs, &call.replace("(z", "(x"))
        } else {
            index_errors("[7]", defs, call)
        };
        assert_eq!(errors, vec![expected.to_string()], "{call}");
    }
    // An integer parameter that is also an input's size must agree with it.
    let same = "layer f(x: [I], I) { y[i] = x[i]; }";
    assert!(index_model("[7]", same, "f(x, 7)").is_ok());
    assert_eq!(
        index_errors("[7]", same, "f(x, 6)"),
        vec!["E0157 size `I` is 6 from the argument `I`, but dim 0 of `x` is 7"]
    );
    let errors = index_errors("[7]", DENSE, "fc0: dense2(x, 5)");
    assert_eq!(errors, vec!["E0100 unknown layer `dense2`"]);
    let src = format!("model m {{ input x: [7]; label y: classes(5); {DENSE} loss cross_entropy(f: dens(x, 5), y); }}");
    let front = compile_front(&src);
    let unknown = front.diagnostics.iter().find(|d| d.code == "E0100").expect("an unknown layer");
    assert_eq!(unknown.notes, vec!["did you mean `dense`?"]);
    let fixed = "layer f(x: [3, N]) { y[i] = x[0, i]; }";
    assert_eq!(index_errors("[4, 5]", fixed, "f(x)"), vec!["E0157 dim 0 of `x` is declared 3 but this tensor's is 4"]);
}

#[test]
fn index_layer_definitions_report_every_mistake_once() {
    for (defs, expected) in [
        (
            "layer f(x: [I]) { y[i] = x[i]; }\nlayer f(x: [I]) { y[i] = x[i]; }",
            vec!["E0141 the layer `f` is defined twice"],
        ),
        (
            "layer batch_norm(x: [I]) { y[i] = x[i]; }",
            vec!["E0140 `batch_norm` is the name of a built-in op", "E0100 unknown layer `f`"],
        ),
        ("layer f(N) { y[i] = 1.0; }", vec!["E0142 `f` takes no tensor input"]),
        ("layer f(x: [I] pad (1, 1)) { y[i] = x[i]; }", vec!["E0142 `pad` gives 2 entries but `x` has 1 dims"]),
        ("layer f(x: []) { y[i] = 1.0; }", vec!["E0142 `x` has no dims"]),
        ("layer f(x: [I]) { param p: []; y[i] = x[i] * p[]; }", vec!["E0142 the parameter `p` has no dims"]),
        ("layer f(x: [I], O, O) { y[i] = x[i]; }", vec!["E0143 `O` is already defined in this layer"]),
        ("layer f(x: [I]) { param x: [I]; y[i] = x[i]; }", vec!["E0143 `x` is already defined in this layer"]),
        ("layer f(x: [I]) { y[i] = x[i]; y[i] = 2 * x[i]; }", vec!["E0143 `y` is already defined in this layer"]),
        ("layer f(x: [I]) { param w: [0]; y[i] = x[i] * w[i]; }", vec!["E0116 dimension 0 is not positive"]),
        ("layer f(x: [I]) { y[] = x[0]; }", vec!["E0146 `y` needs at least one index"]),
        ("layer f(x: [I]) { y[i, i] = x[i]; }", vec!["E0146 index `i` appears twice on the left-hand side"]),
        (
            "layer f(x: [I]) { y[i] = sum(n: x[n]) + x[i]; }",
            vec!["E0147 `n` is the batch index of the derived equations; use another name"],
        ),
        ("layer f(x: [I]) { y[i] = y[i] + x[i]; }", vec!["E0148 `y` is read before it is defined"]),
        ("layer f(x: [I]) { y[i] = q[i]; }", vec!["E0148 unknown tensor `q`"]),
        ("layer f(x: [I]) { y[i] = x[i / 2]; }", vec!["E0150 an index must be affine in the index variables"]),
        ("layer f(x: [I]) { y[i] = x[2.0]; }", vec!["E0150 an index must be affine in the index variables"]),
        ("layer f(x: [I]) { y[i] = x[x[i]]; }", vec!["E0150 an index must be affine in the index variables"]),
        ("layer f(x: [I]) { y[i] = x[i + 9223372036854775807 + 1]; }", vec!["E0150 an index constant is too large"]),
        (
            "layer f(x: [I]) { y[i] = x[i] * sum(j: x[j]); }",
            vec!["E0151 `sum` must be a whole term of the right-hand side"],
        ),
        (
            "layer f(x: [I]) { y[i] = sum(j: sum(k: x[k]) * x[j]); }",
            vec!["E0151 `sum` must be a whole term of the right-hand side"],
        ),
        ("layer f(x: [I]) { y[i] = sum(j, j: x[j]) + x[i]; }", vec!["E0152 `j` is summed over twice"]),
        ("layer f(x: [I]) { y[i] = sum(j: x[k]) + x[i]; }", vec!["E0153 unbound index `k`"]),
        (
            "layer f(x: [I]) { param w: [I]; y[i] = w[i + 1] * x[i]; }",
            vec!["E0154 the parameter `w` must be read by distinct plain indices"],
        ),
        ("layer f(x: [I]) { y[i] = i * x[i]; }", vec!["E0156 `i` is not a value"]),
        ("layer f(x: [I]) { y[i] = I * x[i]; }", vec!["E0156 `I` is not a value"]),
        ("layer f(x: [I]) { y[i] = exp(x[i], x[i]); }", vec!["E0156 `exp` takes one argument"]),
        ("layer f(x: [I]) { y[i] = dense(x[i]); }", vec!["E0156 unknown function `dense`"]),
    ] {
        let errors = index_model("[7]", defs, "f(x)").err().unwrap_or_default();
        assert_eq!(errors, expected, "{defs}");
    }
}

#[test]
fn index_ranges_and_bounds_are_checked_at_each_call() {
    for (defs, call, expected) in [
        (
            "layer f(a: [N], b: [M]) { y[i] = a[i] * b[i]; }",
            "f(x, z)",
            "E0158 index `i` ranges over dim 0 of `a` (size 7) and dim 0 of `b` (size 8)",
        ),
        ("layer f(x: [N]) { y[i] = x[i + 9]; }", "f(x)", "E0158 index `i` has no value that stays in bounds"),
        ("layer f(x: [N]) { y[i] = x[0 - i]; }", "f(x)", "E0158 the range of index `i` cannot be derived"),
        ("layer f(x: [N]) { y[i] = 1.0; }", "f(x)", "E0158 the range of index `i` cannot be derived"),
        ("layer f(x: [N]) { y[i] = x[i - 1]; }", "f(x)", "E0159 `x` is read out of bounds in dim 0"),
        ("layer f(x: [N]) { t[i] = x[i]; y[i] = t[i - 1 + 1] * t[i + 0]; }", "f(x)", ""),
        (
            "layer f(x: [N] pad (1)) { t[i] = x[i]; y[i] = t[i + 1] * x[i]; }",
            "f(x)",
            "E0159 `t` is read out of bounds in dim 0",
        ),
    ] {
        match index_model("[7]", defs, call) {
            Ok(g) if expected.is_empty() => assert!(!index_layers(&g).is_empty()),
            Ok(g) => panic!("{defs} should fail:\n{g}"),
            Err(e) => assert_eq!(e, vec![expected.to_string()], "{defs}"),
        }
    }
    // Sizes the kernels cannot address: a temporary, a loop nest, a range.
    for (defs, expected) in [
        (
            "layer f(x: [I]) { y[i, j] = x[i] * x[j]; }",
            "E0211 `f` makes an output of shape [65536, 65536] too large for pdgc's kernels",
        ),
        (
            "layer f(x: [I]) { y[j] = sum(k, l, m: x[j] * x[k] * x[l] * x[m]); }",
            "E0211 a term of `y` has too many points",
        ),
        (
            "layer f(x: [I] pad (4294967295)) { y[i] = x[i - 4294967295]; }",
            "E0211 index `i` would range over 8590000126 values",
        ),
    ] {
        assert_eq!(index_errors("[65536]", defs, "f(x)"), vec![expected.to_string()], "{defs}");
    }

    // A mistake in a body found at a call is reported once, however often the layer is
    // called: the first call that shows it is named.
    let defs = "layer f(x: [N]) { y[i] = x[i - 1]; }";
    let src = |calls: &str| {
        format!(
            "model m {{ input x: [7]; input z: [8]; label y: classes(3); {defs} {calls} \
             logits = fc: linear(a, 3); loss cross_entropy(logits, y); }}"
        )
    };
    let errors = |s: &str| compile_front(s).diagnostics.iter().filter(|d| d.is_error()).count();
    assert_eq!(errors(&src("a = f(x); b = f(x);")), 1);
    assert_eq!(errors(&src("a = f(x); b = f(z);")), 1);
    assert_eq!(errors(&src("a = f(x); b = f(z);").replace("x[i - 1]", "x[i]")), 0);
}
