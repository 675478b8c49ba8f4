//! IDX reading and Fashion-MNIST loading on small files written here: raw and gzipped,
//! normalization, and every kind of damaged file as a typed error.

use std::io::Write;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use pdgc::data::{self, normalize, Dataset, IMAGES_MAGIC, LABELS_MAGIC};
use pdgc::{CompileOptions, Error, Labels, Module};

/// A fresh, empty directory under the system's temp dir, removed with its contents when
/// dropped.
fn tmp_dir(name: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("pdgc-idx-{name}-")).tempdir().expect("temp dir")
}

fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

/// `n` images of `rows x cols` with pixel `(i * 37 + k) % 256`, labels `i % 10`.
fn images(n: usize, rows: usize, cols: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..n * rows * cols).map(|k| ((k / (rows * cols)) * 37 + k) as u8).collect();
    idx_bytes(IMAGES_MAGIC, &[n as u32, rows as u32, cols as u32], &data)
}

fn labels(n: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    idx_bytes(LABELS_MAGIC, &[n as u32], &data)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

/// A Fashion-MNIST-shaped directory: training files gzipped, test files raw.
fn fashion_dir(name: &str, n_train: usize, n_test: usize) -> TempDir {
    let dir = tmp_dir(name);
    write(dir.path(), "train-images-idx3-ubyte.gz", &gzip(&images(n_train, 28, 28)));
    write(dir.path(), "train-labels-idx1-ubyte.gz", &gzip(&labels(n_train)));
    write(dir.path(), "t10k-images-idx3-ubyte", &images(n_test, 28, 28));
    write(dir.path(), "t10k-labels-idx1-ubyte", &labels(n_test));
    dir
}

#[test]
fn raw_and_gzipped_files_read_the_same() {
    let dir = tmp_dir("same");
    let raw_i = write(dir.path(), "i", &images(7, 3, 4));
    let raw_l = write(dir.path(), "l", &labels(7));
    let gz_i = write(dir.path(), "i.gz", &gzip(&images(7, 3, 4)));
    let gz_l = write(dir.path(), "l.gz", &gzip(&labels(7)));
    let a = Dataset::from_idx_files(&raw_i, &raw_l).expect("raw");
    let b = Dataset::from_idx_files(&gz_i, &gz_l).expect("gz");
    assert_eq!(a, b);
    assert_eq!((a.len(), a.rows, a.cols), (7, 3, 4));
    assert_eq!(a.labels, vec![0, 1, 2, 3, 4, 5, 6]);
    // Image 2, pixel 5: (2 * 37 + 2 * 12 + 5) % 256 = 103.
    assert_eq!(a.images[2 * 12 + 5], normalize(103));
}

#[test]
fn normalization_is_fashion_mnist_mean_and_std() {
    assert!((normalize(0) - (-0.2860 / 0.3530)).abs() < 1e-6);
    assert!((normalize(255) - (0.7140 / 0.3530)).abs() < 1e-6);
    // The mean pixel maps to 0: 0.2860 * 255 = 72.93.
    assert!(normalize(73).abs() < 0.001);
}

#[test]
fn fashion_mnist_loads_from_a_directory_and_batches_for_the_model() {
    let dir = fashion_dir("ok", 12, 5);
    let fm = data::load_fashion_mnist(dir.path()).expect("loads");
    assert_eq!((fm.train.len(), fm.test.len()), (12, 5));
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/samples/mnist_cnn.pdg")).expect("sample");
    let module = Module::from_source("mnist_cnn.pdg", &src, &CompileOptions::new(4)).expect("compiles");
    let batch = fm.train.batch(&module.graph, &[3, 0, 11]).expect("batch");
    assert_eq!(batch.inputs["x"].shape, vec![3, 1, 28, 28]);
    assert_eq!(batch.inputs["x"].data[784..2 * 784], fm.train.images[..784]);
    assert_eq!(batch.labels, Labels::Classes(vec![3, 0, 1]));
    let empty = fm.train.batch(&module.graph, &[]).expect("empty batch");
    assert_eq!(empty.inputs["x"].shape, vec![0, 1, 28, 28]);
}

#[test]
fn missing_data_says_how_to_get_it() {
    let err = data::load_fashion_mnist(Path::new("/nonexistent/fashion")).expect_err("missing");
    let text = err.to_string();
    assert!(matches!(err, Error::DataMissing { .. }), "{text}");
    assert!(text.contains("apt-get install dataset-fashion-mnist"), "{text}");
    assert!(text.contains("--data fashion-mnist:DIR"), "{text}");
    assert!(text.contains("t10k-labels-idx1-ubyte"), "{text}");

    let dir = fashion_dir("one-missing", 3, 2);
    std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte")).expect("rm");
    let err = data::load_fashion_mnist(dir.path()).expect_err("missing file");
    assert!(err.to_string().contains("t10k-labels-idx1-ubyte[.gz] does not exist"), "{err}");
}

#[test]
fn data_spec_parses_the_default_and_a_directory() {
    assert_eq!(data::parse_data_spec("fashion-mnist").expect("ok"), PathBuf::from(data::FASHION_MNIST_DIR));
    assert_eq!(data::parse_data_spec("fashion-mnist:/d/x").expect("ok"), PathBuf::from("/d/x"));
    for bad in ["mnist", "fashion-mnist:", "cifar:/x"] {
        let err = data::parse_data_spec(bad).expect_err(bad);
        assert!(matches!(err, Error::InvalidSetting { name: "--data", .. }), "{err}");
    }
}

fn images_error(bytes: &[u8]) -> Error {
    let dir = tmp_dir("bad");
    let i = write(dir.path(), "images", bytes);
    let l = write(dir.path(), "labels", &labels(4));
    Dataset::from_idx_files(&i, &l).expect_err("damaged file accepted")
}

#[test]
fn damaged_files_are_typed_errors() {
    let good = images(4, 2, 2);
    let err = images_error(&good[..good.len() - 1]);
    assert!(matches!(err, Error::IdxDamaged { .. }), "{err}");
    assert!(err.to_string().contains("only 15 follow"), "{err}");

    let mut longer = good.clone();
    longer.push(0);
    let err = images_error(&longer);
    assert!(err.to_string().contains("but 17 follow"), "{err}");

    let err = images_error(&good[..9]);
    assert!(err.to_string().contains("too short for the 16-byte header"), "{err}");
    let err = images_error(&good[..2]);
    assert!(err.to_string().contains("too short for the 4-byte magic"), "{err}");

    let err = images_error(&labels(4));
    assert!(matches!(err, Error::IdxMagic { found: LABELS_MAGIC, expected: IMAGES_MAGIC, .. }), "{err}");
    assert!(err.to_string().contains("0x00000801"), "{err}");

    let huge = idx_bytes(IMAGES_MAGIC, &[u32::MAX, u32::MAX, u32::MAX], &[]);
    let err = images_error(&huge);
    assert!(matches!(err, Error::IdxDamaged { .. }), "{err}");

    let gz = gzip(&good);
    let err = images_error(&gz[..gz.len() - 6]);
    assert!(matches!(err, Error::Gzip { .. }), "{err}");
    let mut flipped = gz.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    let err = images_error(&flipped);
    assert!(matches!(err, Error::Gzip { .. } | Error::IdxDamaged { .. }), "{err}");
}

#[test]
fn counts_and_labels_are_checked() {
    let dir = tmp_dir("counts");
    let i = write(dir.path(), "images", &images(5, 2, 2));
    let l = write(dir.path(), "labels", &labels(4));
    let err = Dataset::from_idx_files(&i, &l).expect_err("mismatch");
    assert!(matches!(err, Error::DatasetMismatch { n_images: 5, n_labels: 4, .. }), "{err}");

    let l = write(dir.path(), "labels12", &idx_bytes(LABELS_MAGIC, &[5], &[0, 1, 12, 3, 4]));
    let err = Dataset::from_idx_files(&i, &l).expect_err("label 12");
    assert!(matches!(err, Error::LabelOutOfRange { example: 2, value: 12, classes: 10, .. }), "{err}");
}

#[test]
fn a_model_that_does_not_take_the_images_is_refused() {
    let dir = tmp_dir("model");
    let i = write(dir.path(), "images", &images(3, 4, 4));
    let l = write(dir.path(), "labels", &labels(3));
    let ds = Dataset::from_idx_files(&i, &l).expect("loads");
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/samples/mnist_cnn.pdg")).expect("sample");
    let module = Module::from_source("mnist_cnn.pdg", &src, &CompileOptions::new(4)).expect("compiles");
    let err = ds.batch(&module.graph, &[0]).expect_err("4x4 images for a 28x28 model");
    assert!(matches!(err, Error::DataModelMismatch { .. }), "{err}");
    assert!(err.to_string().contains("the images are 4x4"), "{err}");
}
