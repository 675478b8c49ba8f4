//! pdgc-codegen: the kernel layer of pdgc.
//!
//! Architecture invariant: this crate knows only kernels — loop nests over buffers with
//! known shapes ([`ir`]), their checks ([`verify`]), a reference interpreter that is the
//! test oracle ([`interp`]) and the Cranelift CPU backend ([`cpu`]). It never imports the
//! root crate and knows nothing of layers, the `.pdg` language or gradients. Every backend
//! renders the same kernel description, so a kernel's meaning is defined once.

pub mod ir;
