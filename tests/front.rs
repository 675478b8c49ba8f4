//! Front-end tests over `samples/`: snapshots of every stage (AST, Graph, check report)
//! for every valid sample, and of every rendered diagnostic for `samples/errors/`.
//!
//! Re-bless with `INSTA_UPDATE=always cargo test --test front` (or `cargo insta review`).

use std::path::Path;

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
