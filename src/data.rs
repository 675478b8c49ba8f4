//! Training data: IDX files (the MNIST format, gzipped or not) and Fashion-MNIST.
//!
//! An IDX file is a big-endian header — magic `0x0000_08TT` where `TT` is the element type
//! and the low byte the number of dimensions, then one u32 per dimension — followed by the
//! elements. MNIST-style datasets use unsigned bytes: images have magic `0x0000_0803`
//! (`[N, rows, cols]`), labels `0x0000_0801` (`[N]`).
//!
//! Invariants of a [`Dataset`]: `images.len() == labels.len() * rows * cols`, every label is
//! below [`CLASSES`], and pixels are normalized as [`normalize`] says. Every malformed file
//! (not gzip though it says so, wrong magic, a header that promises more bytes than there
//! are, trailing bytes, images and labels that disagree in count) is a typed [`Error`]
//! naming the file; nothing here panics on input.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::graph::{numel, Graph, LabelSpec, Op};
use crate::tensor::{Batch, Labels, Tensor, TensorMap};

/// Magic number of an IDX file of u8 images `[N, rows, cols]`.
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of u8 labels `[N]`.
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// Fashion-MNIST's pixel mean and standard deviation over the training set, after /255.
pub const FASHION_MNIST_MEAN: f32 = 0.2860;
pub const FASHION_MNIST_STD: f32 = 0.3530;
/// Classes of (Fashion-)MNIST.
pub const CLASSES: usize = 10;

/// The decoded contents of an IDX file of unsigned bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads a file, gunzipping it when it starts with the gzip magic bytes (whatever its name).
fn read_maybe_gzipped(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::Gzip { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses IDX bytes of unsigned bytes with the given magic number.
pub fn parse_idx(path: &Path, bytes: &[u8], magic: u32, what: &'static str) -> Result<Idx> {
    let damaged = |message: String| Error::IdxDamaged { path: path.to_path_buf(), message };
    if bytes.len() < 4 {
        return Err(damaged(format!("{} bytes, too short for the 4-byte magic number", bytes.len())));
    }
    let found = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if found != magic {
        return Err(Error::IdxMagic { path: path.to_path_buf(), found, expected: magic, what });
    }
    let ndims = (magic & 0xff) as usize;
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(damaged(format!("{} bytes, too short for the {header}-byte header", bytes.len())));
    }
    let dims: Vec<usize> =
        bytes[4..header].chunks_exact(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize).collect();
    let count = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let body = bytes.len() - header;
    match count {
        Some(n) if n == body => Ok(Idx { dims, data: bytes[header..].to_vec() }),
        Some(n) if n > body => {
            Err(damaged(format!("the header says {dims:?} ({n} bytes of data) but only {body} follow")))
        }
        Some(n) => Err(damaged(format!("the header says {dims:?} ({n} bytes of data) but {body} follow"))),
        None => Err(damaged(format!("the header's dimensions {dims:?} overflow"))),
    }
}

/// Reads an IDX file of u8 images `[N, rows, cols]` (gzipped or not).
pub fn read_idx_images(path: &Path) -> Result<Idx> {
    let bytes = read_maybe_gzipped(path)?;
    parse_idx(path, &bytes, IMAGES_MAGIC, "u8 images [N, rows, cols]")
}

/// Reads an IDX file of u8 labels `[N]` (gzipped or not).
pub fn read_idx_labels(path: &Path) -> Result<Idx> {
    let bytes = read_maybe_gzipped(path)?;
    parse_idx(path, &bytes, LABELS_MAGIC, "u8 labels [N]")
}

/// The pixel normalization: `(p / 255 − 0.2860) / 0.3530`, Fashion-MNIST's training-set
/// mean and standard deviation (the `transforms.Normalize` convention of PyTorch examples).
pub fn normalize(pixel: u8) -> f32 {
    (pixel as f32 / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
}

/// Labelled images, normalized, in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `[N, rows * cols]`, row-major, normalized by [`normalize`].
    pub images: Vec<f32>,
    pub labels: Vec<i64>,
    pub rows: usize,
    pub cols: usize,
}

/// Fashion-MNIST's two splits.
#[derive(Debug, Clone)]
pub struct FashionMnist {
    pub train: Dataset,
    pub test: Dataset,
}

impl Dataset {
    /// Reads an images file and a labels file and checks that they agree.
    pub fn from_idx_files(images: &Path, labels: &Path) -> Result<Dataset> {
        let img = read_idx_images(images)?;
        let lab = read_idx_labels(labels)?;
        let (n, rows, cols) = (img.dims[0], img.dims[1], img.dims[2]);
        if lab.dims[0] != n {
            return Err(Error::DatasetMismatch {
                images: images.to_path_buf(),
                n_images: n,
                labels: labels.to_path_buf(),
                n_labels: lab.dims[0],
            });
        }
        if let Some((example, &value)) = lab.data.iter().enumerate().find(|(_, &v)| v as usize >= CLASSES) {
            return Err(Error::LabelOutOfRange {
                file: labels.display().to_string(),
                example,
                value: value as i64,
                classes: CLASSES,
            });
        }
        Ok(Dataset {
            images: img.data.iter().map(|&p| normalize(p)).collect(),
            labels: lab.data.iter().map(|&l| l as i64).collect(),
            rows,
            cols,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Checks that a model takes these images: one input with `rows * cols` elements (e.g.
    /// `[1, 28, 28]`, `[28, 28]` or `[784]`) and a class label with at least 10 classes.
    pub fn check_model(&self, graph: &Graph) -> Result<()> {
        self.input_of(graph).map(|_| ())
    }

    fn input_of<'g>(&self, graph: &'g Graph) -> Result<(&'g str, &'g [usize])> {
        let bad = |message: String| Error::DataModelMismatch { model: graph.name.clone(), message };
        let inputs: Vec<_> = graph
            .inputs()
            .filter_map(|n| match &n.op {
                Op::Input { name } => Some((name.as_str(), n.shape.as_slice())),
                _ => None,
            })
            .collect();
        let [(name, shape)] = inputs[..] else {
            return Err(bad(format!(
                "the model has {} inputs, the dataset provides one image per example",
                inputs.len()
            )));
        };
        if numel(shape) as usize != self.rows * self.cols {
            return Err(bad(format!(
                "input `{name}` has shape {shape:?}, the images are {}x{} (use [1, {}, {}])",
                self.rows, self.cols, self.rows, self.cols
            )));
        }
        match &graph.label {
            LabelSpec::Classes { classes, .. } if *classes >= CLASSES => Ok((name, shape)),
            LabelSpec::Classes { classes, .. } => {
                Err(bad(format!("the label has {classes} classes, the dataset has {CLASSES}")))
            }
            LabelSpec::Target { .. } => Err(bad("the label is a regression target, the dataset has classes".into())),
        }
    }

    /// The examples at `indices` as a batch for `graph` (which may be empty).
    pub fn batch(&self, graph: &Graph, indices: &[usize]) -> Result<Batch> {
        let (name, shape) = self.input_of(graph)?;
        let per = self.rows * self.cols;
        let mut data = Vec::with_capacity(indices.len() * per);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(Error::Internal(format!("example index {i} out of range 0..{}", self.len())));
            }
            data.extend_from_slice(&self.images[i * per..(i + 1) * per]);
            labels.push(self.labels[i]);
        }
        let mut full = vec![indices.len()];
        full.extend_from_slice(shape);
        let mut inputs = TensorMap::new();
        inputs.insert(name.to_string(), Tensor::new(full, data));
        Ok(Batch { inputs, labels: Labels::Classes(labels) })
    }
}

/// The file of one split, `.gz` or not, in `dir`: the first of `stem.gz` and `stem` that
/// exists.
fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::DataMissing { dataset: "Fashion-MNIST".into(), path: dir.join(format!("{stem}[.gz]")) })
}

/// Loads Fashion-MNIST (or MNIST: same file names) from `dir`: `train-images-idx3-ubyte`,
/// `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each
/// possibly gzipped (`.gz`).
pub fn load_fashion_mnist(dir: &Path) -> Result<FashionMnist> {
    if !dir.is_dir() {
        return Err(Error::DataMissing { dataset: "Fashion-MNIST".into(), path: dir.to_path_buf() });
    }
    let train =
        Dataset::from_idx_files(&find(dir, "train-images-idx3-ubyte")?, &find(dir, "train-labels-idx1-ubyte")?)?;
    let test = Dataset::from_idx_files(&find(dir, "t10k-images-idx3-ubyte")?, &find(dir, "t10k-labels-idx1-ubyte")?)?;
    if (test.rows, test.cols) != (train.rows, train.cols) {
        return Err(Error::IdxDamaged {
            path: dir.to_path_buf(),
            message: format!(
                "training images are {}x{} but test images {}x{}",
                train.rows, train.cols, test.rows, test.cols
            ),
        });
    }
    Ok(FashionMnist { train, test })
}

/// Parses a `--data` value: `fashion-mnist` (the Debian location) or `fashion-mnist:DIR`.
pub fn parse_data_spec(spec: &str) -> Result<PathBuf> {
    match spec.split_once(':') {
        None if spec == "fashion-mnist" => Ok(PathBuf::from(FASHION_MNIST_DIR)),
        Some(("fashion-mnist", dir)) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        _ => Err(Error::InvalidSetting {
            name: "--data",
            value: spec.to_string(),
            reason: format!("expected `fashion-mnist` (reads {FASHION_MNIST_DIR}) or `fashion-mnist:DIR`"),
        }),
    }
}
