//! `pdgc calibrate` as a user runs it: a quick calibration writes a profile that loads,
//! holds only positive finite numbers, and that `explain` accepts.
//!
//! Timings in a debug build: the kernels are JIT-compiled by Cranelift with the same
//! settings in every build, but the `gemm` crate under the contractions is compiled at the
//! debug profile's opt-level, so these numbers are not the machine's; the test checks only
//! that every field is measured and usable.

mod common;

use common::pdgc;
use pdgc::plan::DeviceProfile;

#[test]
fn a_quick_calibration_writes_a_profile_explain_uses() {
    let dir = std::env::temp_dir().join(format!("pdgc-calibrate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("quick.json");
    let path_arg = path.to_str().expect("a UTF-8 temp path");
    let (code, stdout, stderr) = pdgc(&["calibrate", "--quick", "--threads", "2", "-o", path_arg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("bandwidth:") && stderr.contains("peak_flops 1/1"), "progress on stderr: {stderr}");
    assert!(stdout.contains("half_efficiency_flops") && stdout.contains("cpu2 (built in)"), "{stdout}");
    assert!(stdout.contains(&format!("--device {path_arg}")), "{stdout}");
    let p = DeviceProfile::load(&path).expect("the written profile loads");
    assert!(p.name.ends_with("-2t-quick"), "{}", p.name);
    for (field, x) in [
        ("peak_flops", p.peak_flops),
        ("bandwidth", p.bandwidth),
        ("launch_latency", p.launch_latency),
        ("half_efficiency_flops", p.half_efficiency_flops),
        ("window_efficiency", p.window_efficiency),
        ("gram_efficiency", p.gram_efficiency),
    ] {
        assert!(x.is_finite() && x > 0.0, "{field} = {x}");
    }
    assert!(p.memory > 0 && p.tile > 0);
    // The temporary file was renamed, not left behind.
    assert_eq!(std::fs::read_dir(&dir).expect("lists").count(), 1);

    let (code, stdout, stderr) = pdgc(&["explain", "samples/mnist_cnn.pdg", "--device", path_arg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&format!("on {}", p.name)), "{stdout}");
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn calibrate_rejects_bad_settings_clearly() {
    let never = std::env::temp_dir().join(format!("pdgc-calibrate-never-{}.json", std::process::id()));
    let (code, _, stderr) = pdgc(&["calibrate", "--quick", "--threads", "0", "-o", never.to_str().expect("UTF-8")]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--threads 0"), "{stderr}");
    assert!(!never.exists());
    let (code, _, stderr) = pdgc(&["calibrate", "--quick", "--threads", "1", "-o", "/nonexistent-dir/p.json"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot write /nonexistent-dir/p.json: no directory /nonexistent-dir"), "{stderr}");
    // It fails before measuring anything.
    assert!(!stderr.contains("bandwidth:"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
