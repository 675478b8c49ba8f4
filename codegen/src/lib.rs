//! pdgc-codegen: the kernel layer of pdgc.
//!
//! Architecture invariant: this crate knows only kernels — loop nests over buffers with
//! known shapes, their CUDA C rendering and their Cranelift lowering. It never imports the
//! root crate and knows nothing of layers, the `.pdg` language or gradients. Both backends
//! render the same kernel description, so a kernel's meaning is defined once.
//!
//! The kernel IR lands with the CPU backend (see the project's issue tracker); until then
//! this crate is intentionally empty.
