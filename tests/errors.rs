//! Bad input never panics: damaged modules, wrong safetensors files, wrong shapes and
//! dtypes, NaN, labels out of range, batches too large. Each is a typed error that names
//! the file and the problem.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pdgc::{Batch, CompileOptions, Device, Error, Labels, Module, Params, Tensor};

/// A path named `name` that no test creates (for messages and missing files).
fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("pdgc-errors-{}-{name}", std::process::id()))
}

/// A scratch directory of its own, removed when the test ends, pass or fail.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("pdgc-errors-").tempdir().expect("temp dir")
}

fn mnist(batch: usize) -> Module {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/samples/mnist_cnn.pdg");
    let src = std::fs::read_to_string(path).expect("sample");
    Module::from_source("mnist_cnn.pdg", &src, &CompileOptions::new(batch)).expect("compiles")
}

fn module_error(bytes: &[u8]) -> String {
    match Module::from_bytes(&tmp("m.pdgm"), bytes) {
        Err(e @ Error::Module { .. }) => e.to_string(),
        Err(other) => panic!("expected a module error, got {other}"),
        Ok(_) => panic!("a damaged module loaded"),
    }
}

#[test]
fn modules_round_trip_and_damage_is_detected() {
    let m = mnist(4);
    let bytes = m.to_bytes(BTreeMap::new()).expect("serializes");
    let loaded = Module::from_bytes(&tmp("ok.pdgm"), &bytes).expect("loads");
    assert_eq!(loaded.fingerprint(), m.fingerprint());

    assert!(module_error(b"hello").contains("not a pdgc module"));
    let mut other_version = bytes.clone();
    other_version[4] = 99;
    assert!(module_error(&other_version).contains("format version 99"));
    assert!(module_error(&bytes[..bytes.len() - 10]).contains("truncated"));
    let mut flipped = bytes.clone();
    let last = flipped.len() - 5;
    flipped[last] ^= 0x20;
    assert!(module_error(&flipped).contains("checksum"));
    let missing = Module::load(&tmp("does-not-exist.pdgm")).expect_err("no file");
    assert!(matches!(missing, Error::Read { .. }), "{missing}");
}

#[test]
fn source_errors_come_back_rendered() {
    let err =
        Module::from_source("bad.pdg", "model m { input x: [3]; }", &CompileOptions::new(2)).expect_err("no loss");
    let text = err.to_string();
    assert!(text.contains("bad.pdg") && text.contains("has no loss"), "{text}");
}

#[test]
fn parameter_files_are_validated() {
    let m = mnist(2);
    let good = m.init_params(0);
    let dir = scratch();
    let path = dir.path().join("params.safetensors");
    good.save(&path).expect("saves");
    assert_eq!(Params::load(&path, &m.graph).expect("loads"), good);

    let mut wrong_shape = good.clone();
    wrong_shape.tensors.insert("fc2.bias".into(), Tensor::zeros(vec![11]));
    wrong_shape.save(&path).expect("saves");
    let e = Params::load(&path, &m.graph).expect_err("wrong shape");
    assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("fc2.bias"), "{e}");

    let mut missing = good.clone();
    missing.tensors.remove("conv1.weight");
    missing.save(&path).expect("saves");
    let e = Params::load(&path, &m.graph).expect_err("missing");
    assert!(e.to_string().contains("missing tensor `conv1.weight`"), "{e}");

    let mut extra = good.clone();
    extra.tensors.insert("conv9.weight".into(), Tensor::zeros(vec![1]));
    extra.save(&path).expect("saves");
    let e = Params::load(&path, &m.graph).expect_err("extra");
    assert!(e.to_string().contains("conv9.weight") && e.to_string().contains("not a parameter"), "{e}");

    let mut nan = good.clone();
    nan.tensors.get_mut("fc1.weight").expect("fc1").data[7] = f32::NAN;
    nan.save(&path).expect("saves");
    let e = Params::load(&path, &m.graph).expect_err("NaN");
    assert!(matches!(e, Error::NonFinite { index: 7, .. }), "{e}");

    std::fs::write(&path, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage").expect("writes");
    let e = Params::load(&path, &m.graph).expect_err("garbage");
    assert!(matches!(e, Error::Safetensors { .. }), "{e}");
}

fn write_batch(path: &PathBuf, x: (&[usize], Vec<u8>, safetensors::Dtype), y: (&[usize], Vec<u8>, safetensors::Dtype)) {
    let views = vec![
        ("x".to_string(), safetensors::tensor::TensorView::new(x.2, x.0.to_vec(), &x.1).expect("view")),
        ("y".to_string(), safetensors::tensor::TensorView::new(y.2, y.0.to_vec(), &y.1).expect("view")),
    ];
    std::fs::write(path, safetensors::serialize(views, None).expect("serializes")).expect("writes");
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| ((i % 7) as f32 * 0.1).to_le_bytes()).collect()
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn batch_files_are_validated() {
    use safetensors::Dtype::*;
    let m = mnist(4);
    let dir = scratch();
    let path = dir.path().join("batch.safetensors");
    write_batch(&path, (&[2, 1, 28, 28], f32_bytes(2 * 784), F32), (&[2], i64_bytes(&[3, 9]), I64));
    let b = Batch::load(&path, &m.graph).expect("valid batch");
    assert_eq!(b.size().expect("size"), 2);
    // int32 labels are fine too.
    let i32_labels: Vec<u8> = [1i32, 2].iter().flat_map(|x| x.to_le_bytes()).collect();
    write_batch(&path, (&[2, 1, 28, 28], f32_bytes(2 * 784), F32), (&[2], i32_labels, I32));
    assert_eq!(Batch::load(&path, &m.graph).expect("int32 labels").labels, Labels::Classes(vec![1, 2]));

    write_batch(&path, (&[2, 1, 28, 27], f32_bytes(2 * 756), F32), (&[2], i64_bytes(&[3, 9]), I64));
    let e = Batch::load(&path, &m.graph).expect_err("wrong shape");
    assert!(e.to_string().contains("expected [B, 1, 28, 28]"), "{e}");

    write_batch(&path, (&[2, 1, 28, 28], f32_bytes(2 * 784), F32), (&[2], i64_bytes(&[3, 10]), I64));
    let e = Batch::load(&path, &m.graph).expect_err("label out of range");
    assert!(matches!(e, Error::LabelOutOfRange { example: 1, value: 10, classes: 10, .. }), "{e}");

    let f64_bytes: Vec<u8> = (0..2 * 784).flat_map(|_| 0.5f64.to_le_bytes()).collect();
    write_batch(&path, (&[2, 1, 28, 28], f64_bytes, F64), (&[2], i64_bytes(&[3, 9]), I64));
    let e = Batch::load(&path, &m.graph).expect_err("f64 input");
    assert!(matches!(e, Error::Dtype { .. }) && e.to_string().contains("F64"), "{e}");

    write_batch(&path, (&[2, 1, 28, 28], f32_bytes(2 * 784), F32), (&[3], i64_bytes(&[3, 9, 1]), I64));
    let e = Batch::load(&path, &m.graph).expect_err("disagreeing batch sizes");
    assert!(matches!(e, Error::BatchMismatch { .. }), "{e}");

    let mut nan = f32_bytes(2 * 784);
    nan[40..44].copy_from_slice(&f32::INFINITY.to_le_bytes());
    write_batch(&path, (&[2, 1, 28, 28], nan, F32), (&[2], i64_bytes(&[3, 9]), I64));
    let e = Batch::load(&path, &m.graph).expect_err("inf");
    assert!(matches!(e, Error::NonFinite { index: 10, .. }), "{e}");
}

#[test]
fn sessions_refuse_what_they_cannot_run() {
    let m = mnist(4);
    let mut s = m.session(Device::Cpu).expect("session");
    let params = m.init_params(0);
    let too_big = Batch::random(&m.graph, 5, 0);
    let e = s.per_example_grads(&params, &too_big).expect_err("too large");
    assert!(matches!(e, Error::BatchTooLarge { batch: 5, max: 4 }), "{e}");
    let batch = Batch::random(&m.graph, 3, 0);
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(s.clipped_grad_sum(&params, &batch, bad), Err(Error::BadClipNorm(_))));
    }
    let mut missing = params.clone();
    missing.tensors.remove("fc2.weight");
    assert!(s.loss(&missing, &batch).expect_err("missing param").to_string().contains("fc2.weight"));
    let mut wrong = params.clone();
    wrong.tensors.insert("fc2.weight".into(), Tensor::zeros(vec![10, 33]));
    assert!(matches!(s.loss(&wrong, &batch), Err(Error::Shape { .. })));
    // A module is compiled for at least one example (an empty batch is fine at run time).
    let e = Module::from_source(
        "m.pdg",
        &std::fs::read_to_string("samples/mnist_cnn.pdg").expect("reads"),
        &CompileOptions::new(0),
    );
    assert!(matches!(e, Err(Error::EmptyBatch)), "{:?}", e.err());
}

/// A model whose first linear layer has `out` outputs per example (one input feature),
/// regressing one target: its biggest tensors are the `[out]` activation and `[out, 1]` weight.
fn wide_linear(out: u64) -> String {
    format!(
        "model wide {{\n    input x: [1];\n    label y: [1];\n\n    h = fc1: linear(x, {out});\n    \
         p = fc2: linear(h, 1);\n    loss mse(p, y);\n}}\n"
    )
}

#[test]
fn sizes_the_kernels_cannot_address_are_diagnostics_at_their_layer() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/samples/errors/too_large.pdg");
    let src = std::fs::read_to_string(path).expect("sample");
    let front = pdgc::compile_front(&src);
    assert!(front.graph.is_none());
    let [d] = front.diagnostics.as_slice() else { panic!("one diagnostic: {:?}", front.diagnostics) };
    assert_eq!(d.code, "E0211");
    assert_eq!(&src[d.span().start..d.span().end], "4294967296", "the argument that is too large");
    let call = src.find("conv2d(").expect("the conv");
    assert!(d.span().start > call && d.span().end < src[call..].find(')').expect("its end") + call);
    let err = Module::from_source("too_large.pdg", &src, &CompileOptions::new(2)).expect_err("not compiled");
    let text = err.to_string();
    assert!(matches!(err, Error::Source(_)), "{text}");
    assert!(text.contains("error[E0211]") && text.contains("too_large.pdg:6:31"), "{text}");

    // Each size that is born too large, at the span that makes it so: a declared dim, a
    // shape whose product is too large, a layer whose weight, output or im2col columns
    // are, a label with more classes than f32 indexes exactly.
    let cases: &[(&str, &str)] = &[
        ("input x: [4294967296];\n    label y: [1];\n    p = fc: linear(x, 1);\n    loss mse(p, y);", "4294967296"),
        ("input x: [65536, 65536];\n    label y: [1];\n    p = fc: linear(flatten(x), 1);\n    loss mse(p, y);", "65536, 65536"),
        ("input x: [65536];\n    label y: [1];\n    h = fc1: linear(x, 65536);\n    p = fc2: linear(h, 1);\n    loss mse(p, y);", "fc1: linear(x, 65536)"),
        ("input x: [1, 65536, 32768];\n    label y: [1];\n    h = conv1: conv2d(x, 2, kernel=1);\n    p = fc: linear(flatten(global_avg_pool(h)), 1);\n    loss mse(p, y);", "conv1: conv2d(x, 2, kernel=1)"),
        ("input x: [65536, 64, 64];\n    label y: [1];\n    h = conv1: conv2d(x, 1, kernel=64, padding=32);\n    p = fc: linear(flatten(global_avg_pool(h)), 1);\n    loss mse(p, y);", "conv1: conv2d(x, 1, kernel=64, padding=32)"),
        ("input x: [4];\n    label y: classes(16777217);\n    p = fc: linear(x, 16777217);\n    loss cross_entropy(p, y);", "16777217"),
    ];
    for (body, at) in cases {
        let src = format!("model m {{\n    {body}\n}}\n");
        let front = pdgc::compile_front(&src);
        let codes: Vec<&str> = front.diagnostics.iter().map(|d| d.code).collect();
        assert_eq!(codes, ["E0211"], "{src}");
        let span = front.diagnostics[0].span();
        assert_eq!(&src[span.start..span.end], *at, "{src}");
    }
}

#[test]
fn a_buffer_too_large_at_the_compiled_batch_is_a_typed_error() {
    use pdgc::check::limits::MAX_BUFFER_ELEMENTS;
    // 2^31 elements per example: fine per example, too many for one kernel launch at 128
    // examples (2^38 > (2^31 − 1) · 128).
    let src = wide_linear(1 << 31);
    assert!(pdgc::compile_front(&src).graph.is_some(), "each example is within the limits");
    let fits = (MAX_BUFFER_ELEMENTS >> 31) as usize;
    assert_eq!(fits, 127);
    match Module::from_source("wide.pdg", &src, &CompileOptions::new(fits + 1)) {
        Err(Error::TooLarge { buffer, what, batch, elements, limit, advice, .. }) => {
            assert_eq!((buffer.as_str(), batch, elements, limit), ("act1", 128, 1u128 << 38, MAX_BUFFER_ELEMENTS));
            assert!(what.contains("layer `fc1` at wide.pdg:5:9"), "{what}");
            assert!(advice.contains("at most 127 examples"), "{advice}");
        }
        other => panic!("expected Error::TooLarge, got {other:?}"),
    }
    // At the largest batch that fits it compiles (nothing is allocated at compile time).
    Module::from_source("wide.pdg", &src, &CompileOptions::new(fits)).expect("compiles at 127");
}

/// A safetensors file holding one tensor `name` whose header claims `shape` but which
/// holds `data` bytes.
fn claimed_tensor(name: &str, shape: &str, data: usize) -> Vec<u8> {
    let header = format!("{{\"{name}\":{{\"dtype\":\"F32\",\"shape\":{shape},\"data_offsets\":[0,{data}]}}}}");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(vec![0u8; data]);
    bytes
}

#[test]
fn files_that_claim_enormous_tensors_are_typed_errors_not_aborts() {
    let m = mnist(2);
    let dir = scratch();
    for shape in ["[1099511627776,1099511627776]", "[4611686018427387904,4611686018427387904]", "[8,1,5,5]"] {
        let path = dir.path().join("huge.safetensors");
        std::fs::write(&path, claimed_tensor("conv1.weight", shape, 16)).expect("written");
        match Params::load(&path, &m.graph) {
            Err(Error::Safetensors { .. }) => {}
            other => panic!("{shape}: expected a safetensors error, got {other:?}"),
        }
        match Batch::load(&path, &m.graph) {
            Err(Error::Safetensors { .. }) => {}
            other => panic!("{shape}: expected a safetensors error, got {other:?}"),
        }
    }
}
