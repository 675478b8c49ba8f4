//! Modules: the compiled form of a `.pdg` model, in memory and on disk.
//!
//! [`Module::from_source`] runs the whole pipeline — parse, check, differentiate, plan
//! (once per goal), lower — checks every buffer against the kernels' size limits at the
//! compiled batch size (`check::limits`) and verifies every kernel. A module file (`.pdgm`) is a
//! versioned container:
//!
//! ```text
//! "PDGM" | format version: u32 LE | payload length: u64 LE | FNV-1a 64 of payload: u64 LE | payload (JSON)
//! ```
//!
//! The payload holds the source and the compile options (from which loading rebuilds the
//! program, deterministically), the fingerprint of the program it produced, and the
//! artifacts for people and tools: the plan, the kernel IR, the CLIF text. Loading checks
//! the magic, the version, the length, the checksum and finally that the rebuilt program
//! has the stored fingerprint; each failure is its own clear error naming the file.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::lower::{lower, Program, Schedule};
use crate::ops::Strategy;
use crate::plan::{plan, DeviceProfile, Goal, Plan, PlanOptions};
use crate::runtime::{Device, Session};
use crate::tensor::Params;

pub const MAGIC: &[u8; 4] = b"PDGM";
/// Bumped whenever a saved module's program changes form: version 2 names every saved
/// temporary by its local name (the norms' `X̂`, `μ`, `σ⁻¹`).
pub const FORMAT_VERSION: u32 = 2;

/// What the compiler needs besides the source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompileOptions {
    /// The largest batch a session of this module accepts (and the batch it is planned for).
    pub batch: usize,
    /// The device profile the plan is made for.
    pub device: DeviceProfile,
    pub memory_budget: Option<u64>,
    /// `layer=strategy` overrides.
    pub overrides: Vec<(String, Strategy)>,
    /// The most bytes of im2col columns a conv's launches hold at once; beyond it they run
    /// in chunks of examples (see [`crate::lower::LaunchMode::Chunked`]).
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: u64,
    /// The most bytes of one example's im2col columns that a conv's launches keep in private
    /// memory, one buffer per worker thread, instead of a workspace for the batch (see
    /// [`crate::lower::fuse`]); 0 turns private columns off.
    #[serde(default = "default_private_bytes")]
    pub private_bytes: u64,
}

fn default_chunk_bytes() -> u64 {
    crate::lower::CHUNK_BYTES
}

fn default_private_bytes() -> u64 {
    crate::lower::PRIVATE_COLUMN_BYTES
}

impl CompileOptions {
    pub fn new(batch: usize) -> CompileOptions {
        CompileOptions {
            batch,
            device: DeviceProfile::cpu2(),
            memory_budget: None,
            overrides: Vec::new(),
            chunk_bytes: crate::lower::CHUNK_BYTES,
            private_bytes: crate::lower::PRIVATE_COLUMN_BYTES,
        }
    }

    fn plan_options(&self, goal: Goal) -> PlanOptions {
        PlanOptions {
            batch: self.batch,
            goal,
            device: self.device.clone(),
            memory_budget: self.memory_budget,
            overrides: self.overrides.clone(),
            chunk_bytes: self.chunk_bytes,
            private_bytes: self.private_bytes,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Module {
    pub name: String,
    pub source: String,
    pub options: CompileOptions,
    pub graph: Arc<Graph>,
    pub plans: [Plan; 3],
    pub program: Arc<Program>,
}

#[derive(Serialize, Deserialize)]
struct Payload {
    name: String,
    source: String,
    options: CompileOptions,
    fingerprint: u64,
    /// Human-readable artifacts: `plan`, `kernels` (IR), `clif` when emitted.
    artifacts: std::collections::BTreeMap<String, String>,
}

/// FNV-1a, 64 bit: the payload checksum and the program fingerprint.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Module {
    /// Compiles `.pdg` source. On source errors the diagnostics are in the error's text.
    pub fn from_source(name: &str, source: &str, options: &CompileOptions) -> Result<Module> {
        if options.batch == 0 {
            return Err(Error::EmptyBatch);
        }
        let front = crate::compile_front(source);
        let Some(graph) = front.graph else {
            let text = crate::diag::render(name, source, &front.diagnostics);
            return Err(Error::Source(format!("{name}\n{text}")));
        };
        let grads = crate::grad::differentiate(&graph);
        let plans = [
            plan(&graph, &grads, &options.plan_options(Goal::Grads))?,
            plan(&graph, &grads, &options.plan_options(Goal::Norms))?,
            plan(&graph, &grads, &options.plan_options(Goal::ClippedSum))?,
        ];
        let schedule = Schedule {
            batch: options.batch,
            chunk_bytes: options.chunk_bytes,
            private_bytes: options.private_bytes,
            grads: plans[0].strategies(),
            norms: plans[1].strategies(),
            clipped_sum: plans[2].strategies(),
        };
        let program = lower(&graph, &grads, &schedule)?;
        // The one check of sizes that depend on the batch or the plan (the per-example ones
        // were diagnostics of `check`), before any kernel is compiled or buffer allocated.
        crate::check::limits::check_buffers(name, source, &graph, &program, options.batch)?;
        for k in &program.kernels {
            pdgc_codegen::verify::verify(k)
                .map_err(|e| Error::Internal(format!("lowering produced an invalid kernel: {e}")))?;
        }
        Ok(Module {
            name: graph.name.clone(),
            source: source.to_string(),
            options: options.clone(),
            graph: Arc::new(graph),
            plans,
            program: Arc::new(program),
        })
    }

    /// The fingerprint of the compiled program (its full text form).
    pub fn fingerprint(&self) -> u64 {
        fnv1a(self.program.to_string().as_bytes())
    }

    /// A session on `device` with buffers for `options.batch` examples.
    pub fn session(&self, device: Device) -> Result<Session> {
        Session::new(Arc::clone(&self.graph), Arc::clone(&self.program), self.options.batch, device)
    }

    /// PyTorch-default initial parameters.
    pub fn init_params(&self, seed: u64) -> Params {
        Params::init(&self.graph, seed)
    }

    /// The plan for one goal.
    pub fn plan(&self, goal: Goal) -> &Plan {
        match goal {
            Goal::Grads => &self.plans[0],
            Goal::Norms => &self.plans[1],
            Goal::ClippedSum => &self.plans[2],
        }
    }

    /// The bytes of a module file, with the given artifacts.
    pub fn to_bytes(&self, artifacts: std::collections::BTreeMap<String, String>) -> Result<Vec<u8>> {
        let payload = Payload {
            name: self.name.clone(),
            source: self.source.clone(),
            options: self.options.clone(),
            fingerprint: self.fingerprint(),
            artifacts,
        };
        let json = serde_json::to_vec(&payload).map_err(|e| Error::Internal(e.to_string()))?;
        let mut out = Vec::with_capacity(json.len() + 24);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&fnv1a(&json).to_le_bytes());
        out.extend_from_slice(&json);
        Ok(out)
    }

    pub fn save(&self, path: &Path, artifacts: std::collections::BTreeMap<String, String>) -> Result<()> {
        let bytes = self.to_bytes(artifacts)?;
        std::fs::write(path, bytes).map_err(|source| Error::Write { path: path.to_path_buf(), source })
    }

    pub fn load(path: &Path) -> Result<Module> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
        Module::from_bytes(path, &bytes)
    }

    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Module> {
        let bad = |message: String| Error::Module { path: path.to_path_buf(), message };
        if bytes.len() < 24 || &bytes[..4] != MAGIC {
            return Err(bad(
                "not a pdgc module (no PDGM header); compile one with `pdgc compile FILE.pdg -o FILE.pdgm`".into(),
            ));
        }
        let version = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "module format version {version}, but this pdgc reads version {FORMAT_VERSION}: recompile the .pdg source"
            )));
        }
        let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let sum = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let payload = &bytes[24..];
        if payload.len() as u64 != len {
            return Err(bad(format!(
                "truncated or extended: the header says {len} payload bytes, the file has {}",
                payload.len()
            )));
        }
        if fnv1a(payload) != sum {
            return Err(bad("damaged: the payload checksum does not match".into()));
        }
        let p: Payload = serde_json::from_slice(payload).map_err(|e| bad(format!("unreadable payload: {e}")))?;
        let module =
            Module::from_source(&p.name, &p.source, &p.options).map_err(|e| bad(format!("does not rebuild: {e}")))?;
        if module.fingerprint() != p.fingerprint {
            return Err(bad(
                "was compiled by a different pdgc (the rebuilt program differs): recompile the .pdg source".into(),
            ));
        }
        Ok(module)
    }
}
