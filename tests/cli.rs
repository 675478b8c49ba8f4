//! The `pdgc` binary as a user runs it: exit codes, where output goes, JSON shape.

mod common;

use common::pdgc;

#[test]
fn check_prints_the_layer_table_and_totals() {
    let (code, stdout, stderr) = pdgc(&["check", "samples/mnist_cnn.pdg", "samples/alexnet.pdg"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("model mnist_cnn"));
    assert!(stdout.contains("conv1  conv2d     [16, 14, 14]"), "{stdout}");
    assert!(stdout.contains("total: 61,100,840 parameters"), "{stdout}");
}

#[test]
fn check_reads_layers_written_in_index_notation() {
    let (code, stdout, stderr) =
        pdgc(&["check", "tests/data/models/index_gated_mlp.pdg", "tests/data/models/index_depthwise.pdg"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("g1     gated  [32]                   4,096"), "{stdout}");
    assert!(stdout.contains("dw2    depthwise3_s2  [8, 8, 8]"), "{stdout}");
    let (code, _, stderr) = pdgc(&["check", "samples/errors/index_out_of_bounds.pdg"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("error[E0159]") && stderr.contains("pad (0, (1, 0), (1, 0))"), "{stderr}");
}

#[test]
fn check_fails_with_located_diagnostics() {
    let (code, stdout, stderr) = pdgc(&["check", "samples/errors/multiple_errors.pdg"]);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(stderr.contains("samples/errors/multiple_errors.pdg:7:37"), "{stderr}");
    assert!(stderr.contains("did you mean `maxpool2d`?"), "{stderr}");
    assert!(stderr.contains("3 error(s)"), "{stderr}");
}

#[test]
fn warnings_pass_unless_denied() {
    let (code, _, stderr) = pdgc(&["check", "samples/errors/unused_binding.pdg"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("warning[W0001]"));
    let (code, _, _) = pdgc(&["check", "--deny-warnings", "samples/errors/unused_binding.pdg"]);
    assert_eq!(code, 1);
}

#[test]
fn check_json_is_machine_readable() {
    let (code, stdout, _) =
        pdgc(&["check", "--format", "json", "samples/mnist_cnn.pdg", "samples/errors/batch_norm.pdg"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    assert_eq!(v[0]["ok"], true);
    assert_eq!(v[0]["report"]["total_params"], 26010);
    assert_eq!(v[0]["report"]["layers"][1]["name"], "conv1");
    assert_eq!(v[1]["ok"], false);
    assert_eq!(v[1]["diagnostics"][0]["code"], "E0101");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let (code, _, stderr) = pdgc(&["check", "no/such/file.pdg"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read no/such/file.pdg"), "{stderr}");
}

#[test]
fn explain_prints_the_plan_table_and_totals() {
    let (code, stdout, stderr) = pdgc(&["explain", "samples/mnist_cnn.pdg", "--batch", "128", "--device", "cpu2"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("mnist_cnn: batch 128 on cpu2 (goal: clipped-sum"), "{stdout}");
    for col in ["strategy", "runner-up", "fastDP", "why:", "total: private step"] {
        assert!(stdout.contains(col), "{col} missing:\n{stdout}");
    }
}

#[test]
fn explain_writes_json_and_an_svg_plot() {
    let svg = std::env::temp_dir().join(format!("pdgc-test-{}.svg", std::process::id()));
    let svg_arg = svg.to_str().expect("utf-8 temp path");
    let (code, stdout, stderr) =
        pdgc(&["explain", "samples/cifar_cnn.pdg", "--batch", "64", "--format", "json", "--plot", svg_arg]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    assert_eq!(v["plan"]["batch"], 64);
    let text = std::fs::read_to_string(&svg).expect("plot written");
    let _ = std::fs::remove_file(&svg);
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert_eq!(text.matches("<rect x=\"170.0\"").count(), 6 * 5 + 2 * 3, "one bar per candidate (6 convs, 2 linears)");
}

#[test]
fn explain_rejects_bad_options_clearly() {
    let (code, _, stderr) = pdgc(&["explain", "samples/mnist_cnn.pdg", "--device", "tpu"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown device profile `tpu`"), "{stderr}");
    let (code, _, stderr) = pdgc(&["explain", "samples/mnist_cnn.pdg", "--strategy", "fc1=crb"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("`crb` does not apply to `fc1`"), "{stderr}");
    let (code, _, stderr) = pdgc(&["explain", "samples/mnist_cnn.pdg", "--memory-budget", "12 parsecs"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("unknown unit"), "{stderr}");
}

#[test]
fn dumps_print_each_stage() {
    for (stage, needle) in [
        ("ast", "model mnist_cnn {"),
        ("graph", "graph mnist_cnn"),
        ("grads", "dW[n,co,ci,kh,kw] = Σ_{oh,ow}"),
        ("plan", "plan mnist_cnn  batch=32"),
    ] {
        let (code, stdout, stderr) = pdgc(&["compile", "samples/mnist_cnn.pdg", "--dump", stage]);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains(needle), "{stage}: {stdout}");
    }
}

#[test]
fn compile_dumps_the_cuda_module() {
    let (code, stdout, stderr) = pdgc(&["compile", "samples/mnist_cnn.pdg", "--batch", "8", "--dump", "cuda"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("extern \"C\" __global__ void"), "{stdout}");
    assert!(stdout.contains("static __device__ __forceinline__ float pdgc_max"), "the helpers come first");
}

#[test]
fn bench_says_where_it_ran_and_cuda_without_a_gpu_is_a_clear_error() {
    let (code, stdout, stderr) =
        pdgc(&["bench", "samples/toy_l2_r4_k3.pdg", "--batch", "2", "--repeats", "1", "--strategy", "unfold"]);
    assert_eq!(code, 0, "{stderr}");
    let gpu = pdgc_codegen::cuda::device::CudaDevice::open(0).is_ok();
    let device = if gpu { "on cuda (" } else { "on cpu (" };
    assert!(stdout.contains(device), "{stdout}");
    if !gpu {
        let (code, _, stderr) = pdgc(&["bench", "samples/toy_l2_r4_k3.pdg", "--batch", "2", "--device", "cuda"]);
        assert_eq!(code, 1);
        assert!(stderr.contains("no CUDA driver") && stderr.contains("libcuda.so"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// `pdgc grads` on an empty batch (Poisson sampling draws them): empty per-example outputs
/// and a zero clipped sum, exit code 0.
#[test]
fn grads_on_an_empty_batch_gives_empty_outputs_and_a_zero_sum() {
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};
    let scratch = tempfile::Builder::new().prefix("pdgc-cli-empty-").tempdir().expect("temp dir");
    let dir = scratch.path();
    let src = std::fs::read_to_string("samples/mnist_cnn.pdg").expect("reads");
    let module = pdgc::Module::from_source("mnist_cnn.pdg", &src, &pdgc::CompileOptions::new(1)).expect("compiles");
    let params = dir.join("params.safetensors");
    module.init_params(0).save(&params).expect("saves");
    let batch = dir.join("batch.safetensors");
    let views = vec![
        ("x".to_string(), TensorView::new(Dtype::F32, vec![0, 1, 28, 28], &[]).expect("view")),
        ("y".to_string(), TensorView::new(Dtype::I64, vec![0], &[]).expect("view")),
    ];
    std::fs::write(&batch, safetensors::serialize(views, None).expect("serializes")).expect("writes");
    let out = dir.join("out.safetensors");
    let (p, b, o) = (params.to_str().unwrap(), batch.to_str().unwrap(), out.to_str().unwrap());
    let (code, _, stderr) = pdgc(&[
        "grads",
        "samples/mnist_cnn.pdg",
        "--params",
        p,
        "--batch",
        b,
        "-o",
        o,
        "--clip",
        "1",
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("(0 examples,"), "{stderr}");
    let bytes = std::fs::read(&out).expect("output");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    assert_eq!(st.tensor("loss").expect("loss").shape(), &[0]);
    assert_eq!(st.tensor("norms").expect("norms").shape(), &[0]);
    assert_eq!(st.tensor("conv1.weight").expect("grads").shape(), &[0, 16, 1, 8, 8]);
    let sum = st.tensor("clipped_sum.conv1.weight").expect("clipped sum");
    assert_eq!(sum.shape(), &[16, 1, 8, 8]);
    assert!(sum.data().iter().all(|&b| b == 0), "the clipped sum of no examples is zero");
}

#[test]
fn sizes_too_large_for_the_kernels_fail_check_and_compile_clearly() {
    let (code, stdout, stderr) = pdgc(&["check", "samples/errors/too_large.pdg"]);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(stderr.contains("error[E0211]") && stderr.contains("samples/errors/too_large.pdg:6:31"), "{stderr}");

    // 2^31 outputs per example are fine; at 128 examples the buffer outgrows one launch.
    let scratch = tempfile::Builder::new().prefix("pdgc-cli-limits-").tempdir().expect("temp dir");
    let dir = scratch.path();
    let model = dir.join("wide.pdg");
    let src = "model wide {\n    input x: [1];\n    label y: [1];\n    h = fc1: linear(x, 2147483648);\n    \
               p = fc2: linear(h, 1);\n    loss mse(p, y);\n}\n";
    std::fs::write(&model, src).expect("written");
    let out = dir.join("wide.pdgm");
    let (model, out) = (model.to_str().expect("utf-8 path"), out.to_str().expect("utf-8 path"));
    let (code, _, stderr) = pdgc(&["compile", model, "--batch", "128", "-o", out]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("buffer `act1` (the output of layer `fc1`"), "{stderr}");
    assert!(stderr.contains("at batch 128") && stderr.contains("at most 127 examples"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!std::path::Path::new(out).exists(), "no module is written");
}
