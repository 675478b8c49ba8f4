//! Shared by the integration tests that run the `pdgc` binary.

use std::process::Command;

/// Runs `pdgc ARGS` in the repository root: (exit code, stdout, stderr).
pub fn pdgc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pdgc"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("pdgc runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
