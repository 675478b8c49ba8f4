//! `pdgc import`: every sample network, exported from an equivalent PyTorch model by
//! `tests/data/make_onnx.py`, imports to a `.pdg` with the sample's parameter names and
//! shapes; the imported models with PyTorch vectors reproduce the stored per-example
//! gradients; each kind of bad file gets its own error and exit code 1.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::pdgc;
use pdgc::graph::{LabelSpec, Op};
use pdgc::import::proto::onnx::tensor_shape_proto::dimension::Value as DimValue;
use pdgc::import::proto::onnx::type_proto::Value as TypeValue;
use pdgc::import::proto::ModelProto;
use pdgc::import::{import_bytes, import_file, ImportError, ImportLoss, ImportOptions};
use pdgc::{Batch, CompileOptions, Device, Labels, Module, Params, Tensor};
use prost::Message;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn onnx_path(name: &str) -> PathBuf {
    root().join("tests/data/onnx").join(format!("{name}.onnx"))
}

fn options(name: &str) -> ImportOptions {
    let loss = if name == "regression_mlp_ln" { ImportLoss::Mse } else { ImportLoss::CrossEntropy };
    ImportOptions { name: name.to_string(), loss }
}

fn sample_graph(name: &str) -> pdgc::Graph {
    let src = std::fs::read_to_string(root().join("samples").join(format!("{name}.pdg"))).expect("sample exists");
    pdgc::compile_front(&src).graph.expect("sample checks")
}

/// The op names of a graph in order, with their shapes (strategies and names aside).
fn layers(g: &pdgc::Graph) -> Vec<(String, Vec<usize>)> {
    g.nodes.iter().map(|n| (n.op.to_string(), n.shape.clone())).collect()
}

/// The samples that define layers in index notation.
const INDEX_NOTATION_SAMPLES: &[&str] = &["depthwise_index", "gated_bilinear"];

#[test]
fn every_sample_imports_with_its_parameter_names_and_shapes() {
    let mut names: Vec<String> = std::fs::read_dir(root().join("samples"))
        .expect("samples/")
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == "pdg").then(|| path.file_stem().unwrap().to_string_lossy().into_owned())
        })
        // Layers written in index notation have no ONNX form that imports back to them
        // (an exported depthwise layer comes back as the built-in grouped conv).
        .filter(|name| !INDEX_NOTATION_SAMPLES.contains(&name.as_str()))
        .collect();
    names.sort();
    assert!(names.len() >= 11, "{names:?}");
    for name in &names {
        let imported = import_file(&onnx_path(name), &options(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let sample = sample_graph(name);
        let params = |g: &pdgc::Graph| g.params.iter().map(|p| (p.name.clone(), p.shape.clone())).collect::<Vec<_>>();
        assert_eq!(params(&imported.graph), params(&sample), "{name}: parameters");
        // The same layers in the same order, argument for argument.
        assert_eq!(layers(&imported.graph), layers(&sample), "{name}: layers");
        assert_eq!(imported.graph.label, sample.label, "{name}: label");
        assert_eq!(imported.graph.flops(), sample.flops(), "{name}: FLOPs");
        // Models exported with weights bring them under their PyTorch names.
        if let Some(w) = &imported.weights {
            for p in &sample.params {
                let torch = pdgc::import::names::pytorch_param_name(&p.name);
                assert_eq!(w[&torch].shape, p.shape, "{name}: {torch}");
            }
        }
    }
}

#[test]
fn same_padding_with_an_even_kernel_imports_as_per_side_padding() {
    let imported = import_file(&onnx_path("same_padding"), &options("same_padding")).expect("imports");
    assert!(
        imported.source.contains("c1: conv2d(img, 4, kernel=(4, 2), padding=((1, 2), (0, 1)))"),
        "{}",
        imported.source
    );
    // Dilation 3 with kernel 2 spans 4: 1 before, 2 after on both axes.
    assert!(
        imported.source.contains("c2: conv2d(h2, 4, kernel=2, padding=((1, 2), (1, 2)), dilation=3)"),
        "{}",
        imported.source
    );
    assert_eq!(imported.graph.nodes.last().map(|n| n.shape.clone()), Some(vec![5]));
    assert!(imported.weights.is_none(), "a weight-free export");
}

/// Named tensors of a vector file written by `tests/data/make_vectors.py`, as f64.
fn vectors(name: &str) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(root().join("tests/data").join(format!("{name}.safetensors"))).expect("vectors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(k, t)| {
            let data: Vec<f64> = match t.dtype() {
                safetensors::Dtype::F64 => {
                    t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
                }
                safetensors::Dtype::F32 => {
                    t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect()
                }
                safetensors::Dtype::I64 => {
                    t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect()
                }
                other => panic!("{name}: dtype {other:?}"),
            };
            (k, (t.shape().to_vec(), data))
        })
        .collect()
}

#[test]
fn imported_models_reproduce_the_pytorch_vectors() {
    for name in [
        "mnist_cnn",
        "cifar_cnn",
        "conv1d_net",
        "depthwise_separable",
        "regression_mlp_ln",
        "gn_residual_block",
        "conv_geometry",
    ] {
        let imported = import_file(&onnx_path(name), &options(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let v = vectors(name);
        let tensor = |k: &str| Tensor::new(v[k].0.clone(), v[k].1.iter().map(|&x| x as f32).collect());
        // The imported weights are the ones the vectors were computed with (cifar_cnn is a
        // weight-free export: its parameters come from the vector file only).
        if let Some(w) = &imported.weights {
            for p in &imported.graph.params {
                let torch = pdgc::import::names::pytorch_param_name(&p.name);
                assert_eq!(w[&torch], tensor(&p.name), "{name}: imported {torch}");
            }
        } else {
            assert_eq!(name, "cifar_cnn");
        }
        let params =
            Params { tensors: imported.graph.params.iter().map(|p| (p.name.clone(), tensor(&p.name))).collect() };
        let inputs = imported
            .graph
            .inputs()
            .map(|n| match &n.op {
                Op::Input { name } => (name.clone(), tensor(name)),
                _ => unreachable!("inputs() yields inputs"),
            })
            .collect();
        let label = imported.graph.label.name().to_string();
        let labels = match &imported.graph.label {
            LabelSpec::Classes { .. } => Labels::Classes(v[&label].1.iter().map(|&x| x as i64).collect()),
            LabelSpec::Target { .. } => Labels::Target(tensor(&label)),
        };
        let batch = Batch { inputs, labels };
        let b = v["loss"].0[0];
        let module = Module::from_source(name, &imported.source, &CompileOptions::new(b)).expect("compiles");
        let mut session = module.session(Device::Cpu).expect("session");
        let grads = session.per_example_grads(&params, &batch).expect("grads");
        for p in &imported.graph.params {
            let expected = &v[&format!("grad.{}", p.name)].1;
            let ours = &grads[&p.name].data;
            let scale = expected.iter().fold(0f64, |a, x| a.max(x.abs())).max(1e-8);
            let err = ours.iter().zip(expected).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max) / scale;
            assert!(err < 1e-4, "{name}: {} differs from PyTorch by {err:.2e}", p.name);
        }
    }
}

#[test]
fn the_cli_writes_a_model_that_checks_and_weights_pdgc_reads() {
    let dir = std::env::temp_dir().join(format!("pdgc-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let pdg = dir.join("mnist.pdg");
    let (pdg_s, weights_s) = (pdg.to_str().unwrap(), dir.join("mnist.safetensors"));
    let (code, _, err) = pdgc(&["import", "tests/data/onnx/mnist_cnn.onnx", "-o", pdg_s]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("26010 parameters") && err.contains("PyTorch names"), "{err}");
    let (code, out, err) = pdgc(&["check", pdg_s]);
    assert_eq!(code, 0, "{out}{err}");
    // The weights file uses PyTorch names, which `pdgc grads` accepts for the .pdg names.
    let bytes = std::fs::read(&weights_s).expect("weights written");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    assert!(st.names().contains(&"conv1.weight"), "{:?}", st.names());
    let graph = pdgc::compile_front(&std::fs::read_to_string(&pdg).unwrap()).graph.expect("checks");
    let params = Params::load(&weights_s, &graph).expect("pdgc reads the imported weights");
    assert_eq!(params.tensors.len(), 8);

    // A weight-free export: only with --no-weights.
    let vgg = dir.join("vgg.pdg");
    let (code, _, err) = pdgc(&["import", "tests/data/onnx/vgg16.onnx", "-o", vgg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("external data") && err.contains("--no-weights"), "{err}");
    let (code, _, err) = pdgc(&["import", "tests/data/onnx/vgg16.onnx", "-o", vgg.to_str().unwrap(), "--no-weights"]);
    assert_eq!(code, 0, "{err}");
    assert!(!dir.join("vgg.safetensors").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The mnist_cnn export, changed by `edit`, imported from memory.
fn import_edited(edit: impl FnOnce(&mut ModelProto)) -> Result<pdgc::import::Imported, ImportError> {
    let bytes = std::fs::read(onnx_path("mnist_cnn")).expect("mnist_cnn.onnx");
    let mut model = ModelProto::decode(bytes.as_slice()).expect("decodes");
    edit(&mut model);
    import_bytes("edited.onnx", &model.encode_to_vec(), None, &options("mnist_cnn"))
}

fn error_text(r: Result<pdgc::import::Imported, ImportError>) -> (ImportError, String) {
    let e = r.expect_err("an error");
    let text = e.to_string();
    (e, text)
}

#[test]
fn damaged_and_truncated_files_are_their_own_error() {
    let bytes = std::fs::read(onnx_path("mnist_cnn")).expect("mnist_cnn.onnx");
    for cut in [bytes.len() / 2, bytes.len() - 3, 7] {
        let (e, text) = error_text(import_bytes("cut.onnx", &bytes[..cut], None, &options("mnist_cnn")));
        assert!(matches!(e, ImportError::Damaged { .. }), "{cut}: {text}");
        assert!(text.contains("damaged or truncated"), "{text}");
    }
    let (e, _) = error_text(import_bytes("text.onnx", b"model m { }", None, &options("m")));
    assert!(matches!(e, ImportError::Damaged { .. }));
    let (e, _) = error_text(import_bytes("empty.onnx", b"", None, &options("m")));
    assert!(matches!(e, ImportError::Damaged { .. }));
}

#[test]
fn opsets_outside_the_supported_range_are_refused() {
    for (version, age) in [(9, "too old"), (99, "too new")] {
        let (e, text) = error_text(import_edited(|m| {
            for o in &mut m.opset_import {
                o.version = Some(version);
            }
        }));
        assert!(matches!(e, ImportError::Opset { .. }), "{text}");
        assert!(text.contains(&format!("opset {version} is {age}")) && text.contains("opsets 13 to 23"), "{text}");
    }
}

#[test]
fn unsupported_ops_name_the_node_its_type_and_what_to_do() {
    let (e, text) = error_text(import_edited(|m| {
        let g = m.graph.as_mut().unwrap();
        let n = g.node.iter_mut().find(|n| n.op_type() == "Tanh").unwrap();
        n.op_type = Some("Softplus".into());
        n.name = Some("node_softplus".into());
    }));
    assert!(matches!(e, ImportError::UnsupportedOp { .. }), "{text}");
    assert!(
        text.contains("node `node_softplus` has op type `Softplus`") && text.contains("help: pdgc imports Conv"),
        "{text}"
    );

    let (_, text) = error_text(import_edited(|m| {
        let g = m.graph.as_mut().unwrap();
        g.node.iter_mut().find(|n| n.op_type() == "Tanh").unwrap().op_type = Some("BatchNormalization".into());
    }));
    assert!(text.contains("`BatchNormalization`") && text.contains("no per-example gradient exists"), "{text}");
    assert!(text.contains("group_norm"), "{text}");

    // An attribute pdgc has no equivalent for is an error of the same node.
    let (e, text) = error_text(import_edited(|m| {
        let g = m.graph.as_mut().unwrap();
        let pool = g.node.iter_mut().find(|n| n.op_type() == "MaxPool").unwrap();
        pool.attribute.iter_mut().find(|a| a.name() == "ceil_mode").unwrap().i = Some(1);
    }));
    assert!(matches!(e, ImportError::Unsupported { .. }), "{text}");
    assert!(text.contains("(MaxPool) cannot be imported: ceil_mode=1") && text.contains("ceil_mode=False"), "{text}");
}

#[test]
fn a_dynamic_dimension_other_than_the_batch_is_refused() {
    let (e, text) = error_text(import_edited(|m| {
        let input = &mut m.graph.as_mut().unwrap().input[0];
        let Some(TypeValue::TensorType(t)) = input.r#type.as_mut().unwrap().value.as_mut() else { panic!() };
        t.shape.as_mut().unwrap().dim[2].value = Some(DimValue::DimParam("height".into()));
    }));
    assert!(matches!(e, ImportError::DynamicShape { .. }), "{text}");
    assert!(text.contains("input `x` has a dynamic dimension `height` at axis 2"), "{text}");
    // The batch itself may be dynamic (the exports are) or fixed.
    import_edited(|m| {
        let input = &mut m.graph.as_mut().unwrap().input[0];
        let Some(TypeValue::TensorType(t)) = input.r#type.as_mut().unwrap().value.as_mut() else { panic!() };
        t.shape.as_mut().unwrap().dim[0].value = Some(DimValue::DimValue(4));
    })
    .expect("a fixed batch imports");
}

#[test]
fn every_import_error_exits_with_code_1() {
    let dir = std::env::temp_dir().join(format!("pdgc-import-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bytes = std::fs::read(onnx_path("mnist_cnn")).expect("mnist_cnn.onnx");
    let mut model = ModelProto::decode(bytes.as_slice()).expect("decodes");
    model.opset_import[0].version = Some(99);
    let cases: [(&str, Vec<u8>, &str); 2] = [
        ("truncated.onnx", bytes[..bytes.len() / 2].to_vec(), "damaged or truncated"),
        ("new.onnx", model.encode_to_vec(), "is too new"),
    ];
    for (file, data, expected) in cases {
        let path = dir.join(file);
        std::fs::write(&path, data).expect("write");
        let out = dir.join("out.pdg");
        let (code, _, err) = pdgc(&["import", path.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert_eq!(code, 1, "{file}: {err}");
        assert!(err.starts_with("error: ") && err.contains(expected), "{file}: {err}");
        assert!(!out.exists(), "{file}: nothing is written on an error");
    }
    let (code, _, err) = pdgc(&["import", "tests/data/onnx/missing.onnx", "-o", dir.join("x.pdg").to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot read"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_torchscript_exporters_patterns_import_too() {
    // Opset 17: GELU as Div/Erf/Add/Mul/Mul, padding="same" as auto_pad=SAME_UPPER, group norm
    // with Constant nodes and its affine weights renamed `onnx::Mul_*` (the layer name comes
    // from the node's scope, `/gn/Mul`), a linear over the last dim as MatMul + Add.
    let imported = import_file(&onnx_path("legacy_opset17"), &options("legacy")).expect("imports");
    assert_eq!(imported.opset, 17);
    for line in [
        "h1 = c1: conv2d(img, 4, kernel=(4, 2), padding=((1, 2), (0, 1)));",
        "h2 = gn: group_norm(h1, 2);",
        "h3 = gelu(h2);",
        "h4 = ln: layer_norm(h3, dims=1);",
        "h5 = rows: linear(h4, 3);",
        "h8 = fc: linear(h7, 5);",
    ] {
        assert!(imported.source.contains(line), "{line}\n{}", imported.source);
    }
    let names: Vec<&str> = imported.graph.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.len(), 10, "{names:?}");
}
