//! The library's typed errors. A user error (a bad file, a wrong shape, NaN in the input)
//! says what and where; [`Error::Internal`] always represents a bug in pdgc.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{file}: missing tensor `{name}`{hint}")]
    MissingTensor { file: String, name: String, hint: String },
    #[error("{file}: tensor `{name}` is not a parameter of model `{model}` (is this the right file?)")]
    UnexpectedTensor { file: String, name: String, model: String },
    #[error("{file}: tensor `{name}` has shape {found:?}, expected {expected}")]
    Shape { file: String, name: String, expected: String, found: Vec<usize> },
    #[error("{file}: tensor `{name}` has dtype {found}, expected {expected}")]
    Dtype { file: String, name: String, expected: String, found: String },
    #[error("{file}: tensor `{name}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite { file: String, name: String, index: usize, value: f32 },
    #[error("{file}: label {value} of example {example} is not a class index in 0..{classes}")]
    LabelOutOfRange { file: String, example: usize, value: i64, classes: usize },
    #[error("a batch of {batch} examples is larger than the {max} this module was compiled for (recompile with --batch {batch})")]
    BatchTooLarge { batch: usize, max: usize },
    /// A buffer larger than the kernels can address at the compiled batch size (see
    /// `check::limits`); found at compile time, before anything is allocated.
    #[error(
        "buffer `{buffer}` ({what}) would hold {elements} elements at batch {batch} ({shape} per example), \
         more than the {limit} pdgc's kernels can address: {advice}"
    )]
    TooLarge { buffer: String, what: String, batch: usize, shape: String, elements: u128, limit: u64, advice: String },
    #[error("the batch size must be at least 1")]
    EmptyBatch,
    #[error("inputs disagree on the batch size: `{a}` has {na} examples, `{b}` has {nb}")]
    BatchMismatch { a: String, na: usize, b: String, nb: usize },
    #[error("the clip norm must be a positive finite number, got {0}")]
    BadClipNorm(f32),
    #[error(
        "{dataset} not found: {path} does not exist.\n  Install it with `apt-get install dataset-fashion-mnist` \
         (it goes to /usr/share/datasets/fashion-mnist),\n  or pass `--data fashion-mnist:DIR` where DIR holds \
         train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte \
         (each may end in .gz)"
    )]
    DataMissing { dataset: String, path: PathBuf },
    #[error("{path}: not a readable gzip stream: {message}")]
    Gzip { path: PathBuf, message: String },
    #[error("{path}: IDX magic number {found:#010x}, expected {expected:#010x} ({what})")]
    IdxMagic { path: PathBuf, found: u32, expected: u32, what: &'static str },
    #[error("{path}: truncated or damaged IDX file: {message}")]
    IdxDamaged { path: PathBuf, message: String },
    #[error("{images} holds {n_images} images but {labels} holds {n_labels} labels")]
    DatasetMismatch { images: PathBuf, n_images: usize, labels: PathBuf, n_labels: usize },
    #[error("the data does not fit model `{model}`: {message}")]
    DataModelMismatch { model: String, message: String },
    #[error("{name} {value}: {reason}")]
    InvalidSetting { name: &'static str, value: String, reason: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{0} has errors (see the diagnostics above)")]
    Source(String),
    #[error("{path}: {message}")]
    Module { path: PathBuf, message: String },
    #[error("privacy accounting: {0}")]
    Privacy(String),
    #[error("device: {0}")]
    Device(String),
    #[error("kernel backend: {0}")]
    Backend(String),
    #[error(transparent)]
    Import(#[from] crate::import::ImportError),
    #[error(
        "not enough memory: {what} needs {} and {}; {advice}",
        crate::memory::human_bytes(*bytes),
        match budget { Some(b) => format!("the memory budget is {}", crate::memory::human_bytes(*b)), None => "the allocation failed".to_string() }
    )]
    OutOfMemory { what: String, bytes: u64, budget: Option<u64>, advice: String },
    #[error(
        "{path}: the disk has {} free but the file needs {}; {advice}",
        crate::memory::human_bytes(*free),
        crate::memory::human_bytes(*needed)
    )]
    DiskFull { path: PathBuf, needed: u64, free: u64, advice: String },
    #[error("internal error (a bug in pdgc, please report it): {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
