//! The RDP accountant against Opacus, its edge cases and errors, and `pdgc privacy` with
//! both accountants (the PLD accountant itself is tested in `tests/pld.rs`).
//!
//! The expected numbers come from Opacus 1.6 (scipy 1.17), δ = 1e-5:
//!
//! ```python
//! from opacus.accountants import RDPAccountant
//! from opacus.accountants.utils import get_noise_multiplier
//! from opacus.accountants.analysis import rdp
//! a = RDPAccountant(); a.history = [(sigma, q, steps)]
//! eps, order = a.get_privacy_spent(delta=1e-5)
//! get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps)
//! rdp._compute_rdp(q, sigma, alpha)
//! ```

mod common;

use common::pdgc;

use pdgc::privacy::{self, PrivacySpent};

const DELTA: f64 = 1e-5;

/// (σ, q, steps, Opacus' ε, Opacus' best order, Opacus' get_noise_multiplier(ε)).
const OPACUS: [(f64, f64, u64, f64, f64, f64); 4] = [
    (1.1, 256.0 / 60000.0, 14062, 2.5965558689607486, 8.1, 1.10107421875),
    (1.0, 0.01, 1000, 2.1013652716430564, 7.8, 1.0009765625),
    (0.8, 0.004, 10000, 3.9404674292264215, 5.3, 0.80078125),
    (2.0, 0.05, 500, 2.768584530797209, 7.6, 2.001953125),
];

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs().max(1.0)
}

#[test]
fn epsilon_matches_opacus() {
    for (sigma, q, steps, eps, order, _) in OPACUS {
        let spent = privacy::epsilon(sigma, q, steps, DELTA).expect("valid arguments");
        assert!(close(spent.epsilon, eps, 1e-9), "σ={sigma} q={q} T={steps}: ε {} vs Opacus {eps}", spent.epsilon);
        assert_eq!(spent.best_order, order, "σ={sigma} q={q} T={steps}");
    }
}

#[test]
fn rdp_matches_opacus_at_single_orders() {
    // (σ, q, α, Opacus' _compute_rdp): fractional and integer orders, small and large q.
    let expected = [
        (1.1, 0.0042666, 1.5, 1.74792393394466e-05),
        (0.5, 0.3, 2.5, 3.0070916955361153),
        (0.3, 0.01, 1.1, 0.020922394777901383),
        (3.0, 0.9, 7.3, 0.3469156348444448),
        (0.1, 0.5, 1.9, 93.53668928548454),
        (5.0, 1e-4, 63.0, 1.2858638475696995e-08),
        (0.7, 0.2, 12.0, 10.489147510032494),
        (10.0, 0.02, 3.7, 7.439608117044405e-06),
    ];
    for (sigma, q, alpha, want) in expected {
        let got = privacy::rdp(sigma, q, 1, &[alpha])[0];
        assert!((got - want).abs() <= 1e-9 * want, "σ={sigma} q={q} α={alpha}: {got} vs Opacus {want}");
    }
}

#[test]
fn noise_multiplier_matches_opacus() {
    for (sigma, q, steps, eps, _, opacus_sigma) in OPACUS {
        let got = privacy::noise_multiplier(eps, q, steps, DELTA).expect("reachable");
        assert_eq!(got, opacus_sigma, "ε={eps} q={q} T={steps} (true σ {sigma})");
    }
    // Targets that are not the ε of a round σ.
    let more = [
        (1.0, 0.01, 1000, 1.5234375),
        (8.0, 256.0 / 60000.0, 14062, 0.6781005859375),
        (3.0, 0.02, 2000, 1.54296875),
        (50.0, 0.1, 100, 0.430908203125),
    ];
    for (eps, q, steps, opacus_sigma) in more {
        assert_eq!(privacy::noise_multiplier(eps, q, steps, DELTA).expect("reachable"), opacus_sigma, "ε={eps}");
    }
}

#[test]
fn noise_multiplier_round_trips() {
    for (sigma, q, steps, eps, _, _) in OPACUS {
        let found = privacy::noise_multiplier(eps, q, steps, DELTA).expect("reachable");
        let spent = privacy::epsilon(found, q, steps, DELTA).expect("valid").epsilon;
        assert!(spent <= eps && spent >= eps - privacy::EPSILON_TOLERANCE, "σ={found}: ε {spent} for target {eps}");
        assert!(found >= sigma && found - sigma < 0.01, "σ {found} for the ε of σ = {sigma}");
        let tight = privacy::noise_multiplier_within(eps, q, steps, DELTA, 1e-6).expect("reachable");
        assert!((tight - sigma).abs() < 1e-5, "σ {tight} for the ε of σ = {sigma} at tolerance 1e-6");
    }
}

#[test]
fn epsilon_is_monotone() {
    let eps = |sigma, q, steps| privacy::epsilon(sigma, q, steps, DELTA).expect("valid").epsilon;
    let noises = [0.5, 0.7, 1.0, 1.3, 2.0, 4.0];
    for w in noises.windows(2) {
        assert!(eps(w[0], 0.01, 1000) > eps(w[1], 0.01, 1000), "more noise, less ε: σ {w:?}");
    }
    let rates = [1e-4, 1e-3, 0.01, 0.1, 0.5, 1.0];
    for w in rates.windows(2) {
        assert!(eps(1.0, w[0], 1000) < eps(1.0, w[1], 1000), "more sampling, more ε: q {w:?}");
    }
    let steps = [1, 10, 100, 1000, 10000];
    for w in steps.windows(2) {
        assert!(eps(1.0, 0.01, w[0]) < eps(1.0, 0.01, w[1]), "more steps, more ε: T {w:?}");
    }
    let looser = privacy::epsilon(1.0, 0.01, 1000, 1e-3).expect("valid").epsilon;
    assert!(looser < eps(1.0, 0.01, 1000), "a larger δ buys a smaller ε");
}

#[test]
fn default_orders_are_opacus_alphas() {
    let orders = privacy::default_orders();
    assert_eq!(orders.len(), 99 + 52);
    assert_eq!((orders[0], orders[8], orders[98], orders[99], orders[150]), (1.1, 1.9, 10.9, 12.0, 63.0));
    assert!(orders.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn rdp_edge_cases() {
    let orders = privacy::default_orders();
    assert!(privacy::rdp(1.0, 0.0, 100, &orders).iter().all(|&r| r == 0.0), "q = 0 spends nothing");
    assert!(privacy::rdp(0.0, 0.01, 100, &orders).iter().all(|&r| r == f64::INFINITY), "σ = 0: no privacy");
    assert!(privacy::rdp(0.0, 0.01, 0, &orders).iter().all(|&r| r == 0.0), "no steps spend nothing, even at σ = 0");
    let full = privacy::rdp(2.0, 1.0, 3, &orders);
    for (r, a) in full.iter().zip(&orders) {
        assert!(close(*r, 3.0 * a / 8.0, 1e-15), "q = 1 is the Gaussian mechanism: α/(2σ²) per step, α={a}");
    }
    let one = privacy::rdp(1.0, 0.01, 1, &orders);
    let many = privacy::rdp(1.0, 0.01, 1000, &orders);
    assert!(one.iter().zip(&many).all(|(a, b)| close(*b, 1000.0 * a, 1e-12)), "RDP composes additively");
    // Outside the domain rdp returns NaN rather than panicking or looping.
    assert!(privacy::rdp(1.0, 1.5, 1, &[2.0, 2.5])[0].is_nan());
    assert!(privacy::rdp(f64::NAN, 0.5, 1, &[2.5])[0].is_nan());
    assert!(privacy::rdp(1.0, 0.5, 1, &[1.0, 0.5, f64::NAN]).iter().all(|r| r.is_nan()), "orders must be > 1");
    assert!(privacy::rdp(f64::INFINITY, 0.5, 1, &[2.5])[0].is_nan());
    assert_eq!(privacy::rdp(1.0, 0.5, 1, &[1e300]), vec![f64::INFINITY], "an order too large to sum has no bound");
    // Tiny and huge σ stay finite where they should.
    assert_eq!(privacy::rdp(1e-200, 0.5, 1, &[2.0, 2.5]), vec![f64::INFINITY; 2]);
    assert!(privacy::rdp(1e6, 0.5, 1, &[2.0, 2.5]).iter().all(|r| r.is_finite() && *r >= 0.0));
}

#[test]
fn epsilon_edge_cases() {
    let no_noise = privacy::epsilon(0.0, 0.01, 10, DELTA).expect("valid");
    assert_eq!(no_noise.epsilon, f64::INFINITY);
    // With no sampling (or no steps) the RDP is 0 and ε is the conversion's floor, attained
    // at the largest order: −(log δ + log 63)/62 + log(62/63).
    let floor = -(DELTA.ln() + 63f64.ln()) / 62.0 + (62.0f64 / 63.0).ln();
    assert_eq!(
        privacy::epsilon(1.0, 0.0, 1000, DELTA).expect("valid"),
        PrivacySpent { epsilon: floor, best_order: 63.0 }
    );
    assert_eq!(privacy::epsilon(0.0, 0.5, 0, DELTA).expect("valid").epsilon, floor);
    // No noise is needed to stay within a target above that floor.
    assert_eq!(privacy::noise_multiplier(1.0, 0.0, 1000, DELTA).expect("reachable"), 0.0);
    let spent = privacy::privacy_spent(&[2.0, 3.0, 4.0], &[f64::NAN, 0.5, 0.1], DELTA).expect("valid");
    assert_eq!(spent.best_order, 4.0, "NaNs are ignored");
    let none = privacy::privacy_spent(&[2.0, 3.0], &[f64::NAN, f64::NAN], DELTA).expect("valid");
    assert!(none.epsilon == f64::INFINITY && none.best_order.is_nan());
}

/// The message of an [`pdgc::Error::Privacy`]; anything else fails the test.
fn message<T: std::fmt::Debug>(r: pdgc::Result<T>) -> String {
    match r {
        Err(e @ pdgc::Error::Privacy(_)) => e.to_string(),
        other => panic!("expected a privacy error, got {other:?}"),
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    for q in [-0.1, 1.5, f64::NAN] {
        assert!(message(privacy::epsilon(1.0, q, 10, DELTA)).contains("sample rate q must be in [0, 1]"));
        assert!(message(privacy::noise_multiplier(1.0, q, 10, DELTA)).contains("sample rate"));
    }
    for delta in [0.0, 1.0, -1e-5, f64::NAN] {
        assert!(message(privacy::epsilon(1.0, 0.01, 10, delta)).contains("δ must be in (0, 1)"));
        assert!(message(privacy::noise_multiplier(1.0, 0.01, 10, delta)).contains("δ must be in (0, 1)"));
    }
    for sigma in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(message(privacy::epsilon(sigma, 0.01, 10, DELTA)).contains("noise multiplier σ must be"));
    }
    for target in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(message(privacy::noise_multiplier(target, 0.01, 10, DELTA)).contains("target ε must be"));
    }
    assert!(message(privacy::noise_multiplier_within(1.0, 0.01, 10, DELTA, 0.0)).contains("tolerance"));
    let unreachable = message(privacy::noise_multiplier(0.05, 0.01, 1000, DELTA));
    assert!(unreachable.starts_with("privacy accounting: ε = 0.05 at δ = "), "{unreachable}");
    assert!(unreachable.contains("out of reach"), "{unreachable}");
    assert!(message(privacy::privacy_spent(&[2.0], &[], DELTA)).contains("1 orders but 0 RDP values"));
}

/// The value of a `name  value` line of `pdgc privacy`'s text output.
fn field(stdout: &str, name: &str) -> f64 {
    let line = stdout.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no `{name}` in\n{stdout}"));
    line[name.len()..].split_whitespace().next().and_then(|v| v.parse().ok()).expect("a number")
}

#[test]
fn cli_prints_opacus_epsilons() {
    for (sigma, q, steps, eps, order, _) in OPACUS {
        let (sigma, q, steps) = (sigma.to_string(), q.to_string(), steps.to_string());
        let (code, stdout, stderr) = pdgc(&[
            "privacy",
            "--noise",
            &sigma,
            "--sample-rate",
            &q,
            "--steps",
            &steps,
            "--delta",
            "1e-5",
            "--accountant",
            "rdp",
        ]);
        assert_eq!(code, 0, "{stderr}");
        assert!((field(&stdout, "epsilon") - eps).abs() < 1e-3, "σ={sigma}:\n{stdout}");
        assert!(stdout.contains("accountant        rdp"), "{stdout}");
        assert_eq!(field(&stdout, "best RDP order"), order, "{stdout}");
    }
}

#[test]
fn cli_finds_the_noise_for_a_target_epsilon() {
    for (_, q, steps, eps, _, opacus_sigma) in OPACUS {
        let (eps, q, steps) = (eps.to_string(), q.to_string(), steps.to_string());
        let (code, stdout, stderr) =
            pdgc(&["privacy", "--epsilon", &eps, "--sample-rate", &q, "--steps", &steps, "--accountant", "rdp"]);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(field(&stdout, "noise multiplier"), opacus_sigma, "{stdout}");
        assert!(field(&stdout, "epsilon") <= field(&stdout, "target epsilon"), "{stdout}");
    }
    // The default accountant, PLD: the smallest σ (within its tolerance) that stays within
    // the target, and less noise than RDP needs for it.
    let (code, stdout, stderr) = pdgc(&["privacy", "--epsilon", "2.5", "--sample-rate", "0.05", "--steps", "100"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("accountant        pld") && stdout.contains("(σ within 0.001)"), "{stdout}");
    let sigma = field(&stdout, "noise multiplier");
    assert!(field(&stdout, "epsilon") <= 2.5, "{stdout}");
    let below = privacy::Accountant::Pld.epsilon(sigma - 0.001, 0.05, 100, DELTA).expect("valid");
    assert!(below > 2.5, "σ − 0.001 = {} spends {below}", sigma - 0.001);
    let rdp_sigma = privacy::noise_multiplier(2.5, 0.05, 100, DELTA).expect("reachable");
    assert!(sigma < rdp_sigma, "PLD σ {sigma} vs RDP σ {rdp_sigma}");
}

#[test]
fn cli_takes_batch_dataset_size_and_epochs() {
    // 60 epochs of batches of 256 out of 60000: q = 256/60000, T = ceil(60·60000/256) = 14063.
    let (code, stdout, stderr) = pdgc(&[
        "privacy",
        "--noise",
        "1.1",
        "--batch",
        "256",
        "--dataset-size",
        "60000",
        "--epochs",
        "60",
        "--accountant",
        "rdp",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(field(&stdout, "sample rate"), 256.0 / 60000.0);
    assert_eq!(field(&stdout, "steps"), 14063.0);
    assert_eq!(field(&stdout, "delta"), 1e-5, "the default δ");
    assert!((field(&stdout, "epsilon") - 2.5966).abs() < 1e-3, "one step more than Opacus' example:\n{stdout}");
    // A whole number of steps stays whole: 1 epoch at q = 0.01 is 100 steps, not 101.
    let (_, stdout, _) = pdgc(&["privacy", "--noise", "1", "--sample-rate", "0.01", "--epochs", "1"]);
    assert_eq!(field(&stdout, "steps"), 100.0);
}

#[test]
fn cli_json_output() {
    let (code, stdout, stderr) =
        pdgc(&["privacy", "--noise", "1.0", "--sample-rate", "0.01", "--steps", "1000", "--format", "json"]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    // Both accountants; `epsilon` is the chosen one's (PLD by default).
    let rdp = v["epsilon_rdp"].as_f64().expect("a number");
    assert!((rdp - 2.1013652716430564).abs() < 1e-9, "{v}");
    assert_eq!(v["best_order"], 7.8);
    let pld = v["epsilon_pld"].as_f64().expect("a number");
    assert!((pld - 1.8282).abs() < 1e-3, "{v}");
    assert_eq!((v["accountant"].as_str(), v["epsilon"].as_f64()), (Some("pld"), Some(pld)));
    assert_eq!(v["steps"], 1000);
    assert_eq!(v["delta"], 1e-5);
    assert_eq!(v["target_epsilon"], serde_json::Value::Null);
    let (code, stdout, stderr) = pdgc(&[
        "privacy",
        "--noise",
        "1.0",
        "--sample-rate",
        "0.01",
        "--steps",
        "1000",
        "--format",
        "json",
        "--accountant",
        "rdp",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    assert_eq!((v["accountant"].as_str(), v["epsilon"].as_f64()), (Some("rdp"), Some(rdp)));
    assert_eq!(v["epsilon_pld"].as_f64(), Some(pld));
    // RDP accepts σ = 0 (ε = ∞, printed as null); PLD refuses it, so its ε is null.
    let (code, stdout, stderr) = pdgc(&[
        "privacy",
        "--noise",
        "0",
        "--sample-rate",
        "0.01",
        "--steps",
        "10",
        "--format",
        "json",
        "--accountant",
        "rdp",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    assert_eq!(v["epsilon_pld"], serde_json::Value::Null, "{v}");
}

#[test]
fn cli_rejects_bad_arguments_clearly() {
    let cases: [(&[&str], &str); 16] = [
        (
            &["--noise", "-1", "--sample-rate", "0.01", "--steps", "10"],
            "noise multiplier σ must be a finite number > 0",
        ),
        (
            &["--noise", "-1", "--sample-rate", "0.01", "--steps", "10", "--accountant", "rdp"],
            "noise multiplier σ must be a finite number ≥ 0",
        ),
        (&["--noise", "0", "--sample-rate", "0.01", "--steps", "10"], "must be a finite number > 0, got 0"),
        (&["--noise", "1", "--sample-rate", "1.5", "--steps", "10"], "sample rate q must be in (0, 1], got 1.5"),
        (&["--noise", "1", "--sample-rate", "0", "--steps", "10"], "sample rate q must be in (0, 1], got 0"),
        (&["--noise", "1", "--sample-rate", "nan", "--steps", "10"], "sample rate q must be in (0, 1], got NaN"),
        (
            &["--noise", "1", "--sample-rate", "1.5", "--steps", "10", "--accountant", "rdp"],
            "sample rate q must be in [0, 1], got 1.5",
        ),
        (
            &["--noise", "1", "--batch", "300", "--dataset-size", "100", "--steps", "10"],
            "sample rate q must be in (0, 1]",
        ),
        (&["--noise", "1", "--sample-rate", "0.01", "--steps", "0"], "the number of steps must be at least 1"),
        (&["--noise", "1", "--sample-rate", "0.01", "--steps", "10", "--delta", "1"], "δ must be in (0, 1), got 1"),
        (
            &["--noise", "1", "--batch", "3", "--dataset-size", "0", "--steps", "10"],
            "--dataset-size must be at least 1",
        ),
        (&["--noise", "1", "--sample-rate", "0.01", "--steps", "10", "--delta", "0"], "δ must be in (0, 1), got 0"),
        (&["--epsilon", "0.01", "--sample-rate", "0.01", "--steps", "10", "--accountant", "rdp"], "out of reach"),
        (
            &["--epsilon", "0", "--sample-rate", "0.01", "--steps", "10"],
            "the target ε must be a positive finite number",
        ),
        (&["--noise", "nan", "--sample-rate", "0.01", "--steps", "10"], "got NaN"),
        (&["--noise", "1", "--sample-rate", "0.01", "--epochs", "-2"], "--epochs must be a finite number ≥ 0"),
    ];
    for (args, expected) in cases {
        let (code, stdout, stderr) = pdgc(&[&["privacy"], args].concat());
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert!(stderr.contains(expected) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // Usage errors (clap): exit code 2.
    let usage: [(&[&str], &str); 4] = [
        (&["--noise", "1", "--epsilon", "2", "--sample-rate", "0.01", "--steps", "10"], "cannot be used with"),
        (&["--sample-rate", "0.01", "--steps", "10"], "--noise <NOISE>|--epsilon <EPSILON>"),
        (&["--noise", "1", "--batch", "256", "--steps", "10"], "--dataset-size"),
        (&["--noise", "1", "--sample-rate", "0.01"], "--steps <STEPS>|--epochs <EPOCHS>"),
    ];
    for (args, expected) in usage {
        let (code, _, stderr) = pdgc(&[&["privacy"], args].concat());
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
