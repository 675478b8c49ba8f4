//! pdgc-codegen: the kernel layer of pdgc.
//!
//! Architecture invariant: this crate knows only kernels — loop nests over buffers with
//! known shapes ([`ir`]), their checks ([`verify`]), a reference interpreter that is the
//! test oracle ([`interp`]), the Cranelift CPU backend ([`cpu`]), the CUDA backend
//! ([`cuda`]: CUDA C, NVRTC, device launches) and the analyses they share ([`analysis`]:
//! how a kernel's iterations split over threads, which loops run on vector lanes, what a
//! kernel costs to run) and the aligned host memory their arguments live in ([`buffer`]).
//! It never imports the root crate and knows nothing of layers, the `.pdg` language or
//! gradients. Every backend renders the same kernel description, so a kernel's meaning is
//! defined once. The interpreter and the CPU backend share their scalar float semantics
//! (`math`: one definition of each transcendental, NaN-propagating `max`/`min`), so the
//! JIT's scalar code, and its vector code for those functions, match the oracle bit for bit.

pub mod analysis;
pub mod buffer;
pub mod cpu;
pub mod cuda;
pub mod interp;
pub mod ir;
mod math;
pub mod verify;
pub mod visit;
